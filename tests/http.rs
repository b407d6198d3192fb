//! The OpenAI-compatible HTTP API, driven by a real HTTP client: completions and chat
//! completions (whole and streamed as server-sent events) give local generation's text, the
//! `model` field selects an adapter, errors carry the mapped HTTP status, tenant keys apply, and
//! `/metrics` counters move as requests are served.

mod common;

use common::*;
use moe_cluster::AdapterOptions;
use moe_generate::TextCodec;
use moe_lora::RegistryLimits;
use moe_router::{EngineConfig, Tenants};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;

struct Http {
    base: String,
    client: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(model: &Path, adapters: &Path, tenants: Option<&str>) -> Http {
    let opts = AdapterOptions { dir: Some(adapters.into()), limits: RegistryLimits::default() };
    let engine = moe_cluster::embedded_with(model, 2, EngineConfig::default(), &opts).expect("engine");
    let engine = match tenants {
        Some(t) => engine.with_tenants(Arc::new(Tenants::parse(t).expect("tenants"))),
        None => engine,
    };
    let chat = moe_http::ChatTemplate::from_model_dir(model).expect("template");
    let state = Arc::new(moe_http::HttpState::new(engine, "base".into(), chat));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(moe_http::serve_http(state, listener, async {
        let _ = rx.await;
    }));
    Http { base, client: reqwest::Client::new(), _stop: stop }
}

impl Http {
    async fn post(&self, path: &str, body: Value, key: Option<&str>) -> (u16, String) {
        let mut r = self.client.post(format!("{}{path}", self.base)).json(&body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let resp = r.send().await.expect("http");
        (resp.status().as_u16(), resp.text().await.expect("body"))
    }

    async fn get(&self, path: &str) -> String {
        self.client.get(format!("{}{path}", self.base)).send().await.expect("http").text().await.expect("body")
    }

    async fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").await;
        text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
    }
}

/// The `data:` payloads of a server-sent event stream, with the event name if any.
fn sse(body: &str) -> Vec<(Option<String>, String)> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let name = e
                .lines()
                .find_map(|l| l.strip_prefix("event: ").or_else(|| l.strip_prefix("event:")))
                .map(|s| s.trim().to_string());
            let data = e
                .lines()
                .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .collect::<Vec<_>>()
                .join("\n");
            (name, data)
        })
        .filter(|(_, d)| !d.is_empty())
        .collect()
}

fn setup(tmp: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let model = tmp.join("model");
    let adapters = tmp.join("adapters");
    endless_model(&model);
    write_random_adapter(&model, &adapters.join("tenant-a"), &["gate", "q", "v"], 4, 3);
    (model, adapters)
}

/// Greedy text of local generation (with an adapter from the adapter dir).
fn local_text(model_dir: &Path, adapters: &Path, prompt: &str, n: usize, adapter: Option<&str>) -> String {
    let codec = TextCodec::from_dir(model_dir).expect("codec");
    let params = moe_router::GenerationParams {
        max_new_tokens: Some(n as u32),
        adapter_id: adapter.unwrap_or_default().to_string(),
        ..Default::default()
    };
    let ids = solo_generate(model_dir, &codec.encode(prompt).expect("encode"), params, Some(adapters));
    codec.decode(&ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_chat_whole_and_streamed_equal_local_generation() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (model, adapters) = setup(tmp.path());
    let http = start(&model, &adapters, None).await;
    for adapter in [None, Some("tenant-a")] {
        let want = local_text(&model, &adapters, "The cat", 16, adapter);
        let mut body = json!({"prompt": "The cat", "max_tokens": 16});
        if let Some(a) = adapter {
            body["model"] = json!(a);
        }
        let (status, text) = http.post("/v1/completions", body.clone(), None).await;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], want.as_str(), "{adapter:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 16);
        assert_eq!(v["model"], adapter.unwrap_or("base"));

        body["stream"] = json!(true);
        let (status, text) = http.post("/v1/completions", body, None).await;
        assert_eq!(status, 200);
        let events = sse(&text);
        assert_eq!(events.last().map(|e| e.1.as_str()), Some("[DONE]"), "{text}");
        let chunks: Vec<Value> =
            events[..events.len() - 1].iter().map(|e| serde_json::from_str(&e.1).expect("chunk")).collect();
        let streamed: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap_or("")).collect();
        assert_eq!(streamed, want, "streamed text equals the whole answer");
        assert_eq!(chunks.last().expect("final chunk")["choices"][0]["finish_reason"], "length");
        assert!(chunks[..chunks.len() - 1].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));
    }
    // Chat: the model has no chat template, so the transcript form is used.
    let want = local_text(&model, &adapters, "user: Hi\nassistant:", 8, Some("tenant-a"));
    let body = json!({"model": "tenant-a", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8});
    let (status, text) = http.post("/v1/chat/completions", body.clone(), None).await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    let mut stream_body = body;
    stream_body["stream"] = json!(true);
    let (_, text) = http.post("/v1/chat/completions", stream_body, None).await;
    let events = sse(&text);
    let chunks: Vec<Value> =
        events.iter().filter(|e| e.1 != "[DONE]").map(|e| serde_json::from_str(&e.1).expect("chunk")).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks.iter().map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap_or("")).collect();
    assert_eq!(streamed, want);
    assert_eq!(chunks.last().expect("final")["object"], "chat.completion.chunk");

    let models: Value = serde_json::from_str(&http.get("/v1/models").await).expect("json");
    let ids: Vec<&str> =
        models["data"].as_array().expect("data").iter().map(|m| m["id"].as_str().unwrap_or("")).collect();
    assert_eq!(ids, ["base", "tenant-a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_map_to_http_statuses_and_streams_end_with_an_error_event() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (model, adapters) = setup(tmp.path());
    let tenants = r#"
        [[tenants]]
        name = "acme"
        api_key = "acme-key-0123456789"
        adapters = ["tenant-a"]
        max_concurrent = 1
    "#;
    let http = start(&model, &adapters, Some(tenants)).await;
    let key = Some("acme-key-0123456789");
    for (body, k, status, needle) in [
        (json!({"prompt": "Hi", "temperature": -1}), key, 400, "temperature"),
        (json!({"prompt": "Hi", "n": 2}), key, 400, "n"),
        (json!({"prompt": "Hi"}), None, 401, "authorization"),
        (json!({"prompt": "Hi"}), Some("wrong-key-0123456789"), 401, "unknown api key"),
        (json!({"prompt": "Hi", "model": "other"}), key, 403, "may not use"),
        // Bodies that do not fit the schema: 400 in OpenAI's shape naming the field (what the
        // `openai` client turns into BadRequestError), not a plain-text 422.
        (json!({"prompt": "Hi", "max_tokens": -5}), key, 400, "max_tokens"),
        (json!({"prompt": "Hi", "temperature": "hot"}), key, 400, "temperature"),
    ] {
        let (got, text) = http.post("/v1/completions", body.clone(), k).await;
        assert_eq!(got, status, "{body}: {text}");
        let v: Value = serde_json::from_str(&text).expect("error json");
        assert!(v["error"]["message"].as_str().unwrap_or("").contains(needle), "{text}");
        if status == 400 {
            assert_eq!(v["error"]["type"], "invalid_request_error", "{text}");
            assert_eq!(v["error"]["param"], needle, "{text}");
        }
    }
    let resp = http
        .client
        .post(format!("{}/v1/chat/completions", http.base))
        .bearer_auth("acme-key-0123456789")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("http");
    assert_eq!(resp.status().as_u16(), 400);
    let v: Value = serde_json::from_str(&resp.text().await.expect("body")).expect("error json");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    // Over the tenant's limit: 429 while a long stream runs.
    let long = json!({"prompt": "Hi", "max_tokens": 4000, "stream": true});
    let resp = http
        .client
        .post(format!("{}/v1/completions", http.base))
        .bearer_auth("acme-key-0123456789")
        .json(&long)
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status().as_u16(), 200);
    let (got, text) = http.post("/v1/completions", json!({"prompt": "Hi", "max_tokens": 2}), key).await;
    assert_eq!(got, 429, "{text}");
    drop(resp);

    // A deadline during a stream ends it with an error event, not a finish.
    let mut ok = false;
    for _ in 0..100 {
        let (got, text) = http
            .post(
                "/v1/completions",
                json!({"prompt": "Hi", "max_tokens": 4000, "stream": true, "timeout_ms": 100}),
                key,
            )
            .await;
        if got == 429 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        }
        let events = sse(&text);
        let last = events.last().expect("events");
        assert_eq!(last.0.as_deref(), Some("error"), "{text}");
        assert!(last.1.contains("deadline"), "{text}");
        assert!(!text.contains("\"finish_reason\":\"length\"") && !text.contains("[DONE]"));
        ok = true;
        break;
    }
    assert!(ok, "the tenant's slot never came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_counters_move_as_requests_are_served() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (model, adapters) = setup(tmp.path());
    let http = start(&model, &adapters, None).await;
    let ok = "moe_requests_total{outcome=\"ok\"}";
    let invalid = "moe_requests_total{outcome=\"invalid_argument\"}";
    let generated = "moe_generated_tokens_total{tenant=\"\"}";
    let ttft = "moe_time_to_first_token_seconds_count";
    let before =
        (http.metric(ok).await, http.metric(invalid).await, http.metric(generated).await, http.metric(ttft).await);
    for adapter in ["base", "tenant-a", "base"] {
        let (s, _) =
            http.post("/v1/completions", json!({"prompt": "Hello", "max_tokens": 5, "model": adapter}), None).await;
        assert_eq!(s, 200);
    }
    let (s, _) = http.post("/v1/completions", json!({"prompt": "Hello", "top_p": 7}), None).await;
    assert_eq!(s, 400);
    assert_eq!(http.metric(ok).await - before.0, 3.0);
    assert_eq!(http.metric(invalid).await - before.1, 1.0);
    assert_eq!(http.metric(generated).await - before.2, 15.0);
    assert_eq!(http.metric(ttft).await - before.3, 3.0);
    let text = http.get("/metrics").await;
    for name in [
        "# TYPE moe_inter_token_latency_seconds histogram",
        "# TYPE moe_request_duration_seconds histogram",
        "moe_expert_tokens_total{layer=\"0\",expert=",
        "moe_prompt_tokens_total{tenant=\"\"}",
        "moe_kv_cache_pages_total",
        "moe_queue_depth 0",
        "moe_adapters_resident 1",
        "moe_adapter_loads 1",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }
    // Expert tokens add up to top_k per routed token over every MoE layer.
    let routed: f64 = text
        .lines()
        .filter(|l| l.starts_with("moe_expert_tokens_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(routed > 0.0 && routed % 2.0 == 0.0, "{routed}");
}

/// A router process with `--http-listen` in front of two worker processes: `/metrics` shows
/// each worker's dispatch latency and the served request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_process_exposes_dispatch_latency_per_worker() {
    let dir = fixture("mixtral");
    let d = dir.to_str().expect("utf8");
    let (workers, addrs) = spawn_workers(d, &["shard:0/2", "shard:1/2"]);
    let http = format!("127.0.0.1:{}", free_port());
    let router =
        spawn_server(&["router", "--model", d, "--workers", &addrs, "--listen", "127.0.0.1:0", "--http-listen", &http]);
    let out = moe(&["generate", "--endpoint", &router.addr, "--token-ids", "1,2,3", "--max-new-tokens", "3"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let text = reqwest::get(format!("http://{http}/metrics")).await.expect("scrape").text().await.expect("body");
    for w in &workers {
        let series = format!("moe_dispatch_seconds_count{{worker=\"{}\",outcome=\"ok\"}}", w.addr);
        let n: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"));
        assert!(n >= 3.0, "{series} = {n}");
    }
    assert!(text.contains("moe_requests_total{outcome=\"ok\"} 1"), "{text}");
}

/// The prefix cache through the OpenAI API: a repeated long prompt reports its reused tokens in
/// `usage.prompt_tokens_details.cached_tokens`, and another `cache_salt` is a miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_prompts_report_cached_tokens() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (model, adapters) = setup(tmp.path());
    let http = start(&model, &adapters, None).await;
    let prompt = "The cat sat on the mat, and the dog sat on the log; then both of them went to sleep.";
    let cached = |salt: &str| {
        let body = json!({"prompt": prompt, "max_tokens": 2, "cache_salt": salt});
        let http = &http;
        async move {
            let (status, text) = http.post("/v1/completions", body, None).await;
            assert_eq!(status, 200, "{text}");
            let v: Value = serde_json::from_str(&text).expect("json");
            v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().expect("cached_tokens")
        }
    };
    assert_eq!(cached("a").await, 0, "nothing cached yet");
    let again = cached("a").await;
    assert!(again >= 16 && again % 16 == 0, "full pages reused: {again}");
    assert_eq!(cached("b").await, 0, "another salt is a miss");
}

/// Resumable generation through the OpenAI API: with `return_token_ids`, chunks carry their
/// token ids and the first the `resume_digest`; a streamed chat cut after a few tokens and
/// resumed with `resume` (on the adapter, seeded sampling) ends with exactly the uninterrupted
/// tokens, and a resume of another prompt is a 400 naming `resume.digest`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_resume_with_token_ids_and_the_digest() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (model, adapters) = setup(tmp.path());
    let http = start(&model, &adapters, None).await;
    let body = |resume: Value| {
        json!({"model": "tenant-a", "messages": [{"role": "user", "content": "Tell me a story"}],
               "max_tokens": 24, "temperature": 1.0, "seed": 9, "stream": true,
               "return_token_ids": true, "resume": resume})
    };
    // Token ids and the digest of a stream.
    let run = |resume: Value| {
        let http = &http;
        let b = body(resume);
        async move {
            let (status, text) = http.post("/v1/chat/completions", b, None).await;
            assert_eq!(status, 200, "{text}");
            let (mut ids, mut digest, mut text_out) = (Vec::new(), None, String::new());
            for (_, data) in sse(&text) {
                if data == "[DONE]" {
                    break;
                }
                let v: Value = serde_json::from_str(&data).expect("chunk");
                ids.extend(u32s(&v["choices"][0]["token_ids"]));
                text_out.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
                if let Some(d) = v["resume_digest"].as_str() {
                    assert!(digest.is_none(), "the digest comes once");
                    digest = Some(d.to_string());
                }
            }
            (ids, digest, text_out)
        }
    };
    let (whole, digest, whole_text) = run(Value::Null).await;
    assert_eq!(whole.len(), 24);
    let digest = digest.expect("a resume digest");
    let (rest, again, rest_text) = run(json!({"generated_token_ids": whole[..7].to_vec(), "digest": digest})).await;
    assert_eq!([&whole[..7], &rest[..]].concat(), whole, "resumed after 7 tokens");
    assert_eq!(again.as_deref(), Some(digest.as_str()), "same request, same digest");
    assert!(whole_text.ends_with(&rest_text), "the resumed text continues the first");
    let other = json!({"prompt": "Something else", "max_tokens": 24,
                       "resume": {"generated_token_ids": [1, 2], "digest": digest}});
    let (status, text) = http.post("/v1/completions", other, None).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("resume.digest"), "{text}");
}

/// Defect: `/metrics` on the public listener answered anyone, revealing per-tenant token counts,
/// per-adapter expert load and adapter ids hidden from other tenants. With tenants configured it
/// now needs an admin key there (401 without a key, 403 for a tenant's); the separate metrics
/// listener (`--metrics-listen`, for Prometheus inside the cluster) serves it without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_an_admin_key_on_the_public_listener() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (model, adapters) = setup(tmp.path());
    let (user, admin) = ("user-key-0123456789ab", "admin-key-0123456789a");
    let tenants = format!(
        "[[tenants]]\nname = \"user\"\napi_key = \"{user}\"\n\n[[tenants]]\nname = \"ops\"\napi_key = \"{admin}\"\nadmin = true\n"
    );
    let opts = AdapterOptions { dir: Some(adapters.clone()), limits: RegistryLimits::default() };
    let engine = moe_cluster::embedded_with(&model, 2, EngineConfig::default(), &opts).expect("engine");
    let engine = engine.with_tenants(Arc::new(Tenants::parse(&tenants).expect("tenants")));
    let chat = moe_http::ChatTemplate::from_model_dir(&model).expect("template");
    let state = Arc::new(moe_http::HttpState::new(engine, "base".into(), chat));
    let (public, private) = (
        tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind"),
    );
    let (public_url, private_url) = (
        format!("http://{}/metrics", public.local_addr().expect("addr")),
        format!("http://{}/metrics", private.local_addr().expect("addr")),
    );
    let (stop, rx) = tokio::sync::watch::channel(false);
    let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.changed().await;
    };
    tokio::spawn(moe_http::serve_http(state.clone(), public, until(rx.clone())));
    tokio::spawn(moe_http::serve_metrics(state, private, until(rx)));
    let client = reqwest::Client::new();
    let status = |key: Option<&'static str>, url: String| {
        let client = client.clone();
        async move {
            let mut r = client.get(url);
            if let Some(k) = key {
                r = r.bearer_auth(k);
            }
            let resp = r.send().await.expect("http");
            (resp.status().as_u16(), resp.text().await.expect("body"))
        }
    };
    assert_eq!(status(None, public_url.clone()).await.0, 401);
    let (code, body) = status(Some(user), public_url.clone()).await;
    assert_eq!(code, 403, "{body}");
    assert!(!body.contains("moe_requests_total"));
    let (code, body) = status(Some(admin), public_url).await;
    assert_eq!(code, 200);
    assert!(body.contains("moe_tenant_in_flight"), "{body}");
    let (code, body) = status(None, private_url).await;
    assert_eq!(code, 200);
    assert!(body.contains("moe_tenant_in_flight"), "{body}");
    let _ = stop.send(true);
}
