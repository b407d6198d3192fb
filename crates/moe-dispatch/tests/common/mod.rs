//! What the dispatch tests share: one MoE layer call on any executor, on the CPU backend.

use moe_compute::cpu::{CpuBackend, HostTensor};
use moe_compute::ExpertPlan;
use moe_model::{ExpertExecutor, ExpertRoutes, LayerCall};

/// Layer 0 over the rows `x` (`h` values each), row r routed to `choices[r*top_k..]` among
/// `experts` experts, no adapters. Returns the output rows and the rows that were not served.
pub fn run_layer(
    executor: &dyn ExpertExecutor<CpuBackend>,
    x: &[f32],
    h: usize,
    experts: usize,
    top_k: usize,
    choices: &[(u32, f32)],
) -> (Vec<f32>, Vec<(u32, String)>) {
    let rows = x.len() / h;
    let mut plan = ExpertPlan::default();
    plan.rebuild(experts, top_k, choices);
    let routes = ExpertRoutes { top_k, choices, plan: &plan, adapters: &[], row_adapter: &[], row_request: &[] };
    let backend = CpuBackend::new();
    let xt = HostTensor { rows, cols: h, data: x.to_vec() };
    let mut out = HostTensor { rows, cols: h, data: vec![0.0; rows * h] };
    let mut unserved = Vec::new();
    let call = LayerCall { backend: &backend, layer: 0, x: &xt, routes, out: &mut out, unserved: &mut unserved };
    executor.run_experts(call).expect("the layer call");
    (out.data, unserved)
}
