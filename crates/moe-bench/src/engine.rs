//! Throughput and latency of an engine (embedded or over remote workers), measured through the
//! same API path requests take.

use crate::Percentiles;
use moe_lora::AdapterPin;
use moe_router::{Engine, Event, GenerationParams, PromptInput, ValidatedRequest};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Serialize)]
pub struct PrefillReport {
    pub prompt_tokens: usize,
    pub tokens_per_s: f64,
    pub ttft_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DecodeReport {
    pub batch: usize,
    pub new_tokens: usize,
    pub tokens_per_s: f64,
    pub ttft_ms: Percentiles,
    pub itl_ms: Percentiles,
    /// Where the engine's steps spent their time during the run.
    pub breakdown: StepBreakdown,
}

/// The engine's steps during a run: how many, their mean length, and the share of their time in
/// each part (the dense part of the layers, the experts, the LM head, and the rest: scheduling,
/// sampling, bookkeeping).
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepBreakdown {
    pub steps: usize,
    pub step_ms: f64,
    pub dense: f64,
    pub experts: f64,
    pub head: f64,
    pub rest: f64,
}

/// Prints where each decode run's steps spent their time.
pub fn print_breakdowns(name: &str, runs: &[DecodeReport]) {
    println!("  where a decode step's time goes ({name}):");
    for d in runs {
        let b = &d.breakdown;
        println!(
            "    batch {:>3}: {:>6.2} ms/step: dense layers {:>4.1}%, experts {:>4.1}%, LM head {:>4.1}%, scheduling + sampling {:>4.1}%",
            d.batch,
            b.step_ms,
            100.0 * b.dense,
            100.0 * b.experts,
            100.0 * b.head,
            100.0 * b.rest
        );
    }
}

/// The engine's step counters (steps, step, dense, experts, head ns).
fn step_counters(engine: &Engine) -> [u64; 5] {
    let st = engine.stats();
    let l = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    [
        st.steps.load(std::sync::atomic::Ordering::Relaxed) as u64,
        l(&st.step_ns),
        l(&st.dense_ns),
        l(&st.experts_ns),
        l(&st.head_ns),
    ]
}

impl StepBreakdown {
    fn between(before: [u64; 5], after: [u64; 5]) -> Self {
        let d: Vec<f64> = after.iter().zip(before).map(|(a, b)| a.saturating_sub(b) as f64).collect();
        let total = d[1].max(1.0);
        Self {
            steps: d[0] as usize,
            step_ms: d[1] / d[0].max(1.0) / 1e6,
            dense: d[2] / total,
            experts: d[3] / total,
            head: d[4] / total,
            rest: (total - d[2] - d[3] - d[4]).max(0.0) / total,
        }
    }
}

/// The adapter of request `i` of a run (`None`: the base model).
pub type AdapterOf<'a> = &'a dyn Fn(usize) -> Option<AdapterPin>;

fn request(engine: &Engine, prompt: Vec<u32>, max_new: usize) -> Result<ValidatedRequest, String> {
    let params = GenerationParams { max_new_tokens: Some(max_new as u32), ..Default::default() };
    ValidatedRequest::new(
        PromptInput::Ids(prompt),
        &params,
        engine.codec(),
        engine.model_config(),
        Duration::from_secs(600),
    )
    .map_err(|e| e.to_string())
}

/// Runs `batch` requests at once; returns, per request, the arrival time of each token.
fn run(
    engine: &Engine,
    prompts: Vec<Vec<u32>>,
    max_new: usize,
    adapter_of: AdapterOf<'_>,
) -> Result<(Instant, Vec<Vec<Instant>>), String> {
    let start = Instant::now();
    let mut streams = Vec::new();
    for (i, p) in prompts.into_iter().enumerate() {
        let mut req = request(engine, p, max_new)?;
        req.adapter = adapter_of(i);
        let (_, rx) = engine.submit(req).map_err(|e| e.to_string())?;
        streams.push(rx);
    }
    // Wait on every stream at once, parked until an event arrives: polling them in a loop
    // would wake this thread every few microseconds and take CPU time from the engine's
    // threads (on a 2-core machine, measurably).
    let drain = streams.into_iter().map(|mut s| async move {
        let mut at = Vec::new();
        while let Some(ev) = s.recv().await {
            match ev {
                Event::Delta { token_ids, .. } => {
                    let now = Instant::now();
                    at.extend(token_ids.iter().map(|_| now));
                }
                Event::Finished { .. } => break,
                Event::Failed(e) => return Err(e.to_string()),
            }
        }
        Ok(at)
    });
    let times = futures::executor::block_on(futures::future::try_join_all(drain))?;
    Ok((start, times))
}

fn prompt(len: usize, seed: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|i| ((seed * 7919 + i * 104729) % vocab.max(1)) as u32).collect()
}

/// Prefill of one prompt of `len` tokens (time to its first token).
pub fn prefill(engine: &Engine, len: usize) -> Result<PrefillReport, String> {
    let vocab = engine.model_config().vocab_size;
    let (start, times) = run(engine, vec![prompt(len, 1, vocab)], 1, &|_| None)?;
    let ttft = times[0].first().map(|t| t.duration_since(start)).unwrap_or_default().as_secs_f64();
    Ok(PrefillReport { prompt_tokens: len, tokens_per_s: len as f64 / ttft.max(1e-9), ttft_ms: ttft * 1e3 })
}

/// `batch` concurrent requests with 16-token prompts, each generating `new_tokens`; throughput
/// counts tokens after each request's first, over the span from the first first-token to the
/// last token.
pub fn decode(engine: &Engine, batch: usize, new_tokens: usize) -> Result<DecodeReport, String> {
    decode_with(engine, batch, new_tokens, &|_| None)
}

/// [`decode`] with request `i` running with `adapter_of(i)`.
pub fn decode_with(
    engine: &Engine,
    batch: usize,
    new_tokens: usize,
    adapter_of: AdapterOf<'_>,
) -> Result<DecodeReport, String> {
    let vocab = engine.model_config().vocab_size;
    let prompts = (0..batch).map(|i| prompt(16, i + 2, vocab)).collect();
    let before = step_counters(engine);
    let (start, times) = run(engine, prompts, new_tokens, adapter_of)?;
    let breakdown = StepBreakdown::between(before, step_counters(engine));
    let firsts: Vec<Instant> = times.iter().filter_map(|t| t.first().copied()).collect();
    let span_start = firsts.iter().min().copied().unwrap_or(start);
    let span_end = times.iter().filter_map(|t| t.last().copied()).max().unwrap_or(start);
    let decoded: usize = times.iter().map(|t| t.len().saturating_sub(1)).sum();
    let ttft = firsts.iter().map(|t| t.duration_since(start).as_secs_f64() * 1e3).collect();
    let itl = times.iter().flat_map(|t| t.windows(2).map(|w| w[1].duration_since(w[0]).as_secs_f64() * 1e3)).collect();
    Ok(DecodeReport {
        batch,
        new_tokens,
        tokens_per_s: decoded as f64 / span_end.duration_since(span_start).as_secs_f64().max(1e-9),
        ttft_ms: Percentiles::of(ttft),
        itl_ms: Percentiles::of(itl),
        breakdown,
    })
}
