//! Membership with a real etcd (started by the test on free loopback ports): workers register
//! with a lease and disappear when killed (after the TTL) or drained (at once); a router follows
//! etcd, fails over to a replica when a worker dies, answers UNAVAILABLE naming the experts when
//! none is left, is ready again when a new holder registers, and refuses another model's worker.
//! A record deleted under a live lease comes back; a duplicate `--worker-id` is refused; a
//! blackholed path to etcd is detected and the watch re-reads through another endpoint;
//! `LoadAdapter`/`UnloadAdapter` on one router reach every router.

mod common;

use common::router_client::{generate, generate_with, health, model_info, resident_adapters};
use common::*;
use moe_membership::{watch_workers, EtcdOptions, WorkerRecord};
use moe_proto::v1::generate_request::Prompt;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{GenerateRequest, SamplingParams, TokenIds};
use std::time::Duration;
use tonic_health::pb::health_check_response::ServingStatus;

fn watch(rt: &tokio::runtime::Runtime, etcd: &Etcd, cluster: &str) -> tokio::sync::watch::Receiver<Vec<WorkerRecord>> {
    let (tx, rx) = tokio::sync::watch::channel(Vec::new());
    let opts = EtcdOptions { endpoints: vec![etcd.url()], cluster: cluster.into(), ..Default::default() };
    rt.spawn(watch_workers(opts, tx, tokio_util::sync::CancellationToken::new()));
    rx
}

fn router(etcd: &Etcd, cluster: &str, model: &str, extra: &[&str]) -> Server {
    let url = etcd.url();
    let mut args = vec!["router", "--model", model, "--etcd", &url, "--cluster", cluster, "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    spawn_server(&args)
}

/// `moe worker` flags registering in `cluster` with a lease of `ttl` seconds.
fn worker_args(etcd: &Etcd, cluster: &str, model: &str, experts: &str, ttl: &str) -> Vec<String> {
    let url = etcd.url();
    ["worker", "--model", model, "--experts", experts, "--listen", "127.0.0.1:0", "--etcd", &url]
        .into_iter()
        .chain(["--cluster", cluster, "--lease-ttl-secs", ttl])
        .map(String::from)
        .collect()
}

fn worker(etcd: &Etcd, cluster: &str, model: &str, experts: &str, ttl: &str) -> Server {
    let args = worker_args(etcd, cluster, model, experts, ttl);
    spawn_server(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn registration_follows_the_worker_lifecycle() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let Some(etcd) = Etcd::start() else { return };
    let members = watch(&rt, &etcd, "life");
    let dir = fixture("mixtral");
    let d = dir.to_str().expect("utf8");
    let killed = worker(&etcd, "life", d, "0:0-1", "2");
    let drained = worker(&etcd, "life", d, "1:2-3", "60");
    eventually("both registrations", 10, || members.borrow().len() == 2);
    let recs = members.borrow().clone();
    let r = recs.iter().find(|r| r.address == killed.addr).expect("record of the first worker");
    assert_eq!(r.experts, vec![(0, vec![0, 1])]);
    assert_eq!(r.device, "cpu");
    assert!(!r.fingerprint.is_empty());
    // SIGKILL: the record stays until its 2 s lease expires, then disappears.
    drop(killed);
    eventually("the killed worker's lease to expire", 15, || members.borrow().len() == 1);
    // SIGTERM: the worker removes its record itself, long before its 60 s lease would expire.
    sigterm(&drained.child);
    eventually("the drained worker to deregister", 10, || members.borrow().is_empty());
}

/// Standard base64, as etcd's JSON gateway wants keys.
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            out.push(if i <= c.len() { A[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// Puts a worker record `id` under `cluster` through etcd's JSON gateway at `url`.
fn put_record(rt: &tokio::runtime::Runtime, url: &str, cluster: &str, id: &str) {
    let record = WorkerRecord {
        id: id.into(),
        address: format!("127.0.0.1:{}", free_port()),
        experts: vec![(0, vec![0])],
        device: "cpu".into(),
        fingerprint: "f".into(),
        version: "v".into(),
        numerics: String::new(),
    };
    let value = serde_json::to_vec(&record).expect("json");
    let key = format!("/moe/{cluster}/workers/{id}");
    rt.block_on(async {
        let body = serde_json::json!({"key": base64(key.as_bytes()), "value": base64(&value)});
        let r = reqwest::Client::new().post(format!("{url}/v3/kv/put")).json(&body).send().await;
        assert!(r.expect("put").status().is_success());
    });
}

/// A watch whose path to etcd goes silent (the relays in front of etcd hold every open
/// connection's traffic without closing it, as a blackhole or a route that lost its flows does)
/// is found broken by the HTTP/2 keepalive within a bounded time, and the table is read again on
/// fresh connections: a worker registered during the blackhole is seen. Without keepalives the
/// watch waits on the silent connection forever and the table stays stale.
#[test]
fn a_blackholed_etcd_path_is_detected_and_the_watch_resyncs_through_another() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let Some(etcd) = Etcd::start() else { return };
    let (first, second) = (relay::Relay::start(&etcd.url()), relay::Relay::start(&etcd.url()));
    let members = watch_all(&rt, &format!("http://{},http://{}", first.addr, second.addr), "blackhole");
    put_record(&rt, &etcd.url(), "blackhole", "before");
    eventually("the watch sees the first record", 10, || members.borrow().iter().any(|r| r.id == "before"));
    first.blackhole_open_connections();
    second.blackhole_open_connections();
    let started = std::time::Instant::now();
    put_record(&rt, &etcd.url(), "blackhole", "during");
    eventually("the record put during the blackhole", 30, || members.borrow().iter().any(|r| r.id == "during"));
    eprintln!("re-synced {:?} after the blackhole began", started.elapsed());
    assert!(members.borrow().iter().any(|r| r.id == "before"), "the re-read lost the first record");
}

/// An operator's `etcdctl del`: a worker's record deleted while its lease lives comes back
/// within one TTL; and a second worker started with the same `--worker-id` at another address
/// is refused with a message naming the id, while the first keeps its record.
#[test]
fn a_deleted_record_comes_back_and_a_duplicate_worker_id_is_refused() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let Some(etcd) = Etcd::start() else { return };
    let members = watch(&rt, &etcd, "rereg");
    let dir = fixture("mixtral");
    let d = dir.to_str().expect("utf8");
    let url = etcd.url();
    let args = |id: &str| {
        let mut a = worker_args(&etcd, "rereg", d, "all", "3");
        a.extend(["--worker-id".to_string(), id.to_string()]);
        a
    };
    let spawn = |id: &str| spawn_server(&args(id).iter().map(String::as_str).collect::<Vec<_>>());
    let first = spawn("w1");
    eventually("registered", 10, || members.borrow().len() == 1);
    let deleted: serde_json::Value = rt.block_on(async {
        let body = serde_json::json!({"key": base64(b"/moe/rereg/workers/w1")});
        let r = reqwest::Client::new().post(format!("{url}/v3/kv/deleterange")).json(&body).send().await;
        r.expect("deleterange").json().await.expect("json")
    });
    assert_eq!(deleted["deleted"], "1", "{deleted}");
    eventually("the record back within one TTL", 3, || {
        members.borrow().iter().any(|r| r.id == "w1" && r.address == first.addr)
    });
    // A second w1 must exit by itself (one that serves would run until killed).
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args("w1"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = second.kill();
            panic!("a second worker with id w1 kept running");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().expect("stderr"), &mut stderr).expect("read");
    assert!(!status.success(), "a second w1 started: {stderr}");
    for needle in ["w1", first.addr.as_str(), "--worker-id"] {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
    assert!(members.borrow().iter().any(|r| r.id == "w1" && r.address == first.addr));
}

/// Two router replicas behind one Service: `LoadAdapter` on one (an id given its own path) is
/// loaded by the other through etcd and serves there with the same tokens; `UnloadAdapter` on
/// the first withdraws it from both. A router started afterwards loads what is published.
#[test]
fn adapters_loaded_on_one_router_reach_every_router() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let Some(etcd) = Etcd::start() else { return };
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = fixture("mixtral");
    let d = dir.to_str().expect("utf8");
    let ads = tmp.path().join("adapters");
    write_random_adapter(&dir, &ads.join("gate-v1"), &["gate", "experts"], 4, 5);
    let a = ads.to_str().expect("utf8");
    let mut wargs = worker_args(&etcd, "ads", d, "all", "5");
    wargs.extend(["--adapter-dir".to_string(), a.to_string()]);
    let _worker = spawn_server(&wargs.iter().map(String::as_str).collect::<Vec<_>>());
    let routers: Vec<Server> = (0..2).map(|_| router(&etcd, "ads", d, &["--adapter-dir", a])).collect();
    for r in &routers {
        eventually("router ready", 20, || rt.block_on(health(&r.addr)) == ServingStatus::Serving as i32);
    }
    let mut admin = rt.block_on(InferenceClient::connect(format!("http://{}", routers[0].addr))).expect("connect");
    let load = moe_proto::v1::LoadAdapterRequest { id: "acme".into(), path: "gate-v1".into() };
    rt.block_on(admin.load_adapter(load)).expect("LoadAdapter");
    eventually("the other router loads it", 10, || {
        rt.block_on(resident_adapters(&routers[1].addr)).contains(&"acme".to_string())
    });
    let prompt = vec![3, 1, 4, 1, 5];
    let here = rt.block_on(generate_with(&routers[0].addr, prompt.clone(), "acme")).expect("first router");
    let there = rt.block_on(generate_with(&routers[1].addr, prompt.clone(), "acme")).expect("second router");
    assert_eq!(here, there);
    let late = router(&etcd, "ads", d, &["--adapter-dir", a]);
    eventually("a router started later loads it", 20, || {
        rt.block_on(resident_adapters(&late.addr)).contains(&"acme".to_string())
    });
    rt.block_on(admin.unload_adapter(moe_proto::v1::UnloadAdapterRequest { id: "acme".into() }))
        .expect("UnloadAdapter");
    for r in [&routers[1], &late] {
        eventually("withdrawn everywhere", 10, || {
            !rt.block_on(resident_adapters(&r.addr)).contains(&"acme".to_string())
        });
        let gone = rt.block_on(generate_with(&r.addr, prompt.clone(), "acme")).expect_err("acme was unloaded");
        assert_eq!(gone.code(), tonic::Code::NotFound, "{gone:?}");
    }
}

#[test]
fn router_follows_etcd_through_failures_and_recovery() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let Some(etcd) = Etcd::start() else { return };
    let dir = fixture("mixtral");
    let d = dir.to_str().expect("utf8");
    let case = &expected("mixtral")["cases"][2];
    let prompt = u32s(&case["token_ids"]);
    let want = u32s(&case["greedy_new_tokens"])[..8].to_vec();
    let a = worker(&etcd, "fo", d, "all", "2");
    let b = worker(&etcd, "fo", d, "all", "2");
    let router = router(&etcd, "fo", d, &["--wire", "f32"]);
    eventually("the router to be ready", 15, || rt.block_on(health(&router.addr)) == ServingStatus::Serving as i32);
    // Ready needs one holder per expert; failover needs the router to know both replicas.
    eventually("the router to see both workers", 15, || rt.block_on(model_info(&router.addr)).workers == 2);
    assert_eq!(rt.block_on(generate(&router.addr, prompt.clone())).expect("both up"), want);

    // One replica dies: requests go on at once (before its lease expires), with the same tokens.
    drop(a);
    assert_eq!(rt.block_on(generate(&router.addr, prompt.clone())).expect("failover"), want);

    // No holder left: UNAVAILABLE naming what is missing, within the deadline; not ready.
    drop(b);
    let err = rt.block_on(generate(&router.addr, prompt.clone())).expect_err("no workers");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("layer 0") && err.message().contains("expert"), "{}", err.message());
    eventually("the router to report not ready", 15, || {
        rt.block_on(health(&router.addr)) == ServingStatus::NotServing as i32
    });

    // A worker of another model is refused: the router stays not ready.
    let other = fixture("olmoe");
    let _wrong = worker(&etcd, "fo", other.to_str().expect("utf8"), "all", "2");
    eventually("the refusal to show in ModelInfo", 15, || {
        !rt.block_on(model_info(&router.addr)).refused_workers.is_empty()
    });
    let info = rt.block_on(model_info(&router.addr));
    assert!(!info.ready);
    assert!(info.refused_workers[0].contains("different model"), "{:?}", info.refused_workers);
    assert!(info.not_ready_reason.contains("layer 0"), "{}", info.not_ready_reason);
    assert_eq!(rt.block_on(health(&router.addr)), ServingStatus::NotServing as i32);
    assert!(rt.block_on(generate(&router.addr, prompt.clone())).is_err());

    // A new holder registers: ready again, and requests succeed.
    let _c = worker(&etcd, "fo", d, "all", "2");
    eventually("the router to be ready again", 15, || {
        rt.block_on(health(&router.addr)) == ServingStatus::Serving as i32
    });
    assert_eq!(rt.block_on(generate(&router.addr, prompt)).expect("recovered"), want);
}

#[test]
fn serving_survives_an_etcd_outage_longer_than_the_ttl() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let Some(mut etcd) = Etcd::start() else { return };
    let members = watch(&rt, &etcd, "outage");
    let dir = fixture("mixtral");
    let d = dir.to_str().expect("utf8");
    let _w = worker(&etcd, "outage", d, "all", "2");
    let router = router(&etcd, "outage", d, &[]);
    eventually("ready", 15, || rt.block_on(health(&router.addr)) == ServingStatus::Serving as i32);
    let prompt = vec![3u32, 1, 4, 1, 5];
    let before = rt.block_on(generate(&router.addr, prompt.clone())).expect("before");
    etcd.stop();
    // Longer than the 2 s TTL: the router keeps its last table and goes on serving.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(rt.block_on(generate(&router.addr, prompt.clone())).expect("during the outage"), before);
    }
    etcd.launch();
    // The worker registers again and the watch converges on it.
    eventually("the worker to re-register", 30, || members.borrow().len() == 1);
    eventually("the router to be ready", 30, || rt.block_on(health(&router.addr)) == ServingStatus::Serving as i32);
    assert_eq!(rt.block_on(generate(&router.addr, prompt)).expect("after"), before);
}

/// SIGTERM on a worker, then on the router, while streams run: no request fails.
#[test]
fn sigterm_drains_without_failing_requests() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let Some(etcd) = Etcd::start() else { return };
    let tmp = tempfile::tempdir().expect("tmp");
    endless_model(tmp.path());
    let d = tmp.path().to_str().expect("utf8");
    let a = worker(&etcd, "drain", d, "all", "2");
    let _b = worker(&etcd, "drain", d, "all", "2");
    let router = router(&etcd, "drain", d, &[]);
    eventually("ready", 15, || rt.block_on(health(&router.addr)) == ServingStatus::Serving as i32);
    eventually("both workers in use", 15, || rt.block_on(model_info(&router.addr)).workers == 2);
    // Each stream signals its first token, so the signals below land mid-generation.
    let run = |n: u32, tokens: u32| {
        let addr = router.addr.clone();
        let (started_tx, mut started) = tokio::sync::mpsc::channel::<()>(n as usize);
        let handles = (0..n)
            .map(|i| {
                let addr = addr.clone();
                let started_tx = started_tx.clone();
                rt.spawn(async move {
                    let mut c = InferenceClient::connect(format!("http://{addr}")).await.expect("connect");
                    let req = GenerateRequest {
                        prompt: Some(Prompt::TokenIds(TokenIds { ids: vec![i + 1, 2 * i + 3] })),
                        sampling: Some(SamplingParams { max_new_tokens: Some(tokens), ..Default::default() }),
                        ..Default::default()
                    };
                    let mut s = c.generate_stream(req).await.expect("stream").into_inner();
                    let mut n = 0;
                    while let Some(m) = s.message().await.map_err(|e| format!("request {i}: {e}"))? {
                        if let Some(moe_proto::v1::generate_stream_response::Event::Delta(d)) = m.event {
                            if n == 0 {
                                let _ = started_tx.send(()).await;
                            }
                            n += d.token_ids.len();
                        }
                    }
                    Ok::<usize, String>(n)
                })
            })
            .collect::<Vec<_>>();
        for _ in 0..n {
            started.blocking_recv().expect("a stream started");
        }
        handles
    };
    let load = run(8, 300);
    sigterm(&a.child);
    for h in load {
        assert_eq!(rt.block_on(h).expect("task"), Ok(300), "a request failed while a worker drained");
    }
    let load = run(4, 60);
    sigterm(&router.child);
    for h in load {
        assert_eq!(rt.block_on(h).expect("task"), Ok(60), "a request failed while the router drained");
    }
}

/// Replication 2 over three workers found through etcd; 16 concurrent greedy generations; one
/// worker is SIGKILLed mid-generation: all complete, equal to a run with no failure.
#[test]
fn etcd_cluster_loses_no_request_when_a_replica_dies() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let Some(etcd) = Etcd::start() else { return };
    let tmp = tempfile::tempdir().expect("tmp");
    endless_model(tmp.path());
    let d = tmp.path().to_str().expect("utf8");
    let mut workers: Vec<Option<Server>> =
        REPLICATED_SPECS.iter().map(|s| Some(worker(&etcd, "rep", d, s, "2"))).collect();
    let members = watch(&rt, &etcd, "rep");
    let cfg = moe_dispatch::GrpcTransportConfig { wire: moe_proto::v1::WireDtype::F32, ..Default::default() };
    let (engine, _d, mut ready) = {
        let _guard = rt.enter();
        moe_cluster::membership_router(tmp.path(), members, cfg, moe_router::EngineConfig::default()).expect("router")
    };
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|r| *r))
            .await
            .expect("ready in time")
            .expect("ready");
    });
    generations_survive_a_kill(&engine, tmp.path(), &mut workers);
}

/// A three-member etcd cluster whose leader is killed while requests run, and restarted: every
/// request completes with the failure-free tokens, the workers' leases survive the election,
/// and the router's watch goes on (a worker that registers afterwards is used once the first
/// two are gone).
#[test]
fn etcd_leader_restart_loses_no_request_and_the_watch_goes_on() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let Some(mut etcd) = EtcdCluster::start() else { return };
    let urls = etcd.urls();
    let dir = fixture("mixtral");
    let d = dir.to_str().expect("utf8");
    let case = &expected("mixtral")["cases"][2];
    let prompt = u32s(&case["token_ids"]);
    let want = u32s(&case["greedy_new_tokens"])[..8].to_vec();
    let worker = |ttl: &str| {
        spawn_server(&[
            "worker",
            "--model",
            d,
            "--experts",
            "all",
            "--listen",
            "127.0.0.1:0",
            "--etcd",
            &urls,
            "--cluster",
            "lead",
            "--lease-ttl-secs",
            ttl,
        ])
    };
    let (a, b) = (worker("3"), worker("3"));
    let router = spawn_server(&[
        "router",
        "--model",
        d,
        "--etcd",
        &urls,
        "--cluster",
        "lead",
        "--listen",
        "127.0.0.1:0",
        "--wire",
        "f32",
    ]);
    eventually("the router to be ready", 20, || rt.block_on(health(&router.addr)) == ServingStatus::Serving as i32);
    assert_eq!(rt.block_on(generate(&router.addr, prompt.clone())).map_err(|e| e.to_string()), Ok(want.clone()));

    let mut leader = None;
    eventually("an etcd leader", 10, || {
        leader = etcd.leader(&rt, 0);
        leader.is_some()
    });
    let leader = leader.expect("leader");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (addr, prompt, stop) = (router.addr.clone(), prompt.clone(), stop.clone());
            rt.spawn(async move {
                let mut results = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    results.push(generate(&addr, prompt.clone()).await);
                }
                results
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    etcd.kill(leader);
    let other = (leader + 1) % 3;
    eventually("a new etcd leader", 15, || etcd.leader(&rt, other).is_some_and(|l| l != leader));
    // Past the workers' 3 s TTL: their leases were kept alive through the new leader.
    std::thread::sleep(Duration::from_secs(4));
    etcd.launch(leader);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut n = 0;
    for h in load {
        for r in rt.block_on(h).expect("task") {
            assert_eq!(r.map_err(|e| e.to_string()), Ok(want.clone()), "a request during the leader change");
            n += 1;
        }
    }
    assert!(n >= 4, "only {n} requests ran");
    let members = watch_all(&rt, &urls, "lead");
    eventually("both workers still registered", 10, || members.borrow().len() == 2);

    // The router's watch survived: a new worker is used once the first two are gone.
    let c = worker("3");
    eventually("three workers registered", 10, || members.borrow().len() == 3);
    drop((a, b));
    eventually("the killed workers' leases to expire", 20, || members.borrow().len() == 1);
    assert_eq!(members.borrow()[0].address, c.addr);
    let mut last = Err(tonic::Status::unknown("not run"));
    eventually("the router to use the new worker", 20, || {
        last = rt.block_on(generate(&router.addr, prompt.clone()));
        last.is_ok()
    });
    assert_eq!(last.map_err(|e| e.to_string()), Ok(want));
}

fn watch_all(
    rt: &tokio::runtime::Runtime,
    urls: &str,
    cluster: &str,
) -> tokio::sync::watch::Receiver<Vec<WorkerRecord>> {
    let (tx, rx) = tokio::sync::watch::channel(Vec::new());
    let endpoints = urls.split(',').map(String::from).collect();
    let opts = EtcdOptions { endpoints, cluster: cluster.into(), ..Default::default() };
    rt.spawn(watch_workers(opts, tx, tokio_util::sync::CancellationToken::new()));
    rx
}
