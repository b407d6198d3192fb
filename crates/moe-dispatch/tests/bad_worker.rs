//! Bad workers fail only what they must. A worker that answers over gRPC with an unknown wire
//! dtype is a failed worker, not a source of numbers (the answer is not decoded as the dtype the
//! router asked for): its rows fail over to a replica, the call succeeds with the replica's
//! answer, and the bad worker is left out as a suspect. A worker that refuses a call is left out
//! of that call: a replica computes its rows, or, with none, only those rows fail.

mod common;

use common::run_layer;
use moe_compute::cpu::CpuBackend;
use moe_dispatch::{Dispatcher, GrpcTransport, GrpcTransportConfig, InProcessTransport, Placement};
use moe_model::ModelConfig;
use moe_proto::v1::expert_worker_server::{ExpertWorker, ExpertWorkerServer};
use moe_proto::v1::{DescribeRequest, DescribeResponse, ExpertRequest, ExpertResponse};
use moe_worker::{ExpertCompute, ExpertHost, ExpertSpec};
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// Answers every request with `dtype` 99 and rows of the right size for f32 (all zeros), so that
/// only the dtype check can tell this answer is not to be used.
struct LyingWorker;

type Answers = Pin<Box<dyn Stream<Item = Result<ExpertResponse, Status>> + Send>>;

fn lie(req: &ExpertRequest) -> ExpertResponse {
    let bytes = 4 * req.experts.len() * req.hidden_size as usize; // one row per pair
    ExpertResponse { id: req.id, dtype: 99, rows: vec![0u8; bytes].into(), error: None, failed_adapters: Vec::new() }
}

#[tonic::async_trait]
impl ExpertWorker for LyingWorker {
    async fn compute(&self, request: Request<ExpertRequest>) -> Result<Response<ExpertResponse>, Status> {
        Ok(Response::new(lie(request.get_ref())))
    }

    type ComputeStreamStream = Answers;

    async fn compute_stream(
        &self,
        request: Request<Streaming<ExpertRequest>>,
    ) -> Result<Response<Self::ComputeStreamStream>, Status> {
        let answers = request.into_inner().map(|m| m.map(|r| lie(&r)));
        Ok(Response::new(Box::pin(answers)))
    }

    async fn describe(&self, _request: Request<DescribeRequest>) -> Result<Response<DescribeResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }

    async fn load_experts(
        &self,
        _request: Request<moe_proto::v1::ChangeExpertsRequest>,
    ) -> Result<Response<moe_proto::v1::ChangeExpertsResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }

    async fn unload_experts(
        &self,
        _request: Request<moe_proto::v1::ChangeExpertsRequest>,
    ) -> Result<Response<moe_proto::v1::ChangeExpertsResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }
}

#[test]
fn an_unknown_wire_dtype_fails_over_to_a_replica() {
    let tmp = tempfile::tempdir().expect("tmp");
    let spec =
        moe_demo::DemoSpec { num_layers: 1, hidden_size: 64, intermediate_size: 96, ..moe_demo::DemoSpec::demo() };
    moe_demo::write_demo_model(tmp.path(), &spec).expect("demo model");
    let config = ModelConfig::from_dir(tmp.path()).expect("config");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let host = ExpertHost::load(tmp.path(), &ExpertSpec::All, CpuBackend::new()).expect("host");
    let (h, e) = (config.hidden_size, config.num_experts);
    let rows = 3;
    let x: Vec<f32> = (0..rows * h).map(|i| ((i % 5) as f32 - 2.0) * 0.1).collect();
    let want = {
        let row_pairs = vec![1u32; rows];
        let experts = vec![0u32; rows];
        let input = moe_worker::ComputeInput::base(0, h, &x, &row_pairs, &experts, &[1.0; 3]);
        let mut out = Vec::new();
        host.compute(&input, &mut out).expect("local");
        out
    };
    let addrs: Vec<String> = rt.block_on(async {
        let liar = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let liar_addr = liar.local_addr().expect("addr").to_string();
        let incoming = tonic::transport::server::TcpIncoming::from(liar);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ExpertWorkerServer::new(LyingWorker))
                .serve_with_incoming(incoming),
        );
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let good_addr = good.local_addr().expect("addr").to_string();
        let host: Arc<dyn ExpertCompute> = Arc::new(host);
        tokio::spawn(moe_worker::serve_worker(host, "good".into(), good, std::future::pending::<()>()));
        vec![liar_addr, good_addr]
    });
    let mut placement = Placement::new(config.num_layers, e);
    let all: Vec<u32> = (0..e as u32).collect();
    placement.add(0, 0, &all).expect("liar holds every expert");
    placement.add(1, 0, &all).expect("good holds every expert");
    let transport = {
        let _guard = rt.enter();
        let cfg = GrpcTransportConfig { wire: moe_proto::v1::WireDtype::F32, ..Default::default() };
        GrpcTransport::lazy(&addrs, cfg).expect("transport")
    };
    let d = Dispatcher::new(transport, placement, 2);
    for _ in 0..3 {
        let (out, unserved) = run_layer(&d, &x, h, e, 1, &vec![(0u32, 1.0f32); rows]);
        assert!(unserved.is_empty(), "{unserved:?}");
        let close = out.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-4 * (1.0 + b.abs()));
        assert!(close, "only the good worker's rows are used");
    }
    assert_eq!(d.suspects(), vec![0], "the worker with the unknown dtype is left out");
}

/// One layer call of `rows` rows, each routed to `experts` (top-k = their count, equal weights).
fn call_rows(
    d: &Dispatcher<InProcessTransport>,
    x: &[f32],
    rows: usize,
    h: usize,
    experts: &[u32],
    e: usize,
) -> (Vec<f32>, Vec<(u32, String)>) {
    let k = experts.len();
    let choices: Vec<(u32, f32)> = (0..rows).flat_map(|_| experts.iter().map(|&x| (x, 1.0 / k as f32))).collect();
    run_layer(d, x, h, e, k, &choices)
}

/// A worker that refuses a call (here: over its `--max-batch-mb`) is not a failure of the batch:
/// with a replica the rows are computed there, bit for bit the same; without one only the rows
/// that needed that worker fail, naming the refusal, and the others are computed.
#[test]
fn a_refusing_worker_fails_over_to_a_replica_or_fails_only_its_rows() {
    let tmp = tempfile::tempdir().expect("tmp");
    let spec =
        moe_demo::DemoSpec { num_layers: 1, hidden_size: 64, intermediate_size: 96, ..moe_demo::DemoSpec::demo() };
    moe_demo::write_demo_model(tmp.path(), &spec).expect("demo model");
    let config = ModelConfig::from_dir(tmp.path()).expect("config");
    let (h, e, rows) = (config.hidden_size, config.num_experts, 4);
    let x: Vec<f32> = (0..rows * h).map(|i| ((i % 9) as f32 - 4.0) * 0.1).collect();
    let host = |budget: Option<usize>| -> Arc<dyn ExpertCompute> {
        let host = ExpertHost::load(tmp.path(), &ExpertSpec::All, CpuBackend::new()).expect("host");
        Arc::new(host.with_batch_budget(budget))
    };
    // The reference: one worker that accepts everything.
    let all: Vec<u32> = (0..e as u32).collect();
    let mut one = Placement::new(config.num_layers, e);
    one.add(0, 0, &all).expect("placement");
    let reference = Dispatcher::new(InProcessTransport::new(vec![host(None)]), one, 1);
    let (want, none) = call_rows(&reference, &x, rows, h, &[0, 3], e);
    assert!(none.is_empty());

    // Worker 0 refuses every call; worker 1 holds every expert too.
    let mut both = Placement::new(config.num_layers, e);
    both.add(0, 0, &all).expect("placement");
    both.add(1, 0, &all).expect("placement");
    let d = Dispatcher::new(InProcessTransport::new(vec![host(Some(1)), host(None)]), both, 2);
    for _ in 0..4 {
        let (got, unserved) = call_rows(&d, &x, rows, h, &[0, 3], e);
        assert!(unserved.is_empty(), "{unserved:?}");
        assert_eq!(got, want, "the replica's answer is the same bits");
    }
    assert!(d.suspects().is_empty(), "a refusal is not a failure of the worker");

    // Without a replica for expert 0: rows routed to it fail, naming the refusal; others are served.
    let mut split = Placement::new(config.num_layers, e);
    split.add(0, 0, &[0]).expect("placement");
    split.add(1, 0, &all[1..]).expect("placement");
    let d = Dispatcher::new(InProcessTransport::new(vec![host(Some(1)), host(None)]), split, 2);
    let (_, unserved) = call_rows(&d, &x, rows, h, &[0, 3], e);
    assert_eq!(unserved.len(), rows, "{unserved:?}");
    assert!(unserved.iter().all(|(_, why)| why.contains("max-batch-mb")), "{unserved:?}");
    let (got, unserved) = call_rows(&d, &x, rows, h, &[3, 5], e);
    assert!(unserved.is_empty(), "rows that do not need the refusing worker are served: {unserved:?}");
    assert_eq!(got, call_rows(&reference, &x, rows, h, &[3, 5], e).0);
}
