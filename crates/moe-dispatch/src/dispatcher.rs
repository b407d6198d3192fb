//! Turning one MoE layer's routing into one batch per worker, collecting what comes back (one
//! result per (row, expert) pair, summed in a fixed order by [`crate::combine`]), and failing
//! over: when a worker does not answer (connection refused or reset, deadline), it is
//! marked suspect ([`crate::health`]: left out, then probed before it gets traffic again) and the
//! (row, expert) pairs it owed are sent, in the same step, to
//! another holder of the same experts; a worker that refuses a call (over its batch budget, an
//! expert it no longer hosts, a bad adapter dir) is left out of that call only and its pairs go
//! to replicas too. Expert calls are pure functions of their inputs, so the retry gives the same
//! bits. A row with no holder left fails alone (its request), never the batch.
//! Rows are on the host here (the wire's side); [`crate::executor`] moves them to and from the
//! backend.

use crate::combine::Contributions;
use crate::error::{DispatchError, Result};
pub use crate::health::SUSPECT_FOR;
use crate::health::{Availability, WorkerHealth};
use crate::placement::Placement;
use crate::transport::{BatchOutput, WorkerBatch, WorkerTransport};
use moe_model::{AdapterIdentity, ExpertRoutes, ModelError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) struct Scratch {
    /// The layer's input rows and the sum of the experts' results, on the host (the wire's side).
    pub(crate) x: Vec<f32>,
    pub(crate) out: Vec<f32>,
    /// Each (row, expert) result until the layer's are all in.
    pub(crate) contrib: Contributions,
    /// Workers that refused this call (left out of its later rounds, not suspected for other
    /// calls), and the last refusal, quoted to rows that then have no holder.
    pub(crate) refused: Vec<bool>,
    pub(crate) refusal: Option<String>,
    pub(crate) pending: Vec<(u32, u32, f32)>,
    batches: Vec<WorkerBatch>,
    outputs: Vec<BatchOutput>,
    results: Vec<Result<()>>,
    slot_of: Vec<Option<usize>>,
    retry: Vec<(u32, u32, f32)>,
    suspect: Vec<bool>,
    availability: Vec<Availability>,
    row_workers: Vec<usize>,
    /// (row, expert) pairs given to each worker in this round: replicas share by it.
    assigned: Vec<u32>,
}

/// An [`moe_model::ExpertExecutor`] that sends rows to workers through a transport. Cheap to
/// clone: a started call holds the dispatcher it began on.
pub struct Dispatcher<T: WorkerTransport> {
    pub(crate) core: Arc<DispatcherCore<T>>,
}

impl<T: WorkerTransport> Clone for Dispatcher<T> {
    fn clone(&self) -> Self {
        Self { core: self.core.clone() }
    }
}

pub(crate) struct DispatcherCore<T: WorkerTransport> {
    transport: T,
    placement: Placement,
    num_workers: usize,
    next: AtomicUsize,
    health: WorkerHealth,
    scratch: Mutex<Scratch>,
}

impl<T: WorkerTransport> Dispatcher<T> {
    pub fn new(transport: T, placement: Placement, num_workers: usize) -> Self {
        Self::with_suspect_for(transport, placement, num_workers, SUSPECT_FOR)
    }

    /// [`Self::new`] with another suspect period than [`SUSPECT_FOR`].
    pub fn with_suspect_for(transport: T, placement: Placement, num_workers: usize, suspect_for: Duration) -> Self {
        let core = DispatcherCore {
            transport,
            placement,
            num_workers,
            next: AtomicUsize::new(0),
            health: WorkerHealth::new(num_workers, suspect_for),
            scratch: Mutex::new(Scratch {
                x: Vec::new(),
                out: Vec::new(),
                contrib: Contributions::default(),
                refused: Vec::new(),
                refusal: None,
                batches: Vec::new(),
                outputs: Vec::new(),
                results: Vec::new(),
                slot_of: Vec::new(),
                pending: Vec::new(),
                retry: Vec::new(),
                suspect: Vec::new(),
                availability: Vec::new(),
                row_workers: Vec::new(),
                assigned: Vec::new(),
            }),
        };
        Self { core: Arc::new(core) }
    }

    pub fn transport(&self) -> &T {
        &self.core.transport
    }

    pub fn placement(&self) -> &Placement {
        &self.core.placement
    }

    /// Workers currently left out after a failure (suspect, or probed before traffic).
    pub fn suspects(&self) -> Vec<usize> {
        self.core.health.suspects().into_iter().map(|(w, _)| w).collect()
    }

    /// Until when each suspect worker is left out, by name (carried over when membership
    /// changes, so a worker that stays keeps its state; one being probed is probed again).
    pub fn suspects_by_name(&self) -> Vec<(String, Instant)> {
        let h = self.core.health.suspects();
        h.into_iter().map(|(w, until)| (self.core.transport.worker_name(w), until)).collect()
    }

    /// Leaves `worker` out until `until` (then it is probed).
    pub fn set_suspect_until(&self, worker: usize, until: Instant) {
        self.core.health.set_suspect_until(worker, until);
    }
}

impl<T: WorkerTransport> DispatcherCore<T> {
    pub(crate) fn transport(&self) -> &T {
        &self.transport
    }

    pub(crate) fn num_workers(&self) -> usize {
        self.num_workers
    }

    fn mark_suspect(&self, worker: usize) {
        self.health.mark_suspect(worker);
    }

    /// The rows of `batches` grouped for the first round (after [`Self::loaded`]).
    pub(crate) fn group_first(
        &self,
        layer: usize,
        cols: usize,
        routes: &ExpertRoutes<'_>,
        s: &mut Scratch,
        unserved: &mut Vec<(u32, String)>,
    ) -> Result<Vec<WorkerBatch>> {
        let used = self.group(layer, cols, routes.row_adapter, routes.row_request, s, unserved)?;
        Ok(s.batches[..used].to_vec())
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
        cols: usize,
        row_adapter: &[u32],
        row_request: &[u64],
        s: &mut Scratch,
        unserved: &mut Vec<(u32, String)>,
    ) -> Result<usize> {
        for (w, at) in self.transport.take_missed() {
            if self.health.mark_suspect_since(w, at) {
                let worker = self.transport.worker_name(w);
                tracing::warn!(%worker, "a worker missed its deadline behind a hedge; suspecting it");
            }
        }
        self.health.snapshot(&self.transport, &mut s.availability);
        s.suspect.clear();
        s.suspect.extend(s.availability.iter().map(|a| *a != Availability::Live));
        s.suspect.resize(self.num_workers, true);
        for (suspect, &refused) in s.suspect.iter_mut().zip(&s.refused) {
            *suspect |= refused;
        }
        let refusal = s.refusal.as_deref();
        let suspect = &s.suspect;
        let x = &s.x;
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
        let assigned = &mut s.assigned;
        assigned.clear();
        assigned.resize(self.num_workers, 0);
        let is_live = |h: usize| !suspect.get(h).copied().unwrap_or(false);
        // Pairs whose expert has one live holder must go there: count them first, so that the
        // free choices below balance around them instead of only the pairs seen so far.
        for &(_, e, _) in &s.pending {
            let mut live = self.placement.holders(layer, e).iter().copied().filter(|&h| is_live(h));
            if let (Some(a), None) = (live.next().and_then(|h| assigned.get_mut(h)), live.next()) {
                *a += 1;
            }
        }
        let mut current_row = u32::MAX;
        for &(r, e, wt) in &s.pending {
            if r != current_row {
                current_row = r;
                row_workers.clear();
            }
            let holders = self.placement.holders(layer, e);
            let live = || holders.iter().copied().filter(|&h| is_live(h));
            let n = live().count();
            let least = live().map(|h| assigned.get(h).copied().unwrap_or(0)).min().unwrap_or(0);
            // A worker this row already goes to, if it holds the expert and has no more work
            // than the least loaded holder (the row then travels once).
            let affine = row_workers
                .iter()
                .copied()
                .find(|w| live().any(|h| h == *w) && (n == 1 || assigned.get(*w).copied().unwrap_or(0) <= least));
            let w = match (n, affine) {
                (1, _) => live().next().unwrap_or(holders[0]),
                (_, Some(w)) => w,
                (0, None) => {
                    // No live holder (its holders failed and are not yet probed back): only
                    // this row fails, at once; the others of the batch go on without waiting
                    // for a worker that may be frozen.
                    if unserved.last().map(|u| u.0) != Some(r) {
                        let why = DispatchError::NoHolder { layer, expert: e }.to_string();
                        unserved
                            .push((r, refusal.map_or_else(|| why.clone(), |r| format!("{why} that accepts it: {r}"))));
                    }
                    continue;
                }
                _ => {
                    // The live holder with the least work in this call; among equals, a
                    // rotation, so equal replicas take turns. Results do not depend on it.
                    let start = (turn + r as usize) % n;
                    let mut best: Option<(u32, usize, usize)> = None;
                    for (i, h) in live().enumerate() {
                        let key = (assigned.get(h).copied().unwrap_or(0), (i + n - start) % n, h);
                        if best.is_none_or(|b| (key.0, key.1) < (b.0, b.1)) {
                            best = Some(key);
                        }
                    }
                    best.map_or(holders[0], |b| b.2)
                }
            };
            if !row_workers.contains(&w) {
                row_workers.push(w);
            }
            // A single holder's pairs were counted before the loop.
            if n != 1 {
                if let Some(a) = assigned.get_mut(w) {
                    *a += 1;
                }
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
                b.rows.extend_from_slice(&x[r as usize * cols..(r as usize + 1) * cols]);
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
        self.transport.record_balance(layer, &s.assigned);
        let hedges = self.transport.hedges();
        for b in &mut s.batches[..used] {
            b.hedge = if hedges { self.hedge_for(layer, b, suspect, turn) } else { None };
        }
        // Batches past `used` keep their buffers for later steps.
        Ok(used)
    }
}

impl<T: WorkerTransport> DispatcherCore<T> {
    /// Stores the successful batches' (row, expert) results in `s.contrib`, reports rows whose
    /// adapter failed on the worker in `unserved`, and queues in `s.retry` the pairs of dead or
    /// silent workers (then suspected) and of workers that refused the call (then left out of
    /// this call only): replicas take them, and rows with none left fail alone.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn absorb(
        &self,
        layer: usize,
        cols: usize,
        routes: &ExpertRoutes<'_>,
        batches: &[WorkerBatch],
        outputs: &[BatchOutput],
        results: &[Result<()>],
        s: &mut Absorbed<'_>,
        unserved: &mut Vec<(u32, String)>,
    ) -> Result<()> {
        let Absorbed { contrib, retry, refused, refusal } = s;
        let adapters: &[AdapterIdentity] = routes.adapters;
        for ((b, o), result) in batches.iter().zip(outputs).zip(results) {
            let result = match result {
                Ok(()) => o.check(b, cols, adapters.len()).map_err(|message| DispatchError::Malformed {
                    worker: self.transport.worker_name(b.worker),
                    message,
                }),
                other => other.clone(),
            };
            match result {
                Ok(()) => {
                    let mut pair = 0usize;
                    for (j, &r) in b.row_ids.iter().enumerate() {
                        let pairs = pair..pair + b.row_pairs[j] as usize;
                        pair = pairs.end;
                        if !o.failed_adapters.is_empty() {
                            let slot = b.row_adapters.get(j).copied().unwrap_or(0);
                            if let Some((_, why)) = o.failed_adapters.iter().find(|(s, _)| *s == slot) {
                                // Only this row's request fails; never use its zero row.
                                let id = (slot as usize)
                                    .checked_sub(1)
                                    .and_then(|i| adapters.get(i))
                                    .map(|a| a.id.as_str())
                                    .unwrap_or("?");
                                let worker = self.transport.worker_name(b.worker);
                                tracing::warn!(layer, %worker, adapter = id, reason = %why, "adapter failed on a worker");
                                if !unserved.iter().any(|u| u.0 == r) {
                                    unserved
                                        .push((r, format!("adapter {id:?} failed to load on worker {worker}: {why}")));
                                }
                                continue;
                            }
                        }
                        for p in pairs {
                            contrib.put(routes.choices, r, b.experts[p], &o.rows[p * cols..(p + 1) * cols]);
                        }
                    }
                }
                Err(
                    e @ (DispatchError::Unavailable { .. }
                    | DispatchError::Deadline { .. }
                    | DispatchError::Malformed { .. }
                    | DispatchError::Rejected { .. }),
                ) => {
                    if matches!(e, DispatchError::Rejected { .. }) {
                        // The worker is alive but will not take this call (over its batch
                        // budget, an expert it no longer hosts, ...): another holder may.
                        tracing::warn!(layer, worker = %self.transport.worker_name(b.worker), error = %e, "worker refused; retrying on replicas");
                        if let Some(x) = refused.get_mut(b.worker) {
                            *x = true;
                        }
                        **refusal = Some(e.to_string());
                    } else {
                        tracing::warn!(layer, worker = %self.transport.worker_name(b.worker), error = %e, "worker failed; retrying on replicas");
                        self.mark_suspect(b.worker);
                    }
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
    /// `s.x` holds the layer's rows (`cols` each) and results are stored in `s.contrib`.
    pub(crate) fn rounds(
        &self,
        layer: usize,
        cols: usize,
        routes: &ExpertRoutes<'_>,
        s: &mut Scratch,
        unserved: &mut Vec<(u32, String)>,
    ) -> Result<()> {
        // Each round either finishes or leaves out at least one more worker.
        for _round in 0..=self.num_workers {
            if s.pending.is_empty() {
                return Ok(());
            }
            let used = self.group(layer, cols, routes.row_adapter, routes.row_request, s, unserved)?;
            if s.outputs.len() < used {
                s.outputs.resize_with(used, BatchOutput::default);
            }
            s.results.clear();
            s.results.resize_with(used, || Ok(()));
            self.transport.execute(
                layer,
                cols,
                routes.adapters,
                &s.batches[..used],
                &mut s.outputs[..used],
                &mut s.results[..used],
            );
            s.retry.clear();
            let Scratch { batches, outputs, results, contrib, retry, refused, refusal, .. } = &mut *s;
            let mut absorbed = Absorbed { contrib, retry, refused, refusal };
            self.absorb(
                layer,
                cols,
                routes,
                &batches[..used],
                &outputs[..used],
                &results[..used],
                &mut absorbed,
                unserved,
            )?;
            s.retry.sort_by_key(|&(r, _, _)| r);
            std::mem::swap(&mut s.pending, &mut s.retry);
        }
        if s.pending.is_empty() {
            return Ok(());
        }
        Err(DispatchError::Placement("every holder failed".into()))
    }

    pub(crate) fn scratch(&self, layer: usize) -> moe_model::Result<std::sync::MutexGuard<'_, Scratch>> {
        self.scratch.lock().map_err(|_| ModelError::Experts { layer, message: "dispatcher state poisoned".into() })
    }

    /// The scratch, locked, with `pending` holding every (row, expert, weight) of `routes`.
    pub(crate) fn loaded(
        &self,
        layer: usize,
        routes: &ExpertRoutes<'_>,
    ) -> moe_model::Result<std::sync::MutexGuard<'_, Scratch>> {
        let mut s = self.scratch(layer)?;
        s.start_call(self.num_workers);
        let k = routes.top_k.max(1);
        s.pending.clear();
        s.pending.extend(routes.choices.iter().enumerate().map(|(i, &(e, w))| ((i / k) as u32, e, w)));
        Ok(s)
    }
}

/// Where [`DispatcherCore::absorb`] puts what it learns from one round.
pub(crate) struct Absorbed<'a> {
    pub contrib: &'a mut Contributions,
    pub retry: &'a mut Vec<(u32, u32, f32)>,
    pub refused: &'a mut Vec<bool>,
    pub refusal: &'a mut Option<String>,
}

impl Scratch {
    /// Forgets the previous call's refusals.
    pub(crate) fn start_call(&mut self, workers: usize) {
        self.refused.clear();
        self.refused.resize(workers, false);
        self.refusal = None;
    }
}
