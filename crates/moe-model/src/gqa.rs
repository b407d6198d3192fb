//! Grouped-query attention (multi-head and multi-query as its cases) with the variants the
//! architectures choose by config: fused q/k/v with optional bias, q/k RMSNorm per head or over
//! the whole projection, clipped q/k/v, partial rotary, a sliding window; and per-row LoRA pairs
//! on q, k, v and o.

use crate::batch::{k_pair, o_pair, q_gate_pair, q_pair, v_pair, BatchItem, LayerPairs, PairOf};
use crate::config::QkNorm;
use crate::error::Result;
use crate::model::{KvCache, Model};
use crate::weights::AttentionWeights;
use crate::workspace::Workspace;
use moe_compute::{AttentionShape, Backend};

impl<B: Backend> Model<B> {
    /// Grouped-query attention (multi-head and multi-query as its cases) on `ws.normed`.
    pub(crate) fn grouped_attention(
        &self,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        layer_idx: usize,
        a: &AttentionWeights<B>,
        items: &[BatchItem<'_, B>],
    ) -> Result<()> {
        let (b, c) = (&self.backend, &self.config);
        let (qw, kw) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        b.linear(&ws.normed, &a.qkv, a.qkv_bias.as_ref(), &mut ws.qkv);
        let lora = LayerPairs { backend: b, items, layer: layer_idx };
        // Gated attention's gate columns follow q, k and v.
        let pairs = [(q_pair as PairOf<B>, 0), (k_pair, qw), (v_pair, qw + kw), (q_gate_pair, qw + 2 * kw)];
        for (pick, col) in pairs {
            lora.add(pick, col, &ws.row_item, &ws.normed, &mut ws.scratch, &mut ws.qkv);
        }
        if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
            let (qg, kg) = match c.qk_norm {
                QkNorm::PerHead => (c.head_dim, c.head_dim),
                _ => (qw, kw),
            };
            b.rms_norm_cols(&mut ws.qkv, 0..qw, qg, qn, c.rms_norm_eps);
            b.rms_norm_cols(&mut ws.qkv, qw..qw + kw, kg, kn, c.rms_norm_eps);
        }
        if let Some(limit) = c.clip_qkv {
            b.clamp(&mut ws.qkv, limit);
        }
        b.rope(&mut ws.qkv, 0, c.num_heads, c.head_dim, &ws.rope);
        b.rope(&mut ws.qkv, qw, c.num_kv_heads, c.head_dim, &ws.rope);
        // This layer's window (gpt-oss alternates) and sinks.
        let shape =
            AttentionShape { sliding_window: c.window(layer_idx), sinks: a.sinks.as_deref(), ..self.attn_shape };
        let store_layer = self.store_layer[layer_idx];
        b.attention(&ws.qkv, &shape, &ws.seqs, &ws.page_table, &mut kv.store, store_layer, &mut ws.attn)?;
        if c.gated_attention {
            // The output gate's columns follow q, k and v.
            b.mul_sigmoid_cols(&mut ws.attn, &ws.qkv, qw + 2 * kw)?;
        }
        b.linear(&ws.attn, &a.o, a.o_bias.as_ref(), &mut ws.proj);
        lora.add(o_pair, 0, &ws.row_item, &ws.attn, &mut ws.scratch, &mut ws.proj);
        b.add(&mut ws.hidden, &ws.proj);
        Ok(())
    }
}
