//! The engine: a non-generic handle ([`Engine`]) that the API side holds (submit, status,
//! adapters, tenants, health), and the compute loop behind it, generic over the backend, on a
//! thread of its own. The loop runs iteration-level continuous batching, in four parts:
//! `compute_loop.rs` (the thread, its state and its supervision), `schedule.rs` (reap, admit,
//! shutdown), `step.rs` (one forward over decode tokens and prefill chunks), `emit.rs`
//! (sampling, stop rules and the events a request receives). Every accepted request ends in
//! exactly one `Finished` or `Failed` event.

mod compute_loop;
mod emit;
mod fair;
mod schedule;
mod scheduling;
mod step;

use crate::engine_metrics::EngineMetrics;
use crate::error::RouterError;
use crate::expert_load::ExpertLoad;
use crate::request::{Event, ValidatedRequest};
use crate::tenants::Tenants;
use compute_loop::ComputeLoop;
use moe_compute::Backend;
use moe_generate::TextCodec;
use moe_lora::{load_adapter, AdapterCatalog, AdapterParts, AdapterRegistry, RegistryLimits};
use moe_model::{AdapterWeights, ExpertExecutor, Model, ModelConfig};
pub use scheduling::{Scheduling, SchedulingConfig};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
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
    /// Text prompts (and `Tokenize` texts) longer than this many bytes are refused before the
    /// tokenizer runs.
    pub max_prompt_bytes: usize,
    /// The longest one constrained request's mask may take in a step (`--max-constraint-ms`).
    pub max_constraint_time: Duration,
    /// Fault injection for the supervision tests: the compute loop panics after this many
    /// steps. Never set in production.
    pub panic_after_steps: Option<usize>,
    /// Automatic prefix caching: full KV pages are kept after their request and reused by later
    /// requests with the same tokens, adapter and scope (see `moe_model::prefix`).
    pub prefix_cache: bool,
    /// Who may share cached pages.
    pub prefix_cache_scope: PrefixCacheScope,
    /// Who is admitted next and who is preempted (`--scheduling`, fair by default).
    pub scheduling: SchedulingConfig,
}

/// Who may share prefix-cache pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrefixCacheScope {
    /// Requests of the same tenant (and adapter and salt): no tenant can learn from timing
    /// what another sent. Without tenants configured, every request is in one scope.
    #[default]
    Tenant,
    /// Requests on the same adapter (and salt), across tenants.
    Global,
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
            max_prompt_bytes: 1 << 20,
            max_constraint_time: Duration::from_millis(200),
            panic_after_steps: None,
            prefix_cache: true,
            prefix_cache_scope: PrefixCacheScope::Tenant,
            scheduling: SchedulingConfig::default(),
        }
    }
}

/// Counters the engine publishes after every step (for tests, health and metrics).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub total_pages: AtomicUsize,
    /// Pages a running request holds.
    pub referenced_pages: AtomicUsize,
    /// Pages kept by the prefix cache (held or evictable).
    pub cached_pages: AtomicUsize,
    pub free_pages: AtomicUsize,
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub steps: AtomicUsize,
    /// Where the steps' time went since start, nanoseconds: the whole steps, and of their
    /// forward passes the dense part, the experts and the LM head (the rest of a step is
    /// scheduling, sampling and bookkeeping). Two-batch-overlap steps count only as whole.
    pub step_ns: std::sync::atomic::AtomicU64,
    pub dense_ns: std::sync::atomic::AtomicU64,
    pub experts_ns: std::sync::atomic::AtomicU64,
    pub head_ns: std::sync::atomic::AtomicU64,
    /// The longest time the compute thread spent admitting one request (µs), since start: the
    /// stall any single request's admission can cause every running request.
    pub max_admission_us: std::sync::atomic::AtomicU64,
    /// Set when the server starts draining: new requests are refused with UNAVAILABLE, running
    /// ones go on.
    pub draining: AtomicBool,
    /// Set when the drain time is up: open requests fail with UNAVAILABLE, so clients see a
    /// status instead of a dropped connection.
    pub stopping: AtomicBool,
}

/// What happened to the compute loop: running, or failed (it panicked) with the reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum EngineHealth {
    #[default]
    Running,
    Failed(String),
}

/// A request on its way to the compute loop.
pub(crate) struct Submission {
    pub id: u64,
    pub req: ValidatedRequest,
    pub events: UnboundedSender<Event>,
    pub submitted: Instant,
}

impl Submission {
    pub fn tenant(&self) -> &str {
        self.req.tenant.as_deref().unwrap_or("")
    }
}

/// The adapters a router holds on backend `B`: attention and gate pairs (expert pairs live on
/// workers, unless the model runs its own experts).
pub type RouterAdapters<B> = AdapterRegistry<AdapterWeights<B>>;

/// A registry of router-side adapters for `model`, over the adapter dir `root`. With `experts`
/// the expert pairs are held too (a model that runs its own experts).
pub fn router_adapters<B: Backend>(
    model: Arc<Model<B>>,
    root: Option<std::path::PathBuf>,
    limits: RegistryLimits,
    experts: bool,
) -> RouterAdapters<B> {
    AdapterRegistry::new(root, limits, move |dir, identity| {
        let parts = if experts { AdapterParts::all() } else { AdapterParts::router() };
        let parts = parts.with_max_rank(limits.max_rank);
        load_adapter(dir, identity, &model.config, model.backend(), parts)
    })
}

/// What an engine runs on: the model (the dense part, or all of it), the tokenizer, where the
/// routed experts run (`None`: the model's own), and the adapter registry (`None`: no adapters).
pub struct EngineParts<B: Backend> {
    pub model: Arc<Model<B>>,
    pub codec: Arc<TextCodec>,
    pub experts: Option<Arc<dyn ExpertExecutor<B>>>,
    pub adapters: Option<Arc<RouterAdapters<B>>>,
}

/// The handle the API side holds: submits requests and reads the engine's counters. It does not
/// know the backend.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<Submission>,
    stats: Arc<EngineStats>,
    health: tokio::sync::watch::Receiver<EngineHealth>,
    next_id: Arc<AtomicUsize>,
    model_config: Arc<ModelConfig>,
    backend_name: String,
    codec: Arc<TextCodec>,
    config: EngineConfig,
    adapters: Option<Arc<dyn AdapterCatalog>>,
    tenants: Option<Arc<Tenants>>,
    adapter_sync: Option<Arc<dyn crate::adapter_sync::AdapterSync>>,
    /// True once [`Engine::begin_shutdown`] ran: open streams end with UNAVAILABLE at once,
    /// even while the compute thread is still inside a long step.
    shutdown: Arc<tokio::sync::watch::Sender<bool>>,
    /// The engine's families in `config.metrics` (rejections are counted from the async side).
    recorder: EngineMetrics,
    /// Routed tokens per adapter over the last minute (the compute loop records it).
    expert_load: ExpertLoad,
}

impl Engine {
    /// Starts the compute thread on the model's backend.
    pub fn start<B: Backend>(parts: EngineParts<B>, config: EngineConfig) -> Result<Self, RouterError> {
        let model = parts.model.clone();
        let codec = parts.codec.clone();
        let c = &model.config;
        let bpv = model.backend().kv_bytes_per_value();
        let page_bytes = bpv * c.kv_layers().max(1) * config.page_size * c.kv_values_per_token_layer();
        // A hybrid model's recurrent states come out of the same budget: three slots (read, write,
        // a prefix snapshot) per sequence that can run, at most half the budget.
        let state_bytes = c.linear.as_ref().map_or(0, |l| 4 * l.count() * l.shape.state_floats());
        let (sequences, kv_bytes) = match state_bytes {
            0 => (config.max_running, config.kv_cache_bytes),
            per => {
                let n = (config.kv_cache_bytes / 2 / (3 * per)).clamp(1, config.max_running);
                if n < config.max_running {
                    tracing::warn!(
                        sequences = n,
                        max_running = config.max_running,
                        state_mb = per >> 20,
                        "the KV budget holds recurrent states for fewer sequences than --max-running; raise --kv-cache-mb"
                    );
                }
                (n, config.kv_cache_bytes.saturating_sub(3 * n * per))
            }
        };
        let pages = (kv_bytes / page_bytes.max(1)).max(1);
        let kv =
            model.kv_cache_for(pages, config.page_size, sequences).map_err(|e| RouterError::Internal(e.to_string()))?;
        if model.backend().device() == moe_compute::Device::Cpu {
            let set = moe_compute::cpu::cpu_kernels();
            config
                .metrics
                .gauge_family::<[(&'static str, String); 2]>(
                    "moe_cpu_kernels",
                    "1 for the instruction set the CPU kernels use (--cpu-kernels) and the arithmetic they compute",
                )
                .get_or_create(&[("set", set.name().to_string()), ("numerics", moe_compute::cpu::NUMERICS.to_string())])
                .set(1);
        }
        let stats = Arc::new(EngineStats::default());
        stats.total_pages.store(pages, Ordering::Relaxed);
        stats.free_pages.store(pages, Ordering::Relaxed);
        let (tx, rx) = std::sync::mpsc::sync_channel(config.max_waiting.max(1));
        let (health_tx, health) = tokio::sync::watch::channel(EngineHealth::Running);
        let adapters: Option<Arc<dyn AdapterCatalog>> = parts.adapters.clone().map(|a| a as Arc<dyn AdapterCatalog>);
        let mut compute = ComputeLoop::new(parts, kv, rx, stats.clone(), config.clone());
        let expert_load = compute.expert_load.clone();
        // The compute loop runs on a worker of a thread pool of its own, as many threads as the
        // process's compute pool: its parallel kernels then split work with the loop's own
        // thread taking part (a join), instead of handing every kernel call to other threads
        // and sleeping until they finish (a wake-up per call, and one thread too many on the
        // cores while they run).
        let threads = rayon::current_num_threads();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("moe-compute-{i}"))
            .build()
            .map_err(|e| RouterError::Internal(format!("starting the engine's thread pool: {e}")))?;
        std::thread::Builder::new()
            .name("moe-engine".into())
            .spawn(move || pool.install(|| compute.supervise(health_tx)))
            .map_err(|e| RouterError::Internal(format!("starting the engine thread: {e}")))?;
        Ok(Self {
            tx,
            stats,
            health,
            next_id: Arc::new(AtomicUsize::new(1)),
            model_config: Arc::new(model.config.clone()),
            backend_name: model.backend_name(),
            codec,
            adapters,
            tenants: None,
            adapter_sync: None,
            shutdown: Arc::new(tokio::sync::watch::channel(false).0),
            recorder: EngineMetrics::new(&config.metrics),
            expert_load,
            config,
        })
    }

    /// Resolves once the server began shutting down ([`Self::begin_shutdown`]).
    pub fn shutting_down(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.subscribe();
        async move {
            let _ = rx.wait_for(|down| *down).await;
        }
    }

    /// Requires API keys and applies the tenants' rules.
    pub fn with_tenants(mut self, tenants: Arc<Tenants>) -> Self {
        self.tenants = Some(tenants);
        self
    }

    /// Reports `LoadAdapter`/`UnloadAdapter` to the other routers of the cluster.
    pub fn with_adapter_sync(mut self, sync: Arc<dyn crate::adapter_sync::AdapterSync>) -> Self {
        self.adapter_sync = Some(sync);
        self
    }

    pub fn adapter_sync(&self) -> Option<&Arc<dyn crate::adapter_sync::AdapterSync>> {
        self.adapter_sync.as_ref()
    }

    /// The adapter registry, when this engine serves adapters.
    pub fn adapters(&self) -> Option<&Arc<dyn AdapterCatalog>> {
        self.adapters.as_ref()
    }

    pub fn tenants(&self) -> Option<&Arc<Tenants>> {
        self.tenants.as_ref()
    }

    pub fn model_config(&self) -> &ModelConfig {
        &self.model_config
    }

    /// The model's configuration, shared (for work moved off the async runtime).
    pub fn model_config_arc(&self) -> Arc<ModelConfig> {
        self.model_config.clone()
    }

    /// The compute backend's name, for logs.
    pub fn backend_name(&self) -> &str {
        &self.backend_name
    }

    pub fn codec(&self) -> &TextCodec {
        &self.codec
    }

    /// The tokenizer, shared (for work moved off the async runtime).
    pub fn codec_arc(&self) -> Arc<TextCodec> {
        self.codec.clone()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Running, or failed with the reason (the compute loop panicked).
    pub fn health(&self) -> EngineHealth {
        self.health.borrow().clone()
    }

    /// Follows the engine's health (for the health service and the process's exit).
    pub fn watch_health(&self) -> tokio::sync::watch::Receiver<EngineHealth> {
        self.health.clone()
    }

    /// Counts a request refused before it reached the engine (validation, tenant rules, adapter).
    /// A request refused because its tenant's token budget was spent.
    pub fn record_budget_refusal(&self, tenant: &str) {
        self.recorder.budget_refused(tenant);
    }

    pub fn record_rejection(&self, e: &RouterError) {
        self.recorder.rejected(e.code());
    }

    /// The metrics registry this engine reports to.
    /// Routed tokens per adapter over a sliding window: what expert placement reads.
    pub fn expert_load(&self) -> &ExpertLoad {
        &self.expert_load
    }

    pub fn metrics(&self) -> &moe_metrics::Registry {
        &self.config.metrics
    }

    /// Stops taking requests (UNAVAILABLE); running ones continue.
    pub fn begin_drain(&self) {
        self.stats.draining.store(true, Ordering::SeqCst);
    }

    /// Stops taking requests and fails every open one with UNAVAILABLE (the server is going
    /// away: clients should retry elsewhere).
    pub fn begin_shutdown(&self) {
        self.stats.draining.store(true, Ordering::SeqCst);
        self.stats.stopping.store(true, Ordering::SeqCst);
        self.shutdown.send_replace(true);
    }

    /// Queues a validated request; its events arrive on the returned channel. A full queue is
    /// refused at once with RESOURCE_EXHAUSTED, a draining or failed engine with UNAVAILABLE.
    pub fn submit(&self, req: ValidatedRequest) -> Result<(u64, UnboundedReceiver<Event>), RouterError> {
        if let EngineHealth::Failed(why) = self.health() {
            return Err(RouterError::Unavailable(format!("the engine has failed ({why}); retry on another router")));
        }
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
        if waiting >= self.config.max_waiting {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(RouterError::ResourceExhausted(format!(
                "the request queue is full ({} waiting); retry later",
                self.config.max_waiting
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

/// The health a failed engine reports, kept for the process's lifetime (read by the servers).
pub(crate) type HealthSender = tokio::sync::watch::Sender<EngineHealth>;
