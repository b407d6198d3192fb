//! Multi-head latent attention's weights (DeepSeek-V2/V3, Kimi K2), loaded into the absorbed form
//! that `mla` computes with. Keys and values of every head come from one compressed latent per
//! token (`kv_lora_rank` values, RMS-normed) and a rope key shared by all heads; the KV cache
//! holds exactly those. `kv_b_proj` is split at load into `W_UK_hᵀ` (absorbed into each query
//! head) and `W_UV_h` (applied to each head's latent output).
//!
//! Interleaved rope (`rope_interleave`, DeepSeek's default): transformers de-interleaves q's and
//! k's rope columns before a rotate-half rope; permuting the rows of the projections that make
//! them at load time is the same computation, so the backend's one rope kernel serves.
//!
//! LoRA: pairs on `q_a_proj`, `q_b_proj` (`q_proj`), `kv_a_proj_with_mqa` and `o_proj` add to their
//! projection's output (rope rows of B reordered as the weight's are); a `kv_b_proj` pair, whose
//! weight is absorbed, is absorbed too ([`absorbed_kv_b_lora`]).

use crate::config::LatentAttention;
use crate::error::Result;
use crate::loader::Loader;
use moe_compute::Backend;

/// One layer's latent attention weights.
pub struct LatentWeights<B: Backend> {
    /// `q_a_proj` `[q_lora_rank, H]` and `q_a_layernorm`, when q is low-rank.
    pub q_a: Option<(B::Matrix, B::Vector)>,
    /// `q_b_proj` (or `q_proj`): `[heads · qk_head_dim, q_lora_rank or H]`, rope rows de-interleaved.
    pub q_b: B::Matrix,
    /// `kv_a_proj_with_mqa`: `[kv_lora_rank + rope, H]`, rope rows de-interleaved.
    pub kv_a: B::Matrix,
    pub kv_a_norm: B::Vector,
    /// `W_UK_hᵀ` of every head: `[heads · kv_lora_rank, qk_nope_head_dim]`.
    pub absorb_k: B::Matrix,
    /// `W_UV_h` of every head: `[heads · v_head_dim, kv_lora_rank]`.
    pub absorb_v: B::Matrix,
    /// `o_proj`: `[H, heads · v_head_dim]`.
    pub o: B::Matrix,
}

/// A tensor's values as stored (bf16 kept as bits), for reordering before upload.
enum Raw {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl Raw {
    fn read<B: Backend>(l: &Loader<'_, B>, name: &str, rows: usize, cols: usize) -> Result<Self> {
        if let Some(bits) = l.ckpt.read_bf16(name, &[rows, cols])? {
            return Ok(Raw::Bf16(bits));
        }
        Ok(Raw::F32(l.ckpt.read(name, &[rows, cols])?))
    }

    /// `new[i] = old[source(i)]` over `count` items of `cols` values.
    fn reorder(self, count: usize, cols: usize, source: impl Fn(usize) -> usize) -> Self {
        fn go<T: Copy>(v: Vec<T>, count: usize, cols: usize, source: impl Fn(usize) -> usize) -> Vec<T> {
            (0..count).flat_map(|i| v[source(i) * cols..(source(i) + 1) * cols].to_vec()).collect()
        }
        match self {
            Raw::F32(v) => Raw::F32(go(v, count, cols, source)),
            Raw::Bf16(v) => Raw::Bf16(go(v, count, cols, source)),
        }
    }

    fn matrix<B: Backend>(self, backend: &B, rows: usize, cols: usize) -> Result<B::Matrix> {
        Ok(match self {
            Raw::F32(v) => backend.matrix(rows, cols, v)?,
            Raw::Bf16(v) => backend.matrix_bf16(rows, cols, v)?,
        })
    }
}

/// The row order that de-interleaves a rope block of `rope` rows starting at `start` within
/// blocks of `block` rows: new row `start + i` is old `start + 2i`, new `start + rope/2 + i` is
/// old `start + 2i + 1`.
fn deinterleave(block: usize, start: usize, rope: usize, interleaved: bool) -> impl Fn(usize) -> usize {
    move |row| {
        let (b, j) = (row / block, row % block);
        if !interleaved || j < start {
            return row;
        }
        let i = j - start;
        let old = if i < rope / 2 { 2 * i } else { 2 * (i - rope / 2) + 1 };
        b * block + start + old
    }
}

/// The row order of q's projection as loaded (`new row → row in the file`): each head's rope rows
/// de-interleaved. An adapter's B on `q_b_proj` (or `q_proj`) is reordered the same way.
pub fn latent_q_rows(a: &LatentAttention) -> impl Fn(usize) -> usize {
    deinterleave(a.qk_head_dim(), a.qk_nope_head_dim, a.qk_rope_head_dim, a.rope_interleave)
}

/// The row order of `kv_a_proj_with_mqa` as loaded: the rope key's rows de-interleaved.
pub fn latent_kv_a_rows(a: &LatentAttention) -> impl Fn(usize) -> usize {
    deinterleave(a.latent_dim(), a.kv_lora_rank, a.qk_rope_head_dim, a.rope_interleave)
}

/// A LoRA pair's `(a, b)` values, row-major.
pub type LoraValues = (Vec<f32>, Vec<f32>);

/// A `kv_b_proj` LoRA pair (`lora_a` `[r, kv_lora_rank]`, `lora_b` `[heads·(nope + v), r]`) in the
/// absorbed form, as `(a, b)` pairs of row-major values for [`Backend::lora_add_heads`]:
///
/// - keys: head h's key is `(W_UK_h + s·B_h^K·A)·c`, so its absorbed query gains
///   `s·Aᵀ·(B_h^Kᵀ·q_nope_h)`: a pair with per-head A `= B_h^Kᵀ` (`[heads·r, nope]`) and shared
///   B `= Aᵀ` (`[kv_lora_rank, r]`);
/// - values: head h's output is `W_UV_h·o_h + s·B_h^V·(A·o_h)` for its latent output `o_h`: shared
///   A (`[r, kv_lora_rank]`) and per-head B `= B_h^V` (`[heads·v, r]`).
pub fn absorbed_kv_b_lora(
    a: &LatentAttention,
    heads: usize,
    r: usize,
    lora_a: &[f32],
    lora_b: &[f32],
) -> (LoraValues, LoraValues) {
    let (rank, nope, v) = (a.kv_lora_rank, a.qk_nope_head_dim, a.v_head_dim);
    let mut keys_a = Vec::with_capacity(heads * r * nope);
    let mut values_b = Vec::with_capacity(heads * v * r);
    for h in 0..heads {
        let head = &lora_b[h * (nope + v) * r..(h + 1) * (nope + v) * r];
        for j in 0..r {
            keys_a.extend((0..nope).map(|i| head[i * r + j]));
        }
        values_b.extend_from_slice(&head[nope * r..]);
    }
    let keys_b = (0..rank).flat_map(|c| (0..r).map(move |j| lora_a[j * rank + c])).collect();
    ((keys_a, keys_b), (lora_a.to_vec(), values_b))
}

/// Loads the latent attention of the layer whose attention tensors start with `p`.
pub(crate) fn load_latent<B: Backend>(l: &Loader<'_, B>, a: &LatentAttention, p: &str) -> Result<LatentWeights<B>> {
    let c = l.cfg;
    let (h, heads, qk) = (c.hidden_size, c.num_heads, a.qk_head_dim());
    let (rank, rope, nope, v) = (a.kv_lora_rank, a.qk_rope_head_dim, a.qk_nope_head_dim, a.v_head_dim);
    let q_in = a.q_lora_rank.unwrap_or(h);
    let q_a = match a.q_lora_rank {
        Some(r) => {
            Some((l.matrix(&format!("{p}.q_a_proj.weight"), r, h)?, l.vector(&format!("{p}.q_a_layernorm.weight"), r)?))
        }
        None => None,
    };
    let q_name = if a.q_lora_rank.is_some() { format!("{p}.q_b_proj.weight") } else { format!("{p}.q_proj.weight") };
    let q_b = Raw::read(l, &q_name, heads * qk, q_in)?
        .reorder(heads * qk, q_in, deinterleave(qk, nope, rope, a.rope_interleave))
        .matrix(l.backend, heads * qk, q_in)?;
    let kv_a = Raw::read(l, &format!("{p}.kv_a_proj_with_mqa.weight"), rank + rope, h)?
        .reorder(rank + rope, h, deinterleave(rank + rope, rank, rope, a.rope_interleave))
        .matrix(l.backend, rank + rope, h)?;
    // kv_b_proj: per head, nope rows of W_UK then v rows of W_UV, each `[.., rank]`.
    let kv_b = match Raw::read(l, &format!("{p}.kv_b_proj.weight"), heads * (nope + v), rank)? {
        Raw::F32(w) => w,
        Raw::Bf16(w) => w.into_iter().map(|b| f32::from_bits((b as u32) << 16)).collect(),
    };
    let mut absorb_k = Vec::with_capacity(heads * rank * nope);
    let mut absorb_v = Vec::with_capacity(heads * v * rank);
    for hd in 0..heads {
        let base = hd * (nope + v) * rank;
        for j in 0..rank {
            absorb_k.extend((0..nope).map(|i| kv_b[base + i * rank + j]));
        }
        absorb_v.extend_from_slice(&kv_b[base + nope * rank..base + (nope + v) * rank]);
    }
    Ok(LatentWeights {
        q_a,
        q_b,
        kv_a,
        kv_a_norm: l.vector(&format!("{p}.kv_a_layernorm.weight"), rank)?,
        absorb_k: l.backend.matrix(heads * rank, nope, absorb_k)?,
        absorb_v: l.backend.matrix(heads * v, rank, absorb_v)?,
        o: l.matrix(&format!("{p}.o_proj.weight"), h, heads * v)?,
    })
}

#[cfg(test)]
mod tests {
    use super::deinterleave;

    #[test]
    fn deinterleave_moves_even_then_odd_rope_rows_in_each_block() {
        // Blocks of 6 rows: 2 pass-through rows then 4 rope rows stored as pairs.
        let f = deinterleave(6, 2, 4, true);
        let order: Vec<usize> = (0..12).map(f).collect();
        assert_eq!(order, vec![0, 1, 2, 4, 3, 5, 6, 7, 8, 10, 9, 11]);
        let same = deinterleave(6, 2, 4, false);
        assert_eq!((0..6).map(same).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 5]);
    }
}
