//! What the gRPC transport records per worker: each layer's round-trip time by outcome, hedges
//! by which call answered first, and calls that missed their deadline after losing a hedge. The
//! series are made when the worker's connection is, so a dispatch only adds to atomics.

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
        Self { ok, error, hedge_won_by_primary, hedge_won_by_replica, missed_deadlines }
    }
}
