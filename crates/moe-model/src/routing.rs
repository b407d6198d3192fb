//! Expert selection from gate logits, as the supported architectures define it: softmax over all
//! experts in f32, the top k by probability (ties to the lower index, as `torch.topk` on CPU),
//! then optional renormalization over the chosen k (always for Mixtral, `norm_topk_prob` for the
//! others).

/// Chooses `k` experts for one row of gate logits, writing `(expert, weight)` pairs into `out`
/// (highest probability first).
pub fn route_row(logits: &[f32], k: usize, renormalize: bool, out: &mut [(u32, f32)]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for &l in logits {
        sum += (l - max).exp();
    }
    // Selection of the k largest without allocating: k is small (≤ 8 in practice).
    for slot in 0..k {
        let mut best: Option<usize> = None;
        for (e, &l) in logits.iter().enumerate() {
            if out[..slot].iter().any(|&(c, _)| c as usize == e) {
                continue;
            }
            // NaN logits never win, so a broken row still picks valid experts.
            if best.is_none_or(|b| l > logits[b]) {
                best = Some(e);
            }
        }
        let e = best.unwrap_or(slot);
        out[slot] = (e as u32, (logits[e] - max).exp() / sum);
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
    fn unnormalized_keeps_full_softmax_mass() {
        let mut out = [(0, 0.0); 1];
        route_row(&[0.0, 0.0], 1, false, &mut out);
        assert_eq!(out[0], (0, 0.5));
    }
}
