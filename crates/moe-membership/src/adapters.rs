//! Adapters loaded by an operator, shared by every router of a cluster through etcd: a
//! `LoadAdapter` on one router publishes `/moe/<cluster>/adapters/<id>` (the id's path under the
//! adapter dir), an `UnloadAdapter` deletes it, and every router watches the prefix and applies
//! it to its own registry (a router that starts later loads what is published). Records carry no
//! lease: they are the operator's intent and outlive any router.

use crate::etcd::{watch_prefix, EtcdOptions};
use crate::{MembershipError, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One published adapter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterRecord {
    pub id: String,
    /// The directory under the adapter dir (relative).
    pub path: String,
}

fn prefix(opts: &EtcdOptions) -> String {
    format!("/moe/{}/adapters/", opts.cluster)
}

/// How long a publish or withdrawal may take before it is reported as failed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(WRITE_TIMEOUT, f)
        .await
        .map_err(|_| MembershipError::Invalid(format!("etcd did not answer the {what} within {WRITE_TIMEOUT:?}")))?
}

/// Publishes `record` to every router of the cluster.
pub async fn publish_adapter(opts: &EtcdOptions, record: &AdapterRecord) -> Result<()> {
    let value = serde_json::to_string(record).map_err(|e| MembershipError::Invalid(e.to_string()))?;
    let key = format!("{}{}", prefix(opts), record.id);
    bounded("adapter publish", async {
        opts.connect().await?.put(key, value, None).await?;
        Ok(())
    })
    .await
}

/// Withdraws adapter `id` from every router of the cluster.
pub async fn withdraw_adapter(opts: &EtcdOptions, id: &str) -> Result<()> {
    let key = format!("{}{id}", prefix(opts));
    bounded("adapter withdrawal", async {
        opts.connect().await?.delete(key, None).await?;
        Ok(())
    })
    .await
}

/// Publishes the cluster's adapters (id → path) on `tx` until `cancel` fires.
pub async fn watch_adapters(opts: EtcdOptions, tx: watch::Sender<BTreeMap<String, String>>, cancel: CancellationToken) {
    let p = prefix(&opts);
    let (keyed_tx, mut keyed_rx) = watch::channel(BTreeMap::<String, AdapterRecord>::new());
    let forward = async {
        while keyed_rx.changed().await.is_ok() {
            let by_id = keyed_rx.borrow_and_update().values().map(|r| (r.id.clone(), r.path.clone())).collect();
            tx.send_replace(by_id);
        }
    };
    tokio::join!(watch_prefix(&opts, &p, keyed_tx, cancel), forward);
}
