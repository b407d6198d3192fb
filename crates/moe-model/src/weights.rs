//! Loading a checkpoint's tensors into backend weights, with the names and shapes each
//! architecture uses. q/k/v are fused into one `[q+k+v, H]` matrix and each SwiGLU's gate and up
//! projections into one `[2I, H]` matrix, so each needs one matrix multiply per step. Matrices
//! stored as bf16 stay bf16 (the backend widens them in its kernels); vectors become f32.

use crate::checkpoint::Checkpoint;
use crate::config::{Architecture, ModelConfig, QkNorm};
use crate::error::Result;
use crate::loader::Loader;
use moe_compute::{Backend, SwigluWeights};

pub struct AttentionWeights<B: Backend> {
    /// `[q | k | v]` rows, then for gated attention (Qwen3-Next) the output gate's rows.
    pub qkv: B::Matrix,
    pub qkv_bias: Option<B::Vector>,
    pub o: B::Matrix,
    /// gpt-oss's `o_proj.bias`.
    pub o_bias: Option<B::Vector>,
    pub q_norm: Option<B::Vector>,
    pub k_norm: Option<B::Vector>,
    /// gpt-oss's attention sinks, one logit per query head (on the host; the backend reads them
    /// through [`moe_compute::AttentionShape::sinks`]).
    pub sinks: Option<Vec<f32>>,
}

pub struct MoeWeights<B: Backend> {
    /// The router linear, `[E, H]`.
    pub gate: B::Matrix,
    /// The gate's `e_score_correction_bias` (sigmoid routing; selection only), on the host where
    /// routing runs.
    pub gate_bias: Option<Vec<f32>>,
    /// The router linear's own bias (gpt-oss), added to the logits.
    pub router_bias: Option<B::Vector>,
    /// Every routed expert, or empty when experts live elsewhere (a router's dense-only model).
    pub experts: Vec<SwigluWeights<B>>,
    /// The shared expert(s), run by the router for every token.
    pub shared: Option<SharedExpert<B>>,
}

/// Shared experts: one SwiGLU (DeepSeek's `n_shared_experts` are one wide FFN) and, for
/// Qwen2-MoE, its `[1, H]` sigmoid gate.
pub struct SharedExpert<B: Backend> {
    pub ffn: SwigluWeights<B>,
    pub gate: Option<B::Matrix>,
}

/// A layer's token mixer: grouped-query attention (with its variants), multi-head latent
/// attention, or linear attention (gated DeltaNet).
pub enum LayerAttention<B: Backend> {
    Grouped(AttentionWeights<B>),
    Latent(crate::mla_weights::LatentWeights<B>),
    Linear(crate::delta_net_weights::DeltaNetLayer<B>),
}

pub enum FfnWeights<B: Backend> {
    Dense(SwigluWeights<B>),
    Moe(MoeWeights<B>),
}

pub struct LayerWeights<B: Backend> {
    pub input_norm: B::Vector,
    pub attention: LayerAttention<B>,
    pub post_attention_norm: B::Vector,
    pub ffn: FfnWeights<B>,
}

pub struct ModelWeights<B: Backend> {
    pub embed: B::Matrix,
    pub layers: Vec<LayerWeights<B>>,
    pub norm: B::Vector,
    /// `None` when the output head is tied to the embeddings.
    pub lm_head: Option<B::Matrix>,
}

impl<B: Backend> Loader<'_, B> {
    fn swiglu(&self, prefix: &str, names: [&str; 3], inter: usize) -> Result<SwigluWeights<B>> {
        let h = self.cfg.hidden_size;
        let [gate, up, down] = names;
        Ok(SwigluWeights::plain(
            self.stacked(&[(format!("{prefix}.{gate}.weight"), inter), (format!("{prefix}.{up}.weight"), inter)], h)?,
            self.matrix(&format!("{prefix}.{down}.weight"), h, inter)?,
        ))
    }

    fn attention(&self, p: &str) -> Result<AttentionWeights<B>> {
        let c = self.cfg;
        let (h, qw, kw) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        // Gated attention's q_proj holds each head's q rows, then its gate rows: split them.
        let q_rows = (if c.gated_attention { 2 } else { 1 }) * qw;
        let pick = |gate| match c.gated_attention {
            true => crate::delta_net_weights::gated_q_rows(c.num_heads, c.head_dim, gate),
            false => (0..qw).collect(),
        };
        let mut parts = vec![
            (format!("{p}.q_proj.weight"), q_rows, pick(false)),
            (format!("{p}.k_proj.weight"), kw, (0..kw).collect()),
            (format!("{p}.v_proj.weight"), kw, (0..kw).collect()),
        ];
        if c.gated_attention {
            parts.push((format!("{p}.q_proj.weight"), q_rows, pick(true)));
        }
        let qkv_bias = if c.attention_bias {
            let q_bias = self.ckpt.read(&format!("{p}.q_proj.bias"), &[q_rows])?;
            let mut b: Vec<f32> = pick(false).iter().map(|&i| q_bias[i]).collect();
            b.extend(self.ckpt.read(&format!("{p}.k_proj.bias"), &[kw])?);
            b.extend(self.ckpt.read(&format!("{p}.v_proj.bias"), &[kw])?);
            if c.gated_attention {
                b.extend(pick(true).iter().map(|&i| q_bias[i]));
            }
            Some(self.backend.vector(b)?)
        } else {
            None
        };
        let (q_norm, k_norm) = match c.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (
                Some(self.norm(&format!("{p}.q_norm.weight"), c.head_dim)?),
                Some(self.norm(&format!("{p}.k_norm.weight"), c.head_dim)?),
            ),
            QkNorm::Whole => (
                Some(self.vector(&format!("{p}.q_norm.weight"), qw)?),
                Some(self.vector(&format!("{p}.k_norm.weight"), kw)?),
            ),
        };
        let gpt_oss = c.gpt_oss.is_some();
        let o_bias =
            if gpt_oss && c.attention_bias { Some(self.vector(&format!("{p}.o_proj.bias"), h)?) } else { None };
        let sinks = if gpt_oss { Some(self.ckpt.read(&format!("{p}.sinks"), &[c.num_heads])?) } else { None };
        Ok(AttentionWeights {
            qkv: self.gathered(&parts, h)?,
            qkv_bias,
            o: self.matrix(&format!("{p}.o_proj.weight"), h, qw)?,
            o_bias,
            q_norm,
            k_norm,
            sinks,
        })
    }

    fn expert(&self, layer: usize, expert: usize) -> Result<SwigluWeights<B>> {
        let c = self.cfg;
        if c.architecture == Architecture::GptOss {
            return crate::fused_experts::load(self.ckpt, c, self.backend, layer, expert);
        }
        let p = format!("model.layers.{layer}.{}.experts.{expert}", c.architecture.moe_prefix());
        let names: [&str; 3] = match c.architecture {
            Architecture::Mixtral => ["w1", "w3", "w2"],
            _ => ["gate_proj", "up_proj", "down_proj"],
        };
        self.swiglu(&p, names, c.expert_intermediate_size)
    }

    fn moe(&self, layer: usize, with_experts: bool) -> Result<MoeWeights<B>> {
        let c = self.cfg;
        let p = format!("model.layers.{layer}.{}", c.architecture.moe_prefix());
        let experts = if with_experts {
            (0..c.num_experts).map(|e| self.expert(layer, e)).collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let shared = match c.shared_expert_intermediate_size {
            Some(si) if c.shared_expert_gated => Some(SharedExpert {
                ffn: self.swiglu(&format!("{p}.shared_expert"), ["gate_proj", "up_proj", "down_proj"], si)?,
                gate: Some(self.matrix(&format!("{p}.shared_expert_gate.weight"), 1, c.hidden_size)?),
            }),
            Some(si) => Some(SharedExpert {
                ffn: self.swiglu(&format!("{p}.shared_experts"), ["gate_proj", "up_proj", "down_proj"], si)?,
                gate: None,
            }),
            None => None,
        };
        let gate_bias = if c.routing.correction_bias {
            Some(self.ckpt.read(&format!("{p}.gate.e_score_correction_bias"), &[c.num_experts])?)
        } else {
            None
        };
        let gate = c.architecture.gate_name();
        let router_bias = if c.architecture == Architecture::GptOss {
            Some(self.vector(&format!("{p}.{gate}.bias"), c.num_experts)?)
        } else {
            None
        };
        Ok(MoeWeights {
            gate: self.matrix(&format!("{p}.{gate}.weight"), c.num_experts, c.hidden_size)?,
            gate_bias,
            router_bias,
            experts,
            shared,
        })
    }
}

/// Loads one routed expert's weights (what a worker hosts).
pub fn load_expert<B: Backend>(
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    backend: &B,
    layer: usize,
    expert: usize,
) -> Result<SwigluWeights<B>> {
    check_backend(cfg, backend)?;
    Loader { ckpt, backend, cfg }.expert(layer, expert)
}

/// Refuses, naming what is missing, an architecture whose operations `backend` lacks.
pub fn check_backend<B: Backend>(cfg: &ModelConfig, backend: &B) -> Result<()> {
    let lacks = |feature| {
        Err(crate::ModelError::BackendLacks {
            architecture: cfg.architecture.hf_name(),
            feature,
            backend: backend.name(),
        })
    };
    if cfg.latent.is_some() && !backend.supports_latent_attention() {
        return lacks("multi-head latent attention");
    }
    if cfg.gpt_oss.is_some() && !backend.supports_gpt_oss() {
        return lacks("attention sinks and biased, clamped SwiGLU experts");
    }
    if (cfg.linear.is_some() || cfg.gated_attention) && !backend.supports_linear_attention() {
        return lacks("gated DeltaNet linear attention and gated full attention");
    }
    match &cfg.quantization {
        Some(crate::Quantization::Other(method)) if !(method == "mxfp4" && cfg.gpt_oss.is_some()) => {
            Err(crate::ModelError::UnsupportedQuantization { method: method.clone() })
        }
        _ => Ok(()),
    }
}

/// Loads every weight the config calls for; the routed experts only if `with_experts`.
pub fn load_weights<B: Backend>(
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    backend: &B,
    with_experts: bool,
) -> Result<ModelWeights<B>> {
    // Refuse up front (naming the numbers) when the weights cannot fit on the device: every
    // tensor this process loads, at 2 bytes per value as the GPU keeps them.
    let needed: usize = ckpt
        .names()
        .into_iter()
        .filter(|n| with_experts || !n.contains(".experts."))
        .filter_map(|n| ckpt.shape_of(n))
        .map(|s| 2 * s.iter().product::<usize>())
        .sum();
    backend.ensure_room("the model's weights", needed)?;
    check_backend(cfg, backend)?;
    let l = Loader { ckpt, backend, cfg };
    let h = cfg.hidden_size;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        let ffn = if cfg.is_moe_layer(i) {
            FfnWeights::Moe(l.moe(i, with_experts)?)
        } else {
            FfnWeights::Dense(l.swiglu(
                &format!("{p}.mlp"),
                ["gate_proj", "up_proj", "down_proj"],
                cfg.intermediate_size,
            )?)
        };
        let attention = match (&cfg.latent, &cfg.linear) {
            (_, Some(linear)) if cfg.is_linear_layer(i) => LayerAttention::Linear(
                crate::delta_net_weights::load_delta_net(&l, &linear.shape, &format!("{p}.linear_attn"))?,
            ),
            (Some(latent), _) => {
                LayerAttention::Latent(crate::mla_weights::load_latent(&l, latent, &format!("{p}.self_attn"))?)
            }
            _ => LayerAttention::Grouped(l.attention(&format!("{p}.self_attn"))?),
        };
        layers.push(LayerWeights {
            input_norm: l.norm(&format!("{p}.input_layernorm.weight"), h)?,
            attention,
            post_attention_norm: l.norm(&format!("{p}.post_attention_layernorm.weight"), h)?,
            ffn,
        });
        tracing::debug!(layer = i, "loaded");
    }
    let lm_head = if cfg.tie_word_embeddings { None } else { Some(l.matrix("lm_head.weight", cfg.vocab_size, h)?) };
    Ok(ModelWeights {
        embed: l.matrix("model.embed_tokens.weight", cfg.vocab_size, h)?,
        layers,
        norm: l.norm("model.norm.weight", h)?,
        lm_head,
    })
}
