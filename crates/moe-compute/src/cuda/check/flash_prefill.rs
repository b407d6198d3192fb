//! flash_prefill_bf16 (issue 33) against an f64 loop over the same bf16 cache and bf16-rounded
//! queries: a prefill from position 0 spanning two query tiles, a chunk attending to cached
//! pages, a sliding window, GQA and MHA, head sizes 64 and 128, outputs poisoned; then a
//! 2048-token causal prefill (Mixtral's 32 heads of 128, 8 KV heads) against cuBLAS's peak.

use super::{compared, from_bf16, grid, launched, to_bf16, CheckRow, Gpu, Result, Rng};
use crate::gpu_plan::splits::prefill_tiles;
use crate::ComputeError;
use cudarc::driver::PushKernelArg;

#[derive(Clone, Copy)]
struct Shape {
    n_heads: usize,
    kv_heads: usize,
    dim: usize,
    page: usize,
}

/// One sequence of the case: keys cached (including the chunk's own) and the chunk's query
/// positions `start..start + rows`.
struct Seq {
    keys: usize,
    start: usize,
    rows: usize,
}

struct Prepared {
    rows: usize,
    q: Vec<f32>,
    k: Vec<u16>,
    v: Vec<u16>,
    table: Vec<i32>,
    starts: Vec<i32>,
    row_pos: Vec<i32>,
    row_seq: Vec<usize>,
    tiles: Vec<i32>,
    q_stride: usize,
    q_col: usize,
}

fn prepare(rng: &mut Rng, s: Shape, seqs: &[Seq]) -> Prepared {
    let pages: usize = seqs.iter().map(|q| q.keys.div_ceil(s.page)).sum();
    let mut ids: Vec<i32> = (0..pages as i32 + 2).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    let (mut table, mut starts, mut row_pos, mut row_seq, mut spans) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, q) in seqs.iter().enumerate() {
        starts.push(table.len() as i32);
        for _ in 0..q.keys.div_ceil(s.page) {
            table.push(ids[table.len()]);
        }
        spans.push((row_pos.len(), q.rows, i));
        row_pos.extend((q.start..q.start + q.rows).map(|p| p as i32));
        row_seq.extend(std::iter::repeat_n(i, q.rows));
    }
    let width = s.kv_heads * s.dim;
    let slots = (pages + 2) * s.page;
    let rows = row_pos.len();
    let (q_stride, q_col) = (s.n_heads * s.dim + 5, 3);
    Prepared {
        rows,
        q: (0..rows * q_stride).map(|_| rng.uniform()).collect(),
        k: (0..slots * width).map(|_| to_bf16(rng.uniform() * 2.0)).collect(),
        v: (0..slots * width).map(|_| to_bf16(rng.uniform())).collect(),
        table,
        starts,
        row_pos,
        row_seq,
        tiles: prefill_tiles(&spans),
        q_stride,
        q_col,
    }
}

fn reference(s: Shape, p: &Prepared, window: usize) -> Vec<f32> {
    let width = s.kv_heads * s.dim;
    let scale = 1.0 / (s.dim as f64).sqrt();
    let mut out = vec![0.0f32; p.rows * s.n_heads * s.dim];
    for r in 0..p.rows {
        let (pos, seq) = (p.row_pos[r] as usize, p.row_seq[r]);
        let first = if window > 0 { (pos + 1).saturating_sub(window) } else { 0 };
        let slot = |k: usize| p.table[p.starts[seq] as usize + k / s.page] as usize * s.page + k % s.page;
        for h in 0..s.n_heads {
            let kvh = h / (s.n_heads / s.kv_heads);
            let q: Vec<f64> =
                (0..s.dim).map(|d| from_bf16(to_bf16(p.q[r * p.q_stride + p.q_col + h * s.dim + d])) as f64).collect();
            let scores: Vec<f64> = (first..=pos)
                .map(|k| {
                    (0..s.dim).map(|d| q[d] * from_bf16(p.k[slot(k) * width + kvh * s.dim + d]) as f64).sum::<f64>()
                        * scale
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for d in 0..s.dim {
                let acc: f64 = (first..=pos)
                    .zip(&w)
                    .map(|(k, wi)| wi * from_bf16(p.v[slot(k) * width + kvh * s.dim + d]) as f64)
                    .sum();
                out[(r * s.n_heads + h) * s.dim + d] = (acc / z) as f32;
            }
        }
    }
    out
}

/// Uploads, launches once (and `times` more, timed when > 0); returns (output, ms per launch).
fn run(g: &Gpu, s: Shape, p: &Prepared, window: usize, timed: bool) -> Result<(Vec<f32>, Option<f64>)> {
    let (dq, dk, dv) = (g.up(&p.q)?, g.up(&p.k)?, g.up(&p.v)?);
    let (dt, dpos, dtab, dst) = (g.up(&p.tiles)?, g.up(&p.row_pos)?, g.up(&p.table)?, g.up(&p.starts)?);
    let out_stride = s.n_heads * s.dim;
    let mut dout = g.poisoned(p.rows * out_stride)?;
    let shared = (5 * 64 * s.dim * 2) as u32;
    let f = g.func("flash_prefill_bf16")?;
    f.set_attribute(
        cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        shared as i32,
    )
    .map_err(|e| ComputeError::Cuda(format!("flash_prefill_bf16 shared memory: {e}")))?;
    let mut cfg = grid((p.tiles.len() / 3) as u32, s.n_heads as u32, 1, 128);
    cfg.shared_mem_bytes = shared;
    let ints = [
        p.q_stride as i32,
        p.q_col as i32,
        s.n_heads as i32,
        s.kv_heads as i32,
        s.dim as i32,
        s.page as i32,
        window as i32,
        out_stride as i32,
    ];
    let scale = 1.0 / (s.dim as f32).sqrt();
    let launch = |dout: &mut cudarc::driver::CudaSlice<f32>| {
        let mut b = g.stream.launch_builder(f);
        b.arg(&dq).arg(&ints[0]).arg(&ints[1]).arg(&dk).arg(&dv).arg(&dt).arg(&dpos).arg(&dtab).arg(&dst);
        b.arg(&ints[2]).arg(&ints[3]).arg(&ints[4]).arg(&ints[5]).arg(&ints[6]).arg(&scale).arg(dout).arg(&ints[7]);
        // SAFETY: the arguments match flash_prefill_bf16's parameters (kernels/flash_prefill.cu);
        // q and out hold a row per query row at their strides, the cache every page of the table.
        launched(unsafe { b.launch(cfg) }, "flash_prefill_bf16")
    };
    launch(&mut dout)?;
    g.sync()?;
    let got = g.down(&dout)?;
    let ms = if timed { Some(g.time(|| launch(&mut dout))?) } else { None };
    Ok((got, ms))
}

pub(super) fn flash_prefill(g: &Gpu, rng: &mut Rng, quick: bool, cublas: Option<f64>) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    let gqa64 = Shape { n_heads: 8, kv_heads: 2, dim: 64, page: 16 };
    let mha128 = Shape { n_heads: 4, kv_heads: 4, dim: 128, page: 16 };
    let cases = [
        (
            gqa64,
            vec![Seq { keys: 70, start: 0, rows: 70 }, Seq { keys: 140, start: 100, rows: 40 }],
            0usize,
            "a prefill of 70 rows and a 40-row chunk after 100 cached keys",
        ),
        (mha128, vec![Seq { keys: 200, start: 0, rows: 200 }], 32, "200 rows, window 32"),
        (gqa64, vec![Seq { keys: 1, start: 0, rows: 1 }, Seq { keys: 65, start: 64, rows: 1 }], 0, "single rows"),
    ];
    for (s, seqs, window, label) in cases {
        let p = prepare(rng, s, &seqs);
        let (got, _) = run(g, s, &p, window, false)?;
        let shape = format!("{label}: heads {}/{}, dim {}", s.n_heads, s.kv_heads, s.dim);
        out.push(compared("flash_prefill_bf16", shape, &got, &reference(s, &p, window), 2e-2));
    }
    let big = Shape { n_heads: 32, kv_heads: 8, dim: 128, page: 16 };
    let n = if quick { 512 } else { 2048 };
    let p = prepare(rng, big, &[Seq { keys: n, start: 0, rows: n }]);
    let (_, ms) = run(g, big, &p, 0, true)?;
    let ms = ms.unwrap_or(f64::NAN);
    let flops = 4.0 * big.dim as f64 * (n * (n + 1) / 2) as f64 * big.n_heads as f64;
    let tflops = flops / (ms * 1e-3) / 1e12;
    out.push(CheckRow {
        kernel: "flash_prefill_bf16".into(),
        shape: format!("{n} tokens causal, heads 32/8, dim 128"),
        passed: true,
        ms: Some(ms),
        rate: Some((tflops, "TFLOP/s")),
        fraction: cublas.map(|c| (tflops / c, "cuBLAS")),
        note: "FlashAttention-2 with mma.sync reaches 35-50% of peak".into(),
        ..Default::default()
    });
    Ok(out)
}
