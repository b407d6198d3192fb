//! The PEFT adapter format: `adapter_config.json` (rank, alpha, rsLoRA, target modules, per-module
//! rank and alpha patterns) and the tensor names of `adapter_model.safetensors`
//! (`base_model.model.<module>.lora_A.weight`, `[r, in]`, and `.lora_B.weight`, `[out, r]`).
//! [`AdapterManifest::read`] maps every module to what it adapts in the base model and checks
//! its shapes from the file header alone, so a bad adapter is refused before any weight is read.

use crate::error::{LoraError, Result};
use moe_model::checkpoint::Checkpoint;
use moe_model::{Architecture, ModelConfig};
use regex::Regex;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";
/// Ranks above this are refused (a LoRA of higher rank is no longer low-rank, and would let one
/// tenant's adapter cost more than the base layer).
pub const MAX_RANK: usize = 512;

/// What `target_modules` names: a list (a module matches when its name is, or ends with
/// `.` + an entry) or a regular expression that must match the whole module name.
#[derive(Clone, Debug)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(Regex),
}

impl TargetModules {
    pub fn matches(&self, module: &str) -> bool {
        match self {
            TargetModules::List(names) => {
                names.iter().any(|t| module == t || module.strip_suffix(t.as_str()).is_some_and(|p| p.ends_with('.')))
            }
            TargetModules::Regex(re) => re.find(module).is_some_and(|m| m.start() == 0 && m.end() == module.len()),
        }
    }
}

/// The fields of `adapter_config.json` that change the math.
#[derive(Clone, Debug)]
pub struct PeftConfig {
    pub r: usize,
    pub lora_alpha: f32,
    pub use_rslora: bool,
    pub target_modules: Option<TargetModules>,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f32>,
}

/// PEFT's pattern rule: a key applies to a module whose name equals it or matches
/// `(.*\.)?(key)$`.
fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, module: &str) -> Option<T> {
    if let Some(v) = patterns.get(module) {
        return Some(*v);
    }
    patterns.iter().find_map(|(k, v)| {
        let re = Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")).ok()?;
        re.is_match(module).then_some(*v)
    })
}

impl PeftConfig {
    /// Parses `adapter_config.json`, refusing the variants whose math we do not implement.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let bad = |message: String| LoraError::Config { path: path.to_path_buf(), message };
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| bad("expected a JSON object".into()))?;
        if let Some(t) = obj.get("peft_type").and_then(Value::as_str) {
            if t != "LORA" {
                return Err(bad(format!("peft_type is {t:?}; only LORA adapters are supported")));
            }
        }
        for flag in ["use_dora", "fan_in_fan_out", "lora_bias"] {
            if obj.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(bad(format!("`{flag}: true` is not supported")));
            }
        }
        if let Some(b) = obj.get("bias").and_then(Value::as_str) {
            if b != "none" {
                return Err(bad(format!("bias is {b:?}; only \"none\" is supported")));
            }
        }
        if obj.get("modules_to_save").and_then(Value::as_array).is_some_and(|a| !a.is_empty()) {
            return Err(bad("modules_to_save (fully trained copies of modules) is not supported".into()));
        }
        let positive_int = |key: &str, v: &Value| -> Result<usize> {
            v.as_u64()
                .filter(|&n| n > 0 && n <= 1 << 16)
                .map(|n| n as usize)
                .ok_or_else(|| bad(format!("{key} must be a positive integer (at most 65536), got {v}")))
        };
        let number = |key: &str, v: &Value| -> Result<f32> {
            v.as_f64()
                .filter(|x| x.is_finite())
                .map(|x| x as f32)
                .ok_or_else(|| bad(format!("{key} must be a number, got {v}")))
        };
        let r = match obj.get("r") {
            Some(v) => positive_int("r", v)?,
            None => 8,
        };
        let lora_alpha = match obj.get("lora_alpha") {
            Some(v) => number("lora_alpha", v)?,
            None => 8.0,
        };
        let use_rslora = obj.get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
        let target_modules = match obj.get("target_modules") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(TargetModules::Regex(
                Regex::new(s).map_err(|e| bad(format!("target_modules is not a valid regular expression: {e}")))?,
            )),
            Some(Value::Array(a)) => Some(TargetModules::List(
                a.iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| bad(format!("target_modules entry {x} is not a string")))
                    })
                    .collect::<Result<_>>()?,
            )),
            Some(other) => return Err(bad(format!("target_modules must be a list or a string, got {other}"))),
        };
        let mut rank_pattern = BTreeMap::new();
        if let Some(m) = obj.get("rank_pattern").and_then(Value::as_object) {
            for (k, v) in m {
                rank_pattern.insert(k.clone(), positive_int(&format!("rank_pattern[{k:?}]"), v)?);
            }
        }
        let mut alpha_pattern = BTreeMap::new();
        if let Some(m) = obj.get("alpha_pattern").and_then(Value::as_object) {
            for (k, v) in m {
                alpha_pattern.insert(k.clone(), number(&format!("alpha_pattern[{k:?}]"), v)?);
            }
        }
        for k in rank_pattern.keys().chain(alpha_pattern.keys()) {
            Regex::new(k).map_err(|e| bad(format!("pattern {k:?} is not a valid regular expression: {e}")))?;
        }
        Ok(Self { r, lora_alpha, use_rslora, target_modules, rank_pattern, alpha_pattern })
    }

    /// (rank, scale) of a module: its patterns or the defaults; scale is alpha / r, or
    /// alpha / sqrt(r) with rsLoRA.
    pub fn rank_and_scale(&self, module: &str) -> (usize, f32) {
        let r = pattern_value(&self.rank_pattern, module).unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern, module).unwrap_or(self.lora_alpha);
        let scale = if self.use_rslora { alpha / (r as f32).sqrt() } else { alpha / r as f32 };
        (r, scale)
    }
}

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
    /// The MoE router linear.
    Gate,
    Expert {
        expert: usize,
        proj: ExpertProj,
    },
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
    pub rank: usize,
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
    let kind_io = match rest {
        "self_attn.q_proj" => (ModuleKind::Q, h, qw),
        "self_attn.k_proj" => (ModuleKind::K, h, kw),
        "self_attn.v_proj" => (ModuleKind::V, h, kw),
        "self_attn.o_proj" => (ModuleKind::O, qw, h),
        _ => {
            let prefix = c.architecture.moe_prefix();
            let moe = rest.strip_prefix(prefix).and_then(|r| r.strip_prefix('.'));
            let Some(moe) = moe.filter(|_| c.is_moe_layer(layer)) else {
                return Err(format!(
                    "not a supported target: LoRA applies to self_attn.{{q,k,v,o}}_proj, {prefix}.gate and \
                     {prefix}.experts.N.* of MoE layers"
                ));
            };
            if moe == "gate" {
                (ModuleKind::Gate, h, c.num_experts)
            } else if let Some(e) = moe.strip_prefix("experts.") {
                let (e, proj) = e.split_once('.').ok_or("no projection after the expert index")?;
                let expert: usize = e.parse().map_err(|_| format!("{e:?} is not an expert index"))?;
                if expert >= c.num_experts {
                    return Err(format!("expert {expert} does not exist: the base model has {}", c.num_experts));
                }
                let i = c.expert_intermediate_size;
                let proj = match (c.architecture, proj) {
                    (Architecture::Mixtral, "w1")
                    | (Architecture::Qwen2Moe | Architecture::Qwen3Moe | Architecture::Olmoe, "gate_proj") => {
                        ExpertProj::Gate
                    }
                    (Architecture::Mixtral, "w3")
                    | (Architecture::Qwen2Moe | Architecture::Qwen3Moe | Architecture::Olmoe, "up_proj") => {
                        ExpertProj::Up
                    }
                    (Architecture::Mixtral, "w2")
                    | (Architecture::Qwen2Moe | Architecture::Qwen3Moe | Architecture::Olmoe, "down_proj") => {
                        ExpertProj::Down
                    }
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
            let (target, in_features, out_features) = classify(module, cfg).map_err(|m| module_err(module, m))?;
            if let Some(t) = &config.target_modules {
                if !t.matches(module) {
                    return Err(module_err(module, "has LoRA tensors but is not named by target_modules".into()));
                }
            }
            let (rank, scale) = config.rank_and_scale(module);
            if rank > MAX_RANK {
                return Err(module_err(module, format!("rank {rank} is above the maximum of {MAX_RANK}")));
            }
            let b_key = format!("{KEY_PREFIX}{module}.lora_B.weight");
            let a_shape = weights.shape_of(key).unwrap_or_default().to_vec();
            let b_shape =
                weights.shape_of(&b_key).ok_or_else(|| module_err(module, "has lora_A but no lora_B".into()))?.to_vec();
            if a_shape != [rank, in_features] || b_shape != [out_features, rank] {
                return Err(module_err(
                    module,
                    format!(
                        "lora_A is {a_shape:?} and lora_B is {b_shape:?}, but rank {rank} on this base model needs \
                         lora_A [{rank}, {in_features}] and lora_B [{out_features}, {rank}]"
                    ),
                ));
            }
            modules.push(TargetModule { module: module.to_string(), target, rank, in_features, out_features, scale });
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
        Ok((read("lora_A.weight", &[m.rank, m.in_features])?, read("lora_B.weight", &[m.out_features, m.rank])?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Result<PeftConfig> {
        PeftConfig::parse(text, Path::new("adapter_config.json"))
    }

    #[test]
    fn scale_follows_rank_and_alpha_patterns_and_rslora() {
        let c = cfg(
            r#"{"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"layers\\.1\\..*gate": 2}}"#,
        )
        .unwrap();
        assert_eq!(c.rank_and_scale("model.layers.0.self_attn.k_proj"), (8, 2.0));
        assert_eq!(c.rank_and_scale("model.layers.0.self_attn.q_proj"), (4, 4.0));
        assert_eq!(c.rank_and_scale("model.layers.1.mlp.gate"), (8, 0.25));
        let rs = cfg(r#"{"r": 4, "lora_alpha": 8, "use_rslora": true}"#).unwrap();
        assert_eq!(rs.rank_and_scale("x"), (4, 4.0));
    }

    #[test]
    fn target_modules_list_and_regex() {
        let l = cfg(r#"{"target_modules": ["gate", "q_proj"]}"#).unwrap().target_modules.unwrap();
        assert!(l.matches("model.layers.0.block_sparse_moe.gate"));
        assert!(l.matches("model.layers.0.self_attn.q_proj"));
        assert!(!l.matches("model.layers.0.mlp.shared_expert_gate"));
        assert!(!l.matches("model.layers.0.mlp.experts.0.gate_proj"));
        let r = cfg(r#"{"target_modules": ".*\\.mlp\\.gate"}"#).unwrap().target_modules.unwrap();
        assert!(r.matches("model.layers.3.mlp.gate"));
        assert!(!r.matches("model.layers.3.mlp.gate_proj"));
    }

    #[test]
    fn refuses_what_it_cannot_apply() {
        for (text, needle) in [
            (r#"{"use_dora": true}"#, "use_dora"),
            (r#"{"bias": "all"}"#, "bias"),
            (r#"{"peft_type": "IA3"}"#, "LORA"),
            (r#"{"r": 0}"#, "positive"),
            (r#"{"r": "8"}"#, "positive"),
            (r#"{"modules_to_save": ["lm_head"]}"#, "modules_to_save"),
            (r#"{"target_modules": "("}"#, "regular expression"),
            ("[", "JSON"),
        ] {
            let e = cfg(text).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
