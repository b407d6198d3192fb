//! Flags shared by the commands that load a model, and the parsing of token-id lists.

use clap::Args;
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
        Ok(Some(moe_cluster::locate_adapter(arg, self.adapter_dir.as_deref(), model_dir)?))
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
