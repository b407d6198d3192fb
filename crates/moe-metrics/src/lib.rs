//! `moe-metrics` is the process's metrics registry, a thin layer over `prometheus-client`.
//! Each metric family is registered once, by name, and its owner keeps the handle it gets back
//! (a clone shares the same values), so recording is an atomic add with no lookup by name and no
//! allocation; hot paths (per token, per layer and expert, per worker call) hold metrics or
//! series handles made up front. Asking for a name a second time returns the family already
//! registered, so two owners (the engine and the HTTP scrape handler) can share a gauge.
//! Rendering is the OpenMetrics text format (`/metrics`), which Prometheus scrapes natively.
//! It knows nothing of what is measured.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::TypedMetric;
use prometheus_client::registry::Metric;
use std::any::Any;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::Histogram;

/// The content type of [`Registry::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets in seconds, 1 ms to 60 s.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0];

/// A histogram with [`LATENCY_BUCKETS`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// A family of latency histograms, one per label set.
pub type LatencyFamily<S> = Family<S, Histogram, fn() -> Histogram>;

struct Inner {
    registry: prometheus_client::registry::Registry,
    /// What each name was registered as (a clone of the handle), so a second request shares it.
    known: HashMap<String, Box<dyn Any + Send + Sync>>,
    /// (family name, help, type) of every registration, in order: a family with no series yet
    /// is still declared in the scrape, so dashboards and alerts can find every name at once.
    descriptors: Vec<(String, String, &'static str)>,
}

/// The registry. Cheap to clone (shared).
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                registry: prometheus_client::registry::Registry::default(),
                known: HashMap::new(),
                descriptors: Vec::new(),
            })),
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("families", &self.lock().known.len()).finish()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Registration never leaves the map half-updated, so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The metric registered as `name`, registering `make()` first if there is none. A name
    /// already registered with another type is a programming error: the caller then gets an
    /// unregistered metric (recorded nowhere) rather than a panic in a server.
    fn get_or_register<M>(&self, name: &str, help: &str, make: impl FnOnce() -> M) -> M
    where
        M: Metric + TypedMetric + Clone + Any + Send + Sync,
    {
        let mut inner = self.lock();
        if let Some(existing) = inner.known.get(name) {
            let found = existing.downcast_ref::<M>().cloned();
            debug_assert!(found.is_some(), "metric {name} registered twice with different types");
            return found.unwrap_or_else(make);
        }
        let metric = make();
        // prometheus-client appends `_total` to counters itself.
        let base = match M::TYPE {
            prometheus_client::metrics::MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        // prometheus-client ends every help text with a period itself.
        inner.registry.register(base, help.trim_end_matches('.'), metric.clone());
        let kind = match M::TYPE {
            prometheus_client::metrics::MetricType::Counter => "counter",
            prometheus_client::metrics::MetricType::Gauge => "gauge",
            prometheus_client::metrics::MetricType::Histogram => "histogram",
            _ => "unknown",
        };
        let help = format!("{}.", help.trim_end_matches('.'));
        inner.descriptors.push((base.to_string(), help, kind));
        inner.known.insert(name.to_string(), Box::new(metric.clone()));
        metric
    }

    /// A counter without labels. `name` is the exposed one, ending in `_total`.
    pub fn counter(&self, name: &str, help: &str) -> Counter {
        self.get_or_register(name, help, Counter::default)
    }

    /// A gauge without labels.
    pub fn gauge(&self, name: &str, help: &str) -> Gauge {
        self.get_or_register(name, help, Gauge::default)
    }

    /// A latency histogram without labels.
    pub fn latency(&self, name: &str, help: &str) -> Histogram {
        self.get_or_register(name, help, latency_histogram)
    }

    /// A family of counters, one per label set (`name` ends in `_total`).
    pub fn counter_family<S>(&self, name: &str, help: &str) -> Family<S, Counter>
    where
        S: EncodeLabelSet + Clone + Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
    {
        self.get_or_register(name, help, Family::default)
    }

    /// A family of gauges, one per label set.
    pub fn gauge_family<S>(&self, name: &str, help: &str) -> Family<S, Gauge>
    where
        S: EncodeLabelSet + Clone + Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
    {
        self.get_or_register(name, help, Family::default)
    }

    /// A family of latency histograms, one per label set.
    pub fn latency_family<S>(&self, name: &str, help: &str) -> LatencyFamily<S>
    where
        S: EncodeLabelSet + Clone + Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
    {
        self.get_or_register(name, help, || Family::new_with_constructor(latency_histogram as fn() -> Histogram))
    }

    /// A histogram without labels, with the buckets `make` gives.
    pub fn histogram(&self, name: &str, help: &str, make: fn() -> Histogram) -> Histogram {
        self.get_or_register(name, help, make)
    }

    /// A family of histograms, one per label set, each with the buckets `make` gives.
    pub fn histogram_family<S>(&self, name: &str, help: &str, make: fn() -> Histogram) -> LatencyFamily<S>
    where
        S: EncodeLabelSet + Clone + Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
    {
        self.get_or_register(name, help, || Family::new_with_constructor(make))
    }

    /// Everything, in the OpenMetrics text format (ends with `# EOF`). Families with no series
    /// yet (prometheus-client leaves them out) are declared by their `# HELP`/`# TYPE` lines.
    pub fn render(&self) -> String {
        let inner = self.lock();
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would only truncate the scrape.
        let _ = prometheus_client::encoding::text::encode(&mut out, &inner.registry);
        let body_end = out.strip_suffix("# EOF\n").map_or(out.len(), str::len);
        let mut empty = String::new();
        for (name, help, kind) in &inner.descriptors {
            if !out.contains(&format!("# TYPE {name} {kind}\n")) {
                empty.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            }
        }
        out.insert_str(body_end, &empty);
        out
    }

    /// The value of one sample as rendered: `name` is the exposed sample name (a counter's ends in
    /// `_total`, a histogram's `_count` or `_sum`), `labels` the series' labels in order.
    /// For tests and health checks, not for hot paths.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        sample(&self.render(), name, labels)
    }
}

/// The value of the sample `name{labels}` in OpenMetrics or Prometheus text.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let series = if labels.is_empty() {
        name.to_string()
    } else {
        let parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
        format!("{name}{{{}}}", parts.join(","))
    };
    text.lines().find_map(|l| l.strip_prefix(series.as_str())?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    type Outcome = [(&'static str, &'static str); 1];

    #[test]
    fn renders_openmetrics_and_shares_families_by_name() {
        let r = Registry::new();
        let requests = r.counter_family::<Outcome>("moe_requests_total", "Requests by outcome.");
        requests.get_or_create(&[("outcome", "ok")]).inc();
        // A second owner asking for the same name shares the same series.
        let again = r.counter_family::<Outcome>("moe_requests_total", "Requests by outcome.");
        again.get_or_create(&[("outcome", "ok")]).inc_by(2);
        r.gauge("moe_queue_depth", "Waiting requests.").set(4);
        r.latency("moe_ttft_seconds", "Time to first token.").observe(0.5);
        let text = r.render();
        assert!(text.contains("# HELP moe_requests Requests by outcome.\n# TYPE moe_requests counter\n"), "{text}");
        assert!(text.contains("moe_requests_total{outcome=\"ok\"} 3\n"), "{text}");
        assert!(text.contains("moe_queue_depth 4\n"), "{text}");
        assert!(text.contains("moe_ttft_seconds_bucket{le=\"0.25\"} 0\n"), "{text}");
        assert!(text.contains("moe_ttft_seconds_bucket{le=\"0.5\"} 1\n"), "{text}");
        assert!(text.contains("moe_ttft_seconds_sum 0.5\nmoe_ttft_seconds_count 1\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        // A family with no series yet is declared all the same.
        r.counter_family::<Outcome>("moe_refusals_total", "Refusals.");
        let text = r.render();
        assert!(text.ends_with("# HELP moe_refusals Refusals.\n# TYPE moe_refusals counter\n# EOF\n"), "{text}");
        assert_eq!(r.value("moe_requests_total", &[("outcome", "ok")]), Some(3.0));
        assert_eq!(r.value("moe_ttft_seconds_count", &[]), Some(1.0));
        assert_eq!(r.value("moe_queue_depth", &[]), Some(4.0));
        assert_eq!(r.value("moe_queue", &[]), None);
    }

    #[test]
    fn label_values_are_escaped() {
        let r = Registry::new();
        let f = r.counter_family::<[(&'static str, String); 1]>("moe_x_total", "x");
        f.get_or_create(&[("tenant", "a\"b\\c\nd".to_string())]).inc();
        let text = r.render();
        assert!(text.contains(r#"moe_x_total{tenant="a\"b\\c\nd"} 1"#), "{text}");
        assert_eq!(r.value("moe_x_total", &[("tenant", "a\"b\\c\nd")]), Some(1.0));
    }
}
