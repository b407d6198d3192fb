//! `moe bench`: this machine's ceilings, then the embedded cluster and a router with worker
//! processes over loopback gRPC, each figure printed next to its roofline. JSON with `--json`.

use crate::processes::{spawn_worker_processes, ChildProcesses};
use crate::{bytes_per_decoded_token, decode, flops_per_prefill_token, prefill, DecodeReport, PrefillReport};
use clap::Args;
use moe_dispatch::GrpcTransportConfig;
use moe_router::{Engine, EngineConfig};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Checkpoint to measure (default: the standard benchmark model, written once to the temp dir).
    #[arg(long, env = "MOE_MODEL", conflicts_with = "make_bench_model")]
    pub model: Option<PathBuf>,
    /// Use the standard benchmark model (hidden 512, 8 layers, 8 experts top-2, vocab 32000).
    #[arg(long, env = "MOE_MAKE_BENCH_MODEL")]
    pub make_bench_model: bool,
    /// Workers of the embedded cluster and worker processes of the remote run.
    #[arg(long, env = "MOE_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// Tokens each request generates in the decode runs.
    #[arg(long, env = "MOE_NEW_TOKENS", default_value_t = 32)]
    pub new_tokens: usize,
    /// Skip the router + worker processes run.
    #[arg(long, env = "MOE_SKIP_REMOTE")]
    pub skip_remote: bool,
    /// Skip the LoRA adapter runs.
    #[arg(long, env = "MOE_SKIP_ADAPTERS")]
    pub skip_adapters: bool,
    /// Skip the multi-turn chat workload (8 tenants x 4 conversations x 4 turns, prefix cache
    /// off and on).
    #[arg(long, env = "MOE_SKIP_MULTI_TURN")]
    pub skip_multi_turn: bool,
    /// Skip the fairness scenario (two tenants, fair against first-come-first-served).
    #[arg(long, env = "MOE_SKIP_FAIRNESS")]
    pub skip_fairness: bool,
    /// Run only the fairness scenario.
    #[arg(long, env = "MOE_ONLY_FAIRNESS", conflicts_with = "skip_fairness")]
    pub only_fairness: bool,
    /// Only what the llama.cpp comparison needs: the ceilings, the embedded cluster's prefill and
    /// decode, and decode with bf16 weights (about 30 s).
    #[arg(long, env = "MOE_BENCH_CORE")]
    pub core: bool,
    /// Print the benchmark checkpoint's directory (writing it first if needed) and exit.
    #[arg(long, env = "MOE_PRINT_MODEL_DIR")]
    pub print_model_dir: bool,
    #[arg(long, env = "MOE_JSON")]
    pub json: bool,
    /// Also write `report.json` and a self-contained `report.html` with charts into DIR (the
    /// peers' figures too when `benches/hf_compare.py --report DIR` left `DIR/peers.json`).
    #[arg(long, env = "MOE_REPORT", value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Draw an earlier run's report.json into --report DIR instead of measuring.
    #[arg(long, env = "MOE_FROM_JSON", value_name = "FILE", requires = "report")]
    pub from_json: Option<PathBuf>,
}

/// Writes the report of `json` into `dir`, with `dir/peers.json` when present.
fn write_report(json: &serde_json::Value, dir: &Path) -> anyhow::Result<()> {
    let peers_file = dir.join("peers.json");
    let peers = if peers_file.is_file() { Some(crate::report::read_json(&peers_file)?) } else { None };
    crate::report::bench_report(json, peers.as_ref())?.write(dir)
}

#[derive(Serialize)]
struct Ceilings {
    /// The CPU kernel set every figure was measured with (`--cpu-kernels`).
    cpu_kernels: String,
    /// Fused multiply-adds in registers on every thread, with that set's vector width.
    fma_peak_gflops: f64,
    memory_copy_gbps: f64,
    gemm_peak_gflops: f64,
    expert_gflops: f64,
    bytes_per_decoded_token: usize,
    flops_per_prefill_token: f64,
    decode_roofline_tokens_per_s: f64,
    prefill_roofline_tokens_per_s: f64,
}

#[derive(Serialize)]
struct Topology {
    name: String,
    prefill: PrefillReport,
    decode: Vec<DecodeReport>,
    dispatch_round_trip_us: Option<f64>,
    /// Mean over layer calls of mean / max (row, expert) pairs over workers (1.0 = even).
    dispatch_balance: Option<f64>,
}

/// Peak resident memory of this process after the embedded cluster's runs, against the
/// weights (as loaded) plus the engine's KV-cache budget.
#[derive(Serialize)]
struct MemoryReport {
    peak_rss_bytes: usize,
    weight_bytes: usize,
    kv_budget_bytes: usize,
    ratio: f64,
}

/// The process's peak resident set (VmHWM), where /proc tells it.
fn peak_rss_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: usize =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// Decode at batch 1 with the same checkpoint stored (and kept in memory) as bf16.
#[derive(Serialize)]
struct Bf16Report {
    decode_batch1: DecodeReport,
    bytes_per_decoded_token: usize,
    decode_roofline_tokens_per_s: f64,
    /// Tokens/s relative to the f32 checkpoint's decode at batch 1 in this run.
    vs_f32: f64,
}

#[derive(Serialize)]
struct Report {
    model: String,
    commit: String,
    threads: usize,
    ceilings: Ceilings,
    topologies: Vec<Topology>,
    memory: Option<MemoryReport>,
    bf16: Option<Bf16Report>,
    adapters: Vec<crate::scenarios::adapters::AdapterRun>,
    overlap: Vec<OverlapRun>,
    prefix_cache: Option<crate::scenarios::prefix::PrefixRun>,
    multi_turn: Option<crate::scenarios::multiturn::MultiTurnRun>,
    fairness: Option<crate::scenarios::fairness::FairnessRun>,
    failover: Vec<crate::scenarios::failover::FailoverRun>,
    structured: Option<crate::scenarios::structured::StructuredRun>,
    /// The benchmark model against its DeepSeek-V3-shaped counterpart (bench model only).
    layouts: Option<crate::scenarios::shapes::ShapeComparison>,
}

/// Remote decode with two-batch overlap (the default) against the same run without it.
#[derive(Serialize)]
struct OverlapRun {
    batch: usize,
    with_overlap_tokens_per_s: f64,
    without_overlap_tokens_per_s: f64,
    ratio: f64,
}

fn spawn_workers(dir: &Path, n: usize) -> anyhow::Result<(ChildProcesses, Vec<String>)> {
    let specs: Vec<String> = (0..n).map(|i| format!("shard:{i}/{n}")).collect();
    spawn_worker_processes(dir, &specs)
}

fn measure(name: &str, engine: &Engine, new_tokens: usize) -> anyhow::Result<Topology> {
    eprintln!("{name}: prefill");
    let _ = prefill(engine, 8).map_err(anyhow::Error::msg)?; // warm-up
                                                             // 512 tokens, or what the model's context allows.
    let max_pos = engine.model_config().max_position_embeddings;
    let pre = prefill(engine, 512.min(max_pos.saturating_sub(2)).max(1)).map_err(anyhow::Error::msg)?;
    let mut dec = Vec::new();
    for batch in [1usize, 16, 64] {
        eprintln!("{name}: decode batch {batch}");
        dec.push(
            decode(engine, batch, if batch == 1 { new_tokens * 2 } else { new_tokens }).map_err(anyhow::Error::msg)?,
        );
    }
    Ok(Topology { name: name.into(), prefill: pre, decode: dec, dispatch_round_trip_us: None, dispatch_balance: None })
}

/// Median time of one layer's expert dispatch of a single row to the remote workers.
/// The mean of every layer call's balance, from the `moe_dispatch_balance` histograms.
fn mean_balance(text: &str) -> Option<f64> {
    let total = |suffix: &str| -> f64 {
        let prefix = format!("moe_dispatch_balance_{suffix}{{");
        text.lines().filter(|l| l.starts_with(&prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    };
    let count = total("count");
    (count > 0.0).then(|| total("sum") / count)
}

/// Median time of one layer's expert dispatch of a single row to the remote workers (after 50
/// warm-up calls).
fn dispatch_round_trip_us(rt: &tokio::runtime::Runtime, dir: &Path, addrs: &[String]) -> anyhow::Result<f64> {
    let samples = moe_cluster::probe::dispatch_round_trips_us(rt, dir, addrs, GrpcTransportConfig::default(), 300)?;
    Ok(crate::Percentiles::of(samples[50..].to_vec()).median)
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if let (Some(from), Some(dir)) = (&a.from_json, &a.report) {
        return write_report(&crate::report::read_json(from)?, dir);
    }
    let started = Instant::now();
    let dir = match &a.model {
        Some(d) => d.clone(),
        None => moe_demo::cached_model_dir("bench-model", &moe_demo::DemoSpec::bench())?,
    };
    if a.print_model_dir {
        println!("{}", dir.display());
        return Ok(());
    }
    if a.only_fairness {
        let f = crate::scenarios::fairness::measure(&dir, a.workers)?;
        let json =
            serde_json::json!({ "model": dir.display().to_string(), "commit": crate::report::commit(), "fairness": f });
        if let Some(r) = &a.report {
            write_report(&json, r)?;
        }
        if a.json {
            println!("{}", serde_json::to_string_pretty(&json)?);
        } else {
            crate::scenarios::fairness::print(&f);
        }
        eprintln!("bench took {:.0} s", started.elapsed().as_secs_f64());
        return Ok(());
    }
    let config = moe_model::ModelConfig::from_dir(&dir)?;
    // The prefix cache is off for the throughput runs (they repeat prompts; a hit would measure
    // the cache, not the model); its own run below measures it.
    let engine_config =
        EngineConfig { max_batch_tokens: 512, max_running: 64, prefix_cache: false, ..Default::default() };
    let mut topologies = Vec::new();
    let memory = {
        let engine = moe_cluster::embedded(&dir, a.workers, engine_config.clone())?;
        topologies.push(measure(&format!("embedded ({} workers)", a.workers), &engine, a.new_tokens)?);
        let weight_bytes = std::fs::metadata(dir.join("model.safetensors")).map(|m| m.len() as usize).unwrap_or(0);
        peak_rss_bytes().map(|peak| MemoryReport {
            peak_rss_bytes: peak,
            weight_bytes,
            kv_budget_bytes: engine_config.kv_cache_bytes,
            ratio: peak as f64 / (weight_bytes + engine_config.kv_cache_bytes).max(1) as f64,
        })
    };
    // Ceilings after the embedded run, so their buffers (and a second copy of every expert)
    // are not in the embedded run's peak memory.
    eprintln!("measuring ceilings");
    let kernels = moe_compute::cpu::cpu_kernels();
    let fma_peak = moe_compute::cpu::fma_peak_gflops(kernels, 20_000_000);
    let copy = crate::memory_copy_gbps(256);
    let gemm = crate::gemm_peak_gflops(1024);
    let expert = {
        let options = moe_cluster::HostOptions::default();
        let host = moe_cluster::expert_host(moe_compute::Device::Cpu, &dir, &moe_worker::ExpertSpec::All, &options)?;
        let layer = config.moe_layers().first().copied().unwrap_or(0);
        crate::expert_gflops(host.as_ref(), layer, 512)
    };
    let bytes = bytes_per_decoded_token(&config, 4);
    let flops = flops_per_prefill_token(&config);
    let ceilings = Ceilings {
        cpu_kernels: kernels.name().into(),
        fma_peak_gflops: fma_peak,
        memory_copy_gbps: copy,
        gemm_peak_gflops: gemm,
        expert_gflops: expert,
        bytes_per_decoded_token: bytes,
        flops_per_prefill_token: flops,
        decode_roofline_tokens_per_s: copy * 1e9 / bytes as f64,
        prefill_roofline_tokens_per_s: gemm * 1e9 / flops,
    };
    let mut overlap = Vec::new();
    if !a.skip_remote && !a.core {
        let (_children, addrs) = spawn_workers(&dir, a.workers)?;
        let rt = tokio::runtime::Runtime::new()?;
        let transport = GrpcTransportConfig::default();
        let registry = transport.metrics.clone();
        let engine = rt.block_on(moe_cluster::remote(&dir, &addrs, transport, engine_config.clone()))?;
        let mut t = measure(&format!("router + {} worker processes (bf16 wire)", a.workers), &engine, a.new_tokens)?;
        t.dispatch_balance = mean_balance(&registry.render());
        t.dispatch_round_trip_us = Some(dispatch_round_trip_us(&rt, &dir, &addrs)?);
        drop(engine);
        let with_overlap = EngineConfig { two_batch_overlap: true, ..engine_config.clone() };
        let tbo = rt.block_on(moe_cluster::remote(&dir, &addrs, GrpcTransportConfig::default(), with_overlap))?;
        for batch in [16usize, 64] {
            eprintln!("router with two-batch overlap: decode batch {batch}");
            let _ = decode(&tbo, batch, 4).map_err(anyhow::Error::msg)?; // warm-up
            let on = decode(&tbo, batch, a.new_tokens).map_err(anyhow::Error::msg)?.tokens_per_s;
            if let Some(off) = t.decode.iter().find(|d| d.batch == batch).map(|d| d.tokens_per_s) {
                overlap.push(OverlapRun {
                    batch,
                    with_overlap_tokens_per_s: on,
                    without_overlap_tokens_per_s: off,
                    ratio: on / off.max(1e-9),
                });
            }
        }
        topologies.push(t);
    }
    let bf16 = if a.model.is_some() {
        None
    } else {
        let f32_tps = topologies.first().and_then(|t| t.decode.first()).map(|d| d.tokens_per_s).unwrap_or(0.0);
        let spec = moe_demo::DemoSpec { dtype: moe_demo::DemoDtype::Bf16, ..moe_demo::DemoSpec::bench() };
        let dir16 = moe_demo::cached_model_dir("bench-model-bf16", &spec)?;
        let engine = moe_cluster::embedded(
            &dir16,
            a.workers,
            EngineConfig { max_running: 64, prefix_cache: false, ..Default::default() },
        )?;
        eprintln!("embedded, bf16 weights: decode batch 1");
        let _ = decode(&engine, 1, 4).map_err(anyhow::Error::msg)?; // warm-up
        let d = decode(&engine, 1, a.new_tokens * 2).map_err(anyhow::Error::msg)?;
        let bytes = bytes_per_decoded_token(&config, 2);
        Some(Bf16Report {
            vs_f32: d.tokens_per_s / f32_tps.max(1e-9),
            decode_roofline_tokens_per_s: copy * 1e9 / bytes as f64,
            bytes_per_decoded_token: bytes,
            decode_batch1: d,
        })
    };
    let adapters = if a.skip_adapters || a.model.is_some() || a.core {
        Vec::new()
    } else {
        crate::scenarios::adapters::measure(&dir, a.workers, a.new_tokens)?
    };
    let prefix_cache = if a.core {
        None
    } else {
        eprintln!("prefix cache: TTFT with a shared 1024-token prefix, cache off and on");
        Some(crate::scenarios::prefix::measure(&dir, a.workers, 1024)?)
    };
    let failover = if a.skip_remote || a.core { Vec::new() } else { crate::scenarios::failover::measure(&dir)? };
    let structured = if a.core {
        None
    } else {
        eprintln!("structured output: decode batch 16, half under a JSON schema, against none");
        crate::scenarios::structured::measure(&dir, a.workers, a.new_tokens)?
    };
    let multi_turn = if a.skip_multi_turn || a.core {
        None
    } else {
        // Tenants use the benchmark adapters when the model is the benchmark model.
        let adapters = if a.model.is_some() {
            None
        } else {
            Some(crate::scenarios::adapters::adapter_dir(&moe_demo::DemoSpec::bench())?)
        };
        crate::scenarios::multiturn::measure(&dir, a.workers, adapters.as_deref())?
    };
    let fairness =
        if a.skip_fairness || a.core { None } else { Some(crate::scenarios::fairness::measure(&dir, a.workers)?) };
    let layouts = match a.model {
        _ if a.core => None,
        Some(_) => None,
        None => Some(crate::scenarios::shapes::measure(a.workers, a.new_tokens)?),
    };
    let report = Report {
        layouts,
        commit: crate::report::commit(),
        model: dir.display().to_string(),
        threads: rayon::current_num_threads(),
        ceilings,
        topologies,
        memory,
        bf16,
        adapters,
        overlap,
        prefix_cache,
        multi_turn,
        fairness,
        failover,
        structured,
    };
    if let Some(r) = &a.report {
        write_report(&serde_json::to_value(&report)?, r)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
        if let Some(m) = &report.memory {
            println!(
                "peak resident memory after the embedded runs: {:.0} MB = {:.2}x (weights {:.0} MB + KV budget {:.0} MB)",
                m.peak_rss_bytes as f64 / 1e6,
                m.ratio,
                m.weight_bytes as f64 / 1e6,
                m.kv_budget_bytes as f64 / 1e6
            );
        }
        if let Some(p) = &report.prefix_cache {
            println!(
                "prefix cache: a request sharing a {}-token prefix with a finished one: TTFT {:.1} ms with the cache, {:.1} ms without = {:.1}x ({} tokens reused)",
                p.prefix_tokens, p.ttft_on_ms, p.ttft_off_ms, p.speedup, p.cached_tokens
            );
        }
        for o in &report.overlap {
            println!(
                "two-batch overlap, router + workers, decode batch {}: {:.0} tok/s with, {:.0} without = {:.2}x",
                o.batch, o.with_overlap_tokens_per_s, o.without_overlap_tokens_per_s, o.ratio
            );
        }
        if let Some(b) = &report.bf16 {
            println!();
            println!(
                "bf16 weights in memory: decode batch 1 {:.0} tok/s = {:.2}x the f32 checkpoint, {:.0}% of its roofline ({:.0} tok/s at {:.1} MB per token)",
                b.decode_batch1.tokens_per_s,
                b.vs_f32,
                100.0 * b.decode_batch1.tokens_per_s / b.decode_roofline_tokens_per_s,
                b.decode_roofline_tokens_per_s,
                b.bytes_per_decoded_token as f64 / 1e6
            );
        }
        if !report.adapters.is_empty() {
            crate::scenarios::adapters::print_table(&report.adapters);
        }
        if let Some(m) = &report.multi_turn {
            crate::scenarios::multiturn::print(m);
        }
        if let Some(f) = &report.fairness {
            crate::scenarios::fairness::print(f);
        }
        if !report.failover.is_empty() {
            crate::scenarios::failover::print(&report.failover);
        }
        if let Some(s) = &report.structured {
            crate::scenarios::structured::print(s);
        }
        if let Some(l) = &report.layouts {
            crate::scenarios::shapes::print(l);
        }
    }
    eprintln!("bench took {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn print_table(r: &Report) {
    let c = &r.ceilings;
    println!("model: {}  ({} threads)", r.model, r.threads);
    println!(
        "CPU kernels: {} (FMA peak in registers {:.1} GFLOP/s over {} threads)",
        c.cpu_kernels, c.fma_peak_gflops, r.threads
    );
    println!(
        "ceilings: memory copy {:.1} GB/s, GEMM peak {:.1} GFLOP/s (backend kernel, 1024^3: {:.0}% of the FMA peak)",
        c.memory_copy_gbps,
        c.gemm_peak_gflops,
        100.0 * c.gemm_peak_gflops / c.fma_peak_gflops.max(1e-9)
    );
    println!(
        "          decode roofline {:.0} tok/s ({:.1} MB of weights per token), prefill roofline {:.0} tok/s ({:.1} MFLOP per token)",
        c.decode_roofline_tokens_per_s,
        c.bytes_per_decoded_token as f64 / 1e6,
        c.prefill_roofline_tokens_per_s,
        c.flops_per_prefill_token / 1e6
    );
    println!(
        "expert FFN (512 rows, grouped): {:.1} GFLOP/s = {:.0}% of GEMM peak",
        c.expert_gflops,
        100.0 * c.expert_gflops / c.gemm_peak_gflops
    );
    println!();
    println!(
        "{:<44} {:>12} {:>10} {:>14} {:>14} {:>10}",
        "topology / measurement", "tokens/s", "roofline", "TTFT ms p50/99", "ITL ms p50/99", ""
    );
    for t in &r.topologies {
        println!(
            "{:<44} {:>12.0} {:>9.0}% {:>14.1} {:>14} {:>10}",
            format!("{}: prefill {}", t.name, t.prefill.prompt_tokens),
            t.prefill.tokens_per_s,
            100.0 * t.prefill.tokens_per_s / c.prefill_roofline_tokens_per_s,
            t.prefill.ttft_ms,
            "-",
            ""
        );
        for d in &t.decode {
            let roof = if d.batch == 1 {
                format!("{:.0}%", 100.0 * d.tokens_per_s / c.decode_roofline_tokens_per_s)
            } else {
                "-".into()
            };
            println!(
                "{:<44} {:>12.0} {:>10} {:>14} {:>14} {:>10}",
                format!("{}: decode batch {}", t.name, d.batch),
                d.tokens_per_s,
                roof,
                format!("{:.1}/{:.1}", d.ttft_ms.median, d.ttft_ms.p99),
                format!("{:.2}/{:.2}", d.itl_ms.median, d.itl_ms.p99),
                ""
            );
        }
        if std::ptr::eq(t, &r.topologies[0]) {
            crate::engine::print_breakdowns(&t.name, &t.decode);
        }
        if let Some(us) = t.dispatch_round_trip_us {
            println!("{:<44} {:>12.0} us", format!("{}: dispatch round trip per layer", t.name), us);
        }
        if let Some(b) = t.dispatch_balance {
            println!("{:<44} {:>12.2} (mean / max pairs over workers; 1 = even)", format!("{}: balance", t.name), b);
        }
    }
}
