//! `moe adapter inspect`: what a PEFT adapter targets on a base model (modules, layers, ranks,
//! scales, experts, bytes, and where each pair is applied: on the router or on the workers that
//! host the experts), or the precise reason it cannot be served, with a non-zero exit.

use crate::model_args::ModelArgs;
use clap::{Args, Subcommand};
use moe_lora::{AdapterManifest, FusedProj, ModuleKind};
use moe_model::ModelConfig;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct AdapterArgs {
    #[command(subcommand)]
    pub command: AdapterCommand,
}

#[derive(Subcommand, Debug)]
pub enum AdapterCommand {
    /// Print what the adapter in DIR adapts on the base model, or why it cannot be served.
    Inspect {
        /// The adapter directory (adapter_config.json + adapter_model.safetensors).
        dir: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
        /// One JSON object instead of a table.
        #[arg(long, env = "MOE_JSON")]
        json: bool,
    },
}

fn kind_name(kind: ModuleKind) -> String {
    match kind {
        ModuleKind::Q => "attention q".into(),
        ModuleKind::K => "attention k".into(),
        ModuleKind::V => "attention v".into(),
        ModuleKind::O => "attention o".into(),
        ModuleKind::QA => "latent attention q_a".into(),
        ModuleKind::KvA => "latent attention kv_a (latent and rope key)".into(),
        ModuleKind::KvB => "latent attention kv_b (keys and values, absorbed)".into(),
        ModuleKind::Gate => "MoE gate (expert routing)".into(),
        ModuleKind::Expert { expert, proj } => format!("expert {expert} {proj:?}").to_lowercase(),
        ModuleKind::FusedExperts { proj: FusedProj::GateUp } => "all experts, fused gate_up_proj".into(),
        ModuleKind::FusedExperts { proj: FusedProj::Down } => "all experts, fused down_proj".into(),
    }
}

pub fn run(a: AdapterArgs) -> anyhow::Result<()> {
    let AdapterCommand::Inspect { dir, model, json } = a.command;
    let config = ModelConfig::from_dir(&model.dir()?)?;
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "adapter".into());
    let manifest = AdapterManifest::read(&dir, &name, &config)
        .map_err(|e| anyhow::anyhow!("{} cannot be served: {e}", dir.display()))?;
    let rows: Vec<serde_json::Value> = manifest
        .modules
        .iter()
        .map(|m| {
            let on_workers = matches!(m.target.kind, ModuleKind::Expert { .. } | ModuleKind::FusedExperts { .. });
            serde_json::json!({
                "module": m.module,
                "layer": m.target.layer,
                "target": kind_name(m.target.kind),
                "rank": m.rank,
                "experts": m.experts,
                "scale": m.scale,
                "in_features": m.in_features,
                "out_features": m.out_features,
                "bytes": 4 * m.rank * m.experts * (m.in_features + m.out_features),
                "applied_on": if on_workers { "workers hosting the experts" } else { "router" },
            })
        })
        .collect();
    let bytes: usize = rows.iter().filter_map(|r| r["bytes"].as_u64()).sum::<u64>() as usize;
    let mut layers: Vec<usize> = manifest.modules.iter().map(|m| m.target.layer).collect();
    layers.dedup();
    if json {
        println!(
            "{}",
            serde_json::json!({"adapter": name, "digest": manifest.digest, "layers": layers, "bytes_f32": bytes, "modules": rows})
        );
        return Ok(());
    }
    println!(
        "adapter {name} (digest {}), {} modules on layers {layers:?}, {bytes} bytes as f32",
        manifest.digest,
        rows.len()
    );
    println!(
        "{:<48} {:>5} {:<34} {:>4} {:>7} {:>8}  applied on",
        "module", "layer", "target", "rank", "scale", "bytes"
    );
    for r in &rows {
        println!(
            "{:<48} {:>5} {:<34} {:>4} {:>7.3} {:>8}  {}",
            r["module"].as_str().unwrap_or(""),
            r["layer"].as_u64().unwrap_or(0),
            r["target"].as_str().unwrap_or(""),
            r["rank"].as_u64().unwrap_or(0),
            r["scale"].as_f64().unwrap_or(0.0),
            r["bytes"].as_u64().unwrap_or(0),
            r["applied_on"].as_str().unwrap_or("")
        );
    }
    Ok(())
}
