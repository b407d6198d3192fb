//! One forward call's batch: each sequence's part ([`BatchItem`]: its new tokens, its KV cache,
//! its adapter), and the per-row lookup of an adapter's pair that every adapted module uses.

use crate::adapter::{AdapterWeights, LayerLora};
use crate::kv::SequenceCache;
use moe_compute::{Backend, FfnScratch, LoraWeights};

/// One sequence's part of a forward call.
pub struct BatchItem<'a, B: Backend> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SequenceCache,
    /// The LoRA adapter this sequence runs with; `None` for the base model.
    pub adapter: Option<&'a AdapterWeights<B>>,
    /// The request's id (0: none), carried to workers so their logs can name the requests.
    pub request: u64,
    /// Whose expert load this item's tokens count as (see [`crate::Workspace::keyed_expert_tokens_mut`]).
    pub load_key: u32,
}

impl<'a, B: Backend> BatchItem<'a, B> {
    /// An item on the base model.
    pub fn new(tokens: &'a [u32], cache: &'a mut SequenceCache) -> Self {
        Self { tokens, cache, adapter: None, request: 0, load_key: 0 }
    }

    /// Counts this item's routed tokens under `key` (small: the counters are dense per key).
    pub fn with_load_key(mut self, key: u32) -> Self {
        self.load_key = key;
        self
    }

    pub fn with_request(mut self, request: u64) -> Self {
        self.request = request;
        self
    }

    pub fn with_adapter(mut self, adapter: Option<&'a AdapterWeights<B>>) -> Self {
        self.adapter = adapter;
        self
    }
}

/// Picks one module's pair out of a layer's adapter pairs.
pub(crate) type PairOf<B> = fn(&LayerLora<B>) -> Option<&LoraWeights<B>>;

/// The module pickers, one per adapted projection.
pub(crate) fn q_pair<B: Backend>(l: &LayerLora<B>) -> Option<&LoraWeights<B>> {
    l.q.as_ref()
}
pub(crate) fn q_gate_pair<B: Backend>(l: &LayerLora<B>) -> Option<&LoraWeights<B>> {
    l.q_gate.as_ref()
}
pub(crate) fn k_pair<B: Backend>(l: &LayerLora<B>) -> Option<&LoraWeights<B>> {
    l.k.as_ref()
}
pub(crate) fn v_pair<B: Backend>(l: &LayerLora<B>) -> Option<&LoraWeights<B>> {
    l.v.as_ref()
}
pub(crate) fn o_pair<B: Backend>(l: &LayerLora<B>) -> Option<&LoraWeights<B>> {
    l.o.as_ref()
}
pub(crate) fn q_a_pair<B: Backend>(l: &LayerLora<B>) -> Option<&LoraWeights<B>> {
    l.q_a.as_ref()
}
pub(crate) fn kv_a_pair<B: Backend>(l: &LayerLora<B>) -> Option<&LoraWeights<B>> {
    l.kv_a.as_ref()
}
pub(crate) fn kv_b_keys<B: Backend>(l: &LayerLora<B>) -> Option<&LoraWeights<B>> {
    l.kv_b_keys.as_ref()
}
pub(crate) fn kv_b_values<B: Backend>(l: &LayerLora<B>) -> Option<&LoraWeights<B>> {
    l.kv_b_values.as_ref()
}
pub(crate) fn gate_pair<B: Backend>(l: &LayerLora<B>) -> Option<&LoraWeights<B>> {
    l.gate.as_ref()
}

/// The per-row lookup of one module's pair: row → its item's adapter → this layer's pair.
pub(crate) fn row_pair<'l, B: Backend>(
    items: &'l [BatchItem<'_, B>],
    row_item: &'l [u32],
    layer: usize,
    pick: PairOf<B>,
) -> impl Fn(usize) -> Option<&'l LoraWeights<B>> + Sync + 'l {
    move |r| pick(items.get(*row_item.get(r)? as usize)?.adapter?.layers.get(layer)?)
}

/// One layer's adapter pairs applied per row: each row gets its own adapter's pair, if any.
pub(crate) struct LayerPairs<'a, 'i, B: Backend> {
    pub backend: &'a B,
    pub items: &'a [BatchItem<'i, B>],
    pub layer: usize,
}

impl<B: Backend> LayerPairs<'_, '_, B> {
    /// Whether any row's adapter has the pair `pick` on this layer.
    pub fn any(&self, pick: PairOf<B>) -> bool {
        self.items.iter().any(|it| it.adapter.and_then(|ad| ad.layers.get(self.layer)).and_then(pick).is_some())
    }

    /// `out[.., col..] += scale · x · Aᵀ · Bᵀ` on the rows whose adapter has the pair `pick`.
    pub fn add(
        &self,
        pick: PairOf<B>,
        col: usize,
        row_item: &[u32],
        x: &B::Act,
        s: &mut FfnScratch<B>,
        out: &mut B::Act,
    ) {
        if self.any(pick) {
            let lookup = row_pair(self.items, row_item, self.layer, pick);
            self.backend.lora_add(x, &lookup, col, s, out);
        }
    }
}
