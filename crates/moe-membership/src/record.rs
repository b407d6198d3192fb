//! The record a worker publishes, and the in-memory registry.

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    /// Where routers reach its ExpertWorker service (host:port).
    pub address: String,
    /// (layer, expert ids) it hosts.
    pub experts: Vec<(u32, Vec<u32>)>,
    pub device: String,
    pub fingerprint: String,
    pub version: String,
    /// The arithmetic its experts are computed with (`Backend::numerics`); empty in records of
    /// workers from before it was announced.
    #[serde(default)]
    pub numerics: String,
}

/// Live workers known without etcd (the embedded cluster, tests).
#[derive(Clone)]
pub struct InMemoryMembership {
    tx: watch::Sender<Vec<WorkerRecord>>,
}

impl Default for InMemoryMembership {
    fn default() -> Self {
        Self { tx: watch::channel(Vec::new()).0 }
    }
}

impl InMemoryMembership {
    pub fn subscribe(&self) -> watch::Receiver<Vec<WorkerRecord>> {
        self.tx.subscribe()
    }

    /// Adds or replaces a worker by id.
    pub fn upsert(&self, record: WorkerRecord) {
        self.tx.send_modify(|v| {
            v.retain(|r| r.id != record.id);
            v.push(record);
            v.sort_by(|a, b| a.id.cmp(&b.id));
        });
    }

    pub fn remove(&self, id: &str) {
        self.tx.send_modify(|v| v.retain(|r| r.id != id));
    }
}
