//! `moe placement load|plan|apply`: what a router saw (tokens per expert per adapter over the
//! last minute, from its `ExpertLoad` RPC), what the planner (`moe-placement`) proposes for the
//! workers as they are (from each worker's `Describe`): replicas of hot experts on the least
//! loaded workers within their capacity, with the balance per layer before and after; and
//! applying it (`LoadExperts` / `UnloadExperts`, see `moe_cluster::rebalance`).

use anyhow::Context;
use clap::{Args, Subcommand};
use moe_cluster::rebalance;
use moe_cluster::rebalance::{Cluster, Plan, Step};
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{ExpertLoadRequest, ExpertLoadResponse};

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
    /// Propose a plan as `plan` does, then carry it out on the workers step by step.
    Apply(PlanArgs),
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
    /// Experts (all layers together) each worker may hold (default: its --max-expert-mb over
    /// its bytes per expert, as Describe reports them; without a budget, every expert).
    #[arg(long, env = "MOE_PLACEMENT_CAPACITY")]
    pub capacity: Option<usize>,
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

pub fn run(a: PlacementArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    match a.command {
        PlacementCommand::Load(l) => {
            let load = rt.block_on(expert_load(&l))?;
            print_load(&load, l.json);
            Ok(())
        }
        PlacementCommand::Plan(p) => {
            let (cluster, plan) = rt.block_on(make_plan(&p))?;
            print_plan(&cluster, &plan, p.load.json);
            Ok(())
        }
        PlacementCommand::Apply(p) => {
            let (cluster, plan) = rt.block_on(make_plan(&p))?;
            print_plan(&cluster, &plan, p.load.json);
            let done = rt.block_on(rebalance::apply(&cluster, &plan.steps, &Default::default(), &|| true))?;
            if !p.load.json {
                println!("applied {done} steps");
            }
            Ok(())
        }
    }
}

/// The cluster as the router's load and the workers' Describe show it, and the plan for it.
async fn make_plan(p: &PlanArgs) -> anyhow::Result<(Cluster, Plan)> {
    anyhow::ensure!(p.capacity != Some(0), "--capacity must be at least 1");
    anyhow::ensure!(p.target > 0.0 && p.target <= 1.0, "--target must be in (0, 1]");
    let load = expert_load(&p.load).await?;
    let (layers, experts) = (load.num_layers as usize, load.num_experts as usize);
    let mut workers = Vec::new();
    for w in &p.workers {
        let mut slots = rebalance::describe_worker(w, layers * experts, &Default::default()).await?;
        if let Some(c) = p.capacity {
            slots.capacity = c;
        }
        workers.push(slots);
    }
    let per_adapter: Vec<Vec<u64>> = load.adapters.into_iter().map(|a| a.tokens).collect();
    let total = rebalance::total_load(layers, experts, &per_adapter);
    let cluster = Cluster { num_layers: layers, num_experts: experts, workers, load: total };
    let plan = rebalance::plan(&cluster, p.target, p.max_steps)?;
    Ok((cluster, plan))
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
