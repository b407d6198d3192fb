//! The generation loop for one sequence: prefill the prompt in one forward call, then decode one
//! token per call with the KV cache, until an end-of-sequence id, `max_new_tokens`, or the
//! model's context length.

use crate::error::Result;
use crate::sampler::{Sampler, SamplingParams};
use moe_compute::Backend;
use moe_model::{AdapterWeights, BatchItem, KvCache, LogitsFor, Model, ModelError, SequenceCache, Workspace};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Ids that end generation (the config's `eos_token_id` by default).
    pub stop_ids: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence id was produced.
    Stop,
    /// `max_new_tokens` or the context length was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Clone, Debug)]
pub struct GenerateOutput {
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

/// Runs single-sequence generation on a model, reusing its workspace and KV cache.
pub struct Generator<'m, B: Backend> {
    model: &'m Model<B>,
    ws: Workspace<B>,
    kv: KvCache<B>,
    logits: Vec<f32>,
    adapter: Option<&'m AdapterWeights<B>>,
}

/// Default KV page size, in tokens.
pub const PAGE_SIZE: usize = 16;

impl<'m, B: Backend> Generator<'m, B> {
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

    fn forward(&mut self, tokens: &[u32], cache: &mut SequenceCache, which: LogitsFor) -> Result<()> {
        let mut batch = [BatchItem::new(tokens, cache).with_adapter(self.adapter)];
        self.model.forward(&mut self.ws, &mut self.kv, &mut batch, which, &mut self.logits)?;
        Ok(())
    }

    pub fn generate(&mut self, req: &GenerateRequest) -> Result<GenerateOutput> {
        let max_pos = self.model.config.max_position_embeddings;
        self.model.validate_tokens(&req.prompt, 0)?;
        let mut sampler = Sampler::new(req.sampling.clone())?;
        let mut cache = SequenceCache::default();
        let result = self.run(req, &mut sampler, &mut cache, max_pos);
        self.kv.pages.release(&mut cache);
        result
    }

    fn run(
        &mut self,
        req: &GenerateRequest,
        sampler: &mut Sampler,
        cache: &mut SequenceCache,
        max_pos: usize,
    ) -> Result<GenerateOutput> {
        let mut out = Vec::with_capacity(req.max_new_tokens);
        let t0 = Instant::now();
        if req.max_new_tokens == 0 {
            return Ok(GenerateOutput {
                token_ids: out,
                finish_reason: FinishReason::Length,
                prefill_time: Duration::ZERO,
                decode_time: Duration::ZERO,
            });
        }
        self.forward(&req.prompt, cache, LogitsFor::Last)?;
        let prefill_time = t0.elapsed();
        let t1 = Instant::now();
        let mut finish = FinishReason::Length;
        loop {
            let next = sampler.sample(&self.logits);
            out.push(next);
            if req.stop_ids.contains(&next) {
                finish = FinishReason::Stop;
                break;
            }
            if out.len() >= req.max_new_tokens || cache.len >= max_pos {
                break;
            }
            match self.forward(&[next], cache, LogitsFor::Last) {
                Ok(()) => {}
                Err(crate::GenerateError::Model(ModelError::TooLong { .. })) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(GenerateOutput { token_ids: out, finish_reason: finish, prefill_time, decode_time: t1.elapsed() })
    }
}
