//! Router errors and their one mapping to gRPC status codes.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum RouterError {
    #[error("{field}: {message}")]
    InvalidArgument { field: &'static str, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// Over a rate budget: RESOURCE_EXHAUSTED with when to retry (HTTP 429 with Retry-After).
    #[error("{message}; retry in {} s", retry_after.as_secs_f64().ceil())]
    RateLimited { message: String, retry_after: std::time::Duration },
    #[error("{0}")]
    Unavailable(String),
    #[error("deadline exceeded after {millis} ms")]
    DeadlineExceeded { millis: u64 },
    #[error("internal error: {0}")]
    Internal(String),
}

impl RouterError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        RouterError::InvalidArgument { field, message: message.into() }
    }

    pub fn code(&self) -> Code {
        match self {
            RouterError::InvalidArgument { .. } => Code::InvalidArgument,
            RouterError::NotFound(_) => Code::NotFound,
            RouterError::Unauthenticated(_) => Code::Unauthenticated,
            RouterError::PermissionDenied(_) => Code::PermissionDenied,
            RouterError::FailedPrecondition(_) => Code::FailedPrecondition,
            RouterError::ResourceExhausted(_) | RouterError::RateLimited { .. } => Code::ResourceExhausted,
            RouterError::Unavailable(_) => Code::Unavailable,
            RouterError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            RouterError::Internal(_) => Code::Internal,
        }
    }
}

impl RouterError {
    /// When the caller may retry, for errors that say (a spent token budget).
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            RouterError::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

impl From<RouterError> for Status {
    fn from(e: RouterError) -> Self {
        let mut status = Status::new(e.code(), e.to_string());
        if let Some(wait) = e.retry_after() {
            // Whole seconds, as HTTP's Retry-After; clients that read gRPC metadata find it here.
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = secs.to_string().parse() {
                status.metadata_mut().insert("retry-after", v);
            }
        }
        status
    }
}

/// Maps a model error met while serving to a router error: missing experts are the cluster's
/// fault (UNAVAILABLE); input problems are the caller's (INVALID_ARGUMENT).
impl From<moe_model::ModelError> for RouterError {
    fn from(e: moe_model::ModelError) -> Self {
        use moe_model::ModelError as M;
        match e {
            M::Experts { .. } => RouterError::Unavailable(e.to_string()),
            M::TokenOutOfRange { .. } => RouterError::invalid("prompt", e.to_string()),
            M::EmptyPrompt => RouterError::invalid("prompt", e.to_string()),
            M::TooLong { .. } => RouterError::invalid("prompt", e.to_string()),
            M::KvCacheFull { .. } | M::NoStateSlot => RouterError::ResourceExhausted(e.to_string()),
            other => RouterError::Internal(other.to_string()),
        }
    }
}

/// Adapter errors: the caller's (bad id or adapter: INVALID_ARGUMENT; unknown: NOT_FOUND), the
/// limits' (RESOURCE_EXHAUSTED), or a conflict (in use: FAILED_PRECONDITION).
impl From<moe_lora::LoraError> for RouterError {
    fn from(e: moe_lora::LoraError) -> Self {
        use moe_lora::LoraError as L;
        match e {
            L::InvalidId { .. }
            | L::Config { .. }
            | L::Unsupported { .. }
            | L::Module { .. }
            | L::Checkpoint { .. } => RouterError::invalid("adapter_id", e.to_string()),
            L::NotFound { .. } | L::NoStore => RouterError::NotFound(e.to_string()),
            L::Io { ref error, .. } if error.kind() == std::io::ErrorKind::NotFound => {
                RouterError::NotFound(e.to_string())
            }
            L::Capacity(_) => RouterError::ResourceExhausted(e.to_string()),
            L::InUse { .. } => RouterError::FailedPrecondition(e.to_string()),
            L::Io { .. } | L::DigestMismatch { .. } | L::Compute(_) => RouterError::Internal(e.to_string()),
        }
    }
}
