//! etcd: worker registration with a lease, and the router's watch of the workers prefix. Both
//! loops retry with backoff forever (connection errors are logged, never fatal after start) and
//! stop when their cancellation token fires.

use crate::record::WorkerRecord;
use crate::Result;
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub cluster: String,
    pub user: Option<String>,
    pub password: Option<String>,
    /// PEM file of the CA that signed etcd's certificate (https endpoints).
    pub ca_file: Option<std::path::PathBuf>,
}

impl EtcdOptions {
    pub fn prefix(&self) -> String {
        format!("/moe/{}/workers/", self.cluster)
    }

    async fn connect(&self) -> Result<Client> {
        let mut opts =
            ConnectOptions::new().with_connect_timeout(Duration::from_secs(3)).with_timeout(Duration::from_secs(5));
        if let (Some(u), Some(p)) = (&self.user, &self.password) {
            opts = opts.with_user(u.clone(), p.clone());
        }
        if let Some(ca) = &self.ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                crate::MembershipError::Invalid(format!("cannot read the etcd CA file {}: {e}", ca.display()))
            })?;
            opts =
                opts.with_tls(etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(pem)));
        }
        Ok(Client::connect(&self.endpoints, Some(opts)).await?)
    }
}

async fn backoff(attempt: &mut u32, cancel: &CancellationToken) -> bool {
    let delay = Duration::from_millis((100u64 << (*attempt).min(5)).min(3000));
    *attempt += 1;
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Keeps `record` registered under the cluster prefix with a lease of `ttl`, kept alive at
/// TTL/3, registering again whenever the lease or the connection is lost. On cancellation it
/// revokes the lease (the record disappears at once) and returns.
pub async fn register_worker(opts: EtcdOptions, record: WorkerRecord, ttl: Duration, cancel: CancellationToken) {
    let key = format!("{}{}", opts.prefix(), record.id);
    let value = match serde_json::to_string(&record) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the worker record");
            return;
        }
    };
    let ttl_secs = ttl.as_secs().max(1) as i64;
    let mut attempt = 0u32;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let session = async {
            let mut client = opts.connect().await?;
            let lease = client.lease_grant(ttl_secs, None).await?.id();
            client.put(key.as_str(), value.as_str(), Some(PutOptions::new().with_lease(lease))).await?;
            tracing::info!(key = %key, lease, "registered in etcd");
            let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
            let period = Duration::from_millis((ttl.as_millis() as u64 / 3).max(100));
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => {
                        let _ = client.lease_revoke(lease).await;
                        tracing::info!(key = %key, "deregistered from etcd");
                        return Ok::<bool, crate::MembershipError>(true);
                    }
                    _ = tokio::time::sleep(period) => {
                        keeper.keep_alive().await?;
                        match responses.message().await? {
                            Some(r) if r.ttl() > 0 => {}
                            _ => {
                                tracing::warn!(key = %key, "lease lost; registering again");
                                return Ok(false);
                            }
                        }
                    }
                }
            }
        };
        match session.await {
            Ok(true) => return,
            Ok(false) => attempt = 0,
            Err(e) => tracing::warn!(error = %e, "etcd registration failed; retrying"),
        }
        if !backoff(&mut attempt, &cancel).await {
            return;
        }
    }
}

/// Publishes the live workers of the cluster on `tx`: reads the prefix, then watches from the
/// next revision; after any error it reads the prefix again (so nothing is missed or replayed).
pub async fn watch_workers(opts: EtcdOptions, tx: watch::Sender<Vec<WorkerRecord>>, cancel: CancellationToken) {
    let prefix = opts.prefix();
    let mut attempt = 0u32;
    loop {
        let session = async {
            let mut client = opts.connect().await?;
            let resp = client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())).await?;
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            let mut live: BTreeMap<String, WorkerRecord> = BTreeMap::new();
            for kv in resp.kvs() {
                if let (Ok(k), Ok(rec)) = (kv.key_str(), serde_json::from_slice::<WorkerRecord>(kv.value())) {
                    live.insert(k.to_string(), rec);
                }
            }
            tx.send_replace(live.values().cloned().collect());
            let mut stream = client
                .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1)))
                .await?;
            loop {
                let msg = tokio::select! {
                    _ = cancel.cancelled() => return Ok::<(), crate::MembershipError>(()),
                    m = stream.message() => m?,
                };
                let Some(msg) = msg else {
                    return Err(crate::MembershipError::Invalid("watch stream ended".into()));
                };
                if msg.canceled() {
                    return Err(crate::MembershipError::Invalid("watch canceled by etcd".into()));
                }
                for ev in msg.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let Ok(k) = kv.key_str() else { continue };
                    match ev.event_type() {
                        EventType::Put => match serde_json::from_slice::<WorkerRecord>(kv.value()) {
                            Ok(rec) => {
                                live.insert(k.to_string(), rec);
                            }
                            Err(e) => tracing::warn!(key = %k, error = %e, "ignoring a malformed worker record"),
                        },
                        EventType::Delete => {
                            live.remove(k);
                        }
                    }
                }
                tx.send_replace(live.values().cloned().collect());
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = session => match r {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "etcd watch failed; reading the prefix again"),
            },
        }
        if !backoff(&mut attempt, &cancel).await {
            return;
        }
    }
}
