//! Paged causal attention on the CPU. The store keeps, per layer, keys and values as
//! `[page][slot][kv_head][head_dim]`; a sequence owns a list of pages. New tokens' k and v are
//! written into their slots first. Then a sequence with few new rows (decode) attends row by row,
//! each (row, head) pair in parallel. A sequence with many new rows (prefill) attends in tiles:
//! for each KV head and tile of query rows, the keys and values in reach are gathered once and
//! the scores of every query head of the group come from one matrix multiply.
//!
//! Both paths compute one canonical sequence of operations per (row, head), so a token's
//! attention is the same bit for bit in decode, in any prefill chunk and in any batch: scores are
//! canonical dot products ([`super::invariant`]) times the scale, the softmax runs over the keys
//! in reach in position order ([`softmax_scaled`]), and each output element is the canonical
//! dot product of the weights and the values over key positions aligned to 8
//! ([`lane_weighted_rows`] in decode; one product over a zero-padded, aligned range in prefill).

use super::invariant::{dots, lane_weighted_rows, matmul_on_this_thread};
use super::operand::{SendPtr, Weights};
use crate::{AttentionSeq, AttentionShape, ComputeError, KvLayout, Result};
use rayon::prelude::*;
use std::cell::RefCell;

/// Keys and values of every layer, f32.
pub struct CpuKvStore {
    pub(crate) layout: KvLayout,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// Per linear-attention layer, `states.slots` recurrent states of `states.floats` values.
    pub(crate) states: Vec<Vec<f32>>,
}

impl CpuKvStore {
    pub fn new(layout: KvLayout) -> Result<Self> {
        let per_layer = layout.num_pages * layout.page_size * layout.n_kv_heads * layout.head_dim;
        let alloc_len = |len: usize| -> Result<Vec<f32>> {
            let mut v = Vec::new();
            v.try_reserve_exact(len).map_err(|_| ComputeError::KvAlloc { bytes: layout.bytes() })?;
            v.resize(len, 0.0);
            Ok(v)
        };
        let alloc = || alloc_len(per_layer);
        let mut keys = Vec::with_capacity(layout.layers);
        let mut values = Vec::with_capacity(layout.layers);
        for _ in 0..layout.layers {
            keys.push(alloc()?);
            // Latent attention reads its values from the keys: nothing more to hold.
            values.push(if layout.values_are_keys { Vec::new() } else { alloc()? });
        }
        let s = layout.states;
        let states = (0..s.layers).map(|_| alloc_len(s.slots * s.floats)).collect::<Result<Vec<_>>>()?;
        Ok(Self { layout, keys, values, states })
    }

    fn slot_offset(&self, pages: &[u32], pos: usize) -> usize {
        let l = &self.layout;
        let page = pages[pos / l.page_size] as usize;
        (page * l.page_size + pos % l.page_size) * l.n_kv_heads * l.head_dim
    }
}

fn check_pages(store: &CpuKvStore, pages: &[u32], seq: &AttentionSeq) -> Result<()> {
    let l = &store.layout;
    let needed = seq.start_pos + seq.rows.len();
    let have = pages.len() * l.page_size;
    if needed > have {
        return Err(ComputeError::PagesTooFew { needed, have });
    }
    if let Some(&page) = pages.iter().find(|&&p| p as usize >= l.num_pages) {
        return Err(ComputeError::BadPage { page, num_pages: l.num_pages });
    }
    Ok(())
}

/// See [`crate::Backend::attention`]. `qkv` has `qkv_cols` columns; `out` has
/// `n_heads*head_dim` columns and as many rows as `qkv`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    qkv: &[f32],
    qkv_cols: usize,
    shape: &AttentionShape<'_>,
    seqs: &[AttentionSeq],
    page_table: &[u32],
    store: &mut CpuKvStore,
    layer: usize,
    out: &mut [f32],
) -> Result<()> {
    let hd = shape.head_dim;
    let kv_width = shape.n_kv_heads * hd;
    for seq in seqs {
        let pages = page_table
            .get(seq.pages.clone())
            .ok_or(ComputeError::PagesTooFew { needed: seq.pages.end, have: page_table.len() })?;
        check_pages(store, pages, seq)?;
        for (i, row) in seq.rows.clone().enumerate() {
            let off = store.slot_offset(pages, seq.start_pos + i);
            let src = &qkv[row * qkv_cols..(row + 1) * qkv_cols];
            store.keys[layer][off..off + kv_width].copy_from_slice(&src[shape.k_col..shape.k_col + kv_width]);
            if !store.layout.values_are_keys {
                store.values[layer][off..off + kv_width].copy_from_slice(&src[shape.v_col..shape.v_col + kv_width]);
            }
        }
    }
    let store = &*store;
    let keys = &store.keys[layer];
    let values = if store.layout.values_are_keys { keys } else { &store.values[layer] };
    let out_cols = shape.n_heads * hd;
    let group = shape.n_heads / shape.n_kv_heads.max(1);
    let dst = SendPtr(out.as_mut_ptr());
    // Flatten (sequence, row, head) into one index space so decode batches of one row still
    // spread their heads over the threads.
    let tiled = |seq: &&AttentionSeq| seq.rows.len() >= TILED_MIN_ROWS;
    let (mut work, mut keys_read): (usize, usize) = (0, 0);
    for seq in seqs.iter().filter(|s| !tiled(s)) {
        work += seq.rows.len() * shape.n_heads;
        keys_read += seq.rows.len() * shape.n_heads * (seq.start_pos + seq.rows.len());
    }
    let task = |t: usize| {
        let mut t_left = t;
        let mut found = None;
        for seq in seqs.iter().filter(|s| !tiled(s)) {
            let n = seq.rows.len() * shape.n_heads;
            if t_left < n {
                found = Some(seq);
                break;
            }
            t_left -= n;
        }
        let Some(seq) = found else { return };
        let pages = &page_table[seq.pages.clone()];
        let (i, h) = (t_left / shape.n_heads, t_left % shape.n_heads);
        let row = seq.rows.start + i;
        let pos = seq.start_pos + i;
        let first = match shape.sliding_window {
            Some(w) if w > 0 => (pos + 1).saturating_sub(w),
            _ => 0,
        };
        let kvh = h / group.max(1);
        let q = &qkv[row * qkv_cols + shape.q_col + h * hd..][..hd];
        // SAFETY: (row, h) is unique to this task, so this head's slice of out is written by no
        // other thread; row < rows and h < n_heads keep it inside out.
        let o = unsafe { std::slice::from_raw_parts_mut(dst.get().add(row * out_cols + h * hd), hd) };
        let n_keys = pos + 1 - first;
        SCORES.with(|buf| {
            let mut scores = buf.borrow_mut();
            if scores.capacity() < n_keys {
                // Once per thread: room for every position the store holds, so decode steps
                // never allocate as the context grows.
                let all = (store.layout.num_pages * store.layout.page_size).max(n_keys);
                let len = scores.len();
                scores.reserve(all.saturating_sub(len));
            }
            scores.resize(n_keys, 0.0);
            // Scores page by page: a page's slots of this KV head are `stride` apart.
            let stride = shape.n_kv_heads * hd;
            let mut p = first;
            while p <= pos {
                let in_page = store.layout.page_size - p % store.layout.page_size;
                let count = in_page.min(pos + 1 - p);
                let off = store.slot_offset(pages, p) + kvh * hd;
                let span = (count - 1) * stride + hd;
                dots(q, &keys[off..off + span], stride, &mut scores[p - first..p - first + count]);
                p += count;
            }
            softmax_scaled(&mut scores, shape.scale, shape.sinks.map(|s| s[h]));
            LANES.with(|lanes| {
                let v = |j: usize| &values[store.slot_offset(pages, first + j) + kvh * hd..][..hd];
                lane_weighted_rows(&scores, first, v, o, &mut lanes.borrow_mut());
            });
        });
    };
    // Parallel once the heads' scores and value sums are worth a fork: the context length
    // counts, so that a single decoding row's heads spread over the threads at long contexts
    // (serial, they leave the other threads idle long enough to fall asleep).
    if keys_read * hd < PARALLEL_MIN_MADDS || rayon::current_num_threads() <= 1 {
        (0..work).for_each(task);
    } else {
        (0..work).into_par_iter().for_each(task);
    }
    // Prefill: one task per (sequence, KV head, tile of query rows).
    let mut tiles: Vec<(&AttentionSeq, usize, usize)> = Vec::new();
    for seq in seqs.iter().filter(tiled) {
        for g in 0..shape.n_kv_heads {
            for t0 in (0..seq.rows.len()).step_by(TILE_ROWS) {
                tiles.push((seq, g, t0));
            }
        }
    }
    let ctx = TileCtx { qkv, qkv_cols, shape, page_table, store, keys, values, dst, out_cols, group };
    tiles.par_iter().for_each(|&(seq, g, t0)| ctx.tile(seq, g, t0));
    Ok(())
}

/// Below this many multiply-adds (scores and value sums of every head) the row-by-row heads run
/// on the calling thread.
const PARALLEL_MIN_MADDS: usize = 1 << 15;
/// Sequences with at least this many new rows attend in tiles (matrix multiplies).
const TILED_MIN_ROWS: usize = 32;
/// Query rows per tile.
const TILE_ROWS: usize = 64;

thread_local! {
    /// Per-thread buffers of the tiled path: K, Vᵀ, Q, scores, outputs.
    static TILE_BUFS: RefCell<[Vec<f32>; 5]> = RefCell::new(Default::default());
    /// Per-thread scores and value lanes of the row-by-row path.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static LANES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The canonical softmax of one row's scores in reach, in place: scaled, shifted by their
/// maximum, exponentiated and summed in position order, then normalized. A `sink` logit joins the
/// maximum and the sum last (gpt-oss), taking its share of the probability.
fn softmax_scaled(s: &mut [f32], scale: f32, sink: Option<f32>) {
    let mut max = f32::NEG_INFINITY;
    for v in s.iter_mut() {
        *v *= scale;
        max = max.max(*v);
    }
    if let Some(k) = sink {
        max = max.max(k);
    }
    let mut sum = 0.0f32;
    for v in s.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    if let Some(k) = sink {
        sum += (k - max).exp();
    }
    let inv = 1.0 / sum;
    for v in s.iter_mut() {
        *v *= inv;
    }
}

/// What every tile of one attention call shares.
struct TileCtx<'a> {
    qkv: &'a [f32],
    qkv_cols: usize,
    shape: &'a AttentionShape<'a>,
    page_table: &'a [u32],
    store: &'a CpuKvStore,
    keys: &'a [f32],
    values: &'a [f32],
    dst: SendPtr,
    out_cols: usize,
    group: usize,
}

impl TileCtx<'_> {
    /// Rows `t0..t0 + TILE_ROWS` of `seq`, every query head of KV head `g`.
    fn tile(&self, seq: &AttentionSeq, g: usize, t0: usize) {
        let (shape, hd) = (self.shape, self.shape.head_dim);
        let pages = &self.page_table[seq.pages.clone()];
        let tr = TILE_ROWS.min(seq.rows.len() - t0);
        let (pos0, pos_end) = (seq.start_pos + t0, seq.start_pos + t0 + tr); // query positions
        let first_of = |pos: usize| match shape.sliding_window {
            Some(w) if w > 0 => (pos + 1).saturating_sub(w),
            _ => 0,
        };
        // Keys k0..pos_end are in reach of some row of the tile; the range is widened to start at
        // a multiple of 8 and padded to one (zero keys and values, zero weights), so that each
        // output sums its positions in the same lanes as decode does (`lane_weighted_rows`).
        let k0 = first_of(pos0) & !7;
        let real = pos_end - k0;
        let nk = real.div_ceil(8) * 8;
        let rows = self.group * tr;
        TILE_BUFS.with(|bufs| {
            let mut bufs = bufs.borrow_mut();
            let [kb, vt, qb, sb, ob] = &mut *bufs;
            kb.clear();
            kb.resize(nk * hd, 0.0);
            vt.clear();
            vt.resize(hd * nk, 0.0);
            for j in 0..real {
                let off = self.store.slot_offset(pages, k0 + j) + g * hd;
                kb[j * hd..(j + 1) * hd].copy_from_slice(&self.keys[off..off + hd]);
                for (d, &v) in self.values[off..off + hd].iter().enumerate() {
                    vt[d * nk + j] = v;
                }
            }
            // Q of every head of the group: rows (head-major) x head_dim.
            qb.resize(rows * hd, 0.0);
            for hi in 0..self.group {
                let h = g * self.group + hi;
                for i in 0..tr {
                    let row = seq.rows.start + t0 + i;
                    let src = &self.qkv[row * self.qkv_cols + shape.q_col + h * hd..][..hd];
                    qb[(hi * tr + i) * hd..(hi * tr + i + 1) * hd].copy_from_slice(src);
                }
            }
            sb.resize(rows * nk, 0.0);
            // Tiles already run in parallel and hold this thread's buffers: no nested fork.
            matmul_on_this_thread(qb, rows, hd, Weights::F32(kb), nk, sb);
            for r in 0..rows {
                let pos = pos0 + r % tr;
                let (lo, hi) = (first_of(pos) - k0, pos + 1 - k0); // keys in reach of this row
                let s = &mut sb[r * nk..(r + 1) * nk];
                let sink = shape.sinks.map(|s| s[g * self.group + r / tr]);
                softmax_scaled(&mut s[lo..hi], shape.scale, sink);
                s[..lo].fill(0.0);
                s[hi..].fill(0.0);
            }
            ob.resize(rows * hd, 0.0);
            matmul_on_this_thread(sb, rows, nk, Weights::F32(vt), hd, ob);
            for hi in 0..self.group {
                let h = g * self.group + hi;
                for i in 0..tr {
                    let row = seq.rows.start + t0 + i;
                    // SAFETY: (row, head h) belongs to this tile alone (tiles split rows and KV
                    // heads, and head h is in KV head g's group); inside out by construction.
                    let o =
                        unsafe { std::slice::from_raw_parts_mut(self.dst.get().add(row * self.out_cols + h * hd), hd) };
                    o.copy_from_slice(&ob[(hi * tr + i) * hd..(hi * tr + i + 1) * hd]);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiled prefill path equals the row-by-row path bit for bit: GQA, a chunk continuing a cached
    /// sequence, rows not a multiple of the tile, with and without a sliding window.
    #[test]
    fn tiled_prefill_equals_row_by_row() {
        let (heads, kv_heads, hd, page) = (4usize, 2usize, 16usize, 8usize);
        let cols = (heads + 2 * kv_heads) * hd;
        for window in [None, Some(21)] {
            let shape = AttentionShape {
                n_heads: heads,
                n_kv_heads: kv_heads,
                head_dim: hd,
                q_col: 0,
                k_col: heads * hd,
                v_col: (heads + kv_heads) * hd,
                scale: 0.25,
                sliding_window: window,
                sinks: None,
            };
            let layout = KvLayout {
                layers: 1,
                num_pages: 40,
                page_size: page,
                n_kv_heads: kv_heads,
                head_dim: hd,
                values_are_keys: false,
                states: Default::default(),
            };
            // Two sequences: 70 rows from position 0, and 100 rows after 37 cached positions.
            let specs = [(0usize, 70usize, 0usize), (37, 100, 20)]; // (start_pos, rows, first page)
            let rows: usize = specs.iter().map(|s| s.1).sum();
            let qkv: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
            let page_table: Vec<u32> = (0..40u32).rev().collect();
            let seqs_of = |rows_of: &dyn Fn(usize) -> std::ops::Range<usize>| -> Vec<AttentionSeq> {
                specs
                    .iter()
                    .enumerate()
                    .map(|(i, &(start, _, p0))| AttentionSeq { rows: rows_of(i), start_pos: start, pages: p0..p0 + 20 })
                    .collect()
            };
            // The cached prefix of sequence 1, written by a first call (row by row).
            let prefix: Vec<f32> = (0..37 * cols).map(|i| ((i * 53 % 97) as f32 - 48.0) / 40.0).collect();
            let fill = |store: &mut CpuKvStore| {
                let mut out_prefix = vec![0.0; 37 * heads * hd];
                for r in 0..37 {
                    let seq = AttentionSeq { rows: r..r + 1, start_pos: r, pages: 20..40 };
                    paged_attention(&prefix, cols, &shape, &[seq], &page_table, store, 0, &mut out_prefix)
                        .expect("prefix");
                }
            };
            // Tiled: both chunks in one call.
            let mut a = CpuKvStore::new(layout).expect("store");
            fill(&mut a);
            let mut tiled = vec![f32::NAN; rows * heads * hd];
            let seqs = seqs_of(&|i| if i == 0 { 0..70 } else { 70..170 });
            paged_attention(&qkv, cols, &shape, &seqs, &page_table, &mut a, 0, &mut tiled).expect("tiled");
            // Row by row.
            let mut b = CpuKvStore::new(layout).expect("store");
            fill(&mut b);
            let mut rowwise = vec![f32::NAN; rows * heads * hd];
            for (i, &(start, n, p0)) in specs.iter().enumerate() {
                let base = if i == 0 { 0 } else { 70 };
                for r in 0..n {
                    let seq = AttentionSeq { rows: base + r..base + r + 1, start_pos: start + r, pages: p0..p0 + 20 };
                    paged_attention(&qkv, cols, &shape, &[seq], &page_table, &mut b, 0, &mut rowwise).expect("row");
                }
            }
            let max_diff = tiled.iter().zip(&rowwise).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(max_diff == 0.0, "window {window:?}: tiled and row-by-row differ by {max_diff}");
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    #[test]
    #[ignore = "timing, by hand"]
    fn prefill_512_timing() {
        let (heads, kv, hd, page) = (8usize, 2usize, 64usize, 16usize);
        let cols = (heads + 2 * kv) * hd;
        let shape = AttentionShape {
            n_heads: heads,
            n_kv_heads: kv,
            head_dim: hd,
            q_col: 0,
            k_col: heads * hd,
            v_col: (heads + kv) * hd,
            scale: 0.125,
            sliding_window: None,
            sinks: None,
        };
        let layout = KvLayout {
            layers: 1,
            num_pages: 64,
            page_size: page,
            n_kv_heads: kv,
            head_dim: hd,
            values_are_keys: false,
            states: Default::default(),
        };
        let qkv: Vec<f32> = (0..512 * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 400.0).collect();
        let table: Vec<u32> = (0..32).collect();
        let mut store = CpuKvStore::new(layout).unwrap();
        let mut out = vec![0.0; 512 * heads * hd];
        let seq = [AttentionSeq { rows: 0..512, start_pos: 0, pages: 0..32 }];
        let t = std::time::Instant::now();
        for _ in 0..10 {
            paged_attention(&qkv, cols, &shape, &seq, &table, &mut store, 0, &mut out).unwrap();
        }
        eprintln!("prefill 512 attention: {:.2} ms per layer", t.elapsed().as_secs_f64() * 100.0);
        let one: Vec<f32> = qkv[511 * cols..512 * cols].to_vec();
        let decode: Vec<f32> = (0..16).flat_map(|_| one.iter().copied()).collect();
        let seqs: Vec<AttentionSeq> =
            (0..16).map(|i| AttentionSeq { rows: i..i + 1, start_pos: 511, pages: 0..32 }).collect();
        let mut out = vec![0.0; 16 * heads * hd];
        let t = std::time::Instant::now();
        for _ in 0..100 {
            paged_attention(&decode, cols, &shape, &seqs, &table, &mut store, 0, &mut out).unwrap();
        }
        eprintln!("decode 16 x 512 attention: {:.3} ms per layer", t.elapsed().as_secs_f64() * 10.0);
    }
}
