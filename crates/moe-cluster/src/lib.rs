//! `moe-cluster` assembles the pieces into something that serves: the **embedded cluster** (a
//! router and N in-process workers, each hosting `shard:i/N` of the experts; no sockets between
//! them) and a **router over remote workers** (connect, check each worker's model fingerprint,
//! build the placement, refuse to start while any expert has no holder). Both produce an
//! [`moe_router::Engine`] driven through the same [`moe_dispatch::Dispatcher`].

use moe_compute::cpu::CpuBackend;
use moe_dispatch::{Dispatcher, GrpcTransport, GrpcTransportConfig, InProcessTransport, Placement};
use moe_generate::TextCodec;
use moe_lora::RegistryLimits;
use moe_model::{ExpertExecutor, Model};
use moe_proto::v1::DescribeResponse;
use moe_router::{Engine, EngineConfig};
use moe_worker::{ExpertHost, ExpertSpec};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where LoRA adapters come from and how many may stay resident (per process).
#[derive(Clone, Debug, Default)]
pub struct AdapterOptions {
    /// The adapter dir: each subdirectory a PEFT adapter, its name the id. `None`: no adapters.
    pub dir: Option<PathBuf>,
    pub limits: RegistryLimits,
}

/// Gives a router engine its adapter registry (attention and gate pairs; workers hold the
/// expert pairs), when an adapter dir is configured.
pub fn with_adapters(engine: Engine, adapters: &AdapterOptions) -> Engine {
    match &adapters.dir {
        None => engine,
        Some(dir) => {
            let registry = moe_router::router_adapters(engine.model_arc(), Some(dir.clone()), adapters.limits, false);
            engine.with_adapters(Arc::new(registry))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Model(#[from] moe_model::ModelError),
    #[error(transparent)]
    Generate(#[from] moe_generate::GenerateError),
    #[error(transparent)]
    Worker(#[from] moe_worker::WorkerError),
    #[error(transparent)]
    Dispatch(#[from] moe_dispatch::DispatchError),
    #[error(transparent)]
    Router(#[from] moe_router::RouterError),
    #[error("worker {worker} serves a different model (fingerprint {theirs}, ours {ours}); refusing it")]
    FingerprintMismatch { worker: String, theirs: String, ours: String },
    #[error("not ready: no worker holds {0}")]
    MissingExperts(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ClusterError>;

/// The dispatcher of the current membership.
type RemoteDispatcher = Arc<Dispatcher<GrpcTransport>>;

/// Loads the dense part of the model and the tokenizer (what a router holds).
pub fn load_router_model(dir: &Path) -> Result<(Arc<Model<CpuBackend>>, Arc<TextCodec>)> {
    let model = Model::load_with(dir, CpuBackend::new(), false)?;
    let codec = TextCodec::from_dir(dir)?;
    Ok((Arc::new(model), Arc::new(codec)))
}

/// The embedded cluster's dispatcher: `workers` in-process hosts, host i holding `shard:i/N`.
pub fn in_process_dispatcher(dir: &Path, workers: usize) -> Result<Dispatcher<InProcessTransport>> {
    in_process_dispatcher_with(dir, workers, &AdapterOptions::default())
}

/// [`in_process_dispatcher`] whose hosts serve the expert pairs of adapters.
pub fn in_process_dispatcher_with(
    dir: &Path,
    workers: usize,
    adapters: &AdapterOptions,
) -> Result<Dispatcher<InProcessTransport>> {
    if workers == 0 {
        return Err(ClusterError::Invalid("the embedded cluster needs at least one worker".into()));
    }
    let mut hosts = Vec::with_capacity(workers);
    for i in 0..workers {
        let host = ExpertHost::load(dir, &ExpertSpec::Shard { index: i, count: workers })?;
        let host = match &adapters.dir {
            Some(a) => host.with_adapter_dir(a.clone(), adapters.limits),
            None => host,
        };
        hosts.push(Arc::new(host));
    }
    let config = hosts[0].config().clone();
    let mut placement = Placement::new(config.num_layers, config.num_experts);
    for (w, h) in hosts.iter().enumerate() {
        for (layer, experts) in h.hosted() {
            placement.add(w, layer, &experts)?;
        }
    }
    check_complete(&placement, &config)?;
    Ok(Dispatcher::new(InProcessTransport::new(hosts), placement, workers))
}

fn check_complete(placement: &Placement, config: &moe_model::ModelConfig) -> Result<()> {
    let missing = placement.missing(&config.moe_layers());
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ClusterError::MissingExperts(Placement::describe_missing(&missing)))
    }
}

/// Starts the embedded cluster: router engine plus `workers` in-process workers.
pub fn embedded(dir: &Path, workers: usize, engine: EngineConfig) -> Result<Engine> {
    embedded_with(dir, workers, engine, &AdapterOptions::default())
}

/// [`embedded`] serving LoRA adapters: the router and every in-process worker read the same
/// adapter dir.
pub fn embedded_with(dir: &Path, workers: usize, engine: EngineConfig, adapters: &AdapterOptions) -> Result<Engine> {
    let (model, codec) = load_router_model(dir)?;
    let dispatcher: Arc<dyn ExpertExecutor<CpuBackend>> = Arc::new(in_process_dispatcher_with(dir, workers, adapters)?);
    Ok(with_adapters(Engine::start(model, codec, Some(dispatcher), engine)?, adapters))
}

/// Builds the placement from what remote workers describe, refusing workers of another model.
pub fn placement_from(
    addrs: &[String],
    described: &[DescribeResponse],
    config: &moe_model::ModelConfig,
) -> Result<Placement> {
    let ours = config.fingerprint();
    let mut placement = Placement::new(config.num_layers, config.num_experts);
    for (w, (addr, d)) in addrs.iter().zip(described).enumerate() {
        if d.model_fingerprint != ours {
            tracing::error!(worker = %addr, theirs = %d.model_fingerprint, %ours, "worker serves another model; refused");
            return Err(ClusterError::FingerprintMismatch {
                worker: addr.clone(),
                theirs: d.model_fingerprint.clone(),
                ours,
            });
        }
        for l in &d.layers {
            placement.add(w, l.layer as usize, &l.experts)?;
        }
    }
    check_complete(&placement, config)?;
    Ok(placement)
}

/// Connects to remote workers and returns their dispatcher (call inside the tokio runtime).
pub async fn remote_dispatcher(
    config: &moe_model::ModelConfig,
    addrs: &[String],
    transport: GrpcTransportConfig,
) -> Result<Dispatcher<GrpcTransport>> {
    if addrs.is_empty() {
        return Err(ClusterError::Invalid("give at least one worker address".into()));
    }
    let (t, described) = GrpcTransport::connect(addrs, transport).await?;
    let placement = placement_from(addrs, &described, config)?;
    Ok(Dispatcher::new(t, placement, addrs.len()))
}

/// Starts a router engine over remote workers (call inside the tokio runtime).
pub async fn remote(
    dir: &Path,
    addrs: &[String],
    transport: GrpcTransportConfig,
    engine: EngineConfig,
) -> Result<Engine> {
    let (model, codec) = load_router_model(dir)?;
    let dispatcher: Arc<dyn ExpertExecutor<CpuBackend>> =
        Arc::new(remote_dispatcher(&model.config, addrs, transport).await?);
    Ok(Engine::start(model, codec, Some(dispatcher), engine)?)
}

/// An expert executor that follows membership: each new snapshot of live workers rebuilds the
/// placement and the gRPC transport (streams reopen lazily), refusing workers of another model
/// with a log line, and publishes readiness (every expert has a live holder).
pub struct MembershipDispatcher {
    current: std::sync::RwLock<Option<Arc<Dispatcher<GrpcTransport>>>>,
    missing: std::sync::RwLock<String>,
    refused: std::sync::RwLock<Vec<String>>,
    workers: std::sync::atomic::AtomicUsize,
}

impl moe_router::ClusterStatus for MembershipDispatcher {
    fn workers(&self) -> usize {
        self.workers.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn not_ready_reason(&self) -> String {
        let m = self.missing();
        if m.is_empty() {
            m
        } else {
            format!("no live worker holds {m}")
        }
    }
    fn refused(&self) -> Vec<String> {
        self.refused.read().map(|r| r.clone()).unwrap_or_default()
    }
}

impl MembershipDispatcher {
    /// The dispatcher of the current membership, or an error when no worker is registered.
    fn current(&self, layer: usize) -> moe_model::Result<RemoteDispatcher> {
        self.current
            .read()
            .ok()
            .and_then(|c| c.clone())
            .ok_or_else(|| moe_model::ModelError::Experts { layer, message: "no workers are registered".into() })
    }

    /// What is missing now, empty when every expert has a holder.
    pub fn missing(&self) -> String {
        self.missing.read().map(|m| m.clone()).unwrap_or_default()
    }

    fn rebuild(
        &self,
        config: &moe_model::ModelConfig,
        records: &[moe_membership::WorkerRecord],
        transport: &GrpcTransportConfig,
    ) -> bool {
        let ours = config.fingerprint();
        let mut addrs = Vec::new();
        let mut refused = Vec::new();
        let mut placement = Placement::new(config.num_layers, config.num_experts);
        for r in records {
            if r.fingerprint != ours {
                tracing::error!(worker = %r.id, address = %r.address, theirs = %r.fingerprint, %ours,
                    "refusing worker: it serves a different model (fingerprint mismatch)");
                refused.push(format!(
                    "{} ({}): serves a different model (fingerprint {}, ours {ours})",
                    r.id, r.address, r.fingerprint
                ));
                continue;
            }
            let valid = r.experts.iter().all(|(layer, experts)| {
                (*layer as usize) < config.num_layers && experts.iter().all(|&e| (e as usize) < config.num_experts)
            });
            if !valid {
                tracing::error!(worker = %r.id, "refusing worker: its expert list does not fit the model");
                refused.push(format!("{} ({}): its expert list does not fit the model", r.id, r.address));
                continue;
            }
            let w = addrs.len();
            for (layer, experts) in &r.experts {
                // Checked just above, so this cannot fail.
                let _ = placement.add(w, *layer as usize, experts);
            }
            addrs.push(r.address.clone());
        }
        let missing = placement.missing(&config.moe_layers());
        let text = Placement::describe_missing(&missing);
        match GrpcTransport::lazy(&addrs, transport.clone()) {
            Ok(t) => {
                let d = Arc::new(Dispatcher::new(t, placement, addrs.len()));
                if let Ok(mut c) = self.current.write() {
                    *c = Some(d);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot build the worker transport"),
        }
        if let Ok(mut m) = self.missing.write() {
            *m = text.clone();
        }
        if let Ok(mut r) = self.refused.write() {
            *r = refused;
        }
        self.workers.store(addrs.len(), std::sync::atomic::Ordering::Relaxed);
        if missing.is_empty() {
            tracing::info!(workers = addrs.len(), "every expert has a live holder: ready");
        } else {
            tracing::warn!(workers = addrs.len(), missing = %text, "not ready: experts without a live holder");
        }
        missing.is_empty()
    }
}

impl ExpertExecutor<CpuBackend> for MembershipDispatcher {
    fn run_experts(
        &self,
        layer: usize,
        x: &moe_compute::cpu::HostTensor,
        routes: &moe_model::ExpertRoutes<'_>,
        out: &mut moe_compute::cpu::HostTensor,
        unserved: &mut Vec<(u32, String)>,
    ) -> moe_model::Result<()> {
        self.current(layer)?.run_experts(layer, x, routes, out, unserved)
    }

    fn overlaps(&self) -> bool {
        true
    }

    /// Starts on the current dispatcher, which the ticket keeps: membership may change before
    /// the finish, and the call must end where it began.
    fn start_experts(
        &self,
        layer: usize,
        x: &moe_compute::cpu::HostTensor,
        routes: &moe_model::ExpertRoutes<'_>,
    ) -> moe_model::Result<moe_model::ExpertTicket> {
        let d = self.current(layer)?;
        let ticket = d.start_experts(layer, x, routes)?;
        Ok(moe_model::ExpertTicket(Some(Box::new((d, ticket)))))
    }

    fn finish_experts(
        &self,
        ticket: moe_model::ExpertTicket,
        layer: usize,
        x: &moe_compute::cpu::HostTensor,
        routes: &moe_model::ExpertRoutes<'_>,
        out: &mut moe_compute::cpu::HostTensor,
        unserved: &mut Vec<(u32, String)>,
    ) -> moe_model::Result<()> {
        match ticket.0.and_then(|t| t.downcast::<(RemoteDispatcher, moe_model::ExpertTicket)>().ok()) {
            Some(started) => {
                let (d, inner) = *started;
                d.finish_experts(inner, layer, x, routes, out, unserved)
            }
            None => self.run_experts(layer, x, routes, out, unserved),
        }
    }
}

/// Follows `members` (call inside the runtime): returns the dispatcher and a readiness watch.
pub fn follow_membership(
    config: moe_model::ModelConfig,
    mut members: tokio::sync::watch::Receiver<Vec<moe_membership::WorkerRecord>>,
    transport: GrpcTransportConfig,
) -> (Arc<MembershipDispatcher>, tokio::sync::watch::Receiver<bool>) {
    let d = Arc::new(MembershipDispatcher {
        current: std::sync::RwLock::new(None),
        missing: std::sync::RwLock::new("no workers yet".into()),
        refused: std::sync::RwLock::new(Vec::new()),
        workers: std::sync::atomic::AtomicUsize::new(0),
    });
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let dd = d.clone();
    tokio::spawn(async move {
        loop {
            let snapshot = members.borrow_and_update().clone();
            let ready = dd.rebuild(&config, &snapshot, &transport);
            ready_tx.send_replace(ready);
            if members.changed().await.is_err() {
                return;
            }
        }
    });
    (d, ready_rx)
}

/// A router engine whose workers come from membership (etcd or in-memory).
pub fn membership_router(
    dir: &Path,
    members: tokio::sync::watch::Receiver<Vec<moe_membership::WorkerRecord>>,
    transport: GrpcTransportConfig,
    engine: EngineConfig,
) -> Result<(Engine, Arc<MembershipDispatcher>, tokio::sync::watch::Receiver<bool>)> {
    let (model, codec) = load_router_model(dir)?;
    let (d, ready) = follow_membership(model.config.clone(), members, transport);
    let exec: Arc<dyn ExpertExecutor<CpuBackend>> = d.clone();
    Ok((Engine::start(model, codec, Some(exec), engine)?, d, ready))
}
