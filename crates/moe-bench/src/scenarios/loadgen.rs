//! `moe loadgen`: drives a router with a bounded number of requests at a fixed concurrency
//! (prompt lengths from a range, a share of streaming requests, adapters and tenant keys in
//! turn) and reports throughput, latency percentiles and outcomes by status code. It also checks
//! that every request reached exactly one terminal state: a stream that ends without a final
//! message, sends anything after it, reports a token count that differs from what it streamed,
//! or outlives its deadline plus a margin counts as a violation, and the run exits non-zero.
//! With several endpoints, requests go to them in turn, and a stream that breaks (its router
//! failed) resumes on the next endpoint after the tokens it received (`resumed` in the report);
//! a unary request is retried there. Progress goes to stderr as it runs (a bar on a terminal).

use anyhow::Context;
use clap::Args;
use moe_proto::resume::ResumeState;
use moe_proto::v1::generate_request::Prompt;
use moe_proto::v1::generate_stream_response::Event;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{GenerateRequest, ModelInfoRequest, SamplingParams, TokenIds};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct LoadgenArgs {
    /// The router (host:port or http://host:port); several, comma-separated, are used in turn
    /// and a broken stream resumes on the next.
    #[arg(long, env = "MOE_ENDPOINT")]
    pub endpoint: String,
    /// Requests in flight at once.
    #[arg(long, env = "MOE_CONCURRENCY", default_value_t = 8)]
    pub concurrency: usize,
    /// Requests in all (the run always stops).
    #[arg(long, env = "MOE_REQUESTS", default_value_t = 100)]
    pub requests: usize,
    /// Stop sending new requests after this many seconds (0: when --requests are sent).
    #[arg(long, env = "MOE_DURATION_SECS", default_value_t = 0.0)]
    pub duration_secs: f64,
    /// After a RESOURCE_EXHAUSTED answer, a client waits this long before its next request.
    #[arg(long, env = "MOE_SHED_BACKOFF_MS", default_value_t = 50)]
    pub shed_backoff_ms: u64,
    /// Samples this process's resident memory (Linux /proc) every second and reports its
    /// slope: the soak check (point it at the server).
    #[arg(long, env = "MOE_WATCH_PID")]
    pub watch_pid: Option<u32>,
    /// Prompt lengths in tokens, uniformly in MIN-MAX.
    #[arg(long, env = "MOE_PROMPT_LEN", default_value = "4-64")]
    pub prompt_len: String,
    #[arg(long, env = "MOE_MAX_NEW_TOKENS", default_value_t = 16)]
    pub max_new_tokens: u32,
    /// Share of requests that stream (0 to 1).
    #[arg(long, env = "MOE_STREAM_SHARE", default_value_t = 0.5)]
    pub stream_share: f64,
    /// Adapters to use in turn (repeatable; "" is the base model).
    #[arg(long, env = "MOE_ADAPTER")]
    pub adapter: Vec<String>,
    /// Tenant API keys to use in turn (repeatable).
    #[arg(long, env = "MOE_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_key: Vec<String>,
    /// Per-request deadline sent to the server, in ms.
    #[arg(long, env = "MOE_TIMEOUT_MS", default_value_t = 60_000)]
    pub timeout_ms: u64,
    #[arg(long, env = "MOE_SEED", default_value_t = 1)]
    pub seed: u64,
    #[arg(long, env = "MOE_JSON")]
    pub json: bool,
    /// Also write `report.json` (with every latency) and a self-contained `report.html` with
    /// the latency distribution into DIR.
    #[arg(long, env = "MOE_REPORT", value_name = "DIR")]
    pub report: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct Tally {
    outcomes: BTreeMap<String, usize>,
    latencies_ms: Vec<f64>,
    ttft_ms: Vec<f64>,
    tokens: usize,
    violations: Vec<String>,
    /// Streams resumed on another endpoint after a break, and unary requests retried there.
    resumed: usize,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn code_name(s: &tonic::Status) -> String {
    moe_router::outcome_label(s.code()).to_string()
}

pub fn run(a: LoadgenArgs) -> anyhow::Result<()> {
    let (lo, hi) = a
        .prompt_len
        .split_once('-')
        .and_then(|(l, h)| Some((l.trim().parse::<usize>().ok()?, h.trim().parse::<usize>().ok()?)))
        .filter(|(l, h)| *l >= 1 && l <= h)
        .context("--prompt-len must be MIN-MAX with 1 <= MIN <= MAX")?;
    anyhow::ensure!(a.concurrency > 0, "--concurrency must be at least 1");
    anyhow::ensure!((0.0..=1.0).contains(&a.stream_share), "--stream-share must be between 0 and 1");
    let uris: Vec<String> = a
        .endpoint
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| if e.contains("://") { e.to_string() } else { format!("http://{e}") })
        .collect();
    anyhow::ensure!(!uris.is_empty(), "--endpoint is empty");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mut clients = Vec::new();
        for uri in &uris {
            // The first must answer now; the others connect when first used.
            let ep = tonic::transport::Endpoint::from_shared(uri.clone())?.tcp_nodelay(true);
            let channel = if clients.is_empty() {
                ep.connect().await.with_context(|| format!("cannot connect to {uri}"))?
            } else {
                ep.connect_lazy()
            };
            clients.push(InferenceClient::new(channel));
        }
        let client = clients[0].clone();
        // With tenants, ModelInfo needs a key like every other RPC: use the first.
        let mut info = tonic::Request::new(ModelInfoRequest {});
        if let Some(v) = a.api_key.first().and_then(|k| format!("Bearer {k}").parse().ok()) {
            info.metadata_mut().insert("authorization", v);
        }
        let vocab = client.clone().model_info(info).await.map_err(|s| anyhow::anyhow!("ModelInfo: {s}"))?;
        let vocab = vocab.into_inner().vocab_size.max(1) as u64;
        let next = Arc::new(AtomicUsize::new(0));
        let issued = Arc::new(AtomicUsize::new(0));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let a = Arc::new(a);
        let started = Instant::now();
        let until = (a.duration_secs > 0.0).then(|| started + Duration::from_secs_f64(a.duration_secs));
        let samples: Samples = Arc::default();
        let rss = a.watch_pid.map(|pid| tokio::spawn(sample_rss(pid, started, samples.clone())));
        let snapshot = {
            let tally = tally.clone();
            move || {
                let t = tally.lock().unwrap_or_else(|p| p.into_inner());
                let done: usize = t.outcomes.values().sum();
                let mut lat = t.latencies_ms.clone();
                let ok = t.outcomes.get("ok").copied().unwrap_or(0);
                super::progress::Snapshot {
                    done,
                    errors: done - ok,
                    p50_ms: pct(&mut lat, 0.5),
                    p99_ms: pct(&mut lat, 0.99),
                }
            }
        };
        let progress = super::progress::spawn(a.requests, started, snapshot.clone());
        let mut tasks = Vec::new();
        for _ in 0..a.concurrency {
            let (mut clients, next, tally, a) = (clients.clone(), next.clone(), tally.clone(), a.clone());
            let issued = issued.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    if until.is_some_and(|u| Instant::now() >= u) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= a.requests {
                        return;
                    }
                    issued.fetch_add(1, Ordering::Relaxed);
                    // The project's generator seeded by (seed, i): the same run every time.
                    let mut rng = moe_compute::rng::SplitMix64::new(
                        a.seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                    );
                    let mut rnd = || rng.next_u64();
                    let len = lo + (rnd() as usize) % (hi - lo + 1);
                    let ids: Vec<u32> = (0..len).map(|_| (rnd() % vocab) as u32).collect();
                    let stream = (rnd() % 10_000) as f64 / 10_000.0 < a.stream_share;
                    let adapter = if a.adapter.is_empty() { String::new() } else { a.adapter[i % a.adapter.len()].clone() };
                    let req = GenerateRequest {
                        prompt: Some(Prompt::TokenIds(TokenIds { ids })),
                        sampling: Some(SamplingParams { max_new_tokens: Some(a.max_new_tokens), ..Default::default() }),
                        adapter_id: adapter,
                        timeout_ms: a.timeout_ms as u32,
                        cache_salt: String::new(),
                        priority: 0,
                        resume: None,
                        constraint: None,
                    };
                    let key = (!a.api_key.is_empty()).then(|| a.api_key[i % a.api_key.len()].clone());
                    let limit = Duration::from_millis(a.timeout_ms) + Duration::from_secs(5);
                    let t0 = Instant::now();
                    let target = Target { clients: &mut clients, first: i, key: key.as_deref() };
                    let result = tokio::time::timeout(limit, one(target, req, stream, t0)).await;
                    let elapsed = t0.elapsed().as_secs_f64() * 1e3;
                    let shed = matches!(&result, Ok(Ok(Ended::Status(c))) if c == "resource_exhausted");
                    {
                    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                    match result {
                        Err(_) => {
                            t.violations.push(format!("request {i}: no terminal state within {} ms", limit.as_millis()));
                            *t.outcomes.entry("hung".into()).or_default() += 1;
                        }
                        Ok(Err(v)) => {
                            t.violations.push(format!("request {i}: {v}"));
                            *t.outcomes.entry("violation".into()).or_default() += 1;
                        }
                        Ok(Ok(Ended::Ok { tokens, ttft_ms, resumed })) => {
                            *t.outcomes.entry("ok".into()).or_default() += 1;
                            t.resumed += resumed;
                            t.tokens += tokens;
                            t.latencies_ms.push(elapsed);
                            if let Some(x) = ttft_ms {
                                t.ttft_ms.push(x);
                            }
                        }
                        Ok(Ok(Ended::Status(code))) => *t.outcomes.entry(code).or_default() += 1,
                    }
                    }
                    if shed {
                        tokio::time::sleep(Duration::from_millis(a.shed_backoff_ms)).await;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.context("a load task panicked")?;
        }
        progress.abort();
        super::progress::finish(&snapshot(), a.requests, started.elapsed());
        let secs = started.elapsed().as_secs_f64();
        let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
        let ended: usize = t.outcomes.values().sum();
        let sent = issued.load(Ordering::Relaxed);
        if ended != sent {
            let msg = format!("{sent} requests sent, {ended} accounted for");
            t.violations.push(msg);
        }
        let rss = match rss {
            Some(task) => {
                task.abort();
                let v = samples.lock().map(|v| v.clone()).unwrap_or_default();
                rss_report(&v)
            }
            None => serde_json::Value::Null,
        };
        let report = serde_json::json!({
            "requests": sent,
            "concurrency": a.concurrency,
            "seconds": secs,
            "requests_per_s": sent as f64 / secs.max(1e-9),
            "tokens_per_s": t.tokens as f64 / secs.max(1e-9),
            "latency_ms": {"p50": pct(&mut t.latencies_ms, 0.5), "p90": pct(&mut t.latencies_ms, 0.9), "p99": pct(&mut t.latencies_ms, 0.99)},
            "ttft_ms": {"p50": pct(&mut t.ttft_ms, 0.5), "p99": pct(&mut t.ttft_ms, 0.99)},
            "outcomes": t.outcomes,
            "resumed": t.resumed,
            "violations": t.violations,
            "rss": rss,
        });
        if let Some(dir) = &a.report {
            crate::report::loadgen_report(&report, &t.latencies_ms, &t.ttft_ms)?.write(dir)?;
        }
        if a.json {
            println!("{report}");
        } else {
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        anyhow::ensure!(t.violations.is_empty(), "{} requests broke the terminal-state rule", t.violations.len());
        Ok(())
    })
}

enum Ended {
    /// Tokens in all, time to the first, and how many times the request moved to another
    /// endpoint.
    Ok {
        tokens: usize,
        ttft_ms: Option<f64>,
        resumed: usize,
    },
    Status(String),
}

/// Where a request goes: endpoints in turn from `first`, with the tenant key.
struct Target<'a> {
    clients: &'a mut [InferenceClient<tonic::transport::Channel>],
    first: usize,
    key: Option<&'a str>,
}

impl Target<'_> {
    fn request(&self, req: GenerateRequest) -> tonic::Request<GenerateRequest> {
        let mut r = tonic::Request::new(req);
        if let Some(v) = self.key.and_then(|k| format!("Bearer {k}").parse().ok()) {
            r.metadata_mut().insert("authorization", v);
        }
        r
    }
}

/// A failure another router might not have: its router went away (reset, refused, draining,
/// its engine stopped). Shared with `moe generate --endpoint A,B`.
pub fn router_gone(s: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Internal | Code::Aborted)
}

/// One request to its terminal state; `Err` is a broken rule. With several endpoints, a
/// request whose router went away moves to the next (a stream resumes after its tokens).
async fn one(t: Target<'_>, req: GenerateRequest, stream: bool, t0: Instant) -> Result<Ended, String> {
    let n = t.clients.len();
    let mut state = ResumeState::default();
    let (mut ttft, mut resumed) = (None, 0usize);
    for attempt in 0..n {
        let last = attempt + 1 == n;
        let mut client = t.clients[(t.first + attempt) % n].clone();
        if !stream {
            match client.generate(t.request(req.clone())).await {
                Ok(r) => {
                    let r = r.into_inner();
                    let usage = r.usage.map(|u| u.completion_tokens as usize).unwrap_or(usize::MAX);
                    if usage != r.token_ids.len() {
                        return Err(format!("usage says {usage} tokens, the answer has {}", r.token_ids.len()));
                    }
                    return Ok(Ended::Ok { tokens: r.token_ids.len(), ttft_ms: None, resumed });
                }
                Err(s) if !last && router_gone(&s) => {
                    resumed += 1;
                    continue;
                }
                Err(s) => return Ok(Ended::Status(code_name(&s))),
            }
        }
        let mut s = match client.generate_stream(t.request(state.request(&req))).await {
            Ok(s) => s.into_inner(),
            Err(st) if !last && router_gone(&st) => {
                resumed += 1;
                continue;
            }
            Err(st) => return Ok(Ended::Status(code_name(&st))),
        };
        let mut finished = None;
        loop {
            match s.message().await {
                Ok(Some(m)) => {
                    state.observe(&m);
                    match m.event {
                        _ if finished.is_some() => return Err("a message after the final one".into()),
                        Some(Event::Delta(d)) => {
                            if ttft.is_none() && !d.token_ids.is_empty() {
                                ttft = Some(t0.elapsed().as_secs_f64() * 1e3);
                            }
                        }
                        Some(Event::Finished(f)) => finished = Some(f.usage.map(|u| u.completion_tokens as usize)),
                        None => return Err("an empty stream message".into()),
                    }
                }
                Ok(None) => {
                    let tokens = state.generated.len();
                    return match finished {
                        Some(Some(n)) if n == tokens => Ok(Ended::Ok { tokens, ttft_ms: ttft, resumed }),
                        Some(n) => Err(format!("finished with usage {n:?} after streaming {tokens} tokens")),
                        None => Err("the stream ended without a final message or an error".into()),
                    };
                }
                Err(st) if finished.is_none() && !last && router_gone(&st) => {
                    resumed += 1;
                    break;
                }
                Err(st) if finished.is_none() => return Ok(Ended::Status(code_name(&st))),
                Err(st) => return Err(format!("an error after the final message: {st}")),
            }
        }
    }
    Err("every endpoint failed the request".into())
}

type Samples = Arc<Mutex<Vec<(f64, f64)>>>;

/// Appends (seconds since start, resident MiB of `pid`) to `into` once a second, until aborted.
async fn sample_rss(pid: u32, started: Instant, into: Samples) {
    loop {
        if let Some(mib) = rss_mib(pid) {
            if let Ok(mut v) = into.lock() {
                v.push((started.elapsed().as_secs_f64(), mib));
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// First, last and peak resident memory, and the least-squares slope over the second half of
/// the run (after warm-up), in MiB per minute.
fn rss_report(samples: &[(f64, f64)]) -> serde_json::Value {
    if samples.len() < 2 {
        return serde_json::json!({"samples": samples.len()});
    }
    let tail = &samples[samples.len() / 2..];
    let n = tail.len() as f64;
    let (mt, mr) = (tail.iter().map(|s| s.0).sum::<f64>() / n, tail.iter().map(|s| s.1).sum::<f64>() / n);
    let cov: f64 = tail.iter().map(|s| (s.0 - mt) * (s.1 - mr)).sum();
    let var: f64 = tail.iter().map(|s| (s.0 - mt).powi(2)).sum();
    let slope = if var > 0.0 { cov / var * 60.0 } else { 0.0 };
    serde_json::json!({
        "samples": samples.len(),
        "first_mib": samples[0].1,
        "last_mib": samples[samples.len() - 1].1,
        "peak_mib": samples.iter().map(|s| s.1).fold(0.0, f64::max),
        "slope_mib_per_min_second_half": slope,
    })
}
