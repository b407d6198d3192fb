//! `moe worker`: hosts a set of experts and serves them over gRPC.

use crate::engine_args::EtcdArgs;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[arg(long, env = "MOE_MODEL")]
    pub model: PathBuf,
    /// `all`, `shard:I/N`, or a list like `0:0-3,1:4,*:7` (layer:experts).
    #[arg(long, env = "MOE_EXPERTS", default_value = "all")]
    pub experts: String,
    #[arg(long, env = "MOE_LISTEN", default_value = "127.0.0.1:50061")]
    pub listen: String,
    /// Name reported by Describe and registered in etcd (default: the advertised address).
    #[arg(long, env = "MOE_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Address routers use to reach this worker (default: the bound listen address).
    #[arg(long, env = "MOE_ADVERTISE")]
    pub advertise: Option<String>,
    /// Lease TTL of the etcd registration; kept alive at TTL/3.
    #[arg(long, env = "MOE_LEASE_TTL_SECS", default_value_t = 10)]
    pub lease_ttl_secs: u64,
    /// Directory of LoRA adapters (the same volume as the routers'); this worker loads the
    /// pairs of its hosted experts from it when rows carry an adapter.
    #[arg(long, env = "MOE_ADAPTER_DIR")]
    pub adapter_dir: Option<PathBuf>,
    /// Resident adapters at most.
    #[arg(long, env = "MOE_MAX_ADAPTERS", default_value_t = 64)]
    pub max_adapters: usize,
    /// Memory for resident adapters, in MiB.
    #[arg(long, env = "MOE_MAX_ADAPTER_MB", default_value_t = 4096)]
    pub max_adapter_mb: usize,
    /// Highest LoRA rank accepted; adapters with a module above it are refused at load.
    #[arg(long, env = "MOE_MAX_LORA_RANK", default_value_t = moe_cluster::DEFAULT_MAX_RANK,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=512))]
    pub max_lora_rank: usize,
    /// Working memory one expert request may use, in MiB (0: a quarter of this machine's
    /// memory), and all requests in flight together; larger requests are answered
    /// RESOURCE_EXHAUSTED instead of being attempted (stream requests wait for room).
    #[arg(long, env = "MOE_MAX_BATCH_MB", default_value_t = 0)]
    pub max_batch_mb: usize,
    /// Weight memory of hosted experts, in MiB (0: unlimited); `LoadExperts` past it is
    /// refused, and so is a start whose --experts exceed it.
    #[arg(long, env = "MOE_MAX_EXPERT_MB", default_value_t = 0)]
    pub max_expert_mb: usize,
    /// An unloaded expert is dropped once no request named it for this long (routers that
    /// have not seen the change yet still send it; it is computed meanwhile).
    #[arg(long, env = "MOE_DRAIN_QUIET_MS", default_value_t = 2000)]
    pub drain_quiet_ms: u64,
    /// ... and after this long at most.
    #[arg(long, env = "MOE_DRAIN_MAX_MS", default_value_t = 30_000)]
    pub drain_max_ms: u64,
    /// This worker's TLS certificate (PEM); with --tls-key, the worker serves only TLS.
    #[arg(long, env = "MOE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "MOE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that signs the routers' client certificates: mutual TLS, other clients refused.
    #[arg(long, env = "MOE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

pub fn run(a: WorkerArgs, device: moe_cluster::Device) -> anyhow::Result<()> {
    let process = moe_cluster::WorkerProcess {
        etcd: a.etcd.options(),
        model: a.model,
        experts: a.experts,
        listen: a.listen,
        worker_id: a.worker_id,
        advertise: a.advertise,
        lease_ttl_secs: a.lease_ttl_secs,
        adapter_dir: a.adapter_dir,
        max_adapters: a.max_adapters,
        max_adapter_mb: a.max_adapter_mb,
        max_lora_rank: a.max_lora_rank,
        max_batch_mb: a.max_batch_mb,
        max_expert_mb: a.max_expert_mb,
        drain_quiet_ms: a.drain_quiet_ms,
        drain_max_ms: a.drain_max_ms,
        tls_cert: a.tls_cert,
        tls_key: a.tls_key,
        tls_client_ca: a.tls_client_ca,
    };
    Ok(moe_cluster::run_worker(process, device)?)
}
