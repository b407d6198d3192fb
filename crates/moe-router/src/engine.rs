//! The compute loop: one thread that owns the model workspace and the paged KV cache, and runs
//! iteration-level continuous batching. Each step it takes in new requests (bounded queue),
//! drops cancelled and expired ones (freeing their pages), admits waiting requests while their
//! whole KV need fits, builds one batch of decode tokens plus prefill chunks under a token budget,
//! runs it, samples, and sends each request its events. Every accepted request ends in exactly
//! one `Finished` or `Failed` event.

use crate::engine_metrics::{outcome_label, EngineMetrics};
use crate::error::RouterError;
use crate::request::{Event, FinishReason, ValidatedRequest};
use crate::tenants::Tenants;
use crate::text::TextStream;
use moe_compute::cpu::CpuBackend;
use moe_generate::{Sampler, TextCodec};
use moe_lora::{load_adapter, AdapterParts, AdapterRegistry, RegistryLimits};
use moe_model::{AdapterWeights, BatchItem, ExpertExecutor, KvCache, LogitsFor, Model, SequenceCache};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Tokens per step across decode tokens and prefill chunks.
    pub max_batch_tokens: usize,
    /// Sequences in the running batch at most.
    pub max_running: usize,
    /// Requests waiting for admission at most; beyond, RESOURCE_EXHAUSTED.
    pub max_waiting: usize,
    /// KV-cache memory budget in bytes (f32 keys and values of every layer).
    pub kv_cache_bytes: usize,
    pub page_size: usize,
    /// Deadline of requests that set none.
    pub default_timeout: Duration,
    /// Where the engine reports (shared with the API servers and transports of the process).
    pub metrics: moe_metrics::Registry,
    /// With remote experts, split each step's batch in two halves and interleave them layer by
    /// layer, so one half's attention runs while the other half's experts are on the workers.
    /// Off by default: it pays where routers and workers have their own processors (on one
    /// machine, as in `moe bench`, both halves compete for the same cores and each expert's
    /// weights are read twice per step); `moe bench` measures it both ways.
    pub two_batch_overlap: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 512,
            max_running: 64,
            max_waiting: 256,
            kv_cache_bytes: 512 << 20,
            page_size: 16,
            default_timeout: Duration::from_secs(600),
            metrics: moe_metrics::Registry::new(),
            two_batch_overlap: false,
        }
    }
}

/// Counters the engine publishes after every step (for tests, health and metrics).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub total_pages: AtomicUsize,
    pub free_pages: AtomicUsize,
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub steps: AtomicUsize,
    /// Set when the server starts draining: new requests are refused with UNAVAILABLE, running
    /// ones go on.
    pub draining: std::sync::atomic::AtomicBool,
    /// Set when the drain time is up: open requests fail with UNAVAILABLE, so clients see a
    /// status instead of a dropped connection.
    pub stopping: std::sync::atomic::AtomicBool,
}

struct Submission {
    id: u64,
    req: ValidatedRequest,
    events: UnboundedSender<Event>,
    submitted: Instant,
}

impl Submission {
    fn tenant(&self) -> &str {
        self.req.tenant.as_deref().unwrap_or("")
    }
}

/// The handle the API side holds: submits requests and reads the engine's counters.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<Submission>,
    stats: Arc<EngineStats>,
    max_waiting: usize,
    next_id: Arc<AtomicUsize>,
    model: Arc<Model<CpuBackend>>,
    codec: Arc<TextCodec>,
    config: EngineConfig,
    adapters: Option<Arc<RouterAdapters>>,
    tenants: Option<Arc<Tenants>>,
}

/// The adapters a router holds: attention and gate pairs (expert pairs live on workers).
pub type RouterAdapters = AdapterRegistry<AdapterWeights<CpuBackend>>;

/// A registry of router-side adapters for `model`, over the adapter dir `root`. With `experts`
/// the expert pairs are held too (a model that runs its own experts).
pub fn router_adapters(
    model: Arc<Model<CpuBackend>>,
    root: Option<std::path::PathBuf>,
    limits: RegistryLimits,
    experts: bool,
) -> RouterAdapters {
    AdapterRegistry::new(root, limits, move |dir, identity| {
        let parts = if experts { AdapterParts::all() } else { AdapterParts::router() };
        let parts = parts.with_max_rank(limits.max_rank);
        load_adapter(dir, identity, &model.config, model.backend(), parts)
    })
}

impl Engine {
    /// Starts the compute thread. `experts` runs the routed experts (in-process or remote);
    /// `None` uses the model's own.
    pub fn start(
        model: Arc<Model<CpuBackend>>,
        codec: Arc<TextCodec>,
        experts: Option<Arc<dyn ExpertExecutor<CpuBackend>>>,
        config: EngineConfig,
    ) -> Result<Self, RouterError> {
        let c = &model.config;
        let page_bytes = 2 * 4 * c.num_layers * config.page_size * c.num_kv_heads * c.head_dim;
        let pages = (config.kv_cache_bytes / page_bytes.max(1)).max(1);
        let kv = model.kv_cache(pages, config.page_size).map_err(|e| RouterError::Internal(e.to_string()))?;
        let stats = Arc::new(EngineStats::default());
        stats.total_pages.store(pages, Ordering::Relaxed);
        stats.free_pages.store(pages, Ordering::Relaxed);
        let (tx, rx) = std::sync::mpsc::sync_channel(config.max_waiting.max(1));
        let mut worker = Worker {
            model: model.clone(),
            codec: codec.clone(),
            experts,
            kv,
            ws: model.workspace(),
            ws_b: model.workspace(),
            rx,
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: stats.clone(),
            config: config.clone(),
            logits: Vec::new(),
            seen: vec![false; c.vocab_size],
            chunk: Vec::new(),
            members: Vec::new(),
            done: Vec::new(),
            metrics: EngineMetrics { registry: config.metrics.clone() },
        };
        std::thread::Builder::new()
            .name("moe-engine".into())
            .spawn(move || worker.run())
            .map_err(|e| RouterError::Internal(format!("starting the engine thread: {e}")))?;
        Ok(Self {
            tx,
            stats,
            max_waiting: config.max_waiting,
            next_id: Arc::new(AtomicUsize::new(1)),
            model,
            codec,
            config,
            adapters: None,
            tenants: None,
        })
    }

    /// Serves LoRA adapters from this registry.
    pub fn with_adapters(mut self, adapters: Arc<RouterAdapters>) -> Self {
        self.adapters = Some(adapters);
        self
    }

    /// Requires API keys and applies the tenants' rules.
    pub fn with_tenants(mut self, tenants: Arc<Tenants>) -> Self {
        self.tenants = Some(tenants);
        self
    }

    pub fn adapters(&self) -> Option<&Arc<RouterAdapters>> {
        self.adapters.as_ref()
    }

    pub fn tenants(&self) -> Option<&Arc<Tenants>> {
        self.tenants.as_ref()
    }

    pub fn model(&self) -> &Model<CpuBackend> {
        &self.model
    }

    /// The model, shared (adapter loaders hold it).
    pub fn model_arc(&self) -> Arc<Model<CpuBackend>> {
        self.model.clone()
    }

    pub fn codec(&self) -> &TextCodec {
        &self.codec
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Counts a request refused before it reached the engine (validation, tenant rules, adapter).
    pub fn record_rejection(&self, e: &RouterError) {
        EngineMetrics { registry: self.config.metrics.clone() }.rejected(e.code());
    }

    /// The metrics registry this engine reports to.
    pub fn metrics(&self) -> &moe_metrics::Registry {
        &self.config.metrics
    }

    /// Queues a validated request; its events arrive on the returned channel. A full queue is
    /// refused at once with RESOURCE_EXHAUSTED.
    /// Stops taking requests (UNAVAILABLE); running ones continue.
    pub fn begin_drain(&self) {
        self.stats.draining.store(true, Ordering::SeqCst);
    }

    /// Stops taking requests and fails every open one with UNAVAILABLE (the server is going
    /// away: clients should retry elsewhere).
    pub fn begin_shutdown(&self) {
        self.stats.draining.store(true, Ordering::SeqCst);
        self.stats.stopping.store(true, Ordering::SeqCst);
    }

    pub fn submit(&self, req: ValidatedRequest) -> Result<(u64, UnboundedReceiver<Event>), RouterError> {
        if self.stats.draining.load(Ordering::SeqCst) {
            return Err(RouterError::Unavailable("the router is shutting down; retry on another router".into()));
        }
        let pages_needed = (req.prompt.len() + req.max_new_tokens).div_ceil(self.config.page_size);
        let total = self.stats.total_pages.load(Ordering::Relaxed);
        if pages_needed > total {
            return Err(RouterError::ResourceExhausted(format!(
                "the request needs {pages_needed} KV-cache pages but the whole cache has {total}"
            )));
        }
        // Count before sending so that concurrent submitters cannot overshoot the bound.
        let waiting = self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_waiting {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(RouterError::ResourceExhausted(format!(
                "the request queue is full ({} waiting); retry later",
                self.max_waiting
            )));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as u64;
        let (events, rx) = unbounded_channel();
        match self.tx.try_send(Submission { id, req, events, submitted: Instant::now() }) {
            Ok(()) => Ok((id, rx)),
            Err(TrySendError::Full(_)) => {
                self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(RouterError::ResourceExhausted("the request queue is full; retry later".into()))
            }
            Err(TrySendError::Disconnected(_)) => {
                self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(RouterError::Unavailable("the engine has stopped".into()))
            }
        }
    }
}

struct Sequence {
    id: u64,
    req: ValidatedRequest,
    events: UnboundedSender<Event>,
    cache: SequenceCache,
    /// Prompt then generated tokens; `cache.len` of them are in the KV cache.
    tokens: Vec<u32>,
    generated: usize,
    sampler: Sampler,
    text: TextStream,
    submitted: Instant,
    last_token: Instant,
}

impl Sequence {
    fn tenant(&self) -> &str {
        self.req.tenant.as_deref().unwrap_or("")
    }
}

struct Worker {
    model: Arc<Model<CpuBackend>>,
    codec: Arc<TextCodec>,
    experts: Option<Arc<dyn ExpertExecutor<CpuBackend>>>,
    kv: KvCache<CpuBackend>,
    ws: moe_model::Workspace<CpuBackend>,
    /// The second half's workspace under two-batch overlap.
    ws_b: moe_model::Workspace<CpuBackend>,
    rx: Receiver<Submission>,
    waiting: VecDeque<Submission>,
    running: Vec<Sequence>,
    stats: Arc<EngineStats>,
    config: EngineConfig,
    metrics: EngineMetrics,
    logits: Vec<f32>,
    seen: Vec<bool>,
    /// Per-step buffers, kept to avoid allocating every step.
    chunk: Vec<usize>,
    members: Vec<usize>,
    done: Vec<usize>,
}

impl Worker {
    fn run(&mut self) {
        loop {
            let idle = self.running.is_empty() && self.waiting.is_empty();
            if idle {
                match self.rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(s) => self.waiting.push_back(s),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(s) = self.rx.try_recv() {
                self.waiting.push_back(s);
            }
            if self.stats.stopping.load(Ordering::SeqCst) {
                self.fail_all_for_shutdown();
            }
            self.reap();
            self.admit();
            self.publish();
            if !self.running.is_empty() {
                self.step();
                self.stats.steps.fetch_add(1, Ordering::Relaxed);
                self.publish();
            } else if !self.waiting.is_empty() {
                // Waiting for pages that only finishing requests can free: do not spin.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    fn publish(&self) {
        self.stats.free_pages.store(self.kv.pages.free_pages(), Ordering::SeqCst);
        self.stats.running.store(self.running.len(), Ordering::SeqCst);
        let total = self.kv.pages.num_pages();
        let waiting = self.stats.waiting.load(Ordering::Relaxed);
        self.metrics.state(waiting, self.running.len(), total - self.kv.pages.free_pages(), total);
    }

    /// Records a request's terminal state.
    fn ended(&self, outcome: &str, tenant: &str, prompt: usize, generated: usize, submitted: Instant) {
        self.metrics.ended(outcome, tenant, prompt, generated, submitted.elapsed());
    }

    /// Ends every waiting and running request with UNAVAILABLE, freeing its pages and pins.
    fn fail_all_for_shutdown(&mut self) {
        let err = RouterError::Unavailable("the router is shutting down; retry on another router".into());
        for mut w in self.waiting.drain(..) {
            w.req.adapter = None;
            self.metrics.ended("unavailable", w.tenant(), w.req.prompt.len(), 0, w.submitted.elapsed());
            let _ = w.events.send(Event::Failed(err.clone()));
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        for mut s in self.running.drain(..) {
            s.req.adapter = None;
            self.kv.pages.release(&mut s.cache);
            self.metrics.ended("unavailable", s.tenant(), s.req.prompt.len(), s.generated, s.submitted.elapsed());
            let _ = s.events.send(Event::Failed(err.clone()));
        }
    }

    /// Drops requests whose client went away and fails expired ones, freeing their pages.
    fn reap(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            let expired = now >= s.req.deadline;
            if s.events.is_closed() || expired {
                let mut s = self.running.swap_remove(i);
                if expired && !s.events.is_closed() {
                    s.req.adapter = None; // unpin before the terminal event: observers then see it released
                    let _ = s.events.send(Event::Failed(RouterError::DeadlineExceeded {
                        millis: s.req.timeout.as_millis() as u64,
                    }));
                }
                tracing::debug!(request = s.id, expired, "request left the batch");
                self.kv.pages.release(&mut s.cache);
                let outcome = if expired { "deadline_exceeded" } else { "cancelled" };
                self.ended(outcome, s.tenant(), s.req.prompt.len(), s.generated, s.submitted);
            } else {
                i += 1;
            }
        }
        let before = self.waiting.len();
        let metrics = self.metrics.clone();
        self.waiting.retain_mut(|w| {
            if w.events.is_closed() {
                metrics.ended("cancelled", w.tenant(), w.req.prompt.len(), 0, w.submitted.elapsed());
                return false;
            }
            if now >= w.req.deadline {
                w.req.adapter = None;
                metrics.ended("deadline_exceeded", w.tenant(), w.req.prompt.len(), 0, w.submitted.elapsed());
                let _ = w
                    .events
                    .send(Event::Failed(RouterError::DeadlineExceeded { millis: w.req.timeout.as_millis() as u64 }));
                return false;
            }
            true
        });
        self.stats.waiting.fetch_sub(before - self.waiting.len(), Ordering::SeqCst);
    }

    /// Moves waiting requests into the batch, in arrival order, while their whole KV need fits.
    fn admit(&mut self) {
        while self.running.len() < self.config.max_running {
            let Some(front) = self.waiting.front() else { break };
            let need = front.req.prompt.len() + front.req.max_new_tokens;
            let mut cache = SequenceCache::default();
            if self.kv.pages.reserve(&mut cache, need).is_err() {
                break;
            }
            let Some(sub) = self.waiting.pop_front() else { break };
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            let sampler = match Sampler::new(sub.req.sampling.clone()) {
                Ok(s) => s,
                Err(e) => {
                    self.metrics.ended(
                        "invalid_argument",
                        sub.tenant(),
                        sub.req.prompt.len(),
                        0,
                        sub.submitted.elapsed(),
                    );
                    let _ = sub.events.send(Event::Failed(RouterError::invalid("sampling", e.to_string())));
                    self.kv.pages.release(&mut cache);
                    continue;
                }
            };
            let text = TextStream::new(sub.req.stop.clone());
            let mut tokens = Vec::with_capacity(need);
            tokens.extend_from_slice(&sub.req.prompt);
            self.running.push(Sequence {
                id: sub.id,
                req: sub.req,
                events: sub.events,
                cache,
                tokens,
                generated: 0,
                sampler,
                text,
                submitted: sub.submitted,
                last_token: sub.submitted,
            });
        }
    }

    /// One forward step over decode tokens and prefill chunks.
    fn step(&mut self) {
        let (mut chunk, mut members, mut done) =
            (std::mem::take(&mut self.chunk), std::mem::take(&mut self.members), std::mem::take(&mut self.done));
        self.step_with(&mut chunk, &mut members, &mut done);
        (self.chunk, self.members, self.done) = (chunk, members, done);
    }

    fn step_with(&mut self, chunk: &mut Vec<usize>, members: &mut Vec<usize>, done: &mut Vec<usize>) {
        let mut budget = self.config.max_batch_tokens.max(1);
        // Decode tokens first (one each), so long prefills never stall running streams.
        chunk.clear();
        chunk.resize(self.running.len(), 0);
        for (i, s) in self.running.iter().enumerate() {
            if s.cache.len + 1 == s.tokens.len() && budget > 0 {
                chunk[i] = 1;
                budget -= 1;
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            let left = s.tokens.len() - s.cache.len;
            if chunk[i] == 0 && left > 0 && budget > 0 {
                let n = left.min(budget);
                chunk[i] = n;
                budget -= n;
            }
        }
        let mut batch: Vec<BatchItem<'_, CpuBackend>> = Vec::new();
        members.clear();
        for (i, s) in self.running.iter_mut().enumerate() {
            if chunk[i] > 0 {
                let start = s.cache.len;
                let adapter = s.req.adapter.as_deref();
                let item = BatchItem::new(&s.tokens[start..start + chunk[i]], &mut s.cache);
                batch.push(item.with_adapter(adapter).with_request(s.id));
                members.push(i);
            }
        }
        if batch.is_empty() {
            return;
        }
        let experts = self.experts.as_deref();
        let split = match experts {
            Some(e) if self.config.two_batch_overlap && batch.len() >= 2 && e.overlaps() => {
                moe_model::overlap_split(&batch)
            }
            _ => 0,
        };
        let result = match experts {
            Some(e) if split > 0 => self.model.forward_overlapped(
                &mut self.ws,
                &mut self.ws_b,
                &mut self.kv,
                &mut batch,
                split,
                LogitsFor::Last,
                &mut self.logits,
                e,
            ),
            _ => self.model.forward_with(
                &mut self.ws,
                &mut self.kv,
                &mut batch,
                LogitsFor::Last,
                &mut self.logits,
                experts,
            ),
        };
        drop(batch);
        self.metrics.expert_tokens(self.model.config.num_experts, self.ws.expert_tokens_mut());
        if let Err(e) = result {
            let err = RouterError::from(e);
            tracing::warn!(error = %err, "step failed; failing its requests");
            members.sort_unstable_by(|a, b| b.cmp(a));
            for &i in members.iter() {
                let mut s = self.running.swap_remove(i);
                s.req.adapter = None; // unpin before the terminal event: observers then see it released
                self.ended(outcome_label(err.code()), s.tenant(), s.req.prompt.len(), s.generated, s.submitted);
                let _ = s.events.send(Event::Failed(err.clone()));
                self.kv.pages.release(&mut s.cache);
            }
            return;
        }
        // Sequences with a row some expert could not serve fail alone; the rest go on.
        done.clear();
        let mut failed: Vec<(usize, String)> = Vec::new();
        if !self.ws.unserved_rows().is_empty() {
            let mut start = 0u32;
            for &i in members.iter() {
                let end = start + chunk[i] as u32;
                if let Some((_, why)) = self.ws.unserved_rows().iter().find(|(r, _)| (start..end).contains(r)) {
                    failed.push((i, why.clone()));
                }
                start = end;
            }
        }
        let vocab = self.model.config.vocab_size;
        for (row, &i) in members.iter().enumerate() {
            if let Some((_, why)) = failed.iter().find(|(f, _)| *f == i) {
                let s = &mut self.running[i];
                s.req.adapter = None;
                self.metrics.ended("unavailable", s.tenant(), s.req.prompt.len(), s.generated, s.submitted.elapsed());
                tracing::warn!(request = s.id, reason = %why, "request failed: experts unavailable");
                let _ = s.events.send(Event::Failed(RouterError::Unavailable(why.clone())));
                done.push(i);
                continue;
            }
            let s = &mut self.running[i];
            if s.cache.len < s.tokens.len() {
                continue; // prefill not finished: no token yet
            }
            let logits = &mut self.logits[row * vocab..(row + 1) * vocab];
            let logprob_of = |l: &[f32], t: u32| {
                let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = l.iter().map(|x| (x - max).exp()).sum::<f32>().ln() + max;
                l[t as usize] - lse
            };
            if s.req.repetition_penalty != 1.0 {
                apply_repetition_penalty(logits, &s.tokens, s.req.repetition_penalty, &mut self.seen);
            }
            let next = s.sampler.sample(logits);
            let lp = if s.req.logprobs { vec![logprob_of(logits, next)] } else { Vec::new() };
            s.tokens.push(next);
            s.generated += 1;
            let is_eos = s.req.stop_ids.contains(&next);
            let (text, stopped) = if is_eos { (String::new(), false) } else { s.text.push(&self.codec, next) };
            let finish = if is_eos || stopped {
                Some(FinishReason::Stop)
            } else if s.generated >= s.req.max_new_tokens || s.tokens.len() >= self.model.config.max_position_embeddings
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            let text = if finish.is_some() { text + &s.text.flush() } else { text };
            let now = Instant::now();
            if s.generated == 1 {
                self.metrics.first_token(now - s.submitted);
            } else {
                self.metrics.next_token(now - s.last_token);
            }
            s.last_token = now;
            let _ = s.events.send(Event::Delta { text, token_ids: vec![next], logprobs: lp });
            if let Some(reason) = finish {
                s.req.adapter = None; // unpin before the terminal event: observers then see it released
                self.metrics.ended("ok", s.tenant(), s.req.prompt.len(), s.generated, s.submitted.elapsed());
                let _ = s.events.send(Event::Finished {
                    reason,
                    prompt_tokens: s.req.prompt.len(),
                    completion_tokens: s.generated,
                });
                done.push(i);
            }
        }
        done.sort_unstable_by(|a, b| b.cmp(a));
        done.dedup();
        for &i in done.iter() {
            let mut s = self.running.swap_remove(i);
            self.kv.pages.release(&mut s.cache);
        }
    }
}

/// transformers' repetition penalty: logits of tokens already present are divided by the penalty
/// when positive and multiplied when negative (each token once).
fn apply_repetition_penalty(logits: &mut [f32], tokens: &[u32], penalty: f32, seen: &mut [bool]) {
    for &t in tokens {
        let t = t as usize;
        if t < logits.len() && !seen[t] {
            seen[t] = true;
            let l = &mut logits[t];
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
    for &t in tokens {
        if let Some(s) = seen.get_mut(t as usize) {
            *s = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::apply_repetition_penalty;

    #[test]
    fn repetition_penalty_as_transformers_once_per_token() {
        let mut logits = [2.0f32, -2.0, 1.0, 0.5];
        let mut seen = vec![false; 4];
        apply_repetition_penalty(&mut logits, &[0, 1, 0, 0], 2.0, &mut seen);
        assert_eq!(logits, [1.0, -4.0, 1.0, 0.5]);
        assert!(seen.iter().all(|s| !s), "scratch marks are cleared");
    }
}
