//! Random PEFT LoRA adapters for the demo layout (Mixtral names), so that tenants' adapters can
//! be tried and measured with no downloads: `adapter_config.json` + `adapter_model.safetensors`
//! with `base_model.model.<module>.lora_A/B.weight` pairs on the chosen targets of every layer.

use crate::{DemoError, DemoSpec, Result, Rng, Tensor};
use safetensors::Dtype;
use std::path::Path;

/// What a demo adapter adapts on every layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DemoTarget {
    Q,
    K,
    V,
    O,
    /// The MoE gate (the router linear): a tenant's own expert routing.
    Gate,
    /// Every routed expert's w1, w3 and w2.
    Experts,
}

fn pair(rng: &mut Rng, rank: usize, inp: usize, out: usize, strength: f32) -> (Tensor, Tensor) {
    let a_scale = 2.0 * 3f32.sqrt() / (inp as f32).sqrt();
    let mut values =
        |n: usize, scale: f32| -> Vec<u8> { (0..n).flat_map(|_| (rng.uniform() * scale).to_le_bytes()).collect() };
    let a = Tensor { dtype: Dtype::F32, shape: vec![rank, inp], bytes: values(rank * inp, a_scale) };
    let b = Tensor { dtype: Dtype::F32, shape: vec![out, rank], bytes: values(out * rank, strength) };
    (a, b)
}

/// Writes a random adapter of rank `rank` for a model made from `spec` into `dir`. `strength`
/// bounds B's entries: 0.5 changes outputs and routing visibly; 0.01 leaves routing as the base
/// model's (what a benchmark of the LoRA math alone wants).
pub fn write_demo_adapter(
    dir: &Path,
    spec: &DemoSpec,
    targets: &[DemoTarget],
    rank: usize,
    strength: f32,
    seed: u64,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|error| DemoError::Io { path: dir.to_path_buf(), error })?;
    let (h, i, e) = (spec.hidden_size, spec.intermediate_size, spec.num_experts);
    let kvw = spec.num_kv_heads * (h / spec.num_heads);
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut modules: Vec<(String, usize, usize)> = Vec::new();
    for l in 0..spec.num_layers {
        let p = format!("model.layers.{l}");
        for t in targets {
            match t {
                DemoTarget::Q => modules.push((format!("{p}.self_attn.q_proj"), h, h)),
                DemoTarget::K => modules.push((format!("{p}.self_attn.k_proj"), h, kvw)),
                DemoTarget::V => modules.push((format!("{p}.self_attn.v_proj"), h, kvw)),
                DemoTarget::O => modules.push((format!("{p}.self_attn.o_proj"), h, h)),
                DemoTarget::Gate => modules.push((format!("{p}.block_sparse_moe.gate"), h, e)),
                DemoTarget::Experts => {
                    for x in 0..e {
                        let q = format!("{p}.block_sparse_moe.experts.{x}");
                        modules.push((format!("{q}.w1"), h, i));
                        modules.push((format!("{q}.w3"), h, i));
                        modules.push((format!("{q}.w2"), i, h));
                    }
                }
            }
        }
    }
    let mut tensors = Vec::new();
    for (m, inp, out) in modules {
        let (a, b) = pair(&mut rng, rank, inp, out, strength);
        tensors.push((format!("base_model.model.{m}.lora_A.weight"), a));
        tensors.push((format!("base_model.model.{m}.lora_B.weight"), b));
    }
    let path = dir.join("adapter_model.safetensors");
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), None, &path)
        .map_err(|e| DemoError::Write { path: path.clone(), message: e.to_string() })?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "bias": "none",
        "target_modules": null,
    });
    let cfg_path = dir.join("adapter_config.json");
    std::fs::write(&cfg_path, config.to_string()).map_err(|error| DemoError::Io { path: cfg_path, error })
}
