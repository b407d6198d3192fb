//! Rotary position embedding as a config asks for it: the base `rope_theta`, how many columns of
//! a head rotate (all, a `partial_rotary_factor` of them, or MLA's decoupled rope part), and
//! YaRN scaling (`rope_type: "yarn"`: interpolated inverse frequencies and an attention factor on
//! cos and sin), computed exactly as transformers' `_compute_yarn_parameters` does.

use serde_json::Value;

/// YaRN's parameters (`rope_scaling` / `rope_parameters` with `rope_type: "yarn"`).
#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    pub attention_factor: Option<f64>,
    pub truncate: bool,
}

/// How positions rotate q and k.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub theta: f64,
    /// Columns of a head that rotate (even).
    pub rotary_dim: usize,
    pub yarn: Option<Yarn>,
}

/// transformers' `get_mscale` (YaRN's magnitude correction).
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl Rope {
    /// Inverse frequencies, `rotary_dim / 2` of them, in f32 as transformers computes them.
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.rotary_dim;
        // `base ** (arange(0, dim, 2).float() / dim)` in f32, as torch does.
        let pos_freqs: Vec<f32> = (0..dim / 2).map(|i| (self.theta as f32).powf((2 * i) as f32 / dim as f32)).collect();
        let Some(y) = &self.yarn else {
            // The default rope computes in f64-then-f32 in older versions; keep the f64 form that
            // the existing fixtures pin.
            let d = dim as f64;
            return (0..dim / 2).map(|i| (1.0 / self.theta.powf((2 * i) as f64 / d)) as f32).collect();
        };
        let correction_dim = |rotations: f64| {
            (dim as f64 * (y.original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln())
                / (2.0 * self.theta.ln())
        };
        let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
        if y.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let (low, high) = (low.max(0.0), high.min(dim as f64 - 1.0));
        let (min, max) = (low as f32, if low == high { high as f32 + 0.001 } else { high as f32 });
        pos_freqs
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let extrapolation = 1.0 / p;
                let interpolation = 1.0 / (y.factor as f32 * p);
                let ramp = ((i as f32 - min) / (max - min)).clamp(0.0, 1.0);
                let extrapolation_factor = 1.0 - ramp;
                interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
            })
            .collect()
    }

    /// The factor cos and sin are multiplied by (1 without YaRN).
    pub fn attention_factor(&self) -> f32 {
        let Some(y) = &self.yarn else { return 1.0 };
        if let Some(a) = y.attention_factor {
            return a as f32;
        }
        match (y.mscale, y.mscale_all_dim) {
            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                (yarn_mscale(y.factor, m) / yarn_mscale(y.factor, all)) as f32
            }
            _ => yarn_mscale(y.factor, 1.0) as f32,
        }
    }
}

/// Reads the rope scaling dict (`rope_parameters` or `rope_scaling`): `Ok(None)` for the default
/// kind, YaRN's parameters, or an error naming an unsupported kind.
pub(crate) fn parse_scaling(p: &Value, max_position_embeddings: usize) -> Result<Option<Yarn>, String> {
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
    let num = |k: &str| p.get(k).and_then(|v| v.as_f64());
    match kind {
        "default" => Ok(None),
        "yarn" => {
            let factor = num("factor").ok_or("YaRN rope scaling needs `factor`")?;
            if !(factor.is_finite() && factor > 0.0) {
                return Err(format!("YaRN `factor` must be a positive number, got {factor}"));
            }
            let original =
                num("original_max_position_embeddings").map(|v| v as usize).unwrap_or(max_position_embeddings);
            if original == 0 {
                return Err("YaRN `original_max_position_embeddings` must be positive".into());
            }
            Ok(Some(Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: num("beta_fast").unwrap_or(32.0),
                beta_slow: num("beta_slow").unwrap_or(1.0),
                mscale: num("mscale"),
                mscale_all_dim: num("mscale_all_dim"),
                attention_factor: num("attention_factor"),
                truncate: p.get("truncate").and_then(|v| v.as_bool()).unwrap_or(true),
            }))
        }
        other => Err(format!("rope type {other:?} is not supported (\"default\" and \"yarn\" are)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_interpolates_low_frequencies_and_keeps_high_ones() {
        let yarn = Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: Some(1.0),
            mscale_all_dim: Some(1.0),
            attention_factor: None,
            truncate: true,
        };
        let plain = Rope { theta: 10000.0, rotary_dim: 64, yarn: None };
        let scaled = Rope { yarn: Some(yarn), ..plain.clone() };
        let (a, b) = (plain.inv_freq(), scaled.inv_freq());
        assert!((a[0] - b[0]).abs() < 1e-6, "the fastest frequency is kept");
        assert!((a[31] / 40.0 - b[31]).abs() < 1e-9, "the slowest is divided by the factor");
        assert_eq!(scaled.attention_factor(), 1.0, "DeepSeek-V3's mscale = mscale_all_dim");
        assert!((yarn_mscale(40.0, 1.0) - 1.368_888_9).abs() < 1e-6);
    }
}
