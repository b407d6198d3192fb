//! Deterministic inference: the same 16 greedy requests with logprobs (prompts of 1 to 200
//! tokens, 48 new tokens each) give the same token ids and the same logprob bits one at a time,
//! all at once in random arrival order, with small and large prefill chunks, on 1 or 3 embedded
//! workers, over gRPC with two-batch overlap, with hedges answered by a replica, and with a
//! worker SIGKILLed mid-run; with bf16 on the wire, the same holds among its own runs. A mixed
//! batch of base, gate-LoRA and expert-LoRA requests gives each request its solo result.

mod common;

use common::relay::Relay;
use common::*;
use moe_dispatch::{GrpcTransportConfig, Hedging};
use moe_proto::v1::WireDtype;
use moe_router::{Engine, EngineConfig, Event, GenerationParams, PromptInput, ValidatedRequest};
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver as Receiver;

const NEW_TOKENS: usize = 48;

/// One request's token ids and the bits of their logprobs.
type Outcome = (Vec<u32>, Vec<u32>);

/// 16 prompts of 1 to 200 tokens.
fn prompts() -> Vec<Vec<u32>> {
    let lens = [1usize, 200, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 7, 30, 120, 64];
    lens.iter().enumerate().map(|(i, &n)| (0..n).map(|j| ((i * 37 + j * 11 + j * j) % 300) as u32).collect()).collect()
}

/// Submits one request: greedy, or sampled (temperature 1, top-p 0.9) with `seed`.
fn submit(engine: &Engine, prompt: &[u32], adapter: &str, seed: Option<u64>) -> Receiver<Event> {
    let params = GenerationParams {
        max_new_tokens: Some(NEW_TOKENS as u32),
        logprobs: true,
        adapter_id: adapter.to_string(),
        temperature: seed.map(|_| 1.0),
        top_p: seed.map(|_| 0.9),
        seed,
        ..Default::default()
    };
    let mut req = ValidatedRequest::new(
        PromptInput::Ids(prompt.to_vec()),
        &params,
        engine.codec(),
        engine.model_config(),
        Duration::from_secs(300),
    )
    .expect("valid request");
    if !adapter.is_empty() {
        req.adapter = Some(engine.adapters().expect("adapters").pin(adapter).expect("adapter"));
    }
    engine.submit(req).expect("submit").1
}

/// Reads events into `got` until it holds `until` tokens or the request ends.
fn read(rx: &mut Receiver<Event>, got: &mut Outcome, until: usize) {
    while got.0.len() < until {
        match rx.blocking_recv() {
            Some(Event::Delta { token_ids, logprobs, .. }) => {
                assert_eq!(token_ids.len(), logprobs.len(), "one logprob per token");
                got.0.extend(token_ids);
                got.1.extend(logprobs.iter().map(|l| l.to_bits()));
            }
            Some(Event::Finished { .. }) => return,
            Some(Event::Failed(e)) => panic!("request failed: {e}"),
            None => panic!("no terminal event"),
        }
    }
}

fn finish(mut rx: Receiver<Event>, mut got: Outcome) -> Outcome {
    read(&mut rx, &mut got, usize::MAX);
    assert_eq!(got.0.len(), NEW_TOKENS, "every request generates {NEW_TOKENS} tokens");
    got
}

/// A prompt, its adapter ("": none) and its sampling seed (`None`: greedy).
type Request<'a> = (&'a [u32], &'a str, Option<u64>);

/// Each request alone: submitted after the previous one finished.
fn one_at_a_time(engine: &Engine, reqs: &[Request<'_>]) -> Vec<Outcome> {
    reqs.iter().map(|(p, a, seed)| finish(submit(engine, p, a, *seed), Outcome::default())).collect()
}

/// Every request submitted at once, in a shuffled order with small random gaps; `midway` runs
/// once the first submitted request has produced 8 tokens (the others are in flight). Outcomes
/// come back in the order of `reqs`.
fn all_at_once(engine: &Engine, reqs: &[Request<'_>], seed: u64, midway: impl FnOnce()) -> Vec<Outcome> {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    let mut streams: Vec<Option<Receiver<Event>>> = (0..reqs.len()).map(|_| None).collect();
    for &i in &order {
        streams[i] = Some(submit(engine, reqs[i].0, reqs[i].1, reqs[i].2));
        std::thread::sleep(Duration::from_micros(next() % 3000));
    }
    let first = order[0];
    let mut early = Outcome::default();
    let mut first_rx = streams[first].take().expect("stream");
    read(&mut first_rx, &mut early, 8);
    midway();
    streams[first] = Some(first_rx);
    let mut partial = vec![Outcome::default(); reqs.len()];
    partial[first] = early;
    streams.into_iter().zip(partial).map(|(rx, got)| finish(rx.expect("stream"), got)).collect()
}

fn assert_same(name: &str, got: &[Outcome], want: &[Outcome]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.0, w.0, "{name}: request {i}'s tokens differ from one at a time");
        assert_eq!(g.1, w.1, "{name}: request {i}'s logprob bits differ from one at a time");
    }
}

fn engine_config(max_batch_tokens: usize, two_batch_overlap: bool) -> EngineConfig {
    EngineConfig { max_batch_tokens, two_batch_overlap, ..Default::default() }
}

fn worker(dir: &str, experts: &str) -> Server {
    spawn_server(&["worker", "--model", dir, "--experts", experts, "--listen", "127.0.0.1:0"])
}

/// A router engine in this process over gRPC workers; its dispatch metrics go to `metrics`.
fn remote(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    addrs: &[&str],
    wire: WireDtype,
    hedging: Hedging,
    cfg: EngineConfig,
    metrics: moe_metrics::Registry,
) -> Engine {
    let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let transport = GrpcTransportConfig { wire, hedging, metrics, ..Default::default() };
    rt.block_on(moe_cluster::remote(dir, &addrs, transport, cfg)).expect("router")
}

/// A small random model with top-4 routing (so a token's sum has enough terms for its order to
/// matter), no end-of-sequence token and a long context.
fn model(dir: &Path) {
    endless_model_sized(dir, 64, 2);
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    cfg["num_experts_per_tok"] = 4.into();
    std::fs::write(&path, cfg.to_string()).expect("write");
}

#[test]
fn outputs_are_bitwise_identical_across_batching_chunking_placement_hedging_and_failover() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    model(dir);
    let d = dir.to_str().expect("utf8");
    let prompts = prompts();
    let reqs: Vec<Request<'_>> = prompts.iter().map(|p| (p.as_slice(), "", None)).collect();
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    // (a) one at a time, on one embedded worker.
    let embedded = |workers: usize, cfg: EngineConfig| moe_cluster::embedded(dir, workers, cfg).expect("engine");
    let want = one_at_a_time(&embedded(1, EngineConfig::default()), &reqs);
    // The single-process model on its own experts agrees too.
    for i in [0, 1, 11] {
        assert_eq!(solo_greedy(dir, &prompts[i], NEW_TOKENS), want[i].0, "request {i}: local model");
    }
    // (b) all at once; (c) prefill chunks of 16 and 512 tokens; (d) three embedded workers.
    assert_same("all at once", &all_at_once(&embedded(1, EngineConfig::default()), &reqs, 1, || {}), &want);
    assert_same("chunks of 16", &all_at_once(&embedded(1, engine_config(16, false)), &reqs, 2, || {}), &want);
    assert_same("chunks of 512", &all_at_once(&embedded(1, engine_config(512, false)), &reqs, 3, || {}), &want);
    assert_same("3 workers", &all_at_once(&embedded(3, EngineConfig::default()), &reqs, 4, || {}), &want);

    // Over gRPC: two workers splitting the experts and a replica holding all of them.
    let bf16_reference = {
        let (a, b, r) = (worker(d, "*:0-3"), worker(d, "*:4-7"), worker(d, "all"));
        let owned = [a.addr.clone(), b.addr.clone(), r.addr.clone()];
        let addrs = [owned[0].as_str(), owned[1].as_str(), owned[2].as_str()];
        let cfg = engine_config(64, false);
        let one = one_at_a_time(
            &remote(&rt, dir, &addrs, WireDtype::Bf16, Hedging::Adaptive, cfg.clone(), Default::default()),
            &reqs,
        );
        let engine = remote(&rt, dir, &addrs, WireDtype::Bf16, Hedging::Adaptive, cfg.clone(), Default::default());
        assert_same("bf16 wire, all at once", &all_at_once(&engine, &reqs, 5, || {}), &one);
        let mut a = Some(a);
        let engine = remote(&rt, dir, &addrs, WireDtype::Bf16, Hedging::Adaptive, cfg, Default::default());
        let killed = all_at_once(&engine, &reqs, 6, || a = None);
        assert!(a.is_none());
        assert_same("bf16 wire, a worker killed mid-run", &killed, &one);
        one
    };
    assert!(bf16_reference.iter().zip(&want).any(|(b, f)| b.1 != f.1), "bf16 on the wire must change some logprob");

    let (a, b, r) = (worker(d, "*:0-3"), worker(d, "*:4-7"), worker(d, "all"));
    let owned = [a.addr.clone(), b.addr.clone(), r.addr.clone()];
    let addrs = [owned[0].as_str(), owned[1].as_str(), owned[2].as_str()];
    // (g) two-batch overlap.
    let engine =
        remote(&rt, dir, &addrs, WireDtype::F32, Hedging::Adaptive, engine_config(64, true), Default::default());
    assert_same("two-batch overlap", &all_at_once(&engine, &reqs, 7, || {}), &want);
    // (f) the first worker is slow, so its rows are hedged to (and answered by) the replica.
    let relay = Relay::start(&a.addr);
    relay.set_delay(Duration::from_millis(40));
    let slow = [relay.addr.as_str(), addrs[1], addrs[2]];
    let metrics = moe_metrics::Registry::new();
    let hedge = Hedging::After(Duration::from_millis(2));
    let engine = remote(&rt, dir, &slow, WireDtype::F32, hedge, engine_config(64, false), metrics.clone());
    assert_same("hedged to a replica", &all_at_once(&engine, &reqs, 8, || {}), &want);
    let won = metrics.value("moe_dispatch_hedges_total", &[("worker", slow[0]), ("winner", "replica")]);
    assert!(won.unwrap_or(0.0) >= 1.0, "no hedge was answered by the replica");
    // (e) the first worker is SIGKILLed mid-run; its rows fail over to the replica.
    let mut a = Some(a);
    let engine =
        remote(&rt, dir, &addrs, WireDtype::F32, Hedging::Adaptive, engine_config(64, false), Default::default());
    let killed = all_at_once(&engine, &reqs, 9, || a = None);
    assert!(a.is_none());
    assert_same("a worker killed mid-run", &killed, &want);
}

#[test]
fn a_mixed_batch_of_adapters_gives_each_request_its_solo_result() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("model");
    model(&dir);
    let adapters = tmp.path().join("adapters");
    write_random_adapter(&dir, &adapters.join("gate"), &["gate"], 4, 11);
    write_random_adapter(&dir, &adapters.join("experts"), &["experts"], 4, 12);
    let prompts = prompts();
    let names = ["", "gate", "experts"];
    let reqs: Vec<Request<'_>> = prompts.iter().enumerate().map(|(i, p)| (p.as_slice(), names[i % 3], None)).collect();
    let options = moe_cluster::AdapterOptions { dir: Some(adapters), ..Default::default() };
    let engine = moe_cluster::embedded_with(&dir, 2, EngineConfig::default(), &options).expect("engine");
    let solo = one_at_a_time(&engine, &reqs);
    assert_same("mixed adapters at once", &all_at_once(&engine, &reqs, 10, || {}), &solo);
    // The adapters matter: each changes some request's output against the base model.
    for name in ["gate", "experts"] {
        let i = names.iter().position(|n| *n == name).expect("name");
        let base = one_at_a_time(&engine, &[(prompts[i].as_slice(), "", None)]);
        assert_ne!(base[0].1, solo[i].1, "the {name} adapter changes nothing");
    }
}

/// Seeded sampling draws from each request's own generator: the same tokens alone and in a
/// batch, whatever its position.
#[test]
fn seeded_sampling_does_not_depend_on_the_batch() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    model(dir);
    let prompts = prompts();
    let reqs: Vec<Request<'_>> =
        prompts.iter().enumerate().map(|(i, p)| (p.as_slice(), "", Some(100 + i as u64))).collect();
    let engine = moe_cluster::embedded(dir, 2, EngineConfig::default()).expect("engine");
    let solo = one_at_a_time(&engine, &reqs);
    assert_same("seeded sampling at once", &all_at_once(&engine, &reqs, 11, || {}), &solo);
    let greedy = one_at_a_time(&engine, &[(prompts[0].as_slice(), "", None)]);
    assert_ne!(greedy[0].0, solo[0].0, "sampling at temperature 1 should leave the greedy path");
}

/// The 2026 architectures keep the invariant too: DeepSeek-V3's latent attention (its KV cache
/// holds the latent) and grouped sigmoid routing, GLM-4.5's partial rotary. Every request's tokens
/// and logprob bits are the same alone, all at once, with prefill chunks of 7 tokens, and with its
/// experts on three in-process workers.
#[test]
fn the_2026_architectures_are_batch_and_chunk_invariant() {
    for arch in ARCHS_2026 {
        let dir = fixture(arch);
        let prompts: Vec<Vec<u32>> = [1usize, 40, 3, 17, 29, 8, 45]
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| ((i * 37 + j * 11 + j * j) % 128) as u32).collect())
            .collect();
        let reqs: Vec<Request<'_>> = prompts.iter().map(|p| (p.as_slice(), "", None)).collect();
        let sampled: Vec<Request<'_>> = prompts.iter().map(|p| (p.as_slice(), "", Some(11))).collect();
        let embedded = |workers: usize, cfg: EngineConfig| moe_cluster::embedded(&dir, workers, cfg).expect("engine");
        let short = EngineConfig { max_batch_tokens: 7, ..Default::default() };
        for (name, reqs) in [("greedy", &reqs), ("sampled", &sampled)] {
            let want = one_at_a_time(&embedded(1, EngineConfig::default()), reqs);
            let all = all_at_once(&embedded(1, EngineConfig::default()), reqs, 1, || {});
            assert_same(&format!("{arch} {name}: all at once"), &all, &want);
            let chunked = all_at_once(&embedded(1, short.clone()), reqs, 2, || {});
            assert_same(&format!("{arch} {name}: chunks of 7"), &chunked, &want);
            let spread = all_at_once(&embedded(3, EngineConfig::default()), reqs, 3, || {});
            assert_same(&format!("{arch} {name}: 3 workers"), &spread, &want);
        }
    }
}

/// Adapters on the 2026 architectures keep it as well: requests of every PEFT adapter of the
/// fixture (DeepSeek-V3's latent attention pairs with `kv_b_proj` absorbed, gpt-oss's interleaved
/// experts, Qwen3-Next's gated attention, ...) and of the base model, batched together and with
/// prefill chunks of 7 tokens, each give their solo tokens and logprob bits.
#[test]
fn adapters_on_the_2026_architectures_mix_in_one_batch() {
    for arch in ARCHS_2026 {
        let dir = fixture(arch);
        let peft = dir.join("peft");
        let mut names: Vec<String> = std::fs::read_dir(&peft)
            .expect("peft fixtures")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names.push(String::new());
        let prompts: Vec<Vec<u32>> = (0..2 * names.len())
            .map(|i| (0..[5usize, 23, 2, 31][i % 4]).map(|j| ((i * 29 + j * 13 + j * j) % 128) as u32).collect())
            .collect();
        let reqs: Vec<Request<'_>> =
            prompts.iter().enumerate().map(|(i, p)| (p.as_slice(), names[i % names.len()].as_str(), None)).collect();
        let options = moe_cluster::AdapterOptions { dir: Some(peft.clone()), ..Default::default() };
        let engine = |cfg: EngineConfig| moe_cluster::embedded_with(&dir, 2, cfg, &options).expect("engine");
        let want = one_at_a_time(&engine(EngineConfig::default()), &reqs);
        let all = all_at_once(&engine(EngineConfig::default()), &reqs, 1, || {});
        assert_same(&format!("{arch} adapters at once"), &all, &want);
        let short = EngineConfig { max_batch_tokens: 7, ..Default::default() };
        assert_same(&format!("{arch} adapters in chunks of 7"), &all_at_once(&engine(short), &reqs, 2, || {}), &want);
    }
}
