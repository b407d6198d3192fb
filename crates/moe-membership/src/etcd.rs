//! etcd: worker registration with a lease, and the router's watch of the workers prefix. Both
//! loops retry with backoff forever (connection errors are logged, never fatal after start) and
//! stop when their cancellation token fires. Connections send HTTP/2 and TCP keepalives and
//! require a leader, so a blackholed or partitioned etcd member breaks the stream (and the loop
//! starts over on fresh connections) instead of leaving it silent; every wait in the worker's
//! lease loop is bounded; a watch whose revision was compacted reads the prefix again; a
//! worker whose record is deleted while its lease lives puts it back. A worker's session talks
//! to one member and moves to the next on any failure, keeping its lease alive through it (so
//! a member's death or a leader election does not let the record lapse).

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

    /// A client balancing over every endpoint.
    pub(crate) async fn connect(&self) -> Result<Client> {
        self.connect_to(&self.endpoints).await
    }

    /// A client of member `i` (modulo the endpoints) alone: every request of a session then
    /// goes to one member, so a dead one fails the session at once instead of a share of its
    /// requests.
    pub(crate) async fn connect_member(&self, i: usize) -> Result<Client> {
        let n = self.endpoints.len().max(1);
        self.connect_to(&self.endpoints[i % n..(i % n + 1).min(self.endpoints.len())]).await
    }

    async fn connect_to(&self, endpoints: &[String]) -> Result<Client> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true)
            .with_tcp_keepalive(Duration::from_secs(10))
            .with_require_leader(true);
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
        Ok(Client::connect(endpoints, Some(opts)).await?)
    }
}

/// HTTP/2 pings on every etcd connection: a connection that answers none within the timeout is
/// broken, and so is every stream on it.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Refuses a worker whose id is already registered by another live process (another address):
/// two workers with one `--worker-id` would overwrite each other's record. Unreachable etcd is
/// not a refusal (registration retries in the background).
pub async fn check_worker_id(opts: &EtcdOptions, record: &WorkerRecord) -> Result<()> {
    let key = format!("{}{}", opts.prefix(), record.id);
    let found = async {
        let mut client = opts.connect().await?;
        Ok::<_, crate::MembershipError>(client.get(key.as_str(), None).await?)
    };
    let resp = match tokio::time::timeout(Duration::from_secs(5), found).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read etcd to check the worker id; registering anyway");
            return Ok(());
        }
        Err(_) => {
            tracing::warn!("etcd did not answer within 5 s; not checking the worker id");
            return Ok(());
        }
    };
    for kv in resp.kvs() {
        if let Ok(other) = serde_json::from_slice::<WorkerRecord>(kv.value()) {
            if other.address != record.address {
                return Err(crate::MembershipError::Invalid(format!(
                    "a live worker already registered id {:?} at {} (another process with the same --worker-id?); stop it or choose another id",
                    record.id, other.address
                )));
            }
        }
    }
    Ok(())
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
/// TTL/3, registering again whenever the lease or the connection is lost, and putting the
/// record again whenever it changes (the worker's hosted experts did). On cancellation it
/// revokes the lease (the record disappears at once) and returns.
pub async fn register_worker(
    opts: EtcdOptions,
    mut record: watch::Receiver<WorkerRecord>,
    ttl: Duration,
    cancel: CancellationToken,
) {
    let key = format!("{}{}", opts.prefix(), record.borrow().id);
    let encode = |r: &WorkerRecord| match serde_json::to_string(r) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the worker record");
            None
        }
    };
    let Some(mut value) = encode(&record.borrow_and_update()) else { return };
    let ttl_secs = ttl.as_secs().max(1) as i64;
    let period = Duration::from_millis((ttl.as_millis() as u64 / 3).max(100));
    // No wait may outlast the lease: one that does means the connection is gone.
    let bounded = period.max(Duration::from_secs(1));
    let silent = || crate::MembershipError::Invalid("etcd did not answer in time".into());
    let mut attempt = 0u32;
    // The lease of the last session: a new session keeps it alive if it still lives, so a
    // broken connection (a member that died, a leader election) does not let the record lapse.
    let mut held: Option<i64> = None;
    let mut member = 0usize;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let session = async {
            // One member per session, the next one after a failure: a dead member fails the
            // session at once, and the lease of the last session is kept alive through the next
            // member that answers (a new leader renews every lease when elected), so neither a
            // member's death nor an election lets the record lapse. Every wait below is
            // bounded, so a blackholed member ends the session instead of freezing it.
            let connect = opts.connect_member(member);
            let mut client = tokio::time::timeout(bounded, connect).await.map_err(|_| silent())??;
            let mut kept = None;
            if let Some(lease) = held {
                let alive = async {
                    let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
                    keeper.keep_alive().await?;
                    let ttl = responses.message().await?.map_or(0, |r| r.ttl());
                    Ok::<_, crate::MembershipError>((ttl > 0).then_some((keeper, responses)))
                };
                match tokio::time::timeout(bounded, alive).await.map_err(|_| silent())? {
                    Ok(Some(k)) => kept = Some((lease, k)),
                    // Expired: register with a new lease below.
                    Ok(None) | Err(crate::MembershipError::Etcd(etcd_client::Error::LeaseKeepAliveError(_))) => {
                        held = None
                    }
                    // This member cannot answer now: try the next.
                    Err(e) => return Err(e),
                }
            }
            let (lease, (mut keeper, mut responses)) = match kept {
                Some(k) => k,
                None => {
                    let grant = client.lease_grant(ttl_secs, None);
                    let lease = tokio::time::timeout(bounded, grant).await.map_err(|_| silent())??.id();
                    let keep = client.lease_keep_alive(lease);
                    (lease, tokio::time::timeout(bounded, keep).await.map_err(|_| silent())??)
                }
            };
            held = Some(lease);
            let put = client.put(key.as_str(), value.as_str(), Some(PutOptions::new().with_lease(lease)));
            tokio::time::timeout(bounded, put).await.map_err(|_| silent())??;
            tracing::info!(key = %key, lease, "registered in etcd");
            let own = client.watch(key.as_str(), None);
            let mut own = tokio::time::timeout(bounded, own).await.map_err(|_| silent())??;
            // One beat for the whole session: a record put or a watch event must not restart
            // the wait, or a record changing more often than the period never renews the lease.
            let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => {
                        let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
                        tracing::info!(key = %key, "deregistered from etcd");
                        return Ok::<bool, crate::MembershipError>(true);
                    }
                    changed = record.changed() => {
                        if changed.is_err() {
                            // The worker dropped its record: keep the last one until cancelled.
                            cancel.cancelled().await;
                            continue;
                        }
                        let Some(v) = encode(&record.borrow_and_update()) else { continue };
                        value = v;
                        let put = client.put(key.as_str(), value.as_str(), Some(PutOptions::new().with_lease(lease)));
                        tokio::time::timeout(bounded, put).await.map_err(|_| silent())??;
                        tracing::info!(key = %key, "worker record updated (hosted experts changed)");
                    }
                    m = own.message() => {
                        let Some(m) = m? else {
                            return Err(crate::MembershipError::Invalid("the watch of this worker's record ended".into()));
                        };
                        if m.events().iter().any(|e| e.event_type() == EventType::Delete) {
                            tracing::warn!(key = %key, "this worker's record was deleted while its lease lives; putting it back");
                            let put = client.put(key.as_str(), value.as_str(), Some(PutOptions::new().with_lease(lease)));
                            tokio::time::timeout(bounded, put).await.map_err(|_| silent())??;
                        }
                    }
                    _ = beat.tick() => {
                        tokio::time::timeout(bounded, keeper.keep_alive()).await.map_err(|_| silent())??;
                        match tokio::time::timeout(bounded, responses.message()).await.map_err(|_| silent())?? {
                            Some(r) if r.ttl() > 0 => {}
                            _ => {
                                tracing::warn!(key = %key, "lease lost; registering again");
                                held = None;
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
            Err(e) => {
                tracing::warn!(error = %e, member, "etcd registration failed; trying the next member");
                member += 1;
                // The other members at once; after a whole round, a pause (never longer than
                // a keep-alive period, so the lease is tried again before it can expire).
                if !member.is_multiple_of(opts.endpoints.len().max(1)) {
                    continue;
                }
            }
        }
        let delay = Duration::from_millis((100u64 << attempt.min(5)).min(period.as_millis() as u64));
        attempt += 1;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Publishes the live workers of the cluster on `tx`: reads the prefix, then watches from the
/// next revision; after any error it reads the prefix again (so nothing is missed or replayed).
pub async fn watch_workers(opts: EtcdOptions, tx: watch::Sender<Vec<WorkerRecord>>, cancel: CancellationToken) {
    let (map_tx, mut map_rx) = watch::channel(BTreeMap::<String, WorkerRecord>::new());
    let prefix = opts.prefix();
    let forward = async {
        while map_rx.changed().await.is_ok() {
            let live: Vec<WorkerRecord> = map_rx.borrow_and_update().values().cloned().collect();
            tx.send_replace(live);
        }
    };
    tokio::join!(watch_prefix(&opts, &prefix, map_tx, cancel.clone()), forward);
}

/// Publishes the records under `prefix` (key → decoded value) on `tx`: reads the prefix, then
/// watches from the next revision, reading it again after any error. A value that does not
/// decode is logged and left out. Returns when `cancel` fires.
pub(crate) async fn watch_prefix<T: serde::de::DeserializeOwned + Clone + Send + Sync + 'static>(
    opts: &EtcdOptions,
    prefix: &str,
    tx: watch::Sender<BTreeMap<String, T>>,
    cancel: CancellationToken,
) {
    let mut attempt = 0u32;
    loop {
        // Set once this session's watch is open: its later failure starts the backoff afresh
        // (a watch that ran for hours must not wait as long as the tenth failure in a row).
        let mut established = false;
        let session = async {
            let mut client = opts.connect().await?;
            let resp = client.get(prefix, Some(GetOptions::new().with_prefix())).await?;
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            let mut live: BTreeMap<String, T> = BTreeMap::new();
            for kv in resp.kvs() {
                if let (Ok(k), Ok(rec)) = (kv.key_str(), serde_json::from_slice::<T>(kv.value())) {
                    live.insert(k.to_string(), rec);
                }
            }
            let mut stream =
                client.watch(prefix, Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1))).await?;
            // The snapshot goes out only once the watch is open, so a change between the read
            // and the watch cannot be missed.
            tx.send_replace(live.clone());
            established = true;
            loop {
                let msg = tokio::select! {
                    _ = cancel.cancelled() => return Ok::<(), crate::MembershipError>(()),
                    m = stream.message() => m?,
                };
                let Some(msg) = msg else {
                    return Err(crate::MembershipError::Invalid("watch stream ended".into()));
                };
                if msg.compact_revision() > 0 {
                    return Err(crate::MembershipError::Invalid(format!(
                        "the watch's revision was compacted (at {})",
                        msg.compact_revision()
                    )));
                }
                if msg.canceled() {
                    let why = msg.cancel_reason().to_string();
                    return Err(crate::MembershipError::Invalid(format!("watch canceled by etcd: {why}")));
                }
                for ev in msg.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let Ok(k) = kv.key_str() else { continue };
                    match ev.event_type() {
                        EventType::Put => match serde_json::from_slice::<T>(kv.value()) {
                            Ok(rec) => {
                                live.insert(k.to_string(), rec);
                            }
                            Err(e) => tracing::warn!(key = %k, error = %e, "ignoring a malformed record"),
                        },
                        EventType::Delete => {
                            live.remove(k);
                        }
                    }
                }
                tx.send_replace(live.clone());
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = session => match r {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "etcd watch failed; reading the prefix again"),
            },
        }
        if established {
            attempt = 0;
        }
        if !backoff(&mut attempt, &cancel).await {
            return;
        }
    }
}
