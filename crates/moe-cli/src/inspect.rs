//! `moe inspect`: what a model needs, from its config.json alone (no weights read): parameters,
//! those a token activates, bf16 bytes split between the router and the workers, and the KV
//! cache per token; or why this build cannot serve it.

use anyhow::Context;
use moe_model::{ModelConfig, ModelSize};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// A model directory or a config.json file.
    #[arg(long, env = "MOE_MODEL")]
    pub model: PathBuf,
    /// Print JSON instead of a line of text.
    #[arg(long, env = "MOE_JSON")]
    pub json: bool,
}

pub fn run(a: InspectArgs) -> anyhow::Result<()> {
    let path = if a.model.is_dir() { a.model.join("config.json") } else { a.model.clone() };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let config = ModelConfig::parse(&text, &path)?;
    let size = ModelSize::of(&config);
    if a.json {
        let v = serde_json::json!({
            "architecture": config.architecture.hf_name(),
            "total_params": size.total_params,
            "active_params": size.active_params,
            "expert_params": size.expert_params,
            "bf16_bytes": 2 * size.total_params,
            "kv_values_per_token": size.kv_values_per_token,
            "kv_bytes_per_token_bf16": 2 * size.kv_values_per_token,
            "state_values_per_sequence": size.state_values_per_sequence,
            "latent_attention": config.latent.is_some(),
            "quantization": config.quantization.as_ref().map(|q| format!("{q:?}")),
        });
        println!("{v}");
    } else {
        println!("{}", size.describe(&config));
    }
    Ok(())
}
