//! Small element-wise helpers of the CPU backend: bf16 widening (bf16 is the top half of an f32,
//! so widening is exact) and `y += a·x`. The dot products live in [`super::invariant`].

/// bf16 bits to f32 (exact).
#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `y += alpha * x` (multiply, then add: the same rounding on every CPU).
#[inline]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_is_exact_and_axpy_adds() {
        for v in [1.0f32, -2.5, 0.15625, 3.0e38] {
            assert_eq!(bf16_to_f32((v.to_bits() >> 16) as u16), f32::from_bits(v.to_bits() & 0xffff_0000));
        }
        let mut y = vec![1.0, 2.0];
        axpy(2.0, &[0.5, -1.0], &mut y);
        assert_eq!(y, vec![2.0, 0.0]);
    }
}
