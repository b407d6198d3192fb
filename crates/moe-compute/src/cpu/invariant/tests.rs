//! Tests of the batch-invariant kernels: every row is its solo result bit for bit; strided dots and lane-weighted rows equal the matmul.

use super::*;

fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 20001) as f32 / 10000.0 - 1.0
        })
        .collect()
}

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

#[test]
#[ignore = "timing, by hand with --release"]
fn read_bandwidth() {
    let n = 64 << 20;
    let v: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let s: f32 = v.par_chunks(1 << 16).map(|c| c.iter().sum::<f32>()).sum();
        let dt = t.elapsed().as_secs_f64();
        eprintln!("read {:.1} GB/s ({s})", (n * 4) as f64 / dt / 1e9);
    }
    let w = &v[..512 * 32000];
    let x = values(512, 3);
    let mut out = vec![0.0; 32000];
    for _ in 0..5 {
        let t = std::time::Instant::now();
        matmul(&x, 1, 512, Weights::F32(w), 32000, &mut out);
        let dt = t.elapsed().as_secs_f64();
        eprintln!("lm head {:.2} ms {:.1} GB/s", dt * 1e3, (512 * 32000 * 4) as f64 / dt / 1e9);
    }
}
