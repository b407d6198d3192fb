//! `x · Wᵀ` on the CPU, for f32 or bf16 W: the entry points, which all
//! go to the batch-invariant kernel ([`super::invariant`]): a row's result is the same whatever
//! else is in the call, and that kernel is also the fastest we have for 1 to 512 rows (register
//! tiles of up to 4 rows × 8 weight rows, bf16 widened in registers).

pub use super::operand::Weights;

/// `out[m×n] = x[m×k] · w[n×k]ᵀ`.
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    matmul_tw(x, m, k, Weights::F32(w), n, out)
}

/// [`matmul_t`] for f32 or bf16 weights.
pub fn matmul_tw(x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize, out: &mut [f32]) {
    super::invariant::matmul(x, m, k, w, n, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::simd::bf16_to_f32;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] = (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum();
            }
        }
        out
    }

    #[test]
    fn matches_naive() {
        for &(m, k, n) in &[(1, 64, 300), (3, 17, 5), (6, 128, 257), (7, 33, 9), (40, 96, 130), (64, 512, 700)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) / 9.0).collect();
            let mut out = vec![f32::NAN; m * n];
            matmul_t(&x, m, k, &w, n, &mut out);
            for (a, b) in out.iter().zip(naive(&x, m, k, &w, n)) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{m}x{k}x{n}: {a} vs {b}");
            }
            // bf16 weights give the products of their widened values, on both paths.
            let bits: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
            let widened: Vec<f32> = bits.iter().map(|&b| bf16_to_f32(b)).collect();
            let mut out16 = vec![f32::NAN; m * n];
            matmul_tw(&x, m, k, Weights::Bf16(&bits), n, &mut out16);
            for (a, b) in out16.iter().zip(naive(&x, m, k, &widened, n)) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "bf16 {m}x{k}x{n}: {a} vs {b}");
            }
        }
    }
}
