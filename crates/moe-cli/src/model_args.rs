//! Flags shared by the commands that load a model, and the parsing of token-id lists.

use anyhow::Context;
use clap::Args;
use moe_compute::Backend;
use moe_lora::{load_adapter, validate_id, AdapterParts};
use moe_model::{AdapterIdentity, AdapterWeights, Model};
use std::path::{Path, PathBuf};

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
            (None, true) => Ok(moe_demo::demo_dir()?),
            (None, false) => anyhow::bail!("give --model DIR (or --demo for the built-in demo model)"),
        }
    }
}

/// The LoRA adapter flags of local commands.
#[derive(Args, Debug, Clone, Default)]
pub struct AdapterArgs {
    /// LoRA adapter: a PEFT directory, or an adapter id under --adapter-dir. With --endpoint, the
    /// id of an adapter the server knows.
    #[arg(long, env = "MOE_ADAPTER")]
    pub adapter: Option<String>,
    /// Directory of adapters (each subdirectory one adapter, its name the id).
    #[arg(long, env = "MOE_ADAPTER_DIR")]
    pub adapter_dir: Option<PathBuf>,
}

impl AdapterArgs {
    /// Where the adapter is: its directory and id, if one was given. An id is looked up in
    /// --adapter-dir, else in the model's own `adapters/` dir.
    pub fn locate(&self, model_dir: &Path) -> anyhow::Result<Option<(PathBuf, String)>> {
        let Some(arg) = &self.adapter else { return Ok(None) };
        let as_dir = Path::new(arg);
        let root = self.adapter_dir.clone().or_else(|| Some(model_dir.join("adapters")).filter(|d| d.is_dir()));
        let (dir, id) = if as_dir.join("adapter_config.json").is_file() {
            let id = as_dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| arg.clone());
            (as_dir.to_path_buf(), id)
        } else if let Some(root) = root {
            validate_id(arg)?;
            (root.join(arg), arg.clone())
        } else {
            anyhow::bail!("--adapter {arg:?} is not a directory with adapter_config.json (or give --adapter-dir)");
        };
        Ok(Some((dir, id)))
    }

    /// Loads the adapter (every pair: this process runs its own experts), if one was given.
    pub fn load<B: Backend>(&self, model_dir: &Path, model: &Model<B>) -> anyhow::Result<Option<AdapterWeights<B>>> {
        let Some((dir, id)) = self.locate(model_dir)? else { return Ok(None) };
        let identity = AdapterIdentity { path: id.clone(), id, digest: String::new() };
        let adapter = load_adapter(&dir, identity, &model.config, model.backend(), AdapterParts::all())
            .with_context(|| format!("loading adapter {}", dir.display()))?;
        Ok(Some(adapter))
    }
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
