//! Errors of expert dispatch.

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DispatchError {
    #[error("worker {worker}: unavailable: {message}")]
    Unavailable { worker: String, message: String },
    #[error("worker {worker}: no answer within {millis} ms")]
    Deadline { worker: String, millis: u64 },
    #[error("worker {worker} rejected the request: {message}")]
    Rejected { worker: String, message: String },
    /// The worker answered something that does not fit what was asked (row count, adapter slot,
    /// wire dtype, undecodable rows): treated as that worker's failure, its rows go to a replica.
    #[error("worker {worker} sent a malformed answer: {message}")]
    Malformed { worker: String, message: String },
    #[error("layer {layer} expert {expert} has no worker holding it")]
    NoHolder { layer: usize, expert: u32 },
    #[error("placement: {0}")]
    Placement(String),
}

pub type Result<T> = std::result::Result<T, DispatchError>;
