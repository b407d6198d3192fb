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

/// The per-worker families (registered once; later calls find them).
struct Families {
    seconds: LatencyFamily<WorkerOutcome>,
    hedges: Family<WorkerOutcome, Counter>,
    missed: Family<[(&'static str, String); 1], Counter>,
    pairs: LatencyFamily<[(&'static str, String); 1]>,
}

impl Families {
    fn of(registry: &Registry) -> Self {
        Self {
            seconds: registry.latency_family("moe_dispatch_seconds", "One layer's expert round trip to a worker."),
            hedges: registry.counter_family(
                "moe_dispatch_hedges_total",
                "Dispatches sent to a replica as well because the worker was slow, by which answered first.",
            ),
            missed: registry.counter_family(
                "moe_dispatch_missed_deadlines_total",
                "Calls that lost to a hedge and then failed or missed their deadline (the worker is suspected).",
            ),
            pairs: registry.histogram_family(
                "moe_worker_pairs_per_call",
                "(row, expert) pairs a worker was given per layer call.",
                pairs_histogram,
            ),
        }
    }
}

fn pair(worker: &str, key: &'static str, value: &str) -> WorkerOutcome {
    [("worker", worker.to_string()), (key, value.to_string())]
}

/// Removes `worker`'s series (it left the membership), so a router whose workers come and go
/// does not export, and keep in memory, series for every worker it ever had.
pub(crate) fn forget(registry: &Registry, worker: &str) {
    let f = Families::of(registry);
    f.seconds.remove(&pair(worker, "outcome", "ok"));
    f.seconds.remove(&pair(worker, "outcome", "error"));
    f.hedges.remove(&pair(worker, "winner", "primary"));
    f.hedges.remove(&pair(worker, "winner", "replica"));
    f.missed.remove(&[("worker", worker.to_string())]);
    f.pairs.remove(&[("worker", worker.to_string())]);
}

impl WorkerMetrics {
    pub fn new(registry: &Registry, worker: &str) -> Self {
        let f = Families::of(registry);
        let ok = f.seconds.get_or_create(&pair(worker, "outcome", "ok")).clone();
        let error = f.seconds.get_or_create(&pair(worker, "outcome", "error")).clone();
        let hedge_won_by_primary = f.hedges.get_or_create(&pair(worker, "winner", "primary")).clone();
        let hedge_won_by_replica = f.hedges.get_or_create(&pair(worker, "winner", "replica")).clone();
        let missed_deadlines = f.missed.get_or_create(&[("worker", worker.to_string())]).clone();
        let pairs = f.pairs.get_or_create(&[("worker", worker.to_string())]).clone();
        Self { ok, error, hedge_won_by_primary, hedge_won_by_replica, missed_deadlines, pairs }
    }
}
