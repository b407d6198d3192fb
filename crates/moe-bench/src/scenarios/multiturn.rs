//! `moe bench`'s multi-turn workload: 8 tenants, each with its own 512-token system prompt and
//! adapter, hold 4 conversations of 4 turns each, all at once; every turn resends the whole
//! conversation (system prompt, earlier user turns and answers, the new user turn), as chat
//! clients do. Measured with the prefix cache off and on: time to first token (p50/p99), tokens
//! per second over the run, and the share of prompt tokens served from the cache.

use crate::Percentiles;
use moe_router::{Engine, EngineConfig, Event, GenerationParams, PromptInput, ValidatedRequest};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

const TENANTS: usize = 8;
const CONVERSATIONS: usize = 4;
const TURNS: usize = 4;
const SYSTEM_TOKENS: usize = 512;
/// The workload runs with a shorter system prompt on a model with a short context, but not
/// shorter than this.
const MIN_SYSTEM_TOKENS: usize = 64;
const USER_TOKENS: usize = 32;
const NEW_TOKENS: u32 = 16;

#[derive(Serialize)]
pub struct MultiTurnRun {
    pub tenants: usize,
    pub conversations_per_tenant: usize,
    pub turns: usize,
    pub system_tokens: usize,
    pub user_tokens: usize,
    pub new_tokens: u32,
    /// Adapter set the tenants use (`attn-i`: attention q/k/v/o + gate), or none.
    pub adapters: Option<String>,
    pub cache_off: MultiTurnSide,
    pub cache_on: MultiTurnSide,
    /// p50 TTFT with the cache off over with it on.
    pub ttft_p50_speedup: f64,
}

#[derive(Serialize)]
pub struct MultiTurnSide {
    pub ttft_ms: Percentiles,
    /// Prompt and generated tokens over the wall time of the whole run.
    pub tokens_per_s: f64,
    pub wall_s: f64,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    /// `cached_tokens / prompt_tokens`.
    pub hit_rate: f64,
}

/// One turn's outcome: time to first token, the answer, prompt and cached token counts.
struct Turn {
    ttft: Duration,
    answer: Vec<u32>,
    prompt_tokens: usize,
    cached_tokens: usize,
}

fn turn(engine: &Engine, tenant: usize, adapters: Option<&str>, prompt: Vec<u32>) -> anyhow::Result<Turn> {
    let params = GenerationParams { max_new_tokens: Some(NEW_TOKENS), ..Default::default() };
    let mut req = ValidatedRequest::new(
        PromptInput::Ids(prompt),
        &params,
        engine.codec(),
        engine.model_config(),
        Duration::from_secs(1800),
    )?;
    req.tenant = Some(format!("tenant-{tenant}"));
    if let Some(set) = adapters {
        let registry = engine.adapters().ok_or_else(|| anyhow::anyhow!("the engine has no adapter registry"))?;
        req.adapter = Some(registry.pin(&format!("{set}-{tenant}"))?);
    }
    let start = Instant::now();
    let (_, mut rx) = engine.submit(req)?;
    let (mut ttft, mut answer) = (None, Vec::new());
    loop {
        match rx.blocking_recv() {
            Some(Event::Delta { token_ids, .. }) => {
                ttft.get_or_insert_with(|| start.elapsed());
                answer.extend(token_ids);
            }
            Some(Event::Finished { prompt_tokens, cached_tokens, .. }) => {
                let ttft = ttft.unwrap_or_else(|| start.elapsed());
                return Ok(Turn { ttft, answer, prompt_tokens, cached_tokens });
            }
            Some(Event::Failed(e)) => anyhow::bail!("multi-turn run: {e}"),
            None => anyhow::bail!("multi-turn run: no terminal event"),
        }
    }
}

/// Deterministic token ids below `vocab` for (tenant, conversation, part).
fn tokens(vocab: u32, n: usize, seed: usize) -> Vec<u32> {
    (0..n as u32).map(|j| (j.wrapping_mul(7919) + seed as u32 * 104_729 + 13) % vocab).collect()
}

/// Every conversation on its own thread, its turns in order; returns each turn.
fn run_all(
    engine: &Engine,
    vocab: u32,
    system_tokens: usize,
    adapters: Option<&str>,
) -> anyhow::Result<(Vec<Turn>, Duration)> {
    let start = Instant::now();
    let turns = std::thread::scope(|s| {
        let handles: Vec<_> = (0..TENANTS * CONVERSATIONS)
            .map(|c| {
                let tenant = c / CONVERSATIONS;
                s.spawn(move || -> anyhow::Result<Vec<Turn>> {
                    let mut conversation = tokens(vocab, system_tokens, 1 + tenant);
                    let mut out = Vec::new();
                    for t in 0..TURNS {
                        conversation.extend(tokens(vocab, USER_TOKENS, 1000 + c * TURNS + t));
                        let done = turn(engine, tenant, adapters, conversation.clone())?;
                        conversation.extend(&done.answer);
                        out.push(done);
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a conversation thread panicked"))?)
            .collect::<anyhow::Result<Vec<Vec<Turn>>>>()
    })?;
    Ok((turns.into_iter().flatten().collect(), start.elapsed()))
}

fn side(turns: &[Turn], wall: Duration) -> MultiTurnSide {
    let prompt_tokens: usize = turns.iter().map(|t| t.prompt_tokens).sum();
    let cached_tokens: usize = turns.iter().map(|t| t.cached_tokens).sum();
    let generated: usize = turns.iter().map(|t| t.answer.len()).sum();
    MultiTurnSide {
        ttft_ms: Percentiles::of(turns.iter().map(|t| t.ttft.as_secs_f64() * 1e3).collect()),
        tokens_per_s: (prompt_tokens + generated) as f64 / wall.as_secs_f64().max(1e-9),
        wall_s: wall.as_secs_f64(),
        prompt_tokens,
        cached_tokens,
        hit_rate: cached_tokens as f64 / prompt_tokens.max(1) as f64,
    }
}

/// Runs the workload on the embedded cluster with the cache off, then on. `adapters` is the
/// directory of the benchmark adapters (tenant i uses `attn-i`), or `None` for the base model.
/// `None` when the model's context is too short for it (the system prompt is shortened to fit,
/// down to [`MIN_SYSTEM_TOKENS`]).
pub fn measure(dir: &Path, workers: usize, adapters: Option<&Path>) -> anyhow::Result<Option<MultiTurnRun>> {
    let config = moe_model::ModelConfig::from_dir(dir)?;
    let turns = TURNS * (USER_TOKENS + NEW_TOKENS as usize);
    let system_tokens = SYSTEM_TOKENS.min(config.max_position_embeddings.saturating_sub(turns));
    if system_tokens < MIN_SYSTEM_TOKENS {
        eprintln!(
            "multi-turn: skipped (it needs a context of at least {} tokens; the model has {})",
            MIN_SYSTEM_TOKENS + turns,
            config.max_position_embeddings
        );
        return Ok(None);
    }
    let opts = moe_cluster::AdapterOptions { dir: adapters.map(Path::to_path_buf), ..Default::default() };
    let set = adapters.map(|_| "attn");
    let mut sides = Vec::new();
    for cache in [false, true] {
        let cfg = EngineConfig { prefix_cache: cache, max_batch_tokens: 512, max_running: 64, ..Default::default() };
        let engine = moe_cluster::embedded_with(dir, workers, cfg, &opts)?;
        eprintln!(
            "multi-turn: {TENANTS} tenants x {CONVERSATIONS} conversations x {TURNS} turns, prefix cache {}",
            if cache { "on" } else { "off" }
        );
        let (turns, wall) = run_all(&engine, config.vocab_size as u32, system_tokens, set)?;
        sides.push(side(&turns, wall));
    }
    let cache_on = sides.pop().ok_or_else(|| anyhow::anyhow!("multi-turn: no run with the cache"))?;
    let cache_off = sides.pop().ok_or_else(|| anyhow::anyhow!("multi-turn: no run without the cache"))?;
    Ok(Some(MultiTurnRun {
        tenants: TENANTS,
        conversations_per_tenant: CONVERSATIONS,
        turns: TURNS,
        system_tokens,
        user_tokens: USER_TOKENS,
        new_tokens: NEW_TOKENS,
        adapters: set.map(|s| format!("{s}-i (attention q/k/v/o + gate), one per tenant")),
        ttft_p50_speedup: cache_off.ttft_ms.median / cache_on.ttft_ms.median.max(1e-9),
        cache_off,
        cache_on,
    }))
}

pub fn print(r: &MultiTurnRun) {
    println!();
    println!(
        "multi-turn chat: {} tenants x {} conversations x {} turns ({}-token system prompt per tenant, {} user tokens and {} new tokens per turn{}):",
        r.tenants,
        r.conversations_per_tenant,
        r.turns,
        r.system_tokens,
        r.user_tokens,
        r.new_tokens,
        if r.adapters.is_some() { ", an attention + gate adapter per tenant" } else { "" }
    );
    println!("{:<14} {:>16} {:>10} {:>10}", "prefix cache", "TTFT ms p50/99", "tokens/s", "hit rate");
    for (name, s) in [("off", &r.cache_off), ("on", &r.cache_on)] {
        println!(
            "{:<14} {:>16} {:>10.0} {:>9.0}%",
            name,
            format!("{:.0}/{:.0}", s.ttft_ms.median, s.ttft_ms.p99),
            s.tokens_per_s,
            100.0 * s.hit_rate
        );
    }
    println!("TTFT p50 {:.1}x lower with the cache", r.ttft_p50_speedup);
}
