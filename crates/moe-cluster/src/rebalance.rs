//! Rebalancing the workers from observed load: read what each worker hosts and may hold
//! (`Describe`: its experts, bytes per expert, its `--max-expert-mb`), plan with
//! `moe-placement`, and apply the plan step by step through `LoadExperts` / `UnloadExperts`.
//! Used by `moe placement apply` and by a router's `--rebalance-every` loop.
//!
//! A plan is checked before anything is sent ([`moe_placement::check_plan`]: no expert may be
//! left without a holder, no worker over its capacity). Steps run in plan order (loads before
//! the unloads they make room for), consecutive steps of one kind on one worker as one call; a
//! failed call stops the plan there: the worker that refused is unchanged (its calls are all
//! or none), the steps before it stay applied, and each prefix of a checked plan is itself a
//! valid placement.
//!
//! Planners are fenced: `apply` stops before any step once `still_planner` says the role is
//! lost (a router whose planner lease lapsed), and before every unload it reads what the workers
//! host now and refuses a step that would leave an expert without a holder. Two plans made from
//! the same snapshot are each valid but not together (each unloads a different replica of one
//! expert); the fresh read is what keeps interleaved plans from orphaning an expert.

use moe_dispatch::{connect_worker, GrpcTransportConfig};
use moe_placement::{check_plan, WorkerSlots};
pub use moe_placement::{Cluster, Plan, Step};
use moe_proto::v1::expert_worker_client::ExpertWorkerClient;
use moe_proto::v1::{ChangeExpertsRequest, DescribeRequest, HostedLayer};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RebalanceError {
    #[error("{worker}: {message}")]
    Worker { worker: String, message: String },
    #[error("the plan is refused: {0}")]
    Refused(#[from] moe_placement::PlanError),
    #[error("{applied} of {total} steps applied, then {worker} refused {action}: {message}")]
    Stopped { applied: usize, total: usize, worker: String, action: &'static str, message: String },
    #[error("{applied} of {total} steps applied, then this router lost the planner role; the rest is left to the new planner")]
    Fenced { applied: usize, total: usize },
}

/// How long one worker call may take (an unload waits for its drain).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

async fn client(
    addr: &str,
    transport: &GrpcTransportConfig,
) -> Result<ExpertWorkerClient<tonic::transport::Channel>, RebalanceError> {
    connect_worker(addr, transport)
        .await
        .map_err(|e| RebalanceError::Worker { worker: addr.to_string(), message: e.to_string() })
}

/// What `addr` hosts and how many experts it may hold: its budget over its bytes per expert,
/// or `default_capacity` when it has no budget.
pub async fn describe_worker(
    addr: &str,
    default_capacity: usize,
    transport: &GrpcTransportConfig,
) -> Result<WorkerSlots, RebalanceError> {
    let mut c = client(addr, transport).await?;
    let d = tokio::time::timeout(Duration::from_secs(10), c.describe(DescribeRequest {}))
        .await
        .map_err(|_| RebalanceError::Worker { worker: addr.into(), message: "Describe timed out".into() })?
        .map_err(|s| RebalanceError::Worker { worker: addr.into(), message: format!("Describe: {}", s.message()) })?
        .into_inner();
    let experts = d.layers.iter().flat_map(|l| l.experts.iter().map(move |&e| (l.layer as usize, e as usize)));
    let capacity = match (d.max_expert_bytes, d.bytes_per_expert) {
        (max, per) if max > 0 && per > 0 => (max / per) as usize,
        _ => default_capacity,
    };
    Ok(WorkerSlots { name: addr.to_string(), experts: experts.collect(), capacity })
}

/// Tokens per (layer, expert), all adapters together, from per-adapter counts.
pub fn total_load(num_layers: usize, num_experts: usize, per_adapter: &[Vec<u64>]) -> Vec<u64> {
    let mut total = vec![0u64; num_layers * num_experts];
    for tokens in per_adapter {
        for (t, n) in total.iter_mut().zip(tokens) {
            *t += n;
        }
    }
    total
}

/// Plans for `cluster` (see `moe_placement::plan`).
pub fn plan(cluster: &Cluster, target: f64, max_steps: usize) -> Result<Plan, RebalanceError> {
    Ok(moe_placement::plan(cluster, target, max_steps)?)
}

/// Applies `steps` to the workers of `cluster` (see the module doc), reaching them as
/// `transport` says (TLS); returns how many steps ran.
pub async fn apply(
    cluster: &Cluster,
    steps: &[Step],
    transport: &GrpcTransportConfig,
    still_planner: &(dyn Fn() -> bool + Sync),
) -> Result<usize, RebalanceError> {
    check_plan(cluster, steps)?;
    let mut done = 0;
    while done < steps.len() {
        if !still_planner() {
            return Err(RebalanceError::Fenced { applied: done, total: steps.len() });
        }
        let (worker, unload) = match steps[done] {
            Step::Load { worker, .. } => (worker, false),
            Step::Unload { worker, .. } => (worker, true),
        };
        // The run of steps of this kind on this worker.
        let run: Vec<(usize, usize)> = steps[done..]
            .iter()
            .map_while(|s| match *s {
                Step::Load { worker: w, layer, expert } if w == worker && !unload => Some((layer, expert)),
                Step::Unload { worker: w, layer, expert } if w == worker && unload => Some((layer, expert)),
                _ => None,
            })
            .collect();
        let addr = &cluster.workers[worker].name;
        let action = if unload { "UnloadExperts" } else { "LoadExperts" };
        let stopped = |message: String| RebalanceError::Stopped {
            applied: done,
            total: steps.len(),
            worker: addr.clone(),
            action,
            message,
        };
        if unload {
            // What the workers host now, not what the plan saw: another planner may have moved
            // replicas since.
            let mut now = Vec::with_capacity(cluster.workers.len());
            for w in &cluster.workers {
                now.push(describe_worker(&w.name, w.capacity, transport).await.map_err(|e| stopped(e.to_string()))?);
            }
            for &(l, e) in &run {
                let others = now.iter().enumerate().any(|(i, w)| i != worker && w.experts.contains(&(l, e)));
                if !others {
                    return Err(stopped(format!(
                        "unloading layer {l} expert {e} would leave it without a holder (the workers changed since \
                         the plan was made: another planner?)"
                    )));
                }
            }
        }
        let mut by_layer: std::collections::BTreeMap<usize, Vec<u32>> = Default::default();
        for &(l, e) in &run {
            by_layer.entry(l).or_default().push(e as u32);
        }
        let request = ChangeExpertsRequest {
            experts: by_layer
                .into_iter()
                .map(|(layer, experts)| HostedLayer { layer: layer as u32, experts })
                .collect(),
        };
        let mut c = client(addr, transport).await.map_err(|e| stopped(e.to_string()))?;
        let call = async {
            if unload {
                c.unload_experts(request).await
            } else {
                c.load_experts(request).await
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| stopped("timed out".into()))?
            .map_err(|s| stopped(s.message().to_string()))?;
        tracing::info!(worker = %addr, action, experts = run.len(), "placement step applied");
        done += run.len();
    }
    Ok(done)
}
