//! Checks of the row-wise and memory-bound kernels: RMSNorm (+ residual), RoPE, SwiGLU, top-k
//! gating, token permute/unpermute (sampling has its own file).

use super::{compared, from_bf16, grid, launched, timed_bytes, to_bf16, CheckRow, Gpu, Result, Rng};
use super::{BF16_BOUND, F32_BOUND};
use crate::cpu::{CpuBackend, HostTensor};
use crate::Backend;
use cudarc::driver::PushKernelArg;

fn bf16s(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| to_bf16(x)).collect()
}

fn widen(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| from_bf16(b)).collect()
}

/// RMSNorm over `h = x + residual` with the CPU backend's own rms_norm.
fn rmsnorm_ref(h: &[f32], rows: usize, cols: usize, w: &[f32], eps: f32) -> Vec<f32> {
    let cpu = CpuBackend::new();
    let x = HostTensor { rows, cols, data: h.to_vec() };
    let mut out = HostTensor::default();
    cpu.rms_norm(&x, &w.to_vec(), eps, &mut out);
    out.data
}

pub(super) fn rmsnorm(g: &Gpu, rng: &mut Rng, quick: bool, copy: f64) -> Result<Vec<CheckRow>> {
    let mut rows_out = Vec::new();
    let eps = 1e-6f32;
    let big = if quick { (1024, 4096) } else { (8192, 4096) };
    for (rows, cols, with_res) in [(3usize, 64usize, false), (33, 4099, true), (big.0, big.1, true)] {
        let n = rows * cols;
        let (x, r, w) = (rng.vec(n, 2.0), rng.vec(n, 1.0), rng.vec(cols, 1.0));
        let h: Vec<f32> = if with_res { x.iter().zip(&r).map(|(a, b)| a + b).collect() } else { x.clone() };
        let want = rmsnorm_ref(&h, rows, cols, &w, eps);
        let shape = format!("{rows}x{cols}{}", if with_res { " +residual" } else { "" });
        let null = 0u64;
        let (ci, threads) = (cols as i32, 256u32);
        // f32
        let (dx, dr, dw) = (g.up(&x)?, g.up(&r)?, g.up(&w)?);
        let (mut dro, mut dout) = (g.poisoned(n)?, g.poisoned(n)?);
        let launch = |dro: &mut cudarc::driver::CudaSlice<f32>, dout: &mut cudarc::driver::CudaSlice<f32>| {
            let mut b = g.stream.launch_builder(g.func("rmsnorm_f32")?);
            b.arg(&dx);
            if with_res {
                b.arg(&dr).arg(dro);
            } else {
                b.arg(&null).arg(&null);
            }
            b.arg(&dw).arg(dout).arg(&ci).arg(&eps);
            // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
            // (types and order), and every buffer was allocated for the sizes this grid covers.
            launched(unsafe { b.launch(grid(rows as u32, 1, 1, threads)) }, "rmsnorm_f32")
        };
        launch(&mut dro, &mut dout)?;
        g.sync()?;
        rows_out.push(compared("rmsnorm_f32", shape.clone(), &g.down(&dout)?, &want, F32_BOUND));
        if with_res {
            rows_out.push(compared("rmsnorm_f32 residual_out", shape.clone(), &g.down(&dro)?, &h, F32_BOUND));
        }
        if rows == big.0 {
            let ms = g.time(|| launch(&mut dro, &mut dout))?;
            rows_out.push(timed_bytes("rmsnorm_f32", shape.clone(), ms, (4 * n * 4) as f64, copy));
        }
        // bf16: inputs rounded to bf16 first, so the reference sees the same values.
        let (xb, rb) = (bf16s(&x), bf16s(&r));
        let hb: Vec<f32> =
            if with_res { widen(&xb).iter().zip(widen(&rb)).map(|(a, b)| a + b).collect() } else { widen(&xb) };
        let want_b = rmsnorm_ref(&hb, rows, cols, &w, eps);
        let (dxb, drb) = (g.up(&xb)?, g.up(&rb)?);
        let (mut drob, mut doutb) = (g.poisoned_bf16(n)?, g.poisoned_bf16(n)?);
        let launch_b = |dro: &mut cudarc::driver::CudaSlice<u16>, dout: &mut cudarc::driver::CudaSlice<u16>| {
            let mut b = g.stream.launch_builder(g.func("rmsnorm_bf16")?);
            b.arg(&dxb);
            if with_res {
                b.arg(&drb).arg(dro);
            } else {
                b.arg(&null).arg(&null);
            }
            b.arg(&dw).arg(dout).arg(&ci).arg(&eps);
            // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
            // (types and order), and every buffer was allocated for the sizes this grid covers.
            launched(unsafe { b.launch(grid(rows as u32, 1, 1, threads)) }, "rmsnorm_bf16")
        };
        launch_b(&mut drob, &mut doutb)?;
        g.sync()?;
        rows_out.push(compared("rmsnorm_bf16", shape.clone(), &widen(&g.down(&doutb)?), &want_b, BF16_BOUND));
        if with_res {
            rows_out.push(compared(
                "rmsnorm_bf16 residual_out",
                shape.clone(),
                &widen(&g.down(&drob)?),
                &hb,
                BF16_BOUND,
            ));
        }
        if rows == big.0 {
            let ms = g.time(|| launch_b(&mut drob, &mut doutb))?;
            rows_out.push(timed_bytes("rmsnorm_bf16", shape, ms, (4 * n * 2) as f64, copy));
        }
    }
    // The residual stream updated in place: residual_out is the residual buffer itself.
    let (rows, cols) = (5usize, 300usize);
    let (x, r, w) = (rng.vec(rows * cols, 2.0), rng.vec(rows * cols, 1.0), rng.vec(cols, 1.0));
    let h: Vec<f32> = x.iter().zip(&r).map(|(a, b)| a + b).collect();
    let want = rmsnorm_ref(&h, rows, cols, &w, eps);
    let (dx, mut dr, dw) = (g.up(&x)?, g.up(&r)?, g.up(&w)?);
    let mut dout = g.poisoned(rows * cols)?;
    let dr_ptr = {
        use cudarc::driver::DevicePtrMut;
        dr.device_ptr_mut(&g.stream).0
    };
    let ci = cols as i32;
    let mut b = g.stream.launch_builder(g.func("rmsnorm_f32")?);
    b.arg(&dx).arg(&dr_ptr).arg(&dr_ptr).arg(&dw).arg(&mut dout).arg(&ci).arg(&eps);
    // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
    // (residual and residual_out alias on purpose: the kernel allows it).
    launched(unsafe { b.launch(grid(rows as u32, 1, 1, 256)) }, "rmsnorm_f32")?;
    g.sync()?;
    let shape = format!("{rows}x{cols}, residual_out aliasing residual");
    rows_out.push(compared("rmsnorm_f32 in place", shape.clone(), &g.down(&dout)?, &want, F32_BOUND));
    rows_out.push(compared("rmsnorm_f32 in place residual", shape, &g.down(&dr)?, &h, F32_BOUND));
    Ok(rows_out)
}

pub(super) fn rope(g: &Gpu, rng: &mut Rng, quick: bool, copy: f64) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    let cpu = CpuBackend::new();
    let big_rows = if quick { 1024 } else { 8192 };
    // (rows, heads, head_dim, extra columns before and after the heads)
    for (rows, heads, hd, pad) in [(7usize, 3usize, 64usize, 5usize), (big_rows, 32, 128, 0)] {
        let stride = heads * hd + 2 * pad;
        let x = rng.vec(rows * stride, 1.0);
        let positions: Vec<u32> = (0..rows).map(|_| rng.below(4096) as u32).collect();
        let inv_freq: Vec<f32> = (0..hd / 2).map(|j| 10000f32.powf(-(2.0 * j as f32) / hd as f32)).collect();
        let mut table = HostTensor::default();
        cpu.rope_table(&positions, &inv_freq, 1.0, &mut table);
        let mut want = HostTensor { rows, cols: stride, data: x.clone() };
        cpu.rope(&mut want, pad, heads, hd, &table);
        let pos_i: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        let (dpos, dfreq) = (g.up(&pos_i)?, g.up(&inv_freq)?);
        let (si, ci, hi, di) = (stride as i32, pad as i32, heads as i32, hd as i32);
        let shape = format!("{rows} rows x {heads} heads x {hd}");
        let run = |name: &str, dx: &mut cudarc::driver::CudaSlice<f32>| {
            let mut b = g.stream.launch_builder(g.func(name)?);
            b.arg(dx).arg(&si).arg(&ci).arg(&hi).arg(&di).arg(&dpos).arg(&dfreq);
            // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
            // (types and order), and every buffer was allocated for the sizes this grid covers.
            launched(unsafe { b.launch(grid(rows as u32, 1, 1, 128)) }, name)
        };
        let mut dx = g.up(&x)?;
        run("rope_f32", &mut dx)?;
        g.sync()?;
        out.push(compared("rope_f32", shape.clone(), &g.down(&dx)?, &want.data, F32_BOUND));
        // bf16, on the bf16-rounded input.
        let xb = bf16s(&x);
        let mut want_b = HostTensor { rows, cols: stride, data: widen(&xb) };
        cpu.rope(&mut want_b, pad, heads, hd, &table);
        let mut dxb = g.up(&xb)?;
        {
            let mut b = g.stream.launch_builder(g.func("rope_bf16")?);
            b.arg(&mut dxb).arg(&si).arg(&ci).arg(&hi).arg(&di).arg(&dpos).arg(&dfreq);
            // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
            // (types and order), and every buffer was allocated for the sizes this grid covers.
            launched(unsafe { b.launch(grid(rows as u32, 1, 1, 128)) }, "rope_bf16")?;
        }
        g.sync()?;
        out.push(compared("rope_bf16", shape.clone(), &widen(&g.down(&dxb)?), &want_b.data, BF16_BOUND));
        if rows == big_rows {
            // Timing rotates in place again and again; values stay bounded (a rotation).
            let ms = g.time(|| run("rope_f32", &mut dx))?;
            out.push(timed_bytes("rope_f32", shape, ms, (2 * rows * heads * hd * 4) as f64, copy));
        }
    }
    Ok(out)
}

pub(super) fn swiglu(g: &Gpu, rng: &mut Rng, quick: bool, copy: f64) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    let big = if quick { (1024, 14336) } else { (8192, 14336) };
    for (rows, inter) in [(5usize, 13usize), big] {
        let gu = rng.vec(rows * 2 * inter, 4.0);
        let silu = |x: f32| x / (1.0 + (-x).exp());
        let reference = |v: &[f32]| -> Vec<f32> {
            (0..rows * inter)
                .map(|i| (i / inter, i % inter))
                .map(|(r, j)| silu(v[r * 2 * inter + j]) * v[r * 2 * inter + inter + j])
                .collect()
        };
        let want = reference(&gu);
        let (rl, ii) = (rows as i64, inter as i32);
        let blocks = ((rows * inter).div_ceil(256)).min(65_535) as u32;
        let shape = format!("{rows}x{inter}");
        let dgu = g.up(&gu)?;
        let mut dout = g.poisoned(rows * inter)?;
        let run = |dout: &mut cudarc::driver::CudaSlice<f32>| {
            let mut b = g.stream.launch_builder(g.func("swiglu_f32")?);
            b.arg(&dgu).arg(dout).arg(&rl).arg(&ii);
            // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
            // (types and order), and every buffer was allocated for the sizes this grid covers.
            launched(unsafe { b.launch(grid(blocks, 1, 1, 256)) }, "swiglu_f32")
        };
        run(&mut dout)?;
        g.sync()?;
        out.push(compared("swiglu_f32", shape.clone(), &g.down(&dout)?, &want, F32_BOUND));
        let gub = bf16s(&gu);
        let want_b = reference(&widen(&gub));
        let dgub = g.up(&gub)?;
        let mut doutb = g.poisoned_bf16(rows * inter)?;
        let run_b = |dout: &mut cudarc::driver::CudaSlice<u16>| {
            let mut b = g.stream.launch_builder(g.func("swiglu_bf16")?);
            b.arg(&dgub).arg(dout).arg(&rl).arg(&ii);
            // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
            // (types and order), and every buffer was allocated for the sizes this grid covers.
            launched(unsafe { b.launch(grid(blocks, 1, 1, 256)) }, "swiglu_bf16")
        };
        run_b(&mut doutb)?;
        g.sync()?;
        out.push(compared("swiglu_bf16", shape.clone(), &widen(&g.down(&doutb)?), &want_b, BF16_BOUND));
        if (rows, inter) == big {
            let ms = g.time(|| run(&mut dout))?;
            out.push(timed_bytes("swiglu_f32", shape.clone(), ms, (3 * rows * inter * 4) as f64, copy));
            let ms = g.time(|| run_b(&mut doutb))?;
            out.push(timed_bytes("swiglu_bf16", shape, ms, (3 * rows * inter * 2) as f64, copy));
        }
    }
    Ok(out)
}

/// Softmax over all experts, top k (ties to the lower index, NaN never chosen), renormalized.
fn gating_ref(logits: &[f32], experts: usize, k: usize, renorm: bool) -> (Vec<i32>, Vec<f32>) {
    let (mut ids, mut ws) = (Vec::new(), Vec::new());
    for l in logits.chunks(experts) {
        let m = l.iter().copied().filter(|v| !v.is_nan()).fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = l.iter().map(|&v| ((v - m) as f64).exp()).filter(|v| !v.is_nan()).sum();
        let mut order: Vec<usize> = (0..experts).filter(|&e| !l[e].is_nan()).collect();
        order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        let mut chosen: Vec<usize> = order.into_iter().take(k).collect();
        // Only NaN left: the lowest unchosen experts, weight 0; past the experts: -1, weight 0.
        let mut nan_left = (0..experts).filter(|&e| l[e].is_nan());
        while chosen.len() < k.min(experts) {
            chosen.extend(nan_left.next());
        }
        let p: Vec<f64> = chosen
            .iter()
            .map(|&e| if l[e].is_nan() || z <= 0.0 { 0.0 } else { ((l[e] - m) as f64).exp() / z })
            .collect();
        let total: f64 = p.iter().sum();
        for (e, pe) in chosen.iter().zip(&p) {
            ids.push(*e as i32);
            ws.push(if renorm && total > 0.0 { (pe / total) as f32 } else { *pe as f32 });
        }
        for _ in experts..k {
            ids.push(-1);
            ws.push(0.0);
        }
    }
    (ids, ws)
}

pub(super) fn topk_gating(g: &Gpu, rng: &mut Rng, quick: bool, copy: f64) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    let big_rows = if quick { 4096 } else { 32768 };
    for (rows, experts, k, renorm) in [
        (37usize, 8usize, 2usize, true),
        (19, 60, 4, false),
        (9, 128, 8, true),
        (3, 4, 3, true),
        (2, 3, 5, false),
        (big_rows, 8, 2, true),
    ] {
        let mut logits = rng.vec(rows * experts, 3.0);
        if (rows, experts) == (3, 4) {
            // Mostly NaN rows: an expert must never be chosen twice.
            logits[..4].copy_from_slice(&[f32::NAN, 1.0, f32::NAN, f32::NAN]);
            logits[4..8].fill(f32::NAN);
        } else if rows < 100 {
            // A row with ties (lower index must win) and a row with a NaN.
            for (e, v) in logits[..experts].iter_mut().enumerate() {
                *v = if e % 3 == 0 { 1.5 } else { -1.0 };
            }
            logits[experts + 1] = f32::NAN;
        }
        let (want_ids, want_w) = gating_ref(&logits, experts, k, renorm);
        let dl = g.up(&logits)?;
        let mut dids = g.up(&vec![-7i32; rows * k])?;
        let mut dw = g.poisoned(rows * k)?;
        let (ri, ei, ki, rn) = (rows as i32, experts as i32, k as i32, renorm as i32);
        let warps_per_block = 4u32;
        let blocks = (rows as u32).div_ceil(warps_per_block);
        let run = |dids: &mut cudarc::driver::CudaSlice<i32>, dw: &mut cudarc::driver::CudaSlice<f32>| {
            let mut b = g.stream.launch_builder(g.func("topk_gating_f32")?);
            b.arg(&dl).arg(&ri).arg(&ei).arg(&ki).arg(&rn).arg(dids).arg(dw);
            // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
            // (types and order), and every buffer was allocated for the sizes this grid covers.
            launched(unsafe { b.launch(grid(blocks, 1, 1, 32 * warps_per_block)) }, "topk_gating_f32")
        };
        run(&mut dids, &mut dw)?;
        g.sync()?;
        let got_ids = g.down(&dids)?;
        let shape = format!("{rows} rows, {experts} experts, top-{k}{}", if renorm { ", renormalized" } else { "" });
        let mut row = compared("topk_gating_f32", shape.clone(), &g.down(&dw)?, &want_w, F32_BOUND);
        let wrong = got_ids.iter().zip(&want_ids).filter(|(a, b)| a != b).count();
        if wrong > 0 {
            row.passed = false;
            row.note = format!("{wrong} expert ids differ");
        }
        out.push(row);
        if rows == big_rows {
            let ms = g.time(|| run(&mut dids, &mut dw))?;
            out.push(timed_bytes("topk_gating_f32", shape, ms, (rows * (experts + 2 * k) * 4) as f64, copy));
        }
    }
    Ok(out)
}

/// A routing of `rows` tokens to `k` of `experts` each, expert `empty` never chosen: returns
/// (row_of_slot in expert order, slot_of_pair, expert offsets).
pub(super) fn routing(
    rng: &mut Rng,
    rows: usize,
    experts: usize,
    k: usize,
    empty: Option<usize>,
) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let mut pairs: Vec<(usize, usize, usize)> = Vec::new(); // (expert, row, j)
    for r in 0..rows {
        let mut chosen = Vec::new();
        while chosen.len() < k.min(experts - empty.is_some() as usize) {
            // Skewed loads: low experts are chosen more often.
            let e = (rng.below(experts) * rng.below(experts + 1)) / experts.max(1);
            if Some(e) != empty && !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        for (j, e) in chosen.into_iter().enumerate() {
            pairs.push((e, r, j));
        }
    }
    pairs.sort();
    let mut offsets = vec![0i32; experts + 1];
    for &(e, _, _) in &pairs {
        offsets[e + 1] += 1;
    }
    for e in 0..experts {
        offsets[e + 1] += offsets[e];
    }
    let mut slot_of_pair = vec![-1i32; rows * k];
    let row_of_slot: Vec<i32> = pairs.iter().map(|&(_, r, _)| r as i32).collect();
    for (s, &(_, r, j)) in pairs.iter().enumerate() {
        slot_of_pair[r * k + j] = s as i32;
    }
    (row_of_slot, slot_of_pair, offsets)
}

pub(super) fn permute(g: &Gpu, rng: &mut Rng, quick: bool, copy: f64) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    let big = if quick { 1024 } else { 4096 };
    for (rows, cols, experts, k) in [(13usize, 33usize, 6usize, 2usize), (big, 4096, 8, 2)] {
        let x = rng.vec(rows * cols, 1.0);
        let (row_of_slot, slot_of_pair, _) = routing(rng, rows, experts, k, Some(3));
        let slots = row_of_slot.len();
        let want: Vec<f32> =
            row_of_slot.iter().flat_map(|&r| x[r as usize * cols..(r as usize + 1) * cols].to_vec()).collect();
        let (dx, dmap) = (g.up(&x)?, g.up(&row_of_slot)?);
        let mut dperm = g.poisoned(slots * cols)?;
        let (si, ci) = (slots as i32, cols as i32);
        let blocks = (slots as u32).min(65_535);
        let run = |dperm: &mut cudarc::driver::CudaSlice<f32>| {
            let mut b = g.stream.launch_builder(g.func("moe_permute_f32")?);
            b.arg(&dx).arg(&dmap).arg(dperm).arg(&si).arg(&ci);
            // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
            // (types and order), and every buffer was allocated for the sizes this grid covers.
            launched(unsafe { b.launch(grid(blocks, 1, 1, 256)) }, "moe_permute_f32")
        };
        run(&mut dperm)?;
        g.sync()?;
        let shape = format!("{rows} rows x {cols}, {experts} experts (one empty), top-{k}");
        out.push(compared("moe_permute_f32", shape.clone(), &g.down(&dperm)?, &want, 0.0));
        let mut dpermb = g.poisoned_bf16(slots * cols)?;
        {
            let mut b = g.stream.launch_builder(g.func("moe_permute_bf16")?);
            b.arg(&dx).arg(&dmap).arg(&mut dpermb).arg(&si).arg(&ci);
            // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
            // (types and order), and every buffer was allocated for the sizes this grid covers.
            launched(unsafe { b.launch(grid(blocks, 1, 1, 256)) }, "moe_permute_bf16")?;
        }
        g.sync()?;
        let want_b: Vec<f32> = want.iter().map(|&v| from_bf16(to_bf16(v))).collect();
        out.push(compared("moe_permute_bf16", shape.clone(), &widen(&g.down(&dpermb)?), &want_b, 0.0));
        // Unpermute: out[r] (starting from a base) += sum_j w[r, j] * y[slot_of_pair[r, j]].
        let y = rng.vec(slots * cols, 1.0);
        let wts = rng.vec(rows * k, 1.0);
        let base = rng.vec(rows * cols, 1.0);
        let mut want_u = base.clone();
        for r in 0..rows {
            for j in 0..k {
                let s = slot_of_pair[r * k + j];
                if s >= 0 {
                    for c in 0..cols {
                        want_u[r * cols + c] += wts[r * k + j] * y[s as usize * cols + c];
                    }
                }
            }
        }
        let (dy, dsp, dwt) = (g.up(&y)?, g.up(&slot_of_pair)?, g.up(&wts)?);
        let mut dbase = g.up(&base)?;
        let (ri, ki) = (rows as i32, k as i32);
        let run_u = |dbase: &mut cudarc::driver::CudaSlice<f32>| {
            let mut b = g.stream.launch_builder(g.func("moe_unpermute_f32")?);
            b.arg(&dy).arg(&dsp).arg(&dwt).arg(dbase).arg(&ri).arg(&ki).arg(&ci);
            // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
            // (types and order), and every buffer was allocated for the sizes this grid covers.
            launched(unsafe { b.launch(grid((rows as u32).min(65_535), 1, 1, 256)) }, "moe_unpermute_f32")
        };
        run_u(&mut dbase)?;
        g.sync()?;
        out.push(compared("moe_unpermute_f32", shape.clone(), &g.down(&dbase)?, &want_u, F32_BOUND));
        if rows == big {
            let ms = g.time(|| run(&mut dperm))?;
            out.push(timed_bytes("moe_permute_f32", shape.clone(), ms, (2 * slots * cols * 4) as f64, copy));
            let ms = g.time(|| run_u(&mut dbase))?;
            out.push(timed_bytes("moe_unpermute_f32", shape, ms, ((slots + 2 * rows) * cols * 4) as f64, copy));
        }
    }
    Ok(out)
}
