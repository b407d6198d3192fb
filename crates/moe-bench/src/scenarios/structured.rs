//! `moe bench`'s structured-output run: decode throughput of 16 concurrent requests on the
//! embedded cluster with half of them under a JSON-schema constraint, against the same 16 with
//! none (alternated, best of three). The schema (an array of at least 1000 integers) cannot end
//! within the run, so both runs generate the same number of tokens.

use moe_constrain::ConstraintSpec;
use moe_router::{Engine, EngineConfig, Event, GenerationParams, PromptInput, ValidatedRequest};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Serialize)]
pub struct StructuredRun {
    pub batch: usize,
    pub constrained: usize,
    pub new_tokens: usize,
    pub free_tokens_per_s: f64,
    pub half_constrained_tokens_per_s: f64,
    pub ratio: f64,
}

const SCHEMA: &str = r#"{"type": "array", "items": {"type": "integer"}, "minItems": 1000}"#;

/// Tokens per second of `batch` requests decoding `new_tokens` each, the first `constrained`
/// of them under [`SCHEMA`].
fn throughput(engine: &Engine, batch: usize, constrained: usize, new_tokens: usize) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut streams = Vec::new();
    for i in 0..batch {
        let params = GenerationParams {
            max_new_tokens: Some(new_tokens as u32),
            constraint: (i < constrained).then(|| ConstraintSpec::JsonSchema(SCHEMA.into())),
            ..Default::default()
        };
        let prompt = PromptInput::Ids(vec![1 + i as u32, 2, 3]);
        let req =
            ValidatedRequest::new(prompt, &params, engine.codec(), engine.model_config(), Duration::from_secs(600))?;
        streams.push(engine.submit(req)?.1);
    }
    let mut tokens = 0usize;
    for mut s in streams {
        loop {
            match s.blocking_recv() {
                Some(Event::Delta { token_ids, .. }) => tokens += token_ids.len(),
                Some(Event::Finished { .. }) => break,
                Some(Event::Failed(e)) => anyhow::bail!("structured run: {e}"),
                None => anyhow::bail!("structured run: no terminal event"),
            }
        }
    }
    Ok(tokens as f64 / start.elapsed().as_secs_f64())
}

/// Batch 16, half constrained vs none; `None` when the model has no tokenizer.
pub fn measure(dir: &Path, workers: usize, new_tokens: usize) -> anyhow::Result<Option<StructuredRun>> {
    if !dir.join("tokenizer.json").is_file() {
        return Ok(None);
    }
    let engine = moe_cluster::embedded(dir, workers, EngineConfig::default())?;
    let (batch, constrained) = (16, 8);
    throughput(&engine, batch, constrained, 4)?; // warm-up (and the tokenizer's trie)
    let (mut free, mut mixed) = (0f64, 0f64);
    for _ in 0..3 {
        free = free.max(throughput(&engine, batch, 0, new_tokens)?);
        mixed = mixed.max(throughput(&engine, batch, constrained, new_tokens)?);
    }
    Ok(Some(StructuredRun {
        batch,
        constrained,
        new_tokens,
        free_tokens_per_s: free,
        half_constrained_tokens_per_s: mixed,
        ratio: mixed / free.max(1e-9),
    }))
}

pub fn print(r: &StructuredRun) {
    println!(
        "structured output, decode batch {} with {} under a JSON schema: {:.0} tok/s vs {:.0} unconstrained = {:.2}x",
        r.batch, r.constrained, r.half_constrained_tokens_per_s, r.free_tokens_per_s, r.ratio
    );
}
