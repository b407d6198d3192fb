//! Multi-head latent attention's part of the forward pass (DeepSeek-V2/V3, Kimi K2) in its
//! absorbed form; `mla_weights` loads the layer into that form and describes it. Per head h,
//! `q_nope_h · k_nope_h = (W_UK_hᵀ q_nope_h) · c_kv`, so each query head is absorbed into latent
//! space (`head_linear` with `W_UK_hᵀ`), joined with its rope part, and attends as multi-query
//! attention over `[c_kv | k_rope]`, the KV cache holding only those; the output's latent part is
//! mapped to the head's values by `W_UV_h` and then through `o_proj`. Prefill and decode take the
//! same path, so a token's result never depends on how its prompt was chunked.
//!
//! LoRA: pairs on `q_a_proj`, `q_b_proj` (`q_proj`), `kv_a_proj_with_mqa` and `o_proj` add to their
//! projection's output; a `kv_b_proj` pair, whose weight is absorbed, is absorbed too
//! (`mla_weights::absorbed_kv_b_lora`) and applied per head by `lora_add_heads`.

use crate::batch::{kv_a_pair, kv_b_keys, kv_b_values, o_pair, q_a_pair, q_pair, row_pair, BatchItem, LayerPairs};
use crate::error::{ModelError, Result};
use crate::mla_weights::LatentWeights;
use crate::model::{KvCache, Model};
use crate::workspace::Workspace;
use moe_compute::{Backend, HeadCols};

/// RMSNorm epsilon of `q_a_layernorm` and `kv_a_layernorm` (transformers builds them with the
/// norm's default, not `rms_norm_eps`).
const LATENT_NORM_EPS: f32 = 1e-6;

impl<B: Backend> Model<B> {
    /// Latent attention of one layer on `ws.normed`, its output added into `ws.hidden`.
    pub(crate) fn latent_attention(
        &self,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        layer: usize,
        w: &LatentWeights<B>,
        items: &[BatchItem<'_, B>],
    ) -> Result<()> {
        let (b, c) = (&self.backend, &self.config);
        let a = c.latent.as_ref().ok_or_else(|| ModelError::Experts { layer, message: "no latent config".into() })?;
        let (heads, qk, rank, rope) = (c.num_heads, a.qk_head_dim(), a.kv_lora_rank, a.qk_rope_head_dim);
        let width = a.latent_dim();
        let (rows, _) = b.act_shape(&ws.normed);
        let pairs = LayerPairs { backend: b, items, layer };
        // q: [rows, heads · qk], through the low-rank path when there is one.
        match &w.q_a {
            Some((q_a, q_a_norm)) => {
                b.linear(&ws.normed, q_a, None, &mut ws.mla_v);
                pairs.add(q_a_pair, 0, &ws.row_item, &ws.normed, &mut ws.scratch, &mut ws.mla_v);
                b.rms_norm(&ws.mla_v, q_a_norm, LATENT_NORM_EPS, &mut ws.proj);
                b.linear(&ws.proj, &w.q_b, None, &mut ws.mla_q);
                pairs.add(q_pair, 0, &ws.row_item, &ws.proj, &mut ws.scratch, &mut ws.mla_q);
            }
            None => {
                b.linear(&ws.normed, &w.q_b, None, &mut ws.mla_q);
                pairs.add(q_pair, 0, &ws.row_item, &ws.normed, &mut ws.scratch, &mut ws.mla_q);
            }
        }
        // The latent row: [c_kv (normed) | k_rope].
        b.linear(&ws.normed, &w.kv_a, None, &mut ws.mla_kv);
        pairs.add(kv_a_pair, 0, &ws.row_item, &ws.normed, &mut ws.scratch, &mut ws.mla_kv);
        b.rms_norm_cols(&mut ws.mla_kv, 0..rank, rank, &w.kv_a_norm, LATENT_NORM_EPS);
        // The attention input: absorbed query heads [q_lat | q_rope] then the latent key.
        b.zeros(rows, (heads + 1) * width, &mut ws.qkv);
        b.head_linear(&ws.mla_q, 0, qk, heads, &w.absorb_k, &mut ws.qkv, 0, width)?;
        if pairs.any(kv_b_keys) {
            let lookup = row_pair(items, &ws.row_item, layer, kv_b_keys);
            let cols = HeadCols { heads, x_col: 0, x_stride: qk, out_col: 0, out_stride: width, out_width: rank };
            b.lora_add_heads(&ws.mla_q, &lookup, cols, &mut ws.scratch, &mut ws.qkv)?;
        }
        b.copy_cols(&ws.mla_q, a.qk_nope_head_dim, qk, rope, heads, &mut ws.qkv, rank, width)?;
        b.copy_cols(&ws.mla_kv, 0, width, width, 1, &mut ws.qkv, heads * width, width)?;
        b.rope(&mut ws.qkv, rank, heads, width, &ws.rope);
        b.rope(&mut ws.qkv, heads * width + rank, 1, width, &ws.rope);
        b.attention(
            &ws.qkv,
            &self.latent_shape(),
            &ws.seqs,
            &ws.page_table,
            &mut kv.store,
            self.store_layer[layer],
            &mut ws.attn,
        )?;
        // Each head's latent output to its values, then o_proj.
        b.zeros(rows, heads * a.v_head_dim, &mut ws.mla_v);
        b.head_linear(&ws.attn, 0, width, heads, &w.absorb_v, &mut ws.mla_v, 0, a.v_head_dim)?;
        if pairs.any(kv_b_values) {
            let lookup = row_pair(items, &ws.row_item, layer, kv_b_values);
            let v = a.v_head_dim;
            let cols = HeadCols { heads, x_col: 0, x_stride: width, out_col: 0, out_stride: v, out_width: v };
            b.lora_add_heads(&ws.attn, &lookup, cols, &mut ws.scratch, &mut ws.mla_v)?;
        }
        b.linear(&ws.mla_v, &w.o, None, &mut ws.proj);
        pairs.add(o_pair, 0, &ws.row_item, &ws.mla_v, &mut ws.scratch, &mut ws.proj);
        b.add(&mut ws.hidden, &ws.proj);
        Ok(())
    }
}
