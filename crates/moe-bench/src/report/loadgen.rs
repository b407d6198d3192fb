//! The report of `moe loadgen`: the distribution of request latency and time to first token as
//! cumulative curves (share of requests at or under a time), and the run's outcomes.

use super::charts::{line_chart, Axes, Series};
use super::{Chart, Report};
use serde_json::Value;

/// The cumulative curve of `samples`: (value, share of samples at or under it).
fn cdf(samples: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite() && *x > 0.0).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len().max(1) as f64;
    v.iter().enumerate().map(|(i, &x)| (x, (i + 1) as f64 / n)).collect()
}

/// The report of a load run: `json` is its printed report; `samples` holds the finished
/// requests' latencies and the streams' times to first token (`latency_ms`, `ttft_ms`).
pub fn loadgen_report(json: &Value, latency_ms: &[f64], ttft_ms: &[f64]) -> anyhow::Result<Report> {
    let err = |e: String| anyhow::anyhow!("drawing a chart: {e}");
    let mut series = vec![Series { name: "request latency".into(), points: cdf(latency_ms), ceiling: false }];
    if !ttft_ms.is_empty() {
        series.push(Series { name: "time to first token (streams)".into(), points: cdf(ttft_ms), ceiling: false });
    }
    let axes =
        Axes { title: "Latency distribution", x: "milliseconds", y: "share of requests", log_x: true, log_y: false };
    let charts = vec![Chart {
        svg: line_chart(&axes, &series).map_err(err)?,
        caption: "Cumulative share of the requests that finished within a time: the curve's height at x is the \
                  share at or under x ms (its median where it crosses 0.5, p99 at 0.99)."
            .into(),
    }];
    let f = |k: &str| json[k].as_f64().unwrap_or(0.0);
    let rows = vec![
        ("commit".to_string(), super::commit()),
        ("requests".into(), format!("{} at concurrency {}", json["requests"], json["concurrency"])),
        ("throughput".into(), format!("{:.1} requests/s, {:.0} tokens/s", f("requests_per_s"), f("tokens_per_s"))),
        (
            "latency p50 / p90 / p99".into(),
            format!(
                "{:.0} / {:.0} / {:.0} ms",
                json["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
                json["latency_ms"]["p90"].as_f64().unwrap_or(0.0),
                json["latency_ms"]["p99"].as_f64().unwrap_or(0.0)
            ),
        ),
        ("outcomes".into(), json["outcomes"].to_string()),
    ];
    let mut json = json.clone();
    json["commit"] = Value::String(super::commit());
    json["samples"] = serde_json::json!({ "latency_ms": latency_ms, "ttft_ms": ttft_ms });
    Ok(Report { title: "moe loadgen".into(), rows, charts, json })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cdf_rises_to_one_and_the_report_keeps_the_samples() {
        assert_eq!(cdf(&[3.0, 1.0, 2.0, f64::NAN]), vec![(1.0, 1.0 / 3.0), (2.0, 2.0 / 3.0), (3.0, 1.0)]);
        let json = serde_json::json!({"requests": 3, "concurrency": 1, "outcomes": {"ok": 3}});
        let r = loadgen_report(&json, &[10.0, 20.0, 30.0], &[5.0]).expect("report");
        assert_eq!(r.charts.len(), 1);
        assert_eq!(r.json["samples"]["latency_ms"].as_array().map(Vec::len), Some(3));
    }
}
