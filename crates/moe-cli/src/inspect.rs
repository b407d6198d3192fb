//! `moe inspect`: what a model needs, from its config.json alone (no weights read): parameters,
//! those a token activates, bf16 bytes split between the router and the workers, and the KV
//! cache per token; or why this build cannot serve it.

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// A model directory or a config.json file.
    #[arg(long, env = "MOE_MODEL")]
    pub model: PathBuf,
    /// Print JSON instead of a line of text.
    #[arg(long, env = "MOE_JSON")]
    pub json: bool,
}

pub fn run(a: InspectArgs) -> anyhow::Result<()> {
    println!("{}", moe_cluster::local::describe_model(&a.model, a.json)?);
    Ok(())
}
