//! `config.json` of a Hugging Face MoE checkpoint, normalized into one [`ModelConfig`] for the
//! supported architectures. Accepts both `rope_theta` and `rope_parameters.rope_theta`, a
//! null or absent `head_dim`, and `eos_token_id` as an int or a list. An architecture is a
//! choice of orthogonal concerns read from here: the attention kind (grouped-query or
//! multi-head latent), the rope (partial, YaRN), the routing rule, shared experts, dense layers.

pub use crate::architecture::Architecture;
pub(crate) use crate::config_reader::Reader;
pub use crate::config_variants::{GptOssParts, LatentAttention, LinearAttention, Quantization};
use crate::error::{ModelError, Result};
use crate::rope::Rope;
use crate::routing::RoutingRule;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// How q and k are normalized before rotary embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// RMSNorm over each head (Qwen3-MoE); weight length `head_dim`.
    PerHead,
    /// RMSNorm over the whole projection (OLMoE); weight length `heads * head_dim`.
    Whole,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Intermediate size of dense MLP layers.
    pub intermediate_size: usize,
    /// Intermediate size of each routed expert.
    pub expert_intermediate_size: usize,
    pub num_experts: usize,
    pub top_k: usize,
    /// Renormalize the top-k probabilities to sum to one.
    pub norm_topk_prob: bool,
    pub shared_expert_intermediate_size: Option<usize>,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub attention_bias: bool,
    pub qk_norm: QkNorm,
    pub clip_qkv: Option<f32>,
    pub sliding_window: Option<usize>,
    /// How gate logits choose and weigh experts.
    pub routing: RoutingRule,
    /// Whether the shared expert's output is scaled by a sigmoid gate (Qwen2-MoE) or added as is
    /// (DeepSeek-V3, GLM-4.5).
    pub shared_expert_gated: bool,
    pub rope: Rope,
    /// Multi-head latent attention (DeepSeek-V3); `None` for grouped-query attention.
    pub latent: Option<LatentAttention>,
    /// The checkpoint's weight quantization; `None` for plain f32/bf16/f16 tensors.
    pub quantization: Option<Quantization>,
    /// gpt-oss's sinks, per-layer sliding windows and expert activation.
    pub gpt_oss: Option<GptOssParts>,
    /// The gated DeltaNet layers of a hybrid model (Qwen3-Next); `None`: every layer attends.
    pub linear: Option<LinearAttention>,
    /// Full attention's output is scaled by a sigmoid gate that q_proj also produces (Qwen3-Next).
    pub gated_attention: bool,
    /// RMSNorm weights are stored as offsets from one (`x̂ · (1 + w)`, Qwen3-Next).
    pub zero_centred_norm: bool,
}

impl ModelConfig {
    /// Reads `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|error| ModelError::Io { path: path.clone(), error })?;
        Self::parse(&text, &path)
    }

    /// Parses config text; `path` is used in error messages only.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::Config { path: path.to_path_buf(), message: format!("not valid JSON: {e}") })?;
        if !v.is_object() {
            return Err(ModelError::Config { path: path.to_path_buf(), message: "expected a JSON object".into() });
        }
        let r = Reader { path, v: &v };
        let arch_name = match r.present("architectures") {
            Some(Value::Array(a)) => a.first().and_then(|x| x.as_str()).unwrap_or("").to_string(),
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        let supported = || Architecture::ALL.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
        let architecture =
            Architecture::ALL.iter().find(|(n, _)| *n == arch_name).map(|(_, a)| *a).ok_or_else(|| {
                ModelError::UnsupportedArchitecture {
                    path: PathBuf::from(path),
                    got: arch_name.clone(),
                    supported: supported(),
                }
            })?;

        let hidden_size = r.positive("hidden_size")?;
        let num_heads = r.positive("num_attention_heads")?;
        let num_kv_heads = r.usize_opt("num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(r.err(format!(
                "num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        let head_dim = match r.usize_opt("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(r.err(format!(
                        "hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_heads}) and head_dim is not given"
                    )));
                }
                hidden_size / num_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(r.err(format!("head_dim must be even and positive for rotary embeddings, got {head_dim}")));
        }
        let num_experts = ["num_local_experts", "num_experts", "n_routed_experts"]
            .iter()
            .find_map(|k| r.usize_opt(k).transpose())
            .transpose()?
            .ok_or_else(|| r.err("`num_local_experts` (or `num_experts`) is missing".into()))?;
        let top_k = match r.usize_opt("num_experts_per_tok")? {
            Some(k) => k,
            None => r.positive("experts_per_token")?,
        };
        let num_layers = r.positive("num_hidden_layers")?;
        if num_experts == 0 || top_k > num_experts {
            return Err(r.err(format!(
                "num_experts_per_tok ({top_k}) must be between 1 and the number of experts ({num_experts})"
            )));
        }
        let intermediate_size = r.positive("intermediate_size")?;
        let expert_intermediate_size = match architecture {
            Architecture::Qwen2Moe
            | Architecture::Qwen3Moe
            | Architecture::Qwen3Next
            | Architecture::DeepseekV3
            | Architecture::Glm4Moe => r.positive("moe_intermediate_size")?,
            Architecture::Mixtral | Architecture::Olmoe | Architecture::GptOss => intermediate_size,
        };
        let max_position_embeddings = r.positive("max_position_embeddings")?;
        let scaling = r.present("rope_parameters").or_else(|| r.present("rope_scaling"));
        let rope_theta = match r.f64_opt("rope_theta")? {
            Some(t) => t,
            None => match scaling {
                Some(p) => Reader { path, v: p }
                    .f64_opt("rope_theta")?
                    .ok_or_else(|| r.err("`rope_parameters.rope_theta` is missing".into()))?,
                None => 10000.0,
            },
        };
        let mut yarn = None;
        for key in ["rope_parameters", "rope_scaling"] {
            if let Some(p) = r.present(key) {
                match crate::rope::parse_scaling(p, max_position_embeddings) {
                    Ok(Some(y)) => yarn = Some(y),
                    Ok(None) => {}
                    Err(message) => return Err(r.err(format!("`{key}`: {message}"))),
                }
            }
        }
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(r.err(format!("rope_theta must be a positive number, got {rope_theta}")));
        }
        let rms_norm_eps = r.f64_opt("rms_norm_eps")?.unwrap_or(1e-6) as f32;
        let (default_norm_topk, shared) = match architecture {
            Architecture::Mixtral => (true, None),
            Architecture::Qwen2Moe => (false, Some(r.positive("shared_expert_intermediate_size")?)),
            Architecture::Qwen3Next => (true, Some(r.positive("shared_expert_intermediate_size")?)),
            Architecture::Qwen3Moe | Architecture::Olmoe => (false, None),
            // Softmax over the chosen k's logits = softmax over all, renormalized over the k.
            Architecture::GptOss => (true, None),
            Architecture::DeepseekV3 | Architecture::Glm4Moe => {
                let n = r.usize_opt("n_shared_experts")?.unwrap_or(1);
                (true, (n > 0).then_some(n * expert_intermediate_size))
            }
        };
        // Mixtral always renormalizes over the chosen k; the others follow `norm_topk_prob`.
        let norm_topk_prob = match architecture {
            Architecture::Mixtral | Architecture::GptOss => true,
            _ => r.bool_or("norm_topk_prob", default_norm_topk)?,
        };
        let (decoder_sparse_step, mlp_only_layers) = match architecture {
            Architecture::Qwen2Moe | Architecture::Qwen3Moe | Architecture::Qwen3Next => {
                let step = r.usize_opt("decoder_sparse_step")?.unwrap_or(1);
                if step == 0 {
                    return Err(r.err("`decoder_sparse_step` must be positive".into()));
                }
                let layers = match r.present("mlp_only_layers") {
                    None => vec![],
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|x| {
                            x.as_u64()
                                .map(|n| n as usize)
                                .ok_or_else(|| r.err("`mlp_only_layers` must be a list of layer indices".into()))
                        })
                        .collect::<Result<_>>()?,
                    Some(_) => return Err(r.err("`mlp_only_layers` must be a list of layer indices".into())),
                };
                (step, layers)
            }
            Architecture::DeepseekV3 | Architecture::Glm4Moe => {
                // transformers' defaults: DeepSeek-V3's first 3 layers dense, GLM-4.5's first one.
                let default = if architecture == Architecture::DeepseekV3 { 3 } else { 1 };
                let dense = r.usize_opt("first_k_dense_replace")?.unwrap_or(default);
                (1, (0..dense).collect())
            }
            _ => (1, vec![]),
        };
        let attention_bias = match architecture {
            Architecture::Qwen2Moe => r.bool_or("qkv_bias", true)?,
            Architecture::GptOss => r.bool_or("attention_bias", true)?,
            _ => r.bool_or("attention_bias", false)?,
        };
        let qk_norm = match architecture {
            Architecture::Qwen3Moe | Architecture::Qwen3Next => QkNorm::PerHead,
            Architecture::Olmoe => QkNorm::Whole,
            Architecture::Glm4Moe if r.bool_or("use_qk_norm", false)? => QkNorm::PerHead,
            _ => QkNorm::None,
        };
        let routing = crate::config_variants::routing(&r, architecture, num_experts, top_k, norm_topk_prob)?;
        let latent = crate::config_variants::latent(&r, architecture, attention_bias)?;
        let gpt_oss = crate::config_variants::gpt_oss(&r, architecture, num_layers)?;
        let linear = crate::config_variants::linear_attention(&r, architecture, num_layers, rms_norm_eps)?;
        // Heads of latent attention are q/k heads of nope + rope columns.
        let head_dim = latent.as_ref().map_or(head_dim, |l| l.qk_head_dim());
        let rotary_dim = match (&latent, architecture) {
            (Some(l), _) => l.qk_rope_head_dim,
            (None, Architecture::Glm4Moe | Architecture::Qwen3Next) => {
                let in_rope = scaling.and_then(|p| p.get("partial_rotary_factor")).and_then(|v| v.as_f64());
                let default = if architecture == Architecture::Glm4Moe { 0.5 } else { 0.25 };
                let f = r.f64_opt("partial_rotary_factor")?.or(in_rope).unwrap_or(default);
                if !(f > 0.0 && f <= 1.0) {
                    return Err(r.err(format!("partial_rotary_factor must be in (0, 1], got {f}")));
                }
                let d = (head_dim as f64 * f) as usize;
                if d == 0 || !d.is_multiple_of(2) {
                    return Err(r.err(format!("head_dim x partial_rotary_factor must be even and positive, got {d}")));
                }
                d
            }
            _ => head_dim,
        };
        let clip_qkv = match architecture {
            Architecture::Olmoe => r.f64_opt("clip_qkv")?.map(|c| c as f32),
            _ => None,
        };
        let sliding_window = match architecture {
            Architecture::Mixtral => r.usize_opt("sliding_window")?,
            Architecture::Qwen2Moe | Architecture::Qwen3Moe if r.bool_or("use_sliding_window", false)? => {
                return Err(r.err("use_sliding_window = true is not supported".into()));
            }
            _ => None,
        };
        let vocab_size = r.positive("vocab_size")?;
        let quantization = crate::config_variants::quantization(&r);
        let tie_word_embeddings = r.bool_or("tie_word_embeddings", false)?;
        let bos_token_id = r.ids("bos_token_id")?.first().copied();
        Ok(Self {
            architecture,
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size,
            expert_intermediate_size,
            num_experts,
            top_k,
            norm_topk_prob,
            shared_expert_intermediate_size: shared,
            decoder_sparse_step,
            mlp_only_layers,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings,
            tie_word_embeddings,
            eos_token_ids: r.ids("eos_token_id")?,
            bos_token_id,
            attention_bias,
            qk_norm,
            clip_qkv,
            sliding_window,
            routing,
            shared_expert_gated: matches!(architecture, Architecture::Qwen2Moe | Architecture::Qwen3Next),
            rope: Rope { theta: rope_theta, rotary_dim, yarn },
            latent,
            quantization,
            gpt_oss,
            linear,
            gated_attention: architecture == Architecture::Qwen3Next,
            zero_centred_norm: architecture == Architecture::Qwen3Next,
        })
    }

    /// Whether layer `i` has a sparse MoE block (else a dense MLP), as transformers decides.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i) && self.num_experts > 0 && (i + 1).is_multiple_of(self.decoder_sparse_step)
    }

    /// A short hash identifying the model's shape, so routers refuse workers of another model.
    pub fn fingerprint(&self) -> String {
        // FNV-1a over the normalized config: stable across runs and platforms.
        let text = format!("{self:?}");
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// The sliding window of layer `layer` (Mixtral's for every layer, gpt-oss's on its sliding
    /// layers), or `None` for full attention.
    pub fn window(&self, layer: usize) -> Option<usize> {
        match &self.gpt_oss {
            Some(g) => g.sliding_layers.get(layer).copied().unwrap_or(false).then_some(g.sliding_window),
            None => self.sliding_window,
        }
    }

    /// The activation of the routed experts.
    pub fn expert_glu(&self) -> moe_compute::Glu {
        self.gpt_oss.as_ref().map_or(moe_compute::Glu::Silu, |g| g.glu)
    }

    /// Indices of the layers with routed experts.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_layers).filter(|&l| self.is_moe_layer(l)).collect()
    }

    /// Rotary inverse frequencies, `rotary_dim / 2` of them.
    pub fn inv_freq(&self) -> Vec<f32> {
        self.rope.inv_freq()
    }

    /// The softmax scale of attention scores: `1/sqrt(head_dim)`, and for latent attention with
    /// YaRN, times `mscale(factor, mscale_all_dim)²` as DeepSeek defines it.
    pub fn attention_scale(&self) -> f32 {
        let base = 1.0 / (self.head_dim as f64).sqrt();
        let mscale = match (&self.latent, &self.rope.yarn) {
            (Some(_), Some(y)) => match y.mscale_all_dim {
                Some(all) if all != 0.0 => crate::rope::yarn_mscale(y.factor, all),
                _ => 1.0,
            },
            _ => 1.0,
        };
        (base * mscale * mscale) as f32
    }

    /// Whether layer `i` is a linear-attention (gated DeltaNet) layer, which keeps a recurrent
    /// state per sequence instead of KV pages.
    pub fn is_linear_layer(&self, i: usize) -> bool {
        self.linear.as_ref().is_some_and(|l| l.layers.get(i).copied().unwrap_or(false))
    }

    /// Layers that keep keys and values in the paged cache (all but linear-attention layers).
    pub fn kv_layers(&self) -> usize {
        (0..self.num_layers).filter(|&i| !self.is_linear_layer(i)).count()
    }

    /// Values the KV cache holds per token and layer: keys and values of every KV head, or the
    /// latent and rope key of latent attention (stored once: its values are the keys' prefix).
    pub fn kv_values_per_token_layer(&self) -> usize {
        match &self.latent {
            Some(l) => l.latent_dim(),
            None => 2 * self.num_kv_heads * self.head_dim,
        }
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
