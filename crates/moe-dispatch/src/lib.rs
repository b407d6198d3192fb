//! `moe-dispatch` owns the router's side of the expert hop: where each (layer, expert) lives
//! ([`Placement`]), grouping one MoE layer's rows into one batch per worker (each token's row sent
//! to a worker once, however many of its experts live there), failover to replicas, following
//! membership ([`MembershipDispatcher`]), and the transports that run those batches:
//! [`InProcessTransport`] (direct calls into [`moe_worker::ExpertCompute`] hosts) and
//! [`GrpcTransport`] (one long-lived `ComputeStream` per worker, workers in parallel, deadlines).
//! Both sit behind the narrow [`WorkerTransport`] trait, so a faster data plane can slot in.
//!
//! The chain one layer's expert call takes: the model's [`moe_model::ExpertExecutor`] is a
//! [`Dispatcher`] (or a [`MembershipDispatcher`] that holds the current one); `executor.rs` moves
//! the rows off the backend, `dispatcher.rs` groups them per worker and collects the answers,
//! `combine.rs` adds each row's (row, expert) results in ascending expert order (so placement,
//! replicas and failover never change a bit), and a transport carries them.

mod combine;
mod dispatcher;
mod error;
mod executor;
mod grpc;
mod health;
mod in_process;
mod latency;
mod membership;
mod placement;
mod transport;
mod worker_metrics;

pub use dispatcher::{Dispatcher, SUSPECT_FOR};
pub use error::{DispatchError, Result};
pub use grpc::{address_problem, connect_worker, GrpcTransport, GrpcTransportConfig, TransportTls};
pub use in_process::InProcessTransport;
pub use latency::Hedging;
pub use membership::{follow_membership, plan_membership, MembershipDispatcher, MembershipPlan, MembershipStatus};
pub use placement::Placement;
pub use transport::{BatchOutput, CallResult, InFlightCall, WorkerBatch, WorkerTransport};
