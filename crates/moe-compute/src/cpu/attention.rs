//! Paged causal attention on the CPU. The store keeps, per layer, keys and values as
//! `[page][slot][kv_head][head_dim]`; a sequence owns a list of pages. New tokens' k and v are
//! written into their slots first, then each (row, head) pair attends over its sequence's cached
//! positions, in parallel across pairs, in one pass with an online softmax (no score buffer).

use super::linear::SendPtr;
use super::simd::{axpy, dot};
use crate::{AttentionSeq, AttentionShape, ComputeError, KvLayout, Result};
use rayon::prelude::*;

/// Keys and values of every layer, f32.
pub struct CpuKvStore {
    pub(crate) layout: KvLayout,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl CpuKvStore {
    pub fn new(layout: KvLayout) -> Result<Self> {
        let per_layer = layout.num_pages * layout.page_size * layout.n_kv_heads * layout.head_dim;
        let alloc = || -> Result<Vec<f32>> {
            let mut v = Vec::new();
            v.try_reserve_exact(per_layer).map_err(|_| ComputeError::KvAlloc { bytes: layout.bytes() })?;
            v.resize(per_layer, 0.0);
            Ok(v)
        };
        let mut keys = Vec::with_capacity(layout.layers);
        let mut values = Vec::with_capacity(layout.layers);
        for _ in 0..layout.layers {
            keys.push(alloc()?);
            values.push(alloc()?);
        }
        Ok(Self { layout, keys, values })
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
    shape: &AttentionShape,
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
            store.values[layer][off..off + kv_width].copy_from_slice(&src[shape.v_col..shape.v_col + kv_width]);
        }
    }
    let store = &*store;
    let (keys, values) = (&store.keys[layer], &store.values[layer]);
    let out_cols = shape.n_heads * hd;
    let group = shape.n_heads / shape.n_kv_heads.max(1);
    let dst = SendPtr(out.as_mut_ptr());
    // Flatten (sequence, row, head) into one index space so decode batches of one row still
    // spread their heads over the threads.
    let mut work: usize = 0;
    for seq in seqs {
        work += seq.rows.len() * shape.n_heads;
    }
    let task = |t: usize| {
        let mut t_left = t;
        let mut found = None;
        for seq in seqs {
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
        o.fill(0.0);
        // One pass with a running max (online softmax): no score buffer, K and V read once.
        let mut max = f32::NEG_INFINITY;
        let mut sum = 0.0f32;
        for p in first..=pos {
            let off = store.slot_offset(pages, p) + kvh * hd;
            let s = dot(q, &keys[off..off + hd]) * shape.scale;
            if s > max {
                let correction = (max - s).exp();
                sum *= correction;
                for v in o.iter_mut() {
                    *v *= correction;
                }
                max = s;
            }
            let w = (s - max).exp();
            sum += w;
            axpy(w, &values[off..off + hd], o);
        }
        let inv = 1.0 / sum;
        for v in o.iter_mut() {
            *v *= inv;
        }
    };
    if work * hd * 16 < 1 << 14 || rayon::current_num_threads() <= 1 {
        (0..work).for_each(task);
    } else {
        (0..work).into_par_iter().for_each(task);
    }
    Ok(())
}
