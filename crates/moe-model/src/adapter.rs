//! A LoRA adapter as the forward pass uses it: per layer, optional low-rank pairs on q/k/v/o
//! (and latent attention's projections), on the MoE gate (so a tenant gets its own expert routing) and on routed experts. Parsing PEFT
//! files into this lives in `moe-lora`; here is only the shape the model computes with.
//!
//! An adapter is known everywhere by its [`AdapterIdentity`]: id, where it lives under the
//! adapter store, and a digest of its files, so a router and a worker can tell that they hold
//! the same version, and no cache ever mixes two adapters (or an adapter and the base model).

use moe_compute::{Backend, ExpertLora, LoraWeights};
use std::fmt;

/// Which adapter, as routers and workers agree on it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct AdapterIdentity {
    pub id: String,
    /// The adapter's directory relative to the adapter store's root (usually the id itself).
    pub path: String,
    /// A content digest of the adapter's files (hex).
    pub digest: String,
}

/// One layer's pairs. `experts` is indexed by expert id (empty when the adapter has no expert
/// pairs held here).
pub struct LayerLora<B: Backend> {
    pub q: Option<LoraWeights<B>>,
    /// Gated attention (Qwen3-Next): the q_proj pair's rows that make the output gate.
    pub q_gate: Option<LoraWeights<B>>,
    pub k: Option<LoraWeights<B>>,
    pub v: Option<LoraWeights<B>>,
    pub o: Option<LoraWeights<B>>,
    /// Latent attention: `q_a_proj`'s pair (q is `q`, o_proj's is `o`).
    pub q_a: Option<LoraWeights<B>>,
    /// Latent attention: `kv_a_proj_with_mqa`'s pair, rope rows as the weight is laid out.
    pub kv_a: Option<LoraWeights<B>>,
    /// Latent attention: `kv_b_proj`'s pair in absorbed form (see `mla::absorbed_kv_b_lora`):
    /// the per-head query term (keys) and the per-head output term (values).
    pub kv_b_keys: Option<LoraWeights<B>>,
    pub kv_b_values: Option<LoraWeights<B>>,
    pub gate: Option<LoraWeights<B>>,
    pub experts: Vec<Option<ExpertLora<B>>>,
    /// Whether the adapter changes any routed expert of this layer, held here or not (a router
    /// holds no expert pairs but must tell workers which rows carry an adapter).
    pub has_expert_lora: bool,
}

impl<B: Backend> Default for LayerLora<B> {
    fn default() -> Self {
        Self {
            q: None,
            q_gate: None,
            k: None,
            v: None,
            o: None,
            q_a: None,
            kv_a: None,
            kv_b_keys: None,
            kv_b_values: None,
            gate: None,
            experts: Vec::new(),
            has_expert_lora: false,
        }
    }
}

/// A loaded adapter.
pub struct AdapterWeights<B: Backend> {
    pub identity: AdapterIdentity,
    pub layers: Vec<LayerLora<B>>,
    /// Bytes of the pairs held (what residency limits count).
    pub bytes: usize,
}

impl<B: Backend> AdapterWeights<B> {
    pub fn id(&self) -> &str {
        &self.identity.id
    }

    pub fn expert(&self, layer: usize, expert: usize) -> Option<&ExpertLora<B>> {
        self.layers.get(layer)?.experts.get(expert)?.as_ref()
    }

    /// Whether any layer changes routed experts (rows then carry the adapter to workers).
    pub fn has_expert_lora(&self) -> bool {
        self.layers.iter().any(|l| l.has_expert_lora)
    }
}

impl<B: Backend> fmt::Debug for AdapterWeights<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdapterWeights").field("identity", &self.identity).field("bytes", &self.bytes).finish()
    }
}
