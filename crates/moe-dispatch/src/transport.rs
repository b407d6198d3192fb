//! The narrow seam under the dispatcher: one layer's rows for one worker ([`WorkerBatch`]), what
//! comes back ([`BatchOutput`]), and the [`WorkerTransport`] trait that runs batches in this
//! process, over gRPC, or over any faster data plane.

use crate::error::{DispatchError, Result};
use moe_model::AdapterIdentity;

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

/// What came back for one worker batch: one row per (row, expert) pair of the batch, in the
/// batch's pair order (`weight · expert(row)`), and the adapters (slot
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
    /// batch's per-pair rows into the matching `outputs` entry and its outcome into `results`.
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

    /// Told once per layer call how many (row, expert) pairs each worker was given (every
    /// worker, also those given none), for the balance metrics.
    fn record_balance(&self, _layer: usize, _pairs_per_worker: &[u32]) {}

    /// Checks out of band whether `worker` answers (a suspect whose period ended), and calls
    /// `done` with the verdict, now or later from another thread. The default (workers in this
    /// process) says yes at once.
    fn probe(&self, worker: usize, done: Box<dyn FnOnce(bool) + Send>) {
        let _ = worker;
        done(true);
    }

    /// Whether this transport sends slow batches to [`WorkerBatch::hedge`] too (only then is
    /// the replica looked up).
    fn hedges(&self) -> bool {
        false
    }

    /// Workers that missed a deadline since the last call, although the batch was answered by
    /// a replica (a hedge won), and when: the dispatcher suspects them from then on. The
    /// default: none.
    fn take_missed(&self) -> Vec<(usize, std::time::Instant)> {
        Vec::new()
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

impl BatchOutput {
    /// Whether a worker's answer fits its batch: one row of `cols` values per (row, expert)
    /// pair, and failed adapter slots that name adapters of the call (1-based).
    pub(crate) fn check(&self, b: &WorkerBatch, cols: usize, adapters: usize) -> std::result::Result<(), String> {
        if self.rows.len() != b.experts.len() * cols {
            return Err(format!("{} values for {} (row, expert) pairs of {cols}", self.rows.len(), b.experts.len()));
        }
        if let Some((slot, _)) = self.failed_adapters.iter().find(|(s, _)| *s == 0 || *s as usize > adapters) {
            return Err(format!("failed adapter slot {slot}, but the call has {adapters} adapters"));
        }
        Ok(())
    }
}
