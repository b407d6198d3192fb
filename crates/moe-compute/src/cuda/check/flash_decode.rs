//! flash_decode_bf16 + flash_decode_merge_f32 (issue 32) against an f64 loop over the same
//! bf16 cache: contexts of 1 key to several splits, sliding windows, GQA groups of 1 to 8,
//! head sizes 64 and 128, an attention sink, outputs poisoned; a sequence's bits alone and in a
//! batch; then 64 sequences × 2048 tokens (Mixtral: 8 KV heads of 128, GQA 4) against the copy
//! bandwidth.

use super::{compared, from_bf16, grid, launched, timed_bytes, to_bf16, CheckRow, Gpu, Result, Rng};
use crate::gpu_plan::splits::{flash_decode_shared_bytes, split_bucket, DecodeSplits, MAX_SPLITS};
use crate::ComputeError;
use cudarc::driver::{CudaSlice, PushKernelArg};

#[derive(Clone, Copy)]
struct Shape {
    n_heads: usize,
    kv_heads: usize,
    dim: usize,
    page: usize,
}

struct Case {
    lens: Vec<usize>,
    window: usize,
    sinks: Option<Vec<f32>>,
}

/// Everything uploaded for one case.
struct Inputs {
    q: CudaSlice<f32>,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
    table: CudaSlice<i32>,
    starts: CudaSlice<i32>,
    rows: CudaSlice<i32>,
    lens: CudaSlice<i32>,
    sinks: Option<CudaSlice<f32>>,
    max_pages: usize,
    host: (Vec<f32>, Vec<u16>, Vec<u16>, Vec<i32>),
}

fn inputs(g: &Gpu, rng: &mut Rng, s: Shape, case: &Case) -> Result<Inputs> {
    let seqs = case.lens.len();
    let max_pages = case.lens.iter().map(|l| l.div_ceil(s.page)).max().unwrap_or(1).max(1);
    let pool = seqs * max_pages + 2;
    // Pages shuffled through the pool.
    let mut ids: Vec<i32> = (0..pool as i32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    let table: Vec<i32> = (0..seqs * max_pages).map(|i| ids[i]).collect();
    let width = s.kv_heads * s.dim;
    let k: Vec<u16> = (0..pool * s.page * width).map(|_| to_bf16(rng.uniform() * 2.0)).collect();
    let v: Vec<u16> = (0..pool * s.page * width).map(|_| to_bf16(rng.uniform())).collect();
    let q = rng.vec(seqs * s.n_heads * s.dim, 1.0);
    let lens: Vec<i32> = case.lens.iter().map(|&l| l as i32).collect();
    Ok(Inputs {
        q: g.up(&q)?,
        k: g.up(&k)?,
        v: g.up(&v)?,
        table: g.up(&table)?,
        starts: g.up(&(0..seqs).map(|s| (s * max_pages) as i32).collect::<Vec<_>>())?,
        rows: g.up(&(0..seqs as i32).collect::<Vec<_>>())?,
        lens: g.up(&lens)?,
        sinks: case.sinks.as_ref().map(|s| g.up(s)).transpose()?,
        max_pages,
        host: (q, k, v, table),
    })
}

/// The f64 reference: softmax over the window's keys (and the sink), times the values.
fn reference(s: Shape, case: &Case, inp: &Inputs) -> Vec<f32> {
    let (q, k, v, table) = &inp.host;
    let width = s.kv_heads * s.dim;
    let group = s.n_heads / s.kv_heads;
    let scale = 1.0 / (s.dim as f64).sqrt();
    let mut out = vec![0.0f32; case.lens.len() * s.n_heads * s.dim];
    for (seq, &ctx) in case.lens.iter().enumerate() {
        let first = if case.window > 0 { ctx.saturating_sub(case.window) } else { 0 };
        let slot = |p: usize| table[seq * inp.max_pages + p / s.page] as usize * s.page + p % s.page;
        for h in 0..s.n_heads {
            let kvh = h / group;
            let qh = &q[(seq * s.n_heads + h) * s.dim..][..s.dim];
            let scores: Vec<f64> = (first..ctx)
                .map(|p| {
                    let kp = &k[slot(p) * width + kvh * s.dim..][..s.dim];
                    qh.iter().zip(kp).map(|(a, b)| *a as f64 * from_bf16(*b) as f64).sum::<f64>() * scale
                })
                .collect();
            let sink = case.sinks.as_ref().map(|x| x[h] as f64);
            let m = scores.iter().copied().chain(sink).fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = w.iter().sum::<f64>() + sink.map_or(0.0, |x| (x - m).exp());
            for d in 0..s.dim {
                let acc: f64 = (first..ctx)
                    .zip(&w)
                    .map(|(p, wi)| wi * from_bf16(v[slot(p) * width + kvh * s.dim + d]) as f64)
                    .sum();
                out[(seq * s.n_heads + h) * s.dim + d] = if z > 0.0 { (acc / z) as f32 } else { 0.0 };
            }
        }
    }
    out
}

/// Both kernels; returns the launch closure's output buffer.
fn run(g: &Gpu, s: Shape, case: &Case, inp: &Inputs, out: &mut CudaSlice<f32>, scratch: &mut Scratch) -> Result<()> {
    let seqs = case.lens.len();
    let max_count = case
        .lens
        .iter()
        .map(|&l| DecodeSplits::new(l, (case.window > 0).then_some(case.window), s.page).count)
        .max()
        .unwrap_or(1);
    let group = s.n_heads / s.kv_heads;
    let shared = flash_decode_shared_bytes(group, s.dim) as u32;
    let f = g.func("flash_decode_bf16")?;
    f.set_attribute(
        cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        shared as i32,
    )
    .map_err(|e| ComputeError::Cuda(format!("flash_decode_bf16 shared memory: {e}")))?;
    let mut cfg = grid(seqs as u32, s.kv_heads as u32, split_bucket(max_count), 128);
    cfg.shared_mem_bytes = shared;
    let (win, page, nh, kvh, dim) =
        (case.window as i32, s.page as i32, s.n_heads as i32, s.kv_heads as i32, s.dim as i32);
    let (q_stride, q_col) = (nh * dim, 0i32);
    let scale = 1.0 / (s.dim as f32).sqrt();
    let mut b = g.stream.launch_builder(f);
    b.arg(&inp.q).arg(&q_stride).arg(&q_col).arg(&inp.rows).arg(&inp.k).arg(&inp.v).arg(&inp.table).arg(&inp.starts);
    b.arg(&inp.lens).arg(&win).arg(&page).arg(&nh).arg(&kvh).arg(&dim).arg(&scale);
    b.arg(&mut scratch.out).arg(&mut scratch.max).arg(&mut scratch.sum);
    // SAFETY: the arguments match flash_decode_bf16's parameters (kernels/flash_decode.cu); the
    // scratch holds MAX_SPLITS partials per (sequence, head), the cache every page of the table.
    launched(unsafe { b.launch(cfg) }, "flash_decode_bf16")?;
    let null = 0u64;
    let stride = (s.n_heads * s.dim) as i32;
    let mut b = g.stream.launch_builder(g.func("flash_decode_merge_f32")?);
    b.arg(&scratch.out).arg(&scratch.max).arg(&scratch.sum).arg(&inp.lens).arg(&inp.rows);
    match &inp.sinks {
        Some(x) => b.arg(x),
        None => b.arg(&null),
    };
    b.arg(&win).arg(&page).arg(&nh).arg(&dim).arg(out).arg(&stride);
    // SAFETY: as above; `out` holds a row of n_heads × head_dim per sequence; sinks one per head or null.
    launched(unsafe { b.launch(grid(seqs as u32, s.n_heads as u32, 1, 128)) }, "flash_decode_merge_f32")
}

struct Scratch {
    out: CudaSlice<f32>,
    max: CudaSlice<f32>,
    sum: CudaSlice<f32>,
}

fn scratch(g: &Gpu, seqs: usize, s: Shape) -> Result<Scratch> {
    let n = seqs * s.n_heads * MAX_SPLITS;
    Ok(Scratch { out: g.poisoned(n * s.dim)?, max: g.poisoned(n)?, sum: g.poisoned(n)? })
}

pub(super) fn flash_decode(g: &Gpu, rng: &mut Rng, quick: bool, copy: f64) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    let small = Shape { n_heads: 8, kv_heads: 2, dim: 64, page: 16 };
    let mha = Shape { n_heads: 4, kv_heads: 4, dim: 128, page: 16 };
    let gpt_oss = Shape { n_heads: 16, kv_heads: 2, dim: 64, page: 16 };
    let cases = [
        (small, Case { lens: vec![1, 17, 64, 65, 511, 513, 1500], window: 0, sinks: None }, "contexts 1..1500"),
        (small, Case { lens: vec![3, 200, 2100], window: 128, sinks: None }, "window 128"),
        (mha, Case { lens: vec![9000, 40], window: 0, sinks: None }, "MHA, 9000 keys (longer splits)"),
        (
            gpt_oss,
            Case { lens: vec![5, 700], window: 0, sinks: Some((0..16).map(|h| h as f32 * 0.3 - 2.0).collect()) },
            "GQA 8, sinks",
        ),
    ];
    for (s, case, label) in &cases {
        let inp = inputs(g, rng, *s, case)?;
        let mut dout = g.poisoned(case.lens.len() * s.n_heads * s.dim)?;
        let mut sc = scratch(g, case.lens.len(), *s)?;
        run(g, *s, case, &inp, &mut dout, &mut sc)?;
        g.sync()?;
        let shape = format!("{label}: heads {}/{}, dim {}, page {}", s.n_heads, s.kv_heads, s.dim, s.page);
        out.push(compared("flash_decode_bf16", shape, &g.down(&dout)?, &reference(*s, case, &inp), 1e-4));
    }
    // A sequence's bits alone and in a batch.
    {
        let s = small;
        let together = Case { lens: vec![1500, 3, 700, 2048], window: 0, sinks: None };
        let inp = inputs(g, rng, s, &together)?;
        let mut all = g.poisoned(4 * s.n_heads * s.dim)?;
        let mut sc = scratch(g, 4, s)?;
        run(g, s, &together, &inp, &mut all, &mut sc)?;
        // The same first sequence alone: a batch of one over the same cache.
        let alone = Case { lens: vec![1500], window: 0, sinks: None };
        let mut one = g.poisoned(s.n_heads * s.dim)?;
        let mut sc1 = scratch(g, 1, s)?;
        run(g, s, &alone, &inp, &mut one, &mut sc1)?;
        g.sync()?;
        let row = s.n_heads * s.dim;
        let same = g.down(&all)?[..row].iter().map(|v| v.to_bits()).eq(g.down(&one)?.iter().map(|v| v.to_bits()));
        out.push(CheckRow {
            kernel: "flash_decode_bf16".into(),
            shape: "1500 keys alone vs with 3 other sequences".into(),
            passed: same,
            rel_err: if same { 0.0 } else { f64::INFINITY },
            note: if same { "bitwise equal (batch-invariant)".into() } else { "bits differ".into() },
            ..Default::default()
        });
    }
    // 64 sequences × 2048 keys, Mixtral's attention shape.
    let big = Shape { n_heads: 32, kv_heads: 8, dim: 128, page: 16 };
    let (seqs, len) = if quick { (16, 512) } else { (64, 2048) };
    let case = Case { lens: vec![len; seqs], window: 0, sinks: None };
    let inp = inputs(g, rng, big, &case)?;
    let mut dout = g.poisoned(seqs * big.n_heads * big.dim)?;
    let mut sc = scratch(g, seqs, big)?;
    let ms = g.time(|| run(g, big, &case, &inp, &mut dout, &mut sc))?;
    let bytes = (seqs * len * big.kv_heads * big.dim * 2 * 2) as f64;
    let mut row = timed_bytes(
        "flash_decode_bf16 + merge",
        format!("{seqs} sequences x {len} keys, heads 32/8, dim 128, bf16"),
        ms,
        bytes,
        copy,
    );
    row.note = "aim: ≥ 70% of copy".into();
    out.push(row);
    Ok(out)
}
