//! Random PEFT LoRA adapters for the demo layout, written as current PEFT (0.21, transformers 5)
//! writes them, so that tenants' adapters can be tried and measured with no downloads:
//! `adapter_config.json` + `adapter_model.safetensors` with `base_model.model.<module>.lora_A/B.weight`
//! pairs; attention through `target_modules`, the MoE gate (`mlp.gate.weight`) and the fused
//! experts (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`: one pair for all experts, the
//! first under `experts.base_layer`) through `target_parameters`.

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
    /// Every routed expert's fused gate/up and down projections.
    Experts,
}

fn pair(rng: &mut Rng, rank: usize, inp: usize, out: usize, strength: f32) -> (Tensor, Tensor) {
    let a_scale = 2.0 * 3f32.sqrt() / (inp as f32).sqrt();
    let mut values =
        |n: usize, scale: f32| -> Vec<u8> { (0..n).flat_map(|_| (rng.signed() * scale).to_le_bytes()).collect() };
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
    let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    // (module, in, out, rows of A: rank, or experts x rank for a fused pair)
    let mut modules: Vec<(String, usize, usize, usize)> = Vec::new();
    let mut target_modules: Vec<&str> = Vec::new();
    let mut target_parameters: Vec<&str> = Vec::new();
    for t in targets {
        match t {
            DemoTarget::Q => target_modules.push("q_proj"),
            DemoTarget::K => target_modules.push("k_proj"),
            DemoTarget::V => target_modules.push("v_proj"),
            DemoTarget::O => target_modules.push("o_proj"),
            DemoTarget::Gate => target_parameters.push("mlp.gate.weight"),
            DemoTarget::Experts => target_parameters.extend(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
        }
    }
    for l in 0..spec.num_layers {
        let p = format!("model.layers.{l}");
        for t in targets {
            match t {
                DemoTarget::Q => modules.push((format!("{p}.self_attn.q_proj"), h, h, rank)),
                DemoTarget::K => modules.push((format!("{p}.self_attn.k_proj"), h, kvw, rank)),
                DemoTarget::V => modules.push((format!("{p}.self_attn.v_proj"), h, kvw, rank)),
                DemoTarget::O => modules.push((format!("{p}.self_attn.o_proj"), h, h, rank)),
                DemoTarget::Gate => modules.push((format!("{p}.mlp.gate"), h, e, rank)),
                DemoTarget::Experts => {
                    modules.push((format!("{p}.mlp.experts.base_layer"), h, 2 * i, e * rank));
                    modules.push((format!("{p}.mlp.experts"), i, h, e * rank));
                }
            }
        }
    }
    let mut tensors = Vec::new();
    for (m, inp, out, rows) in modules {
        let (a, b) = pair(&mut rng, rows, inp, out, strength);
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
        "target_modules": target_modules,
        "target_parameters": target_parameters,
        "lora_dropout": 0.0,
    });
    let cfg_path = dir.join("adapter_config.json");
    std::fs::write(&cfg_path, config.to_string()).map_err(|error| DemoError::Io { path: cfg_path, error })
}
