//! The AVX-512 (F/BW/VL/DQ) register tiles of the canonical dot product: two output elements per
//! 512-bit register, rows paired. The lower eight lanes accumulate element (2p, c) and the upper
//! eight element (2p + 1, c): each lane runs the same chain of fused multiply-adds as the AVX2
//! kernel's lane, so the bits are the AVX2 kernel's. Row pairs are packed per call, eight values
//! of one row then eight of the other (`[x₀ᵢ..x₀ᵢ₊₈, x₁ᵢ..x₁ᵢ₊₈]`), and each weight row's eight
//! values are broadcast to both halves (a load, no shuffle). An odd last row pairs with zeros.
//!
//! Every function enables F, BW, VL and DQ (which every AVX-512 server CPU has, and the set
//! requires): an intrinsic that needs a feature the function does not enable still compiles, but
//! as an out-of-line call that spills every accumulator. DQ's `_mm512_broadcast_f32x8` without
//! DQ once made this set 3× slower than AVX2 (kernels/runs/2026-12-04-d217621).

use super::avx2::hsum;
use std::arch::x86_64::*;
use std::ops::Range;

/// Row pairs per register tile at most.
pub(super) const MAX_PAIRS: usize = 4;

/// Packs rows `rows` of `x` (k values each) into pairs, `k8 = ⌊k/8⌋` blocks of 16 per pair.
pub(super) fn pack_pairs(x: &[f32], k: usize, rows: Range<usize>, packed: &mut Vec<f32>) {
    let k8 = k / 8;
    let pairs = rows.len().div_ceil(2);
    packed.clear();
    packed.resize(pairs * k8 * 16, 0.0);
    for (i, r) in rows.enumerate() {
        let (p, half) = (i / 2, i % 2);
        let row = &x[r * k..r * k + k8 * 8];
        for (b, chunk) in row.chunks_exact(8).enumerate() {
            let at = (p * k8 + b) * 16 + half * 8;
            packed[at..at + 8].copy_from_slice(chunk);
        }
    }
}

/// The eight weights at `p`, in both halves.
///
/// # Safety
/// `p` points to 8 readable f32 values, on a CPU with AVX-512 F/BW/VL/DQ.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
#[inline]
unsafe fn load_f32(p: *const f32) -> __m512 {
    // The AVX-512 F form of `_mm512_broadcast_f32x8` (see the module doc on out-of-line calls).
    _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p))))
}

/// Eight bf16 weights at `p`, widened, in both halves.
///
/// # Safety
/// `p` points to 8 readable u16 values, on a CPU with AVX-512 F/BW/VL/DQ.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
#[inline]
unsafe fn load_bf16(p: *const u16) -> __m512 {
    let both = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(both), 16))
}

/// The upper eight lanes (the F form of `_mm512_extractf32x8_ps::<1>`).
///
/// # Safety
/// Only on a CPU with AVX-512 F/BW/VL/DQ.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
#[inline]
unsafe fn upper_half(a: __m512) -> __m256 {
    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)))
}

#[inline]
fn widen_f32(v: f32) -> f32 {
    v
}

#[inline]
fn widen_bf16(v: u16) -> f32 {
    crate::cpu::simd::bf16_to_f32(v)
}

macro_rules! kernels {
    ($tile:ident, $sweep:ident, $t:ty, $load:ident, $widen:ident) => {
        /// P row pairs × NR columns of out (the rows of `live` of the 2·P are written).
        ///
        /// # Safety
        /// `xp` holds P packed pairs (`k8` blocks of 16 each), `x` the unpacked rows (k apart, for
        /// the tail), `w` NR rows of k values `ldw` apart, `out` the live rows of NR values `n`
        /// apart, no other thread writes those; the CPU has AVX-512 F/BW/VL/DQ.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $tile<const P: usize, const NR: usize, const PF: bool>(
            xp: *const f32,
            x: *const f32,
            live: usize,
            k: usize,
            w: *const $t,
            ldw: usize,
            out: *mut f32,
            n: usize,
        ) {
            let mut acc = [[_mm512_setzero_ps(); NR]; P];
            let k8 = k / 8;
            for b in 0..k8 {
                let i = b * 8;
                if PF {
                    // As in the AVX2 kernel: bring the next tile's weight rows in, in address
                    // order (prefetches never fault; the address is formed with wrapping
                    // arithmetic, so running past the weights is harmless).
                    let step = NR * 8 * std::mem::size_of::<$t>();
                    let ahead = (w as *const u8).wrapping_add(NR * ldw * std::mem::size_of::<$t>() + b * step);
                    let mut line = 0;
                    while line < step {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
                        line += 64;
                    }
                }
                let mut xv = [_mm512_setzero_ps(); P];
                for (p, v) in xv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(xp.add((p * k8 + b) * 16));
                }
                for c in 0..NR {
                    let wc = $load(w.add(c * ldw + i));
                    for (row, xr) in acc.iter_mut().zip(&xv) {
                        row[c] = _mm512_fmadd_ps(*xr, wc, row[c]);
                    }
                }
            }
            let full = k8 * 8;
            for (p, row) in acc.iter().enumerate() {
                for (c, a) in row.iter().enumerate() {
                    for half in 0..2 {
                        let r = 2 * p + half;
                        if r >= live {
                            continue;
                        }
                        let lanes = if half == 0 { _mm512_castps512_ps256(*a) } else { upper_half(*a) };
                        let mut s = hsum(lanes);
                        for t in full..k {
                            s += *x.add(r * k + t) * $widen(*w.add(c * ldw + t));
                        }
                        *out.add(r * n + c) = s;
                    }
                }
            }
        }

        /// `rows` (1..=8) rows, packed in `xp`, against the columns `cols`; `prefetch` when the
        /// weights come from memory rather than cache.
        ///
        /// # Safety
        /// `xp` holds ⌈rows/2⌉ packed pairs of these rows, `x` the rows themselves (k apart),
        /// `w` every row of `cols` (stride `ldw`, k values each), and `out` (row stride n) the
        /// rows covering `cols`; only this caller writes those elements.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn $sweep(
            rows: usize,
            xp: *const f32,
            x: *const f32,
            k: usize,
            w: *const $t,
            ldw: usize,
            cols: Range<usize>,
            out: *mut f32,
            n: usize,
            prefetch: bool,
        ) {
            let pairs = rows.div_ceil(2);
            // Accumulators, the pairs' x and one streamed weight register fit the 32 registers.
            let nr = match pairs {
                1 => 16,
                2 => 8,
                3 => 8,
                _ => 6,
            };
            let mut c = cols.start;
            while c + nr <= cols.end {
                let (wp, op) = (w.add(c * ldw), out.add(c));
                match pairs {
                    1 if prefetch => $tile::<1, 16, true>(xp, x, rows, k, wp, ldw, op, n),
                    2 if prefetch => $tile::<2, 8, true>(xp, x, rows, k, wp, ldw, op, n),
                    3 if prefetch => $tile::<3, 8, true>(xp, x, rows, k, wp, ldw, op, n),
                    _ if prefetch => $tile::<4, 6, true>(xp, x, rows, k, wp, ldw, op, n),
                    1 => $tile::<1, 16, false>(xp, x, rows, k, wp, ldw, op, n),
                    2 => $tile::<2, 8, false>(xp, x, rows, k, wp, ldw, op, n),
                    3 => $tile::<3, 8, false>(xp, x, rows, k, wp, ldw, op, n),
                    _ => $tile::<4, 6, false>(xp, x, rows, k, wp, ldw, op, n),
                }
                c += nr;
            }
            while c < cols.end {
                let (wp, op) = (w.add(c * ldw), out.add(c));
                match pairs {
                    1 => $tile::<1, 1, false>(xp, x, rows, k, wp, ldw, op, n),
                    2 => $tile::<2, 1, false>(xp, x, rows, k, wp, ldw, op, n),
                    3 => $tile::<3, 1, false>(xp, x, rows, k, wp, ldw, op, n),
                    _ => $tile::<4, 1, false>(xp, x, rows, k, wp, ldw, op, n),
                }
                c += 1;
            }
        }
    };
}

kernels!(tile_f32, sweep_f32, f32, load_f32, widen_f32);
kernels!(tile_bf16, sweep_bf16, u16, load_bf16, widen_bf16);
