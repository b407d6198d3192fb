//! Numerics the host and the device compute to the same bits. `f32::exp` (libm) and CUDA's
//! `expf` may differ in the last place, which is enough to flip a sigmoid router's choice at a
//! near-tie; [`exp`] is built from IEEE-rounded operations only (multiply, fused multiply-add,
//! round-to-nearest-even), so Rust and CUDA (written with `__fmul_rn`, `fmaf`, `rintf`, which
//! the compiler never contracts or reorders) give the same result. Accuracy: within 2 ulp of the
//! true value over the whole f32 range (tested against f64).
//!
//! The gate-logit rule, on both sides: a NaN logit counts as −∞ (never chosen before a number,
//! nothing in a softmax sum) and +∞ as `f32::MAX`; a row with no finite logit gets weight 0.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes `expf` polynomial for e^r − 1 − r over r², |r| ≤ ln2/2.
const POLY: [f32; 6] = [1.987_569_1e-4, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];

const MAX_ARG: f32 = 88.722_84;
const MIN_ARG: f32 = -103.972_08;

/// Every constant of [`exp`], in the order kernels/common.cuh defines them (`EXP_C_*`).
pub const CONSTANTS: [f32; 11] =
    [LOG2E, LN2_HI, LN2_LO, POLY[0], POLY[1], POLY[2], POLY[3], POLY[4], POLY[5], MAX_ARG, MIN_ARG];

/// 2^i for i in [-126, 127], exactly.
fn pow2(i: i32) -> f32 {
    f32::from_bits(((i + 127) as u32) << 23)
}

/// e^x, the same bits as `exp_canonical` in kernels/common.cuh.
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x > MAX_ARG {
        return f32::INFINITY;
    }
    if x < MIN_ARG {
        return 0.0;
    }
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = POLY[0];
    for &c in &POLY[1..] {
        p = p.mul_add(r, c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    let n = n as i32;
    if n > 127 {
        y * pow2(127) * pow2(n - 127)
    } else if n < -126 {
        y * pow2(-126) * pow2(n + 126)
    } else {
        y * pow2(n)
    }
}

/// 1 / (1 + e^−x), the same bits on both sides.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// A gate logit as routing sees it: NaN → −∞, +∞ → `f32::MAX`.
pub fn gate_logit(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else if x == f32::INFINITY {
        f32::MAX
    } else {
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_true_value() {
        let mut worst = 0;
        let mut x = -103.0f32;
        while x < 88.7 {
            let want = (x as f64).exp() as f32;
            if want.is_normal() {
                worst = worst.max(ulps(exp(x), want));
            }
            x += 0.000_731;
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-100.0) > 0.0 && exp(-100.0) < 1e-43, "subnormal results: {}", exp(-100.0));
    }

    #[test]
    fn sigmoid_and_the_logit_rule() {
        assert_eq!(sigmoid(0.0), 0.5);
        assert_eq!(sigmoid(gate_logit(f32::NAN)), 0.0);
        assert_eq!(sigmoid(gate_logit(f32::INFINITY)), 1.0);
        assert_eq!(gate_logit(f32::NEG_INFINITY), f32::NEG_INFINITY);
        assert!((sigmoid(1.5) - 1.0 / (1.0 + (-1.5f32).exp())).abs() < 1e-7);
    }
}
