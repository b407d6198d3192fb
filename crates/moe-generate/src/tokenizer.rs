//! Text to token ids and back, through `tokenizer.json` when the model directory has one.

use crate::error::{GenerateError, Result};
use std::path::Path;
use tokenizers::Tokenizer;

/// The model's tokenizer, or none (token ids only).
pub struct TextCodec {
    tokenizer: Option<Tokenizer>,
}

impl TextCodec {
    /// Loads `<dir>/tokenizer.json` if it exists.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(Self { tokenizer: None });
        }
        let tokenizer =
            Tokenizer::from_file(&path).map_err(|e| GenerateError::Tokenizer { path, message: e.to_string() })?;
        Ok(Self { tokenizer: Some(tokenizer) })
    }

    pub fn has_tokenizer(&self) -> bool {
        self.tokenizer.is_some()
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let t = self.tokenizer.as_ref().ok_or(GenerateError::NoTokenizer)?;
        let enc = t.encode(text, true).map_err(|e| GenerateError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, skipping special tokens; without a tokenizer, returns an empty string.
    pub fn decode(&self, ids: &[u32]) -> String {
        match &self.tokenizer {
            Some(t) => t.decode(ids, true).unwrap_or_default(),
            None => String::new(),
        }
    }
}
