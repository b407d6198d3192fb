//! A router process over remote workers (`moe router`): a static list of workers, or the
//! workers etcd lists (with adapter loads shared between the routers through etcd, and the
//! elected planner rebalancing experts when asked); its public APIs served until a shutdown signal.

use crate::serving::{bind_all, run_until_signal, serve_all, PublicApis, GRACE};
use crate::{invalid, Context, Result};
use moe_compute::Device;
use moe_dispatch::{GrpcTransportConfig, Hedging};
use moe_proto::v1::WireDtype;
use moe_router::{EngineConfig, StaticCluster};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What a router process serves and how (the `moe router` flags).
#[derive(Clone, Debug)]
pub struct RouterProcess {
    pub model: PathBuf,
    /// Worker addresses (a static cluster); empty with `etcd`.
    pub workers: Vec<String>,
    pub etcd: Option<moe_membership::EtcdOptions>,
    pub listen: String,
    pub wire: WireDtype,
    pub dispatch_timeout_ms: u64,
    /// `None`: adaptive hedging; `Some(0)`: never.
    pub hedge_after_ms: Option<u64>,
    pub worker_ca: Option<PathBuf>,
    pub worker_client_cert: Option<PathBuf>,
    pub worker_client_key: Option<PathBuf>,
    pub worker_tls_domain: Option<String>,
    pub rebalance_every: u64,
    pub rebalance_target: f64,
    pub engine: EngineConfig,
    pub adapters: crate::AdapterOptions,
    pub tenants: Option<PathBuf>,
    pub apis: PublicApis,
}

/// Applies a tenants file, if any, to an engine.
pub fn with_tenants(engine: moe_router::Engine, tenants: Option<&Path>) -> Result<moe_router::Engine> {
    Ok(match tenants {
        None => engine,
        Some(path) => {
            let tenants = moe_router::Tenants::from_file(path).map_err(|e| invalid(format!("--tenants: {e}")))?;
            engine.with_tenants(Arc::new(tenants))
        }
    })
}

/// What the embedded cluster serves (the `moe serve` flags).
#[derive(Clone, Debug)]
pub struct EmbeddedProcess {
    pub model: PathBuf,
    /// In-process workers; worker i hosts experts e with e mod N = i.
    pub workers: usize,
    pub listen: String,
    pub engine: EngineConfig,
    pub adapters: crate::AdapterOptions,
    pub tenants: Option<PathBuf>,
    pub apis: PublicApis,
}

/// The embedded cluster (`moe serve`): a router and its in-process workers on `device`, its
/// public APIs served until a shutdown signal.
pub fn run_embedded(p: EmbeddedProcess, device: Device) -> Result<()> {
    let (dir, apis) = (&p.model, &p.apis);
    let engine = crate::embedded_on(device, dir, p.workers, p.engine.clone(), &p.adapters)
        .map_err(|e| invalid(format!("--device {device}: {e}")))?;
    let engine = with_tenants(engine, p.tenants.as_deref())?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let listeners = bind_all(&p.listen, apis, "serve").await?;
        let cluster = Arc::new(StaticCluster(p.workers));
        run_until_signal(|stop| serve_all(engine, cluster, None, dir, apis, listeners, stop), GRACE).await
    })
}

pub fn run_router(a: RouterProcess, device: Device) -> Result<()> {
    if !(a.rebalance_target > 0.0 && a.rebalance_target <= 1.0) {
        return Err(invalid("--rebalance-target must be in (0, 1]"));
    }
    if a.rebalance_every > 0 && a.etcd.is_none() {
        return Err(invalid(
            "--rebalance-every needs --etcd (workers publish what they host there, and routers elect the planner)",
        ));
    }
    let engine_config = a.engine.clone();
    let metrics = engine_config.metrics.clone();
    let transport = GrpcTransportConfig {
        metrics: engine_config.metrics.clone(),
        wire: a.wire,
        deadline: Duration::from_millis(a.dispatch_timeout_ms.max(1)),
        tls: transport_tls(&a)?,
        hedging: match a.hedge_after_ms {
            None => Hedging::Adaptive,
            Some(0) => Hedging::Off,
            Some(ms) => Hedging::After(Duration::from_millis(ms)),
        },
        ..Default::default()
    };
    let adapter_options = a.adapters.clone();
    let rt = tokio::runtime::Runtime::new()?;
    let apis = a.apis.clone();
    rt.block_on(async {
        if let Some(opts) = a.etcd.clone() {
            let (tx, rx) = tokio::sync::watch::channel(Vec::new());
            let cancel = tokio_util::sync::CancellationToken::new();
            tokio::spawn(moe_membership::watch_workers(opts.clone(), tx, cancel.clone()));
            let admin_transport = transport.clone();
            let (engine, dispatcher, ready) =
                crate::membership_router_on(device, &a.model, rx.clone(), transport, engine_config, &adapter_options)?;
            let engine = share_adapters(with_tenants(engine, a.tenants.as_deref())?, &opts, &cancel);
            let status: Arc<dyn moe_router::ClusterStatus> = Arc::new(crate::MembershipCluster(dispatcher));
            let listeners = bind_all(&a.listen, &apis, "router").await?;
            let mut election = None;
            if a.rebalance_every > 0 {
                let rebalancer = crate::Rebalancer {
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
                |stop| serve_all(engine, status.clone(), Some(ready), &a.model, &apis, listeners, stop),
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
        let engine = crate::remote_on(device, &a.model, &a.workers, transport, engine_config, &adapter_options).await?;
        let engine = with_tenants(engine, a.tenants.as_deref())?;
        let listeners = bind_all(&a.listen, &apis, "router").await?;
        let cluster = Arc::new(StaticCluster(a.workers.len()));
        run_until_signal(|stop| serve_all(engine, cluster, None, &a.model, &apis, listeners, stop), GRACE).await
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

fn transport_tls(a: &RouterProcess) -> Result<Option<moe_dispatch::TransportTls>> {
    let Some(ca) = &a.worker_ca else { return Ok(None) };
    let read = |p: &std::path::Path| std::fs::read(p).context_with(|| format!("reading {}", p.display()));
    let identity = match (&a.worker_client_cert, &a.worker_client_key) {
        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
        _ => None,
    };
    Ok(Some(moe_dispatch::TransportTls { ca_pem: read(ca)?, identity, domain: a.worker_tls_domain.clone() }))
}
