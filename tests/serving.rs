//! The router serving the Inference API on loopback: concurrent mixed streams equal their solo
//! results, cancellation frees KV pages, a full queue answers RESOURCE_EXHAUSTED, bad requests
//! get INVALID_ARGUMENT/NOT_FOUND naming the field, a worker rejects malformed messages and
//! keeps serving, and an unreachable worker means UNAVAILABLE, not a hang.

mod common;

use common::router_client::request;
use common::*;
use futures::StreamExt;
use moe_compute::cpu::CpuBackend;
use moe_dispatch::GrpcTransportConfig;
use moe_generate::SamplingParams as LocalSampling;
use moe_proto::v1::expert_worker_client::ExpertWorkerClient;
use moe_proto::v1::generate_request::Prompt;
use moe_proto::v1::generate_stream_response::Event as StreamEvent;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{ExpertRequest, GenerateRequest, SamplingParams, WireDtype};
use moe_router::EngineConfig;
use moe_worker::{ExpertHost, ExpertSpec};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_mixed_streams_equal_their_solo_results() {
    let dir = fixture("mixtral");
    let cfg = EngineConfig { max_batch_tokens: 48, max_running: 64, ..Default::default() };
    let server = serve_api(moe_cluster::embedded(&dir, 2, cfg).expect("engine")).await;
    let mut cases = Vec::new();
    for i in 0..64u32 {
        let len = [1usize, 3, 9, 17, 26, 40][i as usize % 6];
        let ids: Vec<u32> = (0..len as u32).map(|j| (i * 31 + j * 7) % 128).collect();
        let greedy = i % 2 == 0;
        let local = LocalSampling {
            temperature: if greedy { 0.0 } else { 0.8 },
            top_k: if greedy { 0 } else { 20 },
            top_p: if greedy { 1.0 } else { 0.9 },
            seed: i as u64,
        };
        cases.push((ids, 4 + (i as usize % 13), local));
    }
    let solo: Vec<Vec<u32>> = cases
        .iter()
        .map(|(ids, n, s)| {
            let params = moe_router::GenerationParams {
                max_new_tokens: Some(*n as u32),
                temperature: Some(s.temperature),
                top_k: Some(s.top_k as i32),
                top_p: Some(s.top_p),
                seed: Some(s.seed),
                ..Default::default()
            };
            solo_generate(&dir, ids, params, None)
        })
        .collect();
    let tasks = cases.iter().map(|(ids, n, s)| {
        let addr = server.addr.clone();
        let req = request(
            ids.clone(),
            SamplingParams {
                max_new_tokens: Some(*n as u32),
                temperature: Some(s.temperature),
                top_k: Some(s.top_k as i32),
                top_p: Some(s.top_p),
                seed: Some(s.seed),
                ..Default::default()
            },
        );
        tokio::spawn(async move {
            let mut c = api_client(&addr).await;
            let mut stream = c.generate_stream(req).await.expect("stream").into_inner();
            let (mut ids, mut finished) = (Vec::new(), 0);
            while let Some(msg) = stream.message().await.expect("message") {
                match msg.event {
                    Some(StreamEvent::Delta(d)) => ids.extend(d.token_ids),
                    Some(StreamEvent::Finished(f)) => {
                        finished += 1;
                        assert_eq!(f.usage.expect("usage").completion_tokens as usize, ids.len());
                    }
                    None => panic!("empty event"),
                }
            }
            assert_eq!(finished, 1, "exactly one final message");
            ids
        })
    });
    let results = futures::future::join_all(tasks).await;
    for (i, (r, want)) in results.into_iter().zip(&solo).enumerate() {
        assert_eq!(&r.expect("task"), want, "request {i} (greedy: {}) differs from its solo run", i % 2 == 0);
    }
    // The engine publishes the freed pages just after its step sends the last Finished.
    let stats = server.engine.stats();
    wait_for("pages to return", || stats.free_pages.load(Ordering::SeqCst) == stats.total_pages.load(Ordering::SeqCst))
        .await;
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_stream_frees_its_pages_and_full_queue_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    endless_model(tmp.path());
    let cfg = EngineConfig { max_running: 1, max_waiting: 1, ..Default::default() };
    let server = serve_api(moe_cluster::embedded(tmp.path(), 2, cfg).expect("engine")).await;
    let stats = server.engine.stats();
    let total = stats.total_pages.load(Ordering::SeqCst);
    let long = || request(vec![5, 6, 7], SamplingParams { max_new_tokens: Some(4000), ..Default::default() });

    let mut c = api_client(&server.addr).await;
    let mut a = c.generate_stream(long()).await.expect("a").into_inner();
    assert!(a.message().await.expect("first").is_some());
    assert!(stats.free_pages.load(Ordering::SeqCst) < total, "a running request holds pages");
    // b waits (one running at most), c finds the queue full.
    let b = c.generate_stream(long()).await.expect("b").into_inner();
    wait_for("b to be queued", || stats.waiting.load(Ordering::SeqCst) == 1).await;
    let err = c.generate(long()).await.expect_err("queue full");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("queue is full"), "{}", err.message());

    // Dropping both streams frees every page at the next steps.
    drop(a);
    drop(b);
    wait_for("pages to return", || {
        stats.free_pages.load(Ordering::SeqCst) == total && stats.running.load(Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(stats.waiting.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_codes_naming_the_field() {
    let server =
        serve_api(moe_cluster::embedded(&fixture("mixtral"), 1, EngineConfig::default()).expect("engine")).await;
    let mut c = api_client(&server.addr).await;
    let s = |f: fn(&mut SamplingParams)| {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    };
    let cases: Vec<(GenerateRequest, Code, &str)> = vec![
        (request(vec![], SamplingParams::default()), Code::InvalidArgument, "prompt: the prompt is empty"),
        (request(vec![1], s(|p| p.max_new_tokens = Some(0))), Code::InvalidArgument, "max_new_tokens"),
        (request(vec![1], s(|p| p.max_new_tokens = Some(96))), Code::InvalidArgument, "max_new_tokens"),
        (request(vec![1], s(|p| p.temperature = Some(-0.5))), Code::InvalidArgument, "temperature"),
        (request(vec![1], s(|p| p.top_p = Some(0.0))), Code::InvalidArgument, "top_p"),
        (request(vec![1], s(|p| p.top_p = Some(1.5))), Code::InvalidArgument, "top_p"),
        (request(vec![1], s(|p| p.top_k = Some(-1))), Code::InvalidArgument, "top_k"),
        (request(vec![1], s(|p| p.repetition_penalty = Some(0.0))), Code::InvalidArgument, "repetition_penalty"),
        (request(vec![1, 128], SamplingParams::default()), Code::InvalidArgument, "token id 128"),
        (request(vec![1; 96], SamplingParams::default()), Code::InvalidArgument, "context"),
        (request(vec![1], s(|p| p.stop = vec!["x".into()])), Code::InvalidArgument, "stop"),
        (
            GenerateRequest { prompt: Some(Prompt::Text("hi".into())), ..Default::default() },
            Code::InvalidArgument,
            "tokenizer",
        ),
        (GenerateRequest::default(), Code::InvalidArgument, "prompt"),
        (
            GenerateRequest { adapter_id: "tenant-a".into(), ..request(vec![1], SamplingParams::default()) },
            Code::NotFound,
            "adapter \"tenant-a\"",
        ),
    ];
    for (req, code, needle) in cases {
        let err = c.generate(req.clone()).await.expect_err("must fail");
        assert_eq!(err.code(), code, "{needle}: {err:?}");
        assert!(err.message().contains(needle), "{needle:?} not in {:?}", err.message());
        let err = c.generate_stream(req).await.expect_err("stream must fail too");
        assert_eq!(err.code(), code, "{needle} (stream): {err:?}");
    }
    // The server still answers.
    let ok = c.generate(request(vec![1, 2], s(|p| p.max_new_tokens = Some(3)))).await.expect("ok").into_inner();
    assert_eq!(ok.token_ids.len(), 3);
}

async fn start_worker(
    dir: &Path,
    spec: &str,
) -> (String, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let spec = spec.parse::<ExpertSpec>().expect("spec");
    let host = Arc::new(ExpertHost::load(dir, &spec, CpuBackend::new()).expect("host"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = moe_worker::serve_worker(host, "test".into(), listener, async {
            let _ = rx.await;
        })
        .await;
    });
    (addr, stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_rejects_malformed_messages_and_keeps_serving() {
    let dir = fixture("mixtral");
    let (addr, _stop, _task) = start_worker(&dir, "0:0-1").await;
    let mut c = ExpertWorkerClient::connect(format!("http://{addr}")).await.expect("connect");
    let good = || ExpertRequest {
        id: 1,
        layer: 0,
        dtype: WireDtype::F32 as i32,
        hidden_size: 64,
        rows: moe_proto::wire::encode(&[0.5f32; 128], WireDtype::F32).into(),
        row_pairs: vec![1, 2],
        experts: vec![0, 0, 1],
        weights: vec![1.0, 0.5, 0.5],
        ..Default::default()
    };
    let bad: Vec<(ExpertRequest, &str)> = vec![
        (ExpertRequest { row_adapters: vec![1, 0], ..good() }, "only 0 are listed"),
        (ExpertRequest { row_adapters: vec![0], ..good() }, "row_adapters has 1 entries for 2 rows"),
        (
            ExpertRequest {
                row_adapters: vec![1, 0],
                adapters: vec![moe_proto::v1::AdapterRef { id: "a".into(), path: "a".into(), digest: "0".into() }],
                ..good()
            },
            "no --adapter-dir",
        ),
        (ExpertRequest { rows: vec![0u8; 10].into(), ..good() }, "not a whole number"),
        (ExpertRequest { experts: vec![0, 0, 3], ..good() }, "expert 3 of layer 0 is not hosted"),
        (ExpertRequest { layer: 7, ..good() }, "layer 7 is not a layer with experts"),
        (ExpertRequest { row_pairs: vec![1, 1], ..good() }, "row_pairs add up to 2"),
        (ExpertRequest { hidden_size: 32, ..good() }, "row_pairs has 2 entries"),
        (ExpertRequest { dtype: 9, ..good() }, "unknown wire dtype"),
        // Sizes are bounded by the model: at most top_k distinct experts per row.
        (
            ExpertRequest { row_pairs: vec![3, 0], experts: vec![0, 1, 0], ..good() },
            "row 0 has 3 (expert, weight) pairs; the model routes a token to at most 2",
        ),
        (ExpertRequest { experts: vec![0, 1, 1], ..good() }, "row 1 names expert 1 twice"),
        // One message that would make the worker allocate gigabytes (5M pairs for one row,
        // 25 MB on the wire): refused before any allocation of that size.
        (
            ExpertRequest {
                row_pairs: vec![5_000_000, 0],
                experts: vec![0; 5_000_000],
                weights: vec![1.0; 5_000_000],
                ..good()
            },
            "the model routes a token to at most 2",
        ),
    ];
    for (req, needle) in &bad {
        let err = c.compute(req.clone()).await.expect_err("must fail");
        assert_eq!(err.code(), Code::InvalidArgument, "{needle}: {err:?}");
        assert!(err.message().contains(needle), "{needle:?} not in {:?}", err.message());
    }
    let ok = c.compute(good()).await.expect("valid request").into_inner();
    assert_eq!(ok.rows.len(), 3 * 64 * 4, "one answer row per (row, expert) pair");

    // On the stream, a bad message gets an error response and the stream goes on.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut responses =
        c.compute_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("stream").into_inner();
    tx.send(ExpertRequest { id: 10, ..bad[1].0.clone() }).await.expect("send");
    tx.send(ExpertRequest { id: 11, ..good() }).await.expect("send");
    let r1 = responses.next().await.expect("r1").expect("ok");
    let r2 = responses.next().await.expect("r2").expect("ok");
    assert_eq!((r1.id, r1.error.as_ref().map(|e| e.code)), (10, Some(Code::InvalidArgument as i32)));
    assert_eq!((r2.id, r2.error, r2.rows.len()), (11, None, 3 * 64 * 4));
    assert_eq!(&r2.rows[..], &ok.rows[..], "stream and unary agree");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_worker_means_unavailable_not_a_hang() {
    let dir = fixture("mixtral");
    // A worker process, so that killing it really closes its connections.
    let worker = spawn_server(&["worker", "--model", dir.to_str().expect("utf8"), "--listen", "127.0.0.1:0"]);
    let cfg = GrpcTransportConfig {
        deadline: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let engine = moe_cluster::remote(&dir, std::slice::from_ref(&worker.addr), cfg, EngineConfig::default())
        .await
        .expect("router");
    let server = serve_api(engine).await;
    let mut c = api_client(&server.addr).await;
    let ok = c.generate(request(vec![1, 2, 3], SamplingParams { max_new_tokens: Some(2), ..Default::default() })).await;
    assert_eq!(ok.expect("worker up").into_inner().token_ids.len(), 2);
    drop(worker);
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        c.generate(request(vec![4, 5], SamplingParams { max_new_tokens: Some(2), ..Default::default() })),
    )
    .await
    .expect("answered, not hung")
    .expect_err("worker gone");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("layer 0"), "{}", err.message());
    assert!(started.elapsed() < Duration::from_secs(20));
    let stats = server.engine.stats();
    // The engine publishes its counters after the step that failed the request.
    wait_for("pages to return", || stats.free_pages.load(Ordering::SeqCst) == stats.total_pages.load(Ordering::SeqCst))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_server_process_health_reflection_tokenize_and_cli_stream() {
    use moe_proto::v1::{ModelInfoRequest, TokenizeRequest};
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    // The README's main command, as a process: `moe serve --demo`.
    let server = spawn_server(&["serve", "--demo", "--workers", "2", "--listen", "127.0.0.1:0"]);
    let url = format!("http://{}", server.addr);
    let channel = tonic::transport::Endpoint::from_shared(url.clone()).expect("uri").connect().await.expect("connect");
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest { service: "moe.v1.Inference".into() })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);

    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    })
    .await
    .expect("send");
    drop(tx);
    let mut refl = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("reflection")
        .into_inner();
    let listed = match refl.next().await.expect("answer").expect("ok").message_response {
        Some(MessageResponse::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect::<Vec<_>>(),
        other => panic!("unexpected reflection answer {other:?}"),
    };
    assert!(listed.iter().any(|s| s == "moe.v1.Inference"), "{listed:?}");
    {
        // The same through v1alpha (what Python's grpcio-reflection and Postman speak).
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as AlphaClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as AlphaResponse;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let list = AlphaRequest::ListServices(String::new());
        tx.send(tonic_reflection::pb::v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(list),
        })
        .await
        .expect("send");
        drop(tx);
        let mut refl = AlphaClient::new(channel.clone())
            .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("v1alpha reflection")
            .into_inner();
        let listed = match refl.next().await.expect("answer").expect("ok").message_response {
            Some(AlphaResponse::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect::<Vec<_>>(),
            other => panic!("unexpected v1alpha reflection answer {other:?}"),
        };
        assert!(listed.iter().any(|s| s == "moe.v1.Inference"), "v1alpha: {listed:?}");
    }

    let mut c = InferenceClient::new(channel);
    let ids = c.tokenize(TokenizeRequest { text: "Hi!".into() }).await.expect("tokenize").into_inner().token_ids;
    assert_eq!(ids, vec![b'H' as u32, b'i' as u32, b'!' as u32]);
    let info = c.model_info(ModelInfoRequest {}).await.expect("info").into_inner();
    assert_eq!(
        (info.architecture.as_str(), info.vocab_size, info.workers, info.has_tokenizer),
        ("MixtralForCausalLM", 258, 2, true)
    );

    // `moe generate --endpoint` gives what local generation gives, streamed or not.
    let local = moe(&["generate", "--demo", "--prompt", "Hello", "--max-new-tokens", "12", "--json"]);
    for extra in [&[][..], &["--stream"][..]] {
        let mut args = vec![
            "generate",
            "--endpoint",
            server.addr.as_str(),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "12",
            "--json",
        ];
        args.extend_from_slice(extra);
        let remote = moe(&args);
        assert_eq!(remote.code, 0, "{}", remote.stderr);
        assert_eq!(remote.json(), local.json(), "remote {extra:?} vs local");
    }
    // The demo's adapters, served by `serve --demo`: each gives what local generation with it
    // gives, and changes the output.
    let base =
        moe(&["generate", "--demo", "--prompt", "The value of the expression is", "--max-new-tokens", "32", "--json"]);
    let base = base.json();
    for adapter in ["prose", "code", "attn"] {
        let common =
            ["--prompt", "The value of the expression is", "--max-new-tokens", "32", "--json", "--adapter", adapter];
        let mut local_args = vec!["generate", "--demo"];
        local_args.extend_from_slice(&common);
        let local_ad = moe(&local_args);
        assert_eq!(local_ad.code, 0, "{}", local_ad.stderr);
        let mut remote_args = vec!["generate", "--endpoint", server.addr.as_str(), "--stream"];
        remote_args.extend_from_slice(&common);
        let remote = moe(&remote_args);
        assert_eq!(remote.code, 0, "{}", remote.stderr);
        assert_eq!(remote.json(), local_ad.json(), "adapter {adapter}: remote vs local");
        assert_ne!(local_ad.json()["token_ids"], base["token_ids"], "adapter {adapter} changed nothing");
    }
    let unknown = moe(&["generate", "--endpoint", server.addr.as_str(), "--prompt", "Hi", "--adapter", "nope"]);
    unknown.assert_error(&["NotFound", "nope"]);
}

/// `moe serve --tenants`: `moe generate --api-key` is let in, a wrong key is not.
#[test]
fn serve_with_tenants_file_and_api_key() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("tenants.toml");
    std::fs::write(&file, "[[tenants]]\nname = \"t\"\napi_key = \"key-0123456789abcdef\"\nadapters = [\"prose\"]\n")
        .expect("write");
    let server =
        spawn_server(&["serve", "--demo", "--listen", "127.0.0.1:0", "--tenants", file.to_str().expect("utf8")]);
    let run = |key: &str, adapter: &str| {
        moe(&[
            "generate",
            "--endpoint",
            &server.addr,
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
            "--api-key",
            key,
            "--adapter",
            adapter,
        ])
    };
    assert_eq!(run("key-0123456789abcdef", "prose").code, 0);
    run("wrong-0123456789abcdef", "prose").assert_error(&["Unauthenticated", "unknown api key"]);
    run("key-0123456789abcdef", "attn").assert_error(&["PermissionDenied", "attn"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_logprobs_and_deadlines() {
    let tmp = tempfile::tempdir().expect("tmp");
    endless_model(tmp.path());
    let server = serve_api(moe_cluster::embedded(tmp.path(), 1, EngineConfig::default()).expect("engine")).await;
    let mut c = api_client(&server.addr).await;
    let text_req = |stop: Vec<String>, logprobs: bool| GenerateRequest {
        prompt: Some(Prompt::Text("The cat".into())),
        sampling: Some(SamplingParams { max_new_tokens: Some(48), stop, logprobs, ..Default::default() }),
        ..Default::default()
    };
    let full = c.generate(text_req(vec![], true)).await.expect("full").into_inner();
    assert_eq!(full.token_ids.len(), 48);
    assert_eq!(full.logprobs.len(), 48);
    assert!(full.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0), "{:?}", full.logprobs);
    // Stop at the first printable character that appears after the start of the text.
    let (pos, ch) =
        full.text.char_indices().skip(1).find(|(_, c)| c.is_ascii_graphic()).expect("a printable character");
    let cut = full.text.find(ch).expect("present");
    assert!(cut <= pos);
    let stopped = c.generate(text_req(vec![ch.to_string()], false)).await.expect("stopped").into_inner();
    assert_eq!(stopped.text, full.text[..cut], "text ends just before the stop sequence");
    assert_eq!(stopped.finish_reason, moe_proto::v1::FinishReason::Stop as i32);
    assert!(stopped.token_ids.len() < 48);
    // The streamed text is the same, and never shows any part of the stop sequence.
    let mut stream = c.generate_stream(text_req(vec![ch.to_string()], false)).await.expect("stream").into_inner();
    let mut streamed = String::new();
    while let Some(msg) = stream.message().await.expect("message") {
        if let Some(StreamEvent::Delta(d)) = msg.event {
            streamed.push_str(&d.text);
        }
    }
    assert_eq!(streamed, stopped.text);

    // A deadline ends a long request with DEADLINE_EXCEEDED and frees its pages.
    let long = GenerateRequest {
        timeout_ms: 300,
        ..request(vec![5, 6], SamplingParams { max_new_tokens: Some(4000), ..Default::default() })
    };
    let err = c.generate(long).await.expect_err("deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let stats = server.engine.stats();
    wait_for("pages to return", || stats.free_pages.load(Ordering::SeqCst) == stats.total_pages.load(Ordering::SeqCst))
        .await;
}
