//! The `moe` command. Every flag can also be set through a `MOE_*` environment variable.
//! Library errors become one `error: …` line on stderr and a non-zero exit, never a panic.

mod adapter;
mod api;
mod client;
mod config_file;
mod demo;
mod engine_args;
mod generate;
mod inspect;
mod logits;
mod model_args;
mod placement;
mod router;
mod serve;
mod worker;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "moe", version, about = "Distributed Mixture-of-Experts inference")]
struct Cli {
    /// Worker threads for compute (default: all cores).
    #[arg(long, global = true, env = "MOE_THREADS")]
    threads: Option<usize>,
    /// Log lines as human-readable text or as JSON objects (one per line).
    #[arg(long, global = true, env = "MOE_LOG_FORMAT", value_enum, default_value = "human")]
    log_format: LogFormat,
    /// TOML file whose keys mirror the flags (`max-batch-tokens = 256`); the command line and
    /// the environment take precedence over it.
    #[arg(long, global = true, env = "MOE_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Where to compute: cpu, or cuda:N (needs a build with the `cuda` feature, the default).
    #[arg(long, global = true, env = "MOE_DEVICE", default_value = "cpu")]
    device: moe_cluster::Device,
    /// How a GPU multiplies routed experts: auto (tc for layers of 16 or more experts, else
    /// cublas; the default), cublas (one cuBLAS GEMM per expert), grouped (the project's grouped
    /// GEMM kernel, every expert in one launch) or tc (its pipelined tensor-core successor).
    #[arg(long, global = true, env = "MOE_EXPERT_GEMM", default_value = "auto", value_parser = ["auto", "cublas", "grouped", "tc"])]
    expert_gemm: String,
    /// Attention kernel on a GPU: classic (every layout, the default) or flash (tensor-core
    /// FlashAttention-2-style where it applies: bf16 cache, head size 64 or 128, no sinks).
    #[arg(long, global = true, env = "MOE_CUDA_ATTENTION", default_value = "classic", value_parser = ["classic", "flash"])]
    cuda_attention: String,
    /// Batch-invariant GPU inference: every bf16 product on the project's tensor-core GEMM
    /// instead of cuBLAS, so a request's tokens do not depend on its batch (the CPU always is).
    #[arg(long, global = true, env = "MOE_DETERMINISTIC")]
    deterministic: bool,
    /// CPU kernel instruction set: auto (the fastest measured set this CPU runs), avx512, avx2,
    /// neon or portable. Every set computes the same bits; the choice is logged at start and
    /// exported as `moe_cpu_kernels` in /metrics.
    #[arg(long, global = true, env = "MOE_CPU_KERNELS", default_value = "auto")]
    cpu_kernels: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate a continuation of a prompt.
    Generate(generate::GenerateArgs),
    /// What a model needs (parameters, bf16 bytes, KV cache per token), from config.json alone.
    Inspect(inspect::InspectArgs),
    /// Print the full logits of every position of a prompt.
    Logits(logits::LogitsArgs),
    /// A tour of the trained demo model: each tenant adapter's held-out loss, the experts its
    /// tokens visit, sample continuations, and how to serve it.
    Demo(moe_bench::tour::TourArgs),
    /// Write a small random Mixtral-layout checkpoint with a byte-level tokenizer.
    DemoModel(demo::DemoArgs),
    /// Run the embedded cluster (router and N in-process workers) serving the Inference API.
    Serve(serve::ServeArgs),
    /// Host experts and serve them to routers over gRPC.
    Worker(worker::WorkerArgs),
    /// Route requests to remote expert workers, serving the Inference API.
    Router(Box<router::RouterArgs>),
    /// Measure this machine's ceilings and the cluster's throughput and latency against them.
    Bench(moe_bench::scenarios::machine::BenchArgs),
    /// Throughput of Mixtral-8x7B-shaped layers with random weights on --device (no checkpoint):
    /// prefill, decode at several batch sizes and the expert FFN, against the device's rooflines.
    BenchDevice(moe_bench::scenarios::device::BenchDeviceArgs),
    /// The skewed-tenant placement scenario: balance and projected throughput with static
    /// sharding and with the router's planner, while three tenants' traffic shares shift.
    BenchPlacement(moe_bench::scenarios::placement::BenchPlacementArgs),
    /// Drive a router with load and check that every request ends exactly once.
    Loadgen(moe_bench::scenarios::loadgen::LoadgenArgs),
    /// The CUDA kernels: compile them with NVRTC (no GPU needed), or list them.
    Kernels(moe_bench::kernels::KernelsArgs),
    /// LoRA adapters: `inspect DIR` shows what one adapts, or why it cannot be served.
    Adapter(adapter::AdapterArgs),
    /// Expert placement: a router's expert load per adapter, and a plan that balances workers.
    Placement(placement::PlacementArgs),
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let Err(e) = config_file::apply::<Cli>(&args) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("MOE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // First: the kernel self-check below already runs on rayon's global pool, which can be
    // sized only before its first use.
    if let Some(n) = cli.threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("starting the compute thread pool")?;
    }
    moe_cluster::set_expert_gemm(&cli.expert_gemm)?;
    moe_cluster::set_cuda_attention(&cli.cuda_attention)?;
    moe_cluster::set_deterministic(cli.deterministic);
    let kernels = moe_cluster::set_cpu_kernels(&cli.cpu_kernels)?;
    if matches!(cli.command, Command::Serve(_) | Command::Worker(_) | Command::Router(_))
        && cli.device == moe_cluster::Device::Cpu
    {
        eprintln!("CPU kernels: {kernels} (--cpu-kernels {})", cli.cpu_kernels);
    }
    match cli.command {
        Command::Generate(a) if a.endpoint.is_some() => client::run(a),
        Command::Generate(a) => generate::run(a, cli.device),
        Command::Logits(a) => logits::run(a, cli.device),
        Command::Inspect(a) => inspect::run(a),
        Command::Demo(a) => moe_bench::tour::run(a, cli.device),
        Command::DemoModel(a) => demo::run(a),
        Command::Serve(a) => serve::run(a, cli.device),
        Command::Worker(a) => worker::run(a, cli.device),
        Command::Router(a) => router::run(*a, cli.device),
        Command::Bench(a) => moe_bench::scenarios::machine::run(a),
        Command::BenchDevice(a) => moe_bench::scenarios::device::run(a, cli.device),
        Command::BenchPlacement(a) => moe_bench::scenarios::placement::run(a),
        Command::Kernels(a) => moe_bench::kernels::run(a, cli.device),
        Command::Loadgen(a) => moe_bench::scenarios::loadgen::run(a),
        Command::Adapter(a) => adapter::run(a),
        Command::Placement(a) => placement::run(a),
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// The promise of this file's first line: every flag of every command has a `MOE_*`
    /// variable (and so a `--config` key).
    #[test]
    fn every_flag_has_a_moe_environment_variable() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if a.get_long().is_none() || id == "help" || id == "version" {
                    continue;
                }
                match a.get_env() {
                    Some(env) if env.to_string_lossy().starts_with("MOE_") => {}
                    _ => missing.push(format!("{path} --{}", a.get_long().unwrap_or(id))),
                }
            }
            for s in cmd.get_subcommands() {
                walk(s, &format!("{path} {}", s.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "moe", &mut missing);
        assert!(missing.is_empty(), "flags without a MOE_* variable: {missing:?}");
    }
}
