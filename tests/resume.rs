//! Resumable generation across routers: 8 greedy and 8 seeded-sampling streams (half of each
//! with a gate + expert adapter) run on a router that is SIGKILLed mid-stream; each client
//! resumes on a second router over the same worker processes with the tokens it received, and
//! every final sequence equals the uninterrupted run's, with no token duplicated or missing.
//! Resumes that do not match their request are refused with INVALID_ARGUMENT naming the field,
//! and `moe generate --endpoint A,B` goes on to B when A is down.

mod common;

use common::*;
use moe_proto::resume::ResumeState;
use moe_proto::v1::generate_request::Prompt;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{GenerateRequest, Resume, SamplingParams, TokenIds};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tonic::Code;

const NEW_TOKENS: u32 = 64;

/// Request i: greedy for i < 8, seeded sampling after; every other one with the adapter.
fn request(i: usize) -> GenerateRequest {
    let ids: Vec<u32> = (0..(3 + i * 5) as u32).map(|j| (j * 37 + i as u32 * 11 + 1) % 300).collect();
    let sampled = i >= 8;
    GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids })),
        sampling: Some(SamplingParams {
            max_new_tokens: Some(NEW_TOKENS),
            temperature: sampled.then_some(1.0),
            top_p: sampled.then_some(0.9),
            seed: sampled.then_some(i as u64 * 7 + 1),
            logprobs: true,
            ..Default::default()
        }),
        adapter_id: if i % 2 == 1 { "g".into() } else { String::new() },
        ..Default::default()
    }
}

async fn client(addr: &str) -> Result<InferenceClient<tonic::transport::Channel>, tonic::transport::Error> {
    InferenceClient::connect(format!("http://{addr}")).await
}

/// Streams `req` on `addr` into `state` (bumping `progress` per delta) until it ends or breaks.
async fn stream(
    addr: &str,
    req: GenerateRequest,
    state: &mut ResumeState,
    progress: &AtomicUsize,
) -> Result<(), String> {
    let mut c = client(addr).await.map_err(|e| e.to_string())?;
    let mut s = c.generate_stream(req).await.map_err(|e| e.to_string())?.into_inner();
    loop {
        match s.message().await {
            Ok(Some(msg)) => {
                state.observe(&msg);
                progress.fetch_add(1, Ordering::SeqCst);
            }
            Ok(None) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[test]
fn streams_resume_on_another_router_after_a_sigkill_with_identical_tokens() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("model");
    endless_model_sized(&model, 96, 3);
    let adapters = tmp.path().join("adapters");
    write_random_adapter(&model, &adapters.join("g"), &["gate", "experts"], 4, 3);
    let (m, ad) = (model.to_str().expect("utf8"), adapters.to_str().expect("utf8"));
    let worker = |experts: &str| {
        spawn_server(&["worker", "--model", m, "--experts", experts, "--listen", "127.0.0.1:0", "--adapter-dir", ad])
    };
    let (w1, w2) = (worker("*:0-3"), worker("*:4-7"));
    let workers = format!("{},{}", w1.addr, w2.addr);
    let router = || {
        spawn_server(&[
            "router",
            "--model",
            m,
            "--workers",
            &workers,
            "--listen",
            "127.0.0.1:0",
            "--adapter-dir",
            ad,
            "--wire",
            "f32",
        ])
    };
    let (first, second) = (router(), router());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let n = 16;

    // The uninterrupted run, on the second router.
    let want: Vec<ResumeState> = rt.block_on(async {
        let mut out = Vec::new();
        for i in 0..n {
            let mut s = ResumeState::default();
            stream(&second.addr, request(i), &mut s, &AtomicUsize::new(0)).await.expect("uninterrupted stream");
            assert!(s.finished && s.generated.len() == NEW_TOKENS as usize, "request {i}: {s:?}");
            out.push(s);
        }
        out
    });

    // All at once on the first router, which is SIGKILLed once every stream has tokens.
    let progress: Arc<Vec<AtomicUsize>> = Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect());
    let (a1, a2) = (first.addr.clone(), second.addr.clone());
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (a1, a2, progress) = (a1.clone(), a2.clone(), progress.clone());
            rt.spawn(async move {
                let mut state = ResumeState::default();
                let broke = stream(&a1, request(i), &mut state, &progress[i]).await.err();
                let broke = broke.or_else(|| (!state.finished).then(|| "ended without finishing".to_string()));
                let received_before = state.generated.len();
                if broke.is_some() && !state.finished {
                    stream(&a2, state.request(&request(i)), &mut state, &AtomicUsize::new(0))
                        .await
                        .unwrap_or_else(|e| panic!("request {i}: the resumed stream failed: {e}"));
                }
                (state, received_before, broke)
            })
        })
        .collect();
    eventually("every stream has tokens", 30, || progress.iter().all(|p| p.load(Ordering::SeqCst) >= 3));
    drop(first); // SIGKILL
    let mut resumed = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        let (got, before, broke) = rt.block_on(task).expect("task");
        assert!(got.finished, "request {i} did not finish: {broke:?}");
        if broke.is_some() {
            resumed += 1;
            assert!(before > 0, "request {i} had tokens before the kill");
        }
        assert_eq!(got.generated, want[i].generated, "request {i} (resumed after {before} tokens, {broke:?})");
        assert_eq!(got.digest, want[i].digest, "request {i}: the digest depends only on the request");
    }
    assert!(resumed >= n / 2, "only {resumed} of {n} streams were cut by the kill");

    // Resumes that do not match their request.
    rt.block_on(async {
        let mut c = client(&second.addr).await.expect("connect");
        let digest = want[0].digest.clone();
        let resume =
            |ids: Vec<u32>, digest: &str| Some(Resume { generated_token_ids: ids, digest: digest.to_string() });
        let cases = [
            (GenerateRequest { resume: resume(vec![1, 2], &digest), ..request(2) }, "resume.digest"),
            (GenerateRequest { resume: resume(vec![1, 2], ""), ..request(0) }, "resume.digest"),
            (GenerateRequest { resume: resume(vec![1, 300], &digest), ..request(0) }, "resume.generated_token_ids"),
            (GenerateRequest { resume: resume(vec![1; 65], &digest), ..request(0) }, "resume.generated_token_ids"),
        ];
        for (req, field) in cases {
            let err = c.generate_stream(req).await.expect_err("refused");
            assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
            assert!(err.message().contains(field), "{field} not named: {}", err.message());
        }
        // A resume with every token already received only finishes the stream.
        let all = GenerateRequest { resume: resume(want[0].generated.clone(), &digest), ..request(0) };
        let mut state = ResumeState::default();
        let mut s = c.generate_stream(all).await.expect("resume at the end").into_inner();
        while let Some(msg) = s.message().await.expect("message") {
            state.observe(&msg);
        }
        assert!(state.finished && state.generated.is_empty(), "{state:?}");
    });
    // `moe generate` with a dead endpoint first goes on to the next and prints the same answer.
    let Some(Prompt::TokenIds(prompt)) = request(0).prompt else { panic!("token ids") };
    let dead = format!("127.0.0.1:{}", free_port());
    let endpoints = format!("{dead},{}", second.addr);
    let n = NEW_TOKENS.to_string();
    let out = moe(&[
        "generate",
        "--endpoint",
        &endpoints,
        "--token-ids",
        &ids_arg(&prompt.ids),
        "--max-new-tokens",
        &n,
        "--stream",
        "--json",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(u32s(&out.json()["token_ids"]), want[0].generated);
    assert!(out.stderr.contains("retrying on"), "{}", out.stderr);
    drop((w1, w2));
}

/// `moe loadgen` over two routers, the first SIGKILLed while streams run: every request still
/// ends `ok` with the token count its usage reports, those that were on the dead router having
/// moved to the second (resumed streams, retried requests).
#[test]
fn loadgen_moves_requests_to_the_next_router_when_one_dies() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("model");
    endless_model_sized(&model, 96, 3);
    let m = model.to_str().expect("utf8");
    let w = spawn_server(&["worker", "--model", m, "--experts", "all", "--listen", "127.0.0.1:0"]);
    let router = || spawn_server(&["router", "--model", m, "--workers", &w.addr, "--listen", "127.0.0.1:0"]);
    let (first, second) = (router(), router());
    let endpoints = format!("{},{}", first.addr, second.addr);
    let pid = first.child.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    });
    let out = moe(&[
        "loadgen",
        "--endpoint",
        &endpoints,
        "--requests",
        "1000000",
        "--duration-secs",
        "4",
        "--concurrency",
        "8",
        "--max-new-tokens",
        "96",
        "--prompt-len",
        "4-32",
        "--stream-share",
        "0.75",
        "--json",
    ]);
    killer.join().expect("killer");
    drop(first);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let v = out.json();
    assert_eq!(v["violations"], serde_json::json!([]), "{v}");
    let requests = v["requests"].as_u64().expect("requests");
    assert_eq!(v["outcomes"]["ok"].as_u64(), Some(requests), "every request ends ok: {v}");
    assert!(v["resumed"].as_u64().unwrap_or(0) >= 1, "nothing moved to the second router: {v}");
}

/// Defect: a resume's ids were replayed through the detokenizer inside admission, on the engine
/// thread, and ids that never complete a UTF-8 character made that replay quadratic (4,000 such
/// ids stalled every tenant's batch ~1.1 s). Now the replay runs during validation (off the engine
/// thread) with a bounded window: the engine's longest single admission stays under 50 ms for the
/// largest resume and prompt a request may carry, with another stream running.
#[test]
fn the_largest_resume_and_prompt_cannot_stall_the_engine() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("model");
    endless_model(&dir);
    let engine = moe_cluster::embedded(&dir, 2, moe_router::EngineConfig::default()).expect("engine");
    let max_pos = engine.model_config().max_position_embeddings;
    let submit = |prompt: Vec<u32>, new: usize, resume: Vec<u32>| {
        let params = moe_router::GenerationParams {
            max_new_tokens: Some(new as u32),
            stop: vec!["never".into()],
            resume: Some(moe_router::resume::ResumeParams { generated: resume, digest: "x".into() }),
            ..Default::default()
        };
        let req = moe_router::ValidatedRequest::new(
            moe_router::PromptInput::Ids(prompt),
            &params,
            engine.codec(),
            engine.model_config(),
            std::time::Duration::from_secs(600),
        )
        .expect("valid");
        engine.submit(req).expect("submit").1
    };
    let mut canary = submit(vec![5, 6, 7], 40, vec![]);
    // 0xF0 opens a 4-byte character that the next 0xF0 never continues: the worst case.
    let resume = vec![0xF0u32; max_pos - 16];
    let before = engine.stats().max_admission_us.load(std::sync::atomic::Ordering::SeqCst);
    let mut hostile = submit((0..8).map(|i| 5 + i).collect(), max_pos - 16 + 4, resume);
    let mut done = 0;
    for rx in [&mut canary, &mut hostile] {
        loop {
            match rx.blocking_recv() {
                Some(moe_router::Event::Delta { .. }) => {}
                Some(moe_router::Event::Finished { .. }) => break,
                Some(moe_router::Event::Failed(e)) => panic!("failed: {e}"),
                None => panic!("no terminal event"),
            }
        }
        done += 1;
    }
    assert_eq!(done, 2);
    let worst = engine.stats().max_admission_us.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("longest admission: {worst} µs (before the hostile request: {before} µs)");
    assert!(worst < 50_000, "one request's admission held the engine for {worst} µs");
}
