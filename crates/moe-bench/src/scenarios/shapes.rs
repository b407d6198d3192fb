//! `moe bench`'s layout comparison: the standard benchmark model against its DeepSeek-V3-shaped
//! counterpart of equal active parameters (latent attention, grouped sigmoid routing, 4x the
//! experts at half width, top-3 plus a shared expert), decoded on the embedded cluster in the same
//! run, reported as a ratio so that the new paths cannot regress unseen.

use crate::decode;
use moe_router::EngineConfig;
use serde::Serialize;

#[derive(Serialize)]
pub struct ShapeRun {
    pub batch: usize,
    pub mixtral_tokens_per_s: f64,
    pub deepseek_tokens_per_s: f64,
    /// DeepSeek-shaped over Mixtral-shaped.
    pub ratio: f64,
}

#[derive(Serialize)]
pub struct ShapeComparison {
    pub mixtral_active_params: u64,
    pub deepseek_active_params: u64,
    pub deepseek_kv_values_per_token: u64,
    pub mixtral_kv_values_per_token: u64,
    pub runs: Vec<ShapeRun>,
}

/// Decodes both models at batch 1 and 16 (after a warm-up each) on `workers` in-process workers.
pub fn measure(workers: usize, new_tokens: usize) -> anyhow::Result<ShapeComparison> {
    let mixtral_spec = moe_demo::DemoSpec::bench();
    let deepseek_spec = moe_demo::DemoSpec { layout: moe_demo::DemoLayout::DeepseekV3, ..mixtral_spec.clone() };
    let mixtral = moe_demo::cached_model_dir("bench-model", &mixtral_spec)?;
    let deepseek = moe_demo::cached_model_dir("bench-model-deepseek", &deepseek_spec)?;
    let cfg = EngineConfig { max_running: 64, prefix_cache: false, ..Default::default() };
    let size = |dir: &std::path::Path| -> anyhow::Result<moe_model::ModelSize> {
        Ok(moe_model::ModelSize::of(&moe_model::ModelConfig::from_dir(dir)?))
    };
    let (ms, ds) = (size(&mixtral)?, size(&deepseek)?);
    let mut runs = Vec::new();
    let engines =
        [moe_cluster::embedded(&mixtral, workers, cfg.clone())?, moe_cluster::embedded(&deepseek, workers, cfg)?];
    for batch in [1usize, 16] {
        let mut tps = [0.0f64; 2];
        for (t, engine) in tps.iter_mut().zip(&engines) {
            eprintln!("layouts: {} decode batch {batch}", engine.model_config().architecture.hf_name());
            let _ = decode(engine, batch, 4).map_err(anyhow::Error::msg)?; // warm-up
            *t = decode(engine, batch, if batch == 1 { 2 * new_tokens } else { new_tokens })
                .map_err(anyhow::Error::msg)?
                .tokens_per_s;
        }
        runs.push(ShapeRun {
            batch,
            mixtral_tokens_per_s: tps[0],
            deepseek_tokens_per_s: tps[1],
            ratio: tps[1] / tps[0].max(1e-9),
        });
    }
    Ok(ShapeComparison {
        mixtral_active_params: ms.active_params,
        deepseek_active_params: ds.active_params,
        deepseek_kv_values_per_token: ds.kv_values_per_token,
        mixtral_kv_values_per_token: ms.kv_values_per_token,
        runs,
    })
}

pub fn print(s: &ShapeComparison) {
    println!();
    println!(
        "layouts at equal active parameters (Mixtral-shaped {:.1}M, DeepSeek-V3-shaped {:.1}M; KV values per token {} vs {}):",
        s.mixtral_active_params as f64 / 1e6,
        s.deepseek_active_params as f64 / 1e6,
        s.mixtral_kv_values_per_token,
        s.deepseek_kv_values_per_token
    );
    for r in &s.runs {
        println!(
            "  decode batch {:>2}: Mixtral-shaped {:.0} tok/s, DeepSeek-V3-shaped {:.0} tok/s = {:.2}x",
            r.batch, r.mixtral_tokens_per_s, r.deepseek_tokens_per_s, r.ratio
        );
    }
}
