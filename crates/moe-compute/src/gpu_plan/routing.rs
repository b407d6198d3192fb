//! The gating kernel's algorithm (kernels/expert_plan.cu, `gate_route_f32`), step for step: one
//! warp per row; scores and the correction bias as the host computes them
//! ([`super::numerics`]); each of the k choices a warp-wide arg-max (each lane scans its experts
//! in ascending order, then a butterfly over lanes keeps the larger value and, on a tie, the
//! lower index); sums and renormalisation on lane 0 in expert order. This equals the host's
//! sequential routing bit for bit (tested in moe-model against `RoutingRule::route`).

use super::numerics::{exp, gate_logit, sigmoid};

/// What the gating kernel needs of an architecture's routing rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GateRule {
    /// Sigmoid scores (DeepSeek-V3, GLM-4.5) instead of a softmax.
    pub sigmoid: bool,
    pub renormalize: bool,
    pub n_group: usize,
    pub topk_group: usize,
    pub scaling: f32,
}

const LANES: usize = 32;

/// A warp's arg-max over `values` (excluding `taken`): per-lane ascending scans, then a
/// butterfly keeping (larger value, else lower index). `None` when every expert is taken.
fn warp_argmax(values: &[f32], taken: &[bool]) -> Option<usize> {
    let mut lane_best = [(f32::NEG_INFINITY, usize::MAX); LANES];
    for (lane, best) in lane_best.iter_mut().enumerate() {
        for e in (lane..values.len()).step_by(LANES) {
            if !taken[e] && (best.1 == usize::MAX || values[e] > best.0) {
                *best = (values[e], e);
            }
        }
    }
    let mut offset = LANES / 2;
    while offset > 0 {
        let before = lane_best;
        for (lane, best) in lane_best.iter_mut().enumerate() {
            let other = before[lane ^ offset];
            if other.1 != usize::MAX
                && (best.1 == usize::MAX || other.0 > best.0 || (other.0 == best.0 && other.1 < best.1))
            {
                *best = other;
            }
        }
        offset /= 2;
    }
    (lane_best[0].1 != usize::MAX).then_some(lane_best[0].1)
}

/// Grouped top-k's first stage, on the biased scores of one row (DeepSeek-V3, GLM-4.5): each of
/// `n_group` groups is scored by the sum of its two best values (its best when it has one), the
/// best `topk_group` groups stay (ties to the lower group), and every expert of the others becomes
/// −∞. Nothing happens with one group, `topk_group >= n_group`, or experts not divisible into the
/// groups. The host's routing and the gating kernel (on lane 0) run exactly this; it does not
/// allocate for up to 64 groups.
pub fn keep_best_groups(choice: &mut [f32], n_group: usize, topk_group: usize) {
    let (e, groups) = (choice.len(), n_group.max(1));
    if groups <= 1 || !e.is_multiple_of(groups) || topk_group >= groups {
        return;
    }
    let per = e / groups;
    let group_score = |choice: &[f32], g: usize| {
        let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
        for &v in &choice[g * per..(g + 1) * per] {
            if v > a {
                b = a;
                a = v;
            } else if v > b {
                b = v;
            }
        }
        if per >= 2 {
            a + b
        } else {
            a
        }
    };
    let mut on_stack = [false; 64];
    let mut on_heap;
    let kept: &mut [bool] = if groups <= 64 {
        &mut on_stack[..groups]
    } else {
        on_heap = vec![false; groups];
        &mut on_heap
    };
    for _ in 0..topk_group {
        let mut best: Option<(usize, f32)> = None;
        for g in (0..groups).filter(|&g| !kept[g]) {
            let s = group_score(choice, g);
            if best.is_none_or(|(_, bs)| s > bs) {
                best = Some((g, s));
            }
        }
        if let Some((g, _)) = best {
            kept[g] = true;
        }
    }
    for g in (0..groups).filter(|&g| !kept[g]) {
        choice[g * per..(g + 1) * per].fill(f32::NEG_INFINITY);
    }
}

/// Routes one row as the gating kernel does: `ids.len()` experts and their weights.
/// `scratch` is reused between rows.
pub fn route_row(
    rule: &GateRule,
    logits: &[f32],
    bias: Option<&[f32]>,
    scratch: &mut Vec<f32>,
    ids: &mut [u32],
    weights: &mut [f32],
) {
    let e = logits.len();
    let k = ids.len();
    scratch.clear();
    scratch.extend(logits.iter().map(|&l| gate_logit(l)));
    let mut taken = vec![false; e];
    if !rule.sigmoid {
        let max = scratch.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for &l in scratch.iter() {
            sum += exp(l - max);
        }
        for slot in 0..k {
            let i = warp_argmax(scratch, &taken).unwrap_or(slot);
            if i < e {
                taken[i] = true;
            }
            ids[slot] = i as u32;
            weights[slot] = if max == f32::NEG_INFINITY { 0.0 } else { exp(scratch[i] - max) / sum };
        }
        if rule.renormalize {
            let total: f32 = weights.iter().sum();
            if total > 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
        }
        if rule.scaling != 1.0 {
            weights.iter_mut().for_each(|w| *w *= rule.scaling);
        }
        return;
    }
    // Sigmoid: scores, then biased scores for the choice.
    for v in scratch.iter_mut() {
        *v = sigmoid(*v);
    }
    for i in 0..e {
        let b = bias.and_then(|b| b.get(i)).map_or(0.0, |&b| gate_logit(b));
        scratch.push(scratch[i] + b);
    }
    let (scores, choice) = scratch.split_at_mut(e);
    keep_best_groups(choice, rule.n_group, rule.topk_group);
    for slot in 0..k {
        let i = warp_argmax(choice, &taken).unwrap_or(slot);
        if i < e {
            taken[i] = true;
        }
        ids[slot] = i as u32;
        weights[slot] = scores.get(i).copied().unwrap_or(0.0);
    }
    if rule.renormalize {
        let total: f32 = weights.iter().sum::<f32>() + 1e-20;
        weights.iter_mut().for_each(|w| *w /= total);
    }
    weights.iter_mut().for_each(|w| *w *= rule.scaling);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_go_to_the_lower_index_and_nan_never_wins() {
        let rule = GateRule { sigmoid: false, renormalize: true, n_group: 1, topk_group: 1, scaling: 1.0 };
        let mut logits = vec![0.5f32; 70];
        logits[0] = f32::NAN;
        logits[40] = 2.0;
        logits[65] = 2.0;
        let (mut ids, mut w) = ([0u32; 3], [0f32; 3]);
        route_row(&rule, &logits, None, &mut Vec::new(), &mut ids, &mut w);
        assert_eq!(ids, [40, 65, 1]);
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6 && w[0] == w[1]);
        // No finite logit: the lowest experts, weight 0.
        let (mut ids, mut w) = ([9u32; 2], [9f32; 2]);
        route_row(&rule, &[f32::NAN, f32::NEG_INFINITY, f32::NAN], None, &mut Vec::new(), &mut ids, &mut w);
        assert_eq!((ids, w), ([0, 1], [0.0, 0.0]));
    }
}
