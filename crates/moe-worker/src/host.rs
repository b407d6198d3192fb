//! The hosted experts and their computation: given rows of one layer and each row's
//! (expert, weight) pairs, run each expert once over all its rows (grouped) and return one row
//! per pair, `weight · expert(row)`, for the router to add in its fixed order (a worker never
//! sums a row's experts: the sum's order would then depend on placement). Shared by the gRPC service and the in-process dispatcher, so the
//! two give identical results. Rows may carry a LoRA adapter (by identity); the worker loads the
//! pairs of its hosted experts from its own adapter dir, keeps them in a bounded registry, and
//! refuses a version whose digest differs from the router's. Which experts are hosted can
//! change at run time (`crate::live`): the layers sit behind a lock that a computation holds
//! for reading.

use crate::error::{Result, WorkerError};
use crate::spec::ExpertSpec;
use moe_compute::{Backend, Device, ExpertPlan, FfnScratch, SwigluWeights};
use moe_lora::{load_adapter, AdapterParts, AdapterRegistry, RegistryLimits};
use moe_model::checkpoint::Checkpoint;
use moe_model::weights::load_expert;
use moe_model::{AdapterIdentity, AdapterWeights, ModelConfig};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::Instant;
use tokio::sync::watch;

/// Scratch buffers of a call needing more than this are dropped after it instead of pooled.
const POOLED_SCRATCH_MAX_BYTES: usize = 256 << 20;

/// An adapter of a request that this worker could not load: rows carrying it were not computed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterFailure {
    /// 1-based index into the request's adapters.
    pub slot: u32,
    pub message: String,
}

/// The expert pairs of the adapters this worker has loaded.
pub type WorkerAdapters<B> = AdapterRegistry<AdapterWeights<B>>;

/// One layer's hosted experts, in local order, and the map from expert id to local index.
pub(crate) struct HostedLayer<B: Backend> {
    pub(crate) ids: Vec<u32>,
    pub(crate) local: HashMap<u32, usize>,
    pub(crate) weights: Vec<SwigluWeights<B>>,
    /// Experts being unloaded (still computed, no longer advertised), each with when a request
    /// last named it (milliseconds since the host's epoch).
    pub(crate) draining: HashMap<u32, AtomicU64>,
}

impl<B: Backend> HostedLayer<B> {
    pub(crate) fn empty() -> Self {
        Self { ids: vec![], local: HashMap::new(), weights: vec![], draining: HashMap::new() }
    }

    pub(crate) fn push(&mut self, expert: u32, w: SwigluWeights<B>) {
        self.local.insert(expert, self.ids.len());
        self.ids.push(expert);
        self.weights.push(w);
    }
}

/// (layer, expert ids) per layer with hosted experts, as published.
pub type HostedList = Vec<(usize, Vec<u32>)>;

/// Buffers of one computation, pooled so that steady-state serving does not allocate.
struct Scratch<B: Backend> {
    ffn: FfnScratch<B>,
    plan: ExpertPlan,
    /// The input row of each pair, and the rows repeated once per pair.
    pair_row: Vec<u32>,
    pair_x: Vec<f32>,
    x: B::Act,
    out: B::Act,
}

/// One request's inputs, already decoded from the wire.
pub struct ComputeInput<'a> {
    pub layer: usize,
    pub hidden_size: usize,
    /// `rows x hidden_size` values.
    pub rows: &'a [f32],
    /// Pairs per row; its length is the number of rows.
    pub row_pairs: &'a [u32],
    pub experts: &'a [u32],
    pub weights: &'a [f32],
    /// Adapters some rows use; `row_adapters[r]` is 0 (none) or an index + 1 into this.
    pub adapters: &'a [AdapterIdentity],
    /// Empty, or one entry per row.
    pub row_adapters: &'a [u32],
}

impl<'a> ComputeInput<'a> {
    /// Rows on the base experts only.
    pub fn base(
        layer: usize,
        hidden_size: usize,
        rows: &'a [f32],
        row_pairs: &'a [u32],
        experts: &'a [u32],
        weights: &'a [f32],
    ) -> Self {
        Self { layer, hidden_size, rows, row_pairs, experts, weights, adapters: &[], row_adapters: &[] }
    }
}

/// What the worker service and the in-process transport need of a host, whatever its device:
/// the non-generic handle of an [`ExpertHost`].
pub trait ExpertCompute: Send + Sync {
    fn config(&self) -> &ModelConfig;
    fn fingerprint(&self) -> &str;
    /// The device the experts compute on (published in `Describe` and the etcd record).
    fn device(&self) -> Device;
    /// The arithmetic the experts are computed with ([`moe_compute::Backend::numerics`]).
    fn numerics(&self) -> String {
        String::new()
    }
    /// (layer, expert ids) for every layer with hosted experts, not counting those draining.
    fn hosted(&self) -> Vec<(usize, Vec<u32>)>;
    /// The experts being drained by an unload.
    fn draining(&self) -> HostedList;
    /// Changes of [`Self::hosted`] (the worker's membership record follows them).
    fn watch_hosted(&self) -> watch::Receiver<HostedList>;
    /// Weight bytes of one expert, and the expert budget (`None`: unlimited).
    fn expert_memory(&self) -> (usize, Option<usize>);
    /// Loads experts, all or none, within the expert budget; returns how many were added.
    /// Blocks while the weights load: call it from a blocking context.
    fn load_experts(&self, experts: &[(usize, u32)]) -> Result<usize>;
    /// Unloads experts make-before-break (see [`crate::live`]); returns how many and the
    /// drain's duration. Blocks for the drain.
    fn unload_experts(&self, experts: &[(usize, u32)]) -> Result<(usize, std::time::Duration)>;
    /// Refuses a request over the batch memory budget, naming both sizes.
    fn check_budget(&self, rows: usize, pairs: usize) -> Result<()>;
    /// The working memory a request of `rows` rows and `pairs` pairs needs, and the batch
    /// budget (`None`: unlimited), which also bounds all requests in flight together.
    fn batch_memory(&self, rows: usize, pairs: usize) -> (usize, Option<usize>) {
        let _ = (rows, pairs);
        (0, None)
    }
    /// Computes one row per (row, expert) pair into `out` (`pairs x hidden_size`, in the
    /// request's pair order). Pairs of rows whose adapter could not be loaded are left zero and
    /// their adapters returned: the caller must fail those rows.
    /// Runs on the calling thread and the compute pool; call it from a blocking context.
    fn compute(&self, input: &ComputeInput<'_>, out: &mut Vec<f32>) -> Result<Vec<AdapterFailure>>;
}

/// The experts one worker hosts, on backend `B`.
pub struct ExpertHost<B: Backend> {
    pub(crate) config: ModelConfig,
    pub(crate) backend: B,
    /// The model directory, read again when experts are loaded at run time.
    pub(crate) dir: PathBuf,
    pub(crate) layers: RwLock<Vec<Option<HostedLayer<B>>>>,
    fingerprint: String,
    scratch: Mutex<Vec<Scratch<B>>>,
    pub(crate) adapters: Option<WorkerAdapters<B>>,
    /// The (layer, expert) pairs whose adapter pairs the registry loads: all hosted ones.
    pub(crate) adapter_experts: Arc<RwLock<HashSet<(usize, usize)>>>,
    /// Working memory one request may need at most (`--max-batch-mb`); larger ones are refused
    /// with RESOURCE_EXHAUSTED before anything is allocated.
    max_batch_bytes: Option<usize>,
    /// Expert weight memory at most (`--max-expert-mb`).
    pub(crate) max_expert_bytes: Option<usize>,
    pub(crate) bytes_per_expert: AtomicUsize,
    pub(crate) hosted_tx: watch::Sender<HostedList>,
    /// One load or unload at a time.
    pub(crate) changes: Mutex<()>,
    pub(crate) drain: DrainLimits,
    pub(crate) epoch: Instant,
}

impl<B: Backend> ExpertHost<B> {
    /// Loads the experts `spec` selects from the model directory onto `backend`, and nothing else.
    pub fn load(dir: &Path, spec: &ExpertSpec, backend: B) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let moe_layers: Vec<usize> = (0..config.num_layers).filter(|&l| config.is_moe_layer(l)).collect();
        let chosen = spec.resolve(&moe_layers, config.num_layers, config.num_experts)?;
        let mut layers: Vec<Option<HostedLayer<B>>> = (0..config.num_layers).map(|_| None).collect();
        let mut bytes_per_expert = 0;
        for &(layer, expert) in &chosen {
            let w = load_expert(&ckpt, &config, &backend, layer, expert)?;
            bytes_per_expert = backend.matrix_bytes(&w.gate_up) + backend.matrix_bytes(&w.down);
            layers[layer].get_or_insert_with(HostedLayer::empty).push(expert as u32, w);
        }
        let hosted = hosted_of(&layers);
        Ok(Self {
            fingerprint: config.fingerprint(),
            config,
            backend,
            dir: dir.to_path_buf(),
            layers: RwLock::new(layers),
            scratch: Mutex::new(Vec::new()),
            adapters: None,
            adapter_experts: Arc::new(RwLock::new(chosen.into_iter().collect())),
            max_batch_bytes: None,
            max_expert_bytes: None,
            bytes_per_expert: AtomicUsize::new(bytes_per_expert),
            hosted_tx: watch::channel(hosted).0,
            changes: Mutex::new(()),
            drain: DrainLimits::default(),
            epoch: Instant::now(),
        })
    }

    pub(crate) fn read_layers(&self) -> RwLockReadGuard<'_, Vec<Option<HostedLayer<B>>>> {
        // Writers replace whole entries, so a poisoned lock still holds consistent layers.
        self.layers.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves LoRA adapters from `root` (each subdirectory an adapter), holding only the pairs
    /// of the hosted experts, within `limits`.
    pub fn with_adapter_dir(mut self, root: PathBuf, limits: RegistryLimits) -> Self {
        let config = self.config.clone();
        let hosted = self.adapter_experts.clone();
        let backend = self.backend.clone();
        self.adapters = Some(AdapterRegistry::new(Some(root), limits, move |dir, identity| {
            let hosted = hosted.read().map(|h| h.clone()).unwrap_or_else(|p| p.into_inner().clone());
            let parts = AdapterParts {
                dense: false,
                experts: &move |l, e| hosted.contains(&(l, e)),
                max_rank: limits.max_rank,
            };
            load_adapter(dir, identity, &config, &backend, parts)
        }));
        self
    }

    /// Refuses requests whose working memory would exceed `bytes`, instead of allocating it.
    pub fn with_batch_budget(mut self, bytes: Option<usize>) -> Self {
        self.max_batch_bytes = bytes;
        self
    }

    /// The working memory a request needs: its rows, and per (row, expert) pair the row (on the
    /// host and the device), the gathered row, the fused gate/up and hidden activations, the
    /// expert's output and the answer row.
    pub fn batch_bytes(&self, rows: usize, pairs: usize) -> usize {
        let (h, i) = (self.config.hidden_size, self.config.expert_intermediate_size);
        4 * (rows * h + pairs * (5 * h + 3 * i))
    }

    /// The adapter registry, when this worker serves adapters.
    pub fn adapters(&self) -> Option<&WorkerAdapters<B>> {
        self.adapters.as_ref()
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// (layer, expert ids) for every layer with hosted experts, not counting those draining.
    pub fn hosted(&self) -> Vec<(usize, Vec<u32>)> {
        hosted_of(&self.read_layers())
    }

    /// Whether this worker computes `expert` of `layer` (draining ones included).
    pub fn hosts(&self, layer: usize, expert: u32) -> bool {
        self.read_layers().get(layer).and_then(|l| l.as_ref()).is_some_and(|l| l.local.contains_key(&expert))
    }

    pub(crate) fn validate<'g>(
        &self,
        layers: &'g [Option<HostedLayer<B>>],
        input: &ComputeInput<'_>,
    ) -> Result<&'g HostedLayer<B>> {
        let c = &self.config;
        if input.layer >= c.num_layers || !c.is_moe_layer(input.layer) {
            return Err(WorkerError::UnknownLayer { layer: input.layer, num_layers: c.num_layers });
        }
        if input.hidden_size != c.hidden_size {
            return Err(WorkerError::InvalidRequest(format!(
                "hidden_size is {}, but the model's is {}",
                input.hidden_size, c.hidden_size
            )));
        }
        let rows = input.row_pairs.len();
        if input.rows.len() != rows * c.hidden_size {
            return Err(WorkerError::InvalidRequest(format!(
                "{} row values for {rows} rows of hidden size {}",
                input.rows.len(),
                c.hidden_size
            )));
        }
        let pairs: u64 = input.row_pairs.iter().map(|&p| p as u64).sum();
        if pairs != input.experts.len() as u64 || pairs != input.weights.len() as u64 {
            return Err(WorkerError::InvalidRequest(format!(
                "row_pairs add up to {pairs}, but there are {} experts and {} weights",
                input.experts.len(),
                input.weights.len()
            )));
        }
        // Sizes are bounded by the model, so one message cannot make this worker allocate
        // without limit: at most top_k distinct experts per row.
        let mut start = 0usize;
        for (r, &n) in input.row_pairs.iter().enumerate() {
            let n = n as usize;
            if n > c.top_k {
                return Err(WorkerError::InvalidRequest(format!(
                    "row {r} has {n} (expert, weight) pairs; the model routes a token to at most {}",
                    c.top_k
                )));
            }
            let row = &input.experts[start..start + n];
            if let Some((i, e)) = row.iter().enumerate().find(|(i, e)| row[..*i].contains(e)) {
                return Err(WorkerError::InvalidRequest(format!("row {r} names expert {e} twice (pair {i})")));
            }
            start += n;
        }
        if !input.row_adapters.is_empty() && input.row_adapters.len() != rows {
            return Err(WorkerError::InvalidRequest(format!(
                "row_adapters has {} entries for {rows} rows",
                input.row_adapters.len()
            )));
        }
        if let Some(a) = input.row_adapters.iter().find(|&&a| a as usize > input.adapters.len()) {
            return Err(WorkerError::InvalidRequest(format!(
                "row_adapters names adapter {a}, but only {} are listed",
                input.adapters.len()
            )));
        }
        if let Some(w) = input.weights.iter().find(|w| !w.is_finite()) {
            return Err(WorkerError::InvalidRequest(format!("combine weight {w} is not finite")));
        }
        let hosted = layers[input.layer].as_ref();
        for &e in input.experts {
            if !hosted.is_some_and(|l| l.local.contains_key(&e)) {
                return Err(WorkerError::NotHosted { layer: input.layer, expert: e });
            }
        }
        if let Some(l) = hosted.filter(|l| !l.draining.is_empty()) {
            // A router that has not seen the unload yet still sends these: note when, so the
            // drain waits for it to stop.
            let now = self.epoch.elapsed().as_millis() as u64;
            for e in input.experts {
                if let Some(t) = l.draining.get(e) {
                    t.store(now, Ordering::Relaxed);
                }
            }
        }
        hosted.ok_or(WorkerError::UnknownLayer { layer: input.layer, num_layers: c.num_layers })
    }
}

impl<B: Backend> ExpertCompute for ExpertHost<B> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn device(&self) -> Device {
        self.backend.device()
    }

    fn numerics(&self) -> String {
        self.backend.numerics()
    }

    fn hosted(&self) -> Vec<(usize, Vec<u32>)> {
        ExpertHost::hosted(self)
    }

    fn draining(&self) -> HostedList {
        let layers = self.read_layers();
        let listed = layers.iter().enumerate().filter_map(|(i, l)| {
            let mut d: Vec<u32> = l.as_ref()?.draining.keys().copied().collect();
            d.sort_unstable();
            (!d.is_empty()).then_some((i, d))
        });
        listed.collect()
    }

    fn watch_hosted(&self) -> watch::Receiver<HostedList> {
        self.hosted_tx.subscribe()
    }

    fn expert_memory(&self) -> (usize, Option<usize>) {
        (self.bytes_per_expert.load(Ordering::Relaxed), self.max_expert_bytes)
    }

    fn load_experts(&self, experts: &[(usize, u32)]) -> Result<usize> {
        ExpertHost::load_experts(self, experts)
    }

    fn unload_experts(&self, experts: &[(usize, u32)]) -> Result<(usize, std::time::Duration)> {
        ExpertHost::unload_experts(self, experts)
    }

    fn batch_memory(&self, rows: usize, pairs: usize) -> (usize, Option<usize>) {
        (self.batch_bytes(rows, pairs), self.max_batch_bytes)
    }

    fn check_budget(&self, rows: usize, pairs: usize) -> Result<()> {
        let need = self.batch_bytes(rows, pairs);
        match self.max_batch_bytes {
            Some(max) if need > max => Err(WorkerError::ResourceExhausted(format!(
                "a batch of {rows} rows and {pairs} expert pairs needs {:.1} MiB of working memory; this worker allows {:.1} MiB (--max-batch-mb)",
                need as f64 / (1 << 20) as f64,
                max as f64 / (1 << 20) as f64
            ))),
            _ => Ok(()),
        }
    }

    fn compute(&self, input: &ComputeInput<'_>, out: &mut Vec<f32>) -> Result<Vec<AdapterFailure>> {
        let (layers, adapters, failed) = self.resolve_then_lock(input)?;
        let layer = self.validate(&layers, input)?;
        let h = self.config.hidden_size;
        let pairs = input.experts.len();
        let need = pairs * h;
        out.try_reserve(need.saturating_sub(out.len())).map_err(|_| {
            WorkerError::ResourceExhausted(format!("cannot allocate {} bytes for the output rows", 4 * need))
        })?;
        let mut s = self.scratch.lock().ok().and_then(|mut p| p.pop()).unwrap_or_else(|| Scratch {
            ffn: FfnScratch::new(&self.backend),
            plan: ExpertPlan::default(),
            pair_row: Vec::new(),
            pair_x: Vec::new(),
            x: self.backend.act(),
            out: self.backend.act(),
        });
        // One input row per pair, so that each answer row is one expert's alone.
        s.pair_row.clear();
        for (r, &n) in input.row_pairs.iter().enumerate() {
            s.pair_row.extend(std::iter::repeat_n(r as u32, n as usize));
        }
        s.pair_x.clear();
        for &r in &s.pair_row {
            s.pair_x.extend_from_slice(&input.rows[r as usize * h..(r as usize + 1) * h]);
        }
        let entries = input.experts.iter().zip(input.weights).enumerate();
        let entries = entries.map(|(p, (e, w))| (p as u32, layer.local[e] as u32, *w));
        s.plan.rebuild_from(layer.ids.len(), entries);
        let Scratch { ffn, plan, pair_row, pair_x, x, out: dev_out } = &mut s;
        self.backend.upload(pairs, h, pair_x, x);
        self.backend.zeros(pairs, h, dev_out);
        if adapters.is_empty() {
            self.backend.expert_ffn(x, &layer.weights, plan, ffn, dev_out);
        } else {
            let (layer_idx, ids, pair_row) = (input.layer, &layer.ids, &*pair_row);
            let lookup = |p: usize, local: usize| {
                let slot = *input.row_adapters.get(*pair_row.get(p)? as usize)? as usize;
                adapters.get(slot.checked_sub(1)?)?.as_ref()?.expert(layer_idx, *ids.get(local)? as usize)
            };
            self.backend.expert_ffn_lora(x, &layer.weights, plan, &lookup, ffn, dev_out);
        }
        self.backend.download(dev_out, out);
        if !failed.is_empty() {
            for (p, &r) in s.pair_row.iter().enumerate() {
                let slot = input.row_adapters.get(r as usize).copied().unwrap_or(0);
                if failed.iter().any(|f| f.slot == slot) {
                    out[p * h..(p + 1) * h].fill(0.0);
                }
            }
        }
        // Buffers grown by an unusually large call are freed, not pooled.
        if self.batch_bytes(input.row_pairs.len(), pairs) <= POOLED_SCRATCH_MAX_BYTES {
            if let Ok(mut pool) = self.scratch.lock() {
                pool.push(s);
            }
        }
        Ok(failed)
    }
}

/// The advertised experts of `layers`: each layer's ids in local order, without those draining.
pub(crate) fn hosted_of<B: Backend>(layers: &[Option<HostedLayer<B>>]) -> HostedList {
    let listed = layers.iter().enumerate().filter_map(|(i, l)| {
        let l = l.as_ref()?;
        let ids: Vec<u32> = l.ids.iter().copied().filter(|e| !l.draining.contains_key(e)).collect();
        (!ids.is_empty()).then_some((i, ids))
    });
    listed.collect()
}
/// How long an unload waits for routers to stop sending.
#[derive(Clone, Copy, Debug)]
pub struct DrainLimits {
    /// No request named the experts for this long: drop them.
    pub quiet: std::time::Duration,
    /// Drop them after this long whatever happens.
    pub max: std::time::Duration,
}

impl Default for DrainLimits {
    fn default() -> Self {
        Self { quiet: std::time::Duration::from_secs(2), max: std::time::Duration::from_secs(30) }
    }
}
