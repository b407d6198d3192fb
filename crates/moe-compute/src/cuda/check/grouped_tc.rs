//! The tensor-core grouped expert GEMM (kernels/grouped_gemm_tc.cu, issue 33) against the CPU
//! backend and against cuBLAS: odd shapes (ragged loads, a zero-token expert, N and K not
//! multiples of the tile) with poisoned outputs; the SwiGLU epilogue on interleaved gate/up
//! weights; batch invariance (a row's bits alone and among 64 rows); then Mixtral-8x7B prefill
//! (4096 tokens top-2) against dense cuBLAS at equal FLOPs and decode loads (16 and 64 rows per
//! expert) against one cuBLAS call per expert, the path served today.

use super::{compared, from_bf16, launched, to_bf16, CheckRow, Gpu, Result, Rng, BF16_BOUND, F32_BOUND};
use crate::cpu::{matmul_tw, Weights};
use crate::gpu_plan::tiles::{interleave_gate_up, GemmTiling};
use crate::ComputeError;
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

const TILINGS: [(GemmTiling, &str, &str); 2] = [
    (GemmTiling::EXPERT_DEFAULT, "grouped_gemm_tc_bf16", "grouped_gemm_tc_swiglu_bf16"),
    (GemmTiling::EXPERT_SMALL_M, "grouped_gemm_tc_small_bf16", "grouped_gemm_tc_swiglu_small_bf16"),
];

/// A launch of one tiling over one routing: the tile table, its grid and the weight pointers.
struct Launch<'a> {
    g: &'a Gpu,
    tiling: GemmTiling,
    offsets: CudaSlice<i32>,
    tiles: CudaSlice<i32>,
    w_ptrs: CudaSlice<u64>,
    experts: i32,
    cfg: LaunchConfig,
}

impl<'a> Launch<'a> {
    fn new(
        g: &'a Gpu,
        tiling: GemmTiling,
        offsets: &[i32],
        w: &CudaSlice<u16>,
        per_expert: usize,
        n: usize,
    ) -> Result<Self> {
        let experts = offsets.len() - 1;
        let off_u: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
        let n_tiles = tiling.n_tiles(n as u32);
        let table: Vec<i32> = tiling.tile_offsets(&off_u, n_tiles).into_iter().map(|t| t as i32).collect();
        let pairs = off_u[experts] as usize;
        let base = w.device_ptr(&g.stream).0;
        let ptrs: Vec<u64> = (0..experts).map(|e| base + (e * per_expert * 2) as u64).collect();
        let cfg = LaunchConfig {
            grid_dim: (tiling.max_tiles(pairs, experts, n_tiles).max(1), 1, 1),
            block_dim: (tiling.threads(), 1, 1),
            shared_mem_bytes: tiling.shared_bytes(),
        };
        Ok(Self {
            g,
            tiling,
            offsets: g.up(offsets)?,
            tiles: g.up(&table)?,
            w_ptrs: g.up(&ptrs)?,
            experts: experts as i32,
            cfg,
        })
    }

    fn run<T: cudarc::driver::DeviceRepr>(
        &self,
        name: &str,
        x: &CudaSlice<u16>,
        out: &mut CudaSlice<T>,
        n: i32,
        k: i32,
    ) -> Result<()> {
        let f = self.g.func(name)?;
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            self.tiling.shared_bytes() as i32,
        )
        .map_err(|e| ComputeError::Cuda(format!("{name} shared memory: {e}")))?;
        let mut b = self.g.stream.launch_builder(f);
        b.arg(x).arg(&self.w_ptrs).arg(out).arg(&self.offsets).arg(&self.tiles).arg(&self.experts).arg(&n).arg(&k);
        // SAFETY: the arguments match the kernel's parameters (kernels/grouped_gemm_tc.cu); x has
        // a row of K per slot, every weight pointer an [N, K] matrix, out a row of N per slot.
        launched(unsafe { b.launch(self.cfg) }, name)
    }
}

fn bf16_vec(rng: &mut Rng, n: usize, scale: f32) -> Vec<u16> {
    (0..n).map(|_| to_bf16(rng.uniform() * scale)).collect()
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn offsets_of(loads: &[usize]) -> Vec<i32> {
    let mut o = vec![0i32];
    for &l in loads {
        o.push(o[o.len() - 1] + l as i32);
    }
    o
}

pub(super) fn grouped_tc(g: &Gpu, rng: &mut Rng, quick: bool, cublas: Option<f64>) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    // Correctness on odd shapes, every slot compared, outputs poisoned.
    for (loads, n, k) in
        [(vec![5usize, 0, 200, 1], 72usize, 40usize), (vec![3, 0, 7], 136, 200), (vec![130, 129], 256, 4096)]
    {
        let offsets = offsets_of(&loads);
        let slots = *offsets.last().unwrap_or(&0) as usize;
        let x = bf16_vec(rng, slots * k, 1.0);
        let w = bf16_vec(rng, loads.len() * n * k, 0.05);
        let (dx, dw) = (g.up(&x)?, g.up(&w)?);
        let xf: Vec<f32> = x.iter().map(|&b| from_bf16(b)).collect();
        let mut want = vec![0.0f32; slots * n];
        for (e, &l) in loads.iter().enumerate() {
            let s0 = offsets[e] as usize;
            if l > 0 {
                matmul_tw(
                    &xf[s0 * k..(s0 + l) * k],
                    l,
                    k,
                    Weights::Bf16(&w[e * n * k..(e + 1) * n * k]),
                    n,
                    &mut want[s0 * n..(s0 + l) * n],
                );
            }
        }
        // The SwiGLU weights: [gate; up] per expert, interleaved for the kernel (in groups of 8
        // rows, so the intermediate size is a multiple of 8; an empty buffer here once made the
        // kernel read past it).
        let inter = n / 2 / 8 * 8;
        let wgu = bf16_vec(rng, loads.len() * 2 * inter * k, 0.05);
        let mut wgu_i: Vec<u16> = Vec::with_capacity(wgu.len());
        for e in 0..loads.len() {
            let rows = interleave_gate_up(&wgu[e * 2 * inter * k..(e + 1) * 2 * inter * k], inter, k)
                .ok_or_else(|| ComputeError::Cuda(format!("gate/up interleaving needs inter % 8 == 0, got {inter}")))?;
            wgu_i.extend(rows);
        }
        let dwgu = g.up(&wgu_i)?;
        let mut want_h = vec![0.0f32; slots * inter];
        let mut gu = vec![0.0f32; 2 * inter];
        for (e, &l) in loads.iter().enumerate() {
            for s in offsets[e] as usize..offsets[e] as usize + l {
                matmul_tw(
                    &xf[s * k..(s + 1) * k],
                    1,
                    k,
                    Weights::Bf16(&wgu[e * 2 * inter * k..(e + 1) * 2 * inter * k]),
                    2 * inter,
                    &mut gu,
                );
                for j in 0..inter {
                    want_h[s * inter + j] = from_bf16(to_bf16(silu(gu[j]) * gu[inter + j]));
                }
            }
        }
        let shape = format!("loads {loads:?}, N {n}, K {k}");
        for (tiling, plain, swiglu) in TILINGS {
            let launch = Launch::new(g, tiling, &offsets, &dw, n * k, n)?;
            let mut dout = g.poisoned(slots * n)?;
            launch.run(plain, &dx, &mut dout, n as i32, k as i32)?;
            let launch_s = Launch::new(g, tiling, &offsets, &dwgu, 2 * inter * k, 2 * inter)?;
            let mut dh = g.poisoned_bf16(slots * inter)?;
            launch_s.run(swiglu, &dx, &mut dh, inter as i32, k as i32)?;
            g.sync()?;
            out.push(compared(plain, shape.clone(), &g.down(&dout)?, &want, F32_BOUND * 10.0));
            let got_h: Vec<f32> = g.down(&dh)?.iter().map(|&b| from_bf16(b)).collect();
            out.push(compared(
                swiglu,
                format!("{shape}, inter {inter}, interleaved gate/up"),
                &got_h,
                &want_h,
                BF16_BOUND,
            ));
        }
    }
    // Batch invariance: the first row's bits alone and as one of 64 rows of its expert.
    {
        let (n, k) = (512usize, 1024usize);
        let x = bf16_vec(rng, 64 * k, 1.0);
        let w = bf16_vec(rng, n * k, 0.05);
        let (dx, dw) = (g.up(&x)?, g.up(&w)?);
        for (tiling, plain, _) in TILINGS {
            let mut rows = Vec::new();
            for load in [1usize, 64] {
                let launch = Launch::new(g, tiling, &[0, load as i32], &dw, n * k, n)?;
                let mut dout = g.poisoned(load * n)?;
                launch.run(plain, &dx, &mut dout, n as i32, k as i32)?;
                g.sync()?;
                rows.push(g.down(&dout)?[..n].iter().map(|v| v.to_bits()).collect::<Vec<u32>>());
            }
            let same = rows[0] == rows[1];
            out.push(CheckRow {
                kernel: plain.into(),
                shape: format!("row 0 alone vs among 64 rows, N {n}, K {k}"),
                passed: same,
                rel_err: if same { 0.0 } else { f64::INFINITY },
                note: if same { "bitwise equal (batch-invariant)".into() } else { "bits differ".into() },
                ..Default::default()
            });
        }
    }
    out.extend(timings(g, rng, quick, cublas)?);
    Ok(out)
}

/// Mixtral-8x7B w1 shapes: prefill (4096 tokens top-2) against dense cuBLAS at equal FLOPs, and
/// decode loads against one cuBLAS call per expert.
fn timings(g: &Gpu, rng: &mut Rng, quick: bool, cublas: Option<f64>) -> Result<Vec<CheckRow>> {
    use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
    use half::bf16;
    let mut out = Vec::new();
    let (n, k, experts) = (14336usize, 4096usize, 8usize);
    let blas = super::guarded("cuBLAS", || CudaBlas::new(g.stream.clone()))?
        .map_err(|e| ComputeError::Cuda(format!("cuBLAS: {e}")))?;
    let w: Vec<u16> = (0..experts * n * k).map(|_| to_bf16(rng.uniform() * 0.05)).collect();
    let dw = g.up(&w)?;
    let dw16 = g.up(&w.iter().map(|&b| bf16::from_bits(b)).collect::<Vec<_>>())?;
    let cases: Vec<(usize, &str)> = if quick {
        vec![(256, "prefill 512 tokens top-2")]
    } else {
        vec![
            (1024, "prefill 4096 tokens top-2"),
            (64, "decode, 64 rows per expert"),
            (16, "decode, 16 rows per expert"),
        ]
    };
    for (per, label) in cases {
        let loads = vec![per; experts];
        let offsets = offsets_of(&loads);
        let slots = per * experts;
        let x: Vec<u16> = (0..slots * k).map(|_| to_bf16(rng.uniform())).collect();
        let dx = g.up(&x)?;
        let dx16 = g.up(&x.iter().map(|&b| bf16::from_bits(b)).collect::<Vec<_>>())?;
        let flops = 2.0 * (slots * n * k) as f64;
        // One cuBLAS call per expert (bf16 out), the served path.
        let mut dc = g.stream.alloc_zeros::<bf16>(slots * n).map_err(|e| ComputeError::Cuda(format!("alloc: {e}")))?;
        let per_expert_ms = g.time(|| {
            for e in 0..experts {
                let cfg = GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_T,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: n as i32,
                    n: per as i32,
                    k: k as i32,
                    alpha: bf16::ONE,
                    lda: k as i32,
                    ldb: k as i32,
                    beta: bf16::ZERO,
                    ldc: n as i32,
                };
                let a = dw16.slice(e * n * k..(e + 1) * n * k);
                let b = dx16.slice(e * per * k..(e + 1) * per * k);
                let mut c = dc.slice_mut(e * per * n..(e + 1) * per * n);
                // SAFETY: a is expert e's [N, K] weight, b its [per, K] rows, c [per, N].
                unsafe { blas.gemm(cfg, &a, &b, &mut c) }
                    .map_err(|err| ComputeError::Cuda(format!("cuBLAS gemm: {err}")))?;
            }
            Ok(())
        })?;
        let per_expert_tflops = flops / (per_expert_ms * 1e-3) / 1e12;
        for (tiling, plain, _) in TILINGS {
            let launch = Launch::new(g, tiling, &offsets, &dw, n * k, n)?;
            let mut dout = g.poisoned(slots * n)?;
            let ms = g.time(|| launch.run(plain, &dx, &mut dout, n as i32, k as i32))?;
            let tflops = flops / (ms * 1e-3) / 1e12;
            let dense = cublas.map(|c| format!("{:.0}% of dense cuBLAS; ", 100.0 * tflops / c)).unwrap_or_default();
            out.push(CheckRow {
                kernel: plain.into(),
                shape: format!("Mixtral w1, {label}: {slots} slots, N {n}, K {k}"),
                passed: true,
                ms: Some(ms),
                rate: Some((tflops, "TFLOP/s")),
                fraction: Some((per_expert_ms / ms, "cuBLAS per expert (speed ratio)")),
                note: format!("{dense}cuBLAS per expert {per_expert_ms:.3} ms ({per_expert_tflops:.0} TFLOP/s); aim: ≥ 60% of dense at prefill, ≥ 1.0× per-expert at decode"),
                ..Default::default()
            });
        }
    }
    Ok(out)
}
