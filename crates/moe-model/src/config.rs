//! `config.json` of a Hugging Face MoE checkpoint, normalized into one [`ModelConfig`] for the
//! four supported architectures. Accepts both `rope_theta` and `rope_parameters.rope_theta`, a
//! null or absent `head_dim`, and `eos_token_id` as an int or a list.

use crate::error::{ModelError, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The supported `architectures` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
}

impl Architecture {
    pub const ALL: [(&'static str, Architecture); 4] = [
        ("MixtralForCausalLM", Architecture::Mixtral),
        ("Qwen2MoeForCausalLM", Architecture::Qwen2Moe),
        ("Qwen3MoeForCausalLM", Architecture::Qwen3Moe),
        ("OlmoeForCausalLM", Architecture::Olmoe),
    ];

    pub fn hf_name(self) -> &'static str {
        Self::ALL.iter().find(|(_, a)| *a == self).map(|(n, _)| *n).unwrap_or("?")
    }

    /// Prefix of a layer's MoE block in tensor names.
    pub fn moe_prefix(self) -> &'static str {
        match self {
            Architecture::Mixtral => "block_sparse_moe",
            _ => "mlp",
        }
    }
}

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
}

struct Reader<'a> {
    path: &'a Path,
    v: &'a Value,
}

impl Reader<'_> {
    fn err(&self, message: String) -> ModelError {
        ModelError::Config { path: self.path.to_path_buf(), message }
    }
    fn present(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }
    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(format!("`{key}` must be a non-negative integer, got {v}"))),
        }
    }
    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| self.err(format!("`{key}` is missing")))
    }
    fn positive(&self, key: &str) -> Result<usize> {
        let n = self.usize_req(key)?;
        if n == 0 {
            return Err(self.err(format!("`{key}` must be positive, got 0")));
        }
        Ok(n)
    }
    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(format!("`{key}` must be a number, got {v}"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(format!("`{key}` must be true or false, got {v}"))),
        }
    }
    fn ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = || self.err(format!("`{key}` must be a token id or a list of token ids"));
        match self.present(key) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => {
                items.iter().map(|i| i.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad)).collect()
            }
            Some(v) => Ok(vec![v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad)?]),
        }
    }
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
        let top_k = r.positive("num_experts_per_tok")?;
        if num_experts == 0 || top_k > num_experts {
            return Err(r.err(format!(
                "num_experts_per_tok ({top_k}) must be between 1 and the number of experts ({num_experts})"
            )));
        }
        let intermediate_size = r.positive("intermediate_size")?;
        let expert_intermediate_size = match architecture {
            Architecture::Qwen2Moe | Architecture::Qwen3Moe => r.positive("moe_intermediate_size")?,
            Architecture::Mixtral | Architecture::Olmoe => intermediate_size,
        };
        let rope_theta = match r.f64_opt("rope_theta")? {
            Some(t) => t,
            None => match r.present("rope_parameters").or_else(|| r.present("rope_scaling")) {
                Some(p) => {
                    let pr = Reader { path, v: p };
                    let rope_type =
                        p.get("rope_type").or_else(|| p.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
                    if rope_type != "default" {
                        return Err(r.err(format!("rope_type {rope_type:?} is not supported (only \"default\")")));
                    }
                    pr.f64_opt("rope_theta")?.ok_or_else(|| r.err("`rope_parameters.rope_theta` is missing".into()))?
                }
                None => 10000.0,
            },
        };
        if let Some(scaling) = r.present("rope_scaling") {
            let t =
                scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
            if t != "default" {
                return Err(r.err(format!("rope_scaling type {t:?} is not supported (only \"default\")")));
            }
        }
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(r.err(format!("rope_theta must be a positive number, got {rope_theta}")));
        }
        let rms_norm_eps = r.f64_opt("rms_norm_eps")?.unwrap_or(1e-6) as f32;
        let (default_norm_topk, shared) = match architecture {
            Architecture::Mixtral => (true, None),
            Architecture::Qwen2Moe => (false, Some(r.positive("shared_expert_intermediate_size")?)),
            Architecture::Qwen3Moe | Architecture::Olmoe => (false, None),
        };
        // Mixtral always renormalizes over the chosen k; the others follow `norm_topk_prob`.
        let norm_topk_prob = match architecture {
            Architecture::Mixtral => true,
            _ => r.bool_or("norm_topk_prob", default_norm_topk)?,
        };
        let (decoder_sparse_step, mlp_only_layers) = match architecture {
            Architecture::Qwen2Moe | Architecture::Qwen3Moe => {
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
            _ => (1, vec![]),
        };
        let attention_bias = match architecture {
            Architecture::Qwen2Moe => r.bool_or("qkv_bias", true)?,
            _ => r.bool_or("attention_bias", false)?,
        };
        let qk_norm = match architecture {
            Architecture::Qwen3Moe => QkNorm::PerHead,
            Architecture::Olmoe => QkNorm::Whole,
            _ => QkNorm::None,
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
        let max_position_embeddings = r.positive("max_position_embeddings")?;
        let vocab_size = r.positive("vocab_size")?;
        let tie_word_embeddings = r.bool_or("tie_word_embeddings", false)?;
        let bos_token_id = r.ids("bos_token_id")?.first().copied();
        Ok(Self {
            architecture,
            vocab_size,
            hidden_size,
            num_layers: r.positive("num_hidden_layers")?,
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
        })
    }

    /// Whether layer `i` has a sparse MoE block (else a dense MLP), as transformers decides.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i) && self.num_experts > 0 && (i + 1) % self.decoder_sparse_step == 0
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

    /// Indices of the layers with routed experts.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_layers).filter(|&l| self.is_moe_layer(l)).collect()
    }

    /// Rotary inverse frequencies, `head_dim / 2` of them.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim as f64;
        (0..self.head_dim / 2).map(|i| (1.0 / self.rope_theta.powf((2 * i) as f64 / d)) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "architectures": ["MixtralForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 96,
            "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 100,
            "max_position_embeddings": 128, "rope_theta": 1e6, "head_dim": null, "eos_token_id": [2, 7]
        })
    }

    fn parse(v: &Value) -> Result<ModelConfig> {
        ModelConfig::parse(&v.to_string(), Path::new("config.json"))
    }

    #[test]
    fn rope_forms_and_null_head_dim() {
        let mut v = base();
        let c = parse(&v).unwrap();
        assert_eq!((c.head_dim, c.rope_theta, c.eos_token_ids.clone()), (16, 1e6, vec![2, 7]));
        v.as_object_mut().unwrap().remove("rope_theta");
        v["rope_parameters"] = serde_json::json!({"rope_theta": 5e5, "rope_type": "default"});
        v["eos_token_id"] = serde_json::json!(3);
        let c = parse(&v).unwrap();
        assert_eq!((c.rope_theta, c.eos_token_ids), (5e5, vec![3]));
    }

    #[test]
    fn unknown_architecture_lists_supported() {
        let mut v = base();
        v["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        let e = parse(&v).unwrap_err().to_string();
        assert!(
            e.contains("LlamaForCausalLM") && e.contains("OlmoeForCausalLM") && e.contains("Qwen3MoeForCausalLM"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let mut v = base();
        v["hidden_size"] = serde_json::json!("big");
        assert!(parse(&v).unwrap_err().to_string().contains("hidden_size"));
        let mut v = base();
        v["num_experts_per_tok"] = serde_json::json!(9);
        assert!(parse(&v).unwrap_err().to_string().contains("num_experts_per_tok"));
        let e = ModelConfig::parse("{not json", Path::new("x/config.json")).unwrap_err().to_string();
        assert!(e.contains("x/config.json") && e.contains("JSON"), "{e}");
    }
}
