//! Priorities, preemption and token budgets. A running request preempted by a higher-priority
//! arrival (forced by a KV cache that holds one of them at a time) returns tokens and logprobs
//! bitwise equal to the same request run alone, greedy and seeded; its stream stays open and
//! nothing is lost or duplicated. A tenant's priority is capped at its `max_priority`. A tenant
//! over its `tokens_per_minute` is refused with RESOURCE_EXHAUSTED (gRPC, with `retry-after`
//! metadata) and HTTP 429 with `Retry-After`, while another tenant is served.

mod common;

use common::*;
use moe_router::{Engine, EngineConfig, Event, GenerationParams, PromptInput, SchedulingConfig, Tenants};
use std::sync::Arc;
use std::time::Duration;

/// A KV page of the test model (hidden 256, 4 heads of 64, 2 KV heads, 2 layers): 16 slots of
/// keys and values in f32.
const PAGE_BYTES: usize = 2 * 16 * (2 * 2 * 64) * 4;
/// Generated tokens of the long request: enough steps for the urgent one to arrive meanwhile.
const LONG: u32 = 400;

struct Run {
    tokens: Vec<u32>,
    logprob_bits: Vec<u32>,
}

fn params(sampled: bool, n: u32) -> GenerationParams {
    GenerationParams {
        max_new_tokens: Some(n),
        logprobs: true,
        temperature: sampled.then_some(0.9),
        seed: sampled.then_some(11),
        ..Default::default()
    }
}

fn submit(
    engine: &Engine,
    prompt: &[u32],
    p: &GenerationParams,
    priority: i32,
) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
    let mut req = moe_router::ValidatedRequest::new(
        PromptInput::Ids(prompt.to_vec()),
        p,
        engine.codec(),
        engine.model_config(),
        Duration::from_secs(120),
    )
    .expect("valid");
    req.tenant = Some(if priority > 0 { "urgent" } else { "batch" }.into());
    req.priority = priority;
    engine.submit(req).expect("submit").1
}

/// Reads a stream to its end; `after(k)` runs once `k` tokens have arrived.
fn collect(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>, mut after: impl FnMut(usize)) -> Run {
    let mut run = Run { tokens: Vec::new(), logprob_bits: Vec::new() };
    loop {
        match rx.blocking_recv() {
            Some(Event::Delta { token_ids, logprobs, .. }) => {
                run.tokens.extend(token_ids);
                run.logprob_bits.extend(logprobs.iter().map(|l| l.to_bits()));
                after(run.tokens.len());
            }
            Some(Event::Finished { completion_tokens, .. }) => {
                assert_eq!(completion_tokens, run.tokens.len());
                return run;
            }
            Some(Event::Failed(e)) => panic!("failed: {e}"),
            None => panic!("the stream ended without a terminal event"),
        }
    }
}

fn small_engine(model: &std::path::Path) -> Engine {
    // 27 pages: the long request (8 + 400 tokens: 26 pages) leaves no room for the urgent one
    // (8 + 24: 2 pages).
    let cfg = EngineConfig {
        kv_cache_bytes: 27 * PAGE_BYTES,
        max_running: 4,
        scheduling: SchedulingConfig { preempt_after: Duration::ZERO, ..Default::default() },
        ..Default::default()
    };
    moe_cluster::embedded(model, 2, cfg).expect("engine")
}

#[test]
fn a_preempted_request_returns_the_bits_it_returns_alone() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("model");
    endless_model_sized(&model, 256, 2);
    let long: Vec<u32> = vec![3, 14, 15, 92, 65, 35, 89, 79];
    let urgent: Vec<u32> = vec![27, 18, 28, 18, 28, 45, 90, 45];
    for sampled in [false, true] {
        let alone = collect(&mut submit(&small_engine(&model), &long, &params(sampled, LONG), 0), |_| {});
        assert_eq!(alone.tokens.len(), LONG as usize);

        let engine = small_engine(&model);
        let mut rx = submit(&engine, &long, &params(sampled, LONG), 0);
        let mut urgent_rx = None;
        // Once the long request runs (its first token), the urgent one arrives.
        let got = collect(&mut rx, |k| {
            if k == 1 {
                urgent_rx = Some(submit(&engine, &urgent, &params(sampled, 24), 1));
            }
        });
        let urgent_run = collect(urgent_rx.as_mut().expect("urgent submitted"), |_| {});
        assert_eq!(urgent_run.tokens.len(), 24);
        let preempted = engine.metrics().value("moe_preemptions_total", &[("tenant", "batch")]).unwrap_or(0.0);
        assert!(preempted >= 1.0, "sampled={sampled}: the long request was not preempted");
        assert_eq!(got.tokens, alone.tokens, "sampled={sampled}: tokens");
        assert_eq!(got.logprob_bits, alone.logprob_bits, "sampled={sampled}: logprobs");
        eventually("pages released", 10, || {
            engine.stats().referenced_pages.load(std::sync::atomic::Ordering::SeqCst) == 0
        });
    }
}

/// With one running slot, a higher class waiting behind two lower ones is admitted first.
#[test]
fn a_higher_class_is_admitted_first() {
    // A slow model and a long first request: the three arrive while it runs.
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("model");
    endless_model_sized(&model, 256, 2);
    let cfg = EngineConfig { max_running: 1, ..Default::default() };
    let engine = moe_cluster::embedded(&model, 2, cfg).expect("engine");
    let mut first = submit(&engine, &[1, 2, 3], &params(false, LONG), 0);
    // Wait until the first runs, then queue two low and one high request.
    let mut started = false;
    while !started {
        if let Some(Event::Delta { .. }) = first.blocking_recv() {
            started = true;
        }
    }
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let waits: Vec<_> = [(0, 0, [4u32, 5, 6]), (1, 0, [7, 8, 9]), (2, 1, [10, 11, 12])]
        .into_iter()
        .map(|(name, priority, prompt)| {
            let mut rx = submit(&engine, &prompt, &params(false, 4), priority);
            let order = order.clone();
            std::thread::spawn(move || {
                collect(&mut rx, |_| {});
                order.lock().expect("order").push(name);
            })
        })
        .collect();
    for w in waits {
        w.join().expect("waiter");
    }
    let order = order.lock().expect("order").clone();
    assert_eq!(order.first(), Some(&2), "the high-priority request finished first: {order:?}");
    drop(first);
}

const HEAVY: &str = "heavy-key-0123456789";
const LIGHT: &str = "light-key-0123456789";

fn budget_tenants() -> Arc<Tenants> {
    Arc::new(
        Tenants::parse(&format!(
            r#"
            [[tenants]]
            name = "heavy"
            api_key = "{HEAVY}"
            tokens_per_minute = 40
            max_priority = 0

            [[tenants]]
            name = "light"
            api_key = "{LIGHT}"
            "#
        ))
        .expect("tenants"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_token_budget_is_refused_with_a_retry_delay() {
    let engine = moe_cluster::embedded(&fixture("mixtral"), 2, EngineConfig::default()).expect("engine");
    let api = serve_api(engine.with_tenants(budget_tenants())).await;
    let mut c = api_client(&api.addr).await;
    let ask = |key: &str, n: u32| {
        let mut r = tonic::Request::new(router_client::request(
            vec![1, 2, 3],
            moe_proto::v1::SamplingParams { max_new_tokens: Some(n), ..Default::default() },
        ));
        r.metadata_mut().insert("authorization", format!("Bearer {key}").parse().expect("header"));
        r
    };
    // 3 prompt + 50 generated tokens: over the 40 a minute.
    c.generate(ask(HEAVY, 50)).await.expect("within the budget");
    let refused = c.generate(ask(HEAVY, 1)).await.expect_err("over the budget");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("40 tokens per minute"), "{}", refused.message());
    let wait: u64 =
        refused.metadata().get("retry-after").expect("retry-after").to_str().expect("ascii").parse().expect("secs");
    assert!((1..=60).contains(&wait), "retry-after {wait}");
    // Another tenant is unaffected.
    c.generate(ask(LIGHT, 5)).await.expect("the other tenant is served");
    let refusals = api.engine.metrics().value("moe_budget_refusals_total", &[("tenant", "heavy")]).unwrap_or(0.0);
    assert_eq!(refusals, 1.0);

    // Over HTTP: 429 with Retry-After.
    let chat = moe_http::ChatTemplate::from_model_dir(&fixture("mixtral")).expect("template");
    let state = Arc::new(moe_http::HttpState::new(api.engine.clone(), "base".into(), chat));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(moe_http::serve_http(state, listener, async {
        let _ = stop_rx.await;
    }));
    let http = reqwest::Client::new();
    let body = serde_json::json!({"model": "base", "prompt": [1, 2, 3], "max_tokens": 1});
    let resp = http.post(format!("{base}/v1/completions")).bearer_auth(HEAVY).json(&body).send().await.expect("http");
    assert_eq!(resp.status().as_u16(), 429);
    let retry = resp.headers().get("retry-after").expect("Retry-After").to_str().expect("ascii").to_string();
    assert!(retry.parse::<u64>().is_ok_and(|s| (1..=60).contains(&s)), "Retry-After {retry}");
    // The other tenant is served, a `priority` extra field taken (and capped to its max_priority).
    let body = serde_json::json!({"model": "base", "prompt": [1, 2, 3], "max_tokens": 1, "priority": 3});
    let ok = http.post(format!("{base}/v1/completions")).bearer_auth(LIGHT).json(&body).send().await.expect("http");
    assert_eq!(ok.status().as_u16(), 200, "{}", ok.text().await.unwrap_or_default());
    let bad = serde_json::json!({"model": "base", "prompt": [1], "max_tokens": 1, "priority": "high"});
    let resp = http.post(format!("{base}/v1/completions")).bearer_auth(LIGHT).json(&bad).send().await.expect("http");
    assert_eq!(resp.status().as_u16(), 400, "a non-integer priority is refused naming the field");
    assert!(resp.text().await.unwrap_or_default().contains("priority"));
}

/// A tenant's requested priority is lowered to its `max_priority`.
#[test]
fn priority_is_capped_by_the_tenant() {
    let tenants = budget_tenants();
    let heavy = tenants.authenticate(Some(&format!("Bearer {HEAVY}"))).expect("tenant");
    assert_eq!(heavy.max_priority, 0);
    let engine = moe_cluster::embedded(&fixture("mixtral"), 1, EngineConfig::default()).expect("engine");
    let engine = engine.with_tenants(tenants);
    let admission = moe_router::access::entitle(&engine, Some(&format!("Bearer {LIGHT}")), "").expect("entitled");
    let mut req = moe_router::ValidatedRequest::new(
        PromptInput::Ids(vec![1]),
        &GenerationParams { priority: 5, ..Default::default() },
        engine.codec(),
        engine.model_config(),
        Duration::from_secs(5),
    )
    .expect("valid");
    admission.apply(&mut req);
    assert_eq!((req.priority, req.tenant.as_deref()), (0, Some("light")), "light's max_priority is the default 0");
}

/// A tenant with nothing running gets a slot from a tenant that holds the whole batch (over its
/// share of it) without waiting for any of that tenant's long requests to end.
#[test]
fn a_light_tenant_does_not_wait_for_a_flood_to_drain() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("model");
    endless_model_sized(&model, 256, 2);
    let cfg = EngineConfig { max_running: 4, ..Default::default() };
    let engine = moe_cluster::embedded(&model, 2, cfg).expect("engine");
    let flood: Vec<_> = (0..8u32).map(|i| submit(&engine, &[i + 1, 2, 3], &params(false, LONG), 0)).collect();
    std::thread::sleep(Duration::from_millis(50));
    let mut req = moe_router::ValidatedRequest::new(
        PromptInput::Ids(vec![9, 9, 9]),
        &params(false, 8),
        engine.codec(),
        engine.model_config(),
        Duration::from_secs(60),
    )
    .expect("valid");
    req.tenant = Some("writers".into());
    let mut rx = engine.submit(req).expect("submit").1;
    let light = collect(&mut rx, |_| {});
    assert_eq!(light.tokens.len(), 8);
    let mut flood = flood;
    for f in flood.iter_mut() {
        while let Ok(e) = f.try_recv() {
            assert!(!matches!(e, Event::Finished { .. }), "a flood request finished first");
        }
    }
    let preempted = engine.metrics().value("moe_preemptions_total", &[("tenant", "batch")]).unwrap_or(0.0);
    assert!(preempted >= 1.0, "the flooding tenant gave up a slot");
}
