//! The seam between the model and wherever its routed experts run: one MoE layer's expert call
//! ([`LayerCall`]), the trait every executor implements ([`ExpertExecutor`]: the model's own
//! weights, in-process workers, gRPC workers, membership), and the typed handle of a call in
//! flight ([`ExpertTicket`]), which finishes itself: no downcast, nothing recomputed silently.

use crate::adapter::AdapterIdentity;
use crate::error::Result;
use moe_compute::{Backend, ExpertPlan};

/// The routing decision of one MoE layer for a batch: `top_k` (expert, weight) pairs per row,
/// and the same grouped by expert; and which rows carry an adapter with expert pairs.
pub struct ExpertRoutes<'a> {
    pub top_k: usize,
    pub choices: &'a [(u32, f32)],
    pub plan: &'a ExpertPlan,
    /// The adapters with expert pairs among this batch's rows.
    pub adapters: &'a [AdapterIdentity],
    /// Per row: 0 for none, `i` for `adapters[i - 1]`. Empty when no row has one.
    pub row_adapter: &'a [u32],
    /// Per row, the id of its request (0: none); empty when unknown.
    pub row_request: &'a [u64],
}

/// One MoE layer's expert call: the rows and their routing (read), and where the results and
/// the rows that could not be served go (written). `out` is `[rows, H]` and zeroed on entry;
/// the executor adds, for every row r, `Σ_j w_rj · expert_{e_rj}(x_r)` into it.
pub struct LayerCall<'w, B: Backend> {
    /// The backend `x` and `out` live on (executors that leave the device copy through it).
    pub backend: &'w B,
    pub layer: usize,
    pub x: &'w B::Act,
    pub routes: ExpertRoutes<'w>,
    pub out: &'w mut B::Act,
    /// Rows that cannot be served (an expert with no live holder, an adapter a worker could not
    /// load), with the reason; the others are still computed, and the caller fails only the
    /// sequences those rows belong to.
    pub unserved: &'w mut Vec<(u32, String)>,
}

/// Where the routed experts of an MoE layer run. An `Err` fails the whole step.
pub trait ExpertExecutor<B: Backend>: Send + Sync {
    /// Runs the call to the end.
    fn run_experts(&self, call: LayerCall<'_, B>) -> Result<()>;

    /// Whether [`Self::start_experts`] returns before the experts have run (remote workers), so
    /// that the caller can compute something else meanwhile (two-batch overlap).
    fn overlaps(&self) -> bool {
        false
    }

    /// Starts the call's experts without waiting for them (only the call's inputs are read).
    /// The default defers everything to the finish. The same call must be given to
    /// [`ExpertTicket::finish`].
    fn start_experts(&self, call: &LayerCall<'_, B>) -> Result<ExpertTicket<B>> {
        let _ = call;
        Ok(ExpertTicket::Deferred)
    }
}

/// A started expert call that completes itself: it waits for its results and adds them into
/// the call's outputs exactly as [`ExpertExecutor::run_experts`] would.
pub trait StartedExperts<B: Backend>: Send {
    fn finish(self: Box<Self>, call: LayerCall<'_, B>) -> Result<()>;
}

/// An expert call after [`ExpertExecutor::start_experts`].
pub enum ExpertTicket<B: Backend> {
    /// Nothing was started: the finish runs the whole call on the executor.
    Deferred,
    /// In flight; it knows where it runs, even if the executor's membership changed since.
    Started(Box<dyn StartedExperts<B>>),
}

impl<B: Backend> ExpertTicket<B> {
    /// Waits for (or runs) the call and adds its results into `call.out`.
    pub fn finish(self, executor: &dyn ExpertExecutor<B>, call: LayerCall<'_, B>) -> Result<()> {
        match self {
            ExpertTicket::Deferred => executor.run_experts(call),
            ExpertTicket::Started(started) => started.finish(call),
        }
    }
}
