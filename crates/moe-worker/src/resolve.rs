//! Resolving a compute call's adapters with no lock held: loading an adapter may read its files,
//! and a LoadExperts or UnloadExperts (which takes the layers' write lock) must never queue
//! behind that. If the hosted experts changed meanwhile (the registry's generation moved), the
//! adapters are resolved again, so no version without pairs for a newly hosted expert is used.

use crate::error::{Result, WorkerError};
use crate::host::{AdapterFailure, ComputeInput, ExpertCompute, ExpertHost, HostedLayer};
use moe_compute::Backend;
use moe_model::AdapterWeights;
use std::sync::{Arc, RwLockReadGuard};

/// The layers (read-locked) and the call's adapters, resolved against them.
pub(crate) type Resolved<'a, B> =
    (RwLockReadGuard<'a, Vec<Option<HostedLayer<B>>>>, Vec<Option<Arc<AdapterWeights<B>>>>, Vec<AdapterFailure>);

impl<B: Backend> ExpertHost<B> {
    /// Checks the call, resolves its adapters, then read-locks the layers (see the module doc).
    pub(crate) fn resolve_then_lock(&self, input: &ComputeInput<'_>) -> Result<Resolved<'_, B>> {
        self.validate(&self.read_layers(), input)?;
        self.check_budget(input.row_pairs.len(), input.experts.len())?;
        let generation = || self.adapters.as_ref().map_or(0, |r| r.generation());
        let mut tries = 0;
        let resolved = loop {
            let before = generation();
            let mut failed = Vec::new();
            let adapters = self.resolve_adapters(input, &mut failed)?;
            let layers = self.read_layers();
            if generation() == before {
                break (layers, adapters, failed);
            }
            if tries == 3 {
                // The hosted experts keep changing: resolve under the lock, as before.
                let mut failed = Vec::new();
                let adapters = self.resolve_adapters(input, &mut failed)?;
                break (layers, adapters, failed);
            }
            tries += 1;
        };
        Ok(resolved)
    }

    /// The adapters of a request, loaded (pinned for the call) and checked against their digest;
    /// `None` for one that failed, with its 1-based slot and the reason in `failed`.
    pub(crate) fn resolve_adapters(
        &self,
        input: &ComputeInput<'_>,
        failed: &mut Vec<AdapterFailure>,
    ) -> Result<Vec<Option<Arc<AdapterWeights<B>>>>> {
        if input.adapters.is_empty() || input.row_adapters.iter().all(|&a| a == 0) {
            return Ok(Vec::new());
        }
        let registry = self.adapters.as_ref().ok_or_else(|| {
            WorkerError::InvalidRequest("rows carry LoRA adapters, but this worker has no --adapter-dir".into())
        })?;
        Ok(input
            .adapters
            .iter()
            .enumerate()
            .map(|(i, id)| match registry.acquire_identity(id) {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::warn!(adapter = %id.id, error = %e, "adapter failed to load; its rows fail");
                    failed.push(AdapterFailure { slot: i as u32 + 1, message: e.to_string() });
                    None
                }
            })
            .collect())
    }
}
