//! This machine's fused multiply-add peak with a kernel set's instruction width: independent
//! register chains of FMAs on every thread, no memory traffic. The ceiling the benchmark holds
//! the prefill GEMM against.

use super::kernel_set::CpuKernels;
use rayon::prelude::*;
use std::time::Instant;

/// Independent accumulator chains per thread (enough to cover FMA latency × issue width).
const CHAINS: usize = 12;

/// GFLOP/s of `set` over every thread of the pool (best of three runs of `iters` steps).
pub fn fma_peak_gflops(set: CpuKernels, iters: usize) -> f64 {
    let threads = rayon::current_num_threads().max(1);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let lanes: usize = (0..threads).into_par_iter().map(|_| chains(set, iters)).sum();
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(lanes);
    }
    let lanes = width(set);
    2.0 * (threads * iters * CHAINS * lanes) as f64 / best / 1e9
}

fn width(set: CpuKernels) -> usize {
    match set {
        CpuKernels::Avx512 => 16,
        CpuKernels::Avx2 => 8,
        CpuKernels::Neon => 4,
        CpuKernels::Portable => 1,
    }
}

/// Runs the chains; returns a value that depends on every result (so nothing is optimised out).
fn chains(set: CpuKernels, iters: usize) -> usize {
    match set {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers only pass sets this CPU runs (the benchmark measures the chosen one).
        CpuKernels::Avx512 if set.available() => unsafe { x86::avx512(iters) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        CpuKernels::Avx2 if set.available() => unsafe { x86::avx2(iters) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        CpuKernels::Neon => unsafe { arm::neon(iters) },
        _ => {
            let mut acc = [0f32; CHAINS];
            for _ in 0..iters {
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = std::hint::black_box(1.000_001f32).mul_add(*a, i as f32 * 1e-9);
                }
            }
            acc.iter().map(|a| a.to_bits() as usize & 1).sum()
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;

    /// # Safety
    /// Only on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(iters: usize) -> usize {
        let m = _mm256_set1_ps(std::hint::black_box(1.000_001));
        let c = _mm256_set1_ps(1e-9);
        let mut acc = [_mm256_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, m, c);
            }
        }
        acc.iter().map(|a| _mm256_movemask_ps(*a) as usize).sum()
    }

    /// # Safety
    /// Only on a CPU with AVX-512 F.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn avx512(iters: usize) -> usize {
        let m = _mm512_set1_ps(std::hint::black_box(1.000_001));
        let c = _mm512_set1_ps(1e-9);
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, m, c);
            }
        }
        acc.iter().map(|a| _mm512_reduce_add_ps(*a).to_bits() as usize & 1).sum()
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::CHAINS;
    use std::arch::aarch64::*;

    /// # Safety
    /// Only on a CPU with NEON (every aarch64 CPU).
    pub(super) unsafe fn neon(iters: usize) -> usize {
        let m = vdupq_n_f32(std::hint::black_box(1.000_001));
        let c = vdupq_n_f32(1e-9);
        let mut acc = [vdupq_n_f32(0.0); CHAINS];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = vfmaq_f32(c, *a, m);
            }
        }
        acc.iter().map(|a| vgetq_lane_f32::<0>(*a).to_bits() as usize & 1).sum()
    }
}
