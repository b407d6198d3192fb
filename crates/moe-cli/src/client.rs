//! `moe generate --endpoint URL`: the same flags and output as local generation, answered by a
//! router over gRPC; `--stream` prints text as it arrives.

use crate::generate::GenerateArgs;
use anyhow::Context;
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
    let uri = if endpoint.contains("://") { endpoint.clone() } else { format!("http://{endpoint}") };
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
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(uri.clone())
            .with_context(|| format!("invalid endpoint {endpoint:?}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {uri}"))?;
        let mut client = InferenceClient::new(channel);
        let status = |s: tonic::Status| anyhow::anyhow!("{:?}: {}", s.code(), s.message());
        let mut request = tonic::Request::new(request);
        if let Some(key) = &args.api_key {
            let value = format!("Bearer {key}").parse().context("--api-key has characters a header cannot carry")?;
            request.metadata_mut().insert("authorization", value);
        }
        let (ids, text, reason) = if args.stream {
            let mut stream = client.generate_stream(request).await.map_err(status)?.into_inner();
            let (mut ids, mut text, mut reason) = (Vec::new(), String::new(), 0);
            let mut stdout = std::io::stdout();
            while let Some(msg) = stream.message().await.map_err(status)? {
                match msg.event {
                    Some(Event::Delta(d)) => {
                        if !args.json {
                            print!("{}", d.text);
                            stdout.flush()?;
                        }
                        ids.extend(d.token_ids);
                        text.push_str(&d.text);
                    }
                    Some(Event::Finished(f)) => reason = f.finish_reason,
                    None => {}
                }
            }
            if !args.json {
                println!();
            }
            (ids, text, reason)
        } else {
            let r = client.generate(request).await.map_err(status)?.into_inner();
            (r.token_ids, r.text, r.finish_reason)
        };
        if args.json {
            println!("{}", serde_json::json!({"token_ids": ids, "text": text, "finish_reason": finish_name(reason)}));
        } else if !args.stream {
            println!("{text}");
        }
        Ok(())
    })
}
