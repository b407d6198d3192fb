//! What a model needs before any weight is read: its parameters (all of them, those a token
//! activates, and the split between the router's dense part and the workers' routed experts)
//! and its KV cache per token, from config.json alone. `moe inspect` prints it, and every load
//! logs it first, so a user learns that a checkpoint cannot fit before waiting for it to load.

use crate::config::ModelConfig;

/// Parameter counts and KV footprint of a config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSize {
    /// Every parameter the serving path loads (no multi-token-prediction layers).
    pub total_params: u64,
    /// Parameters one token runs through (top-k routed experts, not all of them; the embedding
    /// table, of which a token reads one row, is not counted, as model cards count it).
    pub active_params: u64,
    /// Parameters of the routed experts (what workers hold).
    pub expert_params: u64,
    /// KV cache values per token over all layers (for latent attention: the latent and rope key).
    pub kv_values_per_token: u64,
    /// Recurrent state values per sequence over the linear-attention layers (hybrid models).
    pub state_values_per_sequence: u64,
}

impl ModelSize {
    pub fn of(c: &ModelConfig) -> Self {
        let (h, v) = (c.hidden_size as u64, c.vocab_size as u64);
        let attention = match &c.latent {
            Some(a) => {
                let (heads, qk) = (c.num_heads as u64, a.qk_head_dim() as u64);
                let (rank, rope) = (a.kv_lora_rank as u64, a.qk_rope_head_dim as u64);
                let q = match a.q_lora_rank {
                    Some(r) => h * r as u64 + r as u64 + r as u64 * heads * qk,
                    None => h * heads * qk,
                };
                let kv = h * (rank + rope) + rank + rank * heads * (a.qk_nope_head_dim + a.v_head_dim) as u64;
                q + kv + heads * a.v_head_dim as u64 * h
            }
            None => {
                let (q, kv) = ((c.num_heads * c.head_dim) as u64, (c.num_kv_heads * c.head_dim) as u64);
                // Gated attention's q_proj also makes the output gate.
                let q_out = if c.gated_attention { 2 * q } else { q };
                let bias = if c.attention_bias { q_out + 2 * kv } else { 0 };
                let norms = match c.qk_norm {
                    crate::QkNorm::None => 0,
                    crate::QkNorm::PerHead => 2 * c.head_dim as u64,
                    crate::QkNorm::Whole => q + kv,
                };
                h * (q_out + 2 * kv) + bias + q * h + norms
            }
        };
        let swiglu = |inter: usize| 3 * h * inter as u64;
        let (mut total, mut active, mut experts) = (0u64, 0u64, 0u64);
        let linear_attention = c.linear.as_ref().map_or(0, |l| {
            let s = &l.shape;
            let (proj, conv) = (s.proj_cols() as u64, (s.conv_dim() * s.conv_kernel) as u64);
            h * proj + conv + 2 * s.v_heads as u64 + s.v_head_dim as u64 + s.value_dim() as u64 * h
        });
        for layer in 0..c.num_layers {
            let mixer = if c.is_linear_layer(layer) { linear_attention } else { attention };
            let dense = mixer + 2 * h;
            let (all, used) = if c.is_moe_layer(layer) {
                let e = c.num_experts as u64;
                let gate = e * h + if c.routing.correction_bias { e } else { 0 };
                let shared = c
                    .shared_expert_intermediate_size
                    .map_or(0, |s| swiglu(s) + if c.shared_expert_gated { h } else { 0 });
                let routed = swiglu(c.expert_intermediate_size);
                experts += e * routed;
                (gate + shared + e * routed, gate + shared + c.top_k as u64 * routed)
            } else {
                (swiglu(c.intermediate_size), swiglu(c.intermediate_size))
            };
            total += dense + all;
            active += dense + used;
        }
        // A tied head is the embedding table, which a token then multiplies by in full.
        let head = v * h;
        let outer_head = if c.tie_word_embeddings { 0 } else { v * h };
        let outer = v * h + outer_head + h;
        Self {
            total_params: total + outer,
            active_params: active + head + h,
            expert_params: experts,
            kv_values_per_token: (c.kv_layers() * c.kv_values_per_token_layer()) as u64,
            state_values_per_sequence: c.linear.as_ref().map_or(0, |l| (l.count() * l.shape.state_floats()) as u64),
        }
    }

    /// A line for people: parameters, bf16 bytes, the router/worker split, KV per token.
    pub fn describe(&self, c: &ModelConfig) -> String {
        let mut kind = match &c.latent {
            Some(a) => format!("latent: {} values x {} layers", a.latent_dim(), c.kv_layers()),
            None => format!("{} KV heads x {} x 2 x {} layers", c.num_kv_heads, c.head_dim, c.kv_layers()),
        };
        if let Some(l) = &c.linear {
            kind += &format!(
                "; plus a recurrent state of {} per sequence in f32 over {} linear-attention layers",
                bytes(4 * self.state_values_per_sequence),
                l.count()
            );
        }
        format!(
            "{}: {} parameters ({} active per token), {} in bf16; routed experts {} (on workers), \
             router's dense part {}; KV cache {} per token in bf16 ({kind})",
            c.architecture.hf_name(),
            count(self.total_params),
            count(self.active_params),
            bytes(2 * self.total_params),
            bytes(2 * self.expert_params),
            bytes(2 * (self.total_params - self.expert_params)),
            bytes(2 * self.kv_values_per_token),
        )
    }
}

fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
