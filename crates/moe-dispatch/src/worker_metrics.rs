//! What the gRPC transport records per worker: each layer's round-trip time by outcome, hedges
//! by which call answered first, calls that missed their deadline after losing a hedge, and the
//! (row, expert) pairs it was given per layer call; and per layer, how evenly the workers were
//! loaded (mean / max pairs, 1.0 = perfectly even). The series are made when the worker's
//! connection is (a layer's on its first call), so a dispatch only adds to atomics.

use moe_metrics::{Counter, Family, LatencyFamily, Registry};

type WorkerOutcome = [(&'static str, String); 2];

/// One worker's series.
#[derive(Clone, Debug)]
pub(crate) struct WorkerMetrics {
    pub ok: moe_metrics::Histogram,
    pub error: moe_metrics::Histogram,
    pub hedge_won_by_primary: Counter,
    pub hedge_won_by_replica: Counter,
    pub missed_deadlines: Counter,
    pub pairs: moe_metrics::Histogram,
}

/// Buckets of pairs per worker and layer call.
fn pairs_histogram() -> moe_metrics::Histogram {
    moe_metrics::Histogram::new([1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0])
}

/// Buckets of the balance, mean / max pairs over workers.
fn balance_histogram() -> moe_metrics::Histogram {
    moe_metrics::Histogram::new([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0])
}

/// The balance series of layer `layer`.
pub(crate) fn layer_balance(registry: &Registry, layer: usize) -> moe_metrics::Histogram {
    let family: moe_metrics::LatencyFamily<[(&'static str, String); 1]> = registry.histogram_family(
        "moe_dispatch_balance",
        "Per layer call, the mean over workers of the (row, expert) pairs each was given divided by the most any was given.",
        balance_histogram,
    );
    let series = family.get_or_create(&[("layer", layer.to_string())]).clone();
    series
}

/// Removes `worker`'s series (it left the membership), so a router whose workers come and go
/// does not export, and keep in memory, series for every worker it ever had.
pub(crate) fn forget(registry: &Registry, worker: &str) {
    let seconds: LatencyFamily<WorkerOutcome> =
        registry.latency_family("moe_dispatch_seconds", "One layer's expert round trip to a worker.");
    let hedges: Family<WorkerOutcome, Counter> = registry.counter_family(
        "moe_dispatch_hedges_total",
        "Dispatches sent to a replica as well because the worker was slow, by which answered first.",
    );
    let missed: Family<[(&'static str, String); 1], Counter> = registry.counter_family(
        "moe_dispatch_missed_deadlines_total",
        "Calls that lost to a hedge and then failed or missed their deadline (the worker is suspected).",
    );
    let pairs: LatencyFamily<[(&'static str, String); 1]> = registry.histogram_family(
        "moe_worker_pairs_per_call",
        "(row, expert) pairs a worker was given per layer call.",
        pairs_histogram,
    );
    let pair = |key: &'static str, value: &str| [("worker", worker.to_string()), (key, value.to_string())];
    seconds.remove(&pair("outcome", "ok"));
    seconds.remove(&pair("outcome", "error"));
    hedges.remove(&pair("winner", "primary"));
    hedges.remove(&pair("winner", "replica"));
    missed.remove(&[("worker", worker.to_string())]);
    pairs.remove(&[("worker", worker.to_string())]);
}

impl WorkerMetrics {
    pub fn new(registry: &Registry, worker: &str) -> Self {
        let seconds: LatencyFamily<WorkerOutcome> =
            registry.latency_family("moe_dispatch_seconds", "One layer's expert round trip to a worker.");
        let hedges: Family<WorkerOutcome, Counter> = registry.counter_family(
            "moe_dispatch_hedges_total",
            "Dispatches sent to a replica as well because the worker was slow, by which answered first.",
        );
        let missed: Family<[(&'static str, String); 1], Counter> = registry.counter_family(
            "moe_dispatch_missed_deadlines_total",
            "Calls that lost to a hedge and then failed or missed their deadline (the worker is suspected).",
        );
        let pair = |key: &'static str, value: &str| [("worker", worker.to_string()), (key, value.to_string())];
        let ok = seconds.get_or_create(&pair("outcome", "ok")).clone();
        let error = seconds.get_or_create(&pair("outcome", "error")).clone();
        let hedge_won_by_primary = hedges.get_or_create(&pair("winner", "primary")).clone();
        let hedge_won_by_replica = hedges.get_or_create(&pair("winner", "replica")).clone();
        let missed_deadlines = missed.get_or_create(&[("worker", worker.to_string())]).clone();
        let pairs: moe_metrics::LatencyFamily<[(&'static str, String); 1]> = registry.histogram_family(
            "moe_worker_pairs_per_call",
            "(row, expert) pairs a worker was given per layer call.",
            pairs_histogram,
        );
        let pairs = pairs.get_or_create(&[("worker", worker.to_string())]).clone();
        Self { ok, error, hedge_won_by_primary, hedge_won_by_replica, missed_deadlines, pairs }
    }
}
