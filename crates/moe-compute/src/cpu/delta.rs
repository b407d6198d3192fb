//! Gated DeltaNet (Qwen3-Next's linear attention) on the CPU, in its recurrent form: for each
//! sequence, the causal depthwise convolution over q, k and v (state: the last `kernel - 1`
//! inputs per channel), then for every value head the gated delta rule over the rows in order
//! (state: a `[k_head_dim, v_head_dim]` matrix), then the gated RMSNorm. Prefill and decode run
//! the same operations token by token, so a token's result is the same bit for bit in any chunk
//! and any batch. Each sequence reads its state from one slot and advances it in another.

use super::operand::SendPtr;
use super::{CpuBackend, CpuKvStore, HostTensor};
use crate::{AttentionSeq, ComputeError, DeltaNetShape, DeltaNetWeights, Result, StateSlots};
use rayon::prelude::*;
use std::cell::RefCell;

thread_local! {
    /// The convolved q, k and v of the call's rows (on the calling thread).
    static MIXED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per worker thread: normalized q and k, and the per-head vectors of one step.
    static HEAD: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// torch's softplus (beta 1, threshold 20).
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

fn bad(message: String) -> ComputeError {
    ComputeError::LinearAttention(message)
}

/// Checks shapes and that the slots exist, that write slots are distinct and that none is another
/// sequence's read slot (the parallel part writes each sequence's slot from one thread).
fn validate(
    proj: &HostTensor,
    w: &DeltaNetWeights<CpuBackend>,
    shape: &DeltaNetShape,
    seqs: &[AttentionSeq],
    states: &[StateSlots],
    store: &CpuKvStore,
    layer: usize,
) -> Result<()> {
    let s = &store.layout.states;
    if layer >= store.states.len() {
        return Err(bad(format!("state layer {layer} does not exist (the store has {})", store.states.len())));
    }
    if s.floats != shape.state_floats() {
        return Err(bad(format!("state slots hold {} values, the layer needs {}", s.floats, shape.state_floats())));
    }
    if proj.cols != shape.proj_cols() || shape.conv_kernel == 0 || shape.k_heads == 0 {
        return Err(bad(format!("projection has {} columns, the layer needs {}", proj.cols, shape.proj_cols())));
    }
    if !shape.v_heads.is_multiple_of(shape.k_heads) {
        return Err(bad(format!("{} value heads are not a multiple of {} key heads", shape.v_heads, shape.k_heads)));
    }
    if w.conv.len() != shape.conv_dim() * shape.conv_kernel
        || w.dt_bias.len() != shape.v_heads
        || w.decay_rate.len() != shape.v_heads
        || w.norm.len() != shape.v_head_dim
    {
        return Err(bad("weights do not match the layer's shape".into()));
    }
    if seqs.len() != states.len() {
        return Err(bad(format!("{} sequences but {} state slots", seqs.len(), states.len())));
    }
    for (i, (seq, st)) in seqs.iter().zip(states).enumerate() {
        if seq.rows.end > proj.rows {
            return Err(bad(format!("sequence rows {:?} exceed the {} rows", seq.rows, proj.rows)));
        }
        for slot in [st.read, st.write] {
            if slot as usize >= s.slots {
                return Err(ComputeError::BadStateSlot { slot, slots: s.slots });
            }
        }
        for other in &states[..i] {
            if other.write == st.write
                || (!st.fresh && other.write == st.read)
                || (!other.fresh && other.read == st.write)
            {
                return Err(bad(format!("sequences share state slot {}", st.write)));
            }
        }
        if !st.fresh && st.read == st.write {
            return Err(bad(format!("state slot {} is both read and written", st.read)));
        }
    }
    Ok(())
}

/// See [`crate::Backend::gated_delta_net`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn gated_delta_net(
    proj: &HostTensor,
    w: &DeltaNetWeights<CpuBackend>,
    shape: &DeltaNetShape,
    seqs: &[AttentionSeq],
    states: &[StateSlots],
    store: &mut CpuKvStore,
    layer: usize,
    out: &mut HostTensor,
) -> Result<()> {
    validate(proj, w, shape, seqs, states, store, layer)?;
    let floats = store.layout.states.floats;
    let (cd, kern) = (shape.conv_dim(), shape.conv_kernel);
    let conv_len = cd * (kern - 1);
    let layer_states = &mut store.states[layer];
    out.reshape(proj.rows, shape.value_dim());
    MIXED.with(|m| {
        let mut mixed = m.borrow_mut();
        if mixed.len() < proj.rows * cd {
            mixed.resize(proj.rows * cd, 0.0);
        }
        // Each sequence's state starts in its write slot, then the convolution runs over its rows.
        for (seq, st) in seqs.iter().zip(states) {
            let (r, wr) = (st.read as usize * floats, st.write as usize * floats);
            if st.fresh {
                layer_states[wr..wr + floats].fill(0.0);
            } else {
                layer_states.copy_within(r..r + floats, wr);
            }
            let conv_state = &mut layer_states[wr..wr + conv_len];
            for row in seq.rows.clone() {
                let x_row = &proj.data[row * proj.cols..row * proj.cols + cd];
                let m_row = &mut mixed[row * cd..(row + 1) * cd];
                for c in 0..cd {
                    let past = &mut conv_state[c * (kern - 1)..(c + 1) * (kern - 1)];
                    let wc = &w.conv[c * kern..(c + 1) * kern];
                    let mut acc = 0.0f32;
                    for (wj, xj) in wc.iter().zip(past.iter()) {
                        acc += wj * xj;
                    }
                    acc += wc[kern - 1] * x_row[c];
                    m_row[c] = silu(acc);
                    if kern > 1 {
                        past.rotate_left(1);
                        past[kern - 2] = x_row[c];
                    }
                }
            }
        }
        let mixed: &[f32] = &mixed;
        let state_ptr = SendPtr(layer_states.as_mut_ptr());
        let out_ptr = SendPtr(out.data.as_mut_ptr());
        let nv = shape.v_heads;
        (0..seqs.len() * nv).into_par_iter().for_each(|pair| {
            let (i, h) = (pair / nv, pair % nv);
            let head_len = shape.k_head_dim * shape.v_head_dim;
            let at = states[i].write as usize * floats + conv_len + h * head_len;
            // SAFETY: write slots are distinct across sequences (validated) and heads are
            // disjoint within a slot, so no two tasks touch the same state element; the slice is
            // inside the layer's states (slot < slots, validated).
            let state = unsafe { std::slice::from_raw_parts_mut(state_ptr.get().add(at), head_len) };
            head_steps(proj, mixed, w, shape, &seqs[i], h, state, out_ptr);
        });
    });
    Ok(())
}

/// The gated delta rule of value head `h` over one sequence's rows, and its gated RMSNorm into
/// `out`'s columns of that head.
#[allow(clippy::too_many_arguments)]
fn head_steps(
    proj: &HostTensor,
    mixed: &[f32],
    w: &DeltaNetWeights<CpuBackend>,
    shape: &DeltaNetShape,
    seq: &AttentionSeq,
    h: usize,
    state: &mut [f32],
    out: SendPtr,
) {
    let (dk, dv) = (shape.k_head_dim, shape.v_head_dim);
    let (cd, key_dim, value_dim) = (shape.conv_dim(), shape.key_dim(), shape.value_dim());
    let kh = h / (shape.v_heads / shape.k_heads);
    let q_scale = (dk as f32).sqrt();
    HEAD.with(|b| {
        let mut buf = b.borrow_mut();
        if buf.len() < 2 * dk + 2 * dv {
            buf.resize(2 * dk + 2 * dv, 0.0);
        }
        let (q, rest) = buf.split_at_mut(dk);
        let (k, rest) = rest.split_at_mut(dk);
        let (delta, o) = rest.split_at_mut(dv);
        let o = &mut o[..dv];
        for row in seq.rows.clone() {
            let m = &mixed[row * cd..(row + 1) * cd];
            let p = &proj.data[row * proj.cols..(row + 1) * proj.cols];
            l2_normalize(&m[kh * dk..(kh + 1) * dk], q);
            for x in q.iter_mut() {
                *x /= q_scale;
            }
            l2_normalize(&m[key_dim + kh * dk..key_dim + (kh + 1) * dk], k);
            let v = &m[2 * key_dim + h * dv..2 * key_dim + (h + 1) * dv];
            let z = &p[cd + h * dv..cd + (h + 1) * dv];
            let beta = sigmoid(p[cd + value_dim + h]);
            let a = p[cd + value_dim + shape.v_heads + h];
            let decay = (w.decay_rate[h] * softplus(a + w.dt_bias[h])).exp();
            for s in state.iter_mut() {
                *s *= decay;
            }
            // delta = (v - Sᵀk) · beta
            delta.fill(0.0);
            for (i, &ki) in k.iter().enumerate() {
                for (d, s) in delta.iter_mut().zip(&state[i * dv..(i + 1) * dv]) {
                    *d += s * ki;
                }
            }
            for (d, vj) in delta.iter_mut().zip(v) {
                *d = (vj - *d) * beta;
            }
            // S += k ⊗ delta, o = Sᵀq
            o.fill(0.0);
            for i in 0..dk {
                let s_row = &mut state[i * dv..(i + 1) * dv];
                for (s, d) in s_row.iter_mut().zip(delta.iter()) {
                    *s += k[i] * d;
                }
                for (oj, s) in o.iter_mut().zip(s_row.iter()) {
                    *oj += s * q[i];
                }
            }
            // Gated RMSNorm: weight · norm(o) · silu(z).
            let var = o.iter().map(|x| x * x).sum::<f32>() / dv as f32;
            let inv = 1.0 / (var + shape.norm_eps).sqrt();
            let base = row * value_dim + h * dv;
            for j in 0..dv {
                let y = w.norm[j] * (o[j] * inv) * silu(z[j]);
                // SAFETY: this task alone writes head h's columns of its sequence's rows.
                unsafe { *out.get().add(base + j) = y };
            }
        }
    });
}

/// `out = x / sqrt(Σx² + 1e-6)` (the FLA library's l2norm that transformers follows).
fn l2_normalize(x: &[f32], out: &mut [f32]) {
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() + 1e-6).sqrt();
    for (o, v) in out.iter_mut().zip(x) {
        *o = v * inv;
    }
}

/// See [`crate::Backend::copy_state`].
pub(crate) fn copy_state(store: &mut CpuKvStore, from: u32, to: u32) -> Result<()> {
    let l = store.layout.states;
    for slot in [from, to] {
        if slot as usize >= l.slots {
            return Err(ComputeError::BadStateSlot { slot, slots: l.slots });
        }
    }
    let (f, t) = (from as usize * l.floats, to as usize * l.floats);
    for layer in &mut store.states {
        layer.copy_within(f..f + l.floats, t);
    }
    Ok(())
}

/// See [`crate::Backend::mul_sigmoid_cols`].
pub(crate) fn mul_sigmoid_cols(x: &mut HostTensor, gate: &HostTensor, gate_col: usize) -> Result<()> {
    if gate.rows != x.rows || gate_col + x.cols > gate.cols {
        return Err(ComputeError::LinearAttention(format!(
            "gate columns {gate_col}..{} outside a {}x{} activation",
            gate_col + x.cols,
            gate.rows,
            gate.cols
        )));
    }
    for r in 0..x.rows {
        let g = &gate.row(r)[gate_col..gate_col + x.cols];
        for (v, &gv) in x.row_mut(r).iter_mut().zip(g) {
            *v *= 1.0 / (1.0 + (-gv).exp());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backend, KvLayout, StateLayout};

    fn setup(slots: usize) -> (CpuBackend, DeltaNetShape, DeltaNetWeights<CpuBackend>, CpuKvStore) {
        let shape =
            DeltaNetShape { k_heads: 1, v_heads: 2, k_head_dim: 4, v_head_dim: 3, conv_kernel: 3, norm_eps: 1e-6 };
        let cd = shape.conv_dim();
        let w = DeltaNetWeights {
            conv: (0..cd * 3).map(|i| ((i * 7 % 11) as f32 - 5.0) / 7.0).collect(),
            dt_bias: vec![0.5, -0.3],
            decay_rate: vec![-0.8, -2.0],
            norm: vec![1.1, 0.9, 1.0],
        };
        let layout = KvLayout {
            layers: 0,
            num_pages: 0,
            page_size: 1,
            n_kv_heads: 1,
            head_dim: 1,
            values_are_keys: false,
            states: StateLayout { layers: 1, slots, floats: shape.state_floats() },
        };
        let store = CpuBackend.kv_store(layout).expect("store");
        (CpuBackend, shape, w, store)
    }

    fn proj(rows: usize, cols: usize, seed: usize) -> HostTensor {
        let mut t = HostTensor::default();
        t.reshape(rows, cols);
        for (i, x) in t.data.iter_mut().enumerate() {
            *x = (((i + seed) * 2654435761 % 1000) as f32 / 500.0) - 1.0;
        }
        t
    }

    /// A sequence's rows in one call, token by token, or in two chunks, alone or beside another
    /// sequence: the same bits; and a failed-then-retried step (same read slot) too.
    #[test]
    fn chunks_and_batches_give_the_same_bits() {
        let (b, shape, w, mut store) = setup(6);
        let p = proj(5, shape.proj_cols(), 1);
        let one = |rows: std::ops::Range<usize>, start| AttentionSeq { rows, start_pos: start, pages: 0..0 };
        let mut whole = HostTensor::default();
        b.gated_delta_net(
            &p,
            &w,
            &shape,
            &[one(0..5, 0)],
            &[StateSlots { read: 0, write: 1, fresh: true }],
            &mut store,
            0,
            &mut whole,
        )
        .expect("whole");
        // Row by row, alternating slots.
        let mut slots = (2u32, 3u32);
        for r in 0..5 {
            let mut row = HostTensor::default();
            let pr = {
                let mut t = HostTensor::default();
                b.upload(1, p.cols, p.row(r), &mut t);
                t
            };
            let st = StateSlots { read: slots.0, write: slots.1, fresh: r == 0 };
            b.gated_delta_net(&pr, &w, &shape, &[one(0..1, r)], &[st], &mut store, 0, &mut row).expect("row");
            assert_eq!(row.row(0), whole.row(r), "row {r}");
            // A retry of the same step from the same read slot gives the same bits.
            if r == 2 {
                b.gated_delta_net(&pr, &w, &shape, &[one(0..1, r)], &[st], &mut store, 0, &mut row).expect("retry");
                assert_eq!(row.row(0), whole.row(r));
            }
            slots = (slots.1, slots.0);
        }
        // Beside another sequence in one batch.
        let mut pair = HostTensor::default();
        let p2 = proj(8, shape.proj_cols(), 1);
        let seqs = [one(0..5, 0), one(5..8, 0)];
        let sts = [StateSlots { read: 4, write: 4, fresh: true }, StateSlots { read: 5, write: 5, fresh: true }];
        b.gated_delta_net(&p2, &w, &shape, &seqs, &sts, &mut store, 0, &mut pair).expect("pair");
        for r in 0..5 {
            assert_eq!(pair.row(r), whole.row(r));
        }
        assert!(whole.data.iter().all(|x| x.is_finite()) && whole.data.iter().any(|&x| x != 0.0));
    }

    #[test]
    fn shared_or_missing_slots_are_refused() {
        let (b, shape, w, mut store) = setup(2);
        let p = proj(2, shape.proj_cols(), 3);
        let seqs = [
            AttentionSeq { rows: 0..1, start_pos: 0, pages: 0..0 },
            AttentionSeq { rows: 1..2, start_pos: 0, pages: 0..0 },
        ];
        let mut out = HostTensor::default();
        let same = [StateSlots { read: 0, write: 1, fresh: true }, StateSlots { read: 0, write: 1, fresh: true }];
        assert!(b.gated_delta_net(&p, &w, &shape, &seqs, &same, &mut store, 0, &mut out).is_err());
        let missing = [StateSlots { read: 0, write: 7, fresh: true }];
        assert!(matches!(
            b.gated_delta_net(&p, &w, &shape, &seqs[..1], &missing, &mut store, 0, &mut out),
            Err(ComputeError::BadStateSlot { slot: 7, slots: 2 })
        ));
    }
}
