//! `moe bench`'s fairness scenario, run under `--scheduling fair` and `fcfs` side by side on the
//! same model, 16 sequences running at most: the time to first token of one tenant's
//! one-at-a-time 8-token requests alone and while another tenant keeps 64 requests of 64 tokens in
//! flight; the share of generated tokens of a tenant with 16 requests in flight beside one with
//! 64, and of the heavier of two tenants weighted 2:1 (both backlogged, counts of tokens);
//! preemptions; and one tenant's throughput alone, fair against first-come-first-served.

use crate::Percentiles;
use moe_router::{Engine, EngineConfig, Event, GenerationParams, PromptInput, Scheduling, SchedulingConfig};
use serde::Serialize;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MAX_RUNNING: usize = 16;
const FLOOD_TOKENS: u32 = 64;
const PROBE_TOKENS: u32 = 8;
const PROBES: usize = 15;

#[derive(Serialize)]
pub struct FairnessRun {
    pub max_running: usize,
    pub fair: FairnessSide,
    pub fcfs: FairnessSide,
    /// One tenant's tokens/s under fair scheduling over first-come-first-served.
    pub single_tenant_ratio: f64,
}

#[derive(Serialize)]
pub struct FairnessSide {
    pub idle_ttft_ms: Percentiles,
    /// While another tenant keeps 64 requests of 64 tokens in flight.
    pub loaded_ttft_ms: Percentiles,
    /// Loaded over idle median.
    pub ttft_ratio: f64,
    /// Generated-token share of the tenant with 16 in flight beside one with 64.
    pub smaller_tenant_share: f64,
    /// Generated-token share of the weight-2 tenant beside a weight-1 one.
    pub weighted_share: f64,
    pub preemptions: f64,
    /// One tenant, 32 requests in flight: generated tokens per second (median of 3 rounds
    /// interleaved with the other policy's).
    pub single_tenant_tokens_per_s: f64,
}

fn request(
    engine: &Engine,
    tenant: &str,
    weight: f64,
    seed: usize,
    new_tokens: u32,
) -> anyhow::Result<moe_router::ValidatedRequest> {
    let vocab = engine.model_config().vocab_size as u32;
    let prompt: Vec<u32> =
        (0..8u32).map(|i| (seed as u32).wrapping_mul(2654435761).wrapping_add(i * 7919) % vocab).collect();
    let params = GenerationParams { max_new_tokens: Some(new_tokens), ..Default::default() };
    let mut req = moe_router::ValidatedRequest::new(
        PromptInput::Ids(prompt),
        &params,
        engine.codec(),
        engine.model_config(),
        Duration::from_secs(3600),
    )?;
    req.tenant = Some(tenant.into());
    req.share_weight = weight;
    Ok(req)
}

/// Runs a request to its end; its time to first token.
fn run_one(engine: &Engine, req: moe_router::ValidatedRequest) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut rx = engine.submit(req)?.1;
    let mut ttft = None;
    loop {
        match rx.blocking_recv() {
            Some(Event::Delta { .. }) => {
                ttft.get_or_insert_with(|| start.elapsed());
            }
            Some(Event::Finished { .. }) => return Ok(ttft.unwrap_or_else(|| start.elapsed())),
            Some(Event::Failed(e)) => anyhow::bail!("{e}"),
            None => anyhow::bail!("the stream ended without a terminal event"),
        }
    }
}

/// Closed-loop clients: `(tenant, in flight, weight)`, each finished request replaced, until
/// `stop` is set. Counts completions in `done`.
fn flood(
    engine: &Arc<Engine>,
    clients: &[(&str, usize, f64)],
    stop: &Arc<AtomicBool>,
    done: &Arc<AtomicUsize>,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut threads = Vec::new();
    for (c, &(tenant, in_flight, weight)) in clients.iter().enumerate() {
        for slot in 0..in_flight {
            let (engine, stop, done, tenant) = (engine.clone(), stop.clone(), done.clone(), tenant.to_string());
            threads.push(std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let Ok(req) = request(&engine, &tenant, weight, (c * 1000 + slot) * 997 + n, FLOOD_TOKENS) else {
                        return;
                    };
                    if run_one(&engine, req).is_err() {
                        return;
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
    }
    threads
}

fn decode_tokens(engine: &Engine, tenant: &str) -> f64 {
    engine.metrics().value("moe_scheduled_tokens_total", &[("tenant", tenant), ("kind", "decode")]).unwrap_or(0.0)
}

fn wait_for(done: &AtomicUsize, n: usize) {
    while done.load(Ordering::SeqCst) < n {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The first client's share of generated tokens between the `from`-th and `to`-th completion.
fn share(engine: &Arc<Engine>, clients: [(&str, usize, f64); 2], from: usize, to: usize) -> f64 {
    let (stop, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let threads = flood(engine, &clients, &stop, &done);
    let marks = Mutex::new(Vec::new());
    for at in [from, to] {
        wait_for(&done, at);
        if let Ok(mut m) = marks.lock() {
            m.push((decode_tokens(engine, clients[0].0), decode_tokens(engine, clients[1].0)));
        }
    }
    stop.store(true, Ordering::SeqCst);
    threads.into_iter().for_each(|t| drop(t.join()));
    let m = marks.into_inner().unwrap_or_default();
    let (a, b) = (m[1].0 - m[0].0, m[1].1 - m[0].1);
    a / (a + b).max(1.0)
}

fn side(dir: &Path, workers: usize, policy: Scheduling) -> anyhow::Result<FairnessSide> {
    let name = if policy == Scheduling::Fair { "fair" } else { "fcfs" };
    let cfg = EngineConfig {
        max_running: MAX_RUNNING,
        scheduling: SchedulingConfig { policy, ..Default::default() },
        ..Default::default()
    };
    let engine = Arc::new(moe_cluster::embedded(dir, workers, cfg)?);
    eprintln!("fairness ({name}): idle time to first token");
    let probe = |engine: &Engine, k: usize| -> anyhow::Result<Vec<f64>> {
        (0..k)
            .map(|i| {
                Ok(run_one(engine, request(engine, "writers", 1.0, 50_000 + i, PROBE_TOKENS)?)?.as_secs_f64() * 1e3)
            })
            .collect()
    };
    probe(&engine, 2)?; // warm-up
    let idle = Percentiles::of(probe(&engine, PROBES)?);
    eprintln!("fairness ({name}): time to first token beside 64 requests of 64 tokens in flight");
    let (stop, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let threads = flood(&engine, &[("coders", 64, 1.0)], &stop, &done);
    wait_for(&done, 16);
    let loaded = Percentiles::of(probe(&engine, PROBES)?);
    stop.store(true, Ordering::SeqCst);
    threads.into_iter().for_each(|t| drop(t.join()));
    eprintln!("fairness ({name}): token shares, both tenants backlogged");
    let smaller = share(&engine, [("writers", 16, 1.0), ("coders", 64, 1.0)], 40, 140);
    let weighted = share(&engine, [("gold", 32, 2.0), ("bronze", 32, 1.0)], 40, 140);
    let preemptions = ["writers", "coders", "gold", "bronze"]
        .iter()
        .map(|t| engine.metrics().value("moe_preemptions_total", &[("tenant", t)]).unwrap_or(0.0))
        .sum();
    Ok(FairnessSide {
        ttft_ratio: loaded.median / idle.median.max(1e-9),
        idle_ttft_ms: idle,
        loaded_ttft_ms: loaded,
        smaller_tenant_share: smaller,
        weighted_share: weighted,
        preemptions,
        single_tenant_tokens_per_s: 0.0,
    })
}

/// One tenant alone keeping 32 requests in flight: generated tokens per second after warm-up.
fn single_tenant(dir: &Path, workers: usize, policy: Scheduling) -> anyhow::Result<f64> {
    let cfg = EngineConfig {
        max_running: MAX_RUNNING,
        scheduling: SchedulingConfig { policy, ..Default::default() },
        ..Default::default()
    };
    let engine = Arc::new(moe_cluster::embedded(dir, workers, cfg)?);
    let (stop, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let threads = flood(&engine, &[("solo", 32, 1.0)], &stop, &done);
    wait_for(&done, 16);
    let (t0, c0) = (Instant::now(), decode_tokens(&engine, "solo"));
    wait_for(&done, 64);
    let tps = (decode_tokens(&engine, "solo") - c0) / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    threads.into_iter().for_each(|t| drop(t.join()));
    Ok(tps)
}

pub fn measure(dir: &Path, workers: usize) -> anyhow::Result<FairnessRun> {
    let mut fair = side(dir, workers, Scheduling::Fair)?;
    let mut fcfs = side(dir, workers, Scheduling::Fcfs)?;
    // One tenant's throughput, interleaved rounds so that drift hits both policies alike.
    let (mut f, mut c) = (Vec::new(), Vec::new());
    for round in 0..3 {
        eprintln!("fairness: one tenant alone, 32 in flight, round {} of 3 (fair, then fcfs)", round + 1);
        f.push(single_tenant(dir, workers, Scheduling::Fair)?);
        c.push(single_tenant(dir, workers, Scheduling::Fcfs)?);
    }
    fair.single_tenant_tokens_per_s = Percentiles::of(f).median;
    fcfs.single_tenant_tokens_per_s = Percentiles::of(c).median;
    Ok(FairnessRun {
        max_running: MAX_RUNNING,
        single_tenant_ratio: fair.single_tenant_tokens_per_s / fcfs.single_tenant_tokens_per_s.max(1e-9),
        fair,
        fcfs,
    })
}

pub fn print(r: &FairnessRun) {
    println!();
    println!("fairness, {} running at most (fair | fcfs):", r.max_running);
    let row = |what: &str, f: String, c: String| println!("  {what:<58} {f:>10} | {c:>10}");
    let (f, c) = (&r.fair, &r.fcfs);
    row(
        "TTFT of an 8-token request alone, median ms",
        format!("{:.1}", f.idle_ttft_ms.median),
        format!("{:.1}", c.idle_ttft_ms.median),
    );
    row(
        "... beside 64 requests of 64 tokens in flight, median ms",
        format!("{:.1}", f.loaded_ttft_ms.median),
        format!("{:.1}", c.loaded_ttft_ms.median),
    );
    row("... loaded / idle", format!("{:.1}x", f.ttft_ratio), format!("{:.1}x", c.ttft_ratio));
    row(
        "token share, 16 in flight beside 64",
        format!("{:.2}", f.smaller_tenant_share),
        format!("{:.2}", c.smaller_tenant_share),
    );
    row(
        "token share of the weight-2 tenant beside weight 1",
        format!("{:.2}", f.weighted_share),
        format!("{:.2}", c.weighted_share),
    );
    row("preemptions", format!("{:.0}", f.preemptions), format!("{:.0}", c.preemptions));
    row(
        "one tenant alone, tokens/s",
        format!("{:.0}", f.single_tenant_tokens_per_s),
        format!("{:.0}", c.single_tenant_tokens_per_s),
    );
    println!("  one tenant's throughput, fair / fcfs: {:.3}", r.single_tenant_ratio);
}
