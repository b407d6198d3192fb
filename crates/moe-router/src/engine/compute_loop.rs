//! The compute loop's thread: the state it owns (model workspace, paged KV cache, waiting and
//! running requests), the loop itself, and its supervision. A panic anywhere in a step must not
//! leave a zombie that reports SERVING: the loop catches it, publishes the failure (health goes
//! NOT_SERVING, new requests get UNAVAILABLE), ends every open request with INTERNAL naming the
//! failure, logs it once, and stops; the process then exits non-zero so that it is restarted.

use super::{EngineConfig, EngineHealth, EngineParts, EngineStats, HealthSender, RouterAdapters, Submission};
use crate::detokenize::DetokenizeStream;
use crate::engine_metrics::EngineMetrics;
use crate::error::RouterError;
use crate::expert_load::ExpertLoad;
use crate::request::{Event, ValidatedRequest};
use moe_compute::Backend;
use moe_generate::{Sampler, TextCodec};
use moe_model::{AdapterWeights, ExpertExecutor, KvCache, Model, SequenceCache, Workspace};
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// A request in the running batch.
pub(super) struct Sequence<B: Backend> {
    pub id: u64,
    pub req: ValidatedRequest,
    /// The adapter's weights, pinned while the request runs (dropped before its terminal event).
    pub adapter: Option<Arc<AdapterWeights<B>>>,
    pub events: UnboundedSender<Event>,
    pub cache: SequenceCache,
    /// Prompt then generated tokens; `cache.len` of them are in the KV cache.
    pub tokens: Vec<u32>,
    pub generated: usize,
    pub sampler: Sampler,
    pub text: DetokenizeStream,
    pub submitted: Instant,
    pub last_token: Instant,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
    /// The prefix cache's namespace of this request (None: the cache is off).
    pub prefix_namespace: Option<u128>,
    /// Whose expert load this request's tokens count as ([`ExpertLoad::key_for`] its adapter).
    pub load_key: u32,
    /// Set when a step wrote this sequence's KV without all of its rows' experts (a row some
    /// worker could not serve): its pages hold wrong keys and values from that layer on, so they
    /// are never published to the prefix cache.
    pub kv_incomplete: bool,
    /// Whose service this counts as under fair scheduling (its tenant, or its adapter).
    pub client: String,
    /// How often it was preempted.
    pub preemptions: u32,
    /// Tokens before this position are being recomputed after a preemption (not charged).
    pub recompute_until: usize,
    /// Its tenant's `moe_scheduled_tokens_total` series: prefill, decode.
    pub scheduled: (moe_metrics::Counter, moe_metrics::Counter),
    /// When it (last) entered the batch, and when it was last preempted.
    pub admitted: Instant,
    pub paused_at: Instant,
}

impl<B: Backend> Sequence<B> {
    pub fn tenant(&self) -> &str {
        self.req.tenant.as_deref().unwrap_or("")
    }

    /// Unpins the adapter (before the terminal event: observers then see it released) and sends
    /// the event.
    pub fn end(&mut self, event: Event) {
        self.adapter = None;
        self.req.adapter = None;
        let _ = self.events.send(event);
    }
}

/// The generic part of the engine: everything that touches the backend.
pub(super) struct ComputeLoop<B: Backend> {
    pub model: Arc<Model<B>>,
    pub codec: Arc<TextCodec>,
    pub experts: Option<Arc<dyn ExpertExecutor<B>>>,
    pub adapters: Option<Arc<RouterAdapters<B>>>,
    pub kv: KvCache<B>,
    pub ws: Workspace<B>,
    /// The second half's workspace under two-batch overlap.
    pub ws_b: Workspace<B>,
    pub rx: Receiver<Submission>,
    pub waiting: VecDeque<Submission>,
    pub running: Vec<Sequence<B>>,
    /// Preempted sequences waiting to be resumed (stream open, pages released).
    pub paused: Vec<Sequence<B>>,
    /// The clients' virtual service counters (fair scheduling).
    pub fair: super::scheduling::FairShare,
    pub stats: Arc<EngineStats>,
    pub config: EngineConfig,
    pub metrics: EngineMetrics,
    /// Routed tokens per adapter over a sliding window (shared with the API side).
    pub expert_load: ExpertLoad,
    pub logits: Vec<f32>,
    pub seen: Vec<bool>,
    /// Per-step buffers, kept to avoid allocating every step.
    pub chunk: Vec<usize>,
    pub members: Vec<usize>,
    pub done: Vec<usize>,
}

impl<B: Backend> ComputeLoop<B> {
    pub fn new(
        parts: EngineParts<B>,
        kv: KvCache<B>,
        rx: Receiver<Submission>,
        stats: Arc<EngineStats>,
        config: EngineConfig,
    ) -> Self {
        let vocab = parts.model.config.vocab_size;
        let expert_load = ExpertLoad::new(parts.model.config.num_layers, parts.model.config.num_experts);
        Self {
            ws: parts.model.workspace(),
            ws_b: parts.model.workspace(),
            model: parts.model,
            codec: parts.codec,
            experts: parts.experts,
            adapters: parts.adapters,
            kv,
            rx,
            waiting: VecDeque::new(),
            running: Vec::new(),
            paused: Vec::new(),
            fair: Default::default(),
            stats,
            metrics: EngineMetrics::new(&config.metrics),
            expert_load,
            config,
            logits: Vec::new(),
            seen: vec![false; vocab],
            chunk: Vec::new(),
            members: Vec::new(),
            done: Vec::new(),
        }
    }

    /// Runs the loop until the handle side is gone; on a panic, fails everything (module doc).
    pub fn supervise(&mut self, health: HealthSender) {
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.run()));
        let Err(payload) = outcome else { return };
        let why = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        tracing::error!(reason = %why, "the engine's compute loop panicked; failing every open request and stopping");
        health.send_replace(EngineHealth::Failed(why.clone()));
        let err = RouterError::Internal(format!("the engine failed: {why}"));
        self.fail_all(&err, "internal");
        // Requests submitted before the handle saw the failure.
        while let Ok(s) = self.rx.try_recv() {
            self.waiting.push_back(s);
        }
        self.fail_all(
            &RouterError::Unavailable(format!("the engine has failed ({why}); retry on another router")),
            "unavailable",
        );
    }

    fn run(&mut self) {
        loop {
            let idle = self.running.is_empty() && self.waiting.is_empty() && self.paused.is_empty();
            if idle {
                match self.rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(s) => self.enqueue(s),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(s) = self.rx.try_recv() {
                self.enqueue(s);
            }
            if self.stats.stopping.load(Ordering::SeqCst) {
                let err = RouterError::Unavailable("the router is shutting down; retry on another router".into());
                self.fail_all(&err, "unavailable");
            }
            self.reap();
            self.admit();
            self.publish();
            if !self.running.is_empty() {
                let steps = self.stats.steps.load(Ordering::Relaxed);
                if self.config.panic_after_steps.is_some_and(|n| steps >= n) {
                    panic!("injected fault after {steps} steps (--fault-panic-after-steps)");
                }
                self.step();
                self.stats.steps.fetch_add(1, Ordering::Relaxed);
                self.publish();
            } else if !self.waiting.is_empty() || !self.paused.is_empty() {
                // Waiting for pages that only finishing requests can free: do not spin.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    pub fn publish(&self) {
        self.stats.free_pages.store(self.kv.pages.free_pages(), Ordering::SeqCst);
        self.stats.referenced_pages.store(self.kv.pages.referenced_pages(), Ordering::SeqCst);
        self.stats.cached_pages.store(self.kv.pages.cached_pages(), Ordering::SeqCst);
        if self.config.prefix_cache {
            let p = &self.kv.pages;
            self.metrics.prefix_pages(p.cached_pages(), p.evictable_pages(), p.evicted_pages());
        }
        self.stats.running.store(self.running.len(), Ordering::SeqCst);
        let total = self.kv.pages.num_pages();
        let waiting = self.stats.waiting.load(Ordering::Relaxed);
        self.metrics.state(waiting, self.running.len(), total - self.kv.pages.free_pages(), total);
    }
}
