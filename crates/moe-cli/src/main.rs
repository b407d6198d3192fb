//! The `moe` command. Every flag can also be set through a `MOE_*` environment variable.
//! Library errors become one `error: …` line on stderr and a non-zero exit, never a panic.

mod api;
mod bench;
mod bench_adapters;
mod client;
mod demo;
mod engine_args;
mod generate;
mod logits;
mod model_args;
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate a continuation of a prompt.
    Generate(generate::GenerateArgs),
    /// Print the full logits of every position of a prompt.
    Logits(logits::LogitsArgs),
    /// Write a small random Mixtral-layout checkpoint with a byte-level tokenizer.
    DemoModel(demo::DemoArgs),
    /// Run the embedded cluster (router and N in-process workers) serving the Inference API.
    Serve(serve::ServeArgs),
    /// Host experts and serve them to routers over gRPC.
    Worker(worker::WorkerArgs),
    /// Route requests to remote expert workers, serving the Inference API.
    Router(router::RouterArgs),
    /// Measure this machine's ceilings and the cluster's throughput and latency against them.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MOE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("starting the compute thread pool")?;
    }
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Logits(a) => logits::run(a),
        Command::DemoModel(a) => demo::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Worker(a) => worker::run(a),
        Command::Router(a) => router::run(a),
        Command::Bench(a) => bench::run(a),
    }
}
