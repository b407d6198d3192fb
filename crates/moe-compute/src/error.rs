//! Errors of the compute backends.

/// What a backend can refuse.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error("matrix of {rows}x{cols} needs {expected} values, got {got}")]
    MatrixSize { rows: usize, cols: usize, expected: usize, got: usize },
    #[error("token id {id} is outside the embedding table of {rows} rows")]
    IdOutOfRange { id: u32, rows: usize },
    #[error("KV page {page} does not exist (the store has {num_pages} pages)")]
    BadPage { page: u32, num_pages: usize },
    #[error("sequence needs {needed} KV slots but its pages hold {have}")]
    PagesTooFew { needed: usize, have: usize },
    #[error("recurrent state slot {slot} does not exist (the store has {slots})")]
    BadStateSlot { slot: u32, slots: usize },
    #[error("linear attention: {0}")]
    LinearAttention(String),
    #[error("KV store of {bytes} bytes could not be allocated")]
    KvAlloc { bytes: usize },
    #[error("invalid device {0:?}: use cpu or cuda:N")]
    BadDevice(String),
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("{0}")]
    CpuKernels(String),
    #[error("the {backend} backend does not implement {op} yet")]
    Unsupported { op: &'static str, backend: String },
}

pub type Result<T> = std::result::Result<T, ComputeError>;
