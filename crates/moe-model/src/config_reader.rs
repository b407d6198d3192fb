//! A typed reader of `config.json` values with errors that name the file and the key.

use crate::error::{ModelError, Result};
use serde_json::Value;
use std::path::Path;

pub(crate) struct Reader<'a> {
    pub path: &'a Path,
    pub v: &'a Value,
}

impl Reader<'_> {
    pub(crate) fn err(&self, message: String) -> ModelError {
        ModelError::Config { path: self.path.to_path_buf(), message }
    }
    pub(crate) fn present(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }
    pub(crate) fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(format!("`{key}` must be a non-negative integer, got {v}"))),
        }
    }
    pub(crate) fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| self.err(format!("`{key}` is missing")))
    }
    pub(crate) fn positive(&self, key: &str) -> Result<usize> {
        let n = self.usize_req(key)?;
        if n == 0 {
            return Err(self.err(format!("`{key}` must be positive, got 0")));
        }
        Ok(n)
    }
    pub(crate) fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(format!("`{key}` must be a number, got {v}"))),
        }
    }
    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(format!("`{key}` must be true or false, got {v}"))),
        }
    }
    pub(crate) fn ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = || self.err(format!("`{key}` must be a token id or a list of token ids"));
        match self.present(key) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => {
                items.iter().map(|i| i.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad)).collect()
            }
            Some(v) => Ok(vec![v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad)?]),
        }
    }
}
