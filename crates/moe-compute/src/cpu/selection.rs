//! Choosing the CPU kernel set at start: `auto` takes the first set in
//! [`CpuKernels::all_available`]'s order (the fastest measured) that this CPU runs and whose
//! self-check passes; a named set must run here and pass it. The self-check computes products
//! of odd shapes (tails in k, partial tiles, f32 and bf16 weights, one row and many) with the
//! set and compares every element with the portable canonical dot product, bit for bit, so a
//! set whose kernels are wrong on some CPU is never used there (it costs about a millisecond).

use super::invariant::{canonical_dot, matmul_using};
use super::kernel_set::{choose, parse, CpuKernels};
use super::operand::Weights;
use super::simd::bf16_to_f32;
use crate::ComputeError;

/// Chooses the process's kernel set from `--cpu-kernels` (see the module doc).
pub fn select_cpu_kernels(request: &str) -> Result<CpuKernels, ComputeError> {
    let have = || CpuKernels::all_available().iter().map(|k| k.name()).collect::<Vec<_>>().join(", ");
    let set = match parse(request)? {
        None => CpuKernels::all_available().into_iter().find(|&k| {
            let ok = self_check(k);
            if !ok {
                tracing::error!(cpu_kernels = %k, "the kernels failed their self-check on this CPU; not using them");
            }
            ok
        }),
        Some(k) if !k.available() => {
            return Err(ComputeError::CpuKernels(format!(
                "--cpu-kernels {k}: this CPU cannot run it (it runs: {})",
                have()
            )))
        }
        Some(k) if !self_check(k) => {
            return Err(ComputeError::CpuKernels(format!(
                "--cpu-kernels {k}: the kernels gave wrong results in their self-check on this CPU; use another set ({}) and please report it",
                have()
            )))
        }
        Some(k) => Some(k),
    };
    let set = set.unwrap_or(CpuKernels::Portable);
    choose(set);
    Ok(set)
}

/// `n` values in [-1, 1] from a xorshift of `seed` (the self-check's operands; tests use them too).
pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 20001) as f32 / 10000.0 - 1.0
        })
        .collect()
}

/// Whether `set` (which must run on this CPU) gives the canonical bits on the check's shapes.
pub(crate) fn self_check(set: CpuKernels) -> bool {
    for &(m, k, n) in &[(1usize, 7usize, 5usize), (2, 24, 17), (3, 17, 29), (8, 64, 40), (9, 100, 77), (33, 40, 26)] {
        let x = values(m * k, 1 + m as u32);
        let w = values(n * k, 2 + n as u32);
        let bits: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        for weights in [Weights::F32(&w), Weights::Bf16(&bits)] {
            let mut got = vec![f32::NAN; m * n];
            matmul_using(set, &x, m, k, weights, n, &mut got);
            for r in 0..m {
                for c in 0..n {
                    let want = match weights {
                        Weights::F32(w) => canonical_dot(&x[r * k..], |i| w[c * k + i], k),
                        Weights::Bf16(b) => canonical_dot(&x[r * k..], |i| bf16_to_f32(b[c * k + i]), k),
                    };
                    if got[r * n + c].to_bits() != want.to_bits() {
                        return false;
                    }
                }
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_set_here_passes_and_missing_sets_are_refused() {
        for k in CpuKernels::all_available() {
            assert!(self_check(k), "{k} failed its self-check");
        }
        let e = select_cpu_kernels("sse9").unwrap_err().to_string();
        assert!(e.contains("one of auto, avx512, avx2, neon, portable"), "{e}");
        for k in [CpuKernels::Avx512, CpuKernels::Avx2, CpuKernels::Neon] {
            if !k.available() {
                let e = select_cpu_kernels(k.name()).unwrap_err().to_string();
                assert!(e.contains("this CPU cannot run it"), "{e}");
            }
        }
    }
}
