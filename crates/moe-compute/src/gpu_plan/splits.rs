//! Flash-decoding's split of one sequence's context (kernels/flash_decode.cu): a block per
//! (sequence, KV head, split) attends to one range of keys for the whole GQA group and writes a
//! partial result (running max, sum of exponentials, unnormalised output); a merge kernel
//! combines the splits in ascending order. The split is a function of the sequence's own context
//! length (and window) only, never of the batch, so a request's bits do not depend on what it
//! is batched with. Graphs are keyed by the batch's largest split count, rounded up to a power of
//! two ([`split_bucket`]); blocks past a sequence's own count exit.

/// Keys per split before the context is long enough to need more than [`MAX_SPLITS`].
pub const SPLIT_TOKENS: usize = 512;
/// The most splits of one sequence (longer contexts get longer splits).
pub const MAX_SPLITS: usize = 16;

/// The ranges a sequence's decode attention is split into: `count` ranges of `len` keys from
/// `start` (the last one shorter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeSplits {
    pub start: usize,
    pub len: usize,
    pub count: usize,
}

impl DecodeSplits {
    /// The split of a context of `context_len` keys (a sliding `window` attends to the last
    /// `window` keys), with split lengths a multiple of `page_size`.
    pub fn new(context_len: usize, window: Option<usize>, page_size: usize) -> Self {
        let start = window.map_or(0, |w| context_len.saturating_sub(w));
        let attended = context_len - start;
        let page = page_size.max(1);
        let len = SPLIT_TOKENS.max(attended.div_ceil(MAX_SPLITS)).div_ceil(page) * page;
        Self { start, len, count: attended.div_ceil(len).max(1) }
    }

    /// Keys of split `i`.
    pub fn range(&self, i: usize, context_len: usize) -> std::ops::Range<usize> {
        let a = (self.start + i * self.len).min(context_len);
        a..(a + self.len).min(context_len)
    }
}

/// Query heads per KV head and the head size flash_decode_bf16 serves (larger groups or heads
/// take the prefill kernel).
pub const MAX_GROUP: usize = 16;
pub const MAX_HEAD_DIM: usize = 256;
/// Keys per shared-memory tile, and the padding of each key row (bf16 values).
pub const TILE: usize = 64;
const PAD: usize = 8;

/// Whether flash_decode_bf16 serves this shape: head_dim a multiple of 16 (16-byte copies, and
/// each of the two threads per key sums a half of whole 16-byte chunks).
pub fn flash_decode_serves(group: usize, head_dim: usize) -> bool {
    (1..=MAX_GROUP).contains(&group) && head_dim.is_multiple_of(16) && (16..=MAX_HEAD_DIM).contains(&head_dim)
}

/// flash_decode_bf16's dynamic shared memory for a GQA group and head size: the group's queries,
/// probabilities and partial scores, three per-head values, and two stages of key and value tiles.
pub fn flash_decode_shared_bytes(group: usize, head_dim: usize) -> usize {
    let floats = group * head_dim + 3 * group * TILE + 3 * MAX_GROUP;
    floats * 4 + 2 * 2 * TILE * (head_dim + PAD) * 2
}

/// Query rows per block of flash_prefill_bf16.
pub const PREFILL_ROWS: usize = 64;

/// flash_prefill_bf16's dynamic shared memory: the block's queries and two stages of key and
/// value tiles, all bf16.
pub fn flash_prefill_shared_bytes(head_dim: usize) -> usize {
    5 * PREFILL_ROWS * head_dim * 2
}

/// flash_prefill_bf16's tile table: each sequence's query rows (`(first row, rows, sequence)`,
/// rows contiguous) cut into tiles of at most [`PREFILL_ROWS`], as `[first, rows, sequence]`
/// triples. A tile never mixes sequences.
pub fn prefill_tiles(sequences: &[(usize, usize, usize)]) -> Vec<i32> {
    let mut out = Vec::new();
    for &(first, rows, seq) in sequences {
        for at in (0..rows).step_by(PREFILL_ROWS) {
            out.extend([(first + at) as i32, (rows - at).min(PREFILL_ROWS) as i32, seq as i32]);
        }
    }
    out
}

/// The graph key's split dimension: the batch's largest split count, rounded up to a power of two.
pub fn split_bucket(max_count: usize) -> u32 {
    max_count.clamp(1, MAX_SPLITS).next_power_of_two() as u32
}

/// One split's partial attention for one query head.
#[derive(Clone, Debug, PartialEq)]
pub struct Partial {
    pub max: f32,
    pub sum: f32,
    /// Σ exp(s − max) · v, not yet divided by `sum`.
    pub out: Vec<f32>,
}

/// The partial result of query `q` over keys and values `range` (rows of `dim` values).
pub fn attend_split(q: &[f32], keys: &[f32], values: &[f32], range: std::ops::Range<usize>, scale: f32) -> Partial {
    let dim = q.len();
    let scores: Vec<f32> = range
        .clone()
        .map(|t| q.iter().zip(&keys[t * dim..(t + 1) * dim]).map(|(a, b)| a * b).sum::<f32>() * scale)
        .collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut out = vec![0.0; dim];
    let mut sum = 0.0;
    for (s, t) in scores.iter().zip(range) {
        let p = (s - max).exp();
        sum += p;
        for (o, v) in out.iter_mut().zip(&values[t * dim..(t + 1) * dim]) {
            *o += p * v;
        }
    }
    Partial { max, sum, out }
}

/// The merge kernel's combination, splits in ascending order.
pub fn merge(parts: &[Partial]) -> Vec<f32> {
    let dim = parts.first().map_or(0, |p| p.out.len());
    let max = parts.iter().map(|p| p.max).fold(f32::NEG_INFINITY, f32::max);
    let mut out = vec![0.0; dim];
    let mut sum = 0.0;
    for p in parts.iter().filter(|p| p.sum > 0.0) {
        let scale = (p.max - max).exp();
        sum += p.sum * scale;
        for (o, v) in out.iter_mut().zip(&p.out) {
            *o += v * scale;
        }
    }
    if sum > 0.0 {
        out.iter_mut().for_each(|o| *o /= sum);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn splits_cover_the_context_once_and_depend_only_on_its_length() {
        for page in [16usize, 64] {
            for ctx in [1usize, 15, 16, 511, 512, 513, 2048, 8191, 32768, 131_072] {
                for window in [None, Some(128), Some(4096)] {
                    let s = DecodeSplits::new(ctx, window, page);
                    assert!(s.count >= 1 && s.count <= MAX_SPLITS, "{ctx} {window:?}: {s:?}");
                    assert_eq!(s.len % page, 0);
                    let mut next = s.start;
                    for i in 0..s.count {
                        let r = s.range(i, ctx);
                        assert_eq!(r.start, next);
                        assert!(!r.is_empty() || ctx == 0);
                        next = r.end;
                    }
                    assert_eq!(next, ctx);
                    assert_eq!(s.start, window.map_or(0, |w| ctx.saturating_sub(w)));
                }
            }
        }
        assert_eq!(DecodeSplits::new(2048, None, 16).count, 4);
        assert_eq!(split_bucket(3), 4);
        assert_eq!(split_bucket(0), 1);
        assert_eq!(split_bucket(100), MAX_SPLITS as u32);
    }

    #[test]
    fn prefill_tiles_cover_each_sequence_without_mixing() {
        let t = prefill_tiles(&[(0, 70, 0), (70, 0, 1), (70, 64, 2), (134, 1, 3)]);
        assert_eq!(t, vec![0, 64, 0, 64, 6, 0, 70, 64, 2, 134, 1, 3]);
        let src = include_str!("../../../../kernels/flash_prefill.cu");
        assert!(src.contains(&format!("#define FP_ROWS {PREFILL_ROWS}")));
    }

    /// The kernel's constants are these, so device and host split a context the same way.
    #[test]
    fn the_kernel_splits_as_this_module_does() {
        let src = include_str!("../../../../kernels/flash_decode.cu");
        let define = |name: &str| -> usize {
            src.lines()
                .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name}"))
        };
        assert_eq!(define("FD_SPLIT_TOKENS"), SPLIT_TOKENS);
        assert_eq!(define("FD_MAX_SPLITS"), MAX_SPLITS);
        assert_eq!(define("FD_TILE"), TILE);
        assert_eq!(define("FD_MAX_GROUP"), MAX_GROUP);
        assert_eq!(define("FD_MAX_D"), MAX_HEAD_DIM);
        assert_eq!(define("FD_PAD"), PAD);
        // Mixtral (GQA 4, head 128) and gpt-oss (GQA 8, head 64) fit beside another block per SM.
        assert!(flash_decode_shared_bytes(4, 128) <= 100 * 1024);
        assert!(flash_decode_shared_bytes(MAX_GROUP, MAX_HEAD_DIM) <= super::super::tiles::SM90_MAX_SHARED as usize);
        assert!(flash_decode_serves(8, 64) && !flash_decode_serves(24, 128) && !flash_decode_serves(4, 100));
        assert!(!flash_decode_serves(4, 72), "72 / 2 is not whole 16-byte chunks");
    }

    #[test]
    fn merged_splits_equal_one_pass_attention() {
        let mut rng = SplitMix64::new(5);
        let (dim, ctx) = (64usize, 1500usize);
        let q: Vec<f32> = (0..dim).map(|_| rng.signed()).collect();
        let keys: Vec<f32> = (0..ctx * dim).map(|_| rng.signed() * 3.0).collect();
        let values: Vec<f32> = (0..ctx * dim).map(|_| rng.signed()).collect();
        let scale = 1.0 / (dim as f32).sqrt();
        let whole = attend_split(&q, &keys, &values, 0..ctx, scale);
        let want: Vec<f32> = whole.out.iter().map(|o| o / whole.sum).collect();
        let s = DecodeSplits::new(ctx, None, 16);
        assert_eq!(s.count, 3);
        let parts: Vec<Partial> =
            (0..s.count).map(|i| attend_split(&q, &keys, &values, s.range(i, ctx), scale)).collect();
        let got = merge(&parts);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1e-2), "{g} vs {w}");
        }
        // An empty split (a window past the context) contributes nothing.
        let mut with_empty = parts.clone();
        with_empty.push(Partial { max: f32::NEG_INFINITY, sum: 0.0, out: vec![0.0; dim] });
        assert_eq!(merge(&with_empty), got);
    }
}
