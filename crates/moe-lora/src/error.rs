//! Errors of adapter loading and residency; each names the adapter, module, file or limit.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("invalid adapter id {id:?}: {why}")]
    InvalidId { id: String, why: String },
    #[error("adapter {id:?} not found: {why}")]
    NotFound { id: String, why: String },
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: invalid adapter_config.json: {message}")]
    Config { path: PathBuf, message: String },
    #[error("adapter {adapter:?}: {message}")]
    Unsupported { adapter: String, message: String },
    #[error("adapter {adapter:?}: module {module}: {message}")]
    Module { adapter: String, module: String, message: String },
    #[error("adapter {adapter:?}: {source}")]
    Checkpoint { adapter: String, source: moe_model::ModelError },
    #[error("no adapter store is configured (start the server with --adapter-dir)")]
    NoStore,
    #[error("adapter capacity exhausted: {0}")]
    Capacity(String),
    #[error("adapter {id:?} is in use by {requests} running request(s); unload it when they finish")]
    InUse { id: String, requests: usize },
    #[error("adapter {id:?} changed: expected digest {expected}, the store holds {got}")]
    DigestMismatch { id: String, expected: String, got: String },
    #[error(transparent)]
    Compute(#[from] moe_compute::ComputeError),
}

pub type Result<T> = std::result::Result<T, LoraError>;
