//! `moe bench`'s prefix-cache run: time to first token of a request that shares a 1024-token
//! prefix with a finished one, with the prefix cache on and off, on the embedded cluster.

use moe_router::{Engine, EngineConfig, Event, GenerationParams, PromptInput, ValidatedRequest};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Serialize)]
pub struct PrefixRun {
    pub prefix_tokens: usize,
    /// TTFT of the second request (same prefix, another suffix) with the cache off, then on.
    pub ttft_off_ms: f64,
    pub ttft_on_ms: f64,
    pub speedup: f64,
    pub cached_tokens: usize,
}

/// Submits `prompt` for one new token; returns (time to first token, cached prompt tokens).
fn first_token(engine: &Engine, prompt: &[u32]) -> anyhow::Result<(Duration, usize)> {
    let params = GenerationParams { max_new_tokens: Some(1), ..Default::default() };
    let req = ValidatedRequest::new(
        PromptInput::Ids(prompt.to_vec()),
        &params,
        engine.codec(),
        engine.model_config(),
        Duration::from_secs(600),
    )?;
    let start = Instant::now();
    let (_, mut rx) = engine.submit(req)?;
    let mut ttft = None;
    loop {
        match rx.blocking_recv() {
            Some(Event::Delta { .. }) => {
                ttft.get_or_insert_with(|| start.elapsed());
            }
            Some(Event::Finished { cached_tokens, .. }) => {
                return Ok((ttft.unwrap_or_else(|| start.elapsed()), cached_tokens));
            }
            Some(Event::Failed(e)) => anyhow::bail!("prefix run: {e}"),
            None => anyhow::bail!("prefix run: no terminal event"),
        }
    }
}

/// A finished request with a `prefix_tokens` prefix, then a second one with the same prefix
/// and another suffix: the second's TTFT with the cache off and on (best of three each). The
/// prefix is shortened to fit the model's context.
pub fn measure(dir: &Path, workers: usize, prefix_tokens: usize) -> anyhow::Result<PrefixRun> {
    let config = moe_model::ModelConfig::from_dir(dir)?;
    let vocab = config.vocab_size as u32;
    // Within the context: the prefix, a suffix of up to 4 tokens and the new token.
    let prefix_tokens = prefix_tokens.min(config.max_position_embeddings.saturating_sub(8)).max(1);
    let prefix: Vec<u32> = (0..prefix_tokens as u32).map(|j| (j * 7919 + 11) % vocab).collect();
    let mut ttft = [f64::MAX; 2];
    let mut cached_tokens = 0;
    for (slot, cache) in [(0usize, false), (1, true)] {
        let cfg = EngineConfig { prefix_cache: cache, max_batch_tokens: 512, ..Default::default() };
        let engine = moe_cluster::embedded(dir, workers, cfg)?;
        for round in 0..3u32 {
            let first = [prefix.as_slice(), &[round * 3 + 1, 2, 3]].concat();
            let second = [prefix.as_slice(), &[round * 3 + 2, 5, 6, 7]].concat();
            // A new prefix per round: the first request always starts cold.
            let shift = |p: &[u32]| p.iter().map(|&t| (t + round * 101) % vocab).collect::<Vec<u32>>();
            first_token(&engine, &shift(&first))?;
            let (t, cached) = first_token(&engine, &shift(&second))?;
            ttft[slot] = ttft[slot].min(t.as_secs_f64() * 1e3);
            if cache {
                cached_tokens = cached;
            }
        }
    }
    Ok(PrefixRun {
        prefix_tokens,
        ttft_off_ms: ttft[0],
        ttft_on_ms: ttft[1],
        speedup: ttft[0] / ttft[1].max(1e-9),
        cached_tokens,
    })
}
