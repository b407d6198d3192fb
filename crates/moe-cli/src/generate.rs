//! `moe generate`: one prompt in, its continuation out (text, or JSON with the token ids).

use crate::model_args::{parse_token_ids, AdapterArgs, ModelArgs, TokenIds};
use clap::Args;

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
    pub fn constraint(&self) -> anyhow::Result<Option<moe_cluster::ConstraintSpec>> {
        use anyhow::Context;
        use moe_cluster::ConstraintSpec as S;
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

/// Local generation (`--endpoint` goes through `crate::client` instead).
pub fn run(args: GenerateArgs, device: moe_cluster::Device) -> anyhow::Result<()> {
    let dir = args.model.dir()?;
    let request = moe_cluster::local::LocalRequest {
        prompt: args.prompt.clone(),
        token_ids: args.token_ids.as_ref().map(|t| t.0.clone()),
        adapter: args.adapter.locate(&dir)?,
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        stop: args.stop.clone(),
        repetition_penalty: args.repetition_penalty,
        constraint: args.constraint()?,
    };
    let out = moe_cluster::local::generate_local(device, &dir, &request)?;
    if args.stats {
        eprintln!("{}", out.stats);
    }
    if args.json {
        let v = serde_json::json!({"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason});
        println!("{v}");
    } else {
        println!("{}", out.text);
    }
    Ok(())
}
