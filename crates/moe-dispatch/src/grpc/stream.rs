//! One worker's stream: opening it, cutting a batch into messages, one exchange with its
//! deadline, and the hedged call that also asks a replica when the worker is slow.

use super::connect::{client, unavailable};
use super::{message_spans, GrpcInner, OpenStream, Pending, PendingGuard, WorkerConn};
use crate::error::{DispatchError, Result};
use crate::latency::{give_up_after, hedge_delay};
use crate::transport::{BatchOutput, WorkerBatch};
use moe_proto::v1::{AdapterRef, ExpertRequest, WireDtype};
use moe_proto::wire;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

impl GrpcInner {
    pub(super) fn worker_name(&self, worker: usize) -> String {
        self.workers.get(worker).map(|w| w.addr.clone()).unwrap_or_else(|| format!("#{worker}"))
    }

    /// Every batch at once; each output and outcome in its slot.
    pub(super) async fn run_all(
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
