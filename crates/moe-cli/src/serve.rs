//! `moe serve`: the embedded cluster (a router and N in-process workers in one process) serving
//! the Inference API.

use crate::engine_args::{bind, run_until_signal, AdapterServeArgs, EngineArgs, GRACE};
use crate::model_args::ModelArgs;
use clap::Args;
use moe_router::StaticCluster;
use std::sync::Arc;

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
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let dir = a.model.dir()?;
    let mut options = a.adapters.options()?;
    if options.dir.is_none() && dir.join("adapters").is_dir() {
        // The model's own adapters (the demo model ships three).
        options.dir = Some(dir.join("adapters"));
    }
    let engine = moe_cluster::embedded_with(&dir, a.workers, a.engine.config()?, &options)?;
    let engine = a.adapters.with_tenants(engine)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let listener = bind(&a.listen, "serve").await?;
        let workers = a.workers;
        run_until_signal(
            |stop| moe_router::serve_inference(engine, Arc::new(StaticCluster(workers)), None, listener, stop),
            GRACE,
        )
        .await
    })
}
