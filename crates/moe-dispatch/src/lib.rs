//! `moe-dispatch` owns the router's side of the expert hop: where each (layer, expert) lives
//! ([`Placement`]), grouping one MoE layer's rows into one batch per worker (each token's row sent
//! to a worker once, however many of its experts live there), and the transports that run those
//! batches: [`InProcessTransport`] (direct calls into [`moe_worker::ExpertHost`]) and
//! [`GrpcTransport`] (one long-lived `ComputeStream` per worker, workers in parallel, deadlines).
//! Both sit behind the narrow [`WorkerTransport`] trait, so a faster data plane can slot in.

mod dispatcher;
mod error;
mod grpc;
mod in_process;
mod placement;

pub use dispatcher::{BatchOutput, CallResult, Dispatcher, InFlightCall, WorkerBatch, WorkerTransport, SUSPECT_FOR};
pub use error::{DispatchError, Result};
pub use grpc::{GrpcTransport, GrpcTransportConfig, TransportTls};
pub use in_process::InProcessTransport;
pub use placement::Placement;
