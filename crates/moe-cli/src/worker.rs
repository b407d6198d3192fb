//! `moe worker`: hosts a set of experts and serves them over gRPC.

use crate::engine_args::{bind, run_until_signal, GRACE};
use anyhow::Context;
use clap::Args;
use moe_worker::{ExpertHost, ExpertSpec};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[arg(long, env = "MOE_MODEL")]
    pub model: PathBuf,
    /// `all`, `shard:I/N`, or a list like `0:0-3,1:4,*:7` (layer:experts).
    #[arg(long, env = "MOE_EXPERTS", default_value = "all")]
    pub experts: String,
    #[arg(long, env = "MOE_LISTEN", default_value = "127.0.0.1:50061")]
    pub listen: String,
    /// Name reported by Describe (default: the listen address).
    #[arg(long, env = "MOE_WORKER_ID")]
    pub worker_id: Option<String>,
}

pub fn run(a: WorkerArgs) -> anyhow::Result<()> {
    let spec: ExpertSpec = a.experts.parse()?;
    let host = Arc::new(
        ExpertHost::load(&a.model, &spec).with_context(|| format!("loading experts from {}", a.model.display()))?,
    );
    let hosted: usize = host.hosted().iter().map(|(_, e)| e.len()).sum();
    anyhow::ensure!(hosted > 0, "the expert spec {:?} selects no experts of this model", a.experts);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let listener = bind(&a.listen, "worker").await?;
        let id =
            a.worker_id.clone().unwrap_or_else(|| listener.local_addr().map(|x| x.to_string()).unwrap_or_default());
        tracing::info!(worker = %id, hosted, "serving experts");
        run_until_signal(|stop| moe_worker::serve_worker(host, id, listener, stop), GRACE).await
    })
}
