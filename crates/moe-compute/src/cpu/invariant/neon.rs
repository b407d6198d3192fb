//! The NEON (aarch64) register tiles of the canonical dot product: each output element's eight
//! lanes live in two 4-lane registers (lanes 0–3 and 4–7), so every lane runs the AVX2 kernel's
//! chain of fused multiply-adds and the reduction is the same, `((l0+l4)+(l2+l6)) +
//! ((l1+l5)+(l3+l7))`: the bits are the other sets' bits.

use std::arch::aarch64::*;
use std::ops::Range;

/// One element's eight lanes.
type Lanes = (float32x4_t, float32x4_t);

/// # Safety
/// `p` points to 8 readable f32 values.
#[inline]
unsafe fn load_f32(p: *const f32) -> Lanes {
    (vld1q_f32(p), vld1q_f32(p.add(4)))
}

/// 8 bf16 values widened (shifted into the high half of each f32).
///
/// # Safety
/// `p` points to 8 readable u16 values.
#[inline]
unsafe fn load_bf16(p: *const u16) -> Lanes {
    let v = vld1q_u16(p);
    (
        vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(v))),
        vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_high_u16(v))),
    )
}

#[inline]
fn widen_f32(v: f32) -> f32 {
    v
}

#[inline]
fn widen_bf16(v: u16) -> f32 {
    crate::cpu::simd::bf16_to_f32(v)
}

/// The canonical lane reduction.
///
/// # Safety
/// Only on a CPU with NEON (every aarch64 CPU).
#[inline]
unsafe fn hsum(acc: Lanes) -> f32 {
    // [l0+l4, l1+l5, l2+l6, l3+l7], then ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)).
    let s4 = vaddq_f32(acc.0, acc.1);
    let s2 = vadd_f32(vget_low_f32(s4), vget_high_f32(s4));
    vget_lane_f32::<0>(s2) + vget_lane_f32::<1>(s2)
}

/// `acc[d] = fma(p, row[d], acc[d])` for every d.
///
/// # Safety
/// Only on a CPU with NEON.
pub(super) unsafe fn fma_row(p: f32, row: &[f32], acc: &mut [f32]) {
    let n = acc.len().min(row.len());
    let pv = vdupq_n_f32(p);
    let mut d = 0;
    while d + 4 <= n {
        // SAFETY: d + 4 <= n bounds both reads and the write.
        let a = vld1q_f32(acc.as_ptr().add(d));
        let x = vld1q_f32(row.as_ptr().add(d));
        vst1q_f32(acc.as_mut_ptr().add(d), vfmaq_f32(a, pv, x));
        d += 4;
    }
    while d < n {
        acc[d] = p.mul_add(row[d], acc[d]);
        d += 1;
    }
}

macro_rules! kernels {
    ($tile:ident, $sweep:ident, $t:ty, $load:ident, $widen:ident) => {
        /// MR rows × NR columns of out, one pair of accumulators per element.
        ///
        /// # Safety
        /// `x` holds MR rows of k values, `w` NR rows of k values `ldw` apart, `out` MR rows of
        /// NR values `n` apart, no other thread writes those.
        unsafe fn $tile<const MR: usize, const NR: usize>(
            x: *const f32,
            k: usize,
            w: *const $t,
            ldw: usize,
            out: *mut f32,
            n: usize,
        ) {
            let zero = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
            let mut acc = [[zero; NR]; MR];
            let full = k / 8 * 8;
            let mut i = 0;
            while i < full {
                let mut xv = [zero; MR];
                for (r, v) in xv.iter_mut().enumerate() {
                    *v = load_f32(x.add(r * k + i));
                }
                for c in 0..NR {
                    let wc = $load(w.add(c * ldw + i));
                    for (row, xr) in acc.iter_mut().zip(&xv) {
                        row[c] = (vfmaq_f32(row[c].0, xr.0, wc.0), vfmaq_f32(row[c].1, xr.1, wc.1));
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

        /// `mr` (1..=4) rows against the columns `cols`, in the widest tiles that fit.
        ///
        /// # Safety
        /// As [`super::avx2`]'s sweep: `x` holds `mr` rows of k, `w` every row of `cols`, `out`
        /// the `mr` rows covering `cols`; only this caller writes those elements.
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
        ) {
            // 32 registers: 2·MR·NR accumulators plus the rows' x and one weight element.
            let nr = match mr {
                1 => 8,
                2 => 5,
                3 => 3,
                _ => 2,
            };
            let mut c = cols.start;
            while c + nr <= cols.end {
                let (wp, op) = (w.add(c * ldw), out.add(c));
                match mr {
                    1 => $tile::<1, 8>(x, k, wp, ldw, op, n),
                    2 => $tile::<2, 5>(x, k, wp, ldw, op, n),
                    3 => $tile::<3, 3>(x, k, wp, ldw, op, n),
                    _ => $tile::<4, 2>(x, k, wp, ldw, op, n),
                }
                c += nr;
            }
            while c < cols.end {
                let (wp, op) = (w.add(c * ldw), out.add(c));
                match mr {
                    1 => $tile::<1, 1>(x, k, wp, ldw, op, n),
                    2 => $tile::<2, 1>(x, k, wp, ldw, op, n),
                    3 => $tile::<3, 1>(x, k, wp, ldw, op, n),
                    _ => $tile::<4, 1>(x, k, wp, ldw, op, n),
                }
                c += 1;
            }
        }
    };
}

kernels!(tile_f32, sweep_f32, f32, load_f32, widen_f32);
kernels!(tile_bf16, sweep_bf16, u16, load_bf16, widen_bf16);
