//! Checks of the sampling kernels: greedy argmax and top-p (threshold by bisection, token-order
//! scan) against a host reference, including rows of NaN and -inf.

use super::{grid, launched, timed_bytes, CheckRow, Gpu, Result, Rng};
use cudarc::driver::PushKernelArg;
/// Host top-p with the kernel's rule (threshold by bisection, scan in token order).
fn top_p_ref(l: &[f32], temperature: f32, top_p: f32, u: f32) -> i32 {
    let inv_t = 1.0 / temperature.max(1e-6);
    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let p: Vec<f64> = l.iter().map(|&v| (((v - m) * inv_t) as f64).exp()).collect();
    let z: f64 = p.iter().sum();
    let p: Vec<f64> = p.iter().map(|v| v / z).collect();
    let (mut lo, mut hi) = (0.0f64, 1.0 / z);
    for _ in 0..30 {
        let tau = 0.5 * (lo + hi);
        let mass: f64 = p.iter().filter(|&&v| v >= tau).sum();
        if mass >= top_p as f64 {
            lo = tau;
        } else {
            hi = tau;
        }
    }
    let kept: f64 = p.iter().filter(|&&v| v >= lo).sum();
    let target = u as f64 * kept;
    let mut run = 0.0;
    let mut pick = -1;
    for (i, &v) in p.iter().enumerate() {
        if v < lo {
            continue;
        }
        pick = i as i32;
        run += v;
        if target < run {
            break;
        }
    }
    pick
}

pub(super) fn sampling(g: &Gpu, rng: &mut Rng, quick: bool, copy: f64) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    let big_rows = if quick { 64 } else { 256 };
    for (rows, vocab) in [(5usize, 1000usize), (big_rows, 32000)] {
        let mut logits = rng.vec(rows * vocab, 8.0);
        if rows < 10 {
            logits[7] = 100.0;
            logits[9] = 100.0; // a tie: the lower id wins
            logits[vocab + 3] = f32::NAN; // NaN never wins
        }
        let want: Vec<i32> = logits
            .chunks(vocab)
            .map(|l| {
                let mut best = (f32::NEG_INFINITY, 0usize);
                for (i, &v) in l.iter().enumerate() {
                    if !v.is_nan() && v > best.0 {
                        best = (v, i);
                    }
                }
                best.1 as i32
            })
            .collect();
        let dl = g.up(&logits)?;
        let mut dout = g.up(&vec![-1i32; rows])?;
        let vi = vocab as i32;
        let run = |dout: &mut cudarc::driver::CudaSlice<i32>| {
            let mut b = g.stream.launch_builder(g.func("sample_greedy_f32")?);
            b.arg(&dl).arg(&vi).arg(dout);
            // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
            // (types and order), and every buffer was allocated for the sizes this grid covers.
            launched(unsafe { b.launch(grid(rows as u32, 1, 1, 1024)) }, "sample_greedy_f32")
        };
        run(&mut dout)?;
        g.sync()?;
        let got = g.down(&dout)?;
        let wrong = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        let shape = format!("{rows} rows x vocab {vocab}");
        out.push(CheckRow {
            kernel: "sample_greedy_f32".into(),
            shape: shape.clone(),
            passed: wrong == 0,
            note: format!("{wrong} of {rows} tokens differ"),
            ..Default::default()
        });
        // Top-p (NaN-free logits).
        let clean: Vec<f32> = logits.iter().map(|v| if v.is_nan() { 0.0 } else { *v }).collect();
        let uniforms: Vec<f32> = (0..rows).map(|_| (rng.uniform() + 1.0) * 0.5).collect();
        let (temperature, top_p) = (0.7f32, 0.9f32);
        let want_p: Vec<i32> =
            clean.chunks(vocab).zip(&uniforms).map(|(l, &u)| top_p_ref(l, temperature, top_p, u)).collect();
        let (dc, du) = (g.up(&clean)?, g.up(&uniforms)?);
        let mut doutp = g.up(&vec![-1i32; rows])?;
        let run_p = |dout: &mut cudarc::driver::CudaSlice<i32>| {
            let mut b = g.stream.launch_builder(g.func("sample_top_p_f32")?);
            b.arg(&dc).arg(&vi).arg(&temperature).arg(&top_p).arg(&du).arg(dout);
            // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
            // (types and order), and every buffer was allocated for the sizes this grid covers.
            launched(unsafe { b.launch(grid(rows as u32, 1, 1, 1024)) }, "sample_top_p_f32")
        };
        run_p(&mut doutp)?;
        g.sync()?;
        let got_p = g.down(&doutp)?;
        let unwritten = got_p.iter().filter(|&&t| t < 0).count();
        let differ = got_p.iter().zip(&want_p).filter(|(a, b)| a != b).count();
        // f32 vs f64 sums can move a draw across one token boundary; anything more is a bug.
        out.push(CheckRow {
            kernel: "sample_top_p_f32".into(),
            shape: shape.clone(),
            passed: unwritten == 0 && differ * 50 <= rows,
            note: format!("{differ} of {rows} draws differ from the f64 reference, {unwritten} unwritten"),
            ..Default::default()
        });
        if rows == big_rows {
            let ms = g.time(|| run(&mut dout))?;
            out.push(timed_bytes("sample_greedy_f32", shape.clone(), ms, (rows * vocab * 4) as f64, copy));
            let ms = g.time(|| run_p(&mut doutp))?;
            out.push(timed_bytes("sample_top_p_f32", shape, ms, (rows * vocab * 4) as f64, copy));
        }
    }
    // Rows with nothing or little to draw from: a NaN among finite logits (never drawn, for
    // any uniform), all -inf and all NaN (the greedy token, 0): the output is always written.
    let vocab = 100usize;
    let mut logits = rng.vec(3 * vocab, 4.0);
    logits[0] = f32::NAN;
    logits[1] = 50.0; // nearly all the mass: a draw of NaN's neighbour would be a bug
    logits[vocab..2 * vocab].fill(f32::NEG_INFINITY);
    logits[2 * vocab..].fill(f32::NAN);
    let uniforms = [0.0f32, 0.5, 0.999];
    let (dl, du, vi) = (g.up(&logits)?, g.up(&uniforms)?, vocab as i32);
    let mut dout = g.up(&[-1i32; 3])?;
    let (temperature, top_p) = (1.0f32, 0.95f32);
    let mut b = g.stream.launch_builder(g.func("sample_top_p_f32")?);
    b.arg(&dl).arg(&vi).arg(&temperature).arg(&top_p).arg(&du).arg(&mut dout);
    // SAFETY: the arguments pushed above match the kernel's parameter list in kernels/*.cu
    // (types and order), and every buffer was allocated for the sizes this grid covers.
    launched(unsafe { b.launch(grid(3, 1, 1, 1024)) }, "sample_top_p_f32")?;
    g.sync()?;
    let got = g.down(&dout)?;
    out.push(CheckRow {
        kernel: "sample_top_p_f32".into(),
        shape: "3 rows: a NaN logit, all -inf, all NaN".into(),
        passed: got == [1, 0, 0],
        note: format!("tokens {got:?} (want [1, 0, 0])"),
        ..Default::default()
    });
    Ok(out)
}
