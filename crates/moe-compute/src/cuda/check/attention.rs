//! Checks of the paged KV cache and attention kernels: kv_write into shuffled pages, prefill
//! attention (causal, with and without a sliding window) and decode attention, against a plain
//! f64 loop over the same cache layout ([pages][page_size][kv_heads][head_dim]).

use super::{compared, grid, launched, timed_bytes, CheckRow, Gpu, Result, Rng, F32_BOUND};
use cudarc::driver::{CudaSlice, PushKernelArg};

struct Layout {
    n_heads: usize,
    kv_heads: usize,
    hd: usize,
    page_size: usize,
}

/// Sequences' pages, shuffled through a pool: (page_table, seq_page_start).
fn pages(rng: &mut Rng, lens: &[usize], page_size: usize) -> (Vec<i32>, Vec<i32>, usize) {
    let needed: usize = lens.iter().map(|l| l.div_ceil(page_size)).sum();
    let pool = needed + 3;
    let mut ids: Vec<i32> = (0..pool as i32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    let mut table = Vec::new();
    let mut starts = Vec::new();
    for l in lens {
        starts.push(table.len() as i32);
        for _ in 0..l.div_ceil(page_size) {
            table.push(ids[table.len()]);
        }
    }
    (table, starts, pool)
}

/// Attention of one query row (its `n_heads` heads) at `pos` over cached positions.
#[allow(clippy::too_many_arguments)]
fn attend_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    table: &[i32],
    start: usize,
    pos: usize,
    window: usize,
    l: &Layout,
) -> Vec<f32> {
    let width = l.kv_heads * l.hd;
    let scale = 1.0 / (l.hd as f64).sqrt();
    let first = if window > 0 && pos + 1 > window { pos + 1 - window } else { 0 };
    let mut out = vec![0.0f32; l.n_heads * l.hd];
    for h in 0..l.n_heads {
        let kvh = h / (l.n_heads / l.kv_heads);
        let qh = &q[h * l.hd..(h + 1) * l.hd];
        let slot = |p: usize| table[start + p / l.page_size] as usize * l.page_size + p % l.page_size;
        let scores: Vec<f64> = (first..=pos)
            .map(|p| {
                let kp = &k[slot(p) * width + kvh * l.hd..][..l.hd];
                qh.iter().zip(kp).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale
            })
            .collect();
        let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let z: f64 = w.iter().sum();
        for d in 0..l.hd {
            let acc: f64 = (first..=pos).zip(&w).map(|(p, wi)| wi * v[slot(p) * width + kvh * l.hd + d] as f64).sum();
            out[h * l.hd + d] = (acc / z) as f32;
        }
    }
    out
}

pub(super) fn paged(g: &Gpu, rng: &mut Rng, quick: bool, copy: f64) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    let small = Layout { n_heads: 8, kv_heads: 2, hd: 64, page_size: 16 };
    out.extend(prefill_case(g, rng, &small, &[1, 17, 40], 0)?);
    out.extend(prefill_case(g, rng, &small, &[3, 33], 8)?);
    let big = Layout { n_heads: 32, kv_heads: 8, hd: 128, page_size: 16 };
    let (seqs, len) = if quick { (16, 512) } else { (64, 2048) };
    out.extend(decode_case(g, rng, &big, &vec![len; seqs], copy)?);
    Ok(out)
}

/// kv_write of every position of `lens`' sequences, then prefill attention over them.
fn prefill_case(g: &Gpu, rng: &mut Rng, l: &Layout, lens: &[usize], window: usize) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    let (table, starts, pool) = pages(rng, lens, l.page_size);
    let width = l.kv_heads * l.hd;
    let (k_col, v_col) = (l.n_heads * l.hd, l.n_heads * l.hd + width);
    let stride = v_col + width + 3;
    let rows: usize = lens.iter().sum();
    let qkv = rng.vec(rows * stride, 1.0);
    let (mut row_seq, mut row_pos, mut slot_of_row) = (Vec::new(), Vec::new(), Vec::new());
    for (s, &len) in lens.iter().enumerate() {
        for p in 0..len {
            row_seq.push(s as i32);
            row_pos.push(p as i32);
            slot_of_row
                .push(table[starts[s] as usize + p / l.page_size] * l.page_size as i32 + (p % l.page_size) as i32);
        }
    }
    let cache_len = pool * l.page_size * width;
    let (dqkv, dslots) = (g.up(&qkv)?, g.up(&slot_of_row)?);
    let (mut dk, mut dv) = (g.poisoned(cache_len)?, g.poisoned(cache_len)?);
    let (si, kc, vc, kvi, hdi) = (stride as i32, k_col as i32, v_col as i32, l.kv_heads as i32, l.hd as i32);
    {
        let mut b = g.stream.launch_builder(g.func("kv_write_f32")?);
        b.arg(&dqkv).arg(&si).arg(&kc).arg(&vc).arg(&mut dk).arg(&mut dv).arg(&dslots).arg(&kvi).arg(&hdi);
        // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
        // (types and order), and every buffer was allocated for the sizes this grid covers.
        launched(unsafe { b.launch(grid(rows as u32, 1, 1, 128)) }, "kv_write_f32")?;
    }
    g.sync()?;
    let (k, v) = (g.down(&dk)?, g.down(&dv)?);
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for (r, &slot) in slot_of_row.iter().enumerate() {
        let slot = slot as usize;
        got.extend_from_slice(&k[slot * width..(slot + 1) * width]);
        got.extend_from_slice(&v[slot * width..(slot + 1) * width]);
        want.extend_from_slice(&qkv[r * stride + k_col..r * stride + k_col + width]);
        want.extend_from_slice(&qkv[r * stride + v_col..r * stride + v_col + width]);
    }
    let shape =
        format!("seqs {lens:?}, {} heads / {} kv, dim {}, pages of {}", l.n_heads, l.kv_heads, l.hd, l.page_size);
    out.push(compared("kv_write_f32", shape.clone(), &got, &want, 0.0));

    let want_att: Vec<f32> = (0..rows)
        .flat_map(|r| {
            let s = row_seq[r] as usize;
            let q = &qkv[r * stride..r * stride + l.n_heads * l.hd];
            attend_ref(q, &k, &v, &table, starts[s] as usize, row_pos[r] as usize, window, l)
        })
        .collect();
    let (dtable, dstarts, drs, drp) = (g.up(&table)?, g.up(&starts)?, g.up(&row_seq)?, g.up(&row_pos)?);
    let mut dout = g.poisoned(rows * l.n_heads * l.hd)?;
    let (qc, nh, ps, wi) = (0i32, l.n_heads as i32, l.page_size as i32, window as i32);
    let scale = 1.0 / (l.hd as f32).sqrt();
    {
        let mut b = g.stream.launch_builder(g.func("attention_prefill_f32")?);
        b.arg(&dqkv).arg(&si).arg(&qc).arg(&dk).arg(&dv).arg(&dtable).arg(&dstarts).arg(&drs).arg(&drp);
        b.arg(&mut dout).arg(&nh).arg(&kvi).arg(&hdi).arg(&ps).arg(&scale).arg(&wi);
        // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
        // (types and order), and every buffer was allocated for the sizes this grid covers.
        launched(unsafe { b.launch(grid(rows as u32, l.n_heads as u32, 1, 128)) }, "attention_prefill_f32")?;
    }
    g.sync()?;
    let label = if window > 0 { format!("{shape}, window {window}") } else { shape.clone() };
    out.push(compared("attention_prefill_f32", label.clone(), &g.down(&dout)?, &want_att, F32_BOUND));

    // The same over a bf16 cache: keys and values rounded once when written, f32 math after.
    let (mut dk16, mut dv16) = (g.poisoned_bf16(cache_len)?, g.poisoned_bf16(cache_len)?);
    {
        let mut b = g.stream.launch_builder(g.func("kv_write_bf16")?);
        b.arg(&dqkv).arg(&si).arg(&kc).arg(&vc).arg(&mut dk16).arg(&mut dv16).arg(&dslots).arg(&kvi).arg(&hdi);
        // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
        // (types and order), and every buffer was allocated for the sizes this grid covers.
        launched(unsafe { b.launch(grid(rows as u32, 1, 1, 128)) }, "kv_write_bf16")?;
    }
    g.sync()?;
    let widen = |v: Vec<u16>| -> Vec<f32> { v.into_iter().map(super::from_bf16).collect() };
    let (k16, v16) = (widen(g.down(&dk16)?), widen(g.down(&dv16)?));
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for (r, &slot) in slot_of_row.iter().enumerate() {
        let slot = slot as usize;
        got.extend_from_slice(&k16[slot * width..(slot + 1) * width]);
        got.extend_from_slice(&v16[slot * width..(slot + 1) * width]);
        let rounded =
            |c: usize| qkv[r * stride + c..r * stride + c + width].iter().map(|&x| super::from_bf16(super::to_bf16(x)));
        want.extend(rounded(k_col));
        want.extend(rounded(v_col));
    }
    out.push(compared("kv_write_bf16", shape, &got, &want, 0.0));
    let want_att16: Vec<f32> = (0..rows)
        .flat_map(|r| {
            let s = row_seq[r] as usize;
            let q = &qkv[r * stride..r * stride + l.n_heads * l.hd];
            attend_ref(q, &k16, &v16, &table, starts[s] as usize, row_pos[r] as usize, window, l)
        })
        .collect();
    let mut dout16 = g.poisoned(rows * l.n_heads * l.hd)?;
    {
        let mut b = g.stream.launch_builder(g.func("attention_prefill_bf16")?);
        b.arg(&dqkv).arg(&si).arg(&qc).arg(&dk16).arg(&dv16).arg(&dtable).arg(&dstarts).arg(&drs).arg(&drp);
        b.arg(&mut dout16).arg(&nh).arg(&kvi).arg(&hdi).arg(&ps).arg(&scale).arg(&wi);
        // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
        // (types and order), and every buffer was allocated for the sizes this grid covers.
        launched(unsafe { b.launch(grid(rows as u32, l.n_heads as u32, 1, 128)) }, "attention_prefill_bf16")?;
    }
    g.sync()?;
    out.push(compared("attention_prefill_bf16", label, &g.down(&dout16)?, &want_att16, F32_BOUND));
    Ok(out)
}

/// Decode attention: one query per sequence at its last position, over a filled cache.
fn decode_case(g: &Gpu, rng: &mut Rng, l: &Layout, lens: &[usize], copy: f64) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    let (table, starts, pool) = pages(rng, lens, l.page_size);
    let width = l.kv_heads * l.hd;
    let cache_len = pool * l.page_size * width;
    let (k, v) = (rng.vec(cache_len, 1.0), rng.vec(cache_len, 1.0));
    let q_cols = l.n_heads * l.hd;
    let q = rng.vec(lens.len() * q_cols, 1.0);
    let want: Vec<f32> = lens
        .iter()
        .enumerate()
        .flat_map(|(s, &len)| {
            attend_ref(&q[s * q_cols..(s + 1) * q_cols], &k, &v, &table, starts[s] as usize, len - 1, 0, l)
        })
        .collect();
    let lens_i: Vec<i32> = lens.iter().map(|&x| x as i32).collect();
    let (dq, dk, dv, dtable, dstarts, dlens) =
        (g.up(&q)?, g.up(&k)?, g.up(&v)?, g.up(&table)?, g.up(&starts)?, g.up(&lens_i)?);
    let mut dout = g.poisoned(lens.len() * q_cols)?;
    let (qs, qc, nh, kvi, hdi, ps, wi) =
        (q_cols as i32, 0i32, l.n_heads as i32, l.kv_heads as i32, l.hd as i32, l.page_size as i32, 0i32);
    let scale = 1.0 / (l.hd as f32).sqrt();
    let run = |dout: &mut CudaSlice<f32>| {
        let mut b = g.stream.launch_builder(g.func("paged_attention_decode_f32")?);
        b.arg(&dq).arg(&qs).arg(&qc).arg(&dk).arg(&dv).arg(&dtable).arg(&dstarts).arg(&dlens).arg(dout);
        b.arg(&nh).arg(&kvi).arg(&hdi).arg(&ps).arg(&scale).arg(&wi);
        // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
        // (types and order), and every buffer was allocated for the sizes this grid covers.
        launched(unsafe { b.launch(grid(lens.len() as u32, l.n_heads as u32, 1, 128)) }, "paged_attention_decode_f32")
    };
    run(&mut dout)?;
    g.sync()?;
    let shape = format!(
        "{} seqs x {} tokens, {} heads / {} kv, dim {}, pages of {}",
        lens.len(),
        lens[0],
        l.n_heads,
        l.kv_heads,
        l.hd,
        l.page_size
    );
    out.push(compared("paged_attention_decode_f32", shape.clone(), &g.down(&dout)?, &want, F32_BOUND));
    let ms = g.time(|| run(&mut dout))?;
    let bytes: usize = lens.iter().map(|&n| 2 * n * width * 4).sum();
    out.push(timed_bytes("paged_attention_decode_f32", shape, ms, bytes as f64, copy));
    Ok(out)
}
