//! The forward pass shared by all architectures, over a batch of sequences that each bring
//! new tokens (a whole prompt, a prefill chunk, or one decode token) and their paged KV cache.
//! Architecture differences are data (config flags, optional weights) and a choice per concern
//! (grouped-query or latent attention, softmax or sigmoid routing), not copies of the pass.

pub use crate::batch::BatchItem;
use crate::batch::{gate_pair, row_pair};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::experts::ExpertExecutor;
use crate::kv::PageAllocator;
use crate::weights::{load_weights, FfnWeights, LayerAttention, LayerWeights, ModelWeights, MoeWeights};
use crate::workspace::StepPhases;
pub use crate::workspace::Workspace;
use moe_compute::{AttentionSeq, AttentionShape, Backend};
use std::path::Path;

/// A loaded model on a backend.
pub struct Model<B: Backend> {
    pub config: ModelConfig,
    pub(crate) backend: B,
    pub(crate) weights: ModelWeights<B>,
    inv_freq: Vec<f32>,
    /// YaRN's attention factor on cos and sin (1 otherwise).
    rope_scale: f32,
    pub(crate) attn_shape: AttentionShape<'static>,
    /// The attention call of latent attention (DeepSeek-V3), when the model has it.
    latent_shape: Option<AttentionShape<'static>>,
    /// Per layer, its index in the store: among the KV layers, or for a linear-attention layer
    /// among the recurrent-state layers.
    pub(crate) store_layer: Vec<usize>,
}

/// The backend's KV store together with the allocator of its pages.
pub struct KvCache<B: Backend> {
    pub store: B::KvStore,
    pub pages: PageAllocator,
}

/// Which positions to compute logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every new token of every item (what `moe logits` prints).
    All,
    /// Only the last new token of each item (what generation samples from).
    Last,
}

impl<B: Backend> Model<B> {
    /// Loads `config.json` and the safetensors weights of a Hugging Face model directory.
    pub fn load(dir: &Path, backend: B) -> Result<Self> {
        Self::load_with(dir, backend, true)
    }

    /// Loads the model; without `with_experts`, only the dense part (what a router holds), and
    /// forward calls must then be given an [`ExpertExecutor`].
    pub fn load_with(dir: &Path, backend: B, with_experts: bool) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        crate::weights::check_backend(&config, &backend)?;
        // What it will need, before any weight is read.
        tracing::info!(model = %dir.display(), "{}", crate::sizing::ModelSize::of(&config).describe(&config));
        let ckpt = Checkpoint::open(dir)?;
        let weights = load_weights(&ckpt, &config, &backend, with_experts)?;
        Ok(Self::from_parts(config, weights, backend))
    }

    pub fn from_parts(config: ModelConfig, weights: ModelWeights<B>, backend: B) -> Self {
        let (qw, kw) = (config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim);
        let attn_shape = AttentionShape {
            n_heads: config.num_heads,
            n_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            q_col: 0,
            k_col: qw,
            v_col: qw + kw,
            scale: config.attention_scale(),
            sliding_window: config.sliding_window,
            sinks: None,
        };
        let latent_shape =
            config.latent.as_ref().map(|a| a.attention_shape(config.num_heads, config.attention_scale()));
        let (mut kv_layers, mut state_layers) = (0, 0);
        let store_layer = (0..config.num_layers)
            .map(|i| {
                let counter = if config.is_linear_layer(i) { &mut state_layers } else { &mut kv_layers };
                *counter += 1;
                *counter - 1
            })
            .collect();
        Self {
            store_layer,
            inv_freq: config.inv_freq(),
            rope_scale: config.rope.attention_factor(),
            config,
            backend,
            weights,
            attn_shape,
            latent_shape,
        }
    }

    pub(crate) fn latent_shape(&self) -> AttentionShape<'static> {
        self.latent_shape.unwrap_or(self.attn_shape)
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend's name, for logs.
    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    pub fn workspace(&self) -> Workspace<B> {
        Workspace::new(&self.backend)
    }

    /// Checks a prompt before any work: not empty, ids in the vocabulary, within the context.
    pub fn validate_tokens(&self, tokens: &[u32], already_cached: usize) -> Result<()> {
        if tokens.is_empty() && already_cached == 0 {
            return Err(ModelError::EmptyPrompt);
        }
        if let Some((position, &id)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= self.config.vocab_size) {
            return Err(ModelError::TokenOutOfRange { id, position, vocab_size: self.config.vocab_size });
        }
        let len = already_cached + tokens.len();
        if len > self.config.max_position_embeddings {
            return Err(ModelError::TooLong { len, max: self.config.max_position_embeddings });
        }
        Ok(())
    }

    /// Runs the new tokens of every item through the model with its own experts, appending them
    /// to their caches, and writes the requested logits rows (`vocab_size` each) into `logits`.
    pub fn forward(
        &self,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        batch: &mut [BatchItem<'_, B>],
        which: LogitsFor,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        self.forward_with(ws, kv, batch, which, logits, None)
    }

    /// [`Model::forward`] with the routed experts run by `experts` (when given). On error the
    /// caches' lengths are unchanged (their new pages stay reserved for a retry).
    pub fn forward_with(
        &self,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        batch: &mut [BatchItem<'_, B>],
        which: LogitsFor,
        logits: &mut Vec<f32>,
        experts: Option<&dyn ExpertExecutor<B>>,
    ) -> Result<()> {
        self.validate_batch(batch)?;
        self.prepare(ws, kv, batch, which)?;
        let items: &[BatchItem<'_, B>] = batch;
        let mut t = std::time::Instant::now();
        for (i, layer) in self.weights.layers.iter().enumerate() {
            self.layer_pre(ws, kv, i, layer, items)?;
            StepPhases::lap(&mut ws.phases.dense_ns, &mut t);
            self.layer_ffn(ws, i, layer, experts, items)?;
            StepPhases::lap(&mut ws.phases.experts_ns, &mut t);
            self.backend.add(&mut ws.hidden, &ws.ffn_out);
        }
        self.final_logits(ws, logits);
        StepPhases::lap(&mut ws.phases.head_ns, &mut t);
        for item in batch.iter_mut() {
            item.cache.advance(item.tokens.len());
        }
        Ok(())
    }

    pub(crate) fn validate_batch(&self, batch: &[BatchItem<'_, B>]) -> Result<()> {
        for item in batch.iter() {
            if item.tokens.is_empty() {
                return Err(ModelError::EmptyPrompt);
            }
            self.validate_tokens(item.tokens, item.cache.len)?;
        }
        Ok(())
    }

    /// Reserves the items' pages and lays out the batch in `ws`: token ids, positions, output
    /// rows, adapters, attention sequences, then the embeddings and rotary tables.
    pub(crate) fn prepare(
        &self,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        batch: &mut [BatchItem<'_, B>],
        which: LogitsFor,
    ) -> Result<()> {
        let b = &self.backend;
        for item in batch.iter_mut() {
            kv.pages.reserve(item.cache, item.cache.len + item.tokens.len())?;
        }
        ws.ids.clear();
        ws.positions.clear();
        ws.out_rows.clear();
        for item in batch.iter() {
            let start = ws.ids.len();
            ws.ids.extend_from_slice(item.tokens);
            ws.positions.extend((item.cache.len..item.cache.len + item.tokens.len()).map(|p| p as u32));
            match which {
                LogitsFor::All => ws.out_rows.extend(start as u32..ws.ids.len() as u32),
                LogitsFor::Last => ws.out_rows.push(ws.ids.len() as u32 - 1),
            }
        }
        self.index_adapters(ws, batch);
        let mut row = 0;
        ws.seqs.clear();
        ws.page_table.clear();
        ws.unserved.clear();
        ws.state_slots.clear();
        if self.config.linear.is_some() {
            for item in batch.iter() {
                ws.state_slots.push(item.cache.state_slots().ok_or(ModelError::NoStateSlot)?);
            }
        }
        // Pages are unique to a sequence, so the table never exceeds the pool: one growth, ever.
        ws.page_table.reserve(kv.pages.num_pages());
        for item in batch.iter() {
            let first_page = ws.page_table.len();
            ws.page_table.extend_from_slice(&item.cache.pages);
            ws.seqs.push(AttentionSeq {
                rows: row..row + item.tokens.len(),
                start_pos: item.cache.len,
                pages: first_page..ws.page_table.len(),
            });
            row += item.tokens.len();
        }

        b.embed(&self.weights.embed, &ws.ids, &mut ws.hidden)?;
        b.rope_table(&ws.positions, &self.inv_freq, self.rope_scale, &mut ws.rope);
        Ok(())
    }

    /// Attention of one layer, its post-attention norm and, for an MoE layer, the routing.
    pub(crate) fn layer_pre(
        &self,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        i: usize,
        layer: &LayerWeights<B>,
        items: &[BatchItem<'_, B>],
    ) -> Result<()> {
        self.attention_block(ws, kv, i, layer, items)?;
        self.backend.rms_norm(&ws.hidden, &layer.post_attention_norm, self.config.rms_norm_eps, &mut ws.normed);
        if let FfnWeights::Moe(moe) = &layer.ffn {
            self.moe_route(ws, i, moe, items);
        }
        Ok(())
    }

    /// The feed-forward part of one layer into `ws.ffn_out` (after [`Self::layer_pre`]).
    pub(crate) fn layer_ffn(
        &self,
        ws: &mut Workspace<B>,
        i: usize,
        layer: &LayerWeights<B>,
        experts: Option<&dyn ExpertExecutor<B>>,
        items: &[BatchItem<'_, B>],
    ) -> Result<()> {
        match &layer.ffn {
            FfnWeights::Dense(mlp) => self.backend.swiglu(&ws.normed, mlp, &mut ws.scratch, &mut ws.ffn_out),
            FfnWeights::Moe(moe) => {
                self.moe_experts(ws, i, moe, experts, items)?;
                self.moe_shared(ws, moe);
            }
        }
        Ok(())
    }

    /// The final norm and LM head over the output rows, into `logits`.
    pub(crate) fn final_logits(&self, ws: &mut Workspace<B>, logits: &mut Vec<f32>) {
        let (b, c) = (&self.backend, &self.config);
        b.gather_rows(&ws.hidden, &ws.out_rows, &mut ws.selected);
        b.rms_norm(&ws.selected, &self.weights.norm, c.rms_norm_eps, &mut ws.normed);
        let head = self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed);
        b.linear(&ws.normed, head, None, &mut ws.logits);
        b.download(&ws.logits, logits);
    }

    /// Maps rows to items and lists the adapters whose expert pairs workers must apply.
    fn index_adapters(&self, ws: &mut Workspace<B>, batch: &[BatchItem<'_, B>]) {
        ws.row_item.clear();
        ws.row_request.clear();
        ws.row_key.clear();
        for (i, item) in batch.iter().enumerate() {
            ws.row_item.extend(std::iter::repeat_n(i as u32, item.tokens.len()));
            ws.row_request.extend(std::iter::repeat_n(item.request, item.tokens.len()));
            ws.row_key.extend(std::iter::repeat_n(item.load_key, item.tokens.len()));
        }
        let keys = batch.iter().map(|it| it.load_key as usize + 1).max().unwrap_or(1);
        let keyed_len = keys * self.config.num_layers * self.config.num_experts;
        if ws.keyed_expert_tokens.len() < keyed_len {
            ws.keyed_expert_tokens.resize(keyed_len, 0);
        }
        ws.adapter_table.clear();
        ws.row_adapter.clear();
        if !batch.iter().any(|it| it.adapter.is_some_and(|a| a.has_expert_lora())) {
            return;
        }
        for item in batch {
            let slot = match item.adapter.filter(|a| a.has_expert_lora()) {
                Some(a) => match ws.adapter_table.iter().position(|t| *t == a.identity) {
                    Some(p) => p as u32 + 1,
                    None => {
                        ws.adapter_table.push(a.identity.clone());
                        ws.adapter_table.len() as u32
                    }
                },
                None => 0,
            };
            ws.row_adapter.extend(std::iter::repeat_n(slot, item.tokens.len()));
        }
    }

    fn attention_block(
        &self,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        layer_idx: usize,
        layer: &LayerWeights<B>,
        items: &[BatchItem<'_, B>],
    ) -> Result<()> {
        self.backend.rms_norm(&ws.hidden, &layer.input_norm, self.config.rms_norm_eps, &mut ws.normed);
        match &layer.attention {
            LayerAttention::Grouped(a) => self.grouped_attention(ws, kv, layer_idx, a, items),
            LayerAttention::Latent(w) => self.latent_attention(ws, kv, layer_idx, w, items),
            LayerAttention::Linear(w) => self.delta_net(ws, kv, layer_idx, w, items),
        }
    }

    /// Gate logits (with any gate LoRA), each row's top-k experts, the plan, the expert load
    /// counters, and `ffn_out` zeroed for the experts to add into.
    fn moe_route(&self, ws: &mut Workspace<B>, layer: usize, moe: &MoeWeights<B>, items: &[BatchItem<'_, B>]) {
        let (b, c) = (&self.backend, &self.config);
        let (rows, _) = b.act_shape(&ws.normed);
        b.linear(&ws.normed, &moe.gate, moe.router_bias.as_ref(), &mut ws.gate_logits);
        let has_gate =
            items.iter().any(|it| it.adapter.and_then(|a| a.layers.get(layer)).is_some_and(|l| l.gate.is_some()));
        if has_gate {
            let lookup = row_pair(items, &ws.row_item, layer, gate_pair);
            b.lora_add(&ws.normed, &lookup, 0, &mut ws.scratch, &mut ws.gate_logits);
        }
        let bias = moe.gate_bias.as_deref();
        // On the device where the backend routes there (the same bits), else on the host.
        if !b.route_rows(&ws.gate_logits, &c.routing.gate_rule(), bias, c.top_k, &mut ws.choices) {
            b.download(&ws.gate_logits, &mut ws.host);
            ws.choices.clear();
            ws.choices.resize(rows * c.top_k, (0, 0.0));
            for r in 0..rows {
                let logits = &ws.host[r * c.num_experts..(r + 1) * c.num_experts];
                let out = &mut ws.choices[r * c.top_k..(r + 1) * c.top_k];
                c.routing.route(logits, bias, &mut ws.route_scratch, out);
            }
        }
        ws.plan.rebuild(c.num_experts, c.top_k, &ws.choices);
        let counts_len = c.num_layers * c.num_experts;
        if ws.expert_tokens.len() != counts_len {
            ws.expert_tokens.resize(counts_len, 0);
        }
        for &(e, _) in &ws.choices {
            ws.expert_tokens[layer * c.num_experts + e as usize] += 1;
        }
        for (r, row) in ws.choices.chunks(c.top_k.max(1)).enumerate() {
            let key = ws.row_key.get(r).copied().unwrap_or(0) as usize;
            let base = (key * c.num_layers + layer) * c.num_experts;
            for &(e, _) in row {
                if let Some(n) = ws.keyed_expert_tokens.get_mut(base + e as usize) {
                    *n += 1;
                }
            }
        }
        b.zeros(rows, c.hidden_size, &mut ws.ffn_out);
    }

    /// The routed experts of an MoE layer (after [`Self::moe_route`]), added into `ffn_out`.
    fn moe_experts(
        &self,
        ws: &mut Workspace<B>,
        layer: usize,
        moe: &MoeWeights<B>,
        experts: Option<&dyn ExpertExecutor<B>>,
        items: &[BatchItem<'_, B>],
    ) -> Result<()> {
        let (b, c) = (&self.backend, &self.config);
        match experts {
            Some(executor) => executor.run_experts(ws.layer_call(b, layer, c.top_k))?,
            None if moe.experts.len() == c.num_experts => {
                let any = items
                    .iter()
                    .any(|it| it.adapter.and_then(|a| a.layers.get(layer)).is_some_and(|l| l.has_expert_lora));
                if any {
                    let row_item = &ws.row_item;
                    let lookup = |r: usize, e: usize| items.get(*row_item.get(r)? as usize)?.adapter?.expert(layer, e);
                    b.expert_ffn_lora(&ws.normed, &moe.experts, &ws.plan, &lookup, &mut ws.scratch, &mut ws.ffn_out);
                } else {
                    b.expert_ffn(&ws.normed, &moe.experts, &ws.plan, &mut ws.scratch, &mut ws.ffn_out);
                }
            }
            None => {
                return Err(ModelError::Experts { layer, message: "this model was loaded without its experts".into() })
            }
        }
        Ok(())
    }

    /// The shared expert (Qwen2-MoE's gated one, DeepSeek's and GLM's plain ones), added into
    /// `ffn_out`.
    pub(crate) fn moe_shared(&self, ws: &mut Workspace<B>, moe: &MoeWeights<B>) {
        let b = &self.backend;
        let Some(shared) = &moe.shared else { return };
        b.swiglu(&ws.normed, &shared.ffn, &mut ws.scratch, &mut ws.shared_out);
        match &shared.gate {
            Some(gate) => {
                b.linear(&ws.normed, gate, None, &mut ws.gate_logits);
                b.add_sigmoid_gated(&mut ws.ffn_out, &ws.shared_out, &ws.gate_logits);
            }
            None => b.add(&mut ws.ffn_out, &ws.shared_out),
        }
    }
}
