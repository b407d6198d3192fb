//! The model on this machine alone, for one request at a time: `moe logits` (every prompt
//! position's logits), `moe generate` without an endpoint (one prompt through a local engine),
//! `moe inspect` (what a model needs, from config.json alone) and `moe adapter inspect` (what an
//! adapter adapts, or why it cannot be served).

use crate::{invalid, Context, Result};
use moe_compute::{on_device, Backend, Device, OnBackend};
use moe_constrain::ConstraintSpec;
use moe_generate::{PromptLogits, TextCodec};
use moe_lora::{AdapterManifest, FusedProj, ModuleKind};
use moe_model::{Model, ModelConfig, ModelSize};
use moe_router::{EngineConfig, Event, FinishReason, GenerationParams, PromptInput, ValidatedRequest};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A located adapter: its directory and id.
pub type LocatedAdapter = (PathBuf, String);

struct LogitsOnDevice<'a>(&'a Path, Option<&'a LocatedAdapter>, &'a [u32]);

impl OnBackend for LogitsOnDevice<'_> {
    type Output = Result<(usize, Vec<f32>)>;
    fn run<B: Backend>(self, backend: B) -> Self::Output {
        let LogitsOnDevice(dir, adapter, ids) = self;
        let model = Model::load(dir, backend).context_with(|| format!("loading model from {}", dir.display()))?;
        let adapter = match adapter {
            Some((d, id)) => Some(
                moe_lora::load_local_adapter(d, id, &model.config, model.backend())
                    .context_with(|| format!("loading adapter {}", d.display()))?,
            ),
            None => None,
        };
        let mut generator = PromptLogits::new(&model, ids.len())?.with_adapter(adapter.as_ref());
        Ok((model.config.vocab_size, generator.prompt_logits(ids)?))
    }
}

/// Every prompt position's logits on `device`: `(vocab_size, rows × vocab_size values)`.
pub fn prompt_logits(
    device: Device,
    dir: &Path,
    adapter: Option<&LocatedAdapter>,
    ids: &[u32],
) -> Result<(usize, Vec<f32>)> {
    on_device(device, LogitsOnDevice(dir, adapter, ids)).map_err(|e| invalid(format!("--device {device}: {e}")))?
}

/// One local generation request (the `moe generate` flags).
#[derive(Clone, Debug, Default)]
pub struct LocalRequest {
    pub prompt: Option<String>,
    pub token_ids: Option<Vec<u32>>,
    pub adapter: Option<LocatedAdapter>,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
    pub stop: Vec<String>,
    pub repetition_penalty: Option<f32>,
    pub constraint: Option<ConstraintSpec>,
}

/// What a local generation produced.
#[derive(Clone, Debug)]
pub struct LocalOutput {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: &'static str,
    /// Prefill and decode speed, as one line.
    pub stats: String,
}

/// Generates one continuation with a local engine on `device` (a KV cache for this sequence
/// alone, the whole prompt in one prefill chunk).
pub fn generate_local(device: Device, dir: &Path, r: &LocalRequest) -> Result<LocalOutput> {
    let config = ModelConfig::from_dir(dir)?;
    // The adapter is served by the engine's registry: its parent dir is the adapter dir.
    let (adapters, adapter_id) = match &r.adapter {
        None => (crate::AdapterOptions::default(), String::new()),
        Some((adapter_dir, id)) => {
            let root = adapter_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            (crate::AdapterOptions { dir: Some(root.to_path_buf()), ..Default::default() }, id.clone())
        }
    };
    let codec = TextCodec::from_dir(dir)?;
    let prompt = match (&r.prompt, &r.token_ids) {
        (Some(text), _) => codec.encode(text).context_with(|| "encoding the prompt".into())?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => return Err(invalid("give --prompt or --token-ids")),
    };
    let room = config.max_position_embeddings.saturating_sub(prompt.len());
    let max_new = r.max_new_tokens.min(room);
    let page_size = 16;
    let page_bytes = 4 * config.num_layers * page_size * config.kv_values_per_token_layer();
    let engine_config = EngineConfig {
        max_batch_tokens: prompt.len().max(1),
        max_running: 1,
        max_waiting: 1,
        kv_cache_bytes: (prompt.len() + max_new).div_ceil(page_size).max(1) * page_bytes,
        page_size,
        ..Default::default()
    };
    let engine = crate::local_engine(device, dir, engine_config, &adapters)
        .map_err(|e| invalid(format!("--device {device}: {e}")))?;
    let params = GenerationParams {
        max_new_tokens: Some(max_new as u32),
        temperature: Some(r.temperature),
        top_k: Some(r.top_k.min(i32::MAX as usize) as i32),
        top_p: Some(r.top_p),
        seed: Some(r.seed),
        stop: r.stop.clone(),
        repetition_penalty: r.repetition_penalty,
        constraint: r.constraint.clone(),
        ..Default::default()
    };
    let mut req = ValidatedRequest::new(
        PromptInput::Ids(prompt),
        &params,
        engine.codec(),
        &config,
        Duration::from_secs(24 * 3600),
    )?;
    if !adapter_id.is_empty() {
        let registry = engine.adapters().ok_or_else(|| invalid("the engine serves no adapters"))?;
        req.adapter = Some(registry.pin(&adapter_id).context_with(|| format!("loading adapter {adapter_id:?}"))?);
    }
    let prompt_len = req.prompt.len();
    let started = Instant::now();
    let (_, mut events) = engine.submit(req)?;
    let (mut ids, mut text, mut first_token) = (Vec::new(), String::new(), None);
    let finish = loop {
        match events.blocking_recv() {
            Some(Event::Delta { text: t, token_ids, .. }) => {
                first_token.get_or_insert_with(Instant::now);
                ids.extend(token_ids);
                text.push_str(&t);
            }
            Some(Event::Finished { reason, .. }) => break reason,
            Some(Event::Failed(e)) => return Err(e.into()),
            None => return Err(invalid("the engine stopped without finishing the request")),
        }
    };
    let first = first_token.unwrap_or_else(Instant::now);
    let prefill = prompt_len as f64 / (first - started).as_secs_f64().max(1e-9);
    let decode = ids.len().saturating_sub(1) as f64 / first.elapsed().as_secs_f64().max(1e-9);
    let stats = format!(
        "prompt {prompt_len} tokens, prefill {prefill:.1} tok/s; generated {} tokens, decode {decode:.1} tok/s ({})",
        ids.len(),
        engine.backend_name()
    );
    let finish_reason = match finish {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    };
    Ok(LocalOutput { token_ids: ids, text, finish_reason, stats })
}

/// What a model needs, from its config.json alone (`path`: a model directory or the file): one
/// line of text, or a JSON object.
pub fn describe_model(path: &Path, json: bool) -> Result<String> {
    let path = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
    let text = std::fs::read_to_string(&path).context_with(|| format!("reading {}", path.display()))?;
    let config = ModelConfig::parse(&text, &path)?;
    let size = ModelSize::of(&config);
    if !json {
        return Ok(size.describe(&config));
    }
    Ok(serde_json::json!({
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
    })
    .to_string())
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

/// What the adapter in `dir` adapts on the model in `model_dir` (a table, or JSON), or why it
/// cannot be served.
pub fn describe_adapter(dir: &Path, model_dir: &Path, json: bool) -> Result<String> {
    use std::fmt::Write as _;
    let config = ModelConfig::from_dir(model_dir)?;
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "adapter".into());
    let manifest = AdapterManifest::read(dir, &name, &config)
        .map_err(|e| invalid(format!("{} cannot be served: {e}", dir.display())))?;
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
        let v = serde_json::json!({"adapter": name, "digest": manifest.digest, "layers": layers, "bytes_f32": bytes, "modules": rows});
        return Ok(v.to_string());
    }
    let mut out = format!(
        "adapter {name} (digest {}), {} modules on layers {layers:?}, {bytes} bytes as f32\n",
        manifest.digest,
        rows.len()
    );
    let _ = write!(
        out,
        "{:<48} {:>5} {:<34} {:>4} {:>7} {:>8}  applied on",
        "module", "layer", "target", "rank", "scale", "bytes"
    );
    for r in &rows {
        let _ = write!(
            out,
            "\n{:<48} {:>5} {:<34} {:>4} {:>7.3} {:>8}  {}",
            r["module"].as_str().unwrap_or(""),
            r["layer"].as_u64().unwrap_or(0),
            r["target"].as_str().unwrap_or(""),
            r["rank"].as_u64().unwrap_or(0),
            r["scale"].as_f64().unwrap_or(0.0),
            r["bytes"].as_u64().unwrap_or(0),
            r["applied_on"].as_str().unwrap_or("")
        );
    }
    Ok(out)
}
