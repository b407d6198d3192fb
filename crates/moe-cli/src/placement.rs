//! `moe placement load|plan`: what a router saw (tokens per expert per adapter over the last
//! minute, from its `ExpertLoad` RPC) and what the planner (`moe-placement`) proposes for the
//! workers as they are (from each worker's `Describe`): replicas of hot experts on the least
//! loaded workers within `--capacity`, with the balance per layer before and after.

use anyhow::Context;
use clap::{Args, Subcommand};
use moe_placement::{Cluster, Plan, Step, WorkerSlots};
use moe_proto::v1::expert_worker_client::ExpertWorkerClient;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{DescribeRequest, ExpertLoadRequest, ExpertLoadResponse};

#[derive(Args, Debug)]
pub struct PlacementArgs {
    #[command(subcommand)]
    pub command: PlacementCommand,
}

#[derive(Subcommand, Debug)]
pub enum PlacementCommand {
    /// Print the router's expert load per adapter (the last minute).
    Load(LoadArgs),
    /// Propose replicas and moves for the workers from the router's load.
    Plan(PlanArgs),
}

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// The router (host:port).
    #[arg(long, env = "MOE_ENDPOINT")]
    pub endpoint: String,
    /// An admin key, when the router has tenants.
    #[arg(long, env = "MOE_API_KEY")]
    pub api_key: Option<String>,
    /// Print JSON.
    #[arg(long, env = "MOE_JSON")]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// The workers (host:port, comma separated).
    #[arg(long, env = "MOE_WORKERS", value_delimiter = ',', required = true)]
    pub workers: Vec<String>,
    /// Experts (all layers together) each worker may hold.
    #[arg(long, env = "MOE_PLACEMENT_CAPACITY")]
    pub capacity: usize,
    /// Stop once every layer's balance (mean / max load over workers) reaches this.
    #[arg(long, env = "MOE_PLACEMENT_TARGET", default_value_t = 0.9)]
    pub target: f64,
    /// Steps at most.
    #[arg(long, env = "MOE_PLACEMENT_MAX_STEPS", default_value_t = 64)]
    pub max_steps: usize,
}

fn uri(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

async fn expert_load(a: &LoadArgs) -> anyhow::Result<ExpertLoadResponse> {
    let mut client =
        InferenceClient::connect(uri(&a.endpoint)).await.with_context(|| format!("connecting to {}", a.endpoint))?;
    let mut request = tonic::Request::new(ExpertLoadRequest {});
    if let Some(key) = &a.api_key {
        let value = format!("Bearer {key}").parse().context("--api-key has characters a header cannot carry")?;
        request.metadata_mut().insert("authorization", value);
    }
    let load = client.expert_load(request).await.map_err(|s| anyhow::anyhow!("ExpertLoad: {}", s.message()))?;
    Ok(load.into_inner())
}

async fn describe(addr: &str, capacity: usize) -> anyhow::Result<WorkerSlots> {
    let mut client = ExpertWorkerClient::connect(uri(addr)).await.with_context(|| format!("connecting to {addr}"))?;
    let d =
        client.describe(DescribeRequest {}).await.map_err(|s| anyhow::anyhow!("{addr}: Describe: {}", s.message()))?;
    let experts = d
        .into_inner()
        .layers
        .iter()
        .flat_map(|l| l.experts.iter().map(move |&e| (l.layer as usize, e as usize)))
        .collect();
    Ok(WorkerSlots { name: addr.to_string(), experts, capacity })
}

pub fn run(a: PlacementArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    match a.command {
        PlacementCommand::Load(l) => {
            let load = rt.block_on(expert_load(&l))?;
            print_load(&load, l.json);
            Ok(())
        }
        PlacementCommand::Plan(p) => {
            anyhow::ensure!(p.capacity > 0, "--capacity must be at least 1");
            anyhow::ensure!(p.target > 0.0 && p.target <= 1.0, "--target must be in (0, 1]");
            let load = rt.block_on(expert_load(&p.load))?;
            let workers = rt.block_on(async {
                let mut out = Vec::new();
                for w in &p.workers {
                    out.push(describe(w, p.capacity).await?);
                }
                anyhow::Ok(out)
            })?;
            let (layers, experts) = (load.num_layers as usize, load.num_experts as usize);
            let mut total = vec![0u64; layers * experts];
            for a in &load.adapters {
                for (t, n) in total.iter_mut().zip(&a.tokens) {
                    *t += n;
                }
            }
            let cluster = Cluster { num_layers: layers, num_experts: experts, workers, load: total };
            let plan = moe_placement::plan(&cluster, p.target, p.max_steps)?;
            print_plan(&cluster, &plan, p.load.json);
            Ok(())
        }
    }
}

fn print_load(load: &ExpertLoadResponse, json: bool) {
    let e = load.num_experts.max(1) as usize;
    if json {
        let adapters: Vec<_> = load
            .adapters
            .iter()
            .map(|a| serde_json::json!({"adapter": a.adapter, "tokens": a.tokens.chunks(e).collect::<Vec<_>>()}))
            .collect();
        println!("{}", serde_json::json!({"window_seconds": load.window_seconds, "adapters": adapters}));
        return;
    }
    println!("tokens per expert over the last {:.0} s (rows: layers)", load.window_seconds);
    for a in &load.adapters {
        println!("{}:", a.adapter);
        for (l, row) in a.tokens.chunks(e).enumerate() {
            let cells: Vec<String> = row.iter().map(|n| format!("{n:>7}")).collect();
            println!("  layer {l:>2} {}", cells.join(""));
        }
    }
}

fn print_plan(cluster: &Cluster, plan: &Plan, json: bool) {
    let name = |w: usize| cluster.workers.get(w).map_or("?", |w| w.name.as_str());
    let step_json = |s: &Step| match *s {
        Step::Load { worker, layer, expert } => {
            serde_json::json!({"action": "load", "worker": name(worker), "layer": layer, "expert": expert})
        }
        Step::Unload { worker, layer, expert } => {
            serde_json::json!({"action": "unload", "worker": name(worker), "layer": layer, "expert": expert})
        }
    };
    if json {
        let steps: Vec<_> = plan.steps.iter().map(step_json).collect();
        println!("{}", serde_json::json!({"before": plan.before, "after": plan.after, "steps": steps}));
        return;
    }
    println!("balance per layer (mean / max load over workers; 1 = even):");
    for (l, (b, a)) in plan.before.iter().zip(&plan.after).enumerate() {
        println!("  layer {l:>2}  {b:.2} -> {a:.2}");
    }
    println!("  mean      {:.2} -> {:.2}", Plan::mean(&plan.before), Plan::mean(&plan.after));
    if plan.steps.is_empty() {
        println!("no step improves the balance within the workers' capacity");
    }
    for s in &plan.steps {
        match *s {
            Step::Load { worker, layer, expert } => {
                println!("  load   layer {layer} expert {expert} on {}", name(worker))
            }
            Step::Unload { worker, layer, expert } => {
                println!("  unload layer {layer} expert {expert} from {}", name(worker))
            }
        }
    }
}
