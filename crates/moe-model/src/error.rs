//! Errors of model loading and running; each names the file, tensor or value at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: unsupported architecture {got:?}; supported: {supported}")]
    UnsupportedArchitecture { path: PathBuf, got: String, supported: String },
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: invalid shard index: {message}")]
    ShardIndex { path: PathBuf, message: String },
    #[error("tensor {name:?} is missing from the checkpoint in {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    #[error("{path}: tensor {name:?} has shape {got:?}, but the config needs {expected:?}")]
    ShapeMismatch { path: PathBuf, name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("{path}: tensor {name:?} has dtype {dtype}, which is not supported (use F32, BF16, F16 or block-scaled F8_E4M3)")]
    UnsupportedDtype { path: PathBuf, name: String, dtype: String },
    #[error("token id {id} at position {position} is out of range: vocab_size is {vocab_size}")]
    TokenOutOfRange { id: u32, position: usize, vocab_size: usize },
    #[error("the prompt is empty: at least one token is needed")]
    EmptyPrompt,
    #[error("sequence of {len} tokens exceeds max_position_embeddings = {max}")]
    TooLong { len: usize, max: usize },
    #[error("the KV cache is full: {needed} more pages needed, {free} free")]
    KvCacheFull { needed: usize, free: usize },
    #[error("every recurrent state slot is in use (one pair per running sequence of a hybrid model)")]
    NoStateSlot,
    #[error("layer {layer}: experts unavailable: {message}")]
    Experts { layer: usize, message: String },
    #[error("{architecture} needs {feature}, which the {backend} backend does not implement yet; use --device cpu")]
    BackendLacks { architecture: &'static str, feature: &'static str, backend: String },
    #[error("quantization {method:?} is not supported: block-scaled fp8 (any architecture) and mxfp4 (gpt-oss) are; dequantize to bf16 first")]
    UnsupportedQuantization { method: String },
    #[error(transparent)]
    Compute(#[from] moe_compute::ComputeError),
}

pub type Result<T> = std::result::Result<T, ModelError>;
