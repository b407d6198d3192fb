//! A DeepSeek-V3-layout random checkpoint with the same active parameters per token as a
//! Mixtral-layout [`DemoSpec`], so `moe bench` can compare the two layouts' decode speed on one
//! machine: multi-head latent attention sized to match grouped-query attention's weights, four
//! times the routed experts at half the width with top-(2k-1) plus one shared expert (the same
//! expert FLOPs as top-k at full width), grouped sigmoid routing, and a dense first layer as wide
//! as the active experts.

use crate::{ones, tensor, write_file, DemoSpec, Result, Rng};
use std::path::Path;

/// Writes the DeepSeek-shaped counterpart of `spec` into `dir`. Returns the parameter count.
pub(crate) fn write(dir: &Path, spec: &DemoSpec) -> Result<usize> {
    std::fs::create_dir_all(dir).map_err(|error| crate::DemoError::Io { path: dir.to_path_buf(), error })?;
    let h = spec.hidden_size;
    let heads = spec.num_heads;
    let hd = h / heads;
    let (q_rank, kv_rank, nope, rope, v) = (3 * h / 8, h / 4, hd / 2, hd / 2, hd);
    let qk = nope + rope;
    let (experts, inter, top_k) = (4 * spec.num_experts, spec.intermediate_size / 2, 2 * spec.top_k - 1);
    let dense_inter = spec.top_k * spec.intermediate_size;
    let dt = spec.dtype;
    let mut rng = Rng::new(spec.seed);
    let proj = 1.0 / (h as f32).sqrt();
    let mut tensors = vec![("model.embed_tokens.weight".to_string(), tensor(&mut rng, dt, &[spec.vocab_size, h], 1.0))];
    for l in 0..spec.num_layers {
        let p = format!("model.layers.{l}");
        let a = format!("{p}.self_attn");
        tensors.push((format!("{p}.input_layernorm.weight"), ones(dt, h)));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), ones(dt, h)));
        tensors.push((format!("{a}.q_a_proj.weight"), tensor(&mut rng, dt, &[q_rank, h], proj)));
        tensors.push((format!("{a}.q_a_layernorm.weight"), ones(dt, q_rank)));
        let q_std = 1.0 / (q_rank as f32).sqrt();
        tensors.push((format!("{a}.q_b_proj.weight"), tensor(&mut rng, dt, &[heads * qk, q_rank], q_std)));
        tensors.push((format!("{a}.kv_a_proj_with_mqa.weight"), tensor(&mut rng, dt, &[kv_rank + rope, h], proj)));
        tensors.push((format!("{a}.kv_a_layernorm.weight"), ones(dt, kv_rank)));
        let kv_std = 1.0 / (kv_rank as f32).sqrt();
        tensors.push((format!("{a}.kv_b_proj.weight"), tensor(&mut rng, dt, &[heads * (nope + v), kv_rank], kv_std)));
        tensors.push((format!("{a}.o_proj.weight"), tensor(&mut rng, dt, &[h, heads * v], proj * 0.5)));
        let mlp = format!("{p}.mlp");
        let ffn = |rng: &mut Rng, t: &mut Vec<(String, crate::Tensor)>, q: &str, i: usize| {
            t.push((format!("{q}.gate_proj.weight"), tensor(rng, dt, &[i, h], proj)));
            t.push((format!("{q}.up_proj.weight"), tensor(rng, dt, &[i, h], proj)));
            t.push((format!("{q}.down_proj.weight"), tensor(rng, dt, &[h, i], 0.5 / (i as f32).sqrt())));
        };
        if l == 0 {
            ffn(&mut rng, &mut tensors, &mlp, dense_inter);
            continue;
        }
        tensors.push((format!("{mlp}.gate.weight"), tensor(&mut rng, dt, &[experts, h], 2.0 * proj)));
        tensors.push((
            format!("{mlp}.gate.e_score_correction_bias"),
            tensor(&mut rng, crate::DemoDtype::F32, &[experts], 0.01),
        ));
        for x in 0..experts {
            ffn(&mut rng, &mut tensors, &format!("{mlp}.experts.{x}"), inter);
        }
        ffn(&mut rng, &mut tensors, &format!("{mlp}.shared_experts"), inter);
    }
    tensors.push(("model.norm.weight".into(), ones(dt, h)));
    tensors.push(("lm_head.weight".into(), tensor(&mut rng, dt, &[spec.vocab_size, h], proj * 4.0)));
    let params: usize = tensors.iter().map(|(_, t)| t.shape.iter().product::<usize>()).sum();
    let st_path = dir.join("model.safetensors");
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), None, &st_path)
        .map_err(|e| crate::DemoError::Write { path: st_path.clone(), message: e.to_string() })?;
    let config = serde_json::json!({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": h,
        "intermediate_size": dense_inter,
        "moe_intermediate_size": inter,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "q_lora_rank": q_rank,
        "kv_lora_rank": kv_rank,
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope,
        "v_head_dim": v,
        "rope_interleave": true,
        "n_routed_experts": experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": top_k,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": true,
        "first_k_dense_replace": 1,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "bos_token_id": crate::tokenizer::BOS_ID,
        "eos_token_id": crate::tokenizer::EOS_ID,
        "hidden_act": "silu",
        "dtype": match dt { crate::DemoDtype::F32 => "float32", crate::DemoDtype::Bf16 => "bfloat16" },
    });
    write_file(&dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap_or_default().as_bytes())?;
    write_file(&dir.join("tokenizer.json"), crate::byte_level_tokenizer_json().as_bytes())?;
    Ok(params)
}
