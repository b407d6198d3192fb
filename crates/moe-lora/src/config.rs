//! `adapter_config.json`: rank, alpha, rsLoRA, what is targeted (`target_modules` as a list or
//! a regex, `target_parameters` for parameters that are not `Linear` modules: the MoE gate of
//! transformers 5 and its fused experts), the layers (`layers_to_transform`), and per-module rank
//! and alpha patterns. Everything PEFT can write that changes the math and that this crate does
//! not implement is refused here, naming the key.

use crate::error::{LoraError, Result};
use regex::Regex;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

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
    /// Parameters adapted directly (PEFT's `target_parameters`), by name suffix: the MoE gate's
    /// `gate.weight` and the fused experts' `experts.gate_up_proj` / `experts.down_proj`.
    pub target_parameters: Vec<String>,
    /// Only these layers carry adapters (`None`: any).
    pub layers_to_transform: Option<Vec<usize>>,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f32>,
}

/// The parameters `target_parameters` may name (by suffix).
const SUPPORTED_PARAMETERS: [&str; 4] = ["gate.weight", "router.weight", "experts.gate_up_proj", "experts.down_proj"];

/// `name` is `suffix` or ends with `.` + `suffix`.
fn is_suffix(name: &str, suffix: &str) -> bool {
    name == suffix || name.strip_suffix(suffix).is_some_and(|p| p.ends_with('.'))
}

fn positive_or_zero(key: &str, v: &Value) -> std::result::Result<usize, String> {
    v.as_u64()
        .filter(|&n| n < 1 << 16)
        .map(|n| n as usize)
        .ok_or_else(|| format!("{key} must hold layer indices, got {v}"))
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
        let target_parameters: Vec<String> = match obj.get("target_parameters") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("target_parameters entry {x} is not a string")))
                })
                .collect::<Result<_>>()?,
            Some(other) => return Err(bad(format!("target_parameters must be a list, got {other}"))),
        };
        if let Some(p) = target_parameters.iter().find(|p| !SUPPORTED_PARAMETERS.iter().any(|s| is_suffix(p, s))) {
            return Err(bad(format!(
                "target_parameters entry {p:?} is not supported: LoRA on parameters applies to the MoE gate \
                 (mlp.gate.weight; gpt-oss: mlp.router.weight) and the fused experts (mlp.experts.gate_up_proj, \
                 mlp.experts.down_proj)"
            )));
        }
        let layers_to_transform = match obj.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Number(_)) => Some(vec![positive_or_zero("layers_to_transform", v).map_err(bad)?]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| positive_or_zero("layers_to_transform", v))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(bad)?,
            ),
            Some(other) => return Err(bad(format!("layers_to_transform must be an integer or a list, got {other}"))),
        };
        for key in ["layer_replication", "trainable_token_indices"] {
            if obj
                .get(key)
                .is_some_and(|v| !v.is_null() && v != &Value::Array(vec![]) && v != &Value::Object(Default::default()))
            {
                return Err(bad(format!("`{key}` is not supported")));
            }
        }
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
        Ok(Self {
            r,
            lora_alpha,
            use_rslora,
            target_modules,
            target_parameters,
            layers_to_transform,
            rank_pattern,
            alpha_pattern,
        })
    }

    /// Whether the module `module` is adapted: named by `target_modules`, or its parameter
    /// `param` (e.g. `weight`, `gate_up_proj`) named by `target_parameters`.
    pub fn targets(&self, module: &str, param: &str) -> bool {
        let base = module.strip_suffix(".base_layer").unwrap_or(module);
        let full = format!("{base}.{param}");
        self.target_modules.as_ref().is_some_and(|t| t.matches(module))
            || self.target_parameters.iter().any(|p| is_suffix(&full, p))
            || (self.target_modules.is_none() && self.target_parameters.is_empty())
    }

    /// Whether `layer` may carry adapters (`layers_to_transform`).
    pub fn transforms_layer(&self, layer: usize) -> bool {
        self.layers_to_transform.as_ref().is_none_or(|l| l.contains(&layer))
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
    fn target_parameters_and_layers() {
        let c = cfg(
            r#"{"target_modules": [], "target_parameters": ["gate.weight", "mlp.experts.gate_up_proj"], "layers_to_transform": [1]}"#,
        )
        .unwrap();
        assert!(c.targets("model.layers.0.mlp.gate", "weight"));
        assert!(c.targets("model.layers.0.mlp.experts.base_layer", "gate_up_proj"));
        assert!(!c.targets("model.layers.0.mlp.experts", "down_proj"));
        assert!(!c.targets("model.layers.0.self_attn.q_proj", "weight"));
        assert!(c.transforms_layer(1) && !c.transforms_layer(0));
        let one = cfg(r#"{"layers_to_transform": 3}"#).unwrap();
        assert_eq!(one.layers_to_transform, Some(vec![3]));
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
            (r#"{"target_parameters": ["lm_head.weight"]}"#, "lm_head.weight"),
            (r#"{"target_parameters": ["mlp.shared_expert.down_proj.weight"]}"#, "not supported"),
            (r#"{"target_parameters": "mlp.gate.weight"}"#, "must be a list"),
            (r#"{"layers_to_transform": [-1]}"#, "layer indices"),
            (r#"{"layer_replication": [[0, 2]]}"#, "layer_replication"),
            (r#"{"lora_bias": true}"#, "lora_bias"),
            ("[", "JSON"),
        ] {
            let e = cfg(text).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
