//! Expert selection from gate logits, as the supported architectures define it. Softmax routing
//! (Mixtral, Qwen, OLMoE): softmax over all experts in f32, the top k by probability (ties to the
//! lower index, as `torch.topk` on CPU), then optional renormalization over the chosen k (always
//! for Mixtral, `norm_topk_prob` for the others). Sigmoid routing (DeepSeek-V3, Kimi K2,
//! GLM-4.5): sigmoid scores; a per-expert correction bias added for *selection only*; experts in
//! `n_group` groups of which the `topk_group` best (by the sum of each group's two best biased
//! scores) stay eligible; the top k of those; weights are the unbiased scores, optionally
//! renormalized, times `routed_scaling_factor`.
//!
//! Exponentials are `moe_compute::gpu_plan::numerics::exp` (IEEE operations only) and a logit is
//! read through `gate_logit` (NaN counts as −∞, +∞ as the largest float; a row with no finite
//! logit gets weight 0), so the device's gating kernel routes to the same bits
//! (`moe_compute::gpu_plan::routing`, compared below).

use moe_compute::gpu_plan::numerics::{exp, gate_logit};

/// How gate logits become scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateScoring {
    Softmax,
    Sigmoid,
}

/// An architecture's routing rule (read from config.json).
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingRule {
    pub scoring: GateScoring,
    /// Renormalize the chosen weights to sum to one.
    pub renormalize: bool,
    /// Groups of experts (1: no grouping) and how many groups stay eligible.
    pub n_group: usize,
    pub topk_group: usize,
    /// The chosen weights are multiplied by this.
    pub scaling: f32,
    /// The gate has a per-expert `e_score_correction_bias` (selection only).
    pub correction_bias: bool,
}

impl RoutingRule {
    /// Softmax routing, optionally renormalized.
    pub fn softmax(renormalize: bool) -> Self {
        Self {
            scoring: GateScoring::Softmax,
            renormalize,
            n_group: 1,
            topk_group: 1,
            scaling: 1.0,
            correction_bias: false,
        }
    }

    /// The rule as the device's gating kernel takes it.
    pub fn gate_rule(&self) -> moe_compute::gpu_plan::routing::GateRule {
        moe_compute::gpu_plan::routing::GateRule {
            sigmoid: self.scoring == GateScoring::Sigmoid,
            renormalize: self.renormalize,
            n_group: self.n_group,
            topk_group: self.topk_group,
            scaling: self.scaling,
        }
    }

    /// Chooses `out.len()` experts for one row of gate logits; `bias` is the correction bias
    /// (sigmoid routing) and `scratch` a buffer of at least `2 * experts` values.
    pub fn route(&self, logits: &[f32], bias: Option<&[f32]>, scratch: &mut Vec<f32>, out: &mut [(u32, f32)]) {
        match self.scoring {
            GateScoring::Softmax => {
                route_row(logits, out.len(), self.renormalize, out);
                if self.scaling != 1.0 {
                    for o in out.iter_mut() {
                        o.1 *= self.scaling;
                    }
                }
            }
            GateScoring::Sigmoid => self.route_sigmoid(logits, bias, scratch, out),
        }
    }

    fn route_sigmoid(&self, logits: &[f32], bias: Option<&[f32]>, scratch: &mut Vec<f32>, out: &mut [(u32, f32)]) {
        let e = logits.len();
        scratch.clear();
        scratch.extend(logits.iter().map(|&l| moe_compute::gpu_plan::numerics::sigmoid(gate_logit(l))));
        // Biased scores for choice follow the sigmoid scores.
        for i in 0..e {
            let b = bias.and_then(|b| b.get(i)).map_or(0.0, |&b| gate_logit(b));
            scratch.push(scratch[i] + b);
        }
        let (scores, choice) = scratch.split_at_mut(e);
        // Experts of dropped groups can never be chosen (transformers masks them with -inf).
        moe_compute::gpu_plan::routing::keep_best_groups(choice, self.n_group, self.topk_group);
        let k = out.len();
        for slot in 0..k {
            let mut best: Option<usize> = None;
            for (i, &v) in choice.iter().enumerate() {
                if out[..slot].iter().any(|&(c, _)| c as usize == i) {
                    continue;
                }
                if best.is_none_or(|b| v > choice[b]) {
                    best = Some(i);
                }
            }
            let i = best.unwrap_or(slot);
            out[slot] = (i as u32, scores[i]);
        }
        if self.renormalize {
            let total: f32 = out.iter().map(|&(_, w)| w).sum::<f32>() + 1e-20;
            for o in out.iter_mut() {
                o.1 /= total;
            }
        }
        for o in out.iter_mut() {
            o.1 *= self.scaling;
        }
    }
}

/// Chooses `k` experts for one row of gate logits, writing `(expert, weight)` pairs into `out`
/// (highest probability first).
pub fn route_row(logits: &[f32], k: usize, renormalize: bool, out: &mut [(u32, f32)]) {
    let max = logits.iter().map(|&l| gate_logit(l)).fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for &l in logits {
        sum += exp(gate_logit(l) - max);
    }
    // Selection of the k largest without allocating: k is small (≤ 8 in practice).
    for slot in 0..k {
        let mut best: Option<usize> = None;
        for (e, &l) in logits.iter().enumerate() {
            if out[..slot].iter().any(|&(c, _)| c as usize == e) {
                continue;
            }
            // NaN logits count as -inf: a broken row still picks valid experts.
            if best.is_none_or(|b| gate_logit(l) > gate_logit(logits[b])) {
                best = Some(e);
            }
        }
        let e = best.unwrap_or(slot);
        let weight = if max == f32::NEG_INFINITY { 0.0 } else { exp(gate_logit(logits[e]) - max) / sum };
        out[slot] = (e as u32, weight);
    }
    if renormalize {
        let total: f32 = out[..k].iter().map(|&(_, w)| w).sum();
        if total > 0.0 {
            for o in out[..k].iter_mut() {
                o.1 /= total;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixtral_style_softmax_over_chosen() {
        let mut out = [(0, 0.0); 2];
        route_row(&[1.0, 3.0, 0.5, 2.0], 2, true, &mut out);
        assert_eq!((out[0].0, out[1].0), (1, 3));
        let e = (1.0f32).exp();
        assert!((out[0].1 - e / (e + 1.0)).abs() < 1e-6);
        assert!((out[0].1 + out[1].1 - 1.0).abs() < 1e-6);
    }

    #[test]
    fn sigmoid_groups_select_with_bias_and_weigh_without() {
        // 4 experts in 2 groups; the bias makes expert 3 win selection though its score is low.
        let rule = RoutingRule {
            scoring: GateScoring::Sigmoid,
            renormalize: true,
            n_group: 2,
            topk_group: 1,
            scaling: 2.5,
            correction_bias: true,
        };
        let logits = [2.0f32, -1.0, 0.0, -3.0];
        let bias = [0.0f32, 0.0, 0.0, 5.0];
        let mut out = [(0, 0.0); 2];
        rule.route(&logits, Some(&bias), &mut Vec::new(), &mut out);
        // Group 1 (experts 2, 3) sums 0.5 + 5.05 > group 0's 0.88 + 0.27: only 2 and 3 remain.
        assert_eq!((out[0].0, out[1].0), (3, 2));
        let s = |x: f32| 1.0 / (1.0 + (-x).exp());
        let total = s(-3.0) + s(0.0) + 1e-20;
        assert!((out[0].1 - s(-3.0) / total * 2.5).abs() < 1e-6, "weights use the unbiased score");
        assert!((out[1].1 - s(0.0) / total * 2.5).abs() < 1e-6);
    }

    #[test]
    fn unnormalized_keeps_full_softmax_mass() {
        let mut out = [(0, 0.0); 1];
        route_row(&[0.0, 0.0], 1, false, &mut out);
        assert_eq!(out[0], (0, 0.5));
    }

    /// The device's gating algorithm (moe_compute::gpu_plan::routing, what kernels/expert_plan.cu
    /// runs) chooses the same experts with the same weight bits as this module, on random logits
    /// with ties, NaN, −∞ and +∞, for softmax and grouped sigmoid rules.
    #[test]
    fn the_device_gating_algorithm_routes_to_the_same_bits() {
        use moe_compute::gpu_plan::routing::route_row as device_route;
        use moe_compute::rng::SplitMix64;
        let mut rng = SplitMix64::new(17);
        let rules = [
            RoutingRule::softmax(true),
            RoutingRule::softmax(false),
            RoutingRule { scaling: 2.5, ..RoutingRule::softmax(false) },
            RoutingRule {
                scoring: GateScoring::Sigmoid,
                renormalize: true,
                n_group: 8,
                topk_group: 4,
                scaling: 2.5,
                correction_bias: true,
            },
            RoutingRule {
                scoring: GateScoring::Sigmoid,
                renormalize: false,
                n_group: 1,
                topk_group: 1,
                scaling: 1.0,
                correction_bias: true,
            },
        ];
        let (mut host_scratch, mut dev_scratch) = (Vec::new(), Vec::new());
        for rule in &rules {
            let gate = rule.gate_rule();
            for (experts, k) in [(8usize, 2usize), (64, 8), (256, 8), (3, 3)] {
                let bias: Vec<f32> = (0..experts).map(|_| rng.signed() * 0.1).collect();
                for case in 0..300 {
                    let logits: Vec<f32> = (0..experts)
                        .map(|_| match (case % 5, rng.below(10)) {
                            (0, _) => (rng.below(4) as f32) * 0.5, // many ties
                            (1, 0) => f32::NAN,
                            (2, 0..=7) => f32::NEG_INFINITY,
                            (3, 0) => f32::INFINITY,
                            (4, _) => f32::NAN, // no finite logit
                            _ => rng.signed() * 4.0,
                        })
                        .collect();
                    let mut host = vec![(0u32, 0f32); k];
                    rule.route(&logits, Some(&bias), &mut host_scratch, &mut host);
                    let (mut ids, mut weights) = (vec![0u32; k], vec![0f32; k]);
                    device_route(&gate, &logits, Some(&bias), &mut dev_scratch, &mut ids, &mut weights);
                    let host_ids: Vec<u32> = host.iter().map(|h| h.0).collect();
                    assert_eq!(ids, host_ids, "{rule:?} {experts} experts, case {case}: {logits:?}");
                    for (h, w) in host.iter().zip(&weights) {
                        assert_eq!(h.1.to_bits(), w.to_bits(), "{rule:?} case {case}: {} vs {w}", h.1);
                    }
                    assert!(weights.iter().all(|w| w.is_finite()), "{weights:?}");
                }
            }
        }
    }
}
