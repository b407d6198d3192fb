//! The supported `architectures` values of a checkpoint's config.json, and what each names:
//! its Hugging Face class and where its MoE block and gate live in the checkpoint.

/// The supported `architectures` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
    /// DeepSeek-V3/R1, Kimi K2, Moonlight: multi-head latent attention, grouped sigmoid routing.
    DeepseekV3,
    /// GLM-4.5/4.6: partial rotary, grouped sigmoid routing, shared experts.
    Glm4Moe,
    /// gpt-oss: attention sinks, alternating sliding-window layers, biased clamped experts.
    GptOss,
    /// Qwen3-Next: gated DeltaNet layers between gated full-attention ones, zero-centred norms.
    Qwen3Next,
}

impl Architecture {
    pub const ALL: [(&'static str, Architecture); 8] = [
        ("MixtralForCausalLM", Architecture::Mixtral),
        ("Qwen2MoeForCausalLM", Architecture::Qwen2Moe),
        ("Qwen3MoeForCausalLM", Architecture::Qwen3Moe),
        ("OlmoeForCausalLM", Architecture::Olmoe),
        ("DeepseekV3ForCausalLM", Architecture::DeepseekV3),
        ("Glm4MoeForCausalLM", Architecture::Glm4Moe),
        ("GptOssForCausalLM", Architecture::GptOss),
        ("Qwen3NextForCausalLM", Architecture::Qwen3Next),
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

    /// Name of the MoE gate (the router linear) under [`Self::moe_prefix`].
    pub fn gate_name(self) -> &'static str {
        match self {
            Architecture::GptOss => "router",
            _ => "gate",
        }
    }
}
