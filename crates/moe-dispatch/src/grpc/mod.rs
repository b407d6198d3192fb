//! The gRPC transport: one long-lived bidirectional `ComputeStream` per worker, requests matched
//! to responses by id, batches to different workers in flight at once, every wait bounded by a
//! deadline, and large batches split so no message nears the size limit. A broken or silent
//! stream is dropped and reopened on the next call. A batch whose experts a replica also holds
//! is sent there too when its worker is slow ([`Hedging`]: by default after a multiple of that
//! worker's usual time for such a batch), and the first good answer is used; the worker then
//! has an adaptive deadline ([`crate::latency`]), and one that misses it, even behind a hedge
//! that won, is reported ([`WorkerTransport::take_missed`]) so the dispatcher suspects it.

mod connect;
mod stream;

pub use connect::{address_problem, connect_worker, GrpcTransportConfig, TransportTls};
use connect::{client, endpoint, unavailable};

use crate::error::{DispatchError, Result};
use crate::latency::{CallTimes, Hedging};
use crate::transport::{BatchOutput, CallResult, InFlightCall, WorkerBatch, WorkerTransport};
use crate::worker_metrics::WorkerMetrics;
use moe_model::AdapterIdentity;
use moe_proto::v1::{AdapterRef, DescribeRequest, DescribeResponse, ExpertRequest, ExpertResponse};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Endpoint;

/// Messages are capped at the expert protocol's one limit; batches are split well below it.
pub const MAX_MESSAGE_BYTES: usize = moe_proto::EXPERT_MAX_MESSAGE_BYTES;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<ExpertResponse>>>>;

/// Forgets a call's request ids however the call ends (answered, timed out, or dropped because
/// a hedge won), so a silent worker's map does not grow.
struct PendingGuard {
    pending: Pending,
    ids: Vec<u64>,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pending.lock() {
            for id in &self.ids {
                p.remove(id);
            }
        }
    }
}

#[derive(Clone)]
struct OpenStream {
    tx: mpsc::Sender<ExpertRequest>,
    pending: Pending,
}

struct WorkerConn {
    addr: String,
    endpoint: Endpoint,
    stream: Mutex<Option<OpenStream>>,
    /// Recent successful call times, which its hedge delay and deadline follow.
    times: Mutex<CallTimes>,
    /// When a call that lost to a hedge then failed or missed its deadline: the dispatcher
    /// suspects the worker from then on when it next groups rows.
    missed: Mutex<Option<std::time::Instant>>,
    metrics: WorkerMetrics,
}

impl WorkerConn {
    fn new(addr: &str, endpoint: Endpoint, registry: &moe_metrics::Registry) -> Self {
        Self {
            addr: addr.to_string(),
            endpoint,
            stream: Mutex::new(None),
            times: Mutex::new(CallTimes::default()),
            missed: Mutex::new(None),
            metrics: WorkerMetrics::new(registry, addr),
        }
    }

    /// Drops the stream; the next call opens a new one.
    fn reset(&self) {
        if let Ok(mut g) = self.stream.lock() {
            *g = None;
        }
    }

    fn high(&self, rows: usize) -> Option<Duration> {
        self.times.lock().ok().and_then(|t| t.high(rows))
    }
}

/// Cheap to share: the connections live behind an `Arc`, so started calls run as tasks.
pub struct GrpcTransport {
    inner: Arc<GrpcInner>,
}

struct GrpcInner {
    runtime: tokio::runtime::Handle,
    /// Shared with the transports of later memberships while the worker stays.
    workers: Vec<Arc<WorkerConn>>,
    config: GrpcTransportConfig,
    next_id: AtomicU64,
    /// Each layer's balance series, made on its first call.
    balance: Mutex<Vec<moe_metrics::Histogram>>,
}
impl GrpcTransport {
    /// Connects to every worker and asks what it hosts. Must run inside the tokio runtime whose
    /// handle later drives the streams.
    pub async fn connect(addrs: &[String], config: GrpcTransportConfig) -> Result<(Self, Vec<DescribeResponse>)> {
        let mut workers = Vec::with_capacity(addrs.len());
        let mut described = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let ep = endpoint(addr, &config)?;
            let mut c = client(addr, &ep, &config).await?;
            let d = tokio::time::timeout(config.deadline, c.describe(DescribeRequest {}))
                .await
                .map_err(|_| unavailable(addr, "Describe timed out"))?
                .map_err(|s| unavailable(addr, format!("Describe failed: {}", s.message())))?
                .into_inner();
            described.push(d);
            workers.push(Arc::new(WorkerConn::new(addr, ep, &config.metrics)));
        }
        let runtime = tokio::runtime::Handle::current();
        let inner = GrpcInner { runtime, workers, config, next_id: AtomicU64::new(1), balance: Mutex::new(Vec::new()) };
        Ok((Self { inner: Arc::new(inner) }, described))
    }

    /// The workers' addresses, in worker order.
    pub fn addresses(&self) -> Vec<String> {
        self.inner.workers.iter().map(|w| w.addr.clone()).collect()
    }

    /// A transport to workers whose hosted experts are already known (from membership records):
    /// no call is made now; each worker's stream opens on first use. Call inside the runtime.
    pub fn lazy(addrs: &[String], config: GrpcTransportConfig) -> Result<Self> {
        Self::lazy_reusing(addrs, config, None)
    }

    /// [`Self::lazy`], keeping the connection (and open stream) of every worker that `previous`
    /// already has: a membership change touches only the workers that came or went.
    pub fn lazy_reusing(
        addrs: &[String],
        config: GrpcTransportConfig,
        previous: Option<&GrpcTransport>,
    ) -> Result<Self> {
        let kept = |a: &String| previous.and_then(|p| p.inner.workers.iter().find(|w| &w.addr == a)).cloned();
        let workers = addrs
            .iter()
            .map(|a| match kept(a) {
                Some(w) => Ok(w),
                None => Ok(Arc::new(WorkerConn::new(a, endpoint(a, &config)?, &config.metrics))),
            })
            .collect::<Result<Vec<_>>>()?;
        let inner = GrpcInner {
            runtime: tokio::runtime::Handle::current(),
            workers,
            config,
            next_id: AtomicU64::new(1),
            balance: Mutex::new(Vec::new()),
        };
        Ok(Self { inner: Arc::new(inner) })
    }
}

fn adapter_refs(adapters: &[AdapterIdentity]) -> Vec<AdapterRef> {
    adapters.iter().map(|a| AdapterRef { id: a.id.clone(), path: a.path.clone(), digest: a.digest.clone() }).collect()
}

impl WorkerTransport for GrpcTransport {
    fn worker_name(&self, worker: usize) -> String {
        self.inner.worker_name(worker)
    }

    fn overlaps(&self) -> bool {
        true
    }

    fn hedges(&self) -> bool {
        self.inner.config.hedging != Hedging::Off
    }

    fn record_balance(&self, layer: usize, pairs_per_worker: &[u32]) {
        let max = pairs_per_worker.iter().copied().max().unwrap_or(0);
        if max == 0 {
            return;
        }
        for (w, &p) in self.inner.workers.iter().zip(pairs_per_worker) {
            if p > 0 {
                w.metrics.pairs.observe(p as f64);
            }
        }
        let mean = pairs_per_worker.iter().map(|&p| p as f64).sum::<f64>() / pairs_per_worker.len() as f64;
        if let Ok(mut series) = self.inner.balance.lock() {
            while series.len() <= layer {
                let l = series.len();
                series.push(crate::worker_metrics::layer_balance(&self.inner.config.metrics, l));
            }
            series[layer].observe(mean / max as f64);
        }
    }

    fn take_missed(&self) -> Vec<(usize, std::time::Instant)> {
        let workers = self.inner.workers.iter().enumerate();
        workers.filter_map(|(i, w)| Some((i, w.missed.lock().ok()?.take()?))).collect()
    }

    /// A `Describe` on a fresh connection within the connect timeout (at most 2 s): cheap, and
    /// it answers only when the worker's server is really serving.
    fn probe(&self, worker: usize, done: Box<dyn FnOnce(bool) + Send>) {
        let Some(w) = self.inner.workers.get(worker).cloned() else {
            return done(false);
        };
        let config = self.inner.config.clone();
        let limit = config.connect_timeout.min(Duration::from_secs(2));
        self.inner.runtime.spawn(async move {
            let answered = tokio::time::timeout(limit, async {
                let mut c = client(&w.addr, &w.endpoint, &config).await.ok()?;
                c.describe(DescribeRequest {}).await.ok()
            })
            .await;
            let ok = matches!(answered, Ok(Some(_)));
            tracing::info!(worker = %w.addr, ok, "probed a suspect worker");
            done(ok);
        });
    }

    fn start(
        &self,
        layer: usize,
        hidden: usize,
        adapters: Vec<AdapterIdentity>,
        batches: Vec<WorkerBatch>,
    ) -> InFlightCall {
        let inner = self.inner.clone();
        let task = self.inner.runtime.spawn(async move {
            let refs = adapter_refs(&adapters);
            let mut outputs = vec![BatchOutput::default(); batches.len()];
            let results = inner.run_all(layer, hidden, &refs, &batches, &mut outputs).await;
            CallResult { batches, outputs, results }
        });
        let runtime = self.inner.runtime.clone();
        // Waited on from the router's compute thread, never from inside the runtime.
        InFlightCall::Waiting(Box::new(move || {
            runtime.block_on(task).map_err(|e| DispatchError::Placement(format!("dispatch task failed: {e}")))
        }))
    }

    fn execute(
        &self,
        layer: usize,
        hidden: usize,
        adapters: &[AdapterIdentity],
        batches: &[WorkerBatch],
        outputs: &mut [BatchOutput],
        results: &mut [Result<()>],
    ) {
        let adapters = adapter_refs(adapters);
        // Called from the router's compute thread, never from inside the runtime.
        let all = self.inner.runtime.block_on(self.inner.run_all(layer, hidden, &adapters, batches, outputs));
        for (slot, r) in results.iter_mut().zip(all) {
            *slot = r;
        }
    }
}

/// Splits a batch's rows into messages of at most `per_msg` rows and `per_msg` pairs (a row
/// with more pairs than that travels alone): `(first row, end row)` of each message.
fn message_spans(row_pairs: &[u32], per_msg: usize) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let (mut start, mut pairs) = (0usize, 0usize);
    for (r, &p) in row_pairs.iter().enumerate() {
        let p = p as usize;
        if r > start && (r - start == per_msg || pairs + p > per_msg) {
            spans.push((start, r));
            (start, pairs) = (r, 0);
        }
        pairs += p;
    }
    if start < row_pairs.len() {
        spans.push((start, row_pairs.len()));
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_hold_at_most_per_msg_rows_and_pairs() {
        assert_eq!(message_spans(&[1, 1, 1, 1, 1], 2), vec![(0, 2), (2, 4), (4, 5)]);
        assert_eq!(message_spans(&[2, 2, 1, 3], 3), vec![(0, 1), (1, 3), (3, 4)]);
        assert_eq!(message_spans(&[5, 1], 2), vec![(0, 1), (1, 2)]);
        assert!(message_spans(&[], 4).is_empty());
    }
}
