//! The cluster gives the single-process model's answers in every topology: the embedded cluster
//! with 1 and 3 in-process workers, and worker processes over loopback gRPC with experts split
//! unevenly (logits within 1e-4 of transformers in f32 wire mode, also with every batch split
//! into many small messages; greedy tokens through a router process equal to transformers').

mod common;

use common::*;
use moe_cluster::{in_process_dispatcher, load_router_model, remote_dispatcher};
use moe_compute::cpu::CpuBackend;
use moe_dispatch::GrpcTransportConfig;
use moe_model::{BatchItem, ExpertExecutor, LogitsFor, SequenceCache};
use moe_proto::v1::WireDtype;
use moe_router::{Engine, EngineConfig, EngineParts, Event, GenerationParams, PromptInput, ValidatedRequest};
use std::sync::Arc;
use std::time::Duration;

/// Greedy generation through an engine (the router's batching loop).
fn engine_greedy(engine: &Engine, ids: &[u32], n: usize) -> Vec<u32> {
    let params = GenerationParams { max_new_tokens: Some(n as u32), ..Default::default() };
    let req = ValidatedRequest::new(
        PromptInput::Ids(ids.to_vec()),
        &params,
        engine.codec(),
        engine.model_config(),
        Duration::from_secs(60),
    )
    .expect("valid");
    let (_, mut events) = engine.submit(req).expect("submit");
    let mut out = Vec::new();
    while let Some(ev) = events.blocking_recv() {
        match ev {
            Event::Delta { token_ids, .. } => out.extend(token_ids),
            Event::Finished { .. } => return out,
            Event::Failed(e) => panic!("request failed: {e}"),
        }
    }
    panic!("no terminal event");
}

#[test]
fn embedded_cluster_matches_transformers_with_1_and_3_workers() {
    for arch in all_archs() {
        let dir = fixture(arch);
        let (model, _) = load_router_model(&dir, moe_compute::cpu::CpuBackend::new()).expect("dense model");
        for workers in [1, 3] {
            let dispatcher = in_process_dispatcher(&dir, workers).expect("workers");
            for case in expected(arch)["cases"].as_array().expect("cases") {
                let ids = u32s(&case["token_ids"]);
                let err = rel_err(&logits_with(&model, Some(&dispatcher), None, &ids), &matrix(&case["logits"]));
                assert!(err < 1e-4, "{arch}, {workers} workers, {} tokens: relative error {err}", ids.len());
            }
            let engine = moe_cluster::embedded(&dir, workers, EngineConfig::default()).expect("engine");
            for case in expected(arch)["cases"].as_array().expect("cases") {
                let want = u32s(&case["greedy_new_tokens"]);
                let got = engine_greedy(&engine, &u32s(&case["token_ids"]), want.len());
                assert_eq!(got, want, "{arch}, embedded cluster with {workers} workers");
            }
        }
    }
}

/// Three worker processes with an uneven split of each fixture's experts.
fn uneven_workers(arch: &str) -> Vec<Server> {
    let dir = fixture(arch);
    let d = dir.to_str().expect("utf8");
    let specs: [&str; 3] = match arch {
        "mixtral" => ["0:0-2", "0:3,1:0", "1:1-3"],
        "qwen2_moe" => ["*:0", "*:1-3", "*:4-5"],
        "qwen3_moe" => ["*:0-4", "*:5", "*:6-7"],
        _ => ["*:0", "*:1", "*:2-7"],
    };
    specs.iter().map(|s| spawn_server(&["worker", "--model", d, "--experts", s, "--listen", "127.0.0.1:0"])).collect()
}

#[test]
fn worker_processes_over_grpc_match_transformers() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for arch in all_archs() {
        let dir = fixture(arch);
        let workers = uneven_workers(arch);
        let addrs: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
        let (model, _) = load_router_model(&dir, moe_compute::cpu::CpuBackend::new()).expect("dense model");
        // f32 on the wire, once more with every batch split into messages of a few rows, and
        // bf16 (the default) within bf16 tolerance.
        let mut modes = vec![(WireDtype::F32, 8 << 20, 1e-4), (WireDtype::F32, 1000, 1e-4)];
        // The 2026 fixtures route by sigmoid scores whose margins (2e-3) are below what a bf16
        // wire rounds, so there a bf16 row may rightly flip a later layer's expert choice.
        if ARCHS.contains(&arch) {
            modes.push((WireDtype::Bf16, 8 << 20, 3e-2));
        }
        for (wire, max_rows_bytes, tol) in modes {
            let cfg = GrpcTransportConfig { wire, max_rows_bytes, ..Default::default() };
            let dispatcher = rt.block_on(remote_dispatcher(&model.config, &addrs, cfg)).expect("connect");
            let dispatcher = Arc::new(dispatcher);
            for case in expected(arch)["cases"].as_array().expect("cases") {
                let ids = u32s(&case["token_ids"]);
                let (m, d) = (model.clone(), dispatcher.clone());
                // The gRPC transport blocks on the runtime: call it from a plain thread.
                let got =
                    std::thread::spawn(move || logits_with(&m, Some(d.as_ref()), None, &ids)).join().expect("thread");
                let err = rel_err(&got, &matrix(&case["logits"]));
                assert!(
                    err < tol,
                    "{arch} over gRPC ({wire:?}, max_rows_bytes {max_rows_bytes}): relative error {err}"
                );
            }
        }

        // A router process in front of the workers, asked through `moe generate --endpoint`.
        let workers_arg = addrs.join(",");
        let router = spawn_server(&[
            "router",
            "--model",
            dir.to_str().expect("utf8"),
            "--workers",
            &workers_arg,
            "--listen",
            "127.0.0.1:0",
            "--wire",
            "f32",
        ]);
        for case in expected(arch)["cases"].as_array().expect("cases") {
            let want = u32s(&case["greedy_new_tokens"]);
            let n = want.len().to_string();
            let ids = ids_arg(&u32s(&case["token_ids"]));
            let out =
                moe(&["generate", "--endpoint", &router.addr, "--token-ids", &ids, "--max-new-tokens", &n, "--json"]);
            assert_eq!(out.code, 0, "{}", out.stderr);
            assert_eq!(u32s(&out.json()["token_ids"]), want, "{arch} through router and worker processes");
        }
    }
}

#[test]
fn router_refuses_to_start_when_an_expert_has_no_holder() {
    let dir = fixture("mixtral");
    let d = dir.to_str().expect("utf8");
    let w = spawn_server(&["worker", "--model", d, "--experts", "0:0-3,1:0-2", "--listen", "127.0.0.1:0"]);
    let out = moe(&["router", "--model", d, "--workers", &w.addr, "--listen", "127.0.0.1:0"]);
    out.assert_error(&["not ready", "layer 1: expert 3"]);
    // A worker of another model is refused by fingerprint.
    let other = fixture("olmoe");
    let o = spawn_server(&["worker", "--model", other.to_str().expect("utf8"), "--listen", "127.0.0.1:0"]);
    let out = moe(&["router", "--model", d, "--workers", &o.addr, "--listen", "127.0.0.1:0"]);
    out.assert_error(&["different model", &o.addr]);
}

/// Replication 2 over three worker processes; 16 concurrent greedy generations; one worker is
/// killed (SIGKILL) while they run. Every generation completes, token for token equal to the
/// single-process model's.
#[test]
fn failover_to_replicas_loses_no_request() {
    let tmp = tempfile::tempdir().expect("tmp");
    endless_model(tmp.path());
    let d = tmp.path().to_str().expect("utf8");
    let mut workers: Vec<Option<Server>> = REPLICATED_SPECS
        .iter()
        .map(|s| Some(spawn_server(&["worker", "--model", d, "--experts", s, "--listen", "127.0.0.1:0"])))
        .collect();
    let addrs: Vec<String> = workers.iter().flatten().map(|w| w.addr.clone()).collect();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cfg = GrpcTransportConfig { wire: WireDtype::F32, ..Default::default() };
    let engine = rt.block_on(moe_cluster::remote(tmp.path(), &addrs, cfg, EngineConfig::default())).expect("router");
    generations_survive_a_kill(&engine, tmp.path(), &mut workers);
}

/// An expert with no holder fails only the requests whose tokens route to it (UNAVAILABLE
/// naming the layer and expert); the others of the same batches complete with correct tokens.
#[test]
fn missing_expert_fails_only_the_requests_that_need_it() {
    use moe_dispatch::{Dispatcher, InProcessTransport, Placement};
    use moe_worker::{ExpertHost, ExpertSpec};
    let dir = fixture("mixtral");
    let spec = "0:0-3,1:0-2".parse::<ExpertSpec>().expect("spec");
    let host = Arc::new(ExpertHost::load(&dir, &spec, CpuBackend::new()).expect("host"));
    let mut placement = Placement::new(2, 4);
    for (layer, experts) in host.hosted() {
        placement.add(0, layer, &experts).expect("add");
    }
    let dispatcher: Arc<dyn ExpertExecutor<CpuBackend>> =
        Arc::new(Dispatcher::new(InProcessTransport::new(vec![host]), placement, 1));
    let (model, codec) = load_router_model(&dir, CpuBackend::new()).expect("dense");
    let parts = EngineParts { model, codec, experts: Some(dispatcher), adapters: None };
    let engine = Engine::start(parts, EngineConfig::default()).expect("engine");
    let mut streams = Vec::new();
    for t in 0..24u32 {
        let params = GenerationParams { max_new_tokens: Some(1), ..Default::default() };
        let req = ValidatedRequest::new(
            PromptInput::Ids(vec![t * 5 % 128]),
            &params,
            engine.codec(),
            engine.model_config(),
            Duration::from_secs(60),
        )
        .expect("valid");
        streams.push((t * 5 % 128, engine.submit(req).expect("submit").1));
    }
    let (mut ok, mut failed) = (0, 0);
    for (token, mut s) in streams {
        let mut got = Vec::new();
        loop {
            match s.blocking_recv().expect("terminal event") {
                Event::Delta { token_ids, .. } => got.extend(token_ids),
                Event::Finished { .. } => {
                    assert_eq!(got, solo_greedy(&dir, &[token], 1), "token {token}");
                    ok += 1;
                    break;
                }
                Event::Failed(e) => {
                    assert_eq!(e.code(), tonic::Code::Unavailable);
                    assert!(e.to_string().contains("layer 1 expert 3"), "{e}");
                    failed += 1;
                    break;
                }
            }
        }
    }
    assert!(ok > 0 && failed > 0, "{ok} completed, {failed} failed");
}

/// A worker that stops answering but keeps its connection (SIGSTOP) is caught by the dispatch
/// deadline and its rows go to a replica: requests complete with the right tokens.
#[test]
fn frozen_worker_is_bypassed_after_the_dispatch_deadline() {
    let dir = fixture("mixtral");
    let d = dir.to_str().expect("utf8");
    let a = spawn_server(&["worker", "--model", d, "--experts", "all", "--listen", "127.0.0.1:0"]);
    let b = spawn_server(&["worker", "--model", d, "--experts", "all", "--listen", "127.0.0.1:0"]);
    let router = spawn_server(&[
        "router",
        "--model",
        d,
        "--workers",
        &format!("{},{}", a.addr, b.addr),
        "--listen",
        "127.0.0.1:0",
        "--wire",
        "f32",
        "--dispatch-timeout-ms",
        "1000",
    ]);
    let case = &expected("mixtral")["cases"][3];
    let ids = ids_arg(&u32s(&case["token_ids"]));
    let want = u32s(&case["greedy_new_tokens"]);
    let n = want.len().to_string();
    let run = || {
        let out = moe(&["generate", "--endpoint", &router.addr, "--token-ids", &ids, "--max-new-tokens", &n, "--json"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        u32s(&out.json()["token_ids"])
    };
    assert_eq!(run(), want);
    let _ = std::process::Command::new("kill").args(["-STOP", &a.child.id().to_string()]).status();
    assert_eq!(run(), want, "with one worker frozen");
    assert_eq!(run(), want, "again, with the frozen worker left out");
    let _ = std::process::Command::new("kill").args(["-CONT", &a.child.id().to_string()]).status();
}

/// Two-batch overlap: a batch of sequences run as two interleaved halves over worker processes
/// gives the same logits as the plain forward (prefill of three prompts, then a decode step),
/// and engines with and without overlap generate the same tokens, equal to transformers'.
#[test]
fn two_batch_overlap_matches_the_plain_forward() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for arch in ["mixtral", "qwen2_moe"] {
        let dir = fixture(arch);
        let workers = uneven_workers(arch);
        let addrs: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
        let (model, _) = load_router_model(&dir, moe_compute::cpu::CpuBackend::new()).expect("dense model");
        let cfg = GrpcTransportConfig { wire: WireDtype::F32, ..Default::default() };
        let dispatcher = Arc::new(rt.block_on(remote_dispatcher(&model.config, &addrs, cfg.clone())).expect("connect"));
        assert!(
            ExpertExecutor::<CpuBackend>::overlaps(dispatcher.as_ref()),
            "the gRPC dispatcher must start calls without waiting"
        );
        let cases = expected(arch)["cases"].as_array().expect("cases").clone();
        let prompts: Vec<Vec<u32>> = cases.iter().take(3).map(|c| u32s(&c["token_ids"])).collect();
        let (m, d) = (model.clone(), dispatcher.clone());
        let (plain, overlapped) = std::thread::spawn(move || {
            let run = |overlap: bool| {
                let mut ws = m.workspace();
                let mut ws_b = m.workspace();
                let mut kv = m.kv_cache(64, 16).expect("kv");
                let mut caches = vec![SequenceCache::default(); prompts.len()];
                let mut out = Vec::new();
                let mut all = Vec::new();
                for step in 0..2 {
                    // Step 0 prefills every prompt; step 1 decodes one token each.
                    let toks: Vec<Vec<u32>> =
                        prompts.iter().map(|p| if step == 0 { p.clone() } else { vec![p[0]] }).collect();
                    let mut batch: Vec<BatchItem<'_, CpuBackend>> =
                        toks.iter().zip(caches.iter_mut()).map(|(t, c)| BatchItem::new(t, c)).collect();
                    if overlap {
                        let split = moe_model::overlap_split(&batch);
                        assert!(split > 0);
                        m.forward_overlapped(
                            &mut ws,
                            &mut ws_b,
                            &mut kv,
                            &mut batch,
                            split,
                            LogitsFor::All,
                            &mut out,
                            d.as_ref(),
                        )
                    } else {
                        m.forward_with(&mut ws, &mut kv, &mut batch, LogitsFor::All, &mut out, Some(d.as_ref()))
                    }
                    .expect("forward");
                    all.extend_from_slice(&out);
                }
                all
            };
            (run(false), run(true))
        })
        .join()
        .expect("thread");
        assert_eq!(plain.len(), overlapped.len());
        let err = rel_err(&[overlapped], &[plain]);
        // Only the order of sums differs (GEMM paths depend on the row count): ~1e-6.
        assert!(err < 1e-5, "{arch}: overlapped forward differs from the plain one by {err}");

        for overlap in [true, false] {
            let engine_cfg = EngineConfig { two_batch_overlap: overlap, ..Default::default() };
            let engine = rt.block_on(moe_cluster::remote(&dir, &addrs, cfg.clone(), engine_cfg)).expect("engine");
            let handles: Vec<_> = cases
                .iter()
                .map(|c| {
                    let (e, ids, want) = (engine.clone(), u32s(&c["token_ids"]), u32s(&c["greedy_new_tokens"]));
                    std::thread::spawn(move || (engine_greedy(&e, &ids, want.len()), want))
                })
                .collect();
            for h in handles {
                let (got, want) = h.join().expect("thread");
                assert_eq!(got, want, "{arch}, two-batch overlap {overlap}");
            }
        }
    }
}
