//! `moe bench`'s failover run: a router (in this process, default dispatch settings) over three
//! worker processes — two splitting the experts and a replica holding all of them — serves 8
//! concurrent greedy requests; then the same requests again while the first worker is frozen
//! (SIGSTOP) or killed (SIGKILL) a third of the way in. Each request's extra time over the
//! failure-free run is its delay; the tokens must be the same.

use crate::processes::{spawn_worker_processes, ChildProcesses};
use crate::Percentiles;
use moe_dispatch::GrpcTransportConfig;
use moe_router::{Engine, EngineConfig, Event, GenerationParams, PromptInput, ValidatedRequest};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

const REQUESTS: usize = 8;
const PROMPT_TOKENS: usize = 16;
const NEW_TOKENS: u32 = 64;

#[derive(Serialize)]
pub struct FailoverRun {
    /// `SIGSTOP` or `SIGKILL`.
    pub fault: String,
    pub requests: usize,
    pub new_tokens: u32,
    /// Wall time of the failure-free run.
    pub baseline_ms: f64,
    /// Each request's completion time minus its failure-free one.
    pub delay_ms: Percentiles,
    pub max_delay_ms: f64,
    /// Every request's tokens equal the failure-free run's.
    pub identical: bool,
}

/// Runs the requests at once; calls `midway` after `after`; returns each request's tokens and
/// completion time.
fn run(
    engine: &Engine,
    after: Option<Duration>,
    midway: impl FnOnce() + Send,
) -> anyhow::Result<Vec<(Vec<u32>, Duration)>> {
    let vocab = engine.model_config().vocab_size as u32;
    let start = Instant::now();
    let mut streams = Vec::new();
    for i in 0..REQUESTS {
        let prompt: Vec<u32> = (0..PROMPT_TOKENS as u32).map(|j| (i as u32 * 131 + j * 17 + 5) % vocab).collect();
        let params = GenerationParams { max_new_tokens: Some(NEW_TOKENS), ..Default::default() };
        let req = ValidatedRequest::new(
            PromptInput::Ids(prompt),
            &params,
            engine.codec(),
            engine.model_config(),
            Duration::from_secs(600),
        )?;
        streams.push(engine.submit(req)?.1);
    }
    let mut midway = Some(midway);
    let fire_at = after.map(|a| start + a);
    std::thread::scope(|s| {
        let trigger = s.spawn(move || {
            if let Some(at) = fire_at {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                if let Some(f) = midway.take() {
                    f();
                }
            }
        });
        let results = streams
            .into_iter()
            .map(|mut rx| {
                let mut tokens = Vec::new();
                loop {
                    match rx.blocking_recv() {
                        Some(Event::Delta { token_ids, .. }) => tokens.extend(token_ids),
                        Some(Event::Finished { .. }) => return Ok((tokens, start.elapsed())),
                        Some(Event::Failed(e)) => anyhow::bail!("failover run: {e}"),
                        None => anyhow::bail!("failover run: no terminal event"),
                    }
                }
            })
            .collect::<anyhow::Result<Vec<_>>>();
        let _ = trigger.join();
        results
    })
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// One fault: fresh worker processes, a warm-up and a failure-free run, then the faulted run.
fn one(dir: &Path, sig: &str) -> anyhow::Result<FailoverRun> {
    let specs = ["shard:0/2", "shard:1/2", "all"];
    let (workers, addrs): (ChildProcesses, Vec<String>) = spawn_worker_processes(dir, &specs)?;
    let rt = tokio::runtime::Runtime::new()?;
    let cfg = EngineConfig { max_running: 64, prefix_cache: false, ..Default::default() };
    let engine = rt.block_on(moe_cluster::remote(dir, &addrs, GrpcTransportConfig::default(), cfg))?;
    run(&engine, None, || {})?; // warm-up: every worker builds its call-time history
    let base_start = Instant::now();
    let base = run(&engine, None, || {})?;
    let baseline = base_start.elapsed();
    let pid = workers.pid(0);
    eprintln!("failover: {sig} the first worker a third of the way into the run");
    let faulted = run(&engine, Some(baseline / 3), || signal(pid, sig))?;
    if sig == "-STOP" {
        signal(pid, "-CONT");
    }
    // Signed: on this noisy machine a faulted run can finish before the failure-free one.
    let delays: Vec<f64> =
        base.iter().zip(&faulted).map(|(b, f)| (f.1.as_secs_f64() - b.1.as_secs_f64()) * 1e3).collect();
    let max_delay_ms = delays.iter().copied().fold(f64::MIN, f64::max);
    Ok(FailoverRun {
        fault: if sig == "-STOP" { "SIGSTOP" } else { "SIGKILL" }.to_string(),
        requests: REQUESTS,
        new_tokens: NEW_TOKENS,
        baseline_ms: baseline.as_secs_f64() * 1e3,
        delay_ms: Percentiles::of(delays),
        max_delay_ms,
        identical: base.iter().zip(&faulted).all(|(b, f)| b.0 == f.0),
    })
}

/// A frozen and a killed worker, each on a fresh set of worker processes.
pub fn measure(dir: &Path) -> anyhow::Result<Vec<FailoverRun>> {
    ["-STOP", "-KILL"].iter().map(|sig| one(dir, sig)).collect()
}

pub fn print(runs: &[FailoverRun]) {
    println!();
    println!(
        "failover, router + 3 worker processes (two halves and a replica of all experts), {REQUESTS} requests x {NEW_TOKENS} tokens, default dispatch settings:"
    );
    for r in runs {
        println!(
            "  first worker {} a third into the run: delay per request p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (failure-free run {:.0} ms), tokens {}",
            r.fault,
            r.delay_ms.median,
            r.delay_ms.p99,
            r.max_delay_ms,
            r.baseline_ms,
            if r.identical { "identical" } else { "DIFFERENT" }
        );
    }
}
