//! `moe generate`: one prompt in, its continuation out (text, or JSON with the token ids).

use crate::model_args::{parse_token_ids, AdapterArgs, ModelArgs, TokenIds};
use anyhow::Context;
use clap::Args;
use moe_generate::{GenerateRequest, Generator, SamplingParams, TextCodec};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub adapter: AdapterArgs,
    /// Prompt text (needs tokenizer.json in the model directory).
    #[arg(long, env = "MOE_PROMPT", conflicts_with = "token_ids", required_unless_present = "token_ids")]
    pub prompt: Option<String>,
    /// Prompt token ids, comma separated.
    #[arg(long, env = "MOE_TOKEN_IDS", value_parser = parse_token_ids)]
    pub token_ids: Option<TokenIds>,
    #[arg(long, env = "MOE_MAX_NEW_TOKENS", default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, env = "MOE_TEMPERATURE", default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: no limit).
    #[arg(long, env = "MOE_TOP_K", default_value_t = 0)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p.
    #[arg(long, env = "MOE_TOP_P", default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, env = "MOE_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object: token_ids, text, finish_reason.
    #[arg(long, env = "MOE_JSON")]
    pub json: bool,
    /// Print prefill and decode speed to stderr.
    #[arg(long, env = "MOE_STATS")]
    pub stats: bool,
    /// Send the request to a running router (`moe serve` or `moe router`), e.g. http://127.0.0.1:50051.
    #[arg(long, env = "MOE_ENDPOINT")]
    pub endpoint: Option<String>,
    /// With --endpoint: the tenant API key, sent as `authorization: Bearer KEY`.
    #[arg(long, env = "MOE_API_KEY", requires = "endpoint", hide_env_values = true)]
    pub api_key: Option<String>,
    /// With --endpoint: print tokens as they arrive.
    #[arg(long, env = "MOE_STREAM", requires = "endpoint")]
    pub stream: bool,
    /// With --endpoint: stop when the text contains this (repeatable).
    #[arg(long, requires = "endpoint")]
    pub stop: Vec<String>,
    /// With --endpoint: penalty on tokens already present (1 = none).
    #[arg(long, env = "MOE_REPETITION_PENALTY", requires = "endpoint")]
    pub repetition_penalty: Option<f32>,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if args.endpoint.is_some() {
        return crate::client::run(args);
    }
    let (dir, model) = args.model.load()?;
    let codec = TextCodec::from_dir(&dir)?;
    let prompt = match (&args.prompt, &args.token_ids) {
        (Some(text), _) => codec.encode(text).context("encoding the prompt")?,
        (None, Some(ids)) => ids.0.clone(),
        (None, None) => anyhow::bail!("give --prompt or --token-ids"),
    };
    let sampling =
        SamplingParams { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed };
    let max_tokens = (prompt.len() + args.max_new_tokens).min(model.config.max_position_embeddings);
    let req = GenerateRequest {
        prompt,
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop_ids: model.config.eos_token_ids.clone(),
    };
    let adapter = args.adapter.load(&dir, &model)?;
    let mut generator = Generator::new(&model, max_tokens)?.with_adapter(adapter.as_ref());
    let out = generator.generate(&req)?;
    let text = codec.decode(&out.token_ids);
    if args.stats {
        let prefill = req.prompt.len() as f64 / out.prefill_time.as_secs_f64().max(1e-9);
        let decoded = out.token_ids.len().saturating_sub(1);
        let decode = decoded as f64 / out.decode_time.as_secs_f64().max(1e-9);
        eprintln!(
            "prompt {} tokens, prefill {:.1} tok/s; generated {} tokens, decode {:.1} tok/s ({})",
            req.prompt.len(),
            prefill,
            out.token_ids.len(),
            decode,
            model.backend_name()
        );
    }
    if args.json {
        let v =
            serde_json::json!({"token_ids": out.token_ids, "text": text, "finish_reason": out.finish_reason.as_str()});
        println!("{v}");
    } else {
        println!("{text}");
    }
    Ok(())
}
