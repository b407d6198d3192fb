//! Errors of generation.

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] moe_model::ModelError),
    #[error("{path}: cannot load tokenizer: {message}")]
    Tokenizer { path: std::path::PathBuf, message: String },
    #[error("the model directory has no tokenizer.json, so text prompts cannot be used; pass token ids instead")]
    NoTokenizer,
    #[error("tokenizing failed: {0}")]
    Encode(String),
    #[error("invalid sampling parameter: {0}")]
    Sampling(String),
}

pub type Result<T> = std::result::Result<T, GenerateError>;
