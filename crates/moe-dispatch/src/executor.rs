//! The dispatcher as the model sees it: an [`ExpertExecutor`] on any backend. A layer's rows
//! come to the host with `download` (the copy the wire needs anyway), travel to the workers, and
//! the sum of their (row, expert) results, in the fixed order of [`crate::combine`], goes back
//! with `upload`. A started call ([`StartedCall`]) holds the dispatcher it
//! began on and finishes itself, failover included.

use crate::dispatcher::{Dispatcher, DispatcherCore};
use crate::error::DispatchError;
use crate::transport::{InFlightCall, WorkerTransport};
use moe_compute::Backend;
use moe_model::{ExpertExecutor, ExpertTicket, LayerCall, ModelError, StartedExperts};
use std::sync::Arc;

fn to_model(layer: usize) -> impl Fn(DispatchError) -> ModelError {
    move |e| ModelError::Experts { layer, message: e.to_string() }
}

/// The host sum of a layer's expert results starts at zero, as `LayerCall::out` does on entry,
/// so the output never has to leave the device.
fn zeroed(buf: &mut Vec<f32>, len: usize) {
    buf.clear();
    buf.resize(len, 0.0);
}

impl<B: Backend, T: WorkerTransport + 'static> ExpertExecutor<B> for Dispatcher<T> {
    fn run_experts(&self, call: LayerCall<'_, B>) -> moe_model::Result<()> {
        let core = &self.core;
        let b = call.backend;
        let (rows, cols) = b.act_shape(call.x);
        let mut s = core.loaded(call.layer, &call.routes)?;
        b.download(call.x, &mut s.x);
        s.contrib.reset(rows, call.routes.top_k, cols);
        let result = core.rounds(call.layer, cols, &call.routes, &mut s, call.unserved);
        let s = &mut *s;
        zeroed(&mut s.out, rows * cols);
        s.contrib.sum_into(call.routes.choices, &mut s.out);
        b.upload(rows, cols, &s.out, call.out);
        result.map_err(to_model(call.layer))
    }

    fn overlaps(&self) -> bool {
        self.core.transport().overlaps()
    }

    /// Groups the rows and starts the calls; the batches travel with the call (copies, so the
    /// scratch is free for the other half meanwhile).
    fn start_experts(&self, call: &LayerCall<'_, B>) -> moe_model::Result<ExpertTicket<B>> {
        let core = &self.core;
        let b = call.backend;
        let (_, cols) = b.act_shape(call.x);
        let mut guard = core.loaded(call.layer, &call.routes)?;
        b.download(call.x, &mut guard.x);
        let mut unserved = Vec::new();
        let batches = core
            .group_first(call.layer, cols, &call.routes, &mut guard, &mut unserved)
            .map_err(to_model(call.layer))?;
        drop(guard);
        let started = core.transport().start(call.layer, cols, call.routes.adapters.to_vec(), batches);
        Ok(ExpertTicket::Started(Box::new(StartedCall { core: core.clone(), call: started, unserved })))
    }
}

/// A layer's calls in flight on the dispatcher they began on, and the rows no holder could take
/// (reported at the finish).
struct StartedCall<T: WorkerTransport> {
    core: Arc<DispatcherCore<T>>,
    call: InFlightCall,
    unserved: Vec<(u32, String)>,
}

impl<B: Backend, T: WorkerTransport + 'static> StartedExperts<B> for StartedCall<T> {
    fn finish(self: Box<Self>, call: LayerCall<'_, B>) -> moe_model::Result<()> {
        let StartedCall { core, call: in_flight, unserved } = *self;
        let layer = call.layer;
        call.unserved.extend(unserved);
        let done = in_flight.wait().map_err(to_model(layer))?;
        let b = call.backend;
        let (rows, cols) = b.act_shape(call.x);
        let mut guard = core.scratch(layer)?;
        let s = &mut *guard;
        s.contrib.reset(rows, call.routes.top_k, cols);
        s.start_call(core.num_workers());
        let mut retry = Vec::new();
        let crate::dispatcher::Scratch { contrib, refused, refusal, .. } = s;
        let mut into = crate::dispatcher::Absorbed { contrib, retry: &mut retry, refused, refusal };
        let absorbed = core.absorb(
            layer,
            cols,
            &call.routes,
            &done.batches,
            &done.outputs,
            &done.results,
            &mut into,
            call.unserved,
        );
        let result = match absorbed {
            Ok(()) if retry.is_empty() => Ok(()),
            Ok(()) => {
                // Failover: the remaining pairs go to replicas, synchronously, as in run_experts.
                retry.sort_by_key(|&(r, _, _)| r);
                s.pending = retry;
                b.download(call.x, &mut s.x);
                core.rounds(layer, cols, &call.routes, s, call.unserved)
            }
            Err(e) => Err(e),
        };
        zeroed(&mut s.out, rows * cols);
        s.contrib.sum_into(call.routes.choices, &mut s.out);
        b.upload(rows, cols, &s.out, call.out);
        result.map_err(to_model(layer))
    }
}
