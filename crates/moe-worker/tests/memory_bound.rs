//! The batch budget bounds a worker's working memory in total, not only per request. Defect:
//! unary `Compute` calls were unlimited in number, so concurrent callers could together exhaust
//! the worker though each fit the budget. Now a unary call that finds the budget held by calls in
//! flight is refused with RESOURCE_EXHAUSTED at once, and is served once they finish.

use moe_compute::cpu::CpuBackend;
use moe_proto::v1::expert_worker_client::ExpertWorkerClient;
use moe_proto::v1::{ExpertRequest, WireDtype};
use moe_worker::{AdapterFailure, ComputeInput, ExpertCompute, ExpertHost, ExpertSpec, HostedList, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A host whose computes wait until `open` is set.
struct Gated {
    inner: ExpertHost<CpuBackend>,
    open: AtomicBool,
}

impl ExpertCompute for Gated {
    fn config(&self) -> &moe_model::ModelConfig {
        self.inner.config()
    }
    fn fingerprint(&self) -> &str {
        ExpertCompute::fingerprint(&self.inner)
    }
    fn device(&self) -> moe_compute::Device {
        ExpertCompute::device(&self.inner)
    }
    fn hosted(&self) -> Vec<(usize, Vec<u32>)> {
        self.inner.hosted()
    }
    fn draining(&self) -> HostedList {
        ExpertCompute::draining(&self.inner)
    }
    fn watch_hosted(&self) -> tokio::sync::watch::Receiver<HostedList> {
        ExpertCompute::watch_hosted(&self.inner)
    }
    fn expert_memory(&self) -> (usize, Option<usize>) {
        ExpertCompute::expert_memory(&self.inner)
    }
    fn load_experts(&self, experts: &[(usize, u32)]) -> Result<usize> {
        ExpertCompute::load_experts(&self.inner, experts)
    }
    fn unload_experts(&self, experts: &[(usize, u32)]) -> Result<(usize, Duration)> {
        ExpertCompute::unload_experts(&self.inner, experts)
    }
    fn check_budget(&self, rows: usize, pairs: usize) -> Result<()> {
        self.inner.check_budget(rows, pairs)
    }
    fn batch_memory(&self, rows: usize, pairs: usize) -> (usize, Option<usize>) {
        self.inner.batch_memory(rows, pairs)
    }
    fn compute(&self, input: &ComputeInput<'_>, out: &mut Vec<f32>) -> Result<Vec<AdapterFailure>> {
        while !self.open.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.inner.compute(input, out)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unary_calls_share_one_budget() {
    let tmp = tempfile::tempdir().expect("tmp");
    let spec =
        moe_demo::DemoSpec { num_layers: 1, hidden_size: 64, intermediate_size: 96, ..moe_demo::DemoSpec::demo() };
    moe_demo::write_demo_model(tmp.path(), &spec).expect("demo model");
    let inner = ExpertHost::load(tmp.path(), &ExpertSpec::All, CpuBackend::new()).expect("host");
    // 40 rows need a little under half the budget: two fit at once, a third does not.
    let (need, _) = inner.batch_memory(40, 40);
    let inner = inner.with_batch_budget(Some(need * 5 / 2));
    let host = Arc::new(Gated { inner, open: AtomicBool::new(false) });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(moe_worker::serve_worker(host.clone(), "w".into(), listener, async {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let request = || {
        let rows: Vec<f32> = (0..40 * 64).map(|i| ((i % 13) as f32 - 6.0) / 10.0).collect();
        ExpertRequest {
            id: 1,
            layer: 0,
            dtype: WireDtype::F32 as i32,
            hidden_size: 64,
            rows: moe_proto::wire::encode(&rows, WireDtype::F32).into(),
            row_pairs: vec![1; 40],
            experts: vec![0; 40],
            weights: vec![1.0; 40],
            ..Default::default()
        }
    };
    let call = || async move {
        let mut c = ExpertWorkerClient::connect(format!("http://{addr}")).await.expect("connect");
        c.compute(request()).await
    };
    // Two calls hold most of the budget while their computes wait.
    let (a, b) = (tokio::spawn(call()), tokio::spawn(call()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = call().await.expect_err("over the budget in total");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("--max-batch-mb"), "{}", refused.message());
    host.open.store(true, Ordering::SeqCst);
    a.await.expect("task").expect("first call");
    b.await.expect("task").expect("second call");
    call().await.expect("served once the others finished");
    let _ = stop.send(());
}
