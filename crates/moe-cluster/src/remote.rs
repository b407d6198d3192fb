//! A router over remote workers: a static `--workers` list (each asked to `Describe` itself) or
//! membership (etcd or in-memory) followed by a [`MembershipDispatcher`]. Both go through one
//! policy ([`moe_dispatch::plan_membership`]): a worker of another model, or whose experts do not
//! fit the model, is skipped, logged and listed as refused; a static router then refuses to
//! start while some expert has no holder, a membership router reports not ready.

use crate::{check_complete, start_router_engine, AdapterOptions, ClusterError, Result};
use moe_compute::{on_device, Backend, Device, OnBackend};
use moe_dispatch::{
    follow_membership, plan_membership, Dispatcher, GrpcTransport, GrpcTransportConfig, MembershipDispatcher,
};
use moe_membership::WorkerRecord;
use moe_model::{ExpertExecutor, ModelConfig};
use moe_proto::v1::DescribeResponse;
use moe_router::{ClusterStatus, Engine, EngineConfig};
use std::path::Path;
use std::sync::Arc;

/// The record a worker's `Describe` answer amounts to.
fn record_of(addr: &str, d: &DescribeResponse) -> WorkerRecord {
    WorkerRecord {
        id: if d.worker_id.is_empty() { addr.to_string() } else { d.worker_id.clone() },
        address: addr.to_string(),
        experts: d.layers.iter().map(|l| (l.layer, l.experts.clone())).collect(),
        device: d.device.clone(),
        fingerprint: d.model_fingerprint.clone(),
        version: String::new(),
        numerics: d.numerics.clone(),
    }
}

/// Connects to remote workers and returns their dispatcher (call inside the tokio runtime).
pub async fn remote_dispatcher(
    config: &ModelConfig,
    addrs: &[String],
    transport: GrpcTransportConfig,
) -> Result<Dispatcher<GrpcTransport>> {
    if addrs.is_empty() {
        return Err(ClusterError::Invalid("give at least one worker address".into()));
    }
    let (_, described) = GrpcTransport::connect(addrs, transport.clone()).await?;
    let records: Vec<WorkerRecord> = addrs.iter().zip(&described).map(|(a, d)| record_of(a, d)).collect();
    let plan = plan_membership(config, &records);
    check_complete(&plan.placement, config, &plan.refused)?;
    let t = GrpcTransport::lazy(&plan.addrs, transport)?;
    Ok(Dispatcher::new(t, plan.placement, plan.addrs.len()))
}

/// Starts a router engine on the CPU over remote workers (call inside the tokio runtime).
pub async fn remote(
    dir: &Path,
    addrs: &[String],
    transport: GrpcTransportConfig,
    engine: EngineConfig,
) -> Result<Engine> {
    remote_on(Device::Cpu, dir, addrs, transport, engine, &AdapterOptions::default()).await
}

/// [`remote`] on `device`, serving adapters.
pub async fn remote_on(
    device: Device,
    dir: &Path,
    addrs: &[String],
    transport: GrpcTransportConfig,
    engine: EngineConfig,
    adapters: &AdapterOptions,
) -> Result<Engine> {
    let config = ModelConfig::from_dir(dir)?;
    let dispatcher = remote_dispatcher(&config, addrs, transport).await?;
    router_on(device, dir, RouterExperts::Static(dispatcher), engine, adapters)
}

/// The experts a router engine sends to (both implement `ExpertExecutor` on every backend).
enum RouterExperts {
    Static(Dispatcher<GrpcTransport>),
    Membership(Arc<MembershipDispatcher>),
}

fn router_on(
    device: Device,
    dir: &Path,
    experts: RouterExperts,
    engine: EngineConfig,
    adapters: &AdapterOptions,
) -> Result<Engine> {
    struct Router<'a>(&'a Path, RouterExperts, EngineConfig, &'a AdapterOptions);
    impl OnBackend for Router<'_> {
        type Output = Result<Engine>;
        fn run<B: Backend>(self, backend: B) -> Result<Engine> {
            let Router(dir, experts, engine, adapters) = self;
            let experts: Arc<dyn ExpertExecutor<B>> = match experts {
                RouterExperts::Static(d) => Arc::new(d),
                RouterExperts::Membership(d) => d,
            };
            start_router_engine(dir, backend, experts, engine, adapters)
        }
    }
    on_device(device, Router(dir, experts, engine, adapters))?
}

/// A membership dispatcher as the API's `ModelInfo` and readiness see it.
pub struct MembershipCluster(pub Arc<MembershipDispatcher>);

impl ClusterStatus for MembershipCluster {
    fn workers(&self) -> usize {
        self.0.status().workers
    }
    fn not_ready_reason(&self) -> String {
        let m = self.0.status().missing;
        if m.is_empty() {
            m
        } else {
            format!("no live worker holds {m}")
        }
    }
    fn refused(&self) -> Vec<String> {
        self.0.status().refused
    }
}

/// A router engine on the CPU whose workers come from membership (etcd or in-memory).
pub fn membership_router(
    dir: &Path,
    members: tokio::sync::watch::Receiver<Vec<WorkerRecord>>,
    transport: GrpcTransportConfig,
    engine: EngineConfig,
) -> Result<(Engine, Arc<MembershipDispatcher>, tokio::sync::watch::Receiver<bool>)> {
    membership_router_on(Device::Cpu, dir, members, transport, engine, &AdapterOptions::default())
}

/// [`membership_router`] on `device`, serving adapters (call inside the runtime).
pub fn membership_router_on(
    device: Device,
    dir: &Path,
    members: tokio::sync::watch::Receiver<Vec<WorkerRecord>>,
    transport: GrpcTransportConfig,
    engine: EngineConfig,
    adapters: &AdapterOptions,
) -> Result<(Engine, Arc<MembershipDispatcher>, tokio::sync::watch::Receiver<bool>)> {
    let config = ModelConfig::from_dir(dir)?;
    let (d, ready) = follow_membership(config, members, transport);
    let engine = router_on(device, dir, RouterExperts::Membership(d.clone()), engine, adapters)?;
    Ok((engine, d, ready))
}
