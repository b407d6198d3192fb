//! `moe bench-device`'s batch-invariance row (a prompt's logits alone and as one of 64, bitwise;
//! with and without `--deterministic` on a GPU) and its host-sync counter.

use moe_compute::Backend;
use moe_model::{BatchItem, LogitsFor, Model, ModelConfig, SequenceCache};
use std::time::Instant;

type Rows = Vec<(String, String, String, String)>;

/// Batch invariance, measured: the logits of one prompt's last row alone and as the 18th of 64
/// prompts must be the same bits. On a GPU both ways (cuBLAS; `--deterministic`), each with the
/// time of that batch-of-64 prefill, so the mode's cost is in the same table.
pub(crate) fn invariance<B: Backend>(
    model: &Model<B>,
    kv: &mut moe_model::KvCache<B>,
    ws: &mut moe_model::Workspace<B>,
    c: &ModelConfig,
    on_gpu: bool,
) -> anyhow::Result<Rows> {
    let prompt = |s: usize| -> Vec<u32> { (0..24).map(|i| ((i * 7919 + s * 104_729) % c.vocab_size) as u32).collect() };
    let prompts: Vec<Vec<u32>> = (0..64).map(|s| prompt(s + 100)).collect();
    let mut out = Rows::new();
    for deterministic in if on_gpu { vec![false, true] } else { vec![false] } {
        #[cfg(feature = "cuda")]
        let chosen = moe_compute::cuda::backend::deterministic();
        #[cfg(feature = "cuda")]
        if on_gpu {
            moe_compute::cuda::backend::set_deterministic(deterministic);
        }
        let mut logits = Vec::new();
        let mut cache = SequenceCache::default();
        model.forward(ws, kv, &mut [BatchItem::new(&prompts[17], &mut cache)], LogitsFor::Last, &mut logits)?;
        kv.pages.release(&mut cache);
        let alone = logits.clone();
        let mut caches: Vec<SequenceCache> = (0..64).map(|_| SequenceCache::default()).collect();
        let t = Instant::now();
        let mut items: Vec<BatchItem<'_, B>> =
            prompts.iter().zip(caches.iter_mut()).map(|(p, c)| BatchItem::new(p, c)).collect();
        model.forward(ws, kv, &mut items, LogitsFor::Last, &mut logits)?;
        let s = t.elapsed().as_secs_f64();
        drop(items);
        for cache in caches.iter_mut() {
            kv.pages.release(cache);
        }
        let v = c.vocab_size;
        let same = logits.len() == 64 * v
            && alone.iter().zip(&logits[17 * v..18 * v]).all(|(a, b)| a.to_bits() == b.to_bits());
        out.push((
            format!(
                "batch invariance{}: a prompt alone vs 18th of 64",
                if deterministic { " (--deterministic)" } else { "" }
            ),
            format!("{:.1} ms for the 64", s * 1e3),
            if same { "bitwise equal".into() } else { "bits differ".into() },
            String::new(),
        ));
        #[cfg(feature = "cuda")]
        moe_compute::cuda::backend::set_deterministic(chosen);
    }
    Ok(out)
}

/// Host waits for a GPU so far in this process (0 without CUDA support).
pub(crate) fn host_syncs() -> u64 {
    #[cfg(feature = "cuda")]
    return moe_compute::cuda::backend::host_syncs();
    #[cfg(not(feature = "cuda"))]
    0
}
