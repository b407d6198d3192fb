//! `moe logits`: the full, un-sampled logits of every prompt position, as JSON.

use crate::model_args::{parse_token_ids, AdapterArgs, ModelArgs, TokenIds};
use anyhow::Context;
use clap::Args;
use moe_compute::{on_device, Backend, Device, OnBackend};
use moe_generate::PromptLogits;
use moe_model::Model;
use std::io::Write;
use std::path::Path;

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub adapter: AdapterArgs,
    /// Prompt token ids, comma separated.
    #[arg(long, env = "MOE_TOKEN_IDS", value_parser = parse_token_ids)]
    pub token_ids: TokenIds,
    /// Print JSON (the only output format; accepted for clarity).
    #[arg(long, env = "MOE_JSON")]
    pub json: bool,
}

/// Every prompt position's logits (`vocab_size` each), on the device's backend.
struct LogitsOnDevice<'a>(&'a Path, &'a LogitsArgs);

impl OnBackend for LogitsOnDevice<'_> {
    type Output = anyhow::Result<(usize, Vec<f32>)>;
    fn run<B: Backend>(self, backend: B) -> Self::Output {
        let LogitsOnDevice(dir, args) = self;
        let model = Model::load(dir, backend).with_context(|| format!("loading model from {}", dir.display()))?;
        let adapter = args.adapter.load(dir, &model)?;
        let mut generator = PromptLogits::new(&model, args.token_ids.0.len())?.with_adapter(adapter.as_ref());
        Ok((model.config.vocab_size, generator.prompt_logits(&args.token_ids.0)?))
    }
}

pub fn run(args: LogitsArgs, device: Device) -> anyhow::Result<()> {
    let dir = args.model.dir()?;
    let (vocab, logits) =
        on_device(device, LogitsOnDevice(&dir, &args)).map_err(|e| anyhow::anyhow!("--device {device}: {e}"))??;
    let rows: Vec<&[f32]> = logits.chunks(vocab).collect();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer(&mut out, &serde_json::json!({ "logits": rows }))?;
    writeln!(out)?;
    Ok(())
}
