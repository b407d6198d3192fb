//! `moe-cluster` assembles the pieces into something that serves, on the device the process was
//! given: the **embedded cluster** (a router and N in-process workers, each hosting `shard:i/N`
//! of the experts; no sockets between them), a **router over remote workers** (a static list
//! that describes itself, or membership from etcd), a **local engine** (the model with its own
//! experts: `moe generate` and `moe logits`), a worker's **expert host**, and **rebalancing**
//! the workers from observed load ([`rebalance`]). Every one of them
//! reaches the backend through [`moe_compute::on_device`], the one place a device becomes a
//! backend; everything here is otherwise generic over [`moe_compute::Backend`].

mod embedded;
mod host;
pub mod local;
pub mod probe;
pub mod rebalance;
mod rebalance_loop;
mod remote;
mod router_process;
pub mod serving;
mod worker_process;

pub use embedded::{
    embedded, embedded_on, embedded_with, in_process_dispatcher, in_process_dispatcher_on, local_engine,
};
pub use host::{expert_host, HostOptions};
// What the `moe` binary configures, named here so that it needs no other crate of the workspace.
pub use moe_compute::Device;
pub use moe_constrain::ConstraintSpec;
pub use moe_dispatch::GrpcTransportConfig;
pub use moe_lora::{locate_adapter, RegistryLimits, DEFAULT_MAX_RANK};
pub use moe_membership::EtcdOptions;
pub use moe_router::constraint::to_proto as constraint_to_proto;
pub use moe_router::{EngineConfig, PrefixCacheScope, SchedulingConfig};
pub use rebalance_loop::Rebalancer;
pub use remote::{membership_router, membership_router_on, remote, remote_dispatcher, remote_on, MembershipCluster};
pub use router_process::{run_embedded, run_router, with_tenants, EmbeddedProcess, RouterProcess};
pub use worker_process::{run_worker, WorkerProcess};

use moe_compute::Backend;
use moe_dispatch::Placement;
use moe_generate::TextCodec;
use moe_model::Model;
use moe_router::RouterAdapters;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where LoRA adapters come from and how many may stay resident (per process).
#[derive(Clone, Debug, Default)]
pub struct AdapterOptions {
    /// The adapter dir: each subdirectory a PEFT adapter, its name the id. `None`: no adapters.
    pub dir: Option<PathBuf>,
    pub limits: RegistryLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Compute(#[from] moe_compute::ComputeError),
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
    #[error("not ready: no worker holds {missing}{refused}")]
    MissingExperts { missing: String, refused: String },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot listen on {addr}: {error}")]
    Listen { addr: String, error: std::io::Error },
    #[error("server failed: {0}")]
    Server(String),
    #[error(transparent)]
    Lora(#[from] moe_lora::LoraError),
    #[error(transparent)]
    Membership(#[from] moe_membership::MembershipError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// What was being done when `source` failed (shown as `context: source`).
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

pub type Result<T> = std::result::Result<T, ClusterError>;

/// Says what was being done when an error happened, as `context: error`.
pub(crate) trait Context<T> {
    fn context_with(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Context<T> for std::result::Result<T, E> {
    fn context_with(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| ClusterError::Context { context: what(), source: Box::new(e) })
    }
}

/// A refusal with its message.
pub(crate) fn invalid(message: impl Into<String>) -> ClusterError {
    ClusterError::Invalid(message.into())
}

/// How a GPU multiplies routed experts, for the whole process: `auto` (`tc` for layers of 16
/// or more experts, else `cublas`), `cublas` (one cuBLAS GEMM per expert), `grouped` (the
/// project's grouped GEMM kernel) or `tc` (its tensor-core, pipelined successor). Without CUDA
/// support, only a check of the name.
pub fn set_expert_gemm(mode: &str) -> Result<()> {
    #[cfg(feature = "cuda")]
    moe_compute::cuda::backend::set_expert_gemm(mode.parse()?);
    #[cfg(not(feature = "cuda"))]
    if !["auto", "cublas", "grouped", "tc"].contains(&mode) {
        return Err(ClusterError::Invalid(format!("--expert-gemm {mode:?}: one of auto, cublas, grouped, tc")));
    }
    Ok(())
}

/// Batch-invariant inference on GPUs (`--deterministic`): every bf16 product on the project's
/// tensor-core GEMM instead of cuBLAS. The CPU backend is batch-invariant always.
pub fn set_deterministic(on: bool) {
    #[cfg(feature = "cuda")]
    moe_compute::cuda::backend::set_deterministic(on);
    #[cfg(not(feature = "cuda"))]
    let _ = on;
}

/// Which kernel a GPU uses for attention, for the whole process: `classic` or `flash` (the
/// tensor-core prefill kernel and flash-decoding where they apply). Without CUDA
/// support, only a check of the name.
pub fn set_cuda_attention(kind: &str) -> Result<()> {
    #[cfg(feature = "cuda")]
    moe_compute::cuda::backend::set_attention_kernel(kind.parse()?);
    #[cfg(not(feature = "cuda"))]
    if !["classic", "flash"].contains(&kind) {
        return Err(ClusterError::Invalid(format!("--cuda-attention {kind:?}: one of classic, flash")));
    }
    Ok(())
}

/// Chooses the CPU kernels' instruction set (`auto`, `avx512`, `avx2`, `neon`, `portable`) for
/// the process and logs the choice; an error names a set this CPU cannot run.
pub fn set_cpu_kernels(request: &str) -> Result<moe_compute::cpu::CpuKernels> {
    let set = moe_compute::cpu::select_cpu_kernels(request)?;
    tracing::info!(cpu_kernels = %set, numerics = moe_compute::cpu::NUMERICS, "CPU kernels chosen");
    Ok(set)
}

/// Loads the dense part of the model onto `backend` and the tokenizer (what a router holds).
pub fn load_router_model<B: Backend>(dir: &Path, backend: B) -> Result<(Arc<Model<B>>, Arc<TextCodec>)> {
    let model = Model::load_with(dir, backend, false)?;
    let codec = TextCodec::from_dir(dir)?;
    Ok((Arc::new(model), Arc::new(codec)))
}

/// The router's adapter registry for `model`, when an adapter dir is configured. With
/// `experts`, the expert pairs too (a model that runs its own experts).
fn router_registry<B: Backend>(
    model: &Arc<Model<B>>,
    adapters: &AdapterOptions,
    experts: bool,
) -> Option<Arc<RouterAdapters<B>>> {
    let dir = adapters.dir.clone()?;
    Some(Arc::new(moe_router::router_adapters(model.clone(), Some(dir), adapters.limits, experts)))
}

/// A router engine on `backend`: the dense part of the model in `dir`, its adapter registry
/// (attention and gate pairs), and the routed experts on `experts`.
fn start_router_engine<B: Backend>(
    dir: &Path,
    backend: B,
    experts: Arc<dyn moe_model::ExpertExecutor<B>>,
    engine: moe_router::EngineConfig,
    adapters: &AdapterOptions,
) -> Result<moe_router::Engine> {
    let (model, codec) = load_router_model(dir, backend)?;
    let adapters = router_registry(&model, adapters, false);
    let parts = moe_router::EngineParts { model, codec, experts: Some(experts), adapters };
    Ok(moe_router::Engine::start(parts, engine)?)
}

fn check_complete(placement: &Placement, config: &moe_model::ModelConfig, refused: &[String]) -> Result<()> {
    let missing = placement.missing(&config.moe_layers());
    if missing.is_empty() {
        return Ok(());
    }
    let refused = if refused.is_empty() { String::new() } else { format!(" (refused: {})", refused.join("; ")) };
    Err(ClusterError::MissingExperts { missing: Placement::describe_missing(&missing), refused })
}
