//! Flags shared by the commands that load a model, and the parsing of token-id lists.

use anyhow::Context;
use clap::Args;
use moe_compute::cpu::CpuBackend;
use moe_demo::{write_demo_model, DemoSpec};
use moe_model::Model;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, *.safetensors, optional tokenizer.json).
    #[arg(long, env = "MOE_MODEL", conflicts_with = "demo")]
    pub model: Option<PathBuf>,
    /// Use the built-in demo model (written once to the temp directory).
    #[arg(long, env = "MOE_DEMO")]
    pub demo: bool,
}

impl ModelArgs {
    /// The model directory, writing the demo model first if asked for.
    pub fn dir(&self) -> anyhow::Result<PathBuf> {
        match (&self.model, self.demo) {
            (Some(dir), _) => Ok(dir.clone()),
            (None, true) => demo_dir(),
            (None, false) => anyhow::bail!("give --model DIR (or --demo for the built-in demo model)"),
        }
    }

    pub fn load(&self) -> anyhow::Result<(PathBuf, Model<CpuBackend>)> {
        let dir = self.dir()?;
        let model =
            Model::load(&dir, CpuBackend::new()).with_context(|| format!("loading model from {}", dir.display()))?;
        Ok((dir, model))
    }
}

/// A generated checkpoint under the temp dir, named `moe-<name>-v<version>`, written on first use
/// (atomically, by rename, so concurrent first runs never see half a checkpoint).
pub fn cached_model_dir(name: &str, spec: &DemoSpec) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("moe-{name}-v{}", env!("CARGO_PKG_VERSION")));
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    let staging = std::env::temp_dir().join(format!("moe-{name}-staging-{}", std::process::id()));
    eprintln!("writing the {name} to {}", dir.display());
    write_demo_model(&staging, spec).with_context(|| format!("writing the {name}"))?;
    if std::fs::rename(&staging, &dir).is_err() {
        // Another process won the race; its copy is identical.
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok(dir)
}

fn demo_dir() -> anyhow::Result<PathBuf> {
    cached_model_dir("demo-model", &DemoSpec::demo())
}

/// A comma-separated list of token ids, as one flag value.
#[derive(Clone, Debug)]
pub struct TokenIds(pub Vec<u32>);

/// Parses `1,2,3` (spaces allowed) into token ids.
pub fn parse_token_ids(s: &str) -> Result<TokenIds, String> {
    if s.trim().is_empty() {
        return Ok(TokenIds(vec![]));
    }
    s.split(',')
        .map(|t| {
            let t = t.trim();
            t.parse::<u32>()
                .map_err(|_| format!("{t:?} is not a token id (expected non-negative integers separated by commas)"))
        })
        .collect::<Result<Vec<u32>, String>>()
        .map(TokenIds)
}
