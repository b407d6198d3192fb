//! The PEFT adapter format: `adapter_config.json` (rank, alpha, rsLoRA, target modules, per-module
//! rank and alpha patterns) and the tensor names of `adapter_model.safetensors`
//! (`base_model.model.<module>.lora_A.weight`, `[r, in]`, and `.lora_B.weight`, `[out, r]`).
//! [`AdapterManifest::read`] maps every module to what it adapts in the base model and checks
//! its shapes from the file header alone, so a bad adapter is refused before any weight is read.

use crate::config::PeftConfig;
use crate::error::{LoraError, Result};
use moe_model::checkpoint::Checkpoint;
use moe_model::{Architecture, ModelConfig};
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";
/// Ranks above this are refused (a LoRA of higher rank is no longer low-rank, and would let one
/// tenant's adapter cost more than the base layer).
pub const MAX_RANK: usize = 512;

/// Which projection of an expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertProj {
    Gate,
    Up,
    Down,
}

/// What a module adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleKind {
    Q,
    K,
    V,
    O,
    /// Latent attention's `q_a_proj` (q's down-projection; `q_b_proj` and `q_proj` are `Q`).
    QA,
    /// Latent attention's `kv_a_proj_with_mqa` (the latent and the rope key).
    KvA,
    /// Latent attention's `kv_b_proj` (every head's keys and values out of the latent).
    KvB,
    /// The MoE router linear.
    Gate,
    Expert {
        expert: usize,
        proj: ExpertProj,
    },
    /// Every routed expert's fused parameter at once (transformers 5's `experts.gate_up_proj`
    /// `[E, 2I, H]` or `experts.down_proj` `[E, H, I]`, PEFT `target_parameters`): `lora_A` is
    /// `[E·r, in]` expert-major, `lora_B` is `[out, E·r]` with the expert index fastest
    /// (PEFT's `ParamWrapper`: A as `(E, r, in)`, B as `(out, r, E)`).
    FusedExperts {
        proj: FusedProj,
    },
}

/// Which fused expert parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusedProj {
    /// `gate_up_proj`: gate rows, then up rows.
    GateUp,
    Down,
}

/// Where a LoRA pair applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraTarget {
    pub layer: usize,
    pub kind: ModuleKind,
}

/// One adapted module: its name, target, shapes and scale, checked against the base model.
#[derive(Clone, Debug)]
pub struct TargetModule {
    pub module: String,
    pub target: LoraTarget,
    /// Rank per expert for fused experts, else the pair's rank.
    pub rank: usize,
    /// Experts stacked in the pair (the model's count for fused experts, else 1).
    pub experts: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scale: f32,
}

/// An adapter directory, read and checked: its config, tensor file and modules.
pub struct AdapterManifest {
    pub dir: PathBuf,
    pub config: PeftConfig,
    pub weights: Checkpoint,
    pub modules: Vec<TargetModule>,
    /// Bytes of the two files, hashed (FNV-1a, 64-bit) into the adapter's digest.
    pub digest: String,
}

fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *hash ^= b as u64;
        *hash = hash.wrapping_mul(0x0000_0100_0000_01B3);
    }
}

/// The fused parameter a pair of `[E·r, in]` / `[out, E·r]` adapts: gate_up_proj maps H to 2I,
/// down_proj I to H (never both: that would need I = H = 2I).
fn fused_proj(a: &[usize], b: &[usize], c: &ModelConfig) -> std::result::Result<(FusedProj, usize, usize), String> {
    let (h, i) = (c.hidden_size, c.expert_intermediate_size);
    match (a.get(1).copied(), b.first().copied()) {
        (Some(inp), Some(out)) if (inp, out) == (h, 2 * i) => Ok((FusedProj::GateUp, inp, out)),
        (Some(inp), Some(out)) if (inp, out) == (i, h) => Ok((FusedProj::Down, inp, out)),
        _ => Err(format!(
            "fused expert LoRA with lora_A {a:?} and lora_B {b:?} fits neither experts.gate_up_proj \
             (lora_A [E·r, {h}], lora_B [{}, E·r]) nor experts.down_proj (lora_A [E·r, {i}], lora_B [{h}, E·r])",
            2 * i
        )),
    }
}

/// Maps a module name to its target, or says why it cannot be applied.
fn classify(module: &str, cfg: &ModelConfig) -> std::result::Result<(LoraTarget, usize, usize), String> {
    let c = cfg;
    let (qw, kw) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let h = c.hidden_size;
    let rest = module
        .strip_prefix("model.layers.")
        .ok_or_else(|| "only modules under model.layers (attention, MoE gate, experts) can be adapted".to_string())?;
    let (layer, rest) = rest.split_once('.').ok_or("no module after the layer index")?;
    let layer: usize = layer.parse().map_err(|_| format!("{layer:?} is not a layer index"))?;
    if layer >= c.num_layers {
        return Err(format!("layer {layer} does not exist: the base model has {} layers", c.num_layers));
    }
    if let (Some(a), Some(proj)) = (&c.latent, rest.strip_prefix("self_attn.")) {
        let (heads, rank) = (c.num_heads, a.kv_lora_rank);
        let q_out = heads * a.qk_head_dim();
        let (kind, inp, out) = match (proj, a.q_lora_rank) {
            ("q_a_proj", Some(q)) => (ModuleKind::QA, h, q),
            ("q_b_proj", Some(q)) => (ModuleKind::Q, q, q_out),
            ("q_proj", None) => (ModuleKind::Q, h, q_out),
            ("kv_a_proj_with_mqa", _) => (ModuleKind::KvA, h, a.latent_dim()),
            ("kv_b_proj", _) => (ModuleKind::KvB, rank, heads * (a.qk_nope_head_dim + a.v_head_dim)),
            ("o_proj", _) => (ModuleKind::O, heads * a.v_head_dim, h),
            _ => {
                let q = if a.q_lora_rank.is_some() { "q_a_proj, q_b_proj" } else { "q_proj" };
                return Err(format!(
                    "not a latent attention projection of this model: LoRA applies to self_attn.{{{q}, \
                     kv_a_proj_with_mqa, kv_b_proj, o_proj}}"
                ));
            }
        };
        return Ok((LoraTarget { layer, kind }, inp, out));
    }
    if rest.starts_with("self_attn.") && c.is_linear_layer(layer) {
        return Err(format!("layer {layer} is a linear-attention (gated DeltaNet) layer: it has no self_attn"));
    }
    // Gated attention's q_proj also makes the output gate: twice the rows, split at load.
    let q_rows = if c.gated_attention { 2 * qw } else { qw };
    let kind_io = match rest {
        "self_attn.q_proj" => (ModuleKind::Q, h, q_rows),
        "self_attn.k_proj" => (ModuleKind::K, h, kw),
        "self_attn.v_proj" => (ModuleKind::V, h, kw),
        "self_attn.o_proj" => (ModuleKind::O, qw, h),
        _ => {
            let prefix = c.architecture.moe_prefix();
            // Mixtral's modules are `mlp.*` in transformers 5 and `block_sparse_moe.*` before.
            let moe = rest.strip_prefix(prefix).or_else(|| rest.strip_prefix("mlp")).and_then(|r| r.strip_prefix('.'));
            let Some(moe) = moe.filter(|_| c.is_moe_layer(layer)) else {
                return Err(format!(
                    "not a supported target: LoRA applies to self_attn.{{q,k,v,o}}_proj, {prefix}.gate and \
                     {prefix}.experts.N.* of MoE layers"
                ));
            };
            let gpt_oss = c.architecture == Architecture::GptOss;
            if moe == c.architecture.gate_name() {
                (ModuleKind::Gate, h, c.num_experts)
            } else if moe == "experts" || moe == "experts.base_layer" {
                // Which fused parameter comes from the pair's shapes (see `fused_proj`).
                (ModuleKind::FusedExperts { proj: FusedProj::GateUp }, 0, 0)
            } else if gpt_oss && moe.starts_with("experts.") {
                return Err("gpt-oss's experts are one fused module: adapt them with target_parameters \
                            mlp.experts.gate_up_proj / mlp.experts.down_proj"
                    .into());
            } else if let Some(e) = moe.strip_prefix("experts.") {
                let (e, proj) = e.split_once('.').ok_or("no projection after the expert index")?;
                let expert: usize = e.parse().map_err(|_| format!("{e:?} is not an expert index"))?;
                if expert >= c.num_experts {
                    return Err(format!("expert {expert} does not exist: the base model has {}", c.num_experts));
                }
                let i = c.expert_intermediate_size;
                let mixtral = c.architecture == Architecture::Mixtral;
                let proj = match (mixtral, proj) {
                    (true, "w1") | (false, "gate_proj") => ExpertProj::Gate,
                    (true, "w3") | (false, "up_proj") => ExpertProj::Up,
                    (true, "w2") | (false, "down_proj") => ExpertProj::Down,
                    _ => return Err(format!("{proj:?} is not an expert projection of this architecture")),
                };
                let (inp, out) = if proj == ExpertProj::Down { (i, h) } else { (h, i) };
                (ModuleKind::Expert { expert, proj }, inp, out)
            } else {
                return Err(
                    "not a supported target: the shared expert, its gate and dense MLPs cannot be adapted".into()
                );
            }
        }
    };
    Ok((LoraTarget { layer, kind: kind_io.0 }, kind_io.1, kind_io.2))
}

impl AdapterManifest {
    /// Reads `dir`'s config and tensor header and checks every module against `cfg`. `name` is
    /// used in errors.
    pub fn read(dir: &Path, name: &str, cfg: &ModelConfig) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        let weights_path = dir.join(WEIGHTS_FILE);
        let io = |path: &Path, error| LoraError::Io { path: path.to_path_buf(), error };
        let text = std::fs::read(&cfg_path).map_err(|e| io(&cfg_path, e))?;
        let config = PeftConfig::parse(&String::from_utf8_lossy(&text), &cfg_path)?;
        if !weights_path.exists() && dir.join("adapter_model.bin").exists() {
            return Err(LoraError::Unsupported {
                adapter: name.into(),
                message: "adapter_model.bin (pickle) is not supported; save the adapter with safetensors".into(),
            });
        }
        let weights = Checkpoint::open_file(&weights_path)
            .map_err(|source| LoraError::Checkpoint { adapter: name.into(), source })?;
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        fnv1a(&mut hash, &text);
        fnv1a(&mut hash, &std::fs::read(&weights_path).map_err(|e| io(&weights_path, e))?);
        let digest = format!("{hash:016x}");

        let module_err =
            |module: &str, message: String| LoraError::Module { adapter: name.into(), module: module.into(), message };
        let mut modules = Vec::new();
        let names = weights.names();
        for key in &names {
            let Some(module) = key.strip_prefix(KEY_PREFIX).and_then(|k| k.strip_suffix(".lora_A.weight")) else {
                if key.ends_with(".lora_B.weight") {
                    continue;
                }
                return Err(module_err(
                    key,
                    "unexpected tensor: adapters hold only base_model.model.<module>.lora_A.weight / lora_B.weight \
                     (DoRA magnitudes, LoRA biases and embedding adapters are not supported)"
                        .into(),
                ));
            };
            let (mut target, mut in_features, mut out_features) =
                classify(module, cfg).map_err(|m| module_err(module, m))?;
            let b_key = format!("{KEY_PREFIX}{module}.lora_B.weight");
            let a_shape = weights.shape_of(key).unwrap_or_default().to_vec();
            let b_shape =
                weights.shape_of(&b_key).ok_or_else(|| module_err(module, "has lora_A but no lora_B".into()))?.to_vec();
            let mut experts = 1;
            let param = match target.kind {
                ModuleKind::FusedExperts { .. } => {
                    let (proj, inp, out) = fused_proj(&a_shape, &b_shape, cfg).map_err(|m| module_err(module, m))?;
                    (target.kind, in_features, out_features, experts) =
                        (ModuleKind::FusedExperts { proj }, inp, out, cfg.num_experts);
                    if proj == FusedProj::GateUp {
                        "gate_up_proj"
                    } else {
                        "down_proj"
                    }
                }
                _ => "weight",
            };
            if !config.targets(module, param) {
                return Err(module_err(
                    module,
                    format!("has LoRA tensors but neither target_modules nor target_parameters names it ({param})"),
                ));
            }
            // PEFT (0.21) restricts target_modules to layers_to_transform, but applies
            // target_parameters on every layer; the tensors show what it did, so only the former
            // is checked.
            let by_module = config.target_modules.as_ref().is_some_and(|t| t.matches(module));
            if by_module && !config.transforms_layer(target.layer) {
                return Err(module_err(module, format!("layer {} is not in layers_to_transform", target.layer)));
            }
            // PEFT keys rank_pattern / alpha_pattern by module name for target_modules, and by
            // parameter name (`…mlp.gate.weight`, `…experts.gate_up_proj`) for target_parameters.
            let pattern_name = match by_module {
                true => module.to_string(),
                false => format!("{}.{param}", module.strip_suffix(".base_layer").unwrap_or(module)),
            };
            let (rank, scale) = config.rank_and_scale(&pattern_name);
            if rank > MAX_RANK {
                return Err(module_err(module, format!("rank {rank} is above the maximum of {MAX_RANK}")));
            }
            let rows = experts * rank;
            if a_shape != [rows, in_features] || b_shape != [out_features, rows] {
                let per = if experts > 1 { format!(" ({experts} experts x rank {rank})") } else { String::new() };
                return Err(module_err(
                    module,
                    format!(
                        "lora_A is {a_shape:?} and lora_B is {b_shape:?}, but rank {rank} on this base model needs \
                         lora_A [{rows}, {in_features}] and lora_B [{out_features}, {rows}]{per}"
                    ),
                ));
            }
            modules.push(TargetModule {
                module: module.to_string(),
                target,
                rank,
                experts,
                in_features,
                out_features,
                scale,
            });
        }
        for key in &names {
            if let Some(module) = key.strip_prefix(KEY_PREFIX).and_then(|k| k.strip_suffix(".lora_B.weight")) {
                if !modules.iter().any(|m| m.module == module) {
                    return Err(module_err(module, "has lora_B but no lora_A".into()));
                }
            }
        }
        if modules.is_empty() {
            return Err(LoraError::Unsupported {
                adapter: name.into(),
                message: "the adapter has no LoRA tensors".into(),
            });
        }
        Ok(Self { dir: dir.to_path_buf(), config, weights, modules, digest })
    }

    /// Reads one module's (A, B) as f32.
    pub fn read_pair(&self, m: &TargetModule, adapter: &str) -> Result<(Vec<f32>, Vec<f32>)> {
        let read = |suffix: &str, shape: &[usize]| {
            self.weights
                .read(&format!("{KEY_PREFIX}{}.{suffix}", m.module), shape)
                .map_err(|source| LoraError::Checkpoint { adapter: adapter.into(), source })
        };
        let rows = m.rank * m.experts;
        Ok((read("lora_A.weight", &[rows, m.in_features])?, read("lora_B.weight", &[m.out_features, rows])?))
    }
}
