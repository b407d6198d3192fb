//! `moe generate --endpoint URL[,URL…]`: the same flags and output as local generation, answered
//! by a router over gRPC; `--stream` prints text as it arrives. When a router fails or a stream
//! breaks, the request goes to the next endpoint; a stream resumes there after the tokens it
//! already printed, so the answer reads as one.

use crate::generate::GenerateArgs;
use anyhow::Context;
use moe_proto::resume::ResumeState;
use moe_proto::v1::generate_request::Prompt;
use moe_proto::v1::generate_stream_response::Event;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{FinishReason, GenerateRequest, SamplingParams, TokenIds};
use std::io::Write;

fn finish_name(code: i32) -> &'static str {
    match FinishReason::try_from(code) {
        Ok(FinishReason::Stop) => "stop",
        Ok(FinishReason::Length) => "length",
        _ => "unknown",
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let endpoint = args.endpoint.clone().unwrap_or_default();
    let prompt = match (&args.prompt, &args.token_ids) {
        (Some(t), _) => Prompt::Text(t.clone()),
        (None, Some(ids)) => Prompt::TokenIds(TokenIds { ids: ids.0.clone() }),
        (None, None) => anyhow::bail!("give --prompt or --token-ids"),
    };
    let request = GenerateRequest {
        prompt: Some(prompt),
        sampling: Some(SamplingParams {
            max_new_tokens: Some(u32::try_from(args.max_new_tokens).context("--max-new-tokens is too large")?),
            temperature: Some(args.temperature),
            top_k: Some(i32::try_from(args.top_k).context("--top-k is too large")?),
            top_p: Some(args.top_p),
            seed: Some(args.seed),
            stop: args.stop.clone(),
            repetition_penalty: args.repetition_penalty,
            logprobs: false,
        }),
        adapter_id: args.adapter.adapter.clone().unwrap_or_default(),
        timeout_ms: 0,
        cache_salt: String::new(),
        priority: 0,
        resume: None,
        constraint: args.constraint()?.map(moe_cluster::constraint_to_proto),
    };
    let endpoints: Vec<String> =
        endpoint.split(',').map(str::trim).filter(|e| !e.is_empty()).map(String::from).collect();
    anyhow::ensure!(!endpoints.is_empty(), "--endpoint is empty");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut out = Output::default();
        let mut state = ResumeState::default();
        // Each endpoint twice, in turn, before giving up.
        let attempts = 2 * endpoints.len();
        for attempt in 0..attempts {
            let endpoint = &endpoints[attempt % endpoints.len()];
            let result = if args.stream {
                stream_once(endpoint, &args, state.request(&request), &mut state, &mut out).await
            } else {
                unary_once(endpoint, &args, request.clone(), &mut out).await
            };
            match result {
                Ok(()) if !args.stream || state.finished => break,
                Ok(()) => eprintln!("the stream from {endpoint} ended without finishing"),
                Err(e) if e.retryable && attempt + 1 < attempts => eprintln!("{endpoint}: {}", e.error),
                Err(e) => return Err(e.error),
            }
            if attempt + 1 == attempts {
                anyhow::bail!("no endpoint finished the request ({attempts} attempts)");
            }
            let next = &endpoints[(attempt + 1) % endpoints.len()];
            if args.stream && !state.generated.is_empty() {
                eprintln!("resuming on {next} after {} tokens", state.generated.len());
            } else {
                eprintln!("retrying on {next}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        if args.stream && !args.json {
            println!();
        }
        if args.json {
            let ids = if args.stream { &state.generated } else { &out.ids };
            println!(
                "{}",
                serde_json::json!({"token_ids": ids, "text": out.text, "finish_reason": finish_name(out.reason)})
            );
        } else if !args.stream {
            println!("{}", out.text);
        }
        Ok(())
    })
}

/// What the answer was, over every attempt.
#[derive(Default)]
struct Output {
    ids: Vec<u32>,
    text: String,
    reason: i32,
}

/// A failed attempt, and whether another router could do better.
struct Failure {
    error: anyhow::Error,
    retryable: bool,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        // A router that went away is worth another try; a request it refused is not.
        let retryable = moe_bench::scenarios::loadgen::router_gone(&s);
        Self { error: anyhow::anyhow!("{:?}: {}", s.code(), s.message()), retryable }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self { error, retryable: false }
    }
}

async fn connect(endpoint: &str) -> Result<InferenceClient<tonic::transport::Channel>, Failure> {
    let uri = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
    let channel = tonic::transport::Endpoint::from_shared(uri.clone())
        .with_context(|| format!("invalid endpoint {endpoint:?}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| Failure { error: anyhow::anyhow!("cannot connect to {uri}: {e}"), retryable: true })?;
    Ok(InferenceClient::new(channel))
}

fn with_key(args: &GenerateArgs, request: GenerateRequest) -> Result<tonic::Request<GenerateRequest>, Failure> {
    let mut request = tonic::Request::new(request);
    if let Some(key) = &args.api_key {
        let value = format!("Bearer {key}").parse().context("--api-key has characters a header cannot carry")?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}

/// One streaming attempt: prints and records deltas until the stream ends or breaks.
async fn stream_once(
    endpoint: &str,
    args: &GenerateArgs,
    request: GenerateRequest,
    state: &mut ResumeState,
    out: &mut Output,
) -> Result<(), Failure> {
    let mut client = connect(endpoint).await?;
    let mut stream = client.generate_stream(with_key(args, request)?).await?.into_inner();
    let mut stdout = std::io::stdout();
    while let Some(msg) = stream.message().await? {
        state.observe(&msg);
        match msg.event {
            Some(Event::Delta(d)) => {
                if !args.json {
                    print!("{}", d.text);
                    stdout.flush().context("stdout")?;
                }
                out.text.push_str(&d.text);
            }
            Some(Event::Finished(f)) => out.reason = f.finish_reason,
            None => {}
        }
    }
    Ok(())
}

async fn unary_once(
    endpoint: &str,
    args: &GenerateArgs,
    request: GenerateRequest,
    out: &mut Output,
) -> Result<(), Failure> {
    let mut client = connect(endpoint).await?;
    let r = client.generate(with_key(args, request)?).await?.into_inner();
    *out = Output { ids: r.token_ids, text: r.text, reason: r.finish_reason };
    Ok(())
}
