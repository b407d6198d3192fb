//! The shapes of the paged key/value store and of the recurrent state slots beside it.

/// Shape of the paged key/value store: `num_pages` pages of `page_size` token slots per layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub layers: usize,
    pub num_pages: usize,
    pub page_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Only keys are stored and attention reads its values from them (multi-head latent
    /// attention: the cached latent is both), halving the store.
    pub values_are_keys: bool,
    /// The recurrent states of linear-attention layers, kept beside the pages.
    pub states: StateLayout,
}

impl KvLayout {
    /// Bytes of f32 keys, values and recurrent states this layout holds.
    pub fn bytes(&self) -> usize {
        let tensors = if self.values_are_keys { 1 } else { 2 };
        tensors * 4 * self.layers * self.num_pages * self.page_size * self.n_kv_heads * self.head_dim
            + self.states.bytes()
    }
}

/// Recurrent state slots of linear-attention layers (gated DeltaNet): `slots` slots of `floats`
/// f32 values for each of `layers` layers. A sequence reads its state from one slot and writes
/// the advanced state into another, so a failed step leaves the state it started from intact.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateLayout {
    pub layers: usize,
    pub slots: usize,
    pub floats: usize,
}

impl StateLayout {
    pub fn bytes(&self) -> usize {
        4 * self.layers * self.slots * self.floats
    }
}
