//! The report of `moe bench`: decode throughput by batch size against the memory-bandwidth
//! roofline, prefill against the GEMM roofline, time to first token and inter-token latency by
//! batch size (median and 99th percentile), and the peers' figures when `benches/hf_compare.py
//! --report DIR` left them in `DIR/peers.json`. Drawn from the report's JSON, so an earlier
//! run's `report.json` can be drawn again.

use super::charts::{bar_chart, line_chart, Axes, Series};
use super::{Chart, Report};
use serde_json::Value;

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// `(batch, value)` of each decode run of a topology, `pick` choosing the value.
fn decode_points(t: &Value, pick: impl Fn(&Value) -> f64) -> Vec<(f64, f64)> {
    list(&t["decode"]).iter().map(|d| (num(&d["batch"]), pick(d))).collect()
}

/// The report of a `moe bench` run (`json`: its report), with peers (`peers.json`:
/// `{"peers": [{"name", "prefill_tokens_per_s", "decode": [{"batch", "tokens_per_s"}]}]}`).
pub fn bench_report(json: &Value, peers: Option<&Value>) -> anyhow::Result<Report> {
    let c = &json["ceilings"];
    let topologies = list(&json["topologies"]);
    let fairness = json.get("fairness").filter(|f| f.is_object());
    anyhow::ensure!(
        !topologies.is_empty() || fairness.is_some(),
        "the report has neither topologies nor fairness figures (not a `moe bench` report?)"
    );
    let peers = peers.map(|p| list(&p["peers"])).unwrap_or(&[]);
    let bw_roof = num(&c["decode_roofline_tokens_per_s"]);
    let compute_roof = num(&c["prefill_roofline_tokens_per_s"]);
    let err = |e: String| anyhow::anyhow!("drawing a chart: {e}");

    let mut charts = Vec::new();
    if !topologies.is_empty() {
        // Decode against the roofline: a step of batch b reads the weights once for b tokens, up to
        // the compute ceiling.
        let batches: Vec<f64> = topologies.iter().flat_map(|t| decode_points(t, |_| 0.0)).map(|p| p.0).collect();
        let max_batch = batches.iter().copied().fold(1.0, f64::max);
        let mut roof = Vec::new();
        let mut b = 1.0;
        while b <= max_batch * 1.0001 {
            roof.push((b, (b * bw_roof).min(compute_roof)));
            b *= 2.0;
        }
        let mut decode: Vec<Series> = topologies
            .iter()
            .map(|t| Series {
                name: t["name"].as_str().unwrap_or("moe").into(),
                points: decode_points(t, |d| num(&d["tokens_per_s"])),
                ceiling: false,
            })
            .collect();
        for p in peers {
            decode.push(Series {
                name: p["name"].as_str().unwrap_or("peer").into(),
                points: list(&p["decode"]).iter().map(|d| (num(&d["batch"]), num(&d["tokens_per_s"]))).collect(),
                ceiling: false,
            });
        }
        decode.push(Series { name: "roofline (copy bandwidth, then GEMM peak)".into(), points: roof, ceiling: true });
        let axes = Axes { title: "Decode throughput", x: "batch size", y: "tokens/s", log_x: true, log_y: true };
        charts.push(Chart {
            svg: line_chart(&axes, &decode).map_err(err)?,
            caption: format!(
                "Decode tokens/s by batch size. The dashed roofline is batch x {bw_roof:.0} tokens/s (the weights a \
                 token reads, {:.1} MB, at the measured copy bandwidth of {:.1} GB/s), capped by the GEMM peak.",
                num(&c["bytes_per_decoded_token"]) / 1e6,
                num(&c["memory_copy_gbps"])
            ),
        });

        // Prefill against the GEMM roofline.
        let mut groups: Vec<(String, Vec<f64>)> = topologies
            .iter()
            .map(|t| (t["name"].as_str().unwrap_or("moe").to_string(), vec![num(&t["prefill"]["tokens_per_s"])]))
            .collect();
        for p in peers {
            groups.push((p["name"].as_str().unwrap_or("peer").into(), vec![num(&p["prefill_tokens_per_s"])]));
        }
        groups.push(("GEMM roofline".into(), vec![compute_roof]));
        charts.push(Chart {
            svg: bar_chart("Prefill throughput", "tokens/s", &["prefill tokens/s".into()], &groups).map_err(err)?,
            caption: format!(
                "Prefill tokens/s of a {}-token prompt, against the roofline of the measured GEMM peak ({:.1} GFLOP/s).",
                topologies[0]["prefill"]["prompt_tokens"].as_u64().unwrap_or(0),
                num(&c["gemm_peak_gflops"])
            ),
        });

        // Latency distributions by batch size.
        for (key, title, what) in [
            ("ttft_ms", "Time to first token", "time from submission to the first token"),
            ("itl_ms", "Inter-token latency", "time between consecutive tokens of a request"),
        ] {
            let mut series = Vec::new();
            for t in topologies {
                let name = t["name"].as_str().unwrap_or("moe");
                series.push(Series {
                    name: format!("{name}, median"),
                    points: decode_points(t, |d| num(&d[key]["median"])),
                    ceiling: false,
                });
                series.push(Series {
                    name: format!("{name}, p99"),
                    points: decode_points(t, |d| num(&d[key]["p99"])),
                    ceiling: false,
                });
            }
            let axes = Axes { title, x: "batch size", y: "milliseconds", log_x: true, log_y: true };
            charts.push(Chart {
                svg: line_chart(&axes, &series).map_err(err)?,
                caption: format!("The {what}, median and 99th percentile over the requests of each decode run."),
            });
        }
    }
    if let Some(f) = fairness {
        let side = |k: &str| {
            let s = &f[k];
            vec![
                num(&s["idle_ttft_ms"]["median"]),
                num(&s["loaded_ttft_ms"]["median"]),
                num(&s["loaded_ttft_ms"]["p99"]),
            ]
        };
        let groups = vec![("fair".to_string(), side("fair")), ("fcfs".to_string(), side("fcfs"))];
        let series = ["alone, median".to_string(), "beside a flood, median".into(), "beside a flood, p99".into()];
        charts.push(Chart {
            svg: bar_chart("Time to first token of a light tenant", "milliseconds", &series, &groups).map_err(err)?,
            caption: format!(
                "A tenant's one-at-a-time requests alone and while another keeps 64 in flight, under fair scheduling \
                 and first-come-first-served. Token share of a tenant with 16 in flight beside one with 64: fair {:.2}, \
                 fcfs {:.2}.",
                num(&f["fair"]["smaller_tenant_share"]),
                num(&f["fcfs"]["smaller_tenant_share"])
            ),
        });
    }
    let mut rows = vec![
        ("model".to_string(), json["model"].as_str().unwrap_or("").to_string()),
        ("commit".into(), json["commit"].as_str().unwrap_or("unknown").to_string()),
        ("threads".into(), json["threads"].to_string()),
        ("memory copy bandwidth".into(), format!("{:.1} GB/s", num(&c["memory_copy_gbps"]))),
        ("GEMM peak (backend kernel)".into(), format!("{:.1} GFLOP/s", num(&c["gemm_peak_gflops"]))),
    ];
    for t in topologies {
        let name = t["name"].as_str().unwrap_or("moe");
        if let Some(d1) = list(&t["decode"]).first() {
            let tps = num(&d1["tokens_per_s"]);
            rows.push((
                format!("{name}: decode batch {}", d1["batch"]),
                format!("{tps:.0} tokens/s ({:.0}% of the roofline)", 100.0 * tps / bw_roof),
            ));
        }
        let pre = num(&t["prefill"]["tokens_per_s"]);
        rows.push((
            format!("{name}: prefill"),
            format!("{pre:.0} tokens/s ({:.0}% of the GEMM roofline)", 100.0 * pre / compute_roof),
        ));
    }
    let mut json = json.clone();
    if !peers.is_empty() {
        json["peers"] = Value::Array(peers.to_vec());
    }
    Ok(Report { title: "moe bench".into(), rows, charts, json })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bench_report_has_its_four_charts_and_the_peers() {
        let d = |b: u64, t: f64| {
            serde_json::json!({"batch": b, "new_tokens": 8, "tokens_per_s": t,
                "ttft_ms": {"median": 10.0 * b as f64, "p99": 20.0 * b as f64},
                "itl_ms": {"median": 5.0, "p99": 9.0}})
        };
        let json = serde_json::json!({
            "model": "m", "threads": 2, "commit": "abc",
            "ceilings": {"memory_copy_gbps": 10.0, "gemm_peak_gflops": 100.0, "bytes_per_decoded_token": 1e8,
                         "decode_roofline_tokens_per_s": 100.0, "prefill_roofline_tokens_per_s": 1000.0},
            "topologies": [{"name": "embedded", "prefill": {"prompt_tokens": 512, "tokens_per_s": 700.0, "ttft_ms": 700.0},
                            "decode": [d(1, 70.0), d(16, 280.0), d(64, 440.0)]}]
        });
        let peers = serde_json::json!({"peers": [{"name": "transformers", "prefill_tokens_per_s": 300.0,
                                                  "decode": [{"batch": 1, "tokens_per_s": 20.0}]}]});
        let r = bench_report(&json, Some(&peers)).expect("report");
        assert_eq!(r.charts.len(), 4);
        assert!(r.charts[0].svg.contains("transformers") && r.charts[1].svg.contains("transformers"));
        assert!(r.rows.iter().any(|(k, v)| k.contains("decode batch 1") && v.contains("70% of the roofline")));
        assert_eq!(r.json["peers"][0]["name"], "transformers");
        assert!(bench_report(&serde_json::json!({}), None).is_err());
    }
}
