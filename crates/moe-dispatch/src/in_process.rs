//! The in-process transport: worker batches run as direct calls into hosts in this process (the
//! embedded cluster). No sockets, no serialization; the same host code as a gRPC worker. The
//! workers of one call run side by side on the compute pool (each host's kernels are
//! parallel too; work stealing shares the threads), as remote workers would.

use crate::error::{DispatchError, Result};
use crate::transport::{BatchOutput, WorkerBatch, WorkerTransport};
use moe_model::AdapterIdentity;
use moe_worker::{ComputeInput, ExpertCompute};
use std::sync::Arc;

pub struct InProcessTransport {
    hosts: Vec<Arc<dyn ExpertCompute>>,
}

impl InProcessTransport {
    pub fn new(hosts: Vec<Arc<dyn ExpertCompute>>) -> Self {
        Self { hosts }
    }

    pub fn hosts(&self) -> &[Arc<dyn ExpertCompute>] {
        &self.hosts
    }
}

impl WorkerTransport for InProcessTransport {
    fn worker_name(&self, worker: usize) -> String {
        format!("in-process#{worker}")
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
        use rayon::prelude::*;
        batches.par_iter().zip(outputs.par_iter_mut()).zip(results.par_iter_mut()).for_each(|((b, out), result)| {
            *result = self.run_one(layer, hidden, adapters, b, out);
        });
    }
}

impl InProcessTransport {
    fn run_one(
        &self,
        layer: usize,
        hidden: usize,
        adapters: &[AdapterIdentity],
        b: &WorkerBatch,
        out: &mut BatchOutput,
    ) -> Result<()> {
        let host = self.hosts.get(b.worker).ok_or_else(|| DispatchError::Unavailable {
            worker: self.worker_name(b.worker),
            message: "no such worker".into(),
        })?;
        let input = ComputeInput {
            layer,
            hidden_size: hidden,
            rows: &b.rows,
            row_pairs: &b.row_pairs,
            experts: &b.experts,
            weights: &b.weights,
            adapters,
            row_adapters: &b.row_adapters,
        };
        let failed = host
            .compute(&input, &mut out.rows)
            .map_err(|e| DispatchError::Rejected { worker: self.worker_name(b.worker), message: e.to_string() })?;
        out.failed_adapters.clear();
        out.failed_adapters.extend(failed.into_iter().map(|f| (f.slot, f.message)));
        Ok(())
    }
}
