//! `moe-metrics` is the process's metrics registry: counters, gauges and histograms with label
//! values, rendered in the Prometheus text format (`/metrics`). It is deliberately small: every
//! metric is named `moe_*` by its owner, label sets are bounded (outcomes, tenants from the
//! tenants file, workers, (layer, expert) pairs), and recording is a short lock on a map.
//! It knows nothing of what is measured.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex, MutexGuard};

/// Label values, in the order of the family's label names.
pub type Labels = Vec<String>;

#[derive(Clone, Debug)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Debug)]
enum Values {
    Counter(BTreeMap<Labels, f64>),
    Gauge(BTreeMap<Labels, f64>),
    Histogram { buckets: Vec<f64>, series: BTreeMap<Labels, Histogram> },
}

#[derive(Debug)]
struct Family {
    help: String,
    labels: Vec<String>,
    values: Values,
}

/// The registry. Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct Registry {
    families: Arc<Mutex<BTreeMap<String, Family>>>,
}

/// Latency buckets in seconds, 1 ms to 60 s.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0];

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn label_text(names: &[String], values: &[String], extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = names.iter().zip(values).map(|(n, v)| format!("{n}=\"{}\"", escape(v))).collect();
    if let Some((n, v)) = extra {
        parts.push(format!("{n}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Family>> {
        // Recording never leaves a family half-updated, so a poisoned lock is still consistent.
        self.families.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn family<'a>(
        map: &'a mut BTreeMap<String, Family>,
        name: &str,
        help: &str,
        labels: &[&str],
        make: impl FnOnce() -> Values,
    ) -> &'a mut Family {
        map.entry(name.to_string()).or_insert_with(|| Family {
            help: help.to_string(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
            values: make(),
        })
    }

    /// Adds `by` to a counter.
    pub fn inc(&self, name: &str, help: &str, labels: &[(&str, &str)], by: f64) {
        let mut m = self.lock();
        let names: Vec<&str> = labels.iter().map(|l| l.0).collect();
        let f = Self::family(&mut m, name, help, &names, || Values::Counter(BTreeMap::new()));
        if let Values::Counter(v) = &mut f.values {
            *v.entry(labels.iter().map(|l| l.1.to_string()).collect()).or_insert(0.0) += by;
        }
    }

    /// Sets a gauge.
    pub fn set(&self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        let mut m = self.lock();
        let names: Vec<&str> = labels.iter().map(|l| l.0).collect();
        let f = Self::family(&mut m, name, help, &names, || Values::Gauge(BTreeMap::new()));
        if let Values::Gauge(v) = &mut f.values {
            v.insert(labels.iter().map(|l| l.1.to_string()).collect(), value);
        }
    }

    /// Records one observation in a histogram with `buckets` (upper bounds, ascending).
    pub fn observe(&self, name: &str, help: &str, labels: &[(&str, &str)], buckets: &[f64], value: f64) {
        let mut m = self.lock();
        let names: Vec<&str> = labels.iter().map(|l| l.0).collect();
        let f = Self::family(&mut m, name, help, &names, || Values::Histogram {
            buckets: buckets.to_vec(),
            series: BTreeMap::new(),
        });
        if let Values::Histogram { buckets, series } = &mut f.values {
            let h = series.entry(labels.iter().map(|l| l.1.to_string()).collect()).or_insert_with(|| Histogram {
                counts: vec![0; buckets.len()],
                sum: 0.0,
                count: 0,
            });
            for (i, b) in buckets.iter().enumerate() {
                if value <= *b {
                    h.counts[i] += 1;
                }
            }
            h.sum += value;
            h.count += 1;
        }
    }

    /// The value of a counter or gauge series (tests and health checks).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let m = self.lock();
        let key: Labels = labels.iter().map(|l| l.1.to_string()).collect();
        match &m.get(name)?.values {
            Values::Counter(v) | Values::Gauge(v) => v.get(&key).copied(),
            Values::Histogram { series, .. } => series.get(&key).map(|h| h.count as f64),
        }
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let m = self.lock();
        let mut out = String::new();
        for (name, f) in m.iter() {
            let _ = writeln!(out, "# HELP {name} {}", f.help);
            match &f.values {
                Values::Counter(v) => {
                    let _ = writeln!(out, "# TYPE {name} counter");
                    for (labels, x) in v {
                        let _ = writeln!(out, "{name}{} {x}", label_text(&f.labels, labels, None));
                    }
                }
                Values::Gauge(v) => {
                    let _ = writeln!(out, "# TYPE {name} gauge");
                    for (labels, x) in v {
                        let _ = writeln!(out, "{name}{} {x}", label_text(&f.labels, labels, None));
                    }
                }
                Values::Histogram { buckets, series } => {
                    let _ = writeln!(out, "# TYPE {name} histogram");
                    for (labels, h) in series {
                        for (b, c) in buckets.iter().zip(&h.counts) {
                            let le = label_text(&f.labels, labels, Some(("le", b.to_string())));
                            let _ = writeln!(out, "{name}_bucket{le} {c}");
                        }
                        let inf = label_text(&f.labels, labels, Some(("le", "+Inf".into())));
                        let _ = writeln!(out, "{name}_bucket{inf} {}", h.count);
                        let l = label_text(&f.labels, labels, None);
                        let _ = writeln!(out, "{name}_sum{l} {}", h.sum);
                        let _ = writeln!(out, "{name}_count{l} {}", h.count);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let r = Registry::new();
        r.inc("moe_requests_total", "Requests by outcome.", &[("outcome", "ok")], 1.0);
        r.inc("moe_requests_total", "Requests by outcome.", &[("outcome", "ok")], 2.0);
        r.set("moe_queue_depth", "Waiting requests.", &[], 4.0);
        r.observe("moe_ttft_seconds", "Time to first token.", &[], &[0.1, 1.0], 0.5);
        let text = r.render();
        assert!(text.contains("# TYPE moe_requests_total counter\nmoe_requests_total{outcome=\"ok\"} 3\n"), "{text}");
        assert!(text.contains("moe_queue_depth 4\n"), "{text}");
        assert!(
            text.contains("moe_ttft_seconds_bucket{le=\"0.1\"} 0\nmoe_ttft_seconds_bucket{le=\"1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("moe_ttft_seconds_bucket{le=\"+Inf\"} 1\nmoe_ttft_seconds_sum 0.5\nmoe_ttft_seconds_count 1")
        );
        assert_eq!(r.value("moe_requests_total", &[("outcome", "ok")]), Some(3.0));
    }

    #[test]
    fn label_values_are_escaped() {
        let r = Registry::new();
        r.inc("moe_x_total", "x", &[("tenant", "a\"b\\c\nd")], 1.0);
        assert!(r.render().contains(r#"moe_x_total{tenant="a\"b\\c\nd"} 1"#));
    }
}
