//! Batch-invariant `x · Wᵀ`: every output element is the same canonical dot product of its
//! input row and weight row, whatever the number of rows in the call, the tile the element falls
//! in or the thread that computes it. So a row's result never depends on what else is in the
//! batch (decode with 1 or 64 rows, an expert with 1 or 500 rows, any prefill chunking).
//!
//! The canonical dot product of length k: eight lane accumulators take fused multiply-adds over
//! the first `8·⌊k/8⌋` elements (lane l sums elements ≡ l mod 8, in order), the lanes are reduced
//! as `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`, and the remaining elements are added one by one
//! (`s += a·b`, not fused). The AVX2 kernels compute register tiles of up to 4 rows × 8 columns,
//! one accumulator per element, so tiles trade nothing but speed; the portable kernel computes
//! the same arithmetic element by element (`f32::mul_add` is the fused multiply-add everywhere).

use super::operand::{SendPtr, Weights};
use super::simd::bf16_to_f32;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Below this many multiply-adds a call runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 15;
/// Rows per task: a block of rows is swept against one block of weight rows.
const ROW_BLOCK: usize = 64;
/// Bytes of weights one task streams per row tile (they stay in L2 across the row tiles).
const WEIGHT_BLOCK_BYTES: usize = 256 * 1024;
/// Columns per block are a multiple of this (every register tile width divides it).
const COL_ALIGN: usize = 24;

/// The canonical dot product of `a` and `b(i)` over `k` elements (the reference every kernel
/// here equals bit for bit).
#[inline]
pub fn canonical_dot(a: &[f32], b: impl Fn(usize) -> f32, k: usize) -> f32 {
    let mut acc = [0f32; 8];
    let full = k / 8 * 8;
    let mut i = 0;
    while i < full {
        for (l, lane) in acc.iter_mut().enumerate() {
            *lane = a[i + l].mul_add(b(i + l), *lane);
        }
        i += 8;
    }
    let mut s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for (t, &at) in a.iter().enumerate().take(k).skip(full) {
        s += at * b(t);
    }
    s
}

fn has_avx2_fma() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `out[m×n] = x[m×k] · w[n×k]ᵀ`, each element the canonical dot product.
pub fn matmul(x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize, out: &mut [f32]) {
    matmul_with(x, m, k, w, n, out, true)
}

/// [`matmul`] on the calling thread only: for callers that already run as one of many parallel
/// tasks and hold thread-local buffers (a nested parallel call could make this thread pick up
/// another such task while it waits).
pub fn matmul_on_this_thread(x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize, out: &mut [f32]) {
    matmul_with(x, m, k, w, n, out, false)
}

fn matmul_with(x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize, out: &mut [f32], may_fork: bool) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n, "matmul operands too short");
    if m == 0 || n == 0 {
        return;
    }
    let w_bytes = match w {
        Weights::F32(_) => 4,
        Weights::Bf16(_) => 2,
    };
    let threads = rayon::current_num_threads();
    let parallel = may_fork && threads > 1 && m * n * k >= PARALLEL_MIN_WORK;
    let mut cols = (WEIGHT_BLOCK_BYTES / (k.max(1) * w_bytes)).max(COL_ALIGN) / COL_ALIGN * COL_ALIGN;
    let row_blocks = m.div_ceil(ROW_BLOCK);
    if parallel {
        // Enough tasks to keep every thread busy; any split gives the same numbers.
        while cols > COL_ALIGN && row_blocks * n.div_ceil(cols) < 2 * threads {
            cols = (cols / 2).max(COL_ALIGN) / COL_ALIGN * COL_ALIGN;
        }
    }
    let col_blocks = n.div_ceil(cols);
    let dst = SendPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let (rb, cb) = (t / col_blocks, t % col_blocks);
        let rows = rb * ROW_BLOCK..((rb + 1) * ROW_BLOCK).min(m);
        let cs = cb * cols..((cb + 1) * cols).min(n);
        // SAFETY: tasks cover disjoint (row, column) blocks of out, which holds m×n elements;
        // x holds m×k and w n×k (checked above), and every block lies inside those bounds.
        unsafe { block(x, k, w, n, rows, cs, dst) };
    };
    let tasks = row_blocks * col_blocks;
    if parallel {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// `out[j]` = the canonical dot product of `a` (k values) and the k values of `b` starting at
/// `j·stride`: the scores of one query against keys stored with a stride (a KV page). Equal bit
/// for bit to the same element of [`matmul`].
pub fn dots(a: &[f32], b: &[f32], stride: usize, out: &mut [f32]) {
    let (k, n) = (a.len(), out.len());
    if n == 0 {
        return;
    }
    assert!(b.len() >= (n - 1) * stride + k, "dots: keys too short");
    if !has_avx2_fma() {
        for (j, o) in out.iter_mut().enumerate() {
            *o = canonical_dot(a, |i| b[j * stride + i], k);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a holds k values, b holds n rows of k at `stride` (checked above), out holds n.
    unsafe {
        avx::sweep_f32(1, a.as_ptr(), k, b.as_ptr(), stride, 0..n, out.as_mut_ptr(), n, false)
    }
}

/// `out[d]` = the canonical dot product of the weights `p` and column `d` of the rows `v(j)`,
/// where `p[0]` sits at absolute position `start` and the dot runs over the surrounding range
/// aligned to 8 (`start & !7` up to a multiple of 8) with zero weights outside `p`: lane l sums
/// the positions ≡ l (mod 8) in order. This equals the element of a [`matmul`] whose k range
/// starts at a multiple of 8 and is padded to one with zero weights, so attention outputs do not
/// depend on where a tile starts. `lanes` is scratch (8 × `out.len()` values).
pub fn lane_weighted_rows<'v>(
    p: &[f32],
    start: usize,
    v: impl Fn(usize) -> &'v [f32],
    out: &mut [f32],
    lanes: &mut Vec<f32>,
) {
    let hd = out.len();
    lanes.clear();
    lanes.resize(8 * hd, 0.0);
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        for (j, &pj) in p.iter().enumerate() {
            let l = (start + j) % 8;
            let row = &v(j)[..hd];
            // SAFETY: the CPU has AVX2 and FMA (checked); both slices hold hd values.
            unsafe { avx::fma_row(pj, row, &mut lanes[l * hd..(l + 1) * hd]) };
        }
        reduce_lanes(lanes, out);
        return;
    }
    for (j, &pj) in p.iter().enumerate() {
        let l = (start + j) % 8;
        for (a, x) in lanes[l * hd..(l + 1) * hd].iter_mut().zip(&v(j)[..hd]) {
            *a = pj.mul_add(*x, *a);
        }
    }
    reduce_lanes(lanes, out);
}

/// The canonical lane reduction, column by column.
fn reduce_lanes(lanes: &[f32], out: &mut [f32]) {
    let hd = out.len();
    let l = |i: usize, d: usize| lanes[i * hd + d];
    for (d, o) in out.iter_mut().enumerate() {
        *o = ((l(0, d) + l(4, d)) + (l(2, d) + l(6, d))) + ((l(1, d) + l(5, d)) + (l(3, d) + l(7, d)));
    }
}

/// One block: rows × columns of out, swept in register tiles.
///
/// # Safety
/// `rows` and `cols` must lie inside the m×n output that `dst` points to, `x` must hold every
/// row of `rows` and `w` every row of `cols` (k values each), and no other thread may write
/// these elements of out meanwhile.
unsafe fn block(
    x: &[f32],
    k: usize,
    w: Weights<'_>,
    n: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    dst: SendPtr,
) {
    if !has_avx2_fma() {
        for r in rows {
            let xr = &x[r * k..(r + 1) * k];
            for c in cols.clone() {
                let v = match w {
                    Weights::F32(w) => canonical_dot(xr, |i| w[c * k + i], k),
                    Weights::Bf16(w) => canonical_dot(xr, |i| bf16_to_f32(w[c * k + i]), k),
                };
                *dst.get().add(r * n + c) = v;
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let mut r0 = rows.start;
        while r0 < rows.end {
            // The first row tile brings the weights in from memory; the later ones find them in
            // L2, where prefetching would only cost instructions.
            let prefetch = r0 == rows.start;
            let mr = (rows.end - r0).min(4);
            let xp = x.as_ptr().add(r0 * k);
            let op = dst.get().add(r0 * n);
            match w {
                Weights::F32(w) => avx::sweep_f32(mr, xp, k, w.as_ptr(), k, cols.clone(), op, n, prefetch),
                Weights::Bf16(w) => avx::sweep_bf16(mr, xp, k, w.as_ptr(), k, cols.clone(), op, n, prefetch),
            }
            r0 += mr;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    //! The AVX2+FMA register tiles (selected only after the CPU was checked for both).
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
        super::bf16_to_f32(v)
    }

    /// The canonical lane reduction: `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`.
    ///
    /// # Safety
    /// Only on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum(acc: __m256) -> f32 {
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
        ($tile:ident, $sweep:ident, $t:ty, $load:ident, $widen:ident) => {
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
                        let ahead =
                            (w as *const u8).wrapping_add(NR * ldw * std::mem::size_of::<$t>() + (i / 8) * step);
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
        };
    }

    kernels!(tile_f32, sweep_f32, f32, load_f32, widen_f32);
    kernels!(tile_bf16, sweep_bf16, u16, load_bf16, widen_bf16);
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod speed {
    use super::*;

    #[test]
    #[ignore = "timing, by hand with --release"]
    fn decode_shapes() {
        for &(m, k, n) in &[
            (1usize, 512usize, 2048usize),
            (1, 512, 32000),
            (1, 1024, 512),
            (16, 512, 2048),
            (64, 1024, 512),
            (512, 512, 2048),
        ] {
            let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.01).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i % 11) as f32 * 0.01).collect();
            let bits: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
            let mut out = vec![0.0; m * n];
            for (name, wt) in [("f32", Weights::F32(&w)), ("bf16", Weights::Bf16(&bits))] {
                let reps = (1_000_000_000 / (m * n * k)).max(3);
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    matmul(&x, m, k, wt, n, &mut out);
                }
                let s = t.elapsed().as_secs_f64() / reps as f64;
                let gbs = (n * k * if name == "f32" { 4 } else { 2 }) as f64 / s / 1e9;
                eprintln!("{m}x{k}x{n} {name}: {:.3} ms, {gbs:.1} GB/s of weights", s * 1e3);
            }
        }
    }
}
