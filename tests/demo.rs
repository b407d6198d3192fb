//! The trained demo model and what the project shows with it: `moe generate --demo` writes
//! words for prose prompts, each tenant's gate adapter lowers its own domain's held-out loss and
//! routes the same text to other experts than the other tenant's (`moe demo --json`, measured by
//! this build), `serve --demo --tenants demo` admits the demo tenants with their keys, and every
//! query of the Grafana dashboard (`deploy/grafana/moe.json`) names a metric a router exports.

mod common;

use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Of the whitespace-separated words of length ≥ 3, the share made only of ASCII letters.
fn letter_word_share(text: &str) -> (f64, usize) {
    let words: Vec<&str> = text.split_whitespace().filter(|w| w.len() >= 3).collect();
    let letters = words.iter().filter(|w| w.chars().all(|c| c.is_ascii_alphabetic())).count();
    (letters as f64 / words.len().max(1) as f64, words.len())
}

#[test]
fn the_demo_model_writes_words_for_prose_prompts() {
    let prompts = ["The value of the ", "In this section we describe how ", "When a function is called, "];
    for prompt in prompts {
        let out = moe(&["generate", "--demo", "--prompt", prompt, "--max-new-tokens", "96", "--json"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let text = out.json()["text"].as_str().expect("text").to_string();
        let (share, n) = letter_word_share(&text);
        assert!(n >= 5, "{prompt:?} gave too few words: {text:?}");
        assert!(share >= 0.6, "{prompt:?}: only {:.0}% of words are letters: {text:?}", share * 100.0);
    }
}

#[test]
fn tenant_adapters_lower_their_own_loss_and_route_differently() {
    let out = moe(&["demo", "--json", "--max-new-tokens", "8"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v = out.json();
    let loss = |adapter: &str, domain: &str| {
        v["adapters"][adapter]["heldout_loss"][domain].as_f64().unwrap_or_else(|| panic!("{adapter}/{domain}: {v}"))
    };
    for (adapter, domain) in [("prose", "prose"), ("code", "code"), ("attn", "code")] {
        let (base, with) = (loss("base", domain), loss(adapter, domain));
        assert!(with < base - 0.005, "{adapter} on {domain}: {with:.4} is not below the base's {base:.4}");
    }
    let tvd = v["tvd_prose_code"]["distance"].as_f64().expect("tvd");
    assert!(tvd >= 0.1, "prose and code route alike: TVD {tvd}");
    // The histograms are shares of routed tokens: every layer sums to 1.
    for layer in v["adapters"]["prose"]["expert_usage"].as_array().expect("usage") {
        let sum: f64 = layer.as_array().expect("layer").iter().filter_map(Value::as_f64).sum();
        assert!((sum - 1.0).abs() < 1e-9, "{sum}");
    }
}

#[test]
fn the_demo_tenants_are_served_with_their_keys() {
    let server = spawn_server(&["serve", "--demo", "--listen", "127.0.0.1:0", "--tenants", "demo"]);
    let run = |key: &str, adapter: &str| {
        let args =
            ["generate", "--endpoint", &server.addr, "--prompt", "The ", "--max-new-tokens", "4", "--api-key", key];
        let mut args = args.to_vec();
        if !adapter.is_empty() {
            args.extend(["--adapter", adapter]);
        }
        moe(&args)
    };
    assert_eq!(run("demo-writers-key-0001", "prose").code, 0);
    assert_eq!(run("demo-coders-key-0001", "code").code, 0);
    assert_eq!(run("demo-coders-key-0001", "").code, 0);
    run("demo-writers-key-0001", "code").assert_error(&["PermissionDenied", "code"]);
    run("not-a-demo-key-000001", "prose").assert_error(&["Unauthenticated"]);
}

/// The metric families a scrape declares, as the sample names they produce, with the labels
/// seen on each sample name.
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(family), Some(kind)) = (it.next(), it.next()) else { continue };
            let samples: Vec<String> = match kind {
                "counter" => vec![format!("{family}_total")],
                "histogram" => ["_bucket", "_sum", "_count"].iter().map(|s| format!("{family}{s}")).collect(),
                _ => vec![family.to_string()],
            };
            for s in samples {
                names.entry(s).or_default();
            }
        } else if !line.starts_with('#') {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            let labels = line.split_once('{').and_then(|(_, r)| r.split_once('}')).map(|(l, _)| l).unwrap_or("");
            let entry = names.entry(name.to_string()).or_default();
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                entry.insert(pair.split('=').next().unwrap_or("").to_string());
            }
        }
    }
    names
}

/// Every `moe_*` identifier in a PromQL expression, and the labels it groups by.
fn queried(expr: &str) -> (Vec<String>, Vec<String>) {
    let mut metrics = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("moe_") {
        let start = i + at;
        let end = start
            + expr[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(expr.len() - start);
        if start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            metrics.push(expr[start..end].to_string());
        }
        i = end;
    }
    let mut by = Vec::new();
    for part in expr.split("by (").skip(1) {
        if let Some((labels, _)) = part.split_once(')') {
            by.extend(labels.split(',').map(|l| l.trim().to_string()).filter(|l| l != "le" && !l.is_empty()));
        }
    }
    (metrics, by)
}

#[test]
fn every_dashboard_query_names_an_exported_metric() {
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/moe.json"),
        )
        .expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    // A router with tenants in front of two workers exports every family there is.
    let tmp = tempfile::tempdir().expect("tmp");
    let tenants = tmp.path().join("tenants.toml");
    std::fs::write(&tenants, "[[tenants]]\nname = \"t\"\napi_key = \"key-0123456789abcdef\"\nadapters = [\"*\"]\n")
        .expect("write");
    let dir = fixture("mixtral");
    let d = dir.to_str().expect("utf8");
    let (_workers, addrs) = spawn_workers(d, &["shard:0/2", "shard:1/2"]);
    let http = format!("127.0.0.1:{}", free_port());
    // With tenants, Prometheus scrapes the metrics listener (the public /metrics needs a key).
    let metrics = format!("127.0.0.1:{}", free_port());
    let t = tenants.to_str().expect("utf8");
    let adapters = tmp.path().join("adapters");
    std::fs::create_dir(&adapters).expect("mkdir");
    let a = adapters.to_str().expect("utf8");
    let router = spawn_server(&[
        "router",
        "--model",
        d,
        "--workers",
        &addrs,
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        &http,
        "--metrics-listen",
        &metrics,
        "--tenants",
        t,
        "--adapter-dir",
        a,
    ]);
    let args = ["generate", "--endpoint", &router.addr, "--token-ids", "1,2,3", "--max-new-tokens", "3"];
    let out = moe(&[&args[..], &["--api-key", "key-0123456789abcdef"]].concat());
    assert_eq!(out.code, 0, "{}", out.stderr);
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let text = rt.block_on(async {
        let public = reqwest::get(format!("http://{http}/metrics")).await.expect("scrape");
        assert_eq!(public.status().as_u16(), 401, "the public /metrics needs a key with tenants");
        reqwest::get(format!("http://{metrics}/metrics")).await.expect("scrape").text().await.expect("body")
    });
    let names = exported(&text);
    assert!(names.contains_key("moe_expert_tokens_total") && names.contains_key("moe_dispatch_seconds_bucket"));

    let mut exprs: Vec<(String, String)> = Vec::new();
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "only {} panels", panels.len());
    for p in panels {
        let title = p["title"].as_str().expect("every panel has a title").to_string();
        let kind = p["type"].as_str().expect("every panel has a type");
        for key in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
        }
        if kind == "row" {
            continue;
        }
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            exprs.push((
                title.clone(),
                t["expr"].as_str().unwrap_or_else(|| panic!("{title}: a target without expr")).into(),
            ));
        }
    }
    for v in dash["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = v["query"]["query"].as_str() {
            exprs.push((format!("variable {}", v["name"]), q.to_string()));
        }
    }
    let kinds: BTreeSet<&str> = panels.iter().filter_map(|p| p["type"].as_str()).collect();
    assert!(kinds.contains("heatmap"), "the expert load heatmap is missing: {kinds:?}");
    for (title, expr) in &exprs {
        let (metrics, by) = queried(expr);
        assert!(!metrics.is_empty(), "{title}: {expr} queries no moe_ metric");
        let mut labels = BTreeSet::new();
        for m in &metrics {
            let seen = names.get(m).unwrap_or_else(|| panic!("{title}: {m} is not exported (in {expr})"));
            labels.extend(seen.iter().cloned());
        }
        for l in by {
            // Labels appear once a series has a sample; the families with none yet are checked by name.
            let sampled = metrics.iter().any(|m| names.get(m).is_some_and(|s| !s.is_empty()));
            assert!(!sampled || labels.contains(&l), "{title}: no metric of {expr} has the label {l} ({labels:?})");
        }
    }
}
