//! The AVX2 + FMA register tiles of the canonical dot product (selected only after the CPU was
//! checked for both): up to 4 rows × 8 weight rows, one 8-lane accumulator per element.

use std::arch::x86_64::*;
use std::ops::Range;

/// # Safety
/// `p` points to 8 readable f32 values, on a CPU with AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn load_f32(p: *const f32) -> __m256 {
    _mm256_loadu_ps(p)
}

/// 8 bf16 values widened to 8 f32 lanes (zero-extend, shift into the high half).
///
/// # Safety
/// `p` points to 8 readable u16 values, on a CPU with AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn load_bf16(p: *const u16) -> __m256 {
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)), 16))
}

#[inline]
fn widen_f32(v: f32) -> f32 {
    v
}

#[inline]
fn widen_bf16(v: u16) -> f32 {
    crate::cpu::simd::bf16_to_f32(v)
}

/// The canonical lane reduction: `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`.
///
/// # Safety
/// Only on a CPU with AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn hsum(acc: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
}

/// `acc[d] = fma(p, row[d], acc[d])` for every d.
///
/// # Safety
/// Only on a CPU with AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn fma_row(p: f32, row: &[f32], acc: &mut [f32]) {
    let n = acc.len().min(row.len());
    let pv = _mm256_set1_ps(p);
    let mut d = 0;
    while d + 8 <= n {
        // SAFETY: d + 8 <= n bounds both reads and the write.
        let a = _mm256_loadu_ps(acc.as_ptr().add(d));
        let x = _mm256_loadu_ps(row.as_ptr().add(d));
        _mm256_storeu_ps(acc.as_mut_ptr().add(d), _mm256_fmadd_ps(pv, x, a));
        d += 8;
    }
    while d < n {
        acc[d] = p.mul_add(row[d], acc[d]);
        d += 1;
    }
}

macro_rules! kernels {
    ($tile:ident, $sweep:ident, $strips:ident, $t:ty, $load:ident, $widen:ident) => {
        /// MR rows × NR columns of out, one accumulator per element.
        ///
        /// # Safety
        /// `x` holds MR rows of k values, `w` NR rows of k values `ldw` apart, `out` MR rows
        /// of NR values `n` apart, no other thread writes those; the CPU has AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $tile<const MR: usize, const NR: usize, const PF: bool>(
            x: *const f32,
            k: usize,
            w: *const $t,
            ldw: usize,
            out: *mut f32,
            n: usize,
        ) {
            let mut acc = [[_mm256_setzero_ps(); NR]; MR];
            let full = k / 8 * 8;
            let mut i = 0;
            while i < full {
                // Bring the next tile's weight rows in, in address order, while this tile
                // reads its NR rows side by side: from memory, one sequential stream is served
                // about twice as fast as NR interleaved ones (a cold 32000-row bf16 LM head at
                // one row: 1.6 instead of 3.4 ms here). Prefetches never fault, and the
                // address is only formed with wrapping arithmetic, so running past the end of
                // the weights is harmless.
                if PF {
                    let step = NR * 8 * std::mem::size_of::<$t>();
                    let ahead = (w as *const u8).wrapping_add(NR * ldw * std::mem::size_of::<$t>() + (i / 8) * step);
                    let mut line = 0;
                    while line < step {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
                        line += 64;
                    }
                }
                // Keep MR·NR accumulators and the wider operand in registers (16 in all):
                // wide tiles hold the x rows and stream the weight rows, tall ones the reverse.
                if NR > MR {
                    let mut xv = [_mm256_setzero_ps(); MR];
                    for (r, v) in xv.iter_mut().enumerate() {
                        *v = _mm256_loadu_ps(x.add(r * k + i));
                    }
                    for c in 0..NR {
                        let wc = $load(w.add(c * ldw + i));
                        for (row, xr) in acc.iter_mut().zip(&xv) {
                            row[c] = _mm256_fmadd_ps(*xr, wc, row[c]);
                        }
                    }
                } else {
                    let mut wv = [_mm256_setzero_ps(); NR];
                    for (c, v) in wv.iter_mut().enumerate() {
                        *v = $load(w.add(c * ldw + i));
                    }
                    for (r, row) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_ps(x.add(r * k + i));
                        for (a, wc) in row.iter_mut().zip(&wv) {
                            *a = _mm256_fmadd_ps(xv, *wc, *a);
                        }
                    }
                }
                i += 8;
            }
            for (r, row) in acc.iter().enumerate() {
                for (c, a) in row.iter().enumerate() {
                    let mut s = hsum(*a);
                    for t in full..k {
                        s += *x.add(r * k + t) * $widen(*w.add(c * ldw + t));
                    }
                    *out.add(r * n + c) = s;
                }
            }
        }

        /// `mr` (1..=4) rows against the columns `cols`, in the widest tiles that fit;
        /// `prefetch` when the weights come from memory rather than cache.
        ///
        /// # Safety
        /// `x` holds `mr` rows of k, `w` holds every row of `cols` (row stride `ldw`, k values
        /// each), and `out` (row stride n) holds `mr` rows covering `cols`; only this caller writes those elements.
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn $sweep(
            mr: usize,
            x: *const f32,
            k: usize,
            w: *const $t,
            ldw: usize,
            cols: Range<usize>,
            out: *mut f32,
            n: usize,
            prefetch: bool,
        ) {
            let nr = match mr {
                1 => 8,
                2 => 6,
                3 => 4,
                _ => 3,
            };
            let mut c = cols.start;
            while c + nr <= cols.end {
                let (wp, op) = (w.add(c * ldw), out.add(c));
                match mr {
                    1 if prefetch => $tile::<1, 8, true>(x, k, wp, ldw, op, n),
                    2 if prefetch => $tile::<2, 6, true>(x, k, wp, ldw, op, n),
                    3 if prefetch => $tile::<3, 4, true>(x, k, wp, ldw, op, n),
                    _ if prefetch => $tile::<4, 3, true>(x, k, wp, ldw, op, n),
                    1 => $tile::<1, 8, false>(x, k, wp, ldw, op, n),
                    2 => $tile::<2, 6, false>(x, k, wp, ldw, op, n),
                    3 => $tile::<3, 4, false>(x, k, wp, ldw, op, n),
                    _ => $tile::<4, 3, false>(x, k, wp, ldw, op, n),
                }
                c += nr;
            }
            while c < cols.end {
                let (wp, op) = (w.add(c * ldw), out.add(c));
                match mr {
                    1 => $tile::<1, 1, false>(x, k, wp, ldw, op, n),
                    2 => $tile::<2, 1, false>(x, k, wp, ldw, op, n),
                    3 => $tile::<3, 1, false>(x, k, wp, ldw, op, n),
                    _ => $tile::<4, 1, false>(x, k, wp, ldw, op, n),
                }
                c += 1;
            }
        }

        /// `m` rows (4 or more) against the columns `cols`, strip by strip: each strip of 3
        /// weight rows is read from memory once (prefetched while the previous strip runs) and
        /// stays in L1 while every 4-row tile of x passes over it, so memory traffic overlaps
        /// the arithmetic instead of preceding it.
        ///
        /// # Safety
        /// `x` holds `m` rows of k, `w` holds every row of `cols` (row stride `ldw`, k values
        /// each), and `out` (row stride n) holds `m` rows covering `cols`; only this caller
        /// writes those elements.
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn $strips(
            m: usize,
            x: *const f32,
            k: usize,
            w: *const $t,
            ldw: usize,
            cols: Range<usize>,
            out: *mut f32,
            n: usize,
        ) {
            const NR: usize = 3;
            let mut c = cols.start;
            while c < cols.end {
                let wide = c + NR <= cols.end;
                let (wp, oc) = (w.add(c * ldw), out.add(c));
                let mut r0 = 0;
                while r0 < m {
                    let mr = (m - r0).min(4);
                    let (xr, op) = (x.add(r0 * k), oc.add(r0 * n));
                    match (mr, wide) {
                        (4, true) if r0 == 0 => $tile::<4, NR, true>(xr, k, wp, ldw, op, n),
                        (4, true) => $tile::<4, NR, false>(xr, k, wp, ldw, op, n),
                        (3, true) => $tile::<3, NR, false>(xr, k, wp, ldw, op, n),
                        (2, true) => $tile::<2, NR, false>(xr, k, wp, ldw, op, n),
                        (1, true) => $tile::<1, NR, false>(xr, k, wp, ldw, op, n),
                        (4, false) => $tile::<4, 1, false>(xr, k, wp, ldw, op, n),
                        (3, false) => $tile::<3, 1, false>(xr, k, wp, ldw, op, n),
                        (2, false) => $tile::<2, 1, false>(xr, k, wp, ldw, op, n),
                        _ => $tile::<1, 1, false>(xr, k, wp, ldw, op, n),
                    }
                    r0 += mr;
                }
                c += if wide { NR } else { 1 };
            }
        }
    };
}

kernels!(tile_f32, sweep_f32, strips_f32, f32, load_f32, widen_f32);
kernels!(tile_bf16, sweep_bf16, strips_bf16, u16, load_bf16, widen_bf16);
