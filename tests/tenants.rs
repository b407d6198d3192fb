//! Adapters and tenants over the Inference API: a request's adapter changes its output exactly
//! as local generation with that adapter does; adapters load on first use, stay within the
//! resident limit by evicting the least recently used idle one, are never evicted or unloaded
//! while a request holds them; the admin RPCs and every tenant rule answer with their gRPC code.

mod common;

use common::*;
use moe_cluster::AdapterOptions;
use moe_lora::RegistryLimits;
use moe_proto::v1::generate_request::Prompt;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{
    GenerateRequest, GenerateStreamResponse, ListAdaptersRequest, LoadAdapterRequest, SamplingParams, TokenIds,
    UnloadAdapterRequest,
};
use moe_router::{Engine, EngineConfig, Tenants};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Code, Streaming};

const ACME: &str = "acme-key-0123456789";
const BETA: &str = "beta-key-0123456789";
const OPS: &str = "ops-key-0123456789ab";

/// An endless model, four random adapters a0..a3 and one for another model's shapes ("bad").
fn setup(tmp: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let model = tmp.join("model");
    let adapters = tmp.join("adapters");
    endless_model(&model);
    let kinds: [&[&str]; 4] = [&["gate"], &["q", "v", "gate"], &["experts"], &["o", "gate", "experts"]];
    for (i, k) in kinds.iter().enumerate() {
        write_random_adapter(&model, &adapters.join(format!("a{i}")), k, 4, 7 + i as u64);
    }
    write_random_adapter(&fixture("qwen3_moe"), &adapters.join("bad"), &["q"], 4, 1);
    (model, adapters)
}

fn engine(model: &Path, adapters: &Path, max_adapters: usize, tenants: Option<&str>) -> Engine {
    let opts = AdapterOptions {
        dir: Some(adapters.into()),
        limits: RegistryLimits { max_adapters, max_bytes: 1 << 30, ..Default::default() },
    };
    let e = moe_cluster::embedded_with(model, 2, EngineConfig::default(), &opts).expect("engine");
    match tenants {
        Some(t) => e.with_tenants(Arc::new(Tenants::parse(t).expect("tenants"))),
        None => e,
    }
}

fn gen(adapter: &str, max_new: u32, key: Option<&str>) -> tonic::Request<GenerateRequest> {
    let mut r = tonic::Request::new(GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: vec![5, 6, 7] })),
        sampling: Some(SamplingParams { max_new_tokens: Some(max_new), ..Default::default() }),
        adapter_id: adapter.into(),
        timeout_ms: 0,
        cache_salt: String::new(),
        resume: None,
        constraint: None,
        priority: 0,
    });
    if let Some(k) = key {
        r.metadata_mut().insert("authorization", format!("Bearer {k}").parse().expect("header"));
    }
    r
}

fn with_key<T>(msg: T, key: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(k) = key {
        r.metadata_mut().insert("authorization", format!("Bearer {k}").parse().expect("header"));
    }
    r
}

/// A long generation that is running (its first token arrived) and holds its adapter.
async fn hold(
    c: &mut InferenceClient<tonic::transport::Channel>,
    adapter: &str,
    key: Option<&str>,
) -> Streaming<GenerateStreamResponse> {
    let mut s = c.generate_stream(gen(adapter, 4000, key)).await.expect("stream").into_inner();
    assert!(s.message().await.expect("first message").is_some());
    s
}

async fn resident(c: &mut InferenceClient<tonic::transport::Channel>) -> Vec<(String, u32)> {
    let list = c.list_adapters(ListAdaptersRequest {}).await.expect("list").into_inner();
    list.adapters.into_iter().filter(|a| a.resident).map(|a| (a.id, a.pinned)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_output_equals_local_generation_with_that_adapter() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (model_dir, adapters) = setup(tmp.path());
    let server = serve_api(engine(&model_dir, &adapters, 8, None)).await;
    let mut c = api_client(&server.addr).await;
    let local = |adapter: Option<&str>| {
        let params = moe_router::GenerationParams {
            max_new_tokens: Some(12),
            adapter_id: adapter.unwrap_or_default().to_string(),
            ..Default::default()
        };
        solo_generate(&model_dir, &[5, 6, 7], params, Some(&adapters))
    };
    let base = c.generate(gen("", 12, None)).await.expect("base").into_inner().token_ids;
    assert_eq!(base, local(None));
    for id in ["a0", "a1", "a2", "a3"] {
        let got = c.generate(gen(id, 12, None)).await.expect("adapter request").into_inner().token_ids;
        assert_eq!(got, local(Some(id)), "adapter {id} over gRPC differs from local generation");
        assert_ne!(got, base, "adapter {id} did not change the output");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loading_eviction_pinning_and_admin_rpcs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (model_dir, adapters) = setup(tmp.path());
    let server = serve_api(engine(&model_dir, &adapters, 2, None)).await;
    let mut c = api_client(&server.addr).await;

    let all = c.list_adapters(ListAdaptersRequest {}).await.expect("list").into_inner();
    assert_eq!(all.max_adapters, 2);
    let ids: Vec<&str> = all.adapters.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, ["a0", "a1", "a2", "a3", "bad"]);
    assert!(all.adapters.iter().all(|a| !a.resident), "nothing loads before first use");

    // Loaded on first use; the least recently used idle adapter makes room.
    for id in ["a0", "a1", "a2"] {
        c.generate(gen(id, 2, None)).await.expect("generate");
    }
    assert_eq!(resident(&mut c).await, [("a1".into(), 0), ("a2".into(), 0)]);

    // A running request pins its adapter: a1 is held, so loading a0 evicts a2.
    let held_a1 = hold(&mut c, "a1", None).await;
    c.generate(gen("a0", 2, None)).await.expect("a0 again");
    assert_eq!(resident(&mut c).await, [("a0".into(), 0), ("a1".into(), 1)]);
    let err = c.unload_adapter(UnloadAdapterRequest { id: "a1".into() }).await.expect_err("pinned");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("in use"), "{}", err.message());
    // Both resident adapters held: a third is refused, and nothing held was dropped.
    let held_a0 = hold(&mut c, "a0", None).await;
    let err = c.generate(gen("a3", 2, None)).await.expect_err("full");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(resident(&mut c).await, [("a0".into(), 1), ("a1".into(), 1)]);
    // Released, they become evictable again.
    drop(held_a0);
    drop(held_a1);
    let mut ok = false;
    for _ in 0..200 {
        if c.generate(gen("a3", 2, None)).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "a3 never loaded after the pins were released");

    // Admin RPCs.
    let loaded = c.load_adapter(LoadAdapterRequest { id: "alias".into(), path: "a2".into() }).await.expect("load");
    let info = loaded.into_inner().adapter.expect("info");
    assert_eq!((info.id.as_str(), info.path.as_str(), info.resident), ("alias", "a2", true));
    assert_eq!(info.digest.len(), 16);
    c.generate(gen("alias", 2, None)).await.expect("alias usable");
    c.unload_adapter(UnloadAdapterRequest { id: "alias".into() }).await.expect("unload");
    for (req, code, needle) in [
        (LoadAdapterRequest { id: "x".into(), path: "../model".into() }, Code::InvalidArgument, "relative path"),
        (LoadAdapterRequest { id: "x".into(), path: "/etc".into() }, Code::InvalidArgument, "relative path"),
        (LoadAdapterRequest { id: "../x".into(), path: String::new() }, Code::InvalidArgument, "invalid adapter id"),
        (LoadAdapterRequest { id: "x".into(), path: "missing".into() }, Code::NotFound, "not found"),
        (LoadAdapterRequest { id: "bad".into(), path: String::new() }, Code::InvalidArgument, "q_proj"),
    ] {
        let err = c.load_adapter(req.clone()).await.expect_err("refused");
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
        assert!(err.message().contains(needle), "{req:?}: {}", err.message());
    }
    let err = c.unload_adapter(UnloadAdapterRequest { id: "never".into() }).await.expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    // A shape error names the module and the shapes; requests get the same, and the server
    // keeps serving.
    let err = c.generate(gen("bad", 2, None)).await.expect_err("bad adapter");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("self_attn.q_proj") && err.message().contains("[4, 64]"), "{}", err.message());
    for (id, code) in [("nope", Code::NotFound), ("../../etc", Code::InvalidArgument), ("a b", Code::InvalidArgument)] {
        let err = c.generate(gen(id, 2, None)).await.expect_err("refused");
        assert_eq!(err.code(), code, "{id}: {err:?}");
    }
    c.generate(gen("a0", 2, None)).await.expect("still serving");
    // Every pin is back once requests end.
    let mut pins = u32::MAX;
    for _ in 0..100 {
        pins = resident(&mut c).await.iter().map(|(_, p)| p).sum();
        if pins == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pins, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_rules_answer_with_their_codes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (model_dir, adapters) = setup(tmp.path());
    let tenants = format!(
        r#"
        [[tenants]]
        name = "acme"
        api_key = "{ACME}"
        adapters = ["a0"]
        max_concurrent = 1

        [[tenants]]
        name = "beta"
        api_key = "{BETA}"
        adapters = ["a1"]
        base_model = false

        [[tenants]]
        name = "ops"
        api_key = "{OPS}"
        adapters = ["*"]
        admin = true
        "#
    );
    let server = serve_api(engine(&model_dir, &adapters, 8, Some(&tenants))).await;
    let mut c = api_client(&server.addr).await;

    for (key, code) in [(None, Code::Unauthenticated), (Some("wrong-key-0123456789"), Code::Unauthenticated)] {
        let err = c.generate(gen("", 2, key)).await.expect_err("no access");
        assert_eq!(err.code(), code, "{key:?}: {err:?}");
        let err = c.list_adapters(with_key(ListAdaptersRequest {}, key)).await.expect_err("no access");
        assert_eq!(err.code(), code);
    }
    // A key in the wrong form is refused too (and no key is ever echoed back).
    let mut raw = gen("", 2, None);
    raw.metadata_mut().insert("authorization", ACME.parse().expect("header"));
    let err = c.generate(raw).await.expect_err("not bearer");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(!err.message().contains(ACME));

    c.generate(gen("a0", 2, Some(ACME))).await.expect("acme with its adapter");
    c.generate(gen("", 2, Some(ACME))).await.expect("acme on the base model");
    for (adapter, key) in [("a1", ACME), ("nope", ACME), ("a0", BETA), ("", BETA)] {
        let err = c.generate(gen(adapter, 2, Some(key))).await.expect_err("not theirs");
        assert_eq!(err.code(), Code::PermissionDenied, "{adapter:?} with {}: {err:?}", &key[..4]);
    }
    c.generate(gen("a1", 2, Some(BETA))).await.expect("beta with its adapter");

    // acme may run one request at a time; others are not affected.
    let held = hold(&mut c, "a0", Some(ACME)).await;
    let err = c.generate(gen("a0", 2, Some(ACME))).await.expect_err("over the limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("acme"), "{}", err.message());
    c.generate(gen("a1", 2, Some(BETA))).await.expect("beta unaffected");
    drop(held);
    let mut ok = false;
    for _ in 0..200 {
        if c.generate(gen("a0", 2, Some(ACME))).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "acme's slot never came back");

    // Admin RPCs need an admin tenant; a tenant lists only its own adapters.
    let err = c.load_adapter(with_key(LoadAdapterRequest { id: "a2".into(), path: String::new() }, Some(ACME))).await;
    assert_eq!(err.expect_err("not admin").code(), Code::PermissionDenied);
    let err = c.unload_adapter(with_key(UnloadAdapterRequest { id: "a0".into() }, Some(ACME))).await;
    assert_eq!(err.expect_err("not admin").code(), Code::PermissionDenied);
    let err = c.expert_load(with_key(moe_proto::v1::ExpertLoadRequest {}, Some(ACME))).await.expect_err("not admin");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("may not read the expert load"), "{}", err.message());
    c.load_adapter(with_key(LoadAdapterRequest { id: "a2".into(), path: String::new() }, Some(OPS)))
        .await
        .expect("admin load");
    let mine = c.list_adapters(with_key(ListAdaptersRequest {}, Some(ACME))).await.expect("list").into_inner();
    assert_eq!(mine.adapters.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["a0"]);
    let all = c.list_adapters(with_key(ListAdaptersRequest {}, Some(OPS))).await.expect("list").into_inner();
    assert_eq!(all.adapters.len(), 5);
}

/// With tenants configured every RPC but health and reflection needs a key, and the key comes
/// first: an unauthenticated 4 MiB prompt is refused as UNAUTHENTICATED before any tokenizer
/// work; with a key, a text over `--max-prompt-bytes` is INVALID_ARGUMENT naming the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_comes_before_any_work() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (model_dir, adapters) = setup(tmp.path());
    let tenants = format!("[[tenants]]\nname = \"acme\"\napi_key = \"{ACME}\"\n");
    let server = serve_api(engine(&model_dir, &adapters, 8, Some(&tenants))).await;
    let mut c = api_client(&server.addr).await;
    let tokenize = |key: Option<&str>, text: String| with_key(moe_proto::v1::TokenizeRequest { text }, key);
    let err = c.tokenize(tokenize(None, "hello".into())).await.expect_err("Tokenize needs a key");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let ok = c.tokenize(tokenize(Some(ACME), "hello".into())).await.expect("Tokenize with a key");
    assert!(!ok.into_inner().token_ids.is_empty());
    let err = c.model_info(with_key(moe_proto::v1::ModelInfoRequest {}, None)).await.expect_err("ModelInfo");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    c.model_info(with_key(moe_proto::v1::ModelInfoRequest {}, Some(ACME))).await.expect("ModelInfo with a key");

    let huge = "x".repeat(4 << 20);
    let request = |key: Option<&str>| {
        with_key(
            GenerateRequest {
                prompt: Some(Prompt::Text(huge.clone())),
                sampling: None,
                adapter_id: String::new(),
                timeout_ms: 0,
                cache_salt: String::new(),
                resume: None,
                constraint: None,
                priority: 0,
            },
            key,
        )
    };
    // UNAUTHENTICATED, not the size: the key is checked before the size, and the size before the
    // tokenizer.
    let err = c.generate(request(None)).await.expect_err("no key");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = c.generate(request(Some(ACME))).await.expect_err("too long");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("--max-prompt-bytes"), "{err:?}");
    let err = c.tokenize(tokenize(Some(ACME), huge.clone())).await.expect_err("too long to tokenize");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

/// Defect: tokenizing, compiling a constraint and replaying a resume ran before the tenant's
/// rights and concurrency slot were checked, so a tenant limited to one request could keep many
/// compiles running, even for adapters it may not use. Rights and the slot now come first: a
/// request that is both over the limit (or for another's adapter) and invalid is refused for the
/// limit (or the right), having done no work; compiled constraints are cached per tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rights_and_the_slot_come_before_any_costly_work() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (model_dir, adapters) = setup(tmp.path());
    let tenants = format!(
        "[[tenants]]\nname = \"acme\"\napi_key = \"{ACME}\"\nadapters = [\"a0\"]\nmax_concurrent = 1\n\n\
         [[tenants]]\nname = \"beta\"\napi_key = \"{BETA}\"\nadapters = [\"a1\"]\n"
    );
    let engine = engine(&model_dir, &adapters, 8, Some(&tenants));
    let server = serve_api(engine.clone()).await;
    let mut c = api_client(&server.addr).await;
    let bad_regex = |adapter: &str, key: &str| {
        let mut r = gen(adapter, 2, Some(key));
        r.get_mut().constraint =
            Some(moe_proto::v1::Constraint { kind: Some(moe_proto::v1::constraint::Kind::Regex("(unclosed".into())) });
        r
    };
    // Another tenant's adapter with an invalid constraint: refused for the right, not the regex.
    let err = c.generate(bad_regex("a1", ACME)).await.expect_err("not theirs");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Over the concurrency limit with an invalid constraint: refused for the limit.
    let held = hold(&mut c, "a0", Some(ACME)).await;
    let err = c.generate(bad_regex("a0", ACME)).await.expect_err("over the limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    drop(held);

    // The same schema from two tenants is compiled for each (no shared cache to time).
    let codec = engine.codec();
    let grammars = codec.grammars(engine.model_config().vocab_size, 257).expect("grammars");
    let before = grammars.compiles();
    let schema = r#"{"type": "object", "properties": {"k": {"type": "integer"}}}"#;
    for key in [BETA, BETA, ACME] {
        let adapter = if key == BETA { "a1" } else { "a0" };
        let mut msg = gen(adapter, 2, None).into_inner();
        msg.constraint =
            Some(moe_proto::v1::Constraint { kind: Some(moe_proto::v1::constraint::Kind::JsonSchema(schema.into())) });
        let mut done = false;
        for _ in 0..200 {
            match c.generate(with_key(msg.clone(), Some(key))).await {
                Ok(_) => {
                    done = true;
                    break;
                }
                // acme's slot may still be held by the stream dropped above.
                Err(e) if e.code() == Code::ResourceExhausted => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(done);
    }
    assert_eq!(grammars.compiles() - before, 2, "beta's second request reuses beta's compile; acme compiles its own");
}
