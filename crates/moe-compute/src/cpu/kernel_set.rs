//! Which instruction set the CPU kernels use, chosen once at start (`--cpu-kernels
//! auto|avx512|avx2|neon|portable`, see [`super::select_cpu_kernels`]) and read by every kernel
//! call.
//!
//! Every set computes the same canonical dot product (see [`super::invariant`]): the same fused
//! multiply-adds in the same order per output element, only more of them per instruction. So the
//! sets give the same bits, and replicas on machines with different instruction sets still agree;
//! [`NUMERICS`] names that arithmetic, and workers announce it in membership so a router never
//! mixes replicas that compute different bits.

use crate::ComputeError;
use std::sync::atomic::{AtomicU8, Ordering};

/// The arithmetic every CPU kernel set implements (announced in membership).
pub const NUMERICS: &str = "cpu-canonical-dot8-v1";

/// The order in which `auto` tries the sets (see [`CpuKernels::all_available`]).
const AUTO_ORDER: [CpuKernels; 4] = [CpuKernels::Avx512, CpuKernels::Avx2, CpuKernels::Neon, CpuKernels::Portable];

/// An instruction set the CPU kernels can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuKernels {
    /// AVX-512 F/BW/VL/DQ (x86-64): two output elements per 512-bit register.
    Avx512,
    /// AVX2 + FMA (x86-64).
    Avx2,
    /// NEON (aarch64).
    Neon,
    /// Plain Rust, element by element (any CPU).
    Portable,
}

impl CpuKernels {
    pub fn name(self) -> &'static str {
        match self {
            CpuKernels::Avx512 => "avx512",
            CpuKernels::Avx2 => "avx2",
            CpuKernels::Neon => "neon",
            CpuKernels::Portable => "portable",
        }
    }

    /// Whether this CPU can run the set.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            CpuKernels::Avx512 => {
                std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512dq")
                    && std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            CpuKernels::Avx2 => std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "aarch64")]
            CpuKernels::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            CpuKernels::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every set this CPU runs, in the order `auto` tries them: the fastest measured first. On
    /// a Xeon with AVX-512 (kernels/runs/2026-12-04-ff909fd, 2 threads) the AVX-512 set, which
    /// runs products of fewer than 4 rows on the AVX2 tiles, was ahead of AVX2 by 1.22x at
    /// prefill and 1.25x at decode batch 64.
    pub fn all_available() -> Vec<Self> {
        AUTO_ORDER.into_iter().filter(|k| k.available()).collect()
    }

    fn code(self) -> u8 {
        match self {
            CpuKernels::Avx512 => 1,
            CpuKernels::Avx2 => 2,
            CpuKernels::Neon => 3,
            CpuKernels::Portable => 4,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(CpuKernels::Avx512),
            2 => Some(CpuKernels::Avx2),
            3 => Some(CpuKernels::Neon),
            4 => Some(CpuKernels::Portable),
            _ => None,
        }
    }
}

impl std::fmt::Display for CpuKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// 0 until chosen (by [`super::select_cpu_kernels`] or, at the first kernel call, by default).
static CHOSEN: AtomicU8 = AtomicU8::new(0);

/// The name `request` (`--cpu-kernels`) asks for; `None` for `auto`.
pub(crate) fn parse(request: &str) -> Result<Option<CpuKernels>, ComputeError> {
    Ok(Some(match request.trim().to_ascii_lowercase().as_str() {
        "auto" | "" => return Ok(None),
        "avx512" => CpuKernels::Avx512,
        "avx2" => CpuKernels::Avx2,
        "neon" => CpuKernels::Neon,
        "portable" => CpuKernels::Portable,
        other => {
            return Err(ComputeError::CpuKernels(format!(
                "--cpu-kernels {other:?}: one of auto, avx512, avx2, neon, portable"
            )))
        }
    }))
}

/// Makes `set` the process's kernel set.
pub(crate) fn choose(set: CpuKernels) {
    CHOSEN.store(set.code(), Ordering::Relaxed);
}

/// The kernel set in use. When none was chosen (a library caller that never called
/// [`super::select_cpu_kernels`]), the widest set short of AVX-512, which is only taken after its
/// self-check at selection.
#[inline]
pub fn cpu_kernels() -> CpuKernels {
    if let Some(k) = CpuKernels::from_code(CHOSEN.load(Ordering::Relaxed)) {
        return k;
    }
    let k = [CpuKernels::Avx2, CpuKernels::Neon].into_iter().find(|k| k.available()).unwrap_or(CpuKernels::Portable);
    choose(k);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_names_are_refused() {
        assert!(CpuKernels::Portable.available());
        assert_eq!(CpuKernels::all_available().last(), Some(&CpuKernels::Portable));
        let e = parse("sse9").unwrap_err().to_string();
        assert!(e.contains("one of auto, avx512, avx2, neon, portable"), "{e}");
        assert_eq!(parse("auto").unwrap(), None);
        for k in [CpuKernels::Avx512, CpuKernels::Avx2, CpuKernels::Neon, CpuKernels::Portable] {
            assert_eq!(parse(k.name()).unwrap(), Some(k));
            assert_eq!(CpuKernels::from_code(k.code()), Some(k));
        }
    }

    /// `auto` takes AVX-512 where the CPU runs both x86 sets (measured faster; see
    /// `all_available`), and falls back to the portable kernels last.
    #[test]
    fn auto_tries_avx512_before_avx2() {
        let at = |k: CpuKernels| AUTO_ORDER.iter().position(|&o| o == k);
        assert!(at(CpuKernels::Avx512) < at(CpuKernels::Avx2));
        assert_eq!(AUTO_ORDER.last(), Some(&CpuKernels::Portable));
    }
}
