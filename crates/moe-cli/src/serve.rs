//! `moe serve`: the embedded cluster (a router and N in-process workers in one process) serving
//! the Inference API.

use crate::api::{bind_all, serve_all, HttpArgs};
use crate::engine_args::{run_until_signal, AdapterServeArgs, EngineArgs, GRACE};
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
    #[command(flatten)]
    pub http: HttpArgs,
}

pub fn run(mut a: ServeArgs, device: moe_compute::Device) -> anyhow::Result<()> {
    let dir = a.model.dir()?;
    a.adapters.resolve_demo_tenants(a.model.demo, &dir);
    let mut options = a.adapters.options()?;
    if options.dir.is_none() && dir.join("adapters").is_dir() {
        // The model's own adapters (the demo model ships three: prose, code, attn).
        options.dir = Some(dir.join("adapters"));
    }
    let engine = moe_cluster::embedded_on(device, &dir, a.workers, a.engine.config()?, &options)
        .map_err(|e| anyhow::anyhow!("--device {device}: {e}"))?;
    let engine = a.adapters.with_tenants(engine)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let listeners = bind_all(&a.listen, &a.http, "serve").await?;
        let cluster = Arc::new(StaticCluster(a.workers));
        run_until_signal(|stop| serve_all(engine, cluster, None, &dir, &a.http, listeners, stop), GRACE).await
    })
}
