//! flash_decode.cu executed on the CPU (tests only): one block per (KV head, split) with the
//! kernel's thread loops and indices transcribed line by line (fd_split, the tile loads with
//! zero fill, two threads per key summing half a head each, a warp per head for the online
//! softmax with two keys per lane, a thread per output column for P·V), then the merge kernel's
//! combination with an attention sink. Compared with plain attention, so an index slip in the
//! block's decomposition fails here before a GPU sees it.

use super::splits::{MAX_SPLITS, SPLIT_TOKENS, TILE};

/// fd_split, as the kernel computes it.
fn fd_split(context_len: usize, window: usize, page_size: usize) -> (usize, usize, usize) {
    let start = if window > 0 && context_len > window { context_len - window } else { 0 };
    let attended = context_len - start;
    let page = page_size.max(1);
    let len = attended.div_ceil(MAX_SPLITS).max(SPLIT_TOKENS).div_ceil(page) * page;
    (start, len, attended.div_ceil(len).max(1))
}

struct Partial {
    out: Vec<f32>, // [G][D]
    max: Vec<f32>,
    sum: Vec<f32>,
}

/// One block of flash_decode_bf16; `keys`/`values`: the sequence's keys in order, [ctx][kv_heads][D].
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)] // threads indexed as in the kernel
fn block(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    ctx: usize,
    window: usize,
    page: usize,
    (kv_heads, group, d): (usize, usize, usize),
    kvh: usize,
    split: usize,
    scale: f32,
) -> Option<Partial> {
    let (start, len, count) = fd_split(ctx, window, page);
    if split >= count {
        return None;
    }
    let (a, b) = (start + split * len, (start + split * len + len).min(ctx));
    let q_s = &q[kvh * group * d..(kvh + 1) * group * d];
    let (mut m_s, mut l_s, mut c_s) = (vec![f32::NEG_INFINITY; group], vec![0.0f32; group], vec![0.0f32; group]);
    let mut acc = vec![[0.0f32; 16]; d.div_ceil(128) * 128];
    let tiles = (b - a).div_ceil(TILE);
    for t in 0..tiles {
        let (mut ks, mut vs) = (vec![0.0f32; TILE * d], vec![0.0f32; TILE * d]);
        for j in 0..TILE {
            let key = a + t * TILE + j;
            if key < b {
                let at = (key * kv_heads + kvh) * d;
                ks[j * d..(j + 1) * d].copy_from_slice(&keys[at..at + d]);
                vs[j * d..(j + 1) * d].copy_from_slice(&values[at..at + d]);
            }
        }
        let mut part_s = vec![0.0f32; 2 * group * TILE];
        for tid in 0..128 {
            let (j, half) = (tid % TILE, tid / TILE);
            let (d0, d1) = (half * (d / 2), half * (d / 2) + d / 2);
            let mut s = vec![0.0f32; group];
            for dd in (d0..d1).step_by(8) {
                for i in 0..4 {
                    let (k0, k1) = (ks[j * d + dd + 2 * i], ks[j * d + dd + 2 * i + 1]);
                    for g in 0..group {
                        s[g] += q_s[g * d + dd + 2 * i] * k0 + q_s[g * d + dd + 2 * i + 1] * k1;
                    }
                }
            }
            for g in 0..group {
                part_s[(half * group + g) * TILE + j] = s[g];
            }
        }
        let mut p_s = vec![0.0f32; group * TILE];
        for g in 0..group {
            let mut v = vec![[0.0f32; 2]; 32];
            let mut tile_max = f32::NEG_INFINITY;
            for lane in 0..32 {
                for i in 0..2 {
                    let j = lane + 32 * i;
                    let ok = a + t * TILE + j < b;
                    v[lane][i] = if ok {
                        (part_s[g * TILE + j] + part_s[(group + g) * TILE + j]) * scale
                    } else {
                        f32::NEG_INFINITY
                    };
                    tile_max = tile_max.max(v[lane][i]);
                }
            }
            let (m_old, m_new) = (m_s[g], m_s[g].max(tile_max));
            let mut sum = 0.0f32;
            for lane in 0..32 {
                for i in 0..2 {
                    let p = if v[lane][i] == f32::NEG_INFINITY { 0.0 } else { (v[lane][i] - m_new).exp() };
                    p_s[g * TILE + lane + 32 * i] = p;
                    sum += p;
                }
            }
            let corr = if m_old == f32::NEG_INFINITY { 0.0 } else { (m_old - m_new).exp() };
            c_s[g] = corr;
            l_s[g] = l_s[g] * corr + sum;
            m_s[g] = m_new;
        }
        for tid in 0..128 {
            for i in 0..d.div_ceil(128) {
                let dd = tid + i * 128;
                if dd >= d {
                    continue;
                }
                for g in 0..group {
                    acc[dd][g] *= c_s[g];
                }
                for j in 0..TILE {
                    for g in 0..group {
                        acc[dd][g] += p_s[g * TILE + j] * vs[j * d + dd];
                    }
                }
            }
        }
    }
    let out = (0..group * d).map(|i| acc[i % d][i / d]).collect();
    Some(Partial { out, max: m_s, sum: l_s })
}

/// flash_decode_merge_f32 for head `g` of a KV head's group.
fn merge(parts: &[Partial], g: usize, d: usize, sink: Option<f32>) -> Vec<f32> {
    let mut m = sink.unwrap_or(f32::NEG_INFINITY);
    for p in parts.iter().filter(|p| p.sum[g] > 0.0) {
        m = m.max(p.max[g]);
    }
    let mut sum = sink.map_or(0.0, |s| (s - m).exp());
    for p in parts.iter().filter(|p| p.sum[g] > 0.0) {
        sum += p.sum[g] * (p.max[g] - m).exp();
    }
    (0..d)
        .map(|dd| {
            let v: f32 =
                parts.iter().filter(|p| p.sum[g] > 0.0).map(|p| p.out[g * d + dd] * (p.max[g] - m).exp()).sum();
            if sum > 0.0 {
                v / sum
            } else {
                0.0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn the_flash_decode_blocks_and_merge_equal_attention() {
        let mut rng = SplitMix64::new(21);
        for (ctx, window, kv_heads, group, d, sink) in [
            (1usize, 0usize, 2usize, 4usize, 64usize, None),
            (1500, 0, 1, 8, 128, Some(0.7f32)),
            (2100, 300, 2, 2, 256, None),
            (9000, 0, 1, 1, 64, None),
        ] {
            let n_heads = kv_heads * group;
            let q: Vec<f32> = (0..n_heads * d).map(|_| rng.signed()).collect();
            let keys: Vec<f32> = (0..ctx * kv_heads * d).map(|_| rng.signed() * 2.0).collect();
            let values: Vec<f32> = (0..ctx * kv_heads * d).map(|_| rng.signed()).collect();
            let scale = 1.0 / (d as f32).sqrt();
            for kvh in 0..kv_heads {
                let parts: Vec<Partial> = (0..MAX_SPLITS)
                    .filter_map(|s| block(&q, &keys, &values, ctx, window, 16, (kv_heads, group, d), kvh, s, scale))
                    .collect();
                assert!(!parts.is_empty());
                for g in 0..group {
                    let h = kvh * group + g;
                    let got = merge(&parts, g, d, sink);
                    let first = if window > 0 { ctx.saturating_sub(window) } else { 0 };
                    let scores: Vec<f64> = (first..ctx)
                        .map(|t| {
                            (0..d).map(|i| q[h * d + i] as f64 * keys[(t * kv_heads + kvh) * d + i] as f64).sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let m = scores.iter().copied().chain(sink.map(|s| s as f64)).fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 =
                        scores.iter().map(|s| (s - m).exp()).sum::<f64>() + sink.map_or(0.0, |s| (s as f64 - m).exp());
                    for dd in 0..d {
                        let want: f64 = (first..ctx)
                            .zip(&scores)
                            .map(|(t, s)| (s - m).exp() * values[(t * kv_heads + kvh) * d + dd] as f64)
                            .sum::<f64>()
                            / z;
                        assert!(
                            (got[dd] as f64 - want).abs() < 2e-5,
                            "ctx {ctx} head {h} column {dd}: {} vs {want}",
                            got[dd]
                        );
                    }
                }
            }
        }
    }
}
