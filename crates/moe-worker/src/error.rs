//! Errors of the expert worker, and their gRPC codes.

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Model(#[from] moe_model::ModelError),
    #[error("invalid expert spec {spec:?}: {message}")]
    Spec { spec: String, message: String },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("layer {layer} is not a layer with experts (the model has {num_layers} layers)")]
    UnknownLayer { layer: usize, num_layers: usize },
    #[error("expert {expert} of layer {layer} is not hosted by this worker")]
    NotHosted { layer: usize, expert: u32 },
    #[error(transparent)]
    Adapter(#[from] moe_lora::LoraError),
    #[error("compute task failed: {0}")]
    Internal(String),
    /// The request needs more memory than this worker may use for one batch.
    #[error("{0}")]
    ResourceExhausted(String),
}

pub type Result<T> = std::result::Result<T, WorkerError>;

impl WorkerError {
    pub fn code(&self) -> tonic::Code {
        match self {
            WorkerError::InvalidRequest(_) | WorkerError::UnknownLayer { .. } | WorkerError::NotHosted { .. } => {
                tonic::Code::InvalidArgument
            }
            WorkerError::Spec { .. } => tonic::Code::InvalidArgument,
            WorkerError::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            WorkerError::Adapter(e) => match e {
                moe_lora::LoraError::InvalidId { .. } => tonic::Code::InvalidArgument,
                moe_lora::LoraError::NotFound { .. } => tonic::Code::NotFound,
                moe_lora::LoraError::Capacity(_) => tonic::Code::ResourceExhausted,
                _ => tonic::Code::FailedPrecondition,
            },
            WorkerError::Model(_) | WorkerError::Internal(_) => tonic::Code::Internal,
        }
    }
}

impl From<WorkerError> for tonic::Status {
    fn from(e: WorkerError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}
