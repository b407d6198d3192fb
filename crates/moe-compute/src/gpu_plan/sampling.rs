//! The device sampler's algorithm (kernels/sample_rows.cu, `sample_rows_f32`), step for step:
//! one block per row; disallowed tokens (a structured-output bitmask, one bit per token) count
//! as −∞; greedy rows take the host's arg-max (the first largest; a NaN first logit keeps token
//! 0, as the host's loop does); sampled rows with `top_k` in 2..=[`MAX_DEVICE_TOP_K`] select their
//! candidates by `top_k` block-wide arg-maxes in the host's order (value descending, lower index
//! first), then thread 0 runs the host's sequential softmax, top-p cut and draw over them with
//! the canonical exp and the row's counter draw ([`super::draws`]). The host sampler computes the
//! same bits (tested in moe-generate), so a request's tokens do not depend on where it samples.
//! Rows outside that (top-k 0 or larger) are marked for the host sampler.

use super::draws::nth_unit;
use super::numerics::exp;

/// The largest top-k the device sampler serves; other sampled rows go to the host.
pub const MAX_DEVICE_TOP_K: u32 = 64;

/// One row's sampling parameters as the step upload carries them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowParams {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub seed: u64,
    /// Draws this request has made before (the device makes the next one).
    pub draw: u64,
}

/// Whether the device samples this row (greedy, or top-k within the device's limit).
pub fn device_serves(p: &RowParams) -> bool {
    p.temperature == 0.0 || p.top_k == 1 || (2..=MAX_DEVICE_TOP_K).contains(&p.top_k)
}

/// One bit per token, set where the token is allowed (token t: word t / 32, bit t % 32).
pub fn pack_mask(allowed: &[bool]) -> Vec<u32> {
    let mut words = vec![0u32; allowed.len().div_ceil(32)];
    for (t, _) in allowed.iter().enumerate().filter(|(_, &a)| a) {
        words[t / 32] |= 1 << (t % 32);
    }
    words
}

fn allowed(mask: Option<&[u32]>, t: usize) -> bool {
    mask.is_none_or(|m| m.get(t / 32).is_some_and(|w| w >> (t % 32) & 1 == 1))
}

/// The kernel's result for one row: the token, or None where the host must sample.
pub fn sample_row(p: &RowParams, logits: &[f32], mask: Option<&[u32]>) -> Option<u32> {
    let value = |t: usize| if allowed(mask, t) { logits[t] } else { f32::NEG_INFINITY };
    // The host's arg-max: the first largest, NaN never replaces the current best.
    let argmax = || {
        if logits.is_empty() || value(0).is_nan() {
            return 0;
        }
        let mut best = 0;
        for t in 1..logits.len() {
            if value(t) > value(best) {
                best = t;
            }
        }
        best as u32
    };
    if p.temperature == 0.0 || p.top_k == 1 {
        return Some(argmax());
    }
    if !device_serves(p) {
        return None;
    }
    // Candidates by successive arg-maxes: the next is the largest strictly after the previous
    // in (value descending, index ascending) order.
    let mut c: Vec<(u32, f32)> = Vec::with_capacity(p.top_k as usize);
    let mut previous: Option<(f32, usize)> = None;
    while c.len() < p.top_k as usize {
        let mut best: Option<(f32, usize)> = None;
        for t in 0..logits.len() {
            let l = value(t);
            if !l.is_finite() {
                continue;
            }
            let v = l / p.temperature;
            let after = previous.is_none_or(|(pv, pi)| v < pv || (v == pv && t > pi));
            if after && best.is_none_or(|(bv, bi)| v > bv || (v == bv && t < bi)) {
                best = Some((v, t));
            }
        }
        let Some(b) = best else { break };
        c.push((b.1 as u32, b.0));
        previous = Some(b);
    }
    if c.is_empty() {
        return Some(argmax());
    }
    // Thread 0: the host's sequential tail.
    Some(draw_from_candidates(&mut c, p.top_p, nth_unit(p.seed, p.draw)))
}

/// The sampler's sequential tail over non-empty candidates sorted by (scaled logit descending,
/// token ascending): softmax relative to the first with the canonical exp, the top-p cut, and
/// the draw of `unit` in [0, 1). The host sampler and the device sampler (thread 0 of
/// sample_rows_f32) both run exactly this, in this order.
pub fn draw_from_candidates(c: &mut Vec<(u32, f32)>, top_p: f32, unit: f32) -> u32 {
    let Some(&(_, max)) = c.first() else { return 0 };
    let mut sum = 0.0f32;
    for x in c.iter_mut() {
        x.1 = exp(x.1 - max);
        sum += x.1;
    }
    if top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = c.len();
        for (i, x) in c.iter().enumerate() {
            acc += x.1 / sum;
            if acc >= top_p {
                keep = i + 1;
                break;
            }
        }
        c.truncate(keep);
        sum = c.iter().map(|x| x.1).sum();
    }
    let mut r = unit * sum;
    for x in c.iter() {
        if r < x.1 {
            return x.0;
        }
        r -= x.1;
    }
    c[c.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_greedy_and_host_rows() {
        let mask = pack_mask(&[false, true, false, true, true]);
        assert_eq!(mask, vec![0b11010]);
        let greedy = RowParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, draw: 0 };
        assert_eq!(sample_row(&greedy, &[9.0, 1.0, 5.0, 3.0, 3.0], Some(&mask)), Some(3));
        assert_eq!(sample_row(&greedy, &[f32::NAN, 1.0, 5.0], None), Some(0), "the host's quirk: a NaN first logit");
        assert_eq!(sample_row(&greedy, &[1.0, 7.0, 7.0], None), Some(1));
        let wide = RowParams { temperature: 1.0, top_k: 0, ..greedy };
        assert_eq!(sample_row(&wide, &[1.0, 2.0], None), None, "top-k 0 samples on the host");
        let top2 = RowParams { temperature: 1.0, top_k: 2, ..greedy };
        let t = sample_row(&top2, &[0.0, 5.0, 4.9, -1.0], None).expect("device row");
        assert!(t == 1 || t == 2);
        // Only disallowed or non-finite logits: the arg-max, as the host does.
        assert_eq!(sample_row(&top2, &[f32::NEG_INFINITY, f32::NAN], None), Some(0));
    }
}
