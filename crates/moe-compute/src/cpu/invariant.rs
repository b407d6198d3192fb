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

use super::kernel_set::{cpu_kernels, CpuKernels};
use super::operand::{SendPtr, Weights};
use super::simd::bf16_to_f32;
use rayon::prelude::*;
use std::cell::RefCell;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

/// Below this many multiply-adds a call runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 15;
/// Rows per task: a block of rows is swept against one block of weight rows.
const ROW_BLOCK: usize = 64;
/// Bytes of weights one task streams per row tile (they stay in L2 across the row tiles).
const WEIGHT_BLOCK_BYTES: usize = 256 * 1024;
/// The same for blocks of one row tile (decode at batch 1–3), whose weights are read once:
/// smaller tasks end a product with less waiting for the last one (1–2% of a batch-1 step here).
const SINGLE_TILE_BLOCK_BYTES: usize = 32 * 1024;
/// Row counts (of a block) swept strip by strip rather than row tile by row tile: decode-sized
/// batches, where streaming the weights once while every row passes over them beats reading
/// them in a burst first (16 rows: 1.14–1.20× here); from 64 rows up the row tiles are as fast.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const STRIP_ROWS: std::ops::RangeInclusive<usize> = 4..=32;
/// Blocks of fewer rows run the AVX2 tiles under the AVX-512 set too (the same bits): a one-row
/// product fills only half of each row-pair register, and the AVX2 tiles stream fewer weight
/// rows at once. Measured on a Xeon with AVX-512 (kernels/runs/2026-12-04-ff909fd, 2 threads):
/// the AVX-512 tiles gave decode at batch 1 0.85x (bf16 weights 0.63x) the AVX2 tiles' speed,
/// and batch 64 1.25x, prefill 1.22x.
const AVX512_MIN_ROWS: usize = 4;
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

/// Columns per block: `WEIGHT_BLOCK_BYTES` of weight rows (`SINGLE_TILE_BLOCK_BYTES` when every
/// block has fewer than 4 rows), halved while a parallel call would have fewer than two tasks per
/// thread (`tasks(cols)` counts them). Any split gives the same numbers.
fn block_width(k: usize, w_bytes: usize, rows: usize, parallel: bool, tasks: impl Fn(usize) -> usize) -> usize {
    let align = |c: usize| c.max(COL_ALIGN) / COL_ALIGN * COL_ALIGN;
    let bytes = if rows < 4 { SINGLE_TILE_BLOCK_BYTES } else { WEIGHT_BLOCK_BYTES };
    let mut cols = align(bytes / (k.max(1) * w_bytes));
    while parallel && cols > COL_ALIGN && tasks(cols) < 2 * rayon::current_num_threads() {
        cols = align(cols / 2);
    }
    cols
}

/// `out[m×n] = x[m×k] · w[n×k]ᵀ`, each element the canonical dot product.
pub fn matmul(x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize, out: &mut [f32]) {
    matmul_with(cpu_kernels(), x, m, k, w, n, out, true)
}

/// [`matmul`] with the kernel set `set` (which the CPU must run), whatever was chosen for the
/// process: for comparing the sets.
pub fn matmul_using(set: CpuKernels, x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize, out: &mut [f32]) {
    assert!(set.available(), "the {set} kernels do not run on this CPU");
    matmul_with(set, x, m, k, w, n, out, true)
}

/// [`matmul`] on the calling thread only: for callers that already run as one of many parallel
/// tasks and hold thread-local buffers (a nested parallel call could make this thread pick up
/// another such task while it waits).
pub fn matmul_on_this_thread(x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize, out: &mut [f32]) {
    matmul_with(cpu_kernels(), x, m, k, w, n, out, false)
}

#[allow(clippy::too_many_arguments)]
fn matmul_with(
    set: CpuKernels,
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    out: &mut [f32],
    may_fork: bool,
) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n, "matmul operands too short");
    if m == 0 || n == 0 {
        return;
    }
    let w_bytes = match w {
        Weights::F32(_) => 4,
        Weights::Bf16(_) => 2,
    };
    let parallel = may_fork && rayon::current_num_threads() > 1 && m * n * k >= PARALLEL_MIN_WORK;
    let row_blocks = m.div_ceil(ROW_BLOCK);
    let cols = block_width(k, w_bytes, m.min(ROW_BLOCK), parallel, |cols| row_blocks * n.div_ceil(cols));
    let col_blocks = n.div_ceil(cols);
    let dst = SendPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let (rb, cb) = (t / col_blocks, t % col_blocks);
        let rows = rb * ROW_BLOCK..((rb + 1) * ROW_BLOCK).min(m);
        let cs = cb * cols..((cb + 1) * cols).min(n);
        // SAFETY: tasks cover disjoint (row, column) blocks of out, which holds m×n elements;
        // x holds m×k and w n×k (checked above), and every block lies inside those bounds.
        unsafe { block(set, x, k, w, n, rows, cs, dst) };
    };
    let tasks = row_blocks * col_blocks;
    if parallel {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// Several products sharing their shapes (a layer's experts) in one parallel region: segment
/// `e` = `(start, m)` multiplies rows `start..start + m` of `x` (`k` values each) by
/// `weights(e)` (`n` rows of `k`) into the same rows of `out` (`n` values each). The tasks are
/// every segment's blocks, segment by segment, so the threads share out all the work at once
/// instead of meeting after each product. Each element is the canonical dot product: the same
/// bits as [`matmul`] of each product alone. `tasks` is scratch (kept by the caller, so that a
/// decode step does not allocate).
pub fn grouped_matmul<'w>(
    x: &[f32],
    k: usize,
    segments: &[(usize, usize)],
    weights: &(dyn Fn(usize) -> Weights<'w> + Sync),
    n: usize,
    out: &mut [f32],
    tasks: &mut Vec<(usize, usize, usize)>,
) {
    let set = cpu_kernels();
    let mut work = 0;
    let mut w_bytes = 4;
    for (e, &(start, m)) in segments.iter().enumerate() {
        let w = weights(e);
        assert!(
            x.len() >= (start + m) * k && w.len() >= n * k && out.len() >= (start + m) * n,
            "grouped matmul operands too short"
        );
        if let Weights::Bf16(_) = w {
            w_bytes = 2;
        }
        work += m * n * k;
    }
    let parallel = rayon::current_num_threads() > 1 && work >= PARALLEL_MIN_WORK;
    let rows = segments.iter().map(|&(_, m)| m.min(ROW_BLOCK)).max().unwrap_or(0);
    let cols = block_width(k, w_bytes, rows, parallel, |cols| {
        segments.iter().map(|&(_, m)| m.div_ceil(ROW_BLOCK) * n.div_ceil(cols)).sum()
    });
    tasks.clear();
    for (e, &(_, m)) in segments.iter().enumerate() {
        for cb in 0..n.div_ceil(cols) {
            for rb in 0..m.div_ceil(ROW_BLOCK) {
                tasks.push((e, rb, cb));
            }
        }
    }
    let dst = SendPtr(out.as_mut_ptr());
    let task = |&(e, rb, cb): &(usize, usize, usize)| {
        let (start, m) = segments[e];
        let rows = start + rb * ROW_BLOCK..start + ((rb + 1) * ROW_BLOCK).min(m);
        let cs = cb * cols..((cb + 1) * cols).min(n);
        // SAFETY: segments are disjoint row ranges and tasks disjoint (row, column) blocks of
        // them, inside out (checked above); x holds every row a block reads and weights(e) n
        // rows of k; the set runs on this CPU.
        unsafe { block(set, x, k, weights(e), n, rows, cs, dst) };
    };
    if parallel {
        tasks.par_iter().for_each(task);
    } else {
        tasks.iter().for_each(task);
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
    match cpu_kernels() {
        // SAFETY (both arms): the set runs on this CPU (chosen sets are checked); a holds k
        // values, b holds n rows of k at `stride` (checked above), out holds n.
        #[cfg(target_arch = "x86_64")]
        CpuKernels::Avx2 | CpuKernels::Avx512 => unsafe {
            avx2::sweep_f32(1, a.as_ptr(), k, b.as_ptr(), stride, 0..n, out.as_mut_ptr(), n, false)
        },
        #[cfg(target_arch = "aarch64")]
        CpuKernels::Neon => unsafe { neon::sweep_f32(1, a.as_ptr(), k, b.as_ptr(), stride, 0..n, out.as_mut_ptr(), n) },
        _ => {
            for (j, o) in out.iter_mut().enumerate() {
                *o = canonical_dot(a, |i| b[j * stride + i], k);
            }
        }
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
    let set = cpu_kernels();
    for (j, &pj) in p.iter().enumerate() {
        let l = (start + j) % 8;
        let (row, acc) = (&v(j)[..hd], &mut lanes[l * hd..(l + 1) * hd]);
        match set {
            // SAFETY (both arms): the set runs on this CPU; both slices hold hd values.
            #[cfg(target_arch = "x86_64")]
            CpuKernels::Avx2 | CpuKernels::Avx512 => unsafe { avx2::fma_row(pj, row, acc) },
            #[cfg(target_arch = "aarch64")]
            CpuKernels::Neon => unsafe { neon::fma_row(pj, row, acc) },
            _ => {
                for (a, x) in acc.iter_mut().zip(row) {
                    *a = pj.mul_add(*x, *a);
                }
            }
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

thread_local! {
    /// Row pairs packed for the AVX-512 tiles (grown once per thread).
    static PAIRS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One block: rows × columns of out, swept in register tiles of the kernel set `set`.
///
/// # Safety
/// `set` must run on this CPU; `rows` and `cols` must lie inside the m×n output that `dst`
/// points to, `x` must hold every row of `rows` and `w` every row of `cols` (k values each), and
/// no other thread may write these elements of out meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    set: CpuKernels,
    x: &[f32],
    k: usize,
    w: Weights<'_>,
    n: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    dst: SendPtr,
) {
    match set {
        #[cfg(target_arch = "x86_64")]
        CpuKernels::Avx512 if rows.len() >= AVX512_MIN_ROWS => PAIRS.with(|packed| {
            let mut packed = packed.borrow_mut();
            let tile_rows = 2 * avx512::MAX_PAIRS;
            let mut r0 = rows.start;
            while r0 < rows.end {
                let live = (rows.end - r0).min(tile_rows);
                avx512::pack_pairs(x, k, r0..r0 + live, &mut packed);
                let (xp, xr, op) = (packed.as_ptr(), x.as_ptr().add(r0 * k), dst.get().add(r0 * n));
                // The first row tile brings the weights in from memory (see the AVX2 arm).
                let prefetch = r0 == rows.start;
                match w {
                    Weights::F32(w) => avx512::sweep_f32(live, xp, xr, k, w.as_ptr(), k, cols.clone(), op, n, prefetch),
                    Weights::Bf16(w) => {
                        avx512::sweep_bf16(live, xp, xr, k, w.as_ptr(), k, cols.clone(), op, n, prefetch)
                    }
                }
                r0 += live;
            }
        }),
        #[cfg(target_arch = "x86_64")]
        CpuKernels::Avx2 if STRIP_ROWS.contains(&rows.len()) => {
            let (xp, op) = (x.as_ptr().add(rows.start * k), dst.get().add(rows.start * n));
            match w {
                Weights::F32(w) => avx2::strips_f32(rows.len(), xp, k, w.as_ptr(), k, cols, op, n),
                Weights::Bf16(w) => avx2::strips_bf16(rows.len(), xp, k, w.as_ptr(), k, cols, op, n),
            }
        }
        #[cfg(target_arch = "x86_64")]
        CpuKernels::Avx2 | CpuKernels::Avx512 => {
            let mut r0 = rows.start;
            while r0 < rows.end {
                // The first row tile brings the weights in from memory; the later ones find them
                // in L2, where prefetching would only cost instructions.
                let prefetch = r0 == rows.start;
                let mr = (rows.end - r0).min(4);
                let xp = x.as_ptr().add(r0 * k);
                let op = dst.get().add(r0 * n);
                match w {
                    Weights::F32(w) => avx2::sweep_f32(mr, xp, k, w.as_ptr(), k, cols.clone(), op, n, prefetch),
                    Weights::Bf16(w) => avx2::sweep_bf16(mr, xp, k, w.as_ptr(), k, cols.clone(), op, n, prefetch),
                }
                r0 += mr;
            }
        }
        #[cfg(target_arch = "aarch64")]
        CpuKernels::Neon => {
            let mut r0 = rows.start;
            while r0 < rows.end {
                let mr = (rows.end - r0).min(4);
                let xp = x.as_ptr().add(r0 * k);
                let op = dst.get().add(r0 * n);
                match w {
                    Weights::F32(w) => neon::sweep_f32(mr, xp, k, w.as_ptr(), k, cols.clone(), op, n),
                    Weights::Bf16(w) => neon::sweep_bf16(mr, xp, k, w.as_ptr(), k, cols.clone(), op, n),
                }
                r0 += mr;
            }
        }
        _ => {
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
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod speed {
    use super::*;

    /// The benchmark model's batch-1 decode step as its products alone (every matrix distinct,
    /// ~187 MB f32, so nothing stays in cache), on a pool of its own like the engine's loop:
    /// what the kernels stream when nothing else runs.
    #[test]
    #[ignore = "timing, by hand with --release"]
    fn decode_step_products() {
        let pool = rayon::ThreadPoolBuilder::new().build().expect("pool");
        pool.install(|| {
            let (h, inter, vocab) = (512usize, 1024usize, 32000usize);
            let mut shapes = vec![];
            for _ in 0..8 {
                shapes.extend([(h, h), (128, h), (128, h), (h, h), (8, h)]);
                shapes.extend([(2 * inter, h), (2 * inter, h), (h, inter), (h, inter)]);
            }
            shapes.push((vocab, h));
            let make = |&(n, k): &(usize, usize)| {
                crate::cpu::pages::in_huge_pages((0..n * k).map(|i| (i % 11) as f32 * 0.01).collect::<Vec<f32>>())
            };
            let mats: Vec<Vec<f32>> = shapes.iter().map(make).collect();
            let bits: Vec<Vec<u16>> =
                mats.iter().map(|w| w.iter().map(|v| (v.to_bits() >> 16) as u16).collect()).collect();
            let x: Vec<f32> = (0..4 * h).map(|i| (i % 13) as f32 * 0.01).collect();
            let mut out = vec![0.0; vocab];
            for bf16 in [false, true] {
                let mut times = vec![];
                for _ in 0..40 {
                    let t = std::time::Instant::now();
                    for (i, &(n, k)) in shapes.iter().enumerate() {
                        let w = if bf16 { Weights::Bf16(&bits[i]) } else { Weights::F32(&mats[i]) };
                        matmul(&x, 1, k, w, n, &mut out);
                    }
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
                times.sort_by(f64::total_cmp);
                let bytes: usize = shapes.iter().map(|&(n, k)| n * k * if bf16 { 2 } else { 4 }).sum();
                let ms = times[times.len() / 2];
                eprintln!("bf16 {bf16}: median {ms:.2} ms/step, {:.1} GB/s", bytes as f64 / ms / 1e6);
            }
        });
    }

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
