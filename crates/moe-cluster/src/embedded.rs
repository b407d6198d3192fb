//! One process: the embedded cluster (router plus N in-process workers behind the same
//! dispatcher as remote ones) and the local engine (the model with its own experts, for
//! `moe generate` and anything else that runs one process without workers).

use crate::{check_complete, router_registry, start_router_engine, AdapterOptions, ClusterError, Result};
use moe_compute::{on_device, Backend, Device, OnBackend};
use moe_dispatch::{Dispatcher, InProcessTransport, Placement};
use moe_generate::TextCodec;
use moe_model::Model;
use moe_router::{Engine, EngineConfig, EngineParts};
use moe_worker::{ExpertCompute, ExpertHost, ExpertSpec};
use std::path::Path;
use std::sync::Arc;

/// The embedded cluster's dispatcher on the CPU: `workers` in-process hosts, host i holding
/// `shard:i/N`.
pub fn in_process_dispatcher(dir: &Path, workers: usize) -> Result<Dispatcher<InProcessTransport>> {
    in_process_dispatcher_on(Device::Cpu, dir, workers, &AdapterOptions::default())
}

/// [`in_process_dispatcher`] on `device`, whose hosts serve the expert pairs of adapters.
pub fn in_process_dispatcher_on(
    device: Device,
    dir: &Path,
    workers: usize,
    adapters: &AdapterOptions,
) -> Result<Dispatcher<InProcessTransport>> {
    struct Hosts<'a>(&'a Path, usize, &'a AdapterOptions);
    impl OnBackend for Hosts<'_> {
        type Output = Result<Dispatcher<InProcessTransport>>;
        fn run<B: Backend>(self, backend: B) -> Self::Output {
            in_process_dispatcher_backend(&backend, self.0, self.1, self.2)
        }
    }
    on_device(device, Hosts(dir, workers, adapters))?
}

fn in_process_dispatcher_backend<B: Backend>(
    backend: &B,
    dir: &Path,
    workers: usize,
    adapters: &AdapterOptions,
) -> Result<Dispatcher<InProcessTransport>> {
    if workers == 0 {
        return Err(ClusterError::Invalid("the embedded cluster needs at least one worker".into()));
    }
    let mut hosts: Vec<Arc<dyn ExpertCompute>> = Vec::with_capacity(workers);
    for i in 0..workers {
        let host = ExpertHost::load(dir, &ExpertSpec::Shard { index: i, count: workers }, backend.clone())?;
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
    check_complete(&placement, &config, &[])?;
    Ok(Dispatcher::new(InProcessTransport::new(hosts), placement, workers))
}

/// Starts the embedded cluster on the CPU: router engine plus `workers` in-process workers.
pub fn embedded(dir: &Path, workers: usize, engine: EngineConfig) -> Result<Engine> {
    embedded_with(dir, workers, engine, &AdapterOptions::default())
}

/// [`embedded`] serving LoRA adapters: the router and every in-process worker read the same
/// adapter dir.
pub fn embedded_with(dir: &Path, workers: usize, engine: EngineConfig, adapters: &AdapterOptions) -> Result<Engine> {
    embedded_on(Device::Cpu, dir, workers, engine, adapters)
}

/// [`embedded_with`] on `device`.
pub fn embedded_on(
    device: Device,
    dir: &Path,
    workers: usize,
    engine: EngineConfig,
    adapters: &AdapterOptions,
) -> Result<Engine> {
    struct Embedded<'a>(&'a Path, usize, EngineConfig, &'a AdapterOptions);
    impl OnBackend for Embedded<'_> {
        type Output = Result<Engine>;
        fn run<B: Backend>(self, backend: B) -> Result<Engine> {
            let Embedded(dir, workers, engine, adapters) = self;
            let dispatcher = in_process_dispatcher_backend(&backend, dir, workers, adapters)?;
            start_router_engine(dir, backend, Arc::new(dispatcher), engine, adapters)
        }
    }
    on_device(device, Embedded(dir, workers, engine, adapters))?
}

/// An engine over the whole model on `device`, experts included (no workers): what `moe
/// generate` runs, so that local and served generation share one loop.
pub fn local_engine(device: Device, dir: &Path, engine: EngineConfig, adapters: &AdapterOptions) -> Result<Engine> {
    struct Local<'a>(&'a Path, EngineConfig, &'a AdapterOptions);
    impl OnBackend for Local<'_> {
        type Output = Result<Engine>;
        fn run<B: Backend>(self, backend: B) -> Result<Engine> {
            let Local(dir, engine, adapters) = self;
            let model = Arc::new(Model::load(dir, backend)?);
            let codec = Arc::new(TextCodec::from_dir(dir)?);
            let adapters = router_registry(&model, adapters, true);
            Ok(Engine::start(EngineParts { model, codec, experts: None, adapters }, engine)?)
        }
    }
    on_device(device, Local(dir, engine, adapters))?
}
