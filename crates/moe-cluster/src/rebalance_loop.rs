//! `moe router --rebalance-every SECS`: the routers of a cluster elect one planner through etcd
//! (`moe_membership::hold_planner`); every SECS the planner reads its own expert load of the
//! last two intervals,
//! asks the live workers what they hold and may hold, plans (`moe-placement`) and applies the
//! plan (`crate::rebalance`). Routers that are not the planner only wait. Exposed as
//! `moe_placement_planner` (1 on the planner), `moe_placement_rounds_total` and
//! `moe_placement_steps_total`.

use crate::rebalance;
use moe_membership::{EtcdOptions, WorkerRecord};
use moe_placement::Cluster;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What a rebalancing router needs.
pub struct Rebalancer {
    pub engine: moe_router::Engine,
    pub etcd: EtcdOptions,
    pub workers: watch::Receiver<Vec<WorkerRecord>>,
    pub every: Duration,
    /// Stop once every layer's balance reaches this.
    pub target: f64,
    /// This router's name in the planner key.
    pub id: String,
    /// How this router reaches its workers (TLS).
    pub transport: moe_dispatch::GrpcTransportConfig,
    pub metrics: moe_metrics::Registry,
}

impl Rebalancer {
    /// Competes for the planner role and rebalances while holding it, until `cancel`. Returns
    /// the election task, which revokes the planner lease once cancelled: await it on shutdown,
    /// so another router takes over at once instead of after the lease's TTL.
    pub fn spawn(self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let (holding_tx, holding) = watch::channel(false);
        let ttl = self.every.clamp(Duration::from_secs(3), Duration::from_secs(15));
        let election = tokio::spawn(moe_membership::hold_planner(
            self.etcd.clone(),
            self.id.clone(),
            ttl,
            holding_tx,
            cancel.clone(),
        ));
        let planner = self.metrics.gauge("moe_placement_planner", "1 while this router is the cluster's planner");
        let rounds =
            self.metrics.counter("moe_placement_rounds_total", "Rebalancing rounds this router ran as the planner");
        let steps = self.metrics.counter("moe_placement_steps_total", "Placement steps this router applied");
        tokio::spawn(async move {
            let mut holding_now = holding.clone();
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    changed = holding_now.changed() => {
                        if changed.is_err() {
                            // The election task ended (cancelled): nothing more to plan.
                            planner.set(0);
                            return;
                        }
                        planner.set(i64::from(*holding_now.borrow_and_update()));
                        continue;
                    }
                    _ = tokio::time::sleep(self.every) => {}
                }
                if !*holding.borrow() {
                    continue;
                }
                rounds.inc();
                match self.round(&holding).await {
                    Ok(n) => {
                        steps.inc_by(n as u64);
                    }
                    Err(e) => tracing::warn!(error = %e, "rebalancing round failed"),
                }
            }
        });
        election
    }

    /// One round: plan from the load window and apply. Returns the steps applied.
    async fn round(&self, holding: &watch::Receiver<bool>) -> Result<usize, rebalance::RebalanceError> {
        // The last two intervals (at least one 5 s bucket): a shift in the tenant mix shows at once.
        let s = self.engine.expert_load().snapshot_within(Instant::now(), 2 * self.every);
        let per_adapter: Vec<Vec<u64>> = s.adapters.into_iter().map(|a| a.tokens).collect();
        let load = rebalance::total_load(s.num_layers, s.num_experts, &per_adapter);
        if load.iter().all(|&t| t == 0) {
            return Ok(0);
        }
        let ours = self.engine.model_config().fingerprint();
        let addrs: Vec<String> =
            self.workers.borrow().iter().filter(|r| r.fingerprint == ours).map(|r| r.address.clone()).collect();
        let mut workers = Vec::with_capacity(addrs.len());
        for a in &addrs {
            workers.push(rebalance::describe_worker(a, s.num_layers * s.num_experts, &self.transport).await?);
        }
        let cluster = Cluster { num_layers: s.num_layers, num_experts: s.num_experts, workers, load };
        let plan = rebalance::plan(&cluster, self.target, 16)?;
        if plan.steps.is_empty() || !*holding.borrow() {
            return Ok(0);
        }
        let (before, after) = (moe_placement::Plan::mean(&plan.before), moe_placement::Plan::mean(&plan.after));
        tracing::info!(steps = plan.steps.len(), before, after, "applying a placement plan");
        let still_planner = || *holding.borrow();
        rebalance::apply(&cluster, &plan.steps, &self.transport, &still_planner).await
    }
}
