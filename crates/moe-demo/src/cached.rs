//! Demo checkpoints written once to the temp directory and reused by later runs: the benchmark
//! models (named by this version) and the trained demo model (named by its fingerprint). Each is
//! written to a staging directory and renamed into place, so concurrent first runs never see half
//! a checkpoint.

use crate::{write_demo_model, DemoSpec, Result};
use std::path::{Path, PathBuf};

/// Writes with `write` into a staging directory and renames it to `dir` (another process that
/// won the race wrote the same files).
fn write_once(dir: &Path, staging: &str, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let staging = std::env::temp_dir().join(format!("{staging}-{}", std::process::id()));
    write(&staging)?;
    if std::fs::rename(&staging, dir).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok(())
}

/// A generated checkpoint under the temp dir, named `moe-<name>-v<version>`, written on first use.
pub fn cached_model_dir(name: &str, spec: &DemoSpec) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("moe-{name}-v{}", env!("CARGO_PKG_VERSION")));
    if !dir.join("config.json").exists() {
        eprintln!("writing the {name} to {}", dir.display());
        write_once(&dir, &format!("moe-{name}-staging"), |d| write_demo_model(d, spec).map(|_| ()))?;
    }
    Ok(dir)
}

/// The trained demo model (embedded in the binary), written once to the temp directory under a
/// name that carries its fingerprint: its adapters `prose` and `code` (gate-only LoRA) and `attn`
/// (q/v LoRA) in `adapters/`, and the demo tenants in `tenants.toml`.
pub fn demo_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("moe-demo-{:016x}", crate::trained_demo_fingerprint()));
    if !dir.join("config.json").exists() {
        write_once(&dir, "moe-demo-staging", crate::write_trained_demo)?;
    }
    Ok(dir)
}
