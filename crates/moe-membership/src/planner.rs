//! The cluster's one planner: routers that rebalance the workers compete for the key
//! `/moe/<cluster>/planner` under a lease, and only the one that created it plans and applies.
//! The key is taken in a transaction that succeeds only when it does not exist, so two routers
//! never hold it at once. The holder keeps its lease alive at TTL/3 and gives up the role
//! (publishes `false`) as soon as a keep-alive fails or is late, well before etcd lets the lease
//! expire and another router take the key; the others wait for the key to disappear.

use crate::etcd::EtcdOptions;
use crate::MembershipError;
use etcd_client::{Compare, CompareOp, EventType, PutOptions, Txn, TxnOp};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The key the planner holds.
pub fn planner_key(cluster: &str) -> String {
    format!("/moe/{cluster}/planner")
}

/// Competes for the planner role as `id` until `cancel` fires, publishing on `holding` whether
/// this process holds it. Connection errors are retried; the role is released on cancellation.
pub async fn hold_planner(
    opts: EtcdOptions,
    id: String,
    ttl: Duration,
    holding: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    let key = planner_key(&opts.cluster);
    let ttl_secs = ttl.as_secs().max(1) as i64;
    let period = Duration::from_millis((ttl_secs as u64 * 1000 / 3).max(100));
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let session = async {
            let mut client = opts.connect().await?;
            let lease = client.lease_grant(ttl_secs, None).await?.id();
            let take = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.as_str(), id.as_str(), Some(PutOptions::new().with_lease(lease)))]);
            if !client.txn(take).await?.succeeded() {
                let _ = client.lease_revoke(lease).await;
                // Someone else plans: wait until the key goes (or a period passes) and try again.
                let mut watch = client.watch(key.as_str(), None).await?;
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(period) => {}
                    m = watch.message() => {
                        if let Ok(Some(m)) = m {
                            if !m.events().iter().any(|e| e.event_type() == EventType::Delete) {
                                tokio::time::sleep(period).await;
                            }
                        }
                    }
                }
                return Ok::<(), MembershipError>(());
            }
            tracing::info!(key = %key, "this router is the planner");
            holding.send_replace(true);
            let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
            let late = || MembershipError::Invalid("the planner lease keep-alive was late".into());
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => {
                        holding.send_replace(false);
                        let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
                        return Ok(());
                    }
                    _ = tokio::time::sleep(period) => {
                        // At most two periods (2/3 of the TTL) pass between a renewal and the
                        // moment this router stops planning: before etcd can free the key.
                        let half = period / 2;
                        tokio::time::timeout(half, keeper.keep_alive()).await.map_err(|_| late())??;
                        match tokio::time::timeout(half, responses.message()).await.map_err(|_| late())?? {
                            Some(r) if r.ttl() > 0 => {}
                            _ => return Err(MembershipError::Invalid("the planner lease was lost".into())),
                        }
                    }
                }
            }
        };
        let result = session.await;
        if *holding.borrow() {
            tracing::warn!("this router is no longer the planner");
        }
        // Whatever ended the session, this process no longer plans.
        holding.send_replace(false);
        if let Err(e) = result {
            tracing::warn!(error = %e, "planner lease: retrying");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
    }
}
