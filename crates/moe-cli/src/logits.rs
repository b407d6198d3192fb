//! `moe logits`: the full, un-sampled logits of every prompt position, as JSON.

use crate::model_args::{parse_token_ids, AdapterArgs, ModelArgs, TokenIds};
use clap::Args;
use std::io::Write;

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

pub fn run(args: LogitsArgs, device: moe_cluster::Device) -> anyhow::Result<()> {
    let dir = args.model.dir()?;
    let adapter = args.adapter.locate(&dir)?;
    let (vocab, logits) = moe_cluster::local::prompt_logits(device, &dir, adapter.as_ref(), &args.token_ids.0)?;
    let rows: Vec<&[f32]> = logits.chunks(vocab).collect();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer(&mut out, &serde_json::json!({ "logits": rows }))?;
    writeln!(out)?;
    Ok(())
}
