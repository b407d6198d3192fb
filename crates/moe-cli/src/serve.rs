//! `moe serve`: the embedded cluster (a router and N in-process workers in one process) serving
//! the Inference API.

use crate::api::HttpArgs;
use crate::engine_args::{AdapterServeArgs, EngineArgs};
use crate::model_args::ModelArgs;
use clap::Args;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// In-process expert workers; worker i hosts experts e with e mod N = i.
    #[arg(long, env = "MOE_WORKERS", default_value_t = 2)]
    pub workers: usize,
    #[arg(long, env = "MOE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub adapters: AdapterServeArgs,
    #[command(flatten)]
    pub http: HttpArgs,
}

pub fn run(mut a: ServeArgs, device: moe_cluster::Device) -> anyhow::Result<()> {
    let dir = a.model.dir()?;
    a.adapters.resolve_demo_tenants(a.model.demo, &dir);
    let mut options = a.adapters.options()?;
    if options.dir.is_none() && dir.join("adapters").is_dir() {
        // The model's own adapters (the demo model ships three: prose, code, attn).
        options.dir = Some(dir.join("adapters"));
    }
    let process = moe_cluster::EmbeddedProcess {
        model: dir,
        workers: a.workers,
        listen: a.listen,
        engine: a.engine.config()?,
        adapters: options,
        tenants: a.adapters.tenants.clone(),
        apis: a.http.apis(),
    };
    Ok(moe_cluster::run_embedded(process, device)?)
}
