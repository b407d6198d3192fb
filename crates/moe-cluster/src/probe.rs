//! Probes of a running cluster for the benchmarks: the round trip of one layer's expert call to
//! remote workers, timed through the router's own dispatcher (the path a decode step takes), so
//! a benchmark measures it without reaching into the dispatcher or the backend.

use crate::{ClusterError, Result};
use moe_compute::cpu::{CpuBackend, HostTensor};
use moe_compute::ExpertPlan;
use moe_dispatch::GrpcTransportConfig;
use moe_model::{ExpertExecutor, ExpertRoutes, LayerCall, ModelConfig};
use std::path::Path;
use std::time::Instant;

/// `rounds` timings (microseconds) of one row's expert call on the first MoE layer of the model
/// in `dir`, through a dispatcher over the workers at `addrs`.
pub fn dispatch_round_trips_us(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    addrs: &[String],
    transport: GrpcTransportConfig,
    rounds: usize,
) -> Result<Vec<f64>> {
    let config = ModelConfig::from_dir(dir)?;
    let d = rt.block_on(crate::remote_dispatcher(&config, addrs, transport))?;
    let layer = config
        .moe_layers()
        .first()
        .copied()
        .ok_or_else(|| ClusterError::Invalid("the model has no MoE layer".into()))?;
    let h = config.hidden_size;
    let backend = CpuBackend::new();
    let x = HostTensor { rows: 1, cols: h, data: vec![0.1; h] };
    let choices: Vec<(u32, f32)> = (0..config.top_k as u32).map(|e| (e, 1.0 / config.top_k as f32)).collect();
    let mut plan = ExpertPlan::default();
    plan.rebuild(config.num_experts, config.top_k, &choices);
    let routes = || ExpertRoutes {
        top_k: config.top_k,
        choices: &choices,
        plan: &plan,
        adapters: &[],
        row_adapter: &[],
        row_request: &[],
    };
    let samples = std::thread::scope(|s| {
        s.spawn(|| {
            let mut out = HostTensor { rows: 1, cols: h, data: vec![0.0; h] };
            let mut unserved = Vec::new();
            let mut v = Vec::new();
            for _ in 0..rounds {
                let t = Instant::now();
                let call = LayerCall {
                    backend: &backend,
                    layer,
                    x: &x,
                    routes: routes(),
                    out: &mut out,
                    unserved: &mut unserved,
                };
                let _ = ExpertExecutor::<CpuBackend>::run_experts(&d, call);
                v.push(t.elapsed().as_secs_f64() * 1e6);
            }
            v
        })
        .join()
    })
    .map_err(|_| ClusterError::Invalid("the dispatch thread panicked".into()))?;
    Ok(samples)
}
