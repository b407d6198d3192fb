//! Automatic prefix caching: a request that shares full KV pages with an earlier one reuses them
//! (`cached_tokens` says how many tokens) and gets the same token ids and logprob bits as with the
//! cache off, on the base model and with gate, attention and expert adapters; another adapter
//! (or the same id reloaded with new weights), tenant (scope `tenant`) or salt is a miss, scope `global` shares across tenants; under KV
//! pressure cached pages are evicted without failing a request that fits, and afterwards no page
//! is held. The equality also holds with the experts in two worker processes.

mod common;

use common::*;
use moe_router::{Engine, EngineConfig, Event, GenerationParams, PrefixCacheScope, PromptInput, ValidatedRequest};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

const NEW_TOKENS: u32 = 12;

/// What a request produced: token ids, logprob bits, and the cached prompt tokens reported.
#[derive(Debug, PartialEq)]
struct Outcome {
    tokens: Vec<u32>,
    logprob_bits: Vec<u32>,
    cached: usize,
}

struct Ask<'a> {
    prompt: &'a [u32],
    adapter: &'a str,
    tenant: Option<&'a str>,
    salt: Option<&'a str>,
}

fn ask<'a>(prompt: &'a [u32], adapter: &'a str) -> Ask<'a> {
    Ask { prompt, adapter, tenant: None, salt: None }
}

fn run(engine: &Engine, a: &Ask<'_>) -> Outcome {
    let params = GenerationParams {
        max_new_tokens: Some(NEW_TOKENS),
        logprobs: true,
        cache_salt: a.salt.map(str::to_string),
        ..Default::default()
    };
    let mut req = ValidatedRequest::new(
        PromptInput::Ids(a.prompt.to_vec()),
        &params,
        engine.codec(),
        engine.model_config(),
        Duration::from_secs(120),
    )
    .expect("valid request");
    if !a.adapter.is_empty() {
        req.adapter = Some(engine.adapters().expect("adapters").pin(a.adapter).expect("adapter"));
    }
    req.tenant = a.tenant.map(str::to_string);
    let mut rx = engine.submit(req).expect("submit").1;
    let mut out = Outcome { tokens: Vec::new(), logprob_bits: Vec::new(), cached: usize::MAX };
    loop {
        match rx.blocking_recv() {
            Some(Event::Delta { token_ids, logprobs, .. }) => {
                out.tokens.extend(token_ids);
                out.logprob_bits.extend(logprobs.iter().map(|l| l.to_bits()));
            }
            Some(Event::Finished { cached_tokens, .. }) => {
                out.cached = cached_tokens;
                return out;
            }
            Some(Event::Failed(e)) => panic!("request failed: {e}"),
            None => panic!("no terminal event"),
        }
    }
}

fn setup(dir: &Path) -> std::path::PathBuf {
    endless_model_sized(dir, 64, 2);
    let adapters = dir.join("adapters");
    write_random_adapter(dir, &adapters.join("gate"), &["gate"], 4, 21);
    write_random_adapter(dir, &adapters.join("attn"), &["q", "k", "v", "o"], 4, 22);
    write_random_adapter(dir, &adapters.join("experts"), &["experts"], 4, 23);
    adapters
}

fn engine(dir: &Path, adapters: &Path, cfg: EngineConfig) -> Engine {
    let options = moe_cluster::AdapterOptions { dir: Some(adapters.to_path_buf()), ..Default::default() };
    moe_cluster::embedded_with(dir, 2, cfg, &options).expect("engine")
}

fn no_page_held(engine: &Engine) {
    let stats = engine.stats();
    eventually("every page released", 10, || stats.referenced_pages.load(Ordering::SeqCst) == 0);
    assert_eq!(stats.free_pages.load(Ordering::SeqCst), stats.total_pages.load(Ordering::SeqCst));
}

/// A 40-token prefix (two full pages of 16 reusable) and two different continuations.
fn prompts() -> (Vec<u32>, Vec<u32>) {
    let prefix: Vec<u32> = (0..40u32).map(|j| (j * 13 + 7) % 300).collect();
    let a = [prefix.as_slice(), &[5, 6, 7]].concat();
    let b = [prefix.as_slice(), &[9, 8, 7, 6, 5, 4, 3]].concat();
    (a, b)
}

#[test]
fn a_shared_prefix_is_reused_and_changes_no_bit() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("model");
    let adapters = setup(&dir);
    let cached = engine(&dir, &adapters, EngineConfig::default());
    let plain = engine(&dir, &adapters, EngineConfig { prefix_cache: false, ..Default::default() });
    let (a, b) = prompts();
    for adapter in ["", "gate", "attn", "experts"] {
        let first = run(&cached, &ask(&a, adapter));
        assert_eq!(first.cached, 0, "{adapter:?}: nothing cached yet");
        let second = run(&cached, &ask(&b, adapter));
        assert_eq!(second.cached, 32, "{adapter:?}: two full pages of the shared prefix reused");
        let want = run(&plain, &ask(&b, adapter));
        assert_eq!(want.cached, 0, "the cache is off");
        assert_eq!(second.tokens, want.tokens, "{adapter:?}: tokens with the cache differ");
        assert_eq!(second.logprob_bits, want.logprob_bits, "{adapter:?}: logprobs with the cache differ");
        // The same prompt again reuses everything but the page holding its last token.
        assert_eq!(run(&cached, &ask(&b, adapter)).cached, 32);
    }
    // The adapters matter (so the equalities above compare different computations).
    assert_ne!(run(&plain, &ask(&b, "")).tokens, run(&plain, &ask(&b, "gate")).tokens);
    let hits = cached.metrics().value("moe_prefix_cache_hits_tokens_total", &[("tenant", "")]).unwrap_or(0.0);
    assert_eq!(hits, 4.0 * 64.0, "two hits of 32 tokens per adapter");
    no_page_held(&cached);
}

#[test]
fn adapters_tenants_and_salts_are_isolated() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("model");
    let adapters = setup(&dir);
    let (a, b) = prompts();
    let tenant_scope = engine(&dir, &adapters, EngineConfig::default());
    run(&tenant_scope, &Ask { tenant: Some("t1"), salt: Some("s"), ..ask(&a, "gate") });
    let miss = |ask: Ask<'_>| run(&tenant_scope, &ask).cached;
    assert_eq!(miss(Ask { tenant: Some("t1"), salt: Some("s"), ..ask(&b, "experts") }), 0, "another adapter");
    assert_eq!(miss(Ask { tenant: Some("t1"), salt: Some("s"), ..ask(&b, "") }), 0, "the base model");
    assert_eq!(miss(Ask { tenant: Some("t2"), salt: Some("s"), ..ask(&b, "gate") }), 0, "another tenant");
    assert_eq!(miss(Ask { tenant: Some("t1"), salt: Some("other"), ..ask(&b, "gate") }), 0, "another salt");
    assert_eq!(miss(Ask { tenant: Some("t1"), salt: None, ..ask(&b, "gate") }), 0, "no salt");
    assert_eq!(miss(Ask { tenant: Some("t1"), salt: Some("s"), ..ask(&b, "gate") }), 32, "everything equal: a hit");
    // The adapter updated in place and reloaded under the same id: its digest differs, a miss.
    write_random_adapter(&dir, &adapters.join("gate"), &["gate"], 4, 99);
    let catalog = tenant_scope.adapters().expect("adapters");
    catalog.unload("gate").expect("unload");
    catalog.load("gate", "gate").expect("reload");
    assert_eq!(miss(Ask { tenant: Some("t1"), salt: Some("s"), ..ask(&b, "gate") }), 0, "reloaded adapter");
    no_page_held(&tenant_scope);

    let global =
        engine(&dir, &adapters, EngineConfig { prefix_cache_scope: PrefixCacheScope::Global, ..Default::default() });
    run(&global, &Ask { tenant: Some("t1"), ..ask(&a, "gate") });
    assert_eq!(run(&global, &Ask { tenant: Some("t2"), ..ask(&b, "gate") }).cached, 32, "global: across tenants");
    assert_eq!(run(&global, &Ask { tenant: Some("t2"), ..ask(&b, "attn") }).cached, 0, "but not across adapters");
    no_page_held(&global);
}

#[test]
fn eviction_under_pressure_fails_nothing_and_releases_everything() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("model");
    let adapters = setup(&dir);
    // A KV cache of a few dozen pages: every new prompt must evict cached pages.
    let cfg = EngineConfig { kv_cache_bytes: 200 << 10, ..Default::default() };
    let engine = engine(&dir, &adapters, cfg);
    let total = engine.stats().total_pages.load(Ordering::SeqCst);
    assert!((8..100).contains(&total), "{total} pages");
    let prompts: Vec<Vec<u32>> =
        (0..24u32).map(|i| (0..(20 + (i % 5) * 9)).map(|j| (i * 31 + j * 7) % 300).collect()).collect();
    // Concurrent requests (each fits alone), in waves, so cached pages pile up and get evicted.
    for wave in prompts.chunks(6) {
        let handles: Vec<_> = wave
            .iter()
            .map(|p| {
                let (engine, p) = (engine.clone(), p.clone());
                std::thread::spawn(move || run(&engine, &ask(&p, "")))
            })
            .collect();
        for h in handles {
            let out = h.join().expect("request thread");
            assert_eq!(out.tokens.len(), NEW_TOKENS as usize, "every request completes");
        }
    }
    let evicted = engine.metrics().value("moe_prefix_cache_evicted_pages", &[]).unwrap_or(0.0);
    assert!(evicted > 0.0, "the cache was under pressure");
    // A repeat of the last prompt still hits what survived, and nothing stays held.
    let last = prompts.last().expect("prompts");
    assert!(run(&engine, &ask(last, "")).cached > 0);
    no_page_held(&engine);
    assert!(engine.stats().cached_pages.load(Ordering::SeqCst) > 0, "cached pages stay, all evictable");
}

#[test]
fn with_two_worker_processes_the_cache_changes_no_bit_either() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("model");
    let adapters = setup(&dir);
    let (d, a_dir) = (dir.to_str().expect("utf8"), adapters.to_str().expect("utf8"));
    let workers: Vec<Server> = ["shard:0/2", "shard:1/2"]
        .iter()
        .map(|s| {
            spawn_server(&["worker", "--model", d, "--experts", s, "--adapter-dir", a_dir, "--listen", "127.0.0.1:0"])
        })
        .collect();
    let addrs: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let options = moe_cluster::AdapterOptions { dir: Some(adapters.clone()), ..Default::default() };
    let remote = |cache: bool| {
        let cfg = EngineConfig { prefix_cache: cache, ..Default::default() };
        rt.block_on(moe_cluster::remote_on(
            moe_compute::Device::Cpu,
            &dir,
            &addrs,
            moe_dispatch::GrpcTransportConfig::default(),
            cfg,
            &options,
        ))
        .expect("router")
    };
    let (cached, plain) = (remote(true), remote(false));
    let (a, b) = prompts();
    for adapter in ["", "gate", "attn", "experts"] {
        run(&cached, &ask(&a, adapter));
        let second = run(&cached, &ask(&b, adapter));
        assert_eq!(second.cached, 32, "{adapter:?}");
        let want = run(&plain, &ask(&b, adapter));
        assert_eq!((second.tokens, second.logprob_bits), (want.tokens, want.logprob_bits), "{adapter:?}");
    }
    no_page_held(&cached);
}

/// The in-process cluster's experts, except that while `failing` is set no row is served: each
/// row is reported unserved and its experts' sum stays zero (as when a worker refuses a call or
/// an expert has no live holder).
struct FailingExperts {
    inner: moe_dispatch::Dispatcher<moe_dispatch::InProcessTransport>,
    failing: std::sync::atomic::AtomicBool,
}

impl<B: moe_compute::Backend> moe_model::ExpertExecutor<B> for FailingExperts {
    fn run_experts(&self, call: moe_model::LayerCall<'_, B>) -> moe_model::Result<()> {
        if !self.failing.load(Ordering::SeqCst) {
            return moe_model::ExpertExecutor::<B>::run_experts(&self.inner, call);
        }
        let rows = call.routes.choices.len() / call.routes.top_k.max(1);
        call.unserved.extend((0..rows as u32).map(|r| (r, "injected: no holder".to_string())));
        Ok(())
    }
}

/// Defect: a request that failed because some of its rows went unserved published its pages
/// (written without those experts) to the prefix cache, and the next request with the same
/// prefix reused them and produced other tokens than a healthy cluster. Now its pages are never
/// shared: later requests compute the prefix afresh and equal a healthy cluster, in both scopes.
#[test]
fn a_failed_request_never_publishes_its_pages() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("model");
    let adapters = setup(&dir);
    let (a, _) = prompts();
    let healthy = engine(&dir, &adapters, EngineConfig { prefix_cache: false, ..Default::default() });
    let want = run(&healthy, &ask(&a, ""));
    for scope in [PrefixCacheScope::Tenant, PrefixCacheScope::Global] {
        let experts = std::sync::Arc::new(FailingExperts {
            inner: moe_cluster::in_process_dispatcher(&dir, 2).expect("dispatcher"),
            failing: std::sync::atomic::AtomicBool::new(true),
        });
        let backend = moe_compute::cpu::CpuBackend::new();
        let (model, codec) = moe_cluster::load_router_model(&dir, backend).expect("model");
        let parts = moe_router::EngineParts { model, codec, experts: Some(experts.clone()), adapters: None };
        let cfg = EngineConfig { prefix_cache_scope: scope, ..Default::default() };
        let engine = Engine::start(parts, cfg).expect("engine");
        let params = GenerationParams { max_new_tokens: Some(NEW_TOKENS), ..Default::default() };
        let req = ValidatedRequest::new(
            PromptInput::Ids(a.clone()),
            &params,
            engine.codec(),
            engine.model_config(),
            Duration::from_secs(60),
        )
        .expect("valid request");
        let mut rx = engine.submit(req).expect("submit").1;
        match rx.blocking_recv() {
            Some(Event::Failed(e)) => assert!(e.to_string().contains("injected"), "{e}"),
            other => panic!("{scope:?}: the request with unserved rows must fail, got {other:?}"),
        }
        experts.failing.store(false, Ordering::SeqCst);
        let after = run(&engine, &ask(&a, ""));
        assert_eq!(after.cached, 0, "{scope:?}: the failed request's pages were published");
        assert_eq!((&after.tokens, &after.logprob_bits), (&want.tokens, &want.logprob_bits), "{scope:?}");
        // Healthy requests still publish: the same prompt again hits.
        assert_eq!(run(&engine, &ask(&a, "")).cached, 32, "{scope:?}");
        no_page_held(&engine);
    }
}

/// The prefix cache on the 2026 architectures: DeepSeek-V3's pages hold latent rows (one
/// `kv_lora_rank + qk_rope_head_dim` row per token, no separate values), GLM-4.5's partial-rotary
/// keys; a hit reuses them and changes no bit.
#[test]
fn the_2026_architectures_reuse_prefixes_without_changing_a_bit() {
    for arch in ARCHS_2026 {
        let dir = fixture(arch);
        let (a, b) = prompts();
        let (a, b): (Vec<u32>, Vec<u32>) = (a.iter().map(|t| t % 128).collect(), b.iter().map(|t| t % 128).collect());
        let cached = moe_cluster::embedded(&dir, 2, EngineConfig::default()).expect("engine");
        let plain =
            moe_cluster::embedded(&dir, 2, EngineConfig { prefix_cache: false, ..Default::default() }).expect("engine");
        assert_eq!(run(&cached, &ask(&a, "")).cached, 0, "{arch}");
        let second = run(&cached, &ask(&b, ""));
        assert_eq!(second.cached, 32, "{arch}: two full pages of the shared prefix reused");
        let want = run(&plain, &ask(&b, ""));
        assert_eq!((&second.tokens, &second.logprob_bits), (&want.tokens, &want.logprob_bits), "{arch}");
        no_page_held(&cached);
    }
}
