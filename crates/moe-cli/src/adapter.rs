//! `moe adapter inspect`: what a PEFT adapter targets on a base model (modules, layers, ranks,
//! scales, experts, bytes, and where each pair is applied: on the router or on the workers that
//! host the experts), or the precise reason it cannot be served, with a non-zero exit.

use crate::model_args::ModelArgs;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct AdapterArgs {
    #[command(subcommand)]
    pub command: AdapterCommand,
}

#[derive(Subcommand, Debug)]
pub enum AdapterCommand {
    /// Print what the adapter in DIR adapts on the base model, or why it cannot be served.
    Inspect {
        /// The adapter directory (adapter_config.json + adapter_model.safetensors).
        dir: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
        /// One JSON object instead of a table.
        #[arg(long, env = "MOE_JSON")]
        json: bool,
    },
}

pub fn run(a: AdapterArgs) -> anyhow::Result<()> {
    let AdapterCommand::Inspect { dir, model, json } = a.command;
    println!("{}", moe_cluster::local::describe_adapter(&dir, &model.dir()?, json)?);
    Ok(())
}
