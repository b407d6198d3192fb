//! Tests of the batch-invariant kernels: every row is its solo result bit for bit; strided dots and lane-weighted rows equal the matmul.

use super::*;
use crate::cpu::selection::values;

/// Every element equals the canonical dot product bit for bit, and every row equals the same
/// row computed alone: for odd shapes (tails in k, partial tiles in rows and columns), f32
/// and bf16 weights, one thread and many.
#[test]
fn every_row_is_its_solo_result_bit_for_bit() {
    for &(m, k, n) in &[(1, 7, 5), (3, 17, 29), (5, 64, 50), (9, 100, 77), (70, 200, 300), (130, 96, 24)] {
        let x = values(m * k, 1 + m as u32);
        let w = values(n * k, 2 + n as u32);
        let bits: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        for weights in [Weights::F32(&w), Weights::Bf16(&bits)] {
            let mut all = vec![f32::NAN; m * n];
            matmul(&x, m, k, weights, n, &mut all);
            for r in 0..m {
                let mut solo = vec![f32::NAN; n];
                matmul(&x[r * k..(r + 1) * k], 1, k, weights, n, &mut solo);
                for c in 0..n {
                    let want = match weights {
                        Weights::F32(w) => canonical_dot(&x[r * k..], |i| w[c * k + i], k),
                        Weights::Bf16(b) => canonical_dot(&x[r * k..], |i| bf16_to_f32(b[c * k + i]), k),
                    };
                    assert_eq!(all[r * n + c].to_bits(), want.to_bits(), "{m}x{k}x{n} ({r},{c})");
                    assert_eq!(solo[c].to_bits(), want.to_bits(), "solo {m}x{k}x{n} ({r},{c})");
                }
            }
        }
    }
}

#[test]
fn strided_dots_equal_matmul_elements() {
    let (k, n, stride) = (20, 11, 36);
    let a = values(k, 5);
    let b = values(n * stride, 6);
    let mut got = vec![0.0; n];
    dots(&a, &b, stride, &mut got);
    for (j, g) in got.iter().enumerate() {
        let want = canonical_dot(&a, |i| b[j * stride + i], k);
        assert_eq!(g.to_bits(), want.to_bits(), "key {j}");
    }
}

/// The lane kernel equals a matmul element over the aligned, zero-padded range.
#[test]
fn lane_weighted_rows_equal_padded_matmul() {
    let (hd, n, start) = (20usize, 13usize, 11usize);
    let p = values(n, 7);
    let rows = values(n * hd, 8);
    let mut got = vec![0.0; hd];
    let mut lanes = Vec::new();
    lane_weighted_rows(&p, start, |j| &rows[j * hd..(j + 1) * hd], &mut got, &mut lanes);
    let (k0, end) = (start & !7, (start + n).div_ceil(8) * 8);
    let k = end - k0;
    let mut padded = vec![0.0f32; k];
    padded[start - k0..start - k0 + n].copy_from_slice(&p);
    let mut vt = vec![0.0f32; hd * k]; // column d of the rows, over the padded range
    for j in 0..n {
        for d in 0..hd {
            vt[d * k + start - k0 + j] = rows[j * hd + d];
        }
    }
    let mut want = vec![0.0; hd];
    matmul(&padded, 1, k, Weights::F32(&vt), hd, &mut want);
    for d in 0..hd {
        assert_eq!(got[d].to_bits(), want[d].to_bits(), "column {d}");
    }
}

#[test]
fn canonical_dot_is_a_dot_product() {
    let a = values(37, 3);
    let b = values(37, 4);
    let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    assert!((canonical_dot(&a, |i| b[i], 37) - naive).abs() < 1e-4);
}

/// Every kernel set this CPU runs gives the canonical bits, row by row and solo (the sets are
/// interchangeable between replicas). Says which sets it could not run here.
#[test]
fn every_kernel_set_gives_the_canonical_bits() {
    let all = [CpuKernels::Avx512, CpuKernels::Avx2, CpuKernels::Neon, CpuKernels::Portable];
    let missing: Vec<&str> = all.iter().filter(|k| !k.available()).map(|k| k.name()).collect();
    if !missing.is_empty() {
        eprintln!("this CPU does not run the {} kernels: not compared here", missing.join(", "));
    }
    for &(m, k, n) in &[(1, 7, 5), (2, 24, 17), (3, 17, 29), (8, 64, 40), (9, 100, 77), (70, 200, 300), (17, 512, 33)] {
        let x = values(m * k, 11 + m as u32);
        let w = values(n * k, 12 + n as u32);
        let bits: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        for weights in [Weights::F32(&w), Weights::Bf16(&bits)] {
            for set in all.iter().copied().filter(|k| k.available()) {
                let mut got = vec![f32::NAN; m * n];
                matmul_using(set, &x, m, k, weights, n, &mut got);
                for r in 0..m {
                    let mut solo = vec![f32::NAN; n];
                    matmul_using(set, &x[r * k..(r + 1) * k], 1, k, weights, n, &mut solo);
                    for c in 0..n {
                        let want = match weights {
                            Weights::F32(w) => canonical_dot(&x[r * k..], |i| w[c * k + i], k),
                            Weights::Bf16(b) => canonical_dot(&x[r * k..], |i| bf16_to_f32(b[c * k + i]), k),
                        };
                        assert_eq!(got[r * n + c].to_bits(), want.to_bits(), "{set} {m}x{k}x{n} ({r},{c})");
                        assert_eq!(solo[c].to_bits(), want.to_bits(), "{set} solo {m}x{k}x{n} ({r},{c})");
                    }
                }
            }
        }
    }
}

/// Decode-shaped products streaming from memory (weights far larger than the caches), one row
/// and a few: GB/s of weights, median of rounds.
#[test]
#[ignore = "timing, by hand with --release"]
fn decode_bandwidth() {
    let shapes = [(512usize, 32000usize, 2usize), (512, 2048, 32), (1024, 512, 64)];
    for &(k, n, copies) in &shapes {
        let w = values(k * n * copies, 9);
        let bits: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        for m in [1usize, 16] {
            let x = values(m * k, 3);
            let mut out = vec![0.0; m * n];
            for (name, bytes) in [("f32", 4usize), ("bf16", 2)] {
                let mut rates = Vec::new();
                for round in 0..7 {
                    let t = std::time::Instant::now();
                    for c in 0..copies {
                        let span = c * n * k..(c + 1) * n * k;
                        let wt = if bytes == 4 { Weights::F32(&w[span]) } else { Weights::Bf16(&bits[span]) };
                        matmul(&x, m, k, wt, n, &mut out);
                    }
                    if round > 0 {
                        rates.push((k * n * copies * bytes) as f64 / t.elapsed().as_secs_f64() / 1e9);
                    }
                }
                rates.sort_by(|a, b| a.total_cmp(b));
                eprintln!("{m}x{k}x{n} x{copies} {name}: {:.1} GB/s", rates[rates.len() / 2]);
            }
        }
    }
}

#[test]
#[ignore = "timing, by hand with --release"]
fn ab_huge_pages() {
    for &(k, n, copies) in &[(512usize, 32000usize, 2usize), (512, 2048, 32)] {
        let plain: Vec<Vec<f32>> = (0..copies).map(|c| values(k * n, 9 + c as u32)).collect();
        let huge: Vec<Vec<f32>> = plain.iter().map(|v| crate::cpu::pages::in_huge_pages(v.clone())).collect();
        let x = values(k, 3);
        let mut out = vec![0.0; n];
        let mut t = [Vec::new(), Vec::new()];
        for round in 0..40 {
            let set = if round % 2 == 0 { &plain } else { &huge };
            let s = std::time::Instant::now();
            for w in set {
                matmul(&x, 1, k, Weights::F32(w), n, &mut out);
            }
            t[round % 2].push((k * n * copies * 4) as f64 / s.elapsed().as_secs_f64() / 1e9);
        }
        for v in t.iter_mut() {
            v.sort_by(|a, b| a.total_cmp(b));
        }
        eprintln!("1x{k}x{n} x{copies}: plain {:.1} GB/s, huge pages {:.1} GB/s", t[0][10], t[1][10]);
    }
}

/// Plain streaming reads (a vector sum) against the LM-head product over the same bytes.
#[test]
#[ignore = "timing, by hand with --release"]
#[cfg(target_arch = "x86_64")]
fn read_bandwidth() {
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum(v: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        while i + 64 <= v.len() {
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, _mm256_loadu_ps(v.as_ptr().add(i + 8 * j)));
            }
            i += 64;
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), acc.iter().fold(_mm256_setzero_ps(), |s, a| _mm256_add_ps(s, *a)));
        out.iter().sum()
    }
    if !CpuKernels::Avx2.available() {
        return;
    }
    let n = 512 * 32000 * 2;
    let v: Vec<f32> = crate::cpu::pages::in_huge_pages(values(n, 3));
    let x = values(512, 3);
    let mut out = vec![0.0; 32000];
    for _ in 0..4 {
        let t = std::time::Instant::now();
        // SAFETY: AVX2 checked above.
        let s: f32 = v.par_chunks(1 << 15).map(|c| unsafe { sum(c) }).sum();
        let dt = t.elapsed().as_secs_f64();
        let t2 = std::time::Instant::now();
        for c in 0..2 {
            matmul(&x, 1, 512, Weights::F32(&v[c * 512 * 32000..(c + 1) * 512 * 32000]), 32000, &mut out);
        }
        let dt2 = t2.elapsed().as_secs_f64();
        eprintln!(
            "pure read {:.1} GB/s ({s}); LM head kernel {:.1} GB/s",
            (n * 4) as f64 / dt / 1e9,
            (n * 4) as f64 / dt2 / 1e9
        );
    }
}
