//! Linear attention weights of hybrid models (Qwen3-Next's gated DeltaNet), loaded into the
//! layout the backend computes on. The
//! checkpoint's fused input projections group q, k, v, z (and b, a) by key head; at load their
//! rows are reordered so that q, k, v, z, b and a each occupy one contiguous, head-major block,
//! and both projections become one matrix (one multiply per step).

use crate::error::Result;
use crate::loader::Loader;
use moe_compute::{Backend, DeltaNetShape, DeltaNetWeights};

/// One gated DeltaNet layer.
pub struct DeltaNetLayer<B: Backend> {
    /// `[proj_cols, H]`: q, k, v, z, b, a (see [`DeltaNetShape`]).
    pub proj: B::Matrix,
    pub weights: DeltaNetWeights<B>,
    /// `out_proj`, `[H, value_dim]`.
    pub out: B::Matrix,
    pub shape: DeltaNetShape,
}

/// Rows of `in_proj_qkvz` (grouped per key head as q, k, v, z) in head-major block order.
fn qkvz_order(s: &DeltaNetShape) -> Vec<usize> {
    let (dk, dv, r) = (s.k_head_dim, s.v_head_dim, s.v_heads / s.k_heads);
    let block = 2 * dk + 2 * r * dv;
    let key = |part: usize| (0..s.key_dim()).map(move |i| (i / dk) * block + part * dk + i % dk);
    let value = |part: usize| {
        (0..s.value_dim()).map(move |i| {
            let (head, j) = (i / dv, i % dv);
            (head / r) * block + 2 * dk + part * r * dv + (head % r) * dv + j
        })
    };
    key(0).chain(key(1)).chain(value(0)).chain(value(1)).collect()
}

/// Rows of `in_proj_ba` (grouped per key head as b, a) as all b, then all a.
fn ba_order(s: &DeltaNetShape) -> Vec<usize> {
    let r = s.v_heads / s.k_heads;
    let part = |p: usize| (0..s.v_heads).map(move |h| (h / r) * 2 * r + p * r + h % r);
    part(0).chain(part(1)).collect()
}

pub(crate) fn load_delta_net<B: Backend>(l: &Loader<'_, B>, s: &DeltaNetShape, p: &str) -> Result<DeltaNetLayer<B>> {
    let h = l.cfg.hidden_size;
    let proj = l.gathered(
        &[
            (format!("{p}.in_proj_qkvz.weight"), 2 * s.key_dim() + 2 * s.value_dim(), qkvz_order(s)),
            (format!("{p}.in_proj_ba.weight"), 2 * s.v_heads, ba_order(s)),
        ],
        h,
    )?;
    let conv = l.ckpt.read(&format!("{p}.conv1d.weight"), &[s.conv_dim(), 1, s.conv_kernel])?;
    let a_log = l.ckpt.read(&format!("{p}.A_log"), &[s.v_heads])?;
    let b = l.backend;
    Ok(DeltaNetLayer {
        proj,
        weights: DeltaNetWeights {
            conv: b.vector(conv)?,
            dt_bias: l.vector(&format!("{p}.dt_bias"), s.v_heads)?,
            decay_rate: b.vector(a_log.iter().map(|a| -a.exp()).collect())?,
            norm: l.vector(&format!("{p}.norm.weight"), s.v_head_dim)?,
        },
        out: l.matrix(&format!("{p}.out_proj.weight"), h, s.value_dim())?,
        shape: *s,
    })
}

/// Rows of a gated attention's `q_proj` (per head: q, then its gate) as all q rows (`gate`
/// false) or all gate rows (`gate` true).
pub fn gated_q_rows(heads: usize, head_dim: usize, gate: bool) -> Vec<usize> {
    let off = if gate { head_dim } else { 0 };
    (0..heads * head_dim).map(|i| (i / head_dim) * 2 * head_dim + off + i % head_dim).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_gather_head_major_blocks() {
        // Two key heads, four value heads (two per key head), dk 2, dv 1.
        let s = DeltaNetShape { k_heads: 2, v_heads: 4, k_head_dim: 2, v_head_dim: 1, conv_kernel: 4, norm_eps: 1e-6 };
        // Per key head block of 2 + 2 + 2 + 2 rows: q0 q1 k0 k1 v0 v1 z0 z1.
        assert_eq!(qkvz_order(&s), vec![0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]);
        // Per key head: b b a a.
        assert_eq!(ba_order(&s), vec![0, 1, 4, 5, 2, 3, 6, 7]);
        assert_eq!(gated_q_rows(2, 2, false), vec![0, 1, 4, 5]);
        assert_eq!(gated_q_rows(2, 2, true), vec![2, 3, 6, 7]);
    }
}
