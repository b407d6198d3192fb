//! `moe router`: the router over a static list of remote workers.

use crate::api::HttpArgs;
use crate::engine_args::{AdapterServeArgs, EngineArgs, EtcdArgs};
use clap::{Args, ValueEnum};
use moe_proto::v1::WireDtype;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Wire {
    Bf16,
    F32,
}

#[derive(Args, Debug)]
pub struct RouterArgs {
    #[arg(long, env = "MOE_MODEL")]
    pub model: PathBuf,
    /// Worker addresses, comma separated (host:port or http://host:port); or use --etcd.
    #[arg(long, env = "MOE_WORKERS", value_delimiter = ',', required_unless_present = "etcd", conflicts_with = "etcd")]
    pub workers: Vec<String>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[arg(long, env = "MOE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Encoding of hidden rows between router and workers.
    #[arg(long, env = "MOE_WIRE", value_enum, default_value = "bf16")]
    pub wire: Wire,
    /// How long one layer's expert call may take before the worker counts as dead, when no
    /// replica could take its rows; with a replica, the deadline follows the worker's own call
    /// times (25x its 95th percentile, at least 250 ms) and this is its cap.
    #[arg(long, env = "MOE_DISPATCH_TIMEOUT_MS", default_value_t = 10_000)]
    pub dispatch_timeout_ms: u64,
    /// Hedge slow workers: when a layer's expert call has no answer after this many ms, send it
    /// to a replica holding the same experts as well and use the first answer. Unset: after 4x
    /// the worker's 95th percentile for such a batch (at least 20 ms), whenever a replica
    /// exists; 0: never.
    #[arg(long, env = "MOE_HEDGE_AFTER_MS")]
    pub hedge_after_ms: Option<u64>,
    /// CA (PEM) of the workers' certificates: talk to workers over TLS.
    #[arg(long, env = "MOE_WORKER_CA")]
    pub worker_ca: Option<PathBuf>,
    /// This router's client certificate and key (PEM) for workers that require mutual TLS.
    #[arg(long, env = "MOE_WORKER_CLIENT_CERT", requires = "worker_client_key", requires = "worker_ca")]
    pub worker_client_cert: Option<PathBuf>,
    #[arg(long, env = "MOE_WORKER_CLIENT_KEY", requires = "worker_client_cert")]
    pub worker_client_key: Option<PathBuf>,
    /// The name in the workers' certificates, when it is not the address's host.
    #[arg(long, env = "MOE_WORKER_TLS_DOMAIN", requires = "worker_ca")]
    pub worker_tls_domain: Option<String>,
    /// With --etcd: every SECS, the routers' elected planner moves expert replicas between
    /// the workers (`LoadExperts` / `UnloadExperts`) to balance the load it observed; 0: never.
    #[arg(long, env = "MOE_REBALANCE_EVERY", default_value_t = 0, value_name = "SECS")]
    pub rebalance_every: u64,
    /// The balance (mean / max load over workers, per layer) a rebalancing round aims for.
    #[arg(long, env = "MOE_REBALANCE_TARGET", default_value_t = 0.9)]
    pub rebalance_target: f64,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub adapters: AdapterServeArgs,
    #[command(flatten)]
    pub http: HttpArgs,
}

pub fn run(a: RouterArgs, device: moe_cluster::Device) -> anyhow::Result<()> {
    let process = moe_cluster::RouterProcess {
        etcd: a.etcd.options(),
        engine: a.engine.config()?,
        adapters: a.adapters.options()?,
        tenants: a.adapters.tenants.clone(),
        apis: a.http.apis(),
        model: a.model,
        workers: a.workers,
        listen: a.listen,
        wire: match a.wire {
            Wire::Bf16 => WireDtype::Bf16,
            Wire::F32 => WireDtype::F32,
        },
        dispatch_timeout_ms: a.dispatch_timeout_ms,
        hedge_after_ms: a.hedge_after_ms,
        worker_ca: a.worker_ca,
        worker_client_cert: a.worker_client_cert,
        worker_client_key: a.worker_client_key,
        worker_tls_domain: a.worker_tls_domain,
        rebalance_every: a.rebalance_every,
        rebalance_target: a.rebalance_target,
    };
    Ok(moe_cluster::run_router(process, device)?)
}
