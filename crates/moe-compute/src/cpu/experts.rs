//! The routed experts of one layer on the CPU: each expert's rows through its gated FFN, the
//! outputs added to their rows with the routing weights, expert by expert in the plan's order.
//! Without LoRA the experts' products run as two grouped calls (every expert's gate/up
//! projection at once, then every down projection), so the threads share out the whole layer
//! instead of meeting after each expert; with LoRA each expert runs alone (its adapters act
//! between the products). Both compute the same bits: each element is the canonical dot
//! product, and the additions happen in the same order.

use super::invariant::grouped_matmul;
use super::{glu_rows, lora, simd, CpuBackend, HostTensor};
use crate::{Backend, ExpertPlan, FfnScratch, RowExpertLora, SwigluWeights};

pub(super) fn expert_ffn(
    b: &CpuBackend,
    x: &HostTensor,
    experts: &[SwigluWeights<CpuBackend>],
    plan: &ExpertPlan,
    lora: &RowExpertLora<'_, CpuBackend>,
    s: &mut FfnScratch<CpuBackend>,
    out: &mut HostTensor,
) {
    let ne = plan.num_experts().min(experts.len());
    let any_lora = (0..ne).any(|e| plan.expert(e).0.iter().any(|&r| lora(r as usize, e).is_some()));
    let uniform = experts.first().is_some_and(|f| {
        experts[..ne].iter().all(|w| {
            (w.gate_up.rows, w.gate_up.cols, w.down.rows, w.down.cols)
                == (f.gate_up.rows, f.gate_up.cols, f.down.rows, f.down.cols)
        })
    });
    if any_lora || !uniform {
        for (e, w) in experts.iter().enumerate().take(ne) {
            one_expert(b, x, e, w, plan, lora, s, out);
        }
    } else {
        grouped(x, &experts[..ne], plan, s, out);
    }
}

/// Every expert of the layer in two grouped products (no adapters). The experts of a layer
/// share their shapes.
fn grouped(
    x: &HostTensor,
    experts: &[SwigluWeights<CpuBackend>],
    plan: &ExpertPlan,
    s: &mut FfnScratch<CpuBackend>,
    out: &mut HostTensor,
) {
    let Some(first) = experts.first() else { return };
    let (h, n_gu, inter) = (x.cols, first.gate_up.rows, first.down.cols);
    // Rows in plan order, expert after expert: each expert's rows, gate/up, hidden and output
    // are contiguous runs of the scratch buffers.
    s.segments.clear();
    let mut total = 0;
    for e in 0..experts.len() {
        let m = plan.expert(e).0.len();
        s.segments.push((total, m));
        total += m;
    }
    if total == 0 {
        return;
    }
    s.rows.reshape(total, h);
    let mut at = 0;
    for e in 0..experts.len() {
        for &r in plan.expert(e).0 {
            s.rows.row_mut(at).copy_from_slice(x.row(r as usize));
            at += 1;
        }
    }
    s.gate_up.reshape(total, n_gu);
    grouped_matmul(
        &s.rows.data,
        h,
        &s.segments,
        &|e| experts[e].gate_up.weights(),
        n_gu,
        &mut s.gate_up.data,
        &mut s.tasks,
    );
    s.hidden.reshape(total, inter);
    for (e, w) in experts.iter().enumerate() {
        let (start, m) = s.segments[e];
        let gu = &mut s.gate_up.data[start * n_gu..(start + m) * n_gu];
        if let Some(bias) = &w.gate_up_bias {
            for row in gu.chunks_exact_mut(n_gu) {
                for (o, bv) in row.iter_mut().zip(bias) {
                    *o += bv;
                }
            }
        }
        glu_rows(gu, m, n_gu, w.glu, &mut s.hidden.data[start * inter..(start + m) * inter]);
    }
    s.out.reshape(total, h);
    grouped_matmul(
        &s.hidden.data,
        inter,
        &s.segments,
        &|e| experts[e].down.weights(),
        h,
        &mut s.out.data,
        &mut s.tasks,
    );
    let mut at = 0;
    for (e, w) in experts.iter().enumerate() {
        let (rows, weights) = plan.expert(e);
        for (&r, &wt) in rows.iter().zip(weights) {
            let o = &mut s.out.data[at * h..(at + 1) * h];
            if let Some(bias) = &w.down_bias {
                for (v, bv) in o.iter_mut().zip(bias) {
                    *v += bv;
                }
            }
            simd::axpy(wt, o, out.row_mut(r as usize));
            at += 1;
        }
    }
}

/// Expert `e` alone, with its rows' adapters.
#[allow(clippy::too_many_arguments)]
fn one_expert(
    b: &CpuBackend,
    x: &HostTensor,
    e: usize,
    w: &SwigluWeights<CpuBackend>,
    plan: &ExpertPlan,
    lora: &RowExpertLora<'_, CpuBackend>,
    s: &mut FfnScratch<CpuBackend>,
    out: &mut HostTensor,
) {
    let (rows, weights) = plan.expert(e);
    if rows.is_empty() {
        return;
    }
    b.gather_rows(x, rows, &mut s.rows);
    b.linear(&s.rows, &w.gate_up, w.gate_up_bias.as_ref(), &mut s.gate_up);
    let any = rows.iter().any(|&r| lora(r as usize, e).is_some());
    let inter = w.gate_up.rows / 2;
    if any {
        let of = |i: usize| lora(rows[i] as usize, e);
        let (shrink, expand) = (&mut s.lora_shrink, &mut s.lora_expand);
        lora::lora_segments(&s.rows, |i| of(i).and_then(|l| l.gate.as_ref()), 0, shrink, expand, &mut s.gate_up);
        lora::lora_segments(&s.rows, |i| of(i).and_then(|l| l.up.as_ref()), inter, shrink, expand, &mut s.gate_up);
    }
    s.hidden.reshape(s.gate_up.rows, inter);
    glu_rows(&s.gate_up.data, s.gate_up.rows, s.gate_up.cols, w.glu, &mut s.hidden.data);
    b.linear(&s.hidden, &w.down, w.down_bias.as_ref(), &mut s.out);
    if any {
        let of = |i: usize| lora(rows[i] as usize, e).and_then(|l| l.down.as_ref());
        lora::lora_segments(&s.hidden, of, 0, &mut s.lora_shrink, &mut s.lora_expand, &mut s.out);
    }
    for (i, (&r, &wt)) in rows.iter().zip(weights).enumerate() {
        simd::axpy(wt, s.out.row(i), out.row_mut(r as usize));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::selection::values;
    use crate::Glu;

    /// 8 experts of hidden `h`, intermediate `i`.
    fn layer_of(b: &CpuBackend, seed: u32, bias: bool, h: usize, i: usize) -> Vec<SwigluWeights<CpuBackend>> {
        (0..8u32)
            .map(|e| SwigluWeights {
                gate_up: b.matrix(2 * i, h, values(2 * i * h, seed + e)).unwrap(),
                down: b.matrix(h, i, values(h * i, seed + 100 + e)).unwrap(),
                gate_up_bias: bias.then(|| values(2 * i, seed + 200 + e)),
                down_bias: bias.then(|| values(h, seed + 300 + e)),
                glu: if bias { Glu::ClampedSigmoid { alpha: 1.702, limit: 7.0 } } else { Glu::Silu },
            })
            .collect()
    }

    fn layer(b: &CpuBackend, seed: u32, bias: bool) -> Vec<SwigluWeights<CpuBackend>> {
        layer_of(b, seed, bias, 64, 96)
    }

    fn top2(rows: usize) -> ExpertPlan {
        let mut plan = ExpertPlan::default();
        let entries: Vec<(u32, u32, f32)> = (0..rows)
            .flat_map(|r| [(r as u32, (r % 8) as u32, 0.7), (r as u32, ((r * 3 + 1) % 8) as u32, 0.3)])
            .collect();
        plan.rebuild_from(8, entries.iter().copied());
        plan
    }

    #[test]
    #[ignore = "timing, by hand with --release"]
    fn ab_grouped() {
        let b = CpuBackend;
        let layers: Vec<_> = (0..8).map(|l| layer_of(&b, 10 * l, false, 512, 1024)).collect();
        for rows in [1usize, 4, 16, 64] {
            let x = HostTensor { rows, cols: 512, data: values(rows * 512, 9) };
            let plan = top2(rows);
            let mut s = FfnScratch::new(&b);
            let mut out = HostTensor { rows, cols: 512, data: vec![0.0; rows * 512] };
            let mut t = [Vec::new(), Vec::new()];
            for round in 0..30 {
                let start = std::time::Instant::now();
                for experts in &layers {
                    if round % 2 == 0 {
                        grouped(&x, experts, &plan, &mut s, &mut out);
                    } else {
                        for (e, w) in experts.iter().enumerate() {
                            one_expert(&b, &x, e, w, &plan, &|_, _| None, &mut s, &mut out);
                        }
                    }
                }
                t[round % 2].push(start.elapsed().as_secs_f64() * 1e3);
            }
            for v in t.iter_mut() {
                v.sort_by(|a, b| a.total_cmp(b));
            }
            eprintln!("{rows} rows, 8 layers: grouped {:.2} ms, expert by expert {:.2} ms", t[0][7], t[1][7]);
        }
    }

    /// The grouped products give the bits of expert-by-expert, with and without biases.
    #[test]
    fn grouped_equals_expert_by_expert() {
        let b = CpuBackend;
        for (bias, rows) in [(false, 1usize), (false, 13), (true, 7), (true, 70)] {
            let experts = layer(&b, 5, bias);
            let x = HostTensor { rows, cols: 64, data: values(rows * 64, 9) };
            let plan = top2(rows);
            let mut s = FfnScratch::new(&b);
            let zero = HostTensor { rows, cols: 64, data: vec![0.0; rows * 64] };
            let (mut a, mut c) = (zero.clone(), zero);
            grouped(&x, &experts, &plan, &mut s, &mut a);
            for (e, w) in experts.iter().enumerate() {
                one_expert(&b, &x, e, w, &plan, &|_, _| None, &mut s, &mut c);
            }
            let bits = |t: &HostTensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&c), "bias {bias}, {rows} rows");
            assert!(a.data.iter().any(|v| *v != 0.0));
        }
    }
}
