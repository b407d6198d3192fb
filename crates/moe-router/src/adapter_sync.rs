//! Adapters an operator loads or unloads through one router, applied on every router of the
//! cluster. The router's service reports its admin changes to an [`AdapterSync`] (etcd in a
//! cluster, nothing on a single router); [`follow_published`] applies the published set to this
//! router's registry: loads what appeared or moved, unloads what was withdrawn (retrying while
//! running requests still hold it).

use moe_lora::{AdapterCatalog, LoraError};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A publish or withdrawal in flight; its error says why the other routers were not told.
pub type SyncFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Where a router announces its admin adapter changes.
pub trait AdapterSync: Send + Sync {
    /// Adapter `id` was loaded from `path` (relative to the adapter dir).
    fn loaded(&self, id: &str, path: &str) -> SyncFuture;
    /// Adapter `id` was unloaded.
    fn unloaded(&self, id: &str) -> SyncFuture;
}

/// How often an unload refused because requests still hold the adapter is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// Applies the published adapters (id → path) to `catalog` until `published`'s sender goes:
/// the first snapshot loads everything published before this router started.
pub async fn follow_published(
    catalog: Arc<dyn AdapterCatalog>,
    mut published: watch::Receiver<BTreeMap<String, String>>,
) {
    let mut applied: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let want = published.borrow_and_update().clone();
        for (id, path) in &want {
            if applied.get(id) == Some(path) {
                continue;
            }
            let (c, i, p) = (catalog.clone(), id.clone(), path.clone());
            match tokio::task::spawn_blocking(move || c.load(&i, &p)).await {
                Ok(Ok(_)) => {
                    tracing::info!(adapter = %id, path = %path, "loaded an adapter published by another router")
                }
                Ok(Err(e)) => tracing::warn!(adapter = %id, error = %e, "cannot load a published adapter here"),
                Err(e) => tracing::warn!(adapter = %id, error = %e, "adapter load task failed"),
            }
            // A failure is not retried until the record changes: the next use loads it lazily.
            applied.insert(id.clone(), path.clone());
        }
        let withdrawn: Vec<String> = applied.keys().filter(|id| !want.contains_key(*id)).cloned().collect();
        let mut held = false;
        for id in withdrawn {
            match catalog.unload(&id) {
                Ok(()) | Err(LoraError::NotFound { .. }) => {
                    tracing::info!(adapter = %id, "unloaded an adapter withdrawn by another router");
                    applied.remove(&id);
                }
                Err(LoraError::InUse { requests, .. }) => {
                    tracing::debug!(adapter = %id, requests, "a withdrawn adapter is still in use; unloading it later");
                    held = true;
                }
                Err(e) => {
                    tracing::warn!(adapter = %id, error = %e, "cannot unload a withdrawn adapter");
                    applied.remove(&id);
                }
            }
        }
        let changed = if held {
            tokio::select! {
                c = published.changed() => c,
                _ = tokio::time::sleep(RETRY) => Ok(()),
            }
        } else {
            published.changed().await
        };
        if changed.is_err() {
            return;
        }
    }
}
