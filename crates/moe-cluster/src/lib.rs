//! `moe-cluster` assembles the pieces into something that serves: the **embedded cluster** (a
//! router and N in-process workers, each hosting `shard:i/N` of the experts; no sockets between
//! them) and a **router over remote workers** (connect, check each worker's model fingerprint,
//! build the placement, refuse to start while any expert has no holder). Both produce an
//! [`moe_router::Engine`] driven through the same [`moe_dispatch::Dispatcher`].

use moe_compute::cpu::CpuBackend;
use moe_dispatch::{Dispatcher, GrpcTransport, GrpcTransportConfig, InProcessTransport, Placement};
use moe_generate::TextCodec;
use moe_model::{ExpertExecutor, Model};
use moe_proto::v1::DescribeResponse;
use moe_router::{Engine, EngineConfig};
use moe_worker::{ExpertHost, ExpertSpec};
use std::path::Path;
use std::sync::Arc;

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

/// Loads the dense part of the model and the tokenizer (what a router holds).
pub fn load_router_model(dir: &Path) -> Result<(Arc<Model<CpuBackend>>, Arc<TextCodec>)> {
    let model = Model::load_with(dir, CpuBackend::new(), false)?;
    let codec = TextCodec::from_dir(dir)?;
    Ok((Arc::new(model), Arc::new(codec)))
}

/// The embedded cluster's dispatcher: `workers` in-process hosts, host i holding `shard:i/N`.
pub fn in_process_dispatcher(dir: &Path, workers: usize) -> Result<Dispatcher<InProcessTransport>> {
    if workers == 0 {
        return Err(ClusterError::Invalid("the embedded cluster needs at least one worker".into()));
    }
    let mut hosts = Vec::with_capacity(workers);
    for i in 0..workers {
        hosts.push(Arc::new(ExpertHost::load(dir, &ExpertSpec::Shard { index: i, count: workers })?));
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
    let (model, codec) = load_router_model(dir)?;
    let dispatcher: Arc<dyn ExpertExecutor<CpuBackend>> = Arc::new(in_process_dispatcher(dir, workers)?);
    Ok(Engine::start(model, codec, Some(dispatcher), engine)?)
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
