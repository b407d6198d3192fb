//! The report of `moe bench-placement`: balance and projected throughput per traffic phase with
//! static sharding and with the router's planner, and each tenant's (adapter's) tokens per expert
//! as the router counted them, which is what the planner balances.

use super::charts::bar_chart;
use super::{Chart, Report};
use serde_json::Value;

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// The report of a `moe bench-placement` run (`json`: its JSON output).
pub fn placement_report(json: &Value) -> anyhow::Result<Report> {
    let (s, p) = (list(&json["static_sharding"]), list(&json["planner"]));
    anyhow::ensure!(!p.is_empty(), "the report has no planner phases (not a `moe bench-placement` report?)");
    let err = |e: String| anyhow::anyhow!("drawing a chart: {e}");
    let runs = ["static sharding".to_string(), "planner".to_string()];
    let per_phase = |key: &str| -> Vec<(String, Vec<f64>)> {
        p.iter()
            .enumerate()
            .map(|(i, ph)| {
                let st = s.get(i).map_or(f64::NAN, |x| x[key].as_f64().unwrap_or(f64::NAN));
                (ph["phase"].as_str().unwrap_or("?").to_string(), vec![st, ph[key].as_f64().unwrap_or(f64::NAN)])
            })
            .collect()
    };
    let mut charts = vec![
        Chart {
            svg: bar_chart("Balance per phase", "mean / max load over workers", &runs, &per_phase("balance"))
                .map_err(err)?,
            caption: "Mean over layer calls of mean / max (row, expert) pairs per worker (1 = even), per traffic \
                      phase, with the experts sharded statically and with the planner moving replicas."
                .into(),
        },
        Chart {
            svg: bar_chart("Projected decode throughput", "tokens/s", &runs, &per_phase("projected_tokens_per_s"))
                .map_err(err)?,
            caption: "Tokens/s projected for workers on separate machines: the slowest worker's pairs at the \
                      measured cost per pair, plus the round trip, per decode step."
                .into(),
        },
    ];
    let loads = list(&json["expert_load"]);
    if !loads.is_empty() {
        let names: Vec<String> = loads.iter().map(|l| l["adapter"].as_str().unwrap_or("?").to_string()).collect();
        let experts = loads.iter().map(|l| list(&l["tokens_per_expert"]).len()).max().unwrap_or(0);
        let groups: Vec<(String, Vec<f64>)> = (0..experts)
            .map(|e| {
                let v = loads.iter().map(|l| l["tokens_per_expert"][e].as_f64().unwrap_or(0.0)).collect();
                (format!("E{e}"), v)
            })
            .collect();
        charts.push(Chart {
            svg: bar_chart("Expert load per tenant", "tokens (all MoE layers)", &names, &groups).map_err(err)?,
            caption: "Tokens each expert received per adapter over the router's last minute of the planner run \
                      (summed over the MoE layers): each tenant's adapter routes to its own experts."
                .into(),
        });
    }
    let rows = vec![
        ("commit".to_string(), json["commit"].as_str().unwrap_or("unknown").to_string()),
        ("round trip".into(), format!("{} us", json["rtt_us"])),
        ("concurrent requests".into(), json["concurrency"].to_string()),
        ("planner every".into(), format!("{} s (target {})", json["rebalance_every_s"], json["target"])),
        ("cost of one (row, expert) pair".into(), format!("{:.1} us", json["pair_cost_us"].as_f64().unwrap_or(0.0))),
    ];
    Ok(Report { title: "moe bench-placement".into(), rows, charts, json: json.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_placement_report_charts_phases_and_tenant_load() {
        let ph =
            |name: &str, b: f64| serde_json::json!({"phase": name, "balance": b, "projected_tokens_per_s": 100.0 * b});
        let json = serde_json::json!({
            "rtt_us": 200, "concurrency": 32, "rebalance_every_s": 5, "target": 0.95, "pair_cost_us": 3.0,
            "static_sharding": [ph("prose-heavy", 0.6)], "planner": [ph("prose-heavy", 0.9)],
            "expert_load": [{"adapter": "prose", "tokens_per_expert": [5, 0, 9]}, {"adapter": "code", "tokens_per_expert": [0, 7, 1]}]
        });
        let r = placement_report(&json).expect("report");
        assert_eq!(r.charts.len(), 3);
        assert!(r.charts[2].svg.contains("prose") && r.charts[2].svg.contains("E2"));
    }
}
