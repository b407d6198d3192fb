//! Faults between a router process and its worker processes on loopback, through a relay that
//! can slow or partition one worker's link: a slow worker is hedged to a replica, a frozen one
//! is hedged and suspected by default (adaptive deadlines), a partitioned
//! worker is left out after the dispatch deadline and used again once healed, and a worker whose
//! copy of an adapter differs fails only the requests using that adapter, and a worker over its
//! batch memory budget refuses the step instead of allocating. Greedy outputs equal a
//! failure-free run and every request ends in exactly one terminal state.

mod common;

use common::relay::Relay;
use common::*;
use moe_proto::v1::generate_request::Prompt;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{GenerateRequest, SamplingParams, TokenIds};
use std::time::Duration;
use tonic::Code;

fn generate(router: &str, ids: &str, n: &str) -> Vec<u32> {
    let out = moe(&["generate", "--endpoint", router, "--token-ids", ids, "--max-new-tokens", n, "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    u32s(&out.json()["token_ids"])
}

fn router(model: &str, workers: &[&str], extra: &[&str]) -> Server {
    let workers = workers.join(",");
    let mut args = vec!["router", "--model", model, "--workers", &workers, "--listen", "127.0.0.1:0", "--wire", "f32"];
    args.extend_from_slice(extra);
    spawn_server(&args)
}

/// Two workers holding every expert, the first behind a relay that can slow or freeze it.
fn relayed_pair(model: &str) -> (Server, Server, Relay) {
    let a = spawn_server(&["worker", "--model", model, "--experts", "all", "--listen", "127.0.0.1:0"]);
    let b = spawn_server(&["worker", "--model", model, "--experts", "all", "--listen", "127.0.0.1:0"]);
    let relay = Relay::start(&a.addr);
    (a, b, relay)
}

/// A router's `/metrics` text.
fn scrape(rt: &tokio::runtime::Runtime, http: &str) -> String {
    rt.block_on(async {
        reqwest::get(format!("http://{http}/metrics")).await.expect("scrape").text().await.expect("body")
    })
}

fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One worker's link is slow (every chunk held 150 ms): with `--hedge-after-ms`, each dispatch
/// to it is sent to the replica too and the replica's answer is used; tokens are unchanged.
#[test]
fn slow_worker_is_hedged_to_a_replica() {
    let dir = fixture("mixtral");
    let d = dir.to_str().expect("utf8");
    let (_a, b, relay) = relayed_pair(d);
    let http = format!("127.0.0.1:{}", free_port());
    let r = router(d, &[&relay.addr, &b.addr], &["--hedge-after-ms", "20", "--http-listen", &http]);
    let case = &expected("mixtral")["cases"][3];
    let (ids, want) = (ids_arg(&u32s(&case["token_ids"])), u32s(&case["greedy_new_tokens"]));
    let n = want.len().to_string();
    assert_eq!(generate(&r.addr, &ids, &n), want);
    relay.set_delay(Duration::from_millis(150));
    assert_eq!(generate(&r.addr, &ids, &n), want, "with a slow worker");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let text = scrape(&rt, &http);
    let slow = format!("worker=\"{}\"", relay.addr);
    let won = metric(&text, "moe_dispatch_hedges_total", "winner=\"replica\"");
    assert!(won >= 1.0, "no hedge answered by the replica:\n{text}");
    assert!(
        metric(&text, "moe_dispatch_hedges_total", &slow) >= won,
        "hedges are not counted for the slow worker:\n{text}"
    );
}

/// A frozen worker (its link passes nothing, as a SIGSTOPped process) with a replica and no
/// hedging flags: by default each dispatch to it is hedged to the replica once it is late for
/// its own history, the call it then never answers misses its adaptive deadline (far below the
/// 10 s cap) and the worker is suspected, so later steps go to the replica alone. Tokens never
/// change.
#[test]
fn frozen_worker_is_hedged_and_suspected_by_default() {
    let dir = fixture("mixtral");
    let d = dir.to_str().expect("utf8");
    let (_a, b, relay) = relayed_pair(d);
    let http = format!("127.0.0.1:{}", free_port());
    let r = router(d, &[&relay.addr, &b.addr], &["--http-listen", &http]);
    let case = &expected("mixtral")["cases"][3];
    let (ids, want) = (ids_arg(&u32s(&case["token_ids"])), u32s(&case["greedy_new_tokens"]));
    let n = want.len().to_string();
    // Warm up: both workers build a history of call times.
    for _ in 0..3 {
        assert_eq!(generate(&r.addr, &ids, &n), want);
    }
    relay.set_partitioned(true);
    let started = std::time::Instant::now();
    assert_eq!(generate(&r.addr, &ids, &n), want, "with a frozen worker");
    eprintln!("generation with a frozen worker took {:?}", started.elapsed());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let metrics_text = || scrape(&rt, &http);
    let frozen = format!("worker=\"{}\"", relay.addr);
    let mut text = String::new();
    eventually("the frozen worker missed its deadline", 10, || {
        text = metrics_text();
        metric(&text, "moe_dispatch_missed_deadlines_total", &frozen) >= 1.0
    });
    assert!(metric(&text, "moe_dispatch_hedges_total", "winner=\"replica\"") >= 1.0, "no hedge won:\n{text}");
    // Suspected: the next request sends it nothing (its dispatch count stays, once the calls
    // it lost have all ended at their deadlines).
    std::thread::sleep(Duration::from_secs(1));
    let text = metrics_text();
    let calls = |t: &str| metric(t, "moe_dispatch_seconds_count", &frozen);
    let before = calls(&text);
    assert_eq!(generate(&r.addr, &ids, &n), want, "with the frozen worker suspected");
    assert_eq!(calls(&metrics_text()), before, "the suspected worker still got calls");
    relay.set_partitioned(false);
}

/// SIGTERM while the engine is stuck in a step (its only worker frozen, a 30 s dispatch
/// deadline): the open stream still ends with UNAVAILABLE saying the router is shutting down,
/// within the grace period, instead of being cut when the process exits.
#[test]
fn shutdown_ends_streams_with_a_status_even_mid_step() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("model");
    endless_model(&model);
    let m = model.to_str().expect("utf8");
    let w = spawn_server(&["worker", "--model", m, "--experts", "all", "--listen", "127.0.0.1:0"]);
    let relay = Relay::start(&w.addr);
    let r = router(m, &[&relay.addr], &["--dispatch-timeout-ms", "30000"]);
    let addr = r.addr.clone();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut c = InferenceClient::connect(format!("http://{addr}")).await.expect("connect");
        let req = GenerateRequest {
            prompt: Some(Prompt::TokenIds(TokenIds { ids: vec![3, 4, 5] })),
            sampling: Some(SamplingParams { max_new_tokens: Some(2000), ..Default::default() }),
            ..Default::default()
        };
        let mut s = c.generate_stream(req).await.expect("stream").into_inner();
        s.message().await.expect("first message").expect("a delta");
        // The worker freezes mid-generation: the engine's step now waits on its 30 s deadline.
        relay.set_partitioned(true);
        tokio::time::sleep(Duration::from_millis(300)).await;
        sigterm(&r.child);
        let started = std::time::Instant::now();
        let status = loop {
            match s.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => break status,
            }
        };
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("shutting down"), "{status:?}");
        eprintln!("the stream ended {:?} after SIGTERM", started.elapsed());
    });
    relay.set_partitioned(false);
}

/// A partition between the router and one worker (connections open, nothing passes): the
/// dispatch deadline leaves the worker out and its rows go to the replica; after the partition
/// heals and the suspect time passes, the worker serves again. Tokens never change.
#[test]
fn partitioned_worker_behaves_like_a_dead_one_and_returns_when_healed() {
    let dir = fixture("mixtral");
    let d = dir.to_str().expect("utf8");
    let a = spawn_server(&["worker", "--model", d, "--experts", "all", "--listen", "127.0.0.1:0"]);
    let b = spawn_server(&["worker", "--model", d, "--experts", "all", "--listen", "127.0.0.1:0"]);
    let relay_a = Relay::start(&a.addr);
    let relay_b = Relay::start(&b.addr);
    let r = router(d, &[&relay_a.addr, &relay_b.addr], &["--dispatch-timeout-ms", "800"]);
    let case = &expected("mixtral")["cases"][2];
    let (ids, want) = (ids_arg(&u32s(&case["token_ids"])), u32s(&case["greedy_new_tokens"]));
    let n = want.len().to_string();
    assert_eq!(generate(&r.addr, &ids, &n), want);
    relay_a.set_partitioned(true);
    assert_eq!(generate(&r.addr, &ids, &n), want, "with worker a partitioned");
    // Heal a, wait out its suspect time, then cut b: only a can serve now.
    relay_a.set_partitioned(false);
    std::thread::sleep(moe_dispatch::SUSPECT_FOR + Duration::from_millis(300));
    relay_b.set_partitioned(true);
    assert_eq!(generate(&r.addr, &ids, &n), want, "with a healed and b partitioned");
    relay_b.set_partitioned(false);
}

/// The workers' copy of adapter "x" differs from the router's (another digest): requests with
/// "x" fail with UNAVAILABLE naming the adapter, while base and adapter "y" requests in the
/// same batches complete with their solo tokens.
#[test]
fn adapter_failing_on_a_worker_fails_only_its_requests() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("model");
    endless_model(&model);
    let (router_dir, worker_dir) = (tmp.path().join("router-adapters"), tmp.path().join("worker-adapters"));
    for dir in [&router_dir, &worker_dir] {
        write_random_adapter(&model, &dir.join("y"), &["experts"], 4, 1);
    }
    write_random_adapter(&model, &router_dir.join("x"), &["experts", "gate"], 4, 2);
    write_random_adapter(&model, &worker_dir.join("x"), &["experts", "gate"], 4, 3);
    let (m, wd) = (model.to_str().expect("utf8"), worker_dir.to_str().expect("utf8"));
    let w1 =
        spawn_server(&["worker", "--model", m, "--experts", "*:0-3", "--listen", "127.0.0.1:0", "--adapter-dir", wd]);
    let w2 =
        spawn_server(&["worker", "--model", m, "--experts", "*:4-7", "--listen", "127.0.0.1:0", "--adapter-dir", wd]);
    let r = router(m, &[&w1.addr, &w2.addr], &["--adapter-dir", router_dir.to_str().expect("utf8")]);
    let addr = r.addr.clone();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let mut c = InferenceClient::connect(format!("http://{addr}")).await.expect("connect");
        let req = |adapter: &str, n: u32| GenerateRequest {
            prompt: Some(Prompt::TokenIds(TokenIds { ids: vec![3, 4, 5] })),
            sampling: Some(SamplingParams { max_new_tokens: Some(n), ..Default::default() }),
            adapter_id: adapter.into(),
            timeout_ms: 0,
            cache_salt: String::new(),
            resume: None,
            constraint: None,
            priority: 0,
        };
        let solo_y = c.generate(req("y", 24)).await.expect("y").into_inner().token_ids;
        let solo_base = c.generate(req("", 24)).await.expect("base").into_inner().token_ids;
        assert_ne!(solo_y, solo_base, "the adapter must matter");
        for _ in 0..2 {
            let calls = ["x", "y", "", "x", "y", ""].map(|a| {
                let mut c = c.clone();
                let r = req(a, 24);
                tokio::spawn(async move { c.generate(r).await.map(|r| r.into_inner().token_ids) })
            });
            for (adapter, call) in ["x", "y", "", "x", "y", ""].iter().zip(calls) {
                let got = call.await.expect("task");
                match *adapter {
                    "x" => {
                        let e = got.expect_err("x must fail");
                        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                        assert!(
                            e.message().contains("adapter \"x\"") && e.message().contains("digest"),
                            "{}",
                            e.message()
                        );
                    }
                    "y" => assert_eq!(got.expect("y"), solo_y),
                    _ => assert_eq!(got.expect("base"), solo_base),
                }
            }
        }
    });
}

/// A worker whose batch memory budget (`--max-batch-mb`) a prefill would exceed answers
/// RESOURCE_EXHAUSTED instead of allocating: the step fails promptly with an error naming the
/// budget (never a hang or a crashed worker), and the next, smaller request is served.
#[test]
fn worker_over_its_memory_budget_fails_the_step_with_an_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    endless_model_sized(tmp.path(), 256, 2);
    let m = tmp.path().to_str().expect("utf8");
    let w =
        spawn_server(&["worker", "--model", m, "--experts", "all", "--listen", "127.0.0.1:0", "--max-batch-mb", "1"]);
    let r = router(m, &[&w.addr], &[]);
    let long: Vec<u32> = (0..600).map(|i| 1 + (i % 250) as u32).collect();
    let started = std::time::Instant::now();
    let out = moe(&["generate", "--endpoint", &r.addr, "--token-ids", &ids_arg(&long), "--max-new-tokens", "2"]);
    assert_ne!(out.code, 0, "a prefill over the worker's budget must fail");
    assert!(out.stderr.contains("--max-batch-mb"), "{}", out.stderr);
    assert!(started.elapsed() < Duration::from_secs(30), "the failure took {:?}", started.elapsed());
    let out = moe(&["generate", "--endpoint", &r.addr, "--token-ids", "5,6,7", "--max-new-tokens", "4", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(u32s(&out.json()["token_ids"]).len(), 4);
}
