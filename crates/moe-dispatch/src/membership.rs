//! Following membership: the live workers (from etcd, an in-memory registry, or a static list
//! whose workers described themselves) become a placement and a gRPC dispatcher. Changes apply
//! as differences: a worker that stays keeps its connection, its open stream and its suspect
//! state; only workers that came or went open or close connections, and a re-sent identical
//! snapshot (etcd re-sends the whole set after every reconnect) changes nothing. One policy for
//! a worker that serves another model or lists experts the model does not have, wherever it
//! comes from: skip it, log it once, list it in `refused`.

use crate::dispatcher::Dispatcher;
use crate::grpc::{GrpcTransport, GrpcTransportConfig};
use crate::placement::Placement;
use moe_compute::Backend;
use moe_membership::WorkerRecord;
use moe_model::{ExpertExecutor, ExpertTicket, LayerCall, ModelConfig, ModelError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// The usable workers of a membership snapshot, their placement, and what is missing.
#[derive(Debug)]
pub struct MembershipPlan {
    pub addrs: Vec<String>,
    pub placement: Placement,
    /// `id (address): reason` for every worker left out.
    pub refused: Vec<String>,
    /// The (layer, expert) pairs no usable worker holds.
    pub missing: Vec<(usize, u32)>,
}

impl MembershipPlan {
    /// Every expert of `config` has a holder.
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty()
    }

    pub fn describe_missing(&self) -> String {
        Placement::describe_missing(&self.missing)
    }
}

/// Keeps the workers that serve this model with experts it has, in record order, and that
/// compute the same bits: the first record that announces its arithmetic (`numerics`) sets it
/// for the plan, and a worker announcing another is refused (failing over or hedging to it would
/// change a request's tokens). Every CPU kernel set announces the same arithmetic; a cluster
/// mixing CPU and GPU workers, or GPUs of different models, is refused until it is made one kind.
/// Records without the field (older workers) are accepted.
pub fn plan_membership(config: &ModelConfig, records: &[WorkerRecord]) -> MembershipPlan {
    let ours = config.fingerprint();
    let mut addrs = Vec::new();
    let mut refused = Vec::new();
    let mut placement = Placement::new(config.num_layers, config.num_experts);
    let mut numerics: Option<&str> = None;
    for r in records {
        if !r.numerics.is_empty() && r.fingerprint == ours {
            match numerics {
                Some(n) if n != r.numerics => {
                    tracing::error!(worker = %r.id, address = %r.address, theirs = %r.numerics, ours = n,
                        "refusing worker: it computes different bits from the cluster's other workers");
                    refused.push(format!(
                        "{} ({}): computes with {:?}, the cluster with {n:?}; replicas must give the same bits (run every worker on one kind of device, or pin --cpu-kernels)",
                        r.id, r.address, r.numerics
                    ));
                    continue;
                }
                Some(_) => {}
                None => numerics = Some(&r.numerics),
            }
        }
        if r.fingerprint != ours {
            tracing::error!(worker = %r.id, address = %r.address, theirs = %r.fingerprint, %ours,
                "refusing worker: it serves a different model (fingerprint mismatch)");
            refused.push(format!(
                "{} ({}): serves a different model (fingerprint {}, ours {ours})",
                r.id, r.address, r.fingerprint
            ));
            continue;
        }
        if let Some(why) = crate::grpc::address_problem(&r.address) {
            // One bad record is refused alone; the others still make the transport.
            tracing::error!(worker = %r.id, address = %r.address, %why, "refusing worker: bad address");
            refused.push(format!("{} ({}): {why}", r.id, r.address));
            continue;
        }
        let fits = r.experts.iter().all(|(layer, experts)| {
            (*layer as usize) < config.num_layers
                && config.is_moe_layer(*layer as usize)
                && experts.iter().all(|&e| (e as usize) < config.num_experts)
        });
        if !fits {
            tracing::error!(worker = %r.id, address = %r.address, "refusing worker: its expert list does not fit the model");
            refused.push(format!("{} ({}): its expert list does not fit the model", r.id, r.address));
            continue;
        }
        let w = addrs.len();
        for (layer, experts) in &r.experts {
            // Checked just above, so this cannot fail.
            let _ = placement.add(w, *layer as usize, experts);
        }
        addrs.push(r.address.clone());
    }
    let missing = placement.missing(&config.moe_layers());
    MembershipPlan { addrs, placement, refused, missing }
}

/// What readiness and `ModelInfo` report about the worker pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MembershipStatus {
    pub workers: usize,
    /// Empty when every expert has a live holder.
    pub missing: String,
    pub refused: Vec<String>,
}

/// An expert executor that follows membership (see the module doc).
pub struct MembershipDispatcher {
    config: ModelConfig,
    transport: GrpcTransportConfig,
    current: RwLock<Option<Dispatcher<GrpcTransport>>>,
    /// The snapshot `current` was built from (sorted by id).
    applied: Mutex<Option<Vec<WorkerRecord>>>,
    status: RwLock<MembershipStatus>,
    rebuilds: AtomicUsize,
}

impl MembershipDispatcher {
    /// No workers yet: not ready until the first snapshot arrives.
    pub fn new(config: ModelConfig, transport: GrpcTransportConfig) -> Self {
        Self {
            config,
            transport,
            current: RwLock::new(None),
            applied: Mutex::new(None),
            status: RwLock::new(MembershipStatus { workers: 0, missing: "no workers yet".into(), refused: Vec::new() }),
            rebuilds: AtomicUsize::new(0),
        }
    }

    pub fn status(&self) -> MembershipStatus {
        self.status.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// How many snapshots changed the dispatcher (identical re-sends do not count).
    pub fn rebuilds(&self) -> usize {
        self.rebuilds.load(Ordering::Relaxed)
    }

    /// The dispatcher of the current membership, if any worker is registered.
    pub fn current(&self) -> Option<Dispatcher<GrpcTransport>> {
        self.current.read().ok().and_then(|c| c.clone())
    }

    fn current_for(&self, layer: usize) -> moe_model::Result<Dispatcher<GrpcTransport>> {
        self.current().ok_or_else(|| ModelError::Experts { layer, message: "no workers are registered".into() })
    }

    /// Applies a snapshot; returns whether every expert has a live holder. Call inside the
    /// runtime that drives the streams.
    pub fn apply(&self, records: &[WorkerRecord]) -> bool {
        let mut sorted = records.to_vec();
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        {
            let Ok(mut applied) = self.applied.lock() else { return false };
            if applied.as_ref() == Some(&sorted) {
                return self.status().missing.is_empty();
            }
            *applied = Some(sorted.clone());
        }
        let plan = plan_membership(&self.config, &sorted);
        let previous = self.current();
        match GrpcTransport::lazy_reusing(&plan.addrs, self.transport.clone(), previous.as_ref().map(|d| d.transport()))
        {
            Ok(t) => {
                let d = Dispatcher::new(t, plan.placement.clone(), plan.addrs.len());
                if let Some(old) = &previous {
                    for (name, until) in old.suspects_by_name() {
                        if let Some(w) = plan.addrs.iter().position(|a| *a == name) {
                            d.set_suspect_until(w, until);
                        }
                    }
                }
                if let Ok(mut c) = self.current.write() {
                    *c = Some(d);
                }
                // The series of workers that left go with them.
                if let Some(old) = &previous {
                    for gone in old.transport().addresses().iter().filter(|a| !plan.addrs.contains(a)) {
                        crate::worker_metrics::forget(&self.transport.metrics, gone);
                    }
                }
                self.rebuilds.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                // Health must not claim what the dispatcher in use cannot do: not ready until a
                // later snapshot builds (the next one is applied even if identical).
                tracing::error!(error = %e, "cannot build the worker transport");
                if let Ok(mut applied) = self.applied.lock() {
                    *applied = None;
                }
                if let Ok(mut s) = self.status.write() {
                    *s = MembershipStatus {
                        workers: plan.addrs.len(),
                        missing: format!("the worker transport could not be built: {e}"),
                        refused: plan.refused,
                    };
                }
                return false;
            }
        }
        let missing = plan.describe_missing();
        let complete = plan.is_complete();
        if complete {
            tracing::info!(workers = plan.addrs.len(), "every expert has a live holder: ready");
        } else {
            tracing::warn!(workers = plan.addrs.len(), missing = %missing, "not ready: experts without a live holder");
        }
        if let Ok(mut s) = self.status.write() {
            *s = MembershipStatus { workers: plan.addrs.len(), missing, refused: plan.refused };
        }
        complete
    }
}

impl<B: Backend> ExpertExecutor<B> for MembershipDispatcher {
    fn run_experts(&self, call: LayerCall<'_, B>) -> moe_model::Result<()> {
        self.current_for(call.layer)?.run_experts(call)
    }

    fn overlaps(&self) -> bool {
        true
    }

    /// Starts on the current dispatcher; the ticket holds it, so the call ends where it began
    /// even if membership changes before the finish.
    fn start_experts(&self, call: &LayerCall<'_, B>) -> moe_model::Result<ExpertTicket<B>> {
        self.current_for(call.layer)?.start_experts(call)
    }
}

/// Follows `members` (call inside the runtime): returns the dispatcher and a readiness watch.
pub fn follow_membership(
    config: ModelConfig,
    mut members: tokio::sync::watch::Receiver<Vec<WorkerRecord>>,
    transport: GrpcTransportConfig,
) -> (Arc<MembershipDispatcher>, tokio::sync::watch::Receiver<bool>) {
    let d = Arc::new(MembershipDispatcher::new(config, transport));
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let dd = d.clone();
    tokio::spawn(async move {
        loop {
            let snapshot = members.borrow_and_update().clone();
            let ready = dd.apply(&snapshot);
            ready_tx.send_replace(ready);
            if members.changed().await.is_err() {
                return;
            }
        }
    });
    (d, ready_rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, address: &str, config: &ModelConfig) -> WorkerRecord {
        let experts =
            config.moe_layers().into_iter().map(|l| (l as u32, (0..config.num_experts as u32).collect())).collect();
        WorkerRecord {
            id: id.into(),
            address: address.into(),
            experts,
            device: "cpu".into(),
            fingerprint: config.fingerprint(),
            version: String::new(),
            numerics: String::new(),
        }
    }

    /// A worker announcing other arithmetic than the first one's is refused, with the reason;
    /// records that announce none (older workers) are kept.
    #[test]
    fn workers_with_other_numerics_are_refused() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mixtral");
        let config = ModelConfig::from_dir(&dir).expect("config");
        let with = |id: &str, addr: &str, n: &str| WorkerRecord { numerics: n.into(), ..record(id, addr, &config) };
        let records = vec![
            with("a", "127.0.0.1:1", "cpu-canonical-dot8-v1"),
            with("b", "127.0.0.1:2", "cuda:NVIDIA H200:Cublas"),
            with("c", "127.0.0.1:3", ""),
            with("d", "127.0.0.1:4", "cpu-canonical-dot8-v1"),
        ];
        let plan = plan_membership(&config, &records);
        assert_eq!(plan.addrs, vec!["127.0.0.1:1", "127.0.0.1:3", "127.0.0.1:4"]);
        assert_eq!(plan.refused.len(), 1, "{:?}", plan.refused);
        assert!(plan.refused[0].starts_with("b (127.0.0.1:2): computes with"), "{}", plan.refused[0]);
        assert!(plan.is_complete());
    }

    /// A record whose address does not parse (an IPv6 pod IP without brackets) is refused alone,
    /// with a hint; the others, bracketed IPv6 included, make the plan.
    #[test]
    fn a_bad_address_is_refused_alone() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mixtral");
        let config = ModelConfig::from_dir(&dir).expect("config");
        let records = [
            record("a", "127.0.0.1:50061", &config),
            record("b", "fd00::1:50061", &config),
            record("c", "[fd00::2]:50061", &config),
            record("d", "worker-3", &config),
        ];
        let plan = plan_membership(&config, &records);
        assert_eq!(plan.addrs, vec!["127.0.0.1:50061".to_string(), "[fd00::2]:50061".to_string()]);
        assert!(plan.is_complete());
        assert_eq!(plan.refused.len(), 2, "{:?}", plan.refused);
        assert!(plan.refused[0].contains("[fd00::1]:50061"), "{:?}", plan.refused);
        assert!(plan.refused[1].contains("no port"), "{:?}", plan.refused);
    }
}
