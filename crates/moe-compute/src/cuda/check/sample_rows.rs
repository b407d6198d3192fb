//! sample_rows_f32 (the device sampler, issue 32) against its reference, which draws the host
//! sampler's tokens: every row's token must be the reference's (greedy and top-k rows, masks,
//! ties, NaN and −∞ logits, resumed generators; host rows marked −1), then the kernel is timed on
//! a 32k vocabulary at batch 64.

use super::{grid, launched, CheckRow, Gpu, Result, Rng};
use crate::gpu_plan::sampling::{pack_mask, sample_row, RowParams};
use cudarc::driver::PushKernelArg;

struct Rows {
    logits: Vec<f32>,
    masks: Vec<u32>,
    params: Vec<RowParams>,
}

fn rows(rng: &mut Rng, n: usize, vocab: usize) -> Rows {
    let mut logits = Vec::with_capacity(n * vocab);
    let mut masks = Vec::new();
    let mut params = Vec::new();
    for r in 0..n {
        logits.extend((0..vocab).map(|_| match rng.below(20) {
            0 => f32::NEG_INFINITY,
            1 if r % 7 == 0 => f32::NAN,
            2..=4 => 1.5,
            _ => rng.uniform() * 6.0,
        }));
        let allowed: Vec<bool> = (0..vocab).map(|_| r % 3 != 0 || rng.below(4) != 0).collect();
        masks.extend(pack_mask(&allowed));
        params.push(RowParams {
            temperature: [0.0, 0.3, 1.0, 1.7][rng.below(4)],
            top_k: [0, 1, 2, 5, 40, 64, 65][rng.below(7)],
            top_p: [1.0, 0.9, 0.5, 0.05][rng.below(4)],
            seed: r as u64 * 7919 + 3,
            draw: rng.below(9) as u64,
        });
    }
    Rows { logits, masks, params }
}

pub(super) fn sample_rows(g: &Gpu, rng: &mut Rng, quick: bool) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    for (n, vocab) in [(300usize, 37usize), (200, 1000), (64, if quick { 4096 } else { 32000 })] {
        let rs = rows(rng, n, vocab);
        let p = &rs.params;
        let (dl, dm) = (g.up(&rs.logits)?, g.up(&rs.masks)?);
        let dt = g.up(&p.iter().map(|x| x.temperature).collect::<Vec<_>>())?;
        let dk = g.up(&p.iter().map(|x| x.top_k).collect::<Vec<_>>())?;
        let dp = g.up(&p.iter().map(|x| x.top_p).collect::<Vec<_>>())?;
        let ds = g.up(&p.iter().map(|x| x.seed).collect::<Vec<_>>())?;
        let dd = g.up(&p.iter().map(|x| x.draw).collect::<Vec<_>>())?;
        let mut tokens = g.up(&vec![-7i32; n])?;
        let vi = vocab as i32;
        {
            let mut b = g.stream.launch_builder(g.func("sample_rows_f32")?);
            b.arg(&dl).arg(&vi).arg(&dm).arg(&dt).arg(&dk).arg(&dp).arg(&ds).arg(&dd).arg(&mut tokens);
            // SAFETY: the arguments match sample_rows_f32's parameters (kernels/sample_rows.cu); every
            // buffer holds one entry per row (logits a row of `vocab`, masks ceil(vocab / 32) words).
            launched(unsafe { b.launch(grid(n as u32, 1, 1, 256)) }, "sample_rows_f32")?;
        }
        g.sync()?;
        let got = g.down(&tokens)?;
        let words = vocab.div_ceil(32);
        let mut bad = 0;
        for r in 0..n {
            let want =
                sample_row(&p[r], &rs.logits[r * vocab..(r + 1) * vocab], Some(&rs.masks[r * words..(r + 1) * words]));
            if want.map_or(-1, |t| t as i32) != got[r] {
                bad += 1;
            }
        }
        out.push(CheckRow {
            kernel: "sample_rows_f32".into(),
            shape: format!("{n} rows, vocab {vocab}, masks, greedy / top-k 2..64 / host rows"),
            rel_err: if bad == 0 { 0.0 } else { f64::INFINITY },
            passed: bad == 0,
            note: if bad == 0 { "the host sampler's tokens".into() } else { format!("{bad} of {n} rows differ") },
            ..Default::default()
        });
        if vocab >= 4096 {
            let mut tokens = g.up(&vec![0i32; n])?;
            let ms = g.time(|| {
                let mut b = g.stream.launch_builder(g.func("sample_rows_f32")?);
                b.arg(&dl).arg(&vi).arg(&dm).arg(&dt).arg(&dk).arg(&dp).arg(&ds).arg(&dd).arg(&mut tokens);
                // SAFETY: as above.
                launched(unsafe { b.launch(grid(n as u32, 1, 1, 256)) }, "sample_rows_f32")
            })?;
            out.push(CheckRow {
                kernel: "sample_rows_f32".into(),
                shape: format!("{n} rows, vocab {vocab}, mixed parameters"),
                passed: true,
                ms: Some(ms),
                rate: Some((ms * 1e3, "µs")),
                note: "replaces downloading every row's logits".into(),
                ..Default::default()
            });
        }
    }
    Ok(out)
}
