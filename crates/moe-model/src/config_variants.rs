//! The parts of config.json that choose an architecture's concerns beyond the common fields:
//! the routing rule (softmax, or grouped sigmoid with a correction bias), multi-head latent
//! attention, and gpt-oss's attention sinks, alternating sliding-window layers and clamped,
//! biased experts, and Qwen3-Next's gated DeltaNet layers.

use crate::architecture::Architecture;
use crate::config_reader::Reader;
use crate::error::Result;
use crate::routing::{GateScoring, RoutingRule};
use moe_compute::AttentionShape;
use moe_compute::{DeltaNetShape, Glu};
use serde_json::Value;

/// The shape of multi-head latent attention (DeepSeek-V2/V3). The KV cache holds, per token and
/// layer, the compressed latent (`kv_lora_rank`) and the shared rope key (`qk_rope_head_dim`).
#[derive(Clone, Debug, PartialEq)]
pub struct LatentAttention {
    /// Rank of q's low-rank projection (`None`: one `q_proj`, as DeepSeek-V2-Lite).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// The rope columns of q and k are stored interleaved (pairs) rather than as halves.
    pub rope_interleave: bool,
}

impl LatentAttention {
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Width of a cached latent row and of an absorbed query head: the latent then the rope key.
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// The attention call of latent attention: every query head (absorbed, `latent_dim` wide)
    /// against one shared key per token whose values are the same row.
    pub fn attention_shape(&self, heads: usize, scale: f32) -> AttentionShape<'static> {
        let width = self.latent_dim();
        AttentionShape {
            n_heads: heads,
            n_kv_heads: 1,
            head_dim: width,
            q_col: 0,
            k_col: heads * width,
            v_col: heads * width,
            scale,
            sliding_window: None,
            sinks: None,
        }
    }
}

/// The routing rule of `architecture`.
pub(crate) fn routing(
    r: &Reader<'_>,
    architecture: Architecture,
    num_experts: usize,
    top_k: usize,
    norm_topk_prob: bool,
) -> Result<RoutingRule> {
    Ok(match architecture {
        Architecture::DeepseekV3 | Architecture::Glm4Moe => {
            let deepseek = architecture == Architecture::DeepseekV3;
            let n_group = r.usize_opt("n_group")?.unwrap_or(if deepseek { 8 } else { 1 }).max(1);
            let topk_group = r.usize_opt("topk_group")?.unwrap_or(if deepseek { 4 } else { 1 }).max(1);
            if !num_experts.is_multiple_of(n_group) || topk_group > n_group {
                return Err(r.err(format!(
                    "n_group ({n_group}) must divide the {num_experts} experts and topk_group ({topk_group}) must not exceed it"
                )));
            }
            if n_group > 1 && num_experts / n_group * topk_group < top_k {
                return Err(r.err(format!(
                    "topk_group ({topk_group}) groups of {} experts cannot hold num_experts_per_tok ({top_k})",
                    num_experts / n_group
                )));
            }
            let scaling = r.f64_opt("routed_scaling_factor")?.unwrap_or(if deepseek { 2.5 } else { 1.0 }) as f32;
            if !(scaling.is_finite() && scaling > 0.0) {
                return Err(r.err(format!("routed_scaling_factor must be a positive number, got {scaling}")));
            }
            RoutingRule {
                scoring: GateScoring::Sigmoid,
                renormalize: norm_topk_prob,
                n_group,
                topk_group,
                scaling,
                correction_bias: true,
            }
        }
        _ => RoutingRule::softmax(norm_topk_prob),
    })
}

/// Multi-head latent attention's shape (DeepSeek-V3), or `None`.
pub(crate) fn latent(
    r: &Reader<'_>,
    architecture: Architecture,
    attention_bias: bool,
) -> Result<Option<LatentAttention>> {
    Ok(match architecture {
        Architecture::DeepseekV3 => {
            let l = LatentAttention {
                q_lora_rank: r.usize_opt("q_lora_rank")?.filter(|&n| n > 0),
                kv_lora_rank: r.positive("kv_lora_rank")?,
                qk_nope_head_dim: r.positive("qk_nope_head_dim")?,
                qk_rope_head_dim: r.positive("qk_rope_head_dim")?,
                v_head_dim: r.positive("v_head_dim")?,
                rope_interleave: r.bool_or("rope_interleave", true)?,
            };
            if !l.qk_rope_head_dim.is_multiple_of(2) {
                return Err(r.err(format!("qk_rope_head_dim must be even, got {}", l.qk_rope_head_dim)));
            }
            if attention_bias {
                return Err(r.err("attention_bias = true is not supported with latent attention".into()));
            }
            Some(l)
        }
        _ => None,
    })
}

/// gpt-oss's attention and expert variants.
#[derive(Clone, Debug, PartialEq)]
pub struct GptOssParts {
    /// Per layer: whether it attends through the sliding window (`layer_types`).
    pub sliding_layers: Vec<bool>,
    pub sliding_window: usize,
    pub glu: Glu,
}

/// gpt-oss's parts, or `None` for other architectures.
pub(crate) fn gpt_oss(r: &Reader<'_>, architecture: Architecture, num_layers: usize) -> Result<Option<GptOssParts>> {
    if architecture != Architecture::GptOss {
        return Ok(None);
    }
    let sliding_window = r.positive("sliding_window")?;
    // transformers' default: even layers slide, odd ones attend to everything.
    let sliding_layers = layer_types(r, "sliding_attention", num_layers, |i| i % 2 == 0)?;
    let alpha = r.f64_opt("swiglu_alpha")?.unwrap_or(1.702) as f32;
    let limit = r.f64_opt("swiglu_limit")?.unwrap_or(7.0) as f32;
    if !(alpha.is_finite() && limit.is_finite() && limit > 0.0) {
        return Err(
            r.err(format!("swiglu_alpha ({alpha}) and swiglu_limit ({limit}) must be finite, the limit positive"))
        );
    }
    Ok(Some(GptOssParts { sliding_layers, sliding_window, glu: Glu::ClampedSigmoid { alpha, limit } }))
}

/// A checkpoint's quantization (`quantization_config`), as far as it matters for loading.
#[derive(Clone, Debug, PartialEq)]
pub enum Quantization {
    /// Block-scaled FP8 (`quant_method: "fp8"`, `weight_block_size`): e4m3 weights with one
    /// `weight_scale_inv` per block.
    Fp8Block { block: [usize; 2] },
    /// Any other method, named.
    Other(String),
}

/// The checkpoint's quantization, from `quantization_config`.
pub(crate) fn quantization(r: &Reader<'_>) -> Option<Quantization> {
    match r.present("quantization_config") {
        None => None,
        Some(q) => {
            let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("unknown").to_string();
            let block = q.get("weight_block_size").and_then(|b| b.as_array()).and_then(|b| {
                let v: Vec<usize> = b.iter().filter_map(|x| x.as_u64().map(|n| n as usize)).collect();
                (v.len() == 2 && v.iter().all(|&n| n > 0)).then(|| [v[0], v[1]])
            });
            match (method.as_str(), block) {
                ("fp8", Some(block)) => Some(Quantization::Fp8Block { block }),
                _ => Some(Quantization::Other(method)),
            }
        }
    }
}

/// The linear-attention layers of a hybrid model (Qwen3-Next) and their gated DeltaNet shape.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearAttention {
    /// Per layer: whether it is a gated DeltaNet layer (else gated full attention).
    pub layers: Vec<bool>,
    pub shape: DeltaNetShape,
}

impl LinearAttention {
    /// How many layers are linear.
    pub fn count(&self) -> usize {
        self.layers.iter().filter(|&&l| l).count()
    }
}

/// Qwen3-Next's `layer_types` (or `full_attention_interval`) and `linear_*` fields, or `None`.
pub(crate) fn linear_attention(
    r: &Reader<'_>,
    architecture: Architecture,
    num_layers: usize,
    norm_eps: f32,
) -> Result<Option<LinearAttention>> {
    if architecture != Architecture::Qwen3Next {
        return Ok(None);
    }
    // transformers' default: every `full_attention_interval`-th layer attends fully.
    let every = r.usize_opt("full_attention_interval")?.unwrap_or(4).max(1);
    let layers = layer_types(r, "linear_attention", num_layers, |i| (i + 1) % every != 0)?;
    let or = |key: &str, default: usize| -> Result<usize> {
        match r.usize_opt(key)? {
            Some(0) => Err(r.err(format!("`{key}` must be positive, got 0"))),
            Some(n) => Ok(n),
            None => Ok(default),
        }
    };
    let shape = DeltaNetShape {
        k_heads: or("linear_num_key_heads", 16)?,
        v_heads: or("linear_num_value_heads", 32)?,
        k_head_dim: or("linear_key_head_dim", 128)?,
        v_head_dim: or("linear_value_head_dim", 128)?,
        conv_kernel: or("linear_conv_kernel_dim", 4)?,
        norm_eps,
    };
    if !shape.v_heads.is_multiple_of(shape.k_heads) {
        return Err(r.err(format!(
            "linear_num_value_heads ({}) must be a multiple of linear_num_key_heads ({})",
            shape.v_heads, shape.k_heads
        )));
    }
    Ok(Some(LinearAttention { layers, shape }))
}

/// `layer_types`: per layer, whether it is of kind `special` (else `"full_attention"`); every
/// layer must be listed. Absent: `default(i)`.
fn layer_types(r: &Reader<'_>, special: &str, num_layers: usize, default: impl Fn(usize) -> bool) -> Result<Vec<bool>> {
    match r.present("layer_types") {
        None => Ok((0..num_layers).map(default).collect()),
        Some(Value::Array(kinds)) => {
            let parsed: Option<Vec<bool>> = kinds
                .iter()
                .map(|k| match k.as_str() {
                    Some(s) if s == special => Some(true),
                    Some("full_attention") => Some(false),
                    _ => None,
                })
                .collect();
            match parsed {
                Some(v) if v.len() == num_layers => Ok(v),
                _ => Err(r.err(format!(
                    "`layer_types` must list \"{special}\" or \"full_attention\" for each of the {num_layers} layers"
                ))),
            }
        }
        Some(_) => Err(r.err("`layer_types` must be a list".into())),
    }
}
