//! Turning one MoE layer's routing into one batch per worker and summing what comes back.

use crate::error::{DispatchError, Result};
use crate::placement::Placement;
use moe_compute::cpu::{CpuBackend, HostTensor};
use moe_model::{ExpertExecutor, ExpertRoutes, ModelError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

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
}

/// Runs worker batches somewhere: in this process, over gRPC, or any faster data plane.
pub trait WorkerTransport: Send + Sync {
    /// A name for worker `i` in errors and logs (its address).
    fn worker_name(&self, worker: usize) -> String;
    /// Runs every batch (at most one per worker, in parallel where possible) and writes each
    /// batch's combined rows into the matching `outputs` entry.
    fn execute(&self, layer: usize, hidden: usize, batches: &[WorkerBatch], outputs: &mut [Vec<f32>]) -> Result<()>;
}

struct Scratch {
    batches: Vec<WorkerBatch>,
    outputs: Vec<Vec<f32>>,
    /// Worker index -> position in `batches` for the current layer.
    slot_of: Vec<Option<usize>>,
}

/// An [`ExpertExecutor`] that sends rows to workers through a transport.
pub struct Dispatcher<T: WorkerTransport> {
    transport: T,
    placement: Placement,
    num_workers: usize,
    next: AtomicUsize,
    scratch: Mutex<Scratch>,
}

impl<T: WorkerTransport> Dispatcher<T> {
    pub fn new(transport: T, placement: Placement, num_workers: usize) -> Self {
        Self {
            transport,
            placement,
            num_workers,
            next: AtomicUsize::new(0),
            scratch: Mutex::new(Scratch { batches: Vec::new(), outputs: Vec::new(), slot_of: Vec::new() }),
        }
    }

    pub fn transport(&self) -> &T {
        &self.transport
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Groups the routed rows by worker. A row's experts go, where possible, to a worker already
    /// chosen for that row, so each row travels to each worker at most once; replicas are used
    /// in turn.
    fn group(&self, layer: usize, x: &HostTensor, routes: &ExpertRoutes<'_>, s: &mut Scratch) -> Result<usize> {
        let h = x.cols;
        let k = routes.top_k;
        s.slot_of.clear();
        s.slot_of.resize(self.num_workers, None);
        for b in s.batches.iter_mut() {
            b.row_ids.clear();
            b.rows.clear();
            b.row_pairs.clear();
            b.experts.clear();
            b.weights.clear();
        }
        let mut used = 0usize;
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let mut chosen: [usize; 16] = [usize::MAX; 16];
        for r in 0..x.rows {
            let picks = &routes.choices[r * k..(r + 1) * k];
            for (j, &(e, _)) in picks.iter().enumerate() {
                let holders = self.placement.holders(layer, e);
                if holders.is_empty() {
                    return Err(DispatchError::NoHolder { layer, expert: e });
                }
                let prior = chosen[..j.min(16)].iter().find(|w| holders.contains(w)).copied();
                let w = prior.unwrap_or(holders[(turn + r) % holders.len()]);
                if j < 16 {
                    chosen[j] = w;
                }
            }
            for (j, &(e, wt)) in picks.iter().enumerate() {
                let w = if j < 16 { chosen[j] } else { self.placement.holders(layer, e)[0] };
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
                if b.row_ids.last() != Some(&(r as u32)) {
                    b.row_ids.push(r as u32);
                    b.rows.extend_from_slice(x.row(r));
                    b.row_pairs.push(0);
                }
                if let Some(p) = b.row_pairs.last_mut() {
                    *p += 1;
                }
                b.experts.push(e);
                b.weights.push(wt);
            }
            chosen.fill(usize::MAX);
        }
        // Batches past `used` keep their buffers for later steps.
        debug_assert!(s.batches[..used].iter().all(|b| b.rows.len() == b.row_ids.len() * h));
        Ok(used)
    }
}

impl<T: WorkerTransport> ExpertExecutor<CpuBackend> for Dispatcher<T> {
    fn run_experts(
        &self,
        layer: usize,
        x: &HostTensor,
        routes: &ExpertRoutes<'_>,
        out: &mut HostTensor,
    ) -> moe_model::Result<()> {
        let to_model = |e: DispatchError| ModelError::Experts { layer, message: e.to_string() };
        let mut guard =
            self.scratch.lock().map_err(|_| to_model(DispatchError::Placement("dispatcher state poisoned".into())))?;
        let s = &mut *guard;
        let used = self.group(layer, x, routes, s).map_err(to_model)?;
        if s.outputs.len() < used {
            s.outputs.resize_with(used, Vec::new);
        }
        self.transport.execute(layer, x.cols, &s.batches[..used], &mut s.outputs[..used]).map_err(to_model)?;
        for (b, o) in s.batches[..used].iter().zip(&s.outputs) {
            if o.len() != b.row_ids.len() * x.cols {
                return Err(to_model(DispatchError::Rejected {
                    worker: self.transport.worker_name(b.worker),
                    message: format!("returned {} values for {} rows", o.len(), b.row_ids.len()),
                }));
            }
            for (i, &r) in b.row_ids.iter().enumerate() {
                for (acc, v) in out.row_mut(r as usize).iter_mut().zip(&o[i * x.cols..(i + 1) * x.cols]) {
                    *acc += v;
                }
            }
        }
        Ok(())
    }
}
