//! `moe bench-placement`: the skewed-tenant scenario. The trained demo model (its tenants' gate
//! adapters send prose to experts 0-3 and code to 4-7) is served by a router process over four
//! worker processes (`shard:i/4`, each with room for twice its experts), registered in etcd,
//! with a relay adding a round trip between router and each worker. Clients of three tenants
//! (prose adapter, code adapter, base model) keep the router busy while their traffic shares
//! shift (prose-heavy, then code-heavy, then prose-heavy again). The same run happens twice:
//! with static sharding, and with the router's planner (`--rebalance-every`).
//!
//! Measured each second from the router's `/metrics`: the dispatch balance (mean / max pairs
//! over workers per layer call) and the pairs per call; per phase: the mean balance, and for
//! the planner the time from the shift to the first second at or above 0.85. Because the
//! workers here share this machine's cores, the decode step is also projected for separate
//! machines: per layer call, the busiest worker's pairs times the measured cost of one (row,
//! expert) pair, plus the round trip.

use crate::processes::{spawn_worker_processes_with, ChildProcesses};
use anyhow::Context;
use clap::Args;
use moe_compute::rng::SplitMix64;
use moe_proto::v1::generate_request::Prompt;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{GenerateRequest, ModelInfoRequest, SamplingParams};
use serde::Serialize;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct BenchPlacementArgs {
    /// Seconds per phase of the tenant mix (three phases).
    #[arg(long, env = "MOE_BENCH_PHASE_SECS", default_value_t = 30)]
    pub phase_secs: u64,
    /// The planner's interval (the router's --rebalance-every).
    #[arg(long, env = "MOE_BENCH_REBALANCE_EVERY", default_value_t = 5)]
    pub rebalance_every: u64,
    /// Round trip the relays add between the router and each worker, in microseconds.
    #[arg(long, env = "MOE_BENCH_RTT_US", default_value_t = 200)]
    pub rtt_us: u64,
    /// Concurrent client requests (a decode step's rows; with few, a layer call has too few
    /// (row, expert) pairs to spread evenly over four workers).
    #[arg(long, env = "MOE_BENCH_CONCURRENCY", default_value_t = 32)]
    pub concurrency: usize,
    /// The planner's target balance (the router's --rebalance-target).
    #[arg(long, env = "MOE_BENCH_TARGET", default_value_t = 0.95)]
    pub target: f64,
    /// An etcd to use (default: start `etcd` from PATH on free loopback ports).
    #[arg(long, env = "MOE_ETCD")]
    pub etcd: Option<String>,
    /// Print JSON.
    #[arg(long, env = "MOE_JSON")]
    pub json: bool,
    /// Also write `report.json` and a self-contained `report.html` with charts into DIR.
    #[arg(long, env = "MOE_REPORT", value_name = "DIR")]
    pub report: Option<PathBuf>,
}

const WORKERS: usize = 4;
const NEW_TOKENS: u32 = 12;
const GOAL: f64 = 0.85;
/// Tenant shares per phase: (prose adapter, code adapter, base model).
const PHASES: [(&str, [f64; 3]); 3] =
    [("prose-heavy", [0.8, 0.1, 0.1]), ("code-heavy", [0.1, 0.8, 0.1]), ("prose-heavy again", [0.8, 0.1, 0.1])];

#[derive(Serialize, Clone, Debug)]
pub struct PhaseResult {
    pub phase: String,
    /// Mean balance over the phase, and over its second half.
    pub balance: f64,
    pub balance_second_half: f64,
    /// Seconds from the phase's start to the first second at or above 0.85 (None: never).
    pub seconds_to_goal: Option<f64>,
    pub tokens_per_s: f64,
    /// Projected decode step on separate machines, and the tokens/s it gives.
    pub projected_step_ms: f64,
    pub projected_tokens_per_s: f64,
}

#[derive(Serialize, Debug)]
pub struct PlacementBench {
    pub rtt_us: u64,
    pub rebalance_every_s: u64,
    pub target: f64,
    pub concurrency: usize,
    pub phase_secs: u64,
    /// Measured cost of one (row, expert) pair on a worker, microseconds.
    pub pair_cost_us: f64,
    pub static_sharding: Vec<PhaseResult>,
    pub planner: Vec<PhaseResult>,
    /// Tokens per expert (summed over the MoE layers) per adapter, as the router of the planner
    /// run counted them over its last minute.
    pub expert_load: Vec<TenantLoad>,
    pub commit: String,
}

/// One tenant's (adapter's) tokens per expert.
#[derive(Serialize, Debug, Default)]
pub struct TenantLoad {
    pub adapter: String,
    pub tokens_per_expert: Vec<u64>,
}

/// The router's expert load per adapter, summed over layers.
fn tenant_load(grpc: &str) -> anyhow::Result<Vec<TenantLoad>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let load = rt.block_on(async {
        let mut client = InferenceClient::connect(format!("http://{grpc}")).await?;
        anyhow::Ok(client.expert_load(moe_proto::v1::ExpertLoadRequest {}).await?.into_inner())
    })?;
    let e = load.num_experts.max(1) as usize;
    Ok(load
        .adapters
        .iter()
        .map(|a| {
            let mut per = vec![0u64; e];
            for (i, n) in a.tokens.iter().enumerate() {
                per[i % e] += n;
            }
            TenantLoad { adapter: a.adapter.clone(), tokens_per_expert: per }
        })
        .collect())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_etcd(dir: &Path) -> anyhow::Result<(ChildProcesses, String)> {
    let (client, peer) = (free_port()?, free_port()?);
    let (c, p) = (format!("http://127.0.0.1:{client}"), format!("http://127.0.0.1:{peer}"));
    let child = Command::new("etcd")
        .args(["--name", "b", "--data-dir"])
        .arg(dir.join("etcd"))
        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c, "--listen-peer-urls", &p])
        .args(["--initial-advertise-peer-urls", &p, "--initial-cluster", &format!("b={p}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting etcd (install etcd-server, or pass --etcd URL)")?;
    let child = ChildProcesses::one(child);
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "etcd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((child, c))
}

/// Forwards loopback TCP to `upstream`, holding every chunk for `delay` in each direction.
fn relay(upstream: String, delay: Duration) -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(&upstream) else { continue };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            for (mut from, mut to) in
                [(client.try_clone(), server.try_clone()), (server.try_clone(), client.try_clone())]
                    .into_iter()
                    .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
            {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || (std::thread::sleep(delay), to.write_all(&buf[..n])).1.is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    Ok(addr)
}

/// `GET /metrics` over HTTP/1.1.
fn scrape(http: &str) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect(http)?;
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// The sum of the samples of `name` (every label set).
fn total(text: &str, name: &str) -> f64 {
    let series = text.lines().filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']));
    series.filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// One second's counters.
#[derive(Clone, Copy, Default)]
struct Tick {
    balance_sum: f64,
    calls: f64,
    pairs: f64,
    tokens: u64,
}

/// Per-pair cost of the demo's experts on this machine: a worker's grouped FFN over 512 rows
/// (top-2), timed in process.
fn pair_cost(dir: &Path) -> anyhow::Result<Duration> {
    use moe_worker::ComputeInput;
    let options = moe_cluster::HostOptions::default();
    let host = moe_cluster::expert_host(moe_cluster::Device::Cpu, dir, &moe_worker::ExpertSpec::All, &options)?;
    let h = moe_model::ModelConfig::from_dir(dir)?.hidden_size;
    let rows = 512usize;
    let x: Vec<f32> = (0..rows * h).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    let experts: Vec<u32> = (0..rows).flat_map(|r| [(r % 8) as u32, ((r + 3) % 8) as u32]).collect();
    let (weights, row_pairs) = (vec![0.5f32; 2 * rows], vec![2u32; rows]);
    let input = ComputeInput::base(1, h, &x, &row_pairs, &experts, &weights);
    let mut out = Vec::new();
    host.compute(&input, &mut out)?;
    let start = Instant::now();
    for _ in 0..5 {
        host.compute(&input, &mut out)?;
    }
    Ok(start.elapsed() / (5 * 2 * rows as u32))
}

struct Cluster {
    _workers: ChildProcesses,
    _router: ChildProcesses,
    grpc: String,
    http: String,
}

fn start_cluster(dir: &Path, etcd: &str, name: &str, a: &BenchPlacementArgs) -> anyhow::Result<Cluster> {
    let config = moe_model::ModelConfig::from_dir(dir)?;
    let per_expert = 3 * config.hidden_size * config.expert_intermediate_size * 2; // bf16 weights
    let budget_mb = (2 * 8 * per_expert).div_ceil(1 << 20).to_string();
    let delay = Duration::from_micros(a.rtt_us / 2);
    let mut specs = Vec::new();
    for i in 0..WORKERS {
        let port = free_port()?;
        let relayed = relay(format!("127.0.0.1:{port}"), delay)?;
        specs.push(vec![
            format!("--experts=shard:{i}/{WORKERS}"),
            format!("--listen=127.0.0.1:{port}"),
            format!("--advertise={relayed}"),
            format!("--etcd={etcd}"),
            format!("--cluster={name}"),
            format!("--max-expert-mb={budget_mb}"),
            format!("--adapter-dir={}", dir.join("adapters").display()),
            "--drain-quiet-ms=1000".into(),
        ]);
    }
    let (workers, _) = spawn_worker_processes_with(dir, &specs)?;
    let http = format!("127.0.0.1:{}", free_port()?);
    let grpc = format!("127.0.0.1:{}", free_port()?);
    let router = Command::new(std::env::current_exe()?)
        .args(["router", "--model"])
        .arg(dir)
        .args(["--etcd", etcd, "--cluster", name, "--listen", &grpc, "--http-listen", &http])
        .arg(format!("--adapter-dir={}", dir.join("adapters").display()))
        .arg(format!("--rebalance-every={}", if name.ends_with("planner") { a.rebalance_every } else { 0 }))
        .arg(format!("--rebalance-target={}", a.target))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let router = ChildProcesses::one(router);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let start = Instant::now();
    loop {
        let ready = rt.block_on(async {
            let mut c = InferenceClient::connect(format!("http://{grpc}")).await.ok()?;
            Some(c.model_info(ModelInfoRequest {}).await.ok()?.into_inner().workers)
        });
        if ready == Some(WORKERS as u32) {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(60), "the router did not see {WORKERS} workers");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(Cluster { _workers: workers, _router: router, grpc, http })
}

/// Runs the three phases against one cluster; returns each phase's seconds.
fn drive(c: &Cluster, a: &BenchPlacementArgs, prompts: &[Vec<String>; 2]) -> anyhow::Result<Vec<Vec<Tick>>> {
    let phase = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tokens = Arc::new(AtomicU64::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    for client in 0..a.concurrency {
        let (phase, stop, tokens, addr) = (phase.clone(), stop.clone(), tokens.clone(), c.grpc.clone());
        let prompts = prompts.clone();
        rt.spawn(async move {
            let mut rng = SplitMix64::new(client as u64 + 1);
            let Ok(mut rpc) = InferenceClient::connect(format!("http://{addr}")).await else { return };
            while !stop.load(Ordering::Relaxed) {
                let shares = PHASES[phase.load(Ordering::Relaxed).min(PHASES.len() - 1)].1;
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                let tenant = if u < shares[0] {
                    0
                } else if u < shares[0] + shares[1] {
                    1
                } else {
                    2
                };
                let domain = if tenant == 2 { (rng.next_u64() % 2) as usize } else { tenant };
                let texts = &prompts[domain];
                let text = texts[(rng.next_u64() % texts.len() as u64) as usize].clone();
                let req = GenerateRequest {
                    prompt: Some(Prompt::Text(text)),
                    sampling: Some(SamplingParams { max_new_tokens: Some(NEW_TOKENS), ..Default::default() }),
                    adapter_id: ["prose", "code", ""][tenant].into(),
                    ..Default::default()
                };
                if let Ok(r) = rpc.generate(req).await {
                    tokens.fetch_add(r.into_inner().token_ids.len() as u64, Ordering::Relaxed);
                }
            }
        });
    }
    let read = |text: &str| Tick {
        balance_sum: total(text, "moe_dispatch_balance_sum"),
        calls: total(text, "moe_dispatch_balance_count"),
        pairs: total(text, "moe_worker_pairs_per_call_sum"),
        tokens: tokens.load(Ordering::Relaxed),
    };
    let mut last = read(&scrape(&c.http)?);
    let mut phases = Vec::new();
    for p in 0..PHASES.len() {
        phase.store(p, Ordering::Relaxed);
        let mut ticks = Vec::new();
        let start = Instant::now();
        for s in 1..=a.phase_secs {
            std::thread::sleep((start + Duration::from_secs(s)).saturating_duration_since(Instant::now()));
            let now = read(&scrape(&c.http)?);
            ticks.push(Tick {
                balance_sum: now.balance_sum - last.balance_sum,
                calls: now.calls - last.calls,
                pairs: now.pairs - last.pairs,
                tokens: now.tokens - last.tokens,
            });
            last = now;
        }
        phases.push(ticks);
    }
    stop.store(true, Ordering::Relaxed);
    rt.shutdown_timeout(Duration::from_secs(5));
    Ok(phases)
}

fn summarize(ticks: &[Vec<Tick>], pair_cost: Duration, rtt: Duration, moe_layers: usize) -> Vec<PhaseResult> {
    let mean = |t: &[Tick]| {
        let (b, c) = t.iter().fold((0.0, 0.0), |(b, c), x| (b + x.balance_sum, c + x.calls));
        if c > 0.0 {
            b / c
        } else {
            0.0
        }
    };
    ticks
        .iter()
        .zip(PHASES)
        .map(|(t, (name, _))| {
            let balance = mean(t);
            let reached = t.iter().position(|x| x.calls > 0.0 && x.balance_sum / x.calls >= GOAL);
            let (pairs, calls) = t.iter().fold((0.0, 0.0), |(p, c), x| (p + x.pairs, c + x.calls));
            // Per layer call: the busiest worker's pairs (mean / balance) times their cost, plus
            // the round trip; a decode step runs every MoE layer once for its rows.
            let pairs_per_call = if calls > 0.0 { pairs / calls } else { 0.0 };
            let busiest = if balance > 0.0 { pairs_per_call / WORKERS as f64 / balance } else { 0.0 };
            let layer_s = busiest * pair_cost.as_secs_f64() + rtt.as_secs_f64();
            let step_s = layer_s * moe_layers as f64;
            let rows = pairs_per_call / 2.0;
            PhaseResult {
                phase: name.to_string(),
                balance,
                balance_second_half: mean(&t[t.len() / 2..]),
                seconds_to_goal: reached.map(|i| (i + 1) as f64),
                tokens_per_s: t.iter().map(|x| x.tokens).sum::<u64>() as f64 / t.len().max(1) as f64,
                projected_step_ms: step_s * 1e3,
                projected_tokens_per_s: if step_s > 0.0 { rows / step_s } else { 0.0 },
            }
        })
        .collect()
}

pub fn run(a: BenchPlacementArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.phase_secs >= 2 && a.rebalance_every >= 1 && a.concurrency >= 1,
        "durations and concurrency must be positive"
    );
    let dir: PathBuf = std::env::temp_dir().join(format!("moe-bench-placement-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    moe_demo::write_trained_demo(&dir).context("writing the trained demo")?;
    let result = run_in(&dir, &a);
    let _ = std::fs::remove_dir_all(&dir);
    let r = result?;
    if let Some(dir) = &a.report {
        crate::report::placement_report(&serde_json::to_value(&r)?)?.write(dir)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "skewed tenants on the trained demo, {WORKERS} workers, {} us round trip, {} concurrent requests, planner every {} s (target {}), {} s per phase; one (row, expert) pair costs {:.1} us",
        r.rtt_us, r.concurrency, r.rebalance_every_s, r.target, r.phase_secs, r.pair_cost_us
    );
    println!("| phase | static balance | planner balance (2nd half) | planner reached {GOAL} after | projected tokens/s static -> planner |");
    println!("|---|---|---|---|---|");
    for (s, p) in r.static_sharding.iter().zip(&r.planner) {
        let reached = p.seconds_to_goal.map_or("never".to_string(), |t| format!("{t:.0} s"));
        println!(
            "| {} | {:.2} | {:.2} ({:.2}) | {reached} | {:.0} -> {:.0} ({:.2}x) |",
            s.phase,
            s.balance,
            p.balance,
            p.balance_second_half,
            s.projected_tokens_per_s,
            p.projected_tokens_per_s,
            p.projected_tokens_per_s / s.projected_tokens_per_s.max(1e-9)
        );
    }
    Ok(())
}

fn run_in(dir: &Path, a: &BenchPlacementArgs) -> anyhow::Result<PlacementBench> {
    let _etcd;
    let etcd = match &a.etcd {
        Some(url) => url.clone(),
        None => {
            let (child, url) = start_etcd(dir)?;
            _etcd = child;
            url
        }
    };
    let heldout = moe_demo::trained::heldout_samples()?;
    let texts = |domain: &str| -> Vec<String> {
        let all = heldout.iter().find(|(d, _)| d == domain).map(|(_, t)| t.clone()).unwrap_or_default();
        all.iter().map(|t| t.chars().take(48).collect()).collect()
    };
    let prompts = [texts("prose"), texts("code")];
    anyhow::ensure!(prompts.iter().all(|p| !p.is_empty()), "the demo's held-out samples are missing");
    let cost = pair_cost(dir)?;
    let moe_layers = moe_model::ModelConfig::from_dir(dir)?.moe_layers().len();
    let rtt = Duration::from_micros(a.rtt_us);
    let mut runs = Vec::new();
    let mut expert_load = Vec::new();
    for name in ["static", "planner"] {
        let cluster = start_cluster(dir, &etcd, &format!("bench-{}-{name}", std::process::id()), a)?;
        let ticks = drive(&cluster, a, &prompts)?;
        runs.push(summarize(&ticks, cost, rtt, moe_layers));
        expert_load = tenant_load(&cluster.grpc)?;
    }
    let planner = runs.pop().unwrap_or_default();
    let static_sharding = runs.pop().unwrap_or_default();
    Ok(PlacementBench {
        rtt_us: a.rtt_us,
        rebalance_every_s: a.rebalance_every,
        target: a.target,
        concurrency: a.concurrency,
        phase_secs: a.phase_secs,
        pair_cost_us: cost.as_secs_f64() * 1e6,
        static_sharding,
        planner,
        expert_load,
        commit: crate::report::commit(),
    })
}
