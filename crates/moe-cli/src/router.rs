//! `moe router`: the router over a static list of remote workers.

use crate::api::{bind_all, serve_all, HttpArgs};
use crate::engine_args::{run_until_signal, AdapterServeArgs, EngineArgs, EtcdArgs, GRACE};
use clap::{Args, ValueEnum};
use moe_dispatch::{GrpcTransportConfig, Hedging};
use moe_proto::v1::WireDtype;
use moe_router::StaticCluster;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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

pub fn run(a: RouterArgs, device: moe_compute::Device) -> anyhow::Result<()> {
    anyhow::ensure!(a.rebalance_target > 0.0 && a.rebalance_target <= 1.0, "--rebalance-target must be in (0, 1]");
    anyhow::ensure!(
        a.rebalance_every == 0 || a.etcd.options().is_some(),
        "--rebalance-every needs --etcd (workers publish what they host there, and routers elect the planner)"
    );
    let engine_config = a.engine.config()?;
    let metrics = engine_config.metrics.clone();
    let transport = GrpcTransportConfig {
        metrics: engine_config.metrics.clone(),
        wire: match a.wire {
            Wire::Bf16 => WireDtype::Bf16,
            Wire::F32 => WireDtype::F32,
        },
        deadline: Duration::from_millis(a.dispatch_timeout_ms.max(1)),
        tls: transport_tls(&a)?,
        hedging: match a.hedge_after_ms {
            None => Hedging::Adaptive,
            Some(0) => Hedging::Off,
            Some(ms) => Hedging::After(Duration::from_millis(ms)),
        },
        ..Default::default()
    };
    let adapter_options = a.adapters.options()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        if let Some(opts) = a.etcd.options() {
            let (tx, rx) = tokio::sync::watch::channel(Vec::new());
            let cancel = tokio_util::sync::CancellationToken::new();
            tokio::spawn(moe_membership::watch_workers(opts.clone(), tx, cancel.clone()));
            let admin_transport = transport.clone();
            let (engine, dispatcher, ready) = moe_cluster::membership_router_on(
                device,
                &a.model,
                rx.clone(),
                transport,
                engine_config,
                &adapter_options,
            )?;
            let engine = share_adapters(a.adapters.with_tenants(engine)?, &opts, &cancel);
            let status: Arc<dyn moe_router::ClusterStatus> = Arc::new(moe_cluster::MembershipCluster(dispatcher));
            let listeners = bind_all(&a.listen, &a.http, "router").await?;
            let mut election = None;
            if a.rebalance_every > 0 {
                let rebalancer = crate::rebalance_loop::Rebalancer {
                    engine: engine.clone(),
                    etcd: opts.clone(),
                    workers: rx,
                    every: Duration::from_secs(a.rebalance_every),
                    target: a.rebalance_target,
                    id: format!("{}/{}", a.listen, std::process::id()),
                    transport: admin_transport,
                    metrics,
                };
                election = Some(rebalancer.spawn(cancel.clone()));
            }
            let r = run_until_signal(
                |stop| serve_all(engine, status.clone(), Some(ready), &a.model, &a.http, listeners, stop),
                GRACE,
            )
            .await;
            cancel.cancel();
            // The planner lease is revoked before the process exits (the key goes at once).
            if let Some(e) = election {
                let _ = tokio::time::timeout(Duration::from_secs(3), e).await;
            }
            return r;
        }
        let engine =
            moe_cluster::remote_on(device, &a.model, &a.workers, transport, engine_config, &adapter_options).await?;
        let engine = a.adapters.with_tenants(engine)?;
        let listeners = bind_all(&a.listen, &a.http, "router").await?;
        let cluster = Arc::new(StaticCluster(a.workers.len()));
        run_until_signal(|stop| serve_all(engine, cluster, None, &a.model, &a.http, listeners, stop), GRACE).await
    })
}

/// Publishes this router's `LoadAdapter`/`UnloadAdapter` in etcd and applies what every router
/// of the cluster published (a router that serves adapters).
fn share_adapters(
    engine: moe_router::Engine,
    opts: &moe_membership::EtcdOptions,
    cancel: &tokio_util::sync::CancellationToken,
) -> moe_router::Engine {
    let Some(catalog) = engine.adapters().cloned() else { return engine };
    let (tx, rx) = tokio::sync::watch::channel(Default::default());
    tokio::spawn(moe_membership::watch_adapters(opts.clone(), tx, cancel.clone()));
    tokio::spawn(moe_router::adapter_sync::follow_published(catalog, rx));
    engine.with_adapter_sync(Arc::new(EtcdAdapterSync(opts.clone())))
}

/// Adapter changes announced through etcd.
struct EtcdAdapterSync(moe_membership::EtcdOptions);

impl moe_router::adapter_sync::AdapterSync for EtcdAdapterSync {
    fn loaded(&self, id: &str, path: &str) -> moe_router::adapter_sync::SyncFuture {
        let (opts, record) = (self.0.clone(), moe_membership::AdapterRecord { id: id.into(), path: path.into() });
        Box::pin(async move { moe_membership::publish_adapter(&opts, &record).await.map_err(|e| e.to_string()) })
    }

    fn unloaded(&self, id: &str) -> moe_router::adapter_sync::SyncFuture {
        let (opts, id) = (self.0.clone(), id.to_string());
        Box::pin(async move { moe_membership::withdraw_adapter(&opts, &id).await.map_err(|e| e.to_string()) })
    }
}

fn transport_tls(a: &RouterArgs) -> anyhow::Result<Option<moe_dispatch::TransportTls>> {
    use anyhow::Context;
    let Some(ca) = &a.worker_ca else { return Ok(None) };
    let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let identity = match (&a.worker_client_cert, &a.worker_client_key) {
        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
        _ => None,
    };
    Ok(Some(moe_dispatch::TransportTls { ca_pem: read(ca)?, identity, domain: a.worker_tls_domain.clone() }))
}
