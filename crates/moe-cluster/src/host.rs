//! A worker's expert host on its device: the experts its spec selects, its adapter registry,
//! its batch and expert memory budgets and how unloads drain, behind the non-generic [`ExpertCompute`] handle the gRPC service
//! serves.

use crate::Result;
use moe_compute::{on_device, Backend, Device, OnBackend};
use moe_lora::RegistryLimits;
use moe_worker::{DrainLimits, ExpertCompute, ExpertHost, ExpertSpec};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a worker hosts besides its experts.
#[derive(Clone, Debug, Default)]
pub struct HostOptions {
    /// Adapter dir and limits, when the worker serves adapters' expert pairs.
    pub adapters: Option<(PathBuf, RegistryLimits)>,
    /// Working memory one request may need at most.
    pub max_batch_bytes: Option<usize>,
    /// Weight memory of the hosted experts at most (loads at run time are refused past it).
    pub max_expert_bytes: Option<usize>,
    /// How long an unload waits for routers to stop sending.
    pub drain: DrainLimits,
}

/// Loads the experts `spec` selects from `dir` onto `device`.
pub fn expert_host(
    device: Device,
    dir: &Path,
    spec: &ExpertSpec,
    options: &HostOptions,
) -> Result<Arc<dyn ExpertCompute>> {
    struct Host<'a>(&'a Path, &'a ExpertSpec, &'a HostOptions);
    impl OnBackend for Host<'_> {
        type Output = Result<Arc<dyn ExpertCompute>>;
        fn run<B: Backend>(self, backend: B) -> Self::Output {
            let Host(dir, spec, options) = self;
            let mut host = ExpertHost::load(dir, spec, backend)?;
            if let Some((adapter_dir, limits)) = &options.adapters {
                host = host.with_adapter_dir(adapter_dir.clone(), *limits);
            }
            let host = host.with_batch_budget(options.max_batch_bytes).with_drain_limits(options.drain);
            Ok(Arc::new(host.with_expert_budget(options.max_expert_bytes)?))
        }
    }
    let host = on_device(device, Host(dir, spec, options))??;
    tracing::info!(device = %host.device(), "experts loaded");
    Ok(host)
}
