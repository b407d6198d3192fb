//! Turning one MoE layer's routing into one batch per worker, summing what comes back, and
//! failing over: when a worker does not answer (connection refused or reset, deadline), it is
//! marked suspect for a while and the (row, expert) pairs it owed are sent, in the same step, to
//! another holder of the same experts. Expert calls are pure functions of their inputs, so the
//! retry gives the same result. Only when some expert has no holder left does the layer fail.

use crate::error::{DispatchError, Result};
use crate::placement::Placement;
use moe_compute::cpu::{CpuBackend, HostTensor};
use moe_model::{AdapterIdentity, ExpertExecutor, ExpertRoutes, ExpertTicket, ModelError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The rows of one layer and step that go to one worker.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerBatch {
    pub worker: usize,
    /// Which rows of the layer input these are, in order.
    pub row_ids: Vec<u32>,
    /// `row_ids.len() x hidden` values.
    pub rows: Vec<f32>,
    pub row_pairs: Vec<u32>,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
    /// Per row, the adapter slot (0: none) into the layer's adapter list; empty when no row
    /// carries an adapter with expert pairs.
    pub row_adapters: Vec<u32>,
    /// The distinct request ids of these rows (for the worker's logs).
    pub request_ids: Vec<u64>,
    /// Another live worker that holds every expert of this batch: where a transport may send
    /// the same batch when this one is slow (hedging).
    pub hedge: Option<usize>,
}

/// What came back for one worker batch: one combined row per batch row, and the adapters (slot
/// into the layer's adapter list, reason) the worker could not load. Rows carrying those were
/// not computed and must fail, never be used.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchOutput {
    pub rows: Vec<f32>,
    pub failed_adapters: Vec<(u32, String)>,
}

/// Runs worker batches somewhere: in this process, over gRPC, or any faster data plane.
pub trait WorkerTransport: Send + Sync {
    /// A name for worker `i` in errors and logs (its address).
    fn worker_name(&self, worker: usize) -> String;
    /// Runs every batch (at most one per worker, in parallel where possible), writing each
    /// batch's combined rows into the matching `outputs` entry and its outcome into `results`.
    /// `adapters` are the adapters the batches' `row_adapters` index.
    #[allow(clippy::too_many_arguments)]
    fn execute(
        &self,
        layer: usize,
        hidden: usize,
        adapters: &[AdapterIdentity],
        batches: &[WorkerBatch],
        outputs: &mut [BatchOutput],
        results: &mut [Result<()>],
    );

    /// Whether [`Self::start`] returns before the batches have run.
    fn overlaps(&self) -> bool {
        false
    }

    /// Whether this transport sends slow batches to [`WorkerBatch::hedge`] too (only then is
    /// the replica looked up).
    fn hedges(&self) -> bool {
        false
    }

    /// Starts the batches without waiting for them; the default runs them now.
    fn start(
        &self,
        layer: usize,
        hidden: usize,
        adapters: Vec<AdapterIdentity>,
        batches: Vec<WorkerBatch>,
    ) -> InFlightCall {
        let mut outputs = vec![BatchOutput::default(); batches.len()];
        let mut results: Vec<Result<()>> = vec![Ok(()); batches.len()];
        self.execute(layer, hidden, &adapters, &batches, &mut outputs, &mut results);
        InFlightCall::Done(CallResult { batches, outputs, results })
    }
}

/// What a started call gives back: its batches, and each one's output and outcome.
pub struct CallResult {
    pub batches: Vec<WorkerBatch>,
    pub outputs: Vec<BatchOutput>,
    pub results: Vec<Result<()>>,
}

/// A call started with [`WorkerTransport::start`].
pub enum InFlightCall {
    Done(CallResult),
    Waiting(Box<dyn FnOnce() -> std::result::Result<CallResult, DispatchError> + Send>),
}

impl InFlightCall {
    pub fn wait(self) -> std::result::Result<CallResult, DispatchError> {
        match self {
            InFlightCall::Done(r) => Ok(r),
            InFlightCall::Waiting(f) => f(),
        }
    }
}

/// A started layer: the call, and the rows no holder could take (reported at the finish).
struct Started {
    call: InFlightCall,
    unserved: Vec<(u32, String)>,
}

/// How long a worker that failed a call is left out before it is tried again.
pub const SUSPECT_FOR: Duration = Duration::from_secs(5);

struct Scratch {
    batches: Vec<WorkerBatch>,
    outputs: Vec<BatchOutput>,
    results: Vec<Result<()>>,
    slot_of: Vec<Option<usize>>,
    /// (row, expert, weight) still to be computed this layer, grouped by row.
    pending: Vec<(u32, u32, f32)>,
    retry: Vec<(u32, u32, f32)>,
    suspect: Vec<bool>,
    row_workers: Vec<usize>,
}

/// An [`ExpertExecutor`] that sends rows to workers through a transport.
pub struct Dispatcher<T: WorkerTransport> {
    transport: T,
    placement: Placement,
    num_workers: usize,
    next: AtomicUsize,
    suspect_until: Mutex<Vec<Option<Instant>>>,
    scratch: Mutex<Scratch>,
}

impl<T: WorkerTransport> Dispatcher<T> {
    pub fn new(transport: T, placement: Placement, num_workers: usize) -> Self {
        Self {
            transport,
            placement,
            num_workers,
            next: AtomicUsize::new(0),
            suspect_until: Mutex::new(vec![None; num_workers]),
            scratch: Mutex::new(Scratch {
                batches: Vec::new(),
                outputs: Vec::new(),
                results: Vec::new(),
                slot_of: Vec::new(),
                pending: Vec::new(),
                retry: Vec::new(),
                suspect: Vec::new(),
                row_workers: Vec::new(),
            }),
        }
    }

    pub fn transport(&self) -> &T {
        &self.transport
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Workers currently left out after a failure.
    pub fn suspects(&self) -> Vec<usize> {
        let now = Instant::now();
        let s = self.suspect_until.lock().map(|v| v.clone()).unwrap_or_default();
        s.iter().enumerate().filter(|(_, t)| t.is_some_and(|t| t > now)).map(|(i, _)| i).collect()
    }

    fn mark_suspect(&self, worker: usize) {
        if let Ok(mut v) = self.suspect_until.lock() {
            if let Some(slot) = v.get_mut(worker) {
                *slot = Some(Instant::now() + SUSPECT_FOR);
            }
        }
    }

    /// A live worker other than `b.worker` holding every expert of `b`, chosen in turn.
    fn hedge_for(&self, layer: usize, b: &WorkerBatch, suspect: &[bool], turn: usize) -> Option<usize> {
        let first = *b.experts.first()?;
        let holders = self.placement.holders(layer, first);
        let ok = |w: usize| {
            w != b.worker
                && !suspect.get(w).copied().unwrap_or(false)
                && b.experts.iter().all(|&e| self.placement.holders(layer, e).contains(&w))
        };
        let n = holders.len();
        (0..n).map(|i| holders[(turn + i) % n]).find(|&w| ok(w))
    }

    /// Groups pending (row, expert, weight) entries by worker, skipping suspect workers. A row's
    /// experts go, where possible, to a worker already chosen for that row, so each row travels
    /// to each worker at most once; replicas are used in turn.
    fn group(
        &self,
        layer: usize,
        x: &HostTensor,
        row_adapter: &[u32],
        row_request: &[u64],
        s: &mut Scratch,
        unserved: &mut Vec<(u32, String)>,
    ) -> Result<usize> {
        let now = Instant::now();
        s.suspect.clear();
        match self.suspect_until.lock() {
            Ok(v) => s.suspect.extend(v.iter().map(|t| t.is_some_and(|t| t > now))),
            Err(_) => s.suspect.resize(self.num_workers, false),
        }
        let suspect = &s.suspect;
        s.slot_of.clear();
        s.slot_of.resize(self.num_workers, None);
        for b in s.batches.iter_mut() {
            b.row_ids.clear();
            b.rows.clear();
            b.row_pairs.clear();
            b.experts.clear();
            b.weights.clear();
            b.row_adapters.clear();
            b.request_ids.clear();
        }
        let mut used = 0usize;
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let row_workers = &mut s.row_workers;
        row_workers.clear();
        let mut current_row = u32::MAX;
        for &(r, e, wt) in &s.pending {
            if r != current_row {
                current_row = r;
                row_workers.clear();
            }
            let holders = self.placement.holders(layer, e);
            let live = || holders.iter().copied().filter(|&h| !suspect.get(h).copied().unwrap_or(false));
            let w = match row_workers.iter().copied().find(|w| live().any(|h| h == *w)) {
                Some(w) => w,
                None => {
                    let n = live().count();
                    if n == 0 {
                        // Only this row fails; the others of the batch go on.
                        if unserved.last().map(|u| u.0) != Some(r) {
                            unserved.push((r, DispatchError::NoHolder { layer, expert: e }.to_string()));
                        }
                        continue;
                    }
                    live().nth((turn + r as usize) % n).unwrap_or(holders[0])
                }
            };
            if !row_workers.contains(&w) {
                row_workers.push(w);
            }
            let slot = match s.slot_of[w] {
                Some(i) => i,
                None => {
                    if used == s.batches.len() {
                        s.batches.push(WorkerBatch::default());
                    }
                    s.batches[used].worker = w;
                    s.slot_of[w] = Some(used);
                    used += 1;
                    used - 1
                }
            };
            let b = &mut s.batches[slot];
            if b.row_ids.last() != Some(&r) {
                b.row_ids.push(r);
                b.rows.extend_from_slice(x.row(r as usize));
                b.row_pairs.push(0);
                if let Some(&a) = row_adapter.get(r as usize) {
                    b.row_adapters.push(a);
                }
                if let Some(&q) = row_request.get(r as usize).filter(|&&q| q != 0) {
                    if !b.request_ids.contains(&q) {
                        b.request_ids.push(q);
                    }
                }
            }
            if let Some(p) = b.row_pairs.last_mut() {
                *p += 1;
            }
            b.experts.push(e);
            b.weights.push(wt);
        }
        let hedges = self.transport.hedges();
        for b in &mut s.batches[..used] {
            b.hedge = if hedges { self.hedge_for(layer, b, suspect, turn) } else { None };
        }
        // Batches past `used` keep their buffers for later steps.
        Ok(used)
    }
}

impl<T: WorkerTransport> Dispatcher<T> {
    /// Adds the successful batches' rows into `out`, reports rows whose adapter failed on the
    /// worker in `unserved`, and queues the pairs of dead or silent workers in `retry`.
    #[allow(clippy::too_many_arguments)]
    fn absorb(
        &self,
        layer: usize,
        cols: usize,
        adapters: &[AdapterIdentity],
        batches: &[WorkerBatch],
        outputs: &[BatchOutput],
        results: &[Result<()>],
        out: &mut HostTensor,
        unserved: &mut Vec<(u32, String)>,
        retry: &mut Vec<(u32, u32, f32)>,
    ) -> Result<()> {
        for ((b, o), result) in batches.iter().zip(outputs).zip(results) {
            let result = match result {
                Ok(()) if o.rows.len() != b.row_ids.len() * cols => Err(DispatchError::Rejected {
                    worker: self.transport.worker_name(b.worker),
                    message: format!("returned {} values for {} rows", o.rows.len(), b.row_ids.len()),
                }),
                other => other.clone(),
            };
            match result {
                Ok(()) => {
                    for (j, &r) in b.row_ids.iter().enumerate() {
                        if !o.failed_adapters.is_empty() {
                            let slot = b.row_adapters.get(j).copied().unwrap_or(0);
                            if let Some((_, why)) = o.failed_adapters.iter().find(|(s, _)| *s == slot) {
                                // Only this row's request fails; never use its zero row.
                                let id = adapters.get(slot as usize - 1).map(|a| a.id.as_str()).unwrap_or("?");
                                let worker = self.transport.worker_name(b.worker);
                                tracing::warn!(layer, %worker, adapter = id, reason = %why, "adapter failed on a worker");
                                if !unserved.iter().any(|u| u.0 == r) {
                                    unserved
                                        .push((r, format!("adapter {id:?} failed to load on worker {worker}: {why}")));
                                }
                                continue;
                            }
                        }
                        for (acc, v) in out.row_mut(r as usize).iter_mut().zip(&o.rows[j * cols..(j + 1) * cols]) {
                            *acc += v;
                        }
                    }
                }
                Err(e @ (DispatchError::Unavailable { .. } | DispatchError::Deadline { .. })) => {
                    tracing::warn!(layer, worker = %self.transport.worker_name(b.worker), error = %e, "worker failed; retrying on replicas");
                    self.mark_suspect(b.worker);
                    let mut pair = 0usize;
                    for (j, &r) in b.row_ids.iter().enumerate() {
                        for _ in 0..b.row_pairs[j] {
                            retry.push((r, b.experts[pair], b.weights[pair]));
                            pair += 1;
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends `s.pending` to workers round after round until every pair is computed or has no
    /// live holder left.
    fn rounds(
        &self,
        layer: usize,
        x: &HostTensor,
        routes: &ExpertRoutes<'_>,
        s: &mut Scratch,
        out: &mut HostTensor,
        unserved: &mut Vec<(u32, String)>,
    ) -> Result<()> {
        // Each round either finishes or leaves out at least one more worker.
        for _round in 0..=self.num_workers {
            if s.pending.is_empty() {
                return Ok(());
            }
            let used = self.group(layer, x, routes.row_adapter, routes.row_request, s, unserved)?;
            if s.outputs.len() < used {
                s.outputs.resize_with(used, BatchOutput::default);
            }
            s.results.clear();
            s.results.resize_with(used, || Ok(()));
            self.transport.execute(
                layer,
                x.cols,
                routes.adapters,
                &s.batches[..used],
                &mut s.outputs[..used],
                &mut s.results[..used],
            );
            s.retry.clear();
            self.absorb(
                layer,
                x.cols,
                routes.adapters,
                &s.batches[..used],
                &s.outputs[..used],
                &s.results[..used],
                out,
                unserved,
                &mut s.retry,
            )?;
            s.retry.sort_by_key(|&(r, _, _)| r);
            std::mem::swap(&mut s.pending, &mut s.retry);
        }
        if s.pending.is_empty() {
            return Ok(());
        }
        Err(DispatchError::Placement("every holder failed".into()))
    }

    fn scratch(&self, layer: usize) -> moe_model::Result<std::sync::MutexGuard<'_, Scratch>> {
        self.scratch.lock().map_err(|_| ModelError::Experts { layer, message: "dispatcher state poisoned".into() })
    }

    /// The scratch, locked, with `pending` holding every (row, expert, weight) of `routes`.
    fn loaded(&self, layer: usize, routes: &ExpertRoutes<'_>) -> moe_model::Result<std::sync::MutexGuard<'_, Scratch>> {
        let mut s = self.scratch(layer)?;
        let k = routes.top_k.max(1);
        s.pending.clear();
        s.pending.extend(routes.choices.iter().enumerate().map(|(i, &(e, w))| ((i / k) as u32, e, w)));
        Ok(s)
    }
}

fn to_model(layer: usize) -> impl Fn(DispatchError) -> ModelError {
    move |e| ModelError::Experts { layer, message: e.to_string() }
}

impl<T: WorkerTransport> ExpertExecutor<CpuBackend> for Dispatcher<T> {
    fn run_experts(
        &self,
        layer: usize,
        x: &HostTensor,
        routes: &ExpertRoutes<'_>,
        out: &mut HostTensor,
        unserved: &mut Vec<(u32, String)>,
    ) -> moe_model::Result<()> {
        let mut s = self.loaded(layer, routes)?;
        self.rounds(layer, x, routes, &mut s, out, unserved).map_err(to_model(layer))
    }

    fn overlaps(&self) -> bool {
        self.transport.overlaps()
    }

    /// Groups the rows and starts the calls; the batches travel with the call (copies, so the
    /// scratch is free for the other half meanwhile).
    fn start_experts(
        &self,
        layer: usize,
        x: &HostTensor,
        routes: &ExpertRoutes<'_>,
    ) -> moe_model::Result<ExpertTicket> {
        let mut guard = self.loaded(layer, routes)?;
        let s = &mut *guard;
        let mut unserved = Vec::new();
        let used =
            self.group(layer, x, routes.row_adapter, routes.row_request, s, &mut unserved).map_err(to_model(layer))?;
        let batches = s.batches[..used].to_vec();
        drop(guard);
        let call = self.transport.start(layer, x.cols, routes.adapters.to_vec(), batches);
        Ok(ExpertTicket(Some(Box::new(Started { call, unserved }))))
    }

    fn finish_experts(
        &self,
        ticket: ExpertTicket,
        layer: usize,
        x: &HostTensor,
        routes: &ExpertRoutes<'_>,
        out: &mut HostTensor,
        unserved: &mut Vec<(u32, String)>,
    ) -> moe_model::Result<()> {
        let Some(started) = ticket.0.and_then(|t| t.downcast::<Started>().ok()) else {
            return self.run_experts(layer, x, routes, out, unserved);
        };
        unserved.extend(started.unserved);
        let done = started.call.wait().map_err(to_model(layer))?;
        let mut retry = Vec::new();
        self.absorb(
            layer,
            x.cols,
            routes.adapters,
            &done.batches,
            &done.outputs,
            &done.results,
            out,
            unserved,
            &mut retry,
        )
        .map_err(to_model(layer))?;
        if retry.is_empty() {
            return Ok(());
        }
        // Failover: the remaining pairs go to replicas, synchronously, as in run_experts.
        retry.sort_by_key(|&(r, _, _)| r);
        let mut guard = self.scratch(layer)?;
        let s = &mut *guard;
        s.pending = retry;
        self.rounds(layer, x, routes, s, out, unserved).map_err(to_model(layer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_compute::ExpertPlan;

    /// Records the batches it is given and answers zeros.
    struct Recorder(Mutex<Vec<WorkerBatch>>);

    impl WorkerTransport for Recorder {
        fn worker_name(&self, worker: usize) -> String {
            format!("w{worker}")
        }
        fn execute(
            &self,
            _layer: usize,
            hidden: usize,
            _adapters: &[AdapterIdentity],
            batches: &[WorkerBatch],
            outputs: &mut [BatchOutput],
            results: &mut [Result<()>],
        ) {
            for ((b, o), r) in batches.iter().zip(outputs.iter_mut()).zip(results.iter_mut()) {
                o.rows = vec![0.0; b.row_ids.len() * hidden];
                *r = Ok(());
            }
            if let Ok(mut v) = self.0.lock() {
                v.extend(batches.iter().cloned());
            }
        }
    }

    #[test]
    fn rows_go_once_per_worker_with_their_request_ids_and_adapters() {
        let mut placement = Placement::new(1, 2);
        placement.add(0, 0, &[0]).unwrap();
        placement.add(1, 0, &[1]).unwrap();
        let d = Dispatcher::new(Recorder(Mutex::new(Vec::new())), placement, 2);
        // Rows 0 and 1 belong to request 7, row 2 to request 9; row 1 carries adapter slot 1.
        let choices = [(0, 0.5), (1, 0.5), (0, 0.6), (1, 0.4), (1, 0.7), (0, 0.3)];
        let mut plan = ExpertPlan::default();
        plan.rebuild(2, 2, &choices);
        let routes = ExpertRoutes {
            top_k: 2,
            choices: &choices,
            plan: &plan,
            adapters: &[],
            row_adapter: &[0, 1, 0],
            row_request: &[7, 7, 9],
        };
        let x = HostTensor { rows: 3, cols: 4, data: vec![1.0; 12] };
        let mut out = HostTensor { rows: 3, cols: 4, data: vec![0.0; 12] };
        d.run_experts(0, &x, &routes, &mut out, &mut Vec::new()).unwrap();
        let sent = d.transport().0.lock().unwrap().clone();
        let w0 = sent.iter().find(|b| b.worker == 0).unwrap();
        let w1 = sent.iter().find(|b| b.worker == 1).unwrap();
        assert_eq!(
            (w0.row_ids.as_slice(), w0.request_ids.as_slice(), w0.row_adapters.as_slice()),
            (&[0, 1, 2][..], &[7, 9][..], &[0, 1, 0][..])
        );
        assert_eq!((w1.row_ids.as_slice(), w1.request_ids.as_slice()), (&[0, 1, 2][..], &[7, 9][..]));
        assert_eq!((w0.weights.as_slice(), w1.weights.as_slice()), (&[0.5, 0.6, 0.3][..], &[0.5, 0.4, 0.7][..]));
    }
}
