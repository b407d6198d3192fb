//! Baselines (device copy bandwidth, cuBLAS dense bf16 GEMM) and the checks of the matrix
//! kernels: the grouped expert GEMM (plain and with fused SwiGLU) against the CPU backend's
//! bf16 GEMM, on ragged loads with a zero-token expert and on Mixtral-8x7B expert shapes, and
//! the batched multi-adapter LoRA shrink/expand.

use super::elementwise::routing;
use super::{compared, from_bf16, grid, launched, timed_bytes, to_bf16, CheckRow, Gpu, Result, Rng};
use super::{BF16_BOUND, F32_BOUND};
use crate::cpu::{matmul_t, matmul_tw, Weights};
use crate::ComputeError;
use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};

/// Device-to-device copy, GB/s counting bytes read and written.
pub(super) fn copy_bandwidth(g: &Gpu, quick: bool) -> Result<f64> {
    let n = if quick { 64 << 20 } else { 256 << 20 };
    let src = g.stream.alloc_zeros::<f32>(n).map_err(|e| ComputeError::Cuda(format!("alloc: {e}")))?;
    let mut dst = g.stream.alloc_zeros::<f32>(n).map_err(|e| ComputeError::Cuda(format!("alloc: {e}")))?;
    let ms = g.time(|| g.stream.memcpy_dtod(&src, &mut dst).map_err(|e| ComputeError::Cuda(format!("copy: {e}"))))?;
    Ok(2.0 * (n * 4) as f64 / (ms * 1e-3) / 1e9)
}

/// The grouped GEMM's shape as one dense GEMM: (rows, N, K).
fn dense_shape(quick: bool) -> (usize, usize, usize) {
    if quick {
        (1024, 14336, 4096)
    } else {
        (8192, 14336, 4096)
    }
}

/// cuBLAS bf16 GEMM (f32 accumulation) TFLOP/s on random data, or `None` when libcublas is not
/// loadable (the check goes on without that baseline).
pub(super) fn cublas_tflops(g: &Gpu, quick: bool) -> Option<f64> {
    use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
    use half::bf16;
    let run = || -> Result<f64> {
        let blas = super::guarded("cuBLAS", || CudaBlas::new(g.stream.clone()))?
            .map_err(|e| ComputeError::Cuda(format!("cuBLAS: {e}")))?;
        let (m, n, k) = dense_shape(quick);
        let mut rng = Rng::new(7);
        let a: Vec<bf16> = (0..m * k).map(|_| bf16::from_f32(rng.uniform())).collect();
        let b: Vec<bf16> = (0..k * n).map(|_| bf16::from_f32(rng.uniform())).collect();
        let (da, db) = (g.up(&a)?, g.up(&b)?);
        let mut dc = g.stream.alloc_zeros::<bf16>(m * n).map_err(|e| ComputeError::Cuda(format!("alloc: {e}")))?;
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: m as i32,
            n: n as i32,
            k: k as i32,
            alpha: bf16::ONE,
            lda: m as i32,
            ldb: k as i32,
            beta: bf16::ZERO,
            ldc: m as i32,
        };
        let ms = g.time(|| {
            // SAFETY: da, db and dc were allocated for the m×k, k×n and m×n elements `cfg` describes.
            unsafe { blas.gemm(cfg, &da, &db, &mut dc) }.map_err(|e| ComputeError::Cuda(format!("cuBLAS gemm: {e}")))
        })?;
        Ok(2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12)
    };
    match run() {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("cuBLAS baseline unavailable: {e}");
            None
        }
    }
}

fn bf16_vec(rng: &mut Rng, n: usize, scale: f32) -> Vec<u16> {
    (0..n).map(|_| to_bf16(rng.uniform() * scale)).collect()
}

fn widen(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| from_bf16(b)).collect()
}

/// The slots checked against the CPU: all of them for small cases, else the first and last of
/// each expert and some at random.
fn checked_slots(rng: &mut Rng, offsets: &[i32], all: bool) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for e in 0..offsets.len() - 1 {
        let (s0, s1) = (offsets[e] as usize, offsets[e + 1] as usize);
        if all {
            out.extend((s0..s1).map(|s| (s, e)));
        } else if s1 > s0 {
            out.push((s0, e));
            out.push((s1 - 1, e));
            for _ in 0..6 {
                out.push((s0 + rng.below(s1 - s0), e));
            }
        }
    }
    out
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

pub(super) fn grouped(g: &Gpu, rng: &mut Rng, quick: bool, cublas: Option<f64>) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    let (tokens, n_big, k_big) = if quick { (512, 14336, 4096) } else { (4096, 14336, 4096) };
    // (offsets, N, K, name): ragged loads with a zero-token expert and odd K; then Mixtral-8x7B.
    let small: Vec<i32> = vec![0, 5, 5, 75, 76];
    let odd: Vec<i32> = vec![0, 3, 3, 10];
    let (_, _, big) = routing(rng, tokens, 8, 2, None);
    for (offsets, n, k, label) in [
        (small, 72usize, 40usize, "4 experts, loads 5/0/70/1"),
        (odd, 70, 37, "3 experts, loads 3/0/7, odd K, N not a multiple of 8"),
        (big, n_big, k_big, "Mixtral-8x7B w1: 8 experts, top-2"),
    ] {
        let experts = offsets.len() - 1;
        let slots = offsets[experts] as usize;
        let max_load = (0..experts).map(|e| (offsets[e + 1] - offsets[e]) as u32).max().unwrap_or(0);
        let shape = format!("{label}, {slots} slots, N {n}, K {k}");
        let x = bf16_vec(rng, slots * k, 1.0);
        let w = bf16_vec(rng, experts * n * k, 0.05);
        let (dx, dw, doff) = (g.up(&x)?, g.up(&w)?, g.up(&offsets)?);
        let mut dout = g.poisoned(slots * n)?;
        let (ni, ki) = (n as i32, k as i32);
        let cfg = grid((n as u32).div_ceil(64), max_load.div_ceil(64), experts as u32, 128);
        let run = |dout: &mut CudaSlice<f32>| {
            let mut b = g.stream.launch_builder(g.func("grouped_gemm_bf16")?);
            b.arg(&dx).arg(&dw).arg(dout).arg(&doff).arg(&ni).arg(&ki);
            // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
            // (types and order), and every buffer was allocated for the sizes this grid covers.
            launched(unsafe { b.launch(cfg) }, "grouped_gemm_bf16")
        };
        run(&mut dout)?;
        g.sync()?;
        let got = g.down(&dout)?;
        let xf = widen(&x);
        let (mut got_rows, mut want_rows) = (Vec::new(), Vec::new());
        let mut row = vec![0.0f32; n];
        for (s, e) in checked_slots(rng, &offsets, slots < 1000) {
            matmul_tw(&xf[s * k..(s + 1) * k], 1, k, Weights::Bf16(&w[e * n * k..(e + 1) * n * k]), n, &mut row);
            want_rows.extend_from_slice(&row);
            got_rows.extend_from_slice(&got[s * n..(s + 1) * n]);
        }
        // Every slot must have been written, checked or not.
        let unwritten = got.iter().filter(|v| v.is_nan()).count();
        let mut r = compared("grouped_gemm_bf16", shape.clone(), &got_rows, &want_rows, F32_BOUND * 10.0);
        if unwritten > 0 {
            r.passed = false;
            r.note = format!("{unwritten} outputs never written");
        }
        out.push(r);
        let flops = 2.0 * (slots * n * k) as f64;
        if slots >= 1000 {
            let ms = g.time(|| run(&mut dout))?;
            out.push(timed_flops("grouped_gemm_bf16", shape.clone(), ms, flops, cublas));
        }

        // Fused SwiGLU: gate and up rows of one [2I, K] weight per expert, bf16 hidden out.
        let inter = n;
        let wgu = bf16_vec(rng, experts * 2 * inter * k, 0.05);
        let dwgu = g.up(&wgu)?;
        let mut dh = g.poisoned_bf16(slots * inter)?;
        let ii = inter as i32;
        let run_s = |dh: &mut CudaSlice<u16>| {
            let mut b = g.stream.launch_builder(g.func("grouped_gemm_swiglu_bf16")?);
            b.arg(&dx).arg(&dwgu).arg(dh).arg(&doff).arg(&ii).arg(&ki);
            // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
            // (types and order), and every buffer was allocated for the sizes this grid covers.
            launched(unsafe { b.launch(cfg) }, "grouped_gemm_swiglu_bf16")
        };
        run_s(&mut dh)?;
        g.sync()?;
        let got_h = widen(&g.down(&dh)?);
        let (mut got_rows, mut want_rows) = (Vec::new(), Vec::new());
        let mut gu = vec![0.0f32; 2 * inter];
        for (s, e) in checked_slots(rng, &offsets, slots < 1000) {
            let we = &wgu[e * 2 * inter * k..(e + 1) * 2 * inter * k];
            matmul_tw(&xf[s * k..(s + 1) * k], 1, k, Weights::Bf16(we), 2 * inter, &mut gu);
            want_rows.extend((0..inter).map(|j| from_bf16(to_bf16(silu(gu[j]) * gu[inter + j]))));
            got_rows.extend_from_slice(&got_h[s * inter..(s + 1) * inter]);
        }
        let unwritten = got_h.iter().filter(|v| v.is_nan()).count();
        let mut r = compared("grouped_gemm_swiglu_bf16", shape.clone(), &got_rows, &want_rows, BF16_BOUND);
        if unwritten > 0 {
            r.passed = false;
            r.note = format!("{unwritten} outputs never written");
        }
        out.push(r);
        if slots >= 1000 {
            let ms = g.time(|| run_s(&mut dh))?;
            out.push(timed_flops("grouped_gemm_swiglu_bf16", shape, ms, 2.0 * flops, cublas));
        }
    }
    Ok(out)
}

fn timed_flops(kernel: &str, shape: String, ms: f64, flops: f64, cublas: Option<f64>) -> CheckRow {
    let tflops = flops / (ms * 1e-3) / 1e12;
    CheckRow {
        kernel: kernel.into(),
        shape,
        passed: true,
        ms: Some(ms),
        rate: Some((tflops, "TFLOP/s")),
        fraction: cublas.map(|c| (tflops / c, "cuBLAS")),
        note: "aim: 60% of cuBLAS".into(),
        ..Default::default()
    }
}

pub(super) fn lora(g: &Gpu, rng: &mut Rng, quick: bool, copy: f64) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    let big_rows = if quick { 1024 } else { 8192 };
    let small_map = vec![-1, 0, 1, 2, 0, -1, 2, 1, 0];
    let big_map: Vec<i32> = (0..big_rows).map(|i| (i % 9) as i32 - 1).collect();
    for (row_adapter, ranks, in_dim, out_dim) in
        [(small_map, vec![4usize, 8, 16], 64usize, 96usize), (big_map, vec![16; 8], 4096, 4096)]
    {
        let rows = row_adapter.len();
        let max_rank = *ranks.iter().max().unwrap_or(&1);
        let (stride, col) = (out_dim + 10, 5usize);
        let scales: Vec<f32> = (0..ranks.len()).map(|i| 0.5 + i as f32).collect();
        let a: Vec<Vec<f32>> = ranks.iter().map(|&r| rng.vec(r * in_dim, 0.1)).collect();
        let b: Vec<Vec<f32>> = ranks.iter().map(|&r| rng.vec(out_dim * r, 0.1)).collect();
        let x = rng.vec(rows * in_dim, 1.0);
        let base = rng.vec(rows * stride, 1.0);
        // Reference with the CPU backend's GEMM: tmp = x A^T, out[:, col..] += scale * tmp B^T.
        let (mut want_tmp, mut want_out) = (Vec::new(), base.clone());
        let mut t = vec![0.0f32; max_rank];
        let mut o = vec![0.0f32; out_dim];
        for (r, &ad) in row_adapter.iter().enumerate() {
            if ad < 0 {
                continue;
            }
            let ad = ad as usize;
            let rank = ranks[ad];
            matmul_t(&x[r * in_dim..(r + 1) * in_dim], 1, in_dim, &a[ad], rank, &mut t[..rank]);
            want_tmp.extend_from_slice(&t[..rank]);
            matmul_t(&t[..rank], 1, rank, &b[ad], out_dim, &mut o);
            for c in 0..out_dim {
                want_out[r * stride + col + c] += scales[ad] * o[c];
            }
        }
        let da: Vec<CudaSlice<f32>> = a.iter().map(|v| g.up(v)).collect::<Result<_>>()?;
        let db: Vec<CudaSlice<f32>> = b.iter().map(|v| g.up(v)).collect::<Result<_>>()?;
        let a_ptrs: Vec<u64> = da.iter().map(|s| s.device_ptr(&g.stream).0).collect();
        let b_ptrs: Vec<u64> = db.iter().map(|s| s.device_ptr(&g.stream).0).collect();
        let ranks_i: Vec<i32> = ranks.iter().map(|&r| r as i32).collect();
        let (dap, dbp, dranks, dscales, dmap, dx) =
            (g.up(&a_ptrs)?, g.up(&b_ptrs)?, g.up(&ranks_i)?, g.up(&scales)?, g.up(&row_adapter)?, g.up(&x)?);
        let mut dtmp = g.poisoned(rows * max_rank)?;
        let mut dout = g.up(&base)?;
        let (ii, mri, oi, si, ci) = (in_dim as i32, max_rank as i32, out_dim as i32, stride as i32, col as i32);
        let shrink = |dtmp: &mut CudaSlice<f32>| {
            let mut bld = g.stream.launch_builder(g.func("lora_shrink_f32")?);
            bld.arg(&dx).arg(&ii).arg(&dap).arg(&dranks).arg(&dmap).arg(dtmp).arg(&mri);
            // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
            // (types and order), and every buffer was allocated for the sizes this grid covers.
            launched(unsafe { bld.launch(grid(rows as u32, 1, 1, 128)) }, "lora_shrink_f32")
        };
        let col_blocks = (out_dim as u32).div_ceil(256).min(64);
        let expand = |dtmp: &CudaSlice<f32>, dout: &mut CudaSlice<f32>| {
            let mut bld = g.stream.launch_builder(g.func("lora_expand_f32")?);
            bld.arg(dtmp)
                .arg(&mri)
                .arg(&dbp)
                .arg(&dranks)
                .arg(&dscales)
                .arg(&dmap)
                .arg(dout)
                .arg(&si)
                .arg(&ci)
                .arg(&oi);
            // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
            // (types and order), and every buffer was allocated for the sizes this grid covers.
            launched(unsafe { bld.launch(grid(rows as u32, col_blocks, 1, 256)) }, "lora_expand_f32")
        };
        shrink(&mut dtmp)?;
        expand(&dtmp, &mut dout)?;
        g.sync()?;
        let tmp = g.down(&dtmp)?;
        let got_tmp: Vec<f32> = row_adapter
            .iter()
            .enumerate()
            .filter(|(_, &ad)| ad >= 0)
            .flat_map(|(r, &ad)| tmp[r * max_rank..r * max_rank + ranks[ad as usize]].to_vec())
            .collect();
        let shape = format!("{rows} rows, {} adapters of rank {:?}, {in_dim} -> {out_dim}", ranks.len(), ranks);
        out.push(compared("lora_shrink_f32", shape.clone(), &got_tmp, &want_tmp, F32_BOUND));
        out.push(compared("lora_expand_f32", shape.clone(), &g.down(&dout)?, &want_out, F32_BOUND));
        if rows == big_rows {
            let ms = g.time(|| shrink(&mut dtmp))?;
            out.push(timed_bytes("lora_shrink_f32", shape.clone(), ms, (rows * in_dim * 4) as f64, copy));
            let ms = g.time(|| expand(&dtmp, &mut dout))?;
            out.push(timed_bytes("lora_expand_f32", shape, ms, (2 * rows * out_dim * 4) as f64, copy));
        }
    }
    Ok(out)
}
