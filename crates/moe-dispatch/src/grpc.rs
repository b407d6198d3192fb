//! The gRPC transport: one long-lived bidirectional `ComputeStream` per worker, requests matched
//! to responses by id, batches to different workers in flight at once, every wait bounded by a
//! deadline, and large batches split so no message nears the size limit. A broken or silent
//! stream is dropped and reopened on the next call. A batch whose experts a replica also holds
//! is sent there too when its worker is slow ([`Hedging`]: by default after a multiple of that
//! worker's usual time for such a batch), and the first good answer is used; the worker then
//! has an adaptive deadline ([`crate::latency`]), and one that misses it, even behind a hedge
//! that won, is reported ([`WorkerTransport::take_missed`]) so the dispatcher suspects it.

use crate::error::{DispatchError, Result};
use crate::latency::{give_up_after, hedge_delay, CallTimes, Hedging};
use crate::transport::{BatchOutput, CallResult, InFlightCall, WorkerBatch, WorkerTransport};
use crate::worker_metrics::WorkerMetrics;
use moe_model::AdapterIdentity;
use moe_proto::v1::expert_worker_client::ExpertWorkerClient;
use moe_proto::v1::{AdapterRef, DescribeRequest, DescribeResponse, ExpertRequest, ExpertResponse, WireDtype};
use moe_proto::wire;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

/// Messages are capped at the expert protocol's one limit; batches are split well below it.
pub const MAX_MESSAGE_BYTES: usize = moe_proto::EXPERT_MAX_MESSAGE_BYTES;

#[derive(Clone, Debug)]
pub struct GrpcTransportConfig {
    pub wire: WireDtype,
    /// How long one layer's dispatch to a worker may take before the worker counts as dead: the
    /// deadline when no replica could take the batch, and the cap of the adaptive one.
    pub deadline: Duration,
    pub connect_timeout: Duration,
    /// Row bytes per message; larger batches are split into several messages.
    pub max_rows_bytes: usize,
    /// Where each worker's dispatch latency and failures are recorded.
    pub metrics: moe_metrics::Registry,
    /// TLS to the workers (`https`), with this process's client identity for mutual TLS.
    pub tls: Option<TransportTls>,
    /// When a batch is sent to a replica as well.
    pub hedging: Hedging,
}

/// PEM material for TLS from a router to its workers.
#[derive(Clone, Debug)]
pub struct TransportTls {
    /// The CA that signed the workers' certificates.
    pub ca_pem: Vec<u8>,
    /// This router's certificate and key, for workers that require client certificates.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the workers' certificates carry, when it is not the address's host.
    pub domain: Option<String>,
}

impl Default for GrpcTransportConfig {
    fn default() -> Self {
        Self {
            wire: WireDtype::Bf16,
            deadline: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            max_rows_bytes: 8 << 20,
            metrics: moe_metrics::Registry::new(),
            tls: None,
            hedging: Hedging::Adaptive,
        }
    }
}

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

fn unavailable(addr: &str, message: impl std::fmt::Display) -> DispatchError {
    DispatchError::Unavailable { worker: addr.to_string(), message: message.to_string() }
}

/// Why `addr` cannot be a worker's address (`host:port`, IPv6 in brackets), if it cannot.
pub fn address_problem(addr: &str) -> Option<String> {
    let bare = addr.split_once("://").map(|(_, rest)| rest).unwrap_or(addr);
    let hint = |why: &str| {
        let v6 =
            bare.rsplit_once(':').filter(|(h, p)| h.parse::<std::net::Ipv6Addr>().is_ok() && p.parse::<u16>().is_ok());
        match v6 {
            Some((h, p)) => format!("{why}; an IPv6 address needs brackets: [{h}]:{p}"),
            None => why.to_string(),
        }
    };
    match format!("http://{bare}").parse::<tonic::codegen::http::Uri>() {
        Err(e) => Some(hint(&format!("address {addr:?} does not parse: {e}"))),
        Ok(uri) if uri.port_u16().is_none() => Some(hint(&format!("address {addr:?} has no port"))),
        Ok(uri) if uri.path() != "/" && !uri.path().is_empty() => Some(format!("address {addr:?} has a path")),
        Ok(_) => None,
    }
}

fn endpoint(addr: &str, config: &GrpcTransportConfig) -> Result<Endpoint> {
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    let bare = addr.split_once("://").map(|(_, rest)| rest).unwrap_or(addr);
    let mut ep = Endpoint::from_shared(format!("{scheme}://{bare}"))
        .map_err(|e| unavailable(addr, format!("invalid address: {e}")))?;
    if let Some(tls) = &config.tls {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
        if let Some((cert, key)) = &tls.identity {
            cfg = cfg.identity(Identity::from_pem(cert, key));
        }
        if let Some(d) = &tls.domain {
            cfg = cfg.domain_name(d.clone());
        }
        ep = ep.tls_config(cfg).map_err(|e| unavailable(addr, format!("TLS configuration: {e}")))?;
    }
    Ok(ep
        .tcp_nodelay(true)
        .connect_timeout(config.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}

async fn client(addr: &str, ep: &Endpoint, config: &GrpcTransportConfig) -> Result<ExpertWorkerClient<Channel>> {
    let channel = tokio::time::timeout(config.connect_timeout, ep.connect())
        .await
        .map_err(|_| unavailable(addr, "connect timed out"))?
        .map_err(|e| unavailable(addr, format!("connect failed: {e}")))?;
    Ok(ExpertWorkerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
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

impl GrpcInner {
    fn worker_name(&self, worker: usize) -> String {
        self.workers.get(worker).map(|w| w.addr.clone()).unwrap_or_else(|| format!("#{worker}"))
    }

    /// Every batch at once; each output and outcome in its slot.
    async fn run_all(
        self: &Arc<Self>,
        layer: usize,
        hidden: usize,
        adapters: &[AdapterRef],
        batches: &[WorkerBatch],
        outputs: &mut [BatchOutput],
    ) -> Vec<Result<()>> {
        let calls =
            batches.iter().zip(outputs.iter_mut()).map(|(b, out)| self.call_hedged(layer, hidden, adapters, b, out));
        futures::future::join_all(calls).await
    }

    async fn open(&self, w: &WorkerConn) -> Result<OpenStream> {
        if let Some(s) = w.stream.lock().ok().and_then(|g| g.clone()) {
            if !s.tx.is_closed() {
                return Ok(s);
            }
        }
        let mut c = client(&w.addr, &w.endpoint, &self.config).await?;
        let (tx, rx) = mpsc::channel::<ExpertRequest>(64);
        let resp = tokio::time::timeout(self.config.connect_timeout, c.compute_stream(ReceiverStream::new(rx)))
            .await
            .map_err(|_| unavailable(&w.addr, "opening the stream timed out"))?
            .map_err(|s| unavailable(&w.addr, format!("opening the stream failed: {}", s.message())))?;
        let mut inbound = resp.into_inner();
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let reader_pending = pending.clone();
        let addr = w.addr.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(msg)) => {
                        let waiter = reader_pending.lock().ok().and_then(|mut p| p.remove(&msg.id));
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(msg);
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::warn!(worker = %addr, %status, "expert stream failed");
                        break;
                    }
                }
            }
            // Dropping the waiters wakes every pending call with an error.
            if let Ok(mut p) = reader_pending.lock() {
                p.clear();
            }
        });
        let s = OpenStream { tx, pending };
        if let Ok(mut g) = w.stream.lock() {
            *g = Some(s.clone());
        }
        Ok(s)
    }

    /// A worker batch as messages (split so no message nears the size limit): each carries at
    /// most `per_msg` rows and `per_msg` (row, expert) pairs (one answer row each), so neither
    /// direction outgrows the limit. Encoded once; a hedge sends the same messages.
    fn messages(&self, layer: usize, hidden: usize, adapters: &[AdapterRef], b: &WorkerBatch) -> Vec<ExpertRequest> {
        let row_bytes = hidden * wire::bytes_per_value(self.config.wire);
        let per_msg = (self.config.max_rows_bytes / row_bytes.max(1)).max(1);
        let mut pair_start = 0usize;
        message_spans(&b.row_pairs, per_msg)
            .into_iter()
            .map(|(first_row, end_row)| {
                let pairs = &b.row_pairs[first_row..end_row];
                let n_pairs: usize = pairs.iter().map(|&p| p as usize).sum();
                let rows = &b.rows[first_row * hidden..end_row * hidden];
                let req = ExpertRequest {
                    id: self.next_id.fetch_add(1, Ordering::Relaxed),
                    layer: layer as u32,
                    dtype: self.config.wire as i32,
                    hidden_size: hidden as u32,
                    rows: wire::encode(rows, self.config.wire).into(),
                    row_pairs: pairs.to_vec(),
                    experts: b.experts[pair_start..pair_start + n_pairs].to_vec(),
                    weights: b.weights[pair_start..pair_start + n_pairs].to_vec(),
                    adapters: if b.row_adapters.is_empty() { Vec::new() } else { adapters.to_vec() },
                    row_adapters: b.row_adapters.get(first_row..end_row).map(<[u32]>::to_vec).unwrap_or_default(),
                    request_ids: b.request_ids.clone(),
                };
                pair_start += n_pairs;
                req
            })
            .collect()
    }

    /// Sends one worker's messages and collects its per-pair rows, all within `give_up`. Owns
    /// everything it needs, so a call that lost to a hedge can run on as a task.
    async fn call(
        self: Arc<Self>,
        worker: usize,
        layer: usize,
        hidden: usize,
        messages: Vec<ExpertRequest>,
        rows: usize,
        give_up: Duration,
    ) -> (Result<()>, BatchOutput) {
        let name = self.worker_name(worker);
        let span = tracing::debug_span!("dispatch", worker = %name, layer, rows);
        let started = std::time::Instant::now();
        let mut out = BatchOutput::default();
        let r = async {
            let w = self.workers.get(worker).ok_or_else(|| unavailable(&name, "no such worker"))?;
            self.exchange(w, hidden, messages, give_up, &mut out).await
        }
        .instrument(span)
        .await;
        let took = started.elapsed();
        if let Some(w) = self.workers.get(worker) {
            if r.is_ok() {
                if let Ok(mut t) = w.times.lock() {
                    t.record(rows, took);
                }
            }
            let latency = if r.is_ok() { &w.metrics.ok } else { &w.metrics.error };
            latency.observe(took.as_secs_f64());
        }
        (r, out)
    }

    async fn exchange(
        &self,
        w: &WorkerConn,
        hidden: usize,
        messages: Vec<ExpertRequest>,
        give_up: Duration,
        out: &mut BatchOutput,
    ) -> Result<()> {
        // One deadline bounds everything below: a frozen worker stops reading, and then even
        // sending would wait forever.
        let deadline = tokio::time::Instant::now() + give_up;
        let timed_out = || DispatchError::Deadline { worker: w.addr.clone(), millis: give_up.as_millis() as u64 };
        let stream = match tokio::time::timeout_at(deadline, self.open(w)).await {
            Ok(s) => s.inspect_err(|_| w.reset())?,
            Err(_) => {
                w.reset();
                return Err(timed_out());
            }
        };
        let mut waiters = Vec::new();
        let mut guard = PendingGuard { pending: stream.pending.clone(), ids: Vec::new() };
        for req in messages {
            let (tx, rx) = oneshot::channel();
            if let Ok(mut p) = stream.pending.lock() {
                p.insert(req.id, tx);
            }
            waiters.push(rx);
            guard.ids.push(req.id);
            match tokio::time::timeout_at(deadline, stream.tx.send(req)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    w.reset();
                    return Err(unavailable(&w.addr, "stream closed"));
                }
                Err(_) => {
                    w.reset();
                    return Err(timed_out());
                }
            }
        }
        out.rows.clear();
        out.failed_adapters.clear();
        let mut decoded = Vec::new();
        for rx in waiters {
            let resp = match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => {
                    w.reset();
                    return Err(unavailable(&w.addr, "stream closed before the answer"));
                }
                Err(_) => {
                    // A silent worker may hold the stream forever; start afresh next time.
                    w.reset();
                    return Err(timed_out());
                }
            };
            if let Some(e) = resp.error {
                return Err(DispatchError::Rejected { worker: w.addr.clone(), message: e.message });
            }
            let malformed = |message: String| DispatchError::Malformed { worker: w.addr.clone(), message };
            let dtype = WireDtype::try_from(resp.dtype)
                .map_err(|_| malformed(format!("unknown wire dtype {} in the answer", resp.dtype)))?;
            wire::decode_rows(&resp.rows, dtype, hidden, &mut decoded).map_err(|e| malformed(e.to_string()))?;
            out.rows.extend_from_slice(&decoded);
            for f in resp.failed_adapters {
                if !out.failed_adapters.iter().any(|(s, _)| *s == f.slot) {
                    out.failed_adapters.push((f.slot, f.message));
                }
            }
        }
        Ok(())
    }

    /// Calls `b.worker`; when the batch has a replica and the worker has not answered within its
    /// hedge delay, calls the replica too and keeps the first success (or the last failure). A
    /// primary that loses runs on as a task until its own deadline, and if it then fails, the
    /// worker is reported as having missed it.
    async fn call_hedged(
        self: &Arc<Self>,
        layer: usize,
        hidden: usize,
        adapters: &[AdapterRef],
        b: &WorkerBatch,
        out: &mut BatchOutput,
    ) -> Result<()> {
        let rows = b.row_ids.len();
        let conn = self.workers.get(b.worker).cloned();
        let high = conn.as_ref().and_then(|w| w.high(rows));
        let cap = self.config.deadline;
        let give_up = give_up_after(high, b.hedge.is_some(), cap);
        let messages = self.messages(layer, hidden, adapters, b);
        let hedge = b.hedge.zip(hedge_delay(self.config.hedging, high, cap).filter(|d| *d < give_up));
        let Some((replica, delay)) = hedge else {
            let (r, o) = self.clone().call(b.worker, layer, hidden, messages, rows, give_up).await;
            *out = o;
            return r;
        };
        let replica_messages = messages.clone();
        let joined = |j: std::result::Result<(Result<()>, BatchOutput), tokio::task::JoinError>| {
            j.unwrap_or_else(|e| {
                (Err(DispatchError::Placement(format!("dispatch task failed: {e}"))), BatchOutput::default())
            })
        };
        let mut primary = tokio::spawn(self.clone().call(b.worker, layer, hidden, messages, rows, give_up));
        if let Ok(done) = tokio::time::timeout(delay, &mut primary).await {
            let (r, o) = joined(done);
            *out = o;
            return r;
        }
        let slow = self.worker_name(b.worker);
        tracing::debug!(layer, worker = %slow, replica = %self.worker_name(replica), "hedging a slow dispatch");
        let second = self.clone().call(replica, layer, hidden, replica_messages, rows, cap);
        tokio::pin!(second);
        let ((r, o), winner) = tokio::select! {
            p = &mut primary => {
                let p = joined(p);
                if p.0.is_ok() { (p, "primary") } else { ((&mut second).await, "replica") }
            }
            s = &mut second => {
                if s.0.is_ok() {
                    // The primary runs on; if it then fails, it missed its deadline.
                    if let Some(w) = conn.clone() {
                        tokio::spawn(async move {
                            if !matches!(primary.await, Ok((Ok(()), _))) {
                                if let Ok(mut m) = w.missed.lock() {
                                    *m = Some(std::time::Instant::now());
                                }
                                w.metrics.missed_deadlines.inc();
                            }
                        });
                    }
                    (s, "replica")
                } else {
                    (joined(primary.await), "primary")
                }
            }
        };
        if let Some(w) = &conn {
            let won =
                if winner == "primary" { &w.metrics.hedge_won_by_primary } else { &w.metrics.hedge_won_by_replica };
            won.inc();
        }
        *out = o;
        r
    }
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
