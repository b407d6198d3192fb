//! Linear attention's part of the forward pass in hybrid models (Qwen3-Next's gated DeltaNet):
//! the layer's fused projection, the backend's gated delta rule over each sequence's recurrent
//! state, and the output projection. `delta_net_weights` loads the layer.

use crate::delta_net_weights::DeltaNetLayer;
use crate::error::Result;
use crate::kv::SequenceCache;
use crate::model::{BatchItem, KvCache, Model};
use crate::workspace::Workspace;
use moe_compute::Backend;

impl<B: Backend> Model<B> {
    /// Checkpoints a hybrid model's sequence at a page boundary: copies its current state into a
    /// snapshot slot, which [`crate::PageAllocator::publish`] then hands to the prefix cache with
    /// the page that ends there. False (and nothing done) when the model keeps no state, `cache`
    /// is not at a boundary, or no snapshot slot can be had.
    pub fn checkpoint_state(&self, kv: &mut KvCache<B>, cache: &mut SequenceCache) -> Result<bool> {
        let ps = kv.pages.page_size();
        let Some(slots) = cache.state_slots() else { return Ok(false) };
        if slots.fresh || cache.resume_from.is_some() || !cache.len.is_multiple_of(ps) {
            return Ok(false);
        }
        let Some(slot) = kv.pages.snapshot_slot(cache) else { return Ok(false) };
        if let Err(e) = self.backend.copy_state(&mut kv.store, slots.read, slot) {
            kv.pages.return_snapshot_slot(slot);
            return Err(e.into());
        }
        cache.checkpoint = Some((slot, cache.len));
        Ok(true)
    }

    /// A gated DeltaNet layer on `ws.normed`, added into `ws.hidden`.
    pub(crate) fn delta_net(
        &self,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        layer_idx: usize,
        w: &DeltaNetLayer<B>,
        _items: &[BatchItem<'_, B>],
    ) -> Result<()> {
        let b = &self.backend;
        b.linear(&ws.normed, &w.proj, None, &mut ws.qkv);
        let store_layer = self.store_layer[layer_idx];
        b.gated_delta_net(
            &ws.qkv,
            &w.weights,
            &w.shape,
            &ws.seqs,
            &ws.state_slots,
            &mut kv.store,
            store_layer,
            &mut ws.attn,
        )?;
        b.linear(&ws.attn, &w.out, None, &mut ws.proj);
        b.add(&mut ws.hidden, &ws.proj);
        Ok(())
    }
}
