//! Batched multi-adapter LoRA on the CPU, in the manner of the SGMV kernel: consecutive rows that
//! use the same pair form a segment, and each segment costs one shrink (`x · Aᵀ`, rank columns)
//! and one expand (`· Bᵀ`) product, added with the pair's scale into a column range of the output.
//! Rows of many adapters (and of none) go through one call; a decode batch of 64 rows with 64
//! different adapters is 64 one-row segments, each streaming its own A and B once.

use super::{matmul_tw, simd, HostTensor};
use crate::LoraWeights;

/// `out[r, col..col + B.rows] += scale · (x_r · Aᵀ) · Bᵀ` for every row with a pair.
pub(super) fn lora_segments<'l>(
    x: &HostTensor,
    lora: impl Fn(usize) -> Option<&'l LoraWeights<super::CpuBackend>>,
    col: usize,
    shrink: &mut HostTensor,
    expand: &mut HostTensor,
    out: &mut HostTensor,
) {
    let k = x.cols;
    for (r, end, pair) in pair_segments(x.rows, lora) {
        let (m, rank, n) = (end - r, pair.a.rows, pair.b.rows);
        debug_assert!(pair.a.cols == k && pair.b.cols == rank && col + n <= out.cols);
        shrink.reshape(m, rank);
        matmul_tw(&x.data[r * k..end * k], m, k, pair.a.weights(), rank, &mut shrink.data);
        expand.reshape(m, n);
        matmul_tw(&shrink.data, m, rank, pair.b.weights(), n, &mut expand.data);
        for i in 0..m {
            simd::axpy(pair.scale, expand.row(i), &mut out.row_mut(r + i)[col..col + n]);
        }
    }
}

/// The runs `(start, end, pair)` of consecutive rows among `0..rows` that use the same pair
/// (compared by address); rows without a pair are skipped.
pub(super) fn pair_segments<'l>(
    rows: usize,
    lora: impl Fn(usize) -> Option<&'l LoraWeights<super::CpuBackend>>,
) -> impl Iterator<Item = (usize, usize, &'l LoraWeights<super::CpuBackend>)> {
    let mut r = 0;
    std::iter::from_fn(move || {
        while r < rows {
            let start = r;
            r += 1;
            if let Some(pair) = lora(start) {
                while r < rows && lora(r).is_some_and(|p| std::ptr::eq(p, pair)) {
                    r += 1;
                }
                return Some((start, r, pair));
            }
        }
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{CpuBackend, HostMatrix, MatrixData};
    use crate::{Backend, ExpertLora, ExpertPlan, FfnScratch, SwigluWeights};

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn mat(rows: usize, cols: usize, seed: u64) -> HostMatrix {
        HostMatrix::f32(rows, cols, rand(rows * cols, seed))
    }

    fn vals(m: &HostMatrix) -> &[f32] {
        match &m.data {
            MatrixData::F32(v) => v,
            MatrixData::Bf16(_) => panic!("f32 expected"),
        }
    }

    fn act(m: &HostMatrix) -> HostTensor {
        HostTensor { rows: m.rows, cols: m.cols, data: vals(m).to_vec() }
    }

    /// `W + scale · B·A` as a plain matrix.
    fn merged(w: &HostMatrix, l: &LoraWeights<CpuBackend>) -> HostMatrix {
        let (a, b) = (vals(&l.a), vals(&l.b));
        let mut m = vals(w).to_vec();
        for i in 0..w.rows {
            for j in 0..w.cols {
                let ba: f32 = (0..l.a.rows).map(|t| b[i * l.b.cols + t] * a[t * l.a.cols + j]).sum();
                m[i * w.cols + j] += l.scale * ba;
            }
        }
        HostMatrix::f32(w.rows, w.cols, m)
    }

    fn pair(rank: usize, inp: usize, out: usize, seed: u64, scale: f32) -> LoraWeights<CpuBackend> {
        LoraWeights { a: mat(rank, inp, seed), b: mat(out, rank, seed + 1), scale }
    }

    fn close(a: &[f32], b: &[f32]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    #[test]
    fn mixed_rows_equal_merged_weights_row_by_row() {
        let be = CpuBackend::new();
        let (h, n) = (24, 10);
        let w = mat(n, h, 1);
        let pairs = [pair(4, h, n, 10, 0.5), pair(2, h, n, 20, 2.0), pair(8, h, n, 30, 0.25)];
        // Rows: base, p0, p0, p1, base, p2, p1.
        let which = [None, Some(0), Some(0), Some(1), None, Some(2), Some(1)];
        let x = act(&mat(which.len(), h, 2));
        let mut out = HostTensor::default();
        be.linear(&x, &w, None, &mut out);
        let mut s = FfnScratch::new(&be);
        let lookup = |r: usize| which[r].map(|i| &pairs[i]);
        be.lora_add(&x, &lookup, 0, &mut s, &mut out);
        for (r, wi) in which.iter().enumerate() {
            let wr = match wi {
                Some(i) => merged(&w, &pairs[*i]),
                None => w.clone(),
            };
            let xr = HostTensor { rows: 1, cols: h, data: x.row(r).to_vec() };
            let mut want = HostTensor::default();
            be.linear(&xr, &wr, None, &mut want);
            close(out.row(r), &want.data);
        }
    }

    #[test]
    fn column_offset_touches_only_its_columns() {
        let be = CpuBackend::new();
        let x = act(&mat(3, 8, 5));
        let p = pair(2, 8, 4, 6, 1.0);
        let mut out = HostTensor { rows: 3, cols: 12, data: vec![0.0; 36] };
        let mut s = FfnScratch::new(&be);
        be.lora_add(&x, &|_| Some(&p), 4, &mut s, &mut out);
        for r in 0..3 {
            assert!(out.row(r)[..4].iter().chain(&out.row(r)[8..]).all(|&v| v == 0.0));
            assert!(out.row(r)[4..8].iter().any(|&v| v != 0.0));
        }
    }

    #[test]
    fn expert_lora_equals_merged_expert() {
        let be = CpuBackend::new();
        let (h, i) = (16, 12);
        let gu = mat(2 * i, h, 40);
        let down = mat(h, i, 41);
        let lora = ExpertLora {
            gate: Some(pair(2, h, i, 50, 0.7)),
            up: Some(pair(3, h, i, 60, 1.3)),
            down: Some(pair(2, i, h, 70, 0.9)),
        };
        let experts = vec![SwigluWeights::plain(gu.clone(), down.clone())];
        // The merged expert: gate rows then up rows of gate_up.
        let g = merged(&HostMatrix::f32(i, h, vals(&gu)[..i * h].to_vec()), lora.gate.as_ref().unwrap());
        let u = merged(&HostMatrix::f32(i, h, vals(&gu)[i * h..].to_vec()), lora.up.as_ref().unwrap());
        let gu_m = HostMatrix::f32(2 * i, h, [vals(&g), vals(&u)].concat());
        let merged_experts = vec![SwigluWeights::plain(gu_m, merged(&down, lora.down.as_ref().unwrap()))];
        let x = act(&mat(4, h, 3));
        let mut plan = ExpertPlan::default();
        plan.rebuild(1, 1, &[(0, 1.0), (0, 0.5), (0, 0.25), (0, 2.0)]);
        let mut s = FfnScratch::new(&be);
        let (mut got, mut want, mut base) = (HostTensor::default(), HostTensor::default(), HostTensor::default());
        be.zeros(4, h, &mut got);
        be.zeros(4, h, &mut want);
        be.zeros(4, h, &mut base);
        // Rows 1 and 3 use the adapter.
        be.expert_ffn_lora(&x, &experts, &plan, &|r, _| (r % 2 == 1).then_some(&lora), &mut s, &mut got);
        be.expert_ffn(&x, &merged_experts, &plan, &mut s, &mut want);
        be.expert_ffn(&x, &experts, &plan, &mut s, &mut base);
        for r in 0..4 {
            close(got.row(r), if r % 2 == 1 { want.row(r) } else { base.row(r) });
        }
    }
}
