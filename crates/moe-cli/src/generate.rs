//! `moe generate`: one prompt in, its continuation out (text, or JSON with the token ids).

use crate::model_args::{parse_token_ids, AdapterArgs, ModelArgs, TokenIds};
use anyhow::Context;
use clap::Args;
use moe_cluster::AdapterOptions;
use moe_generate::TextCodec;
use moe_model::ModelConfig;
use moe_router::{EngineConfig, Event, FinishReason, GenerationParams, PromptInput, ValidatedRequest};
use std::path::Path;
use std::time::{Duration, Instant};

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
    /// Several, comma-separated: when a router fails or a stream breaks, the request goes to the
    /// next one (a stream resumes there after the tokens already printed).
    #[arg(long, env = "MOE_ENDPOINT")]
    pub endpoint: Option<String>,
    /// With --endpoint: the tenant API key, sent as `authorization: Bearer KEY`.
    #[arg(long, env = "MOE_API_KEY", requires = "endpoint", hide_env_values = true)]
    pub api_key: Option<String>,
    /// With --endpoint: print tokens as they arrive.
    #[arg(long, env = "MOE_STREAM", requires = "endpoint")]
    pub stream: bool,
    /// Stop when the text contains this (repeatable); the text ends before it.
    #[arg(long, env = "MOE_STOP")]
    pub stop: Vec<String>,
    /// Penalty on tokens already present, as transformers applies it (1 = none).
    #[arg(long, env = "MOE_REPETITION_PENALTY")]
    pub repetition_penalty: Option<f32>,
    /// The output is JSON valid against this schema (its text, or @FILE).
    #[arg(long, env = "MOE_JSON_SCHEMA", group = "constraint")]
    pub json_schema: Option<String>,
    /// The output is a JSON object.
    #[arg(long, env = "MOE_JSON_OBJECT", group = "constraint")]
    pub json_object: bool,
    /// The whole output matches this regular expression.
    #[arg(long, env = "MOE_REGEX", group = "constraint")]
    pub regex: Option<String>,
    /// The output follows this Lark grammar (its text, or @FILE).
    #[arg(long, env = "MOE_GRAMMAR", group = "constraint")]
    pub grammar: Option<String>,
}

impl GenerateArgs {
    /// The output constraint the flags ask for.
    pub fn constraint(&self) -> anyhow::Result<Option<moe_constrain::ConstraintSpec>> {
        use anyhow::Context;
        use moe_constrain::ConstraintSpec as S;
        let text = |v: &str| -> anyhow::Result<String> {
            match v.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}")),
                None => Ok(v.to_string()),
            }
        };
        Ok(if let Some(s) = &self.json_schema {
            Some(S::JsonSchema(text(s)?))
        } else if self.json_object {
            Some(S::JsonObject)
        } else if let Some(r) = &self.regex {
            Some(S::Regex(r.clone()))
        } else if let Some(g) = &self.grammar {
            Some(S::Lark(text(g)?))
        } else {
            None
        })
    }
}

pub fn run(args: GenerateArgs, device: moe_compute::Device) -> anyhow::Result<()> {
    if args.endpoint.is_some() {
        return crate::client::run(args);
    }
    let dir = args.model.dir()?;
    let config = ModelConfig::from_dir(&dir)?;
    // The adapter is served by the engine's registry: its parent dir is the adapter dir.
    let located = args.adapter.locate(&dir)?;
    let (adapters, adapter_id) = match &located {
        None => (AdapterOptions::default(), String::new()),
        Some((adapter_dir, id)) => {
            let root = adapter_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let opts = AdapterOptions { dir: Some(root.to_path_buf()), ..Default::default() };
            (opts, id.clone())
        }
    };
    let codec = TextCodec::from_dir(&dir)?;
    let prompt = match (&args.prompt, &args.token_ids) {
        (Some(text), _) => codec.encode(text).context("encoding the prompt")?,
        (None, Some(ids)) => ids.0.clone(),
        (None, None) => anyhow::bail!("give --prompt or --token-ids"),
    };
    // One sequence: a KV cache for it alone, and the whole prompt in one prefill chunk.
    let room = config.max_position_embeddings.saturating_sub(prompt.len());
    let max_new = args.max_new_tokens.min(room);
    let page_size = 16;
    let page_bytes = 4 * config.num_layers * page_size * config.kv_values_per_token_layer();
    let engine_config = EngineConfig {
        max_batch_tokens: prompt.len().max(1),
        max_running: 1,
        max_waiting: 1,
        kv_cache_bytes: (prompt.len() + max_new).div_ceil(page_size).max(1) * page_bytes,
        page_size,
        ..Default::default()
    };
    let engine = moe_cluster::local_engine(device, &dir, engine_config, &adapters)
        .map_err(|e| anyhow::anyhow!("--device {device}: {e}"))?;
    let params = GenerationParams {
        max_new_tokens: Some(max_new as u32),
        temperature: Some(args.temperature),
        top_k: Some(args.top_k.min(i32::MAX as usize) as i32),
        top_p: Some(args.top_p),
        seed: Some(args.seed),
        stop: args.stop.clone(),
        repetition_penalty: args.repetition_penalty,
        constraint: args.constraint()?,
        ..Default::default()
    };
    let mut req = ValidatedRequest::new(
        PromptInput::Ids(prompt),
        &params,
        engine.codec(),
        &config,
        Duration::from_secs(24 * 3600),
    )?;
    if !adapter_id.is_empty() {
        let registry = engine.adapters().context("the engine serves no adapters")?;
        req.adapter = Some(registry.pin(&adapter_id).with_context(|| format!("loading adapter {adapter_id:?}"))?);
    }
    let prompt_len = req.prompt.len();
    let started = Instant::now();
    let (_, mut events) = engine.submit(req)?;
    let (mut ids, mut text, mut first_token) = (Vec::new(), String::new(), None);
    let finish = loop {
        match events.blocking_recv() {
            Some(Event::Delta { text: t, token_ids, .. }) => {
                first_token.get_or_insert_with(Instant::now);
                ids.extend(token_ids);
                text.push_str(&t);
            }
            Some(Event::Finished { reason, .. }) => break reason,
            Some(Event::Failed(e)) => return Err(e.into()),
            None => anyhow::bail!("the engine stopped without finishing the request"),
        }
    };
    if args.stats {
        let first = first_token.unwrap_or_else(Instant::now);
        let prefill = prompt_len as f64 / (first - started).as_secs_f64().max(1e-9);
        let decode = ids.len().saturating_sub(1) as f64 / first.elapsed().as_secs_f64().max(1e-9);
        eprintln!(
            "prompt {prompt_len} tokens, prefill {prefill:.1} tok/s; generated {} tokens, decode {decode:.1} tok/s ({})",
            ids.len(),
            engine.backend_name()
        );
    }
    let finish_reason = match finish {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    };
    if args.json {
        println!("{}", serde_json::json!({"token_ids": ids, "text": text, "finish_reason": finish_reason}));
    } else {
        println!("{text}");
    }
    Ok(())
}
