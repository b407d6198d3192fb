//! Membership changes apply as differences (no etcd: snapshots are handed to the dispatcher
//! directly). Two loopback workers sit behind counting proxies, so the test sees every TCP
//! connection the router opens: a worker that stays keeps its one connection through a re-sent
//! identical snapshot, a worker joining, and a worker leaving; the dispatcher is rebuilt only for
//! real changes, and every call's result equals the local experts'.

mod common;

use common::run_layer;
use moe_compute::cpu::CpuBackend;
use moe_dispatch::{GrpcTransportConfig, MembershipDispatcher};
use moe_membership::WorkerRecord;
use moe_model::{Model, ModelConfig};
use moe_worker::{ExpertCompute, ExpertHost, ExpertSpec};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A worker serving `spec` on loopback, reached through a proxy that counts connections.
struct Worker {
    record: WorkerRecord,
    connections: Arc<AtomicUsize>,
}

async fn start_worker(dir: &Path, id: &str, spec: &str) -> Worker {
    let spec: ExpertSpec = spec.parse().expect("spec");
    let host = ExpertHost::load(dir, &spec, CpuBackend::new()).expect("host");
    let record = WorkerRecord {
        id: id.into(),
        address: String::new(),
        experts: host.hosted().into_iter().map(|(l, e)| (l as u32, e)).collect(),
        device: host.device().to_string(),
        fingerprint: ExpertCompute::fingerprint(&host).to_string(),
        version: String::new(),
        numerics: String::new(),
    };
    let host: Arc<dyn ExpertCompute> = Arc::new(host);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind worker");
    let worker_addr = listener.local_addr().expect("addr");
    tokio::spawn(moe_worker::serve_worker(host, id.into(), listener, std::future::pending::<()>()));
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let proxy_addr = proxy.local_addr().expect("addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = proxy.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(worker_addr).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Worker { record: WorkerRecord { address: proxy_addr.to_string(), ..record }, connections }
}

/// Layer 0 of `rows` rows, each routed to every expert with weight 1/E (the test model routes
/// top-8 of 8): every worker of the
/// membership gets rows. Returns the combined rows.
fn call_layer(d: &MembershipDispatcher, config: &ModelConfig, rows: usize) -> Vec<f32> {
    let (h, e) = (config.hidden_size, config.num_experts);
    let choices: Vec<(u32, f32)> = (0..rows).flat_map(|_| (0..e as u32).map(|x| (x, 1.0 / e as f32))).collect();
    let x: Vec<f32> = (0..rows * h).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
    let (out, unserved) = run_layer(d, &x, h, e, e, &choices);
    assert!(unserved.is_empty(), "{unserved:?}");
    out
}

/// The same layer on the model's own experts, in this process.
fn local_layer(dir: &Path, config: &ModelConfig, rows: usize) -> Vec<f32> {
    let model = Model::load(dir, CpuBackend::new()).expect("model");
    let host = ExpertHost::load(dir, &ExpertSpec::All, model.backend().clone()).expect("host");
    let (h, e) = (config.hidden_size, config.num_experts);
    let x: Vec<f32> = (0..rows * h).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
    let row_pairs = vec![e as u32; rows];
    let experts: Vec<u32> = (0..rows).flat_map(|_| 0..e as u32).collect();
    let weights = vec![1.0 / e as f32; rows * e];
    let input = moe_worker::ComputeInput::base(0, h, &x, &row_pairs, &experts, &weights);
    let mut pairs = Vec::new();
    host.compute(&input, &mut pairs).expect("local compute");
    // One answer row per (row, expert); a row's sum adds them in ascending expert order.
    let mut out = vec![0.0f32; rows * h];
    for (p, pair) in pairs.chunks_exact(h).enumerate() {
        for (o, v) in out[(p / e) * h..(p / e + 1) * h].iter_mut().zip(pair) {
            *o += v;
        }
    }
    out
}

/// Equal bit for bit: the combine is placement-invariant.
fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn a_membership_change_keeps_the_streams_of_workers_that_stay() {
    let tmp = tempfile::tempdir().expect("tmp");
    let spec = moe_demo::DemoSpec {
        num_layers: 2,
        hidden_size: 64,
        intermediate_size: 96,
        top_k: 8,
        ..moe_demo::DemoSpec::demo()
    };
    moe_demo::write_demo_model(tmp.path(), &spec).expect("demo model");
    let dir = tmp.path();
    let config = ModelConfig::from_dir(dir).expect("config");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let a = rt.block_on(start_worker(dir, "a", "*:0-3"));
    let b = rt.block_on(start_worker(dir, "b", "*:4-7"));
    let c = rt.block_on(start_worker(dir, "c", "all"));
    // The wire is f32 so that remote and local results agree to rounding.
    let transport = GrpcTransportConfig { wire: moe_proto::v1::WireDtype::F32, ..Default::default() };
    let metrics = transport.metrics.clone();
    let d = MembershipDispatcher::new(config.clone(), transport);
    let apply = |records: &[&WorkerRecord]| {
        let _guard = rt.enter();
        d.apply(&records.iter().map(|r| (*r).clone()).collect::<Vec<_>>())
    };
    let want = local_layer(dir, &config, 3);

    assert!(apply(&[&a.record, &b.record]), "a and b hold every expert");
    assert!(close(&call_layer(&d, &config, 3), &want));
    assert_eq!(d.rebuilds(), 1);
    let counts = || (a.connections.load(Ordering::SeqCst), b.connections.load(Ordering::SeqCst));
    assert_eq!(counts(), (1, 1), "one connection per worker");

    // etcd re-sends the whole set after a reconnect: nothing changes, in any order.
    assert!(apply(&[&b.record, &a.record]));
    assert_eq!(d.rebuilds(), 1, "an identical snapshot must not rebuild the dispatcher");
    assert!(close(&call_layer(&d, &config, 3), &want));
    assert_eq!(counts(), (1, 1), "an identical snapshot must keep every stream");

    // A worker joins: the others keep their streams.
    assert!(apply(&[&a.record, &b.record, &c.record]));
    assert_eq!(d.rebuilds(), 2);
    for _ in 0..4 {
        assert!(close(&call_layer(&d, &config, 3), &want));
    }
    assert_eq!(counts(), (1, 1), "a joining worker must not reopen the others' streams");

    // A worker leaves: the one that stays keeps its stream; the one left serves alone.
    let series = |addr: &str| metrics.render().contains(&format!("worker=\"{addr}\""));
    assert!(series(&a.record.address) && series(&b.record.address));
    assert!(apply(&[&c.record]));
    assert_eq!(d.rebuilds(), 3);
    // Defect: per-worker series stayed forever for workers that left.
    assert!(!series(&a.record.address) && !series(&b.record.address), "the series of departed workers remain");
    assert!(series(&c.record.address));
    let c_before = c.connections.load(Ordering::SeqCst);
    assert!(close(&call_layer(&d, &config, 3), &want));
    assert_eq!(c.connections.load(Ordering::SeqCst), c_before.max(1), "c keeps (or opens once) its stream");
    assert!(apply(&[&c.record, &a.record]));
    assert!(close(&call_layer(&d, &config, 3), &want));
    assert_eq!(c.connections.load(Ordering::SeqCst), c_before.max(1), "c keeps its stream when a returns");

    // A worker of another model is refused by the same policy, named in the status.
    let stranger = WorkerRecord { id: "x".into(), fingerprint: "another-model".into(), ..c.record.clone() };
    assert!(apply(&[&c.record, &stranger]));
    let status = d.status();
    assert_eq!(status.workers, 1);
    assert!(status.refused.iter().any(|r| r.contains("x (") && r.contains("different model")), "{status:?}");
}
