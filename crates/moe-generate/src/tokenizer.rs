//! Text to token ids and back, through `tokenizer.json` when the model directory has one.

use crate::error::{GenerateError, Result};
use std::path::Path;
use tokenizers::Tokenizer;

/// The model's tokenizer, or none (token ids only).
pub struct TextCodec {
    tokenizer: Option<Tokenizer>,
    /// The tokens as the output constraints see them, built at the first constrained request.
    grammars: std::sync::OnceLock<std::result::Result<moe_constrain::Grammars, String>>,
}

impl TextCodec {
    /// Loads `<dir>/tokenizer.json` if it exists.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(Self { tokenizer: None, grammars: Default::default() });
        }
        let tokenizer =
            Tokenizer::from_file(&path).map_err(|e| GenerateError::Tokenizer { path, message: e.to_string() })?;
        Ok(Self { tokenizer: Some(tokenizer), grammars: Default::default() })
    }

    /// What output constraints compile against, for a model of `vocab_size` logits ending text
    /// with `eos` (built once, on first use: a trie of every token).
    pub fn grammars(&self, vocab_size: usize, eos: u32) -> std::result::Result<&moe_constrain::Grammars, String> {
        let built = self.grammars.get_or_init(|| {
            let t = self.tokenizer.as_ref().ok_or_else(|| moe_constrain::ConstrainError::NoTokenizer.to_string())?;
            let json = t.to_string(false).map_err(|e| e.to_string())?;
            moe_constrain::Grammars::from_tokenizer_json(&json, vocab_size, eos).map_err(|e| e.to_string())
        });
        built.as_ref().map_err(Clone::clone)
    }

    /// The id of a token spelled `text` in the vocabulary (special tokens included).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.tokenizer.as_ref()?.token_to_id(text)
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
