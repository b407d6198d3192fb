//! The tensor-core kernels' index arithmetic, executed on the CPU: shared-memory tiles filled
//! with the kernels' `cp.async` mapping and swizzle, `ldmatrix` (plain and `.trans`) and
//! `mma.sync.m16n8k16` emulated lane by lane with the fragment layouts of the PTX ISA, and the
//! kernels' lane-address and epilogue formulas copied from kernels/grouped_gemm_tc.cu and
//! kernels/flash_prefill.cu. With small integer inputs every product is exact, so the tests
//! demand bit-for-bit equality with a plain matrix product: a wrong lane formula, swizzle, or
//! fragment order fails here, before any GPU time is spent.

/// An 8×8 matrix of 16-bit values as ldmatrix sees it: row r at shared-memory element `rows[r]`.
fn matrix(smem: &[f32], rows: [usize; 8]) -> [[f32; 8]; 8] {
    let mut m = [[0.0; 8]; 8];
    for (r, &at) in rows.iter().enumerate() {
        m[r].copy_from_slice(&smem[at..at + 8]);
    }
    m
}

/// `ldmatrix.x4` (`trans` for `.trans`): lane addresses (in elements) → each lane's four
/// registers, a register being the pair of values (low, high).
fn ldmatrix_x4(smem: &[f32], lane_addr: &[usize; 32], trans: bool) -> [[(f32, f32); 4]; 32] {
    let mut out = [[(0.0, 0.0); 4]; 32];
    for i in 0..4 {
        let rows: [usize; 8] = std::array::from_fn(|r| lane_addr[8 * i + r]);
        let m = matrix(smem, rows);
        for (l, regs) in out.iter_mut().enumerate() {
            let (r, c) = (l / 4, 2 * (l % 4));
            regs[i] = if trans { (m[c][r], m[c + 1][r]) } else { (m[r][c], m[r][c + 1]) };
        }
    }
    out
}

/// `mma.sync.m16n8k16.row.col`: c += a · b from each lane's fragments.
fn mma(c: &mut [[f32; 4]; 32], a: &[[(f32, f32); 4]; 32], b: &[[(f32, f32); 2]; 32]) {
    let (mut am, mut bm) = ([[0.0f32; 16]; 16], [[0.0f32; 8]; 16]);
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        let put = |m: &mut [[f32; 16]; 16], r: usize, k: usize, v: (f32, f32)| {
            m[r][k] = v.0;
            m[r][k + 1] = v.1;
        };
        put(&mut am, g, 2 * t, a[l][0]);
        put(&mut am, g + 8, 2 * t, a[l][1]);
        put(&mut am, g, 2 * t + 8, a[l][2]);
        put(&mut am, g + 8, 2 * t + 8, a[l][3]);
        (bm[2 * t][g], bm[2 * t + 1][g]) = b[l][0];
        (bm[2 * t + 8][g], bm[2 * t + 9][g]) = b[l][1];
    }
    for (l, lane) in c.iter_mut().enumerate() {
        let (g, t) = (l / 4, l % 4);
        for (e, cv) in lane.iter_mut().enumerate() {
            let (r, n) = (g + 8 * (e / 2), 2 * t + e % 2);
            *cv += (0..16).map(|k| am[r][k] * bm[k][n]).sum::<f32>();
        }
    }
}

/// grouped_gemm_tc.cu's `swizzled(row, chunk)` (elements).
fn swizzled(row: usize, chunk: usize) -> usize {
    row * 64 + ((chunk ^ (row & 7)) << 3)
}

/// One block of grouped_gemm_tc (tiling BM×BN, warps WM×WN, BK 64) on the CPU: `x` rows
/// `row0..row0 + rows` (K each), weight rows `col0..` (N of them, K each); returns the block's
/// output as the epilogue writes it (None where it writes nothing). With `swiglu`, `w` holds
/// interleaved [gate; up] rows (N = 2 · inter) and the output is `inter` wide, written by the
/// SwiGLU epilogue's formulas (gate · up stands in for silu(gate) · up: the indices are the point).
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)] // lanes indexed as the kernel's threads
fn gemm_block(
    x: &[f32],
    w: &[f32],
    (rows, n, k): (usize, usize, usize),
    (bm, bn, wm_count, wn_count): (usize, usize, usize, usize),
    col0: usize,
    swiglu: bool,
) -> Vec<Option<f32>> {
    let threads = wm_count * wn_count * 32;
    let (wtm, wtn) = (bm / wm_count, bn / wn_count);
    let (mi_n, ni_n) = (wtm / 16, wtn / 8);
    let mut acc = vec![[[0.0f32; 4]; 32]; wm_count * wn_count * mi_n * ni_n];
    let acc_at = |warp: usize, mi: usize, ni: usize| (warp * mi_n + mi) * ni_n + ni;
    for kt in 0..k.div_ceil(64) {
        let k0 = kt * 64;
        let (mut sa, mut sb) = (vec![f32::NAN; bm * 64], vec![f32::NAN; bn * 64]);
        // load_stage: thread `tid`, iteration i: chunk c = tid + i * threads.
        for c in 0..bm * 8 {
            assert_eq!((c % threads) + (c / threads) * threads, c);
            let (r, ch) = (c >> 3, c & 7);
            let ok = r < rows && k0 + ch * 8 < k;
            for j in 0..8 {
                sa[swizzled(r, ch) + j] = if ok { x[r * k + k0 + ch * 8 + j] } else { 0.0 };
            }
        }
        for c in 0..bn * 8 {
            let (r, ch) = (c >> 3, c & 7);
            let ok = col0 + r < n && k0 + ch * 8 < k;
            for j in 0..8 {
                sb[swizzled(r, ch) + j] = if ok { w[(col0 + r) * k + k0 + ch * 8 + j] } else { 0.0 };
            }
        }
        for warp in 0..wm_count * wn_count {
            let (wm, wn) = (warp / wn_count, warp % wn_count);
            for kk in 0..4 {
                let a: Vec<_> = (0..mi_n)
                    .map(|mi| {
                        let addr = std::array::from_fn(|lane| {
                            let r = wm * wtm + mi * 16 + (lane & 15);
                            swizzled(r, kk * 2 + (lane >> 4))
                        });
                        ldmatrix_x4(&sa, &addr, false)
                    })
                    .collect();
                let mut b = vec![[[(0.0, 0.0); 2]; 32]; ni_n];
                for ni in (0..ni_n).step_by(2) {
                    let addr = std::array::from_fn(|lane| {
                        let r = wn * wtn + ni * 8 + ((lane >> 4) << 3) + (lane & 7);
                        swizzled(r, kk * 2 + ((lane >> 3) & 1))
                    });
                    let regs = ldmatrix_x4(&sb, &addr, false);
                    for l in 0..32 {
                        b[ni][l] = [regs[l][0], regs[l][1]];
                        b[ni + 1][l] = [regs[l][2], regs[l][3]];
                    }
                }
                for (mi, am) in a.iter().enumerate() {
                    for (ni, bn_frag) in b.iter().enumerate() {
                        mma(&mut acc[acc_at(warp, mi, ni)], am, bn_frag);
                    }
                }
            }
        }
    }
    if swiglu {
        // The epilogue of tc_gemm_swiglu.
        let inter = n / 2;
        let mut out = vec![None; rows * inter];
        for warp in 0..wm_count * wn_count {
            let (wm, wn) = (warp / wn_count, warp % wn_count);
            for lane in 0..32usize {
                let (g, t) = (lane >> 2, lane & 3);
                for mi in 0..mi_n {
                    for ni in (0..ni_n).step_by(2) {
                        for half in 0..2 {
                            let r = wm * wtm + mi * 16 + g + 8 * half;
                            let i = col0 + wn * wtn + ni * 8 + 2 * t;
                            if r >= rows || i >= n {
                                continue;
                            }
                            let col = (i >> 4) * 8 + (i & 7);
                            for j in 0..2 {
                                let gate = acc[acc_at(warp, mi, ni)][lane][2 * half + j];
                                let up = acc[acc_at(warp, mi, ni + 1)][lane][2 * half + j];
                                if col + j < inter {
                                    assert!(out[r * inter + col + j].is_none(), "written twice");
                                    out[r * inter + col + j] = Some(gate * up);
                                }
                            }
                        }
                    }
                }
            }
        }
        return out;
    }
    // The epilogue of tc_gemm.
    let mut out = vec![None; rows * n];
    for warp in 0..wm_count * wn_count {
        let (wm, wn) = (warp / wn_count, warp % wn_count);
        for lane in 0..32 {
            let (g, t) = (lane >> 2, lane & 3);
            for mi in 0..mi_n {
                for ni in 0..ni_n {
                    for half in 0..2 {
                        let r = wm * wtm + mi * 16 + g + 8 * half;
                        let c = col0 + wn * wtn + ni * 8 + 2 * t;
                        if r >= rows {
                            continue;
                        }
                        let v = acc[acc_at(warp, mi, ni)][lane];
                        for j in 0..2 {
                            if c + j < n {
                                assert!(out[r * n + c + j].is_none(), "written twice");
                                out[r * n + c + j] = Some(v[2 * half + j]);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// flash_prefill.cu's `fp_swz(row, chunk)` (elements, within a row of the head size).
fn fp_swz(row: usize, chunk: usize) -> usize {
    (chunk ^ (row & 7)) << 3
}

/// One warp of flash_prefill_bf16 over one key tile: S = Q·Kᵀ (16 rows × 64 keys) from
/// shared memory, then O = S·V with S taken straight from the accumulators as the A operand and
/// V through `ldmatrix.trans`. Returns (S, O) as (row, column) → value.
fn flash_warp(q: &[f32], k: &[f32], v: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
    let fill = |src: &[f32], rows: usize| {
        let mut smem = vec![f32::NAN; rows * d];
        for r in 0..rows {
            for c in 0..d {
                smem[r * d + fp_swz(r, c / 8) + c % 8] = src[r * d + c];
            }
        }
        smem
    };
    let (q_s, ks, vs) = (fill(q, 16), fill(k, 64), fill(v, 64));
    let qa: Vec<_> = (0..d / 16)
        .map(|kk| {
            let addr = std::array::from_fn(|lane| {
                let r = lane & 15;
                r * d + fp_swz(r, kk * 2 + (lane >> 4))
            });
            ldmatrix_x4(&q_s, &addr, false)
        })
        .collect();
    let mut s = vec![[[0.0f32; 4]; 32]; 8];
    for (kk, a) in qa.iter().enumerate() {
        for nt in (0..8).step_by(2) {
            let addr = std::array::from_fn(|lane| {
                let r = nt * 8 + ((lane >> 4) << 3) + (lane & 7);
                r * d + fp_swz(r, kk * 2 + ((lane >> 3) & 1))
            });
            let b = ldmatrix_x4(&ks, &addr, false);
            let b0: [[(f32, f32); 2]; 32] = std::array::from_fn(|l| [b[l][0], b[l][1]]);
            let b1: [[(f32, f32); 2]; 32] = std::array::from_fn(|l| [b[l][2], b[l][3]]);
            mma(&mut s[nt], a, &b0);
            mma(&mut s[nt + 1], a, &b1);
        }
    }
    let mut o = vec![[[0.0f32; 4]; 32]; d / 8];
    for kk in 0..4 {
        let a: [[(f32, f32); 4]; 32] = std::array::from_fn(|l| {
            [
                (s[2 * kk][l][0], s[2 * kk][l][1]),
                (s[2 * kk][l][2], s[2 * kk][l][3]),
                (s[2 * kk + 1][l][0], s[2 * kk + 1][l][1]),
                (s[2 * kk + 1][l][2], s[2 * kk + 1][l][3]),
            ]
        });
        for dt in (0..d / 8).step_by(2) {
            let addr = std::array::from_fn(|lane| {
                let r = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
                r * d + fp_swz(r, dt + (lane >> 4))
            });
            let b = ldmatrix_x4(&vs, &addr, true);
            let b0: [[(f32, f32); 2]; 32] = std::array::from_fn(|l| [b[l][0], b[l][1]]);
            let b1: [[(f32, f32); 2]; 32] = std::array::from_fn(|l| [b[l][2], b[l][3]]);
            mma(&mut o[dt], &a, &b0);
            mma(&mut o[dt + 1], &a, &b1);
        }
    }
    // Accumulator (row g + 8 (e / 2), column 2 t + e % 2) of each n8 tile.
    let unpack = |frags: &[[[f32; 4]; 32]], cols: usize| {
        let mut m = vec![f32::NAN; 16 * cols];
        for (tile, f) in frags.iter().enumerate() {
            for (l, vals) in f.iter().enumerate() {
                for (e, &val) in vals.iter().enumerate() {
                    m[(l / 4 + 8 * (e / 2)) * cols + tile * 8 + 2 * (l % 4) + e % 2] = val;
                }
            }
        }
        m
    };
    (unpack(&s, 64), unpack(&o, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn ints(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.below(7) as f32 - 3.0).collect()
    }

    /// Both tilings of grouped_gemm_tc, rows and columns short of the tile, K not a multiple of
    /// 64: every output written once and equal to the plain product.
    #[test]
    fn the_tensor_core_gemm_block_computes_the_product() {
        let mut rng = SplitMix64::new(12);
        for (tiling, rows, n, k) in
            [((128, 128, 2, 4), 100, 200, 136), ((64, 128, 1, 4), 7, 128, 64), ((128, 128, 2, 4), 128, 90, 40)]
        {
            let x = ints(&mut rng, rows * k);
            let w = ints(&mut rng, n * k);
            for col0 in (0..n).step_by(tiling.1) {
                let got = gemm_block(&x, &w, (rows, n, k), tiling, col0, false);
                for r in 0..rows {
                    for c in 0..n {
                        let inside = c >= col0 && c < col0 + tiling.1;
                        let want = (0..k).map(|i| x[r * k + i] * w[c * k + i]).sum::<f32>();
                        assert_eq!(got[r * n + c], inside.then_some(want), "tiling {tiling:?} r {r} c {c}");
                    }
                }
            }
        }
    }

    /// flash_prefill_bf16's fragment path for head sizes 64 and 128: scores and P·V (P from the
    /// accumulators, V by ldmatrix.trans) equal the plain products.
    #[test]
    fn flash_prefill_fragments_compute_scores_and_values() {
        let mut rng = SplitMix64::new(5);
        for d in [64usize, 128] {
            // Scores stay small integers, exact in bf16 as the kernel packs them.
            let q: Vec<f32> = (0..16 * d).map(|_| rng.below(3) as f32 - 1.0).collect();
            let k: Vec<f32> = (0..64 * d).map(|_| rng.below(3) as f32 - 1.0).collect();
            let v = ints(&mut rng, 64 * d);
            let (s, o) = flash_warp(&q, &k, &v, d);
            for r in 0..16 {
                for key in 0..64 {
                    let want: f32 = (0..d).map(|i| q[r * d + i] * k[key * d + i]).sum();
                    assert_eq!(s[r * 64 + key], want, "d {d} score {r},{key}");
                }
                for c in 0..d {
                    let want: f32 = (0..64).map(|key| s[r * 64 + key] * v[key * d + c]).sum();
                    assert_eq!(o[r * d + c], want, "d {d} out {r},{c}");
                }
            }
        }
    }

    /// The SwiGLU epilogue on interleaved gate/up rows writes gate · up for every intermediate
    /// column once (both tilings, an intermediate size not a multiple of the tile).
    #[test]
    fn the_swiglu_epilogue_pairs_gate_and_up_columns() {
        let mut rng = SplitMix64::new(13);
        for (tiling, rows, inter, k) in [((128, 128, 2, 4), 70, 104, 64), ((64, 128, 1, 4), 9, 64, 128)] {
            let x = ints(&mut rng, rows * k);
            let w = ints(&mut rng, 2 * inter * k);
            let wi = super::super::tiles::interleave_gate_up(&w, inter, k).expect("multiple of 8");
            let mut hidden = vec![None; rows * inter];
            for col0 in (0..2 * inter).step_by(tiling.1) {
                for (i, v) in gemm_block(&x, &wi, (rows, 2 * inter, k), tiling, col0, true).into_iter().enumerate() {
                    if v.is_some() {
                        assert!(hidden[i].is_none(), "two blocks wrote {i}");
                        hidden[i] = v;
                    }
                }
            }
            let dot = |r: usize, row: usize| (0..k).map(|j| x[r * k + j] * w[row * k + j]).sum::<f32>();
            for r in 0..rows {
                for c in 0..inter {
                    assert_eq!(hidden[r * inter + c], Some(dot(r, c) * dot(r, inter + c)), "tiling {tiling:?} {r},{c}");
                }
            }
        }
    }
}
