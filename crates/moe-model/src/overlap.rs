//! Two-batch overlap (as MegaScale-Infer and DeepSeek's inference do): the batch is split into
//! two halves of whole sequences, each with its own workspace, and their layers are interleaved
//! so that one half's attention and dense work run while the other half's experts are on the
//! workers:
//!
//! ```text
//! pre(A,0) start(A,0)
//! for each layer l:
//!     pre(B,l) start(B,l)            <- overlaps A's expert round trip
//!     finish(A,l)
//!     pre(A,l+1) start(A,l+1)        <- overlaps B's expert round trip
//!     finish(B,l)
//! ```
//!
//! Each half is an ordinary batch of its own sequences, so results equal the plain forward.

use crate::error::Result;
use crate::experts::{ExpertExecutor, ExpertTicket};
use crate::model::{BatchItem, KvCache, LogitsFor, Model, Workspace};
use crate::weights::{FfnWeights, LayerWeights};
use moe_compute::Backend;

impl<B: Backend> Model<B> {
    /// [`Model::forward_with`] with two-batch overlap: items `..split` and `split..` run as two
    /// interleaved halves. Logits rows come in item order, as from the plain forward; rows that
    /// could not be served, and the expert load counters, are merged into `ws`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_overlapped(
        &self,
        ws: &mut Workspace<B>,
        ws_b: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        batch: &mut [BatchItem<'_, B>],
        split: usize,
        which: LogitsFor,
        logits: &mut Vec<f32>,
        experts: &dyn ExpertExecutor<B>,
    ) -> Result<()> {
        if split == 0 || split >= batch.len() {
            return self.forward_with(ws, kv, batch, which, logits, Some(experts));
        }
        self.validate_batch(batch)?;
        let (first, second) = batch.split_at_mut(split);
        self.prepare(ws, kv, first, which)?;
        self.prepare(ws_b, kv, second, which)?;
        let (a_items, b_items): (&[BatchItem<'_, B>], &[BatchItem<'_, B>]) = (first, second);
        let layers = &self.weights.layers;
        let mut ticket_a = self.start(ws, kv, 0, &layers[0], experts, a_items)?;
        for (i, layer) in layers.iter().enumerate() {
            let ticket_b = self.start(ws_b, kv, i, layer, experts, b_items)?;
            self.finish(ws, i, layer, experts, ticket_a)?;
            if let Some(next) = layers.get(i + 1) {
                ticket_a = self.start(ws, kv, i + 1, next, experts, a_items)?;
            } else {
                ticket_a = None;
            }
            self.finish(ws_b, i, layer, experts, ticket_b)?;
        }
        self.final_logits(ws, logits);
        // The second half's logits go through its (now idle) gating buffer: no allocation.
        let mut logits_b = std::mem::take(&mut ws_b.host);
        self.final_logits(ws_b, &mut logits_b);
        logits.extend_from_slice(&logits_b);
        ws_b.host = logits_b;
        let rows_a = ws.ids.len() as u32;
        ws.unserved.extend(ws_b.unserved.drain(..).map(|(r, why)| (r + rows_a, why)));
        if ws.expert_tokens.len() < ws_b.expert_tokens.len() {
            ws.expert_tokens.resize(ws_b.expert_tokens.len(), 0);
        }
        for (a, b) in ws.expert_tokens.iter_mut().zip(ws_b.expert_tokens.iter_mut()) {
            *a += std::mem::take(b);
        }
        if ws.keyed_expert_tokens.len() < ws_b.keyed_expert_tokens.len() {
            ws.keyed_expert_tokens.resize(ws_b.keyed_expert_tokens.len(), 0);
        }
        for (a, b) in ws.keyed_expert_tokens.iter_mut().zip(ws_b.keyed_expert_tokens.iter_mut()) {
            *a += std::mem::take(b);
        }
        for item in batch.iter_mut() {
            item.cache.advance(item.tokens.len());
        }
        Ok(())
    }

    /// A layer's attention and routing, then its experts started (`Some`) or, for a dense layer
    /// or local experts, the whole feed-forward done (`None`).
    fn start(
        &self,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        i: usize,
        layer: &LayerWeights<B>,
        experts: &dyn ExpertExecutor<B>,
        items: &[BatchItem<'_, B>],
    ) -> Result<Option<ExpertTicket<B>>> {
        // The unserved rows of the whole forward accumulate across layers.
        self.layer_pre(ws, kv, i, layer, items)?;
        match &layer.ffn {
            FfnWeights::Moe(_) => {
                Ok(Some(experts.start_experts(&ws.layer_call(&self.backend, i, self.config.top_k))?))
            }
            FfnWeights::Dense(_) => {
                self.layer_ffn(ws, i, layer, Some(experts), items)?;
                self.backend.add(&mut ws.hidden, &ws.ffn_out);
                Ok(None)
            }
        }
    }

    /// Waits for a layer's experts, adds the shared expert and the residual.
    fn finish(
        &self,
        ws: &mut Workspace<B>,
        i: usize,
        layer: &LayerWeights<B>,
        experts: &dyn ExpertExecutor<B>,
        ticket: Option<ExpertTicket<B>>,
    ) -> Result<()> {
        let (Some(ticket), FfnWeights::Moe(moe)) = (ticket, &layer.ffn) else { return Ok(()) };
        ticket.finish(experts, ws.layer_call(&self.backend, i, self.config.top_k))?;
        self.moe_shared(ws, moe);
        self.backend.add(&mut ws.hidden, &ws.ffn_out);
        Ok(())
    }
}

/// Where to split a batch for two-batch overlap: the item boundary nearest half the rows, never
/// leaving a half empty (0 when the batch has fewer than two items).
pub fn overlap_split<B: Backend>(batch: &[BatchItem<'_, B>]) -> usize {
    if batch.len() < 2 {
        return 0;
    }
    let total: usize = batch.iter().map(|b| b.tokens.len()).sum();
    let mut rows = 0;
    for (i, b) in batch.iter().enumerate() {
        rows += b.tokens.len();
        if 2 * rows >= total {
            return (i + 1).clamp(1, batch.len() - 1);
        }
    }
    batch.len() / 2
}
