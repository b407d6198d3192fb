//! gpt-oss's routed experts as checkpoints store them: fused over experts, gate and up columns
//! interleaved (`gate_up_proj` `[E, H, 2I]`, even columns gate, odd up) with biases, `down_proj`
//! `[E, I, H]`; or MXFP4 (`*_blocks` `[E, out, in/32, 16]`, two e2m1 values per byte, low nibble
//! first, and `*_scales` `[E, out, in/32]` e8m0 exponents), dequantized exactly as transformers'
//! loader does. Each expert is read alone (a worker reads only what it hosts) and laid out as
//! every other expert is: `[gate rows | up rows]` of `[2I, H]` and `[H, I]`, so the kernels are
//! the same; only the biases and the clamped activation differ.

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use moe_compute::{Backend, SwigluWeights};

/// The e2m1 values of a nibble (transformers' `FP4_VALUES`).
const FP4: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// Dequantizes one expert's MXFP4 `[out, in]` weight from its blocks (`out · in/2` bytes) and
/// scales (`out · in/32` e8m0 bytes).
pub fn mxfp4(blocks: &[u8], scales: &[u8], out: usize, inp: usize) -> Vec<f32> {
    let mut w = Vec::with_capacity(out * inp);
    for (g, &s) in scales.iter().enumerate().take(out * inp / 32) {
        let scale = 2f32.powi(s as i32 - 127);
        for &b in &blocks[g * 16..(g + 1) * 16] {
            w.push(FP4[(b & 0x0f) as usize] * scale);
            w.push(FP4[(b >> 4) as usize] * scale);
        }
    }
    w
}

/// An expert's `[out, in]` projection: MXFP4 blocks when the checkpoint has them, else the
/// fused `[E, in, out]` tensor transposed.
fn projection(ckpt: &Checkpoint, name: &str, e: usize, experts: usize, out: usize, inp: usize) -> Result<Vec<f32>> {
    let blocks = format!("{name}_blocks");
    if ckpt.contains(&blocks) {
        if !inp.is_multiple_of(32) {
            return Err(ModelError::ShapeMismatch {
                path: name.into(),
                name: blocks,
                expected: vec![experts, out, inp / 32, 16],
                got: vec![],
            });
        }
        let (_, b) = ckpt.raw_slice(&blocks, &[experts, out, inp / 32, 16], e)?;
        let (_, s) = ckpt.raw_slice(&format!("{name}_scales"), &[experts, out, inp / 32], e)?;
        return Ok(mxfp4(b, s, out, inp));
    }
    let t = ckpt.read_slice(name, &[experts, inp, out], e)?;
    Ok((0..out).flat_map(|o| (0..inp).map(move |i| (o, i))).map(|(o, i)| t[i * out + o]).collect())
}

/// Interleaved `[g0, u0, g1, u1, …]` rows (of `cols` values) to `[g0, g1, …, u0, u1, …]`.
fn deinterleave(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let half = rows / 2;
    (0..rows)
        .flat_map(|r| {
            let src = if r < half { 2 * r } else { 2 * (r - half) + 1 };
            v[src * cols..(src + 1) * cols].iter().copied()
        })
        .collect()
}

/// Loads gpt-oss expert `e` of `layer`.
pub(crate) fn load<B: Backend>(
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    backend: &B,
    layer: usize,
    e: usize,
) -> Result<SwigluWeights<B>> {
    let (h, i, n) = (cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts);
    let p = format!("model.layers.{layer}.mlp.experts");
    let gate_up = deinterleave(&projection(ckpt, &format!("{p}.gate_up_proj"), e, n, 2 * i, h)?, 2 * i, h);
    let down = projection(ckpt, &format!("{p}.down_proj"), e, n, h, i)?;
    let gate_up_bias = deinterleave(&ckpt.read_slice(&format!("{p}.gate_up_proj_bias"), &[n, 2 * i], e)?, 2 * i, 1);
    let down_bias = ckpt.read_slice(&format!("{p}.down_proj_bias"), &[n, h], e)?;
    Ok(SwigluWeights {
        gate_up: backend.matrix(2 * i, h, gate_up)?,
        down: backend.matrix(h, i, down)?,
        gate_up_bias: Some(backend.vector(gate_up_bias)?),
        down_bias: Some(backend.vector(down_bias)?),
        glu: cfg.expert_glu(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mxfp4_nibbles_low_first_times_the_block_exponent() {
        // One row of 32 values: byte 0x21 holds 0.5 (low nibble 1) then 1.0 (high nibble 2).
        let mut blocks = [0u8; 16];
        blocks[0] = 0x21;
        blocks[15] = 0xf9; // -0.5 then -6.0
        let w = mxfp4(&blocks, &[128], 1, 32);
        assert_eq!((w[0], w[1]), (1.0, 2.0), "scale 2^(128-127) = 2");
        assert_eq!((w[30], w[31]), (-1.0, -12.0));
        assert!(w[2..30].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn interleaved_gate_and_up_rows_become_halves() {
        let v: Vec<f32> = (0..8).map(|x| x as f32).collect(); // 4 rows of 2
        assert_eq!(deinterleave(&v, 4, 2), vec![0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]);
    }
}
