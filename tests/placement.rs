//! Expert load per adapter and what placement reads from it, on the trained demo model with a
//! router in front of worker processes: `ExpertLoad` counts exactly the tokens each adapter's
//! requests routed (top-k per token per layer), the two tenants' gate adapters load different
//! experts, replicas share an expert's work, the balance is measured per layer, and
//! `moe placement plan` proposes a valid plan that does not make any layer worse.

mod common;

use common::*;
use moe_proto::v1::generate_request::Prompt;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{ExpertLoadRequest, GenerateRequest, SamplingParams, TokenIds};

const MAX_NEW: u32 = 6;

async fn generate(addr: &str, ids: Vec<u32>, adapter: &str) -> Vec<u32> {
    let mut c = InferenceClient::connect(format!("http://{addr}")).await.expect("connect");
    let req = GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids })),
        sampling: Some(SamplingParams { max_new_tokens: Some(MAX_NEW), ..Default::default() }),
        adapter_id: adapter.into(),
        ..Default::default()
    };
    c.generate(req).await.expect("generate").into_inner().token_ids
}

fn series_sum(text: &str, prefix: &str) -> f64 {
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[test]
fn expert_load_counts_each_adapters_tokens_and_the_planner_reads_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("demo");
    moe_demo::write_trained_demo(&model).expect("write the demo");
    let d = model.to_str().expect("utf8");
    // Two shards, and a third worker holding every expert: replicas for all.
    let (workers, joined) = spawn_workers(d, &["shard:0/2", "shard:1/2", "all"]);
    let addrs: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
    let http = format!("127.0.0.1:{}", free_port());
    let ads = model.join("adapters");
    let router = spawn_server(&[
        "router",
        "--model",
        d,
        "--workers",
        &joined,
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        &http,
        "--adapter-dir",
        ads.to_str().expect("utf8"),
    ]);
    let rt = tokio::runtime::Runtime::new().expect("rt");
    // Prompts shorter than a KV page: the prefix cache reuses nothing, every token is computed.
    let prompts = ["The value of the ", "def f(x):\n    re", "When a module is", "import sys\nfor a"];
    let mut forwarded = std::collections::BTreeMap::new();
    for adapter in ["prose", "code"] {
        for p in prompts {
            let ids: Vec<u32> = p.bytes().map(u32::from).collect();
            let out = rt.block_on(generate(&router.addr, ids.clone(), adapter));
            assert_eq!(out.len(), MAX_NEW as usize);
            // The last generated token is sampled, not forwarded.
            *forwarded.entry(adapter).or_insert(0u64) += (ids.len() + out.len() - 1) as u64;
        }
    }
    let load = rt
        .block_on(async {
            let mut c = InferenceClient::connect(format!("http://{}", router.addr)).await.expect("connect");
            c.expert_load(ExpertLoadRequest {}).await
        })
        .expect("ExpertLoad")
        .into_inner();
    let (layers, experts) = (load.num_layers as usize, load.num_experts as usize);
    assert_eq!((layers, experts), (4, 8));
    let of =
        |name: &str| load.adapters.iter().find(|a| a.adapter == name).unwrap_or_else(|| panic!("{name}: {load:?}"));
    let shares = |tokens: &[u64], layer: usize| -> Vec<f64> {
        let row = &tokens[layer * experts..(layer + 1) * experts];
        let sum: u64 = row.iter().sum();
        row.iter().map(|&t| t as f64 / sum as f64).collect()
    };
    let mut tvd_max = 0.0f64;
    for layer in 0..layers {
        for adapter in ["prose", "code"] {
            let sum: u64 = of(adapter).tokens[layer * experts..(layer + 1) * experts].iter().sum();
            assert_eq!(sum, 2 * forwarded[adapter], "{adapter} layer {layer}: top-2 of every forwarded token");
        }
        let (p, c) = (shares(&of("prose").tokens, layer), shares(&of("code").tokens, layer));
        tvd_max = tvd_max.max(0.5 * p.iter().zip(&c).map(|(a, b)| (a - b).abs()).sum::<f64>());
    }
    assert!(tvd_max > 0.05, "the two gate adapters route alike (TVD {tvd_max})");
    assert!(load.adapters.iter().all(|a| a.adapter != "base"), "no base-model request was made");

    // The same on /metrics, and the balance and per-worker pairs of the dispatches.
    let text = rt.block_on(async {
        reqwest::get(format!("http://{http}/metrics")).await.expect("scrape").text().await.expect("body")
    });
    let window = series_sum(&text, "moe_expert_load_window_tokens{adapter=\"prose\"");
    assert_eq!(window as u64, 2 * forwarded["prose"] * layers as u64, "{text}");
    assert!(series_sum(&text, "moe_dispatch_balance_count{layer=\"0\"}") > 0.0);
    // The replica holding everything and the shards all computed a share of the pairs.
    for w in &addrs {
        let pairs = series_sum(&text, &format!("moe_worker_pairs_per_call_sum{{worker=\"{w}\"}}"));
        assert!(pairs > 0.0, "worker {w} computed nothing:\n{text}");
    }

    // The planner on this load: a valid plan that makes no layer worse.
    let out =
        moe(&["placement", "plan", "--endpoint", &router.addr, "--workers", &joined, "--capacity", "32", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let plan = out.json();
    let (before, after) = (plan["before"].as_array().expect("before"), plan["after"].as_array().expect("after"));
    assert_eq!(before.len(), layers);
    for (b, a) in before.iter().zip(after) {
        assert!(a.as_f64() >= b.as_f64(), "{plan}");
    }
    // A worker that is not there is a clear error.
    let bad = moe(&["placement", "plan", "--endpoint", &router.addr, "--workers", "127.0.0.1:1", "--capacity", "4"]);
    bad.assert_error(&["127.0.0.1:1"]);
}
