//! The logits of one prompt on a model (what `moe logits` prints and the parity tests compare
//! with transformers). Generation itself runs through the router's engine, in process or
//! served: one loop, one set of stop rules.

use crate::error::Result;
use moe_compute::Backend;
use moe_model::{AdapterWeights, BatchItem, KvCache, LogitsFor, Model, SequenceCache, Workspace};

/// One prompt through a model (its forward passes reuse one workspace and KV cache).
pub struct PromptLogits<'m, B: Backend> {
    model: &'m Model<B>,
    ws: Workspace<B>,
    kv: KvCache<B>,
    logits: Vec<f32>,
    adapter: Option<&'m AdapterWeights<B>>,
}

/// Default KV page size, in tokens.
pub const PAGE_SIZE: usize = 16;

impl<'m, B: Backend> PromptLogits<'m, B> {
    /// A generator whose KV cache holds up to `max_tokens` tokens.
    pub fn new(model: &'m Model<B>, max_tokens: usize) -> Result<Self> {
        let pages = max_tokens.max(1).div_ceil(PAGE_SIZE);
        Ok(Self {
            model,
            ws: model.workspace(),
            kv: model.kv_cache(pages, PAGE_SIZE)?,
            logits: Vec::new(),
            adapter: None,
        })
    }

    /// Runs every later call with this LoRA adapter (`None`: the base model).
    pub fn with_adapter(mut self, adapter: Option<&'m AdapterWeights<B>>) -> Self {
        self.adapter = adapter;
        self
    }

    /// Full logits for every prompt position (one prefill call), `vocab_size` per row.
    pub fn prompt_logits(&mut self, prompt: &[u32]) -> Result<Vec<f32>> {
        self.model.validate_tokens(prompt, 0)?;
        let mut cache = SequenceCache::default();
        let r = self.forward(prompt, &mut cache, LogitsFor::All);
        self.kv.pages.release(&mut cache);
        r?;
        Ok(std::mem::take(&mut self.logits))
    }

    /// Tokens routed to each (layer, expert) since the last call, `layer * num_experts + expert`;
    /// zeroed as they are read.
    pub fn take_expert_tokens(&mut self) -> Vec<u64> {
        let counts = self.ws.expert_tokens_mut();
        let out = counts.to_vec();
        counts.fill(0);
        out
    }

    fn forward(&mut self, tokens: &[u32], cache: &mut SequenceCache, which: LogitsFor) -> Result<()> {
        let mut batch = [BatchItem::new(tokens, cache).with_adapter(self.adapter)];
        self.model.forward(&mut self.ws, &mut self.kv, &mut batch, which, &mut self.logits)?;
        Ok(())
    }
}
