//! `moe-worker` owns the expert side of the cluster: which experts a worker hosts
//! ([`ExpertSpec`]), loading only their tensors, computing the grouped SwiGLU FFN of the rows a
//! router sends and combining them with the router's weights ([`ExpertHost`]), and serving that
//! as the `ExpertWorker` gRPC service; experts can be loaded and unloaded while it serves
//! ([`live`]). A worker is stateless between messages. It does not
//! route, batch requests or hold a KV cache.

mod error;
mod host;
pub mod live;
mod resolve;
mod service;
mod spec;

pub use error::{Result, WorkerError};
pub use host::DrainLimits;
pub use host::{AdapterFailure, ComputeInput, ExpertCompute, ExpertHost, HostedList, WorkerAdapters};
pub use service::{serve_worker, serve_worker_with, ExpertWorkerService, WorkerTls};
pub use spec::ExpertSpec;
