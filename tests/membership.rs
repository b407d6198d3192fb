//! Membership with a real etcd (started by the test on free loopback ports): workers register
//! with a lease and disappear when killed (after the TTL) or drained (at once); a router follows
//! etcd, fails over to a replica when a worker dies, answers UNAVAILABLE naming the experts when
//! none is left, is ready again when a new holder registers, and refuses another model's worker.

mod common;

use common::*;
use moe_membership::{watch_workers, EtcdOptions, WorkerRecord};
use moe_proto::v1::generate_request::Prompt;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{GenerateRequest, SamplingParams, TokenIds};
use std::time::Duration;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn watch(rt: &tokio::runtime::Runtime, etcd: &Etcd, cluster: &str) -> tokio::sync::watch::Receiver<Vec<WorkerRecord>> {
    let (tx, rx) = tokio::sync::watch::channel(Vec::new());
    let opts = EtcdOptions { endpoints: vec![etcd.url()], cluster: cluster.into(), ..Default::default() };
    rt.spawn(watch_workers(opts, tx, tokio_util::sync::CancellationToken::new()));
    rx
}

fn worker(etcd: &Etcd, cluster: &str, model: &str, experts: &str, ttl: &str) -> Server {
    spawn_server(&[
        "worker",
        "--model",
        model,
        "--experts",
        experts,
        "--listen",
        "127.0.0.1:0",
        "--etcd",
        &etcd.url(),
        "--cluster",
        cluster,
        "--lease-ttl-secs",
        ttl,
    ])
}

#[test]
fn registration_follows_the_worker_lifecycle() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let etcd = Etcd::start();
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

async fn generate(addr: &str, ids: Vec<u32>) -> Result<Vec<u32>, tonic::Status> {
    let mut c = InferenceClient::connect(format!("http://{addr}")).await.expect("connect");
    let req = GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids })),
        sampling: Some(SamplingParams { max_new_tokens: Some(8), ..Default::default() }),
        ..Default::default()
    };
    c.generate(req).await.map(|r| r.into_inner().token_ids)
}

async fn health(addr: &str) -> i32 {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut h = HealthClient::new(channel);
    h.check(HealthCheckRequest { service: "moe.v1.Inference".into() }).await.expect("health").into_inner().status
}

#[test]
fn router_follows_etcd_through_failures_and_recovery() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let etcd = Etcd::start();
    let dir = fixture("mixtral");
    let d = dir.to_str().expect("utf8");
    let case = &expected("mixtral")["cases"][2];
    let prompt = u32s(&case["token_ids"]);
    let want = u32s(&case["greedy_new_tokens"])[..8].to_vec();
    let a = worker(&etcd, "fo", d, "all", "2");
    let b = worker(&etcd, "fo", d, "all", "2");
    let router = spawn_server(&[
        "router",
        "--model",
        d,
        "--etcd",
        &etcd.url(),
        "--cluster",
        "fo",
        "--listen",
        "127.0.0.1:0",
        "--wire",
        "f32",
    ]);
    eventually("the router to be ready", 15, || rt.block_on(health(&router.addr)) == ServingStatus::Serving as i32);
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
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(rt.block_on(health(&router.addr)), ServingStatus::NotServing as i32);
    assert!(rt.block_on(generate(&router.addr, prompt.clone())).is_err());

    // A new holder registers: ready again, and requests succeed.
    let _c = worker(&etcd, "fo", d, "all", "2");
    eventually("the router to be ready again", 15, || {
        rt.block_on(health(&router.addr)) == ServingStatus::Serving as i32
    });
    assert_eq!(rt.block_on(generate(&router.addr, prompt)).expect("recovered"), want);
}
