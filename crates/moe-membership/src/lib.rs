//! `moe-membership` owns who is in the cluster: the [`WorkerRecord`] a worker publishes (id,
//! address, hosted experts, device, model fingerprint, version), an in-memory registry for the
//! embedded cluster, and etcd: workers register under `/moe/<cluster>/workers/<id>` with a lease
//! kept alive at TTL/3 and re-register by themselves when it is lost; routers read the prefix,
//! then watch from the next revision, starting over after any error. Either way, a router sees
//! the live set as a `tokio::sync::watch` of snapshots. A lease is a liveness hint only: the
//! request path detects dead workers by its own deadlines. Adapters an operator loads through
//! one router are published under `/moe/<cluster>/adapters/` for all routers to apply. Routers
//! that rebalance the workers elect one planner through a leased key ([`hold_planner`]).

mod adapters;
mod etcd;
mod planner;
mod record;

pub use adapters::{publish_adapter, watch_adapters, withdraw_adapter, AdapterRecord};
pub use etcd::{check_worker_id, register_worker, watch_workers, EtcdOptions};
pub use planner::{hold_planner, planner_key};
pub use record::{InMemoryMembership, WorkerRecord};

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, MembershipError>;
