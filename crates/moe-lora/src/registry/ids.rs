//! What an adapter id and its path under the adapter dir may be.

use crate::error::{LoraError, Result};
use std::path::{Component, Path};

/// Checks an adapter id: 1–128 characters of `A-Z a-z 0-9 . _ -`, not starting with `.`.
pub fn validate_id(id: &str) -> Result<()> {
    let bad = |why: &str| Err(LoraError::InvalidId { id: id.chars().take(140).collect(), why: why.into() });
    if id.is_empty() || id.len() > 128 {
        return bad("must be 1 to 128 characters");
    }
    if id.starts_with('.') {
        return bad("must not start with '.'");
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// Checks a path under the adapter dir: relative, each part a valid id (so no `..`, no `/`
/// at the start, nothing hidden).
pub fn validate_rel_path(path: &str) -> Result<()> {
    let bad = |why: &str| Err(LoraError::InvalidId { id: path.chars().take(140).collect(), why: why.into() });
    if path.is_empty() || path.len() > 512 {
        return bad("the path must be 1 to 512 characters");
    }
    for c in Path::new(path).components() {
        match c {
            Component::Normal(p) => validate_id(p.to_str().unwrap_or("\u{0}")).map_err(|_| LoraError::InvalidId {
                id: path.into(),
                why: format!("path part {p:?} is not allowed"),
            })?,
            _ => return bad("must be a relative path inside the adapter dir (no '..', no leading '/')"),
        }
    }
    Ok(())
}
