//! Every kind of bad input the Inference API can be sent, each answered with its gRPC code and a
//! message naming what was wrong, while a long "canary" stream of another tenant runs through all
//! of them and still ends equal to its solo run, and a fresh request is served after each case.
//! At the end KV pages, running and waiting counts, adapter pins and tenant permits are back to
//! their baseline. (Plaintext to a TLS port: `tests/tls.rs`.)

mod common;

use common::*;
use moe_cluster::AdapterOptions;
use moe_proto::v1::generate_request::Prompt;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{GenerateRequest, GenerateResponse, SamplingParams, TokenIds};
use moe_router::{Engine, EngineConfig, Tenants};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Code;

const ACME: &str = "acme-key-0123456789";
const BETA: &str = "beta-key-0123456789";
type Client = InferenceClient<tonic::transport::Channel>;

fn tokens(n: usize) -> Prompt {
    Prompt::TokenIds(TokenIds { ids: (0..n).map(|i| 5 + (i % 200) as u32).collect() })
}

fn req(prompt: Prompt, f: impl FnOnce(&mut SamplingParams)) -> GenerateRequest {
    let mut s = SamplingParams { max_new_tokens: Some(2), ..Default::default() };
    f(&mut s);
    GenerateRequest {
        prompt: Some(prompt),
        sampling: Some(s),
        adapter_id: String::new(),
        timeout_ms: 0,
        cache_salt: String::new(),
        resume: None,
        constraint: None,
        priority: 0,
    }
}

fn keyed<T>(msg: T, key: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(k) = key {
        r.metadata_mut().insert("authorization", format!("Bearer {k}").parse().expect("header"));
    }
    r
}

/// Sends raw bytes as a `Generate` request (to send what no well-behaved client would).
#[derive(Default)]
struct RawCodec;
struct RawEncoder;
struct ResponseDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for ResponseDecoder {
    type Item = GenerateResponse;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<GenerateResponse>, tonic::Status> {
        use moe_proto::prost::Message;
        GenerateResponse::decode(src).map(Some).map_err(|e| tonic::Status::internal(e.to_string()))
    }
    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = GenerateResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

async fn raw_generate(addr: &str, body: Vec<u8>, key: &str) -> Result<GenerateResponse, tonic::Status> {
    let channel =
        tonic::transport::Endpoint::from_shared(addr.to_string()).expect("addr").connect().await.expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/moe.v1.Inference/Generate");
    grpc.unary(keyed(body, Some(key)), path, RawCodec).await.map(|r| r.into_inner())
}

/// One length-delimited protobuf field.
fn field(number: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |mut v: u64| {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    };
    put(((number << 3) | 2) as u64);
    put(bytes.len() as u64);
    out.extend_from_slice(bytes);
    out
}

fn setup(tmp: &Path) -> Engine {
    let model = tmp.join("model");
    let adapters = tmp.join("adapters");
    endless_model(&model);
    write_random_adapter(&model, &adapters.join("mine"), &["gate"], 4, 1);
    write_random_adapter(&model, &adapters.join("theirs"), &["gate"], 4, 2);
    write_random_adapter(&model, &adapters.join("rank80"), &["gate"], 80, 3);
    write_random_adapter(&fixture("qwen3_moe"), &adapters.join("otherbase"), &["q"], 4, 4);
    write_random_adapter(&model, &adapters.join("shape"), &["gate"], 4, 5);
    // A wrong shape in this model's own adapter: lora_A of layer 0's gate one row short.
    let st_path = adapters.join("shape/adapter_model.safetensors");
    let st = RawSafetensors::read(&st_path);
    let mut all = st.all();
    let a = all.iter_mut().find(|t| t.0.contains("layers.0.") && t.0.ends_with("lora_A.weight")).expect("an A");
    let cols = a.2[1];
    a.2[0] -= 1;
    a.3.truncate(a.2[0] * cols * 4);
    RawSafetensors::from_tensors(&all).write(&st_path);
    // NaN weights.
    write_random_adapter(&model, &adapters.join("nan"), &["gate"], 4, 6);
    let st_path = adapters.join("nan/adapter_model.safetensors");
    let mut st = RawSafetensors::read(&st_path);
    let name = st.names().into_iter().find(|n| n.ends_with("lora_B.weight")).expect("a B");
    let off = st.header[&name]["data_offsets"][0].as_u64().expect("offset") as usize;
    st.data[off..off + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    st.write(&st_path);

    let opts = AdapterOptions { dir: Some(adapters), limits: Default::default() };
    let cfg = EngineConfig { max_batch_tokens: 512, ..Default::default() };
    let tenants = format!(
        "[[tenants]]\nname = \"acme\"\napi_key = \"{ACME}\"\nadapters = [\"*\"]\nmax_concurrent = 8\n\n\
         [[tenants]]\nname = \"beta\"\napi_key = \"{BETA}\"\nadapters = [\"theirs\"]\nmax_concurrent = 4\n"
    );
    moe_cluster::embedded_with(&model, 2, cfg, &opts)
        .expect("engine")
        .with_tenants(Arc::new(Tenants::parse(&tenants).expect("tenants")))
}

/// A small request that must succeed: the server is still serving.
async fn still_serving(c: &mut Client, after: &str) {
    let r = c.generate(keyed(req(tokens(3), |_| {}), Some(ACME))).await;
    assert_eq!(r.map(|r| r.into_inner().token_ids.len()).map_err(|e| e.to_string()), Ok(2), "after {after}");
}

async fn expect_code(c: &mut Client, what: &str, r: GenerateRequest, key: &str, code: Code, needle: &str) {
    let err = c.generate(keyed(r.clone(), Some(key))).await.expect_err(what);
    assert_eq!(err.code(), code, "{what}: {err:?}");
    assert!(err.message().contains(needle), "{what}: {needle:?} not in {:?}", err.message());
    assert!(err.message().len() < 2048, "{what}: the message echoes the input ({} bytes)", err.message().len());
    let err = c.generate_stream(keyed(r, Some(key))).await.expect_err(what);
    assert_eq!(err.code(), code, "{what} (stream): {err:?}");
    still_serving(c, what).await;
}

async fn wait_baseline(engine: &Engine, what: &str) {
    let s = engine.stats();
    for _ in 0..300 {
        let pins = engine.adapters().map(|a| a.usage().1).unwrap_or(0);
        let permits: usize =
            ["acme", "beta"].iter().filter_map(|t| engine.tenants()?.get(t).map(|t| t.in_flight())).sum();
        if s.free_pages.load(Ordering::SeqCst) == s.total_pages.load(Ordering::SeqCst)
            && s.running.load(Ordering::SeqCst) == 0
            && s.waiting.load(Ordering::SeqCst) == 0
            && pins == 0
            && permits == 0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{what}: not back to baseline: pages {}/{}, running {}, waiting {}, pins {:?}",
        s.free_pages.load(Ordering::SeqCst),
        s.total_pages.load(Ordering::SeqCst),
        s.running.load(Ordering::SeqCst),
        s.waiting.load(Ordering::SeqCst),
        engine.adapters().map(|a| a.usage()),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_get_their_codes_and_others_are_served() {
    let tmp = tempfile::tempdir().expect("tmp");
    let engine = setup(tmp.path());
    let api = serve_api(engine.clone()).await;
    let addr = api.addr.clone();
    let mut c = api_client(&addr).await.max_encoding_message_size(64 << 20).max_decoding_message_size(64 << 20);

    // The canary: beta's long stream with its adapter, solo first for the expected tokens.
    let canary_req = || {
        let mut r = req(tokens(7), |s| s.max_new_tokens = Some(400));
        r.adapter_id = "theirs".into();
        r
    };
    let solo = c.generate(keyed(canary_req(), Some(BETA))).await.expect("solo").into_inner().token_ids;
    assert_eq!(solo.len(), 400);
    let mut canary = c.generate_stream(keyed(canary_req(), Some(BETA))).await.expect("canary").into_inner();
    let canary_task = tokio::spawn(async move {
        let mut ids = Vec::new();
        let mut finished = 0;
        while let Some(m) = canary.message().await.expect("canary must not fail") {
            use moe_proto::v1::generate_stream_response::Event;
            match m.event {
                Some(Event::Delta(d)) => {
                    ids.extend(d.token_ids);
                    // Read slowly, so the canary spans the cases below.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Some(Event::Finished(_)) => finished += 1,
                _ => {}
            }
        }
        (ids, finished)
    });

    let vocab = engine.model_config().vocab_size as i32;
    let max_pos = engine.model_config().max_position_embeddings;
    let inv = Code::InvalidArgument;
    let cases: Vec<(&str, GenerateRequest, Code, &str)> = vec![
        ("empty prompt", req(tokens(0), |_| {}), inv, "the prompt is empty"),
        ("empty text prompt", req(Prompt::Text(String::new()), |_| {}), inv, "prompt"),
        ("no prompt", GenerateRequest::default(), inv, "prompt"),
        ("prompt one over the limit", req(tokens(max_pos), |_| {}), inv, "context"),
        (
            "prompt + max_new_tokens over the context",
            req(tokens(10), |s| s.max_new_tokens = Some(max_pos as u32 - 5)),
            inv,
            "max_new_tokens",
        ),
        ("max_new_tokens 0", req(tokens(3), |s| s.max_new_tokens = Some(0)), inv, "max_new_tokens"),
        ("max_new_tokens u32::MAX", req(tokens(3), |s| s.max_new_tokens = Some(u32::MAX)), inv, "max_new_tokens"),
        ("temperature negative", req(tokens(3), |s| s.temperature = Some(-1.0)), inv, "temperature"),
        ("temperature NaN", req(tokens(3), |s| s.temperature = Some(f32::NAN)), inv, "temperature"),
        ("temperature infinite", req(tokens(3), |s| s.temperature = Some(f32::INFINITY)), inv, "temperature"),
        ("top_p 0", req(tokens(3), |s| s.top_p = Some(0.0)), inv, "top_p"),
        ("top_p above 1", req(tokens(3), |s| s.top_p = Some(1.01)), inv, "top_p"),
        ("top_p NaN", req(tokens(3), |s| s.top_p = Some(f32::NAN)), inv, "top_p"),
        ("top_k negative", req(tokens(3), |s| s.top_k = Some(-1)), inv, "top_k"),
        ("top_k above the vocabulary", req(tokens(3), |s| s.top_k = Some(vocab + 1)), inv, "top_k"),
        ("repetition penalty 0", req(tokens(3), |s| s.repetition_penalty = Some(0.0)), inv, "repetition_penalty"),
        (
            "repetition penalty negative",
            req(tokens(3), |s| s.repetition_penalty = Some(-2.0)),
            inv,
            "repetition_penalty",
        ),
        (
            "too many stop sequences",
            req(tokens(3), |s| s.stop = (0..17).map(|i| format!("s{i}")).collect()),
            inv,
            "at most 16",
        ),
        (
            "an empty stop sequence",
            req(tokens(3), |s| s.stop = vec!["ok".into(), String::new()]),
            inv,
            "stop sequence 1 is empty",
        ),
        (
            "a 1 MB stop sequence",
            req(tokens(3), |s| s.stop = vec!["x".repeat(1 << 20)]),
            inv,
            "stop sequence 0 is 1048576 bytes",
        ),
        (
            "token id out of the vocabulary",
            req(Prompt::TokenIds(TokenIds { ids: vec![1, vocab as u32] }), |_| {}),
            inv,
            "out of range",
        ),
    ];
    for (what, r, code, needle) in cases {
        expect_code(&mut c, what, r, ACME, code, needle).await;
    }
    // A prompt of exactly the limit (room for one token) is served.
    let r = c.generate(keyed(req(tokens(max_pos - 1), |s| s.max_new_tokens = Some(1)), Some(ACME))).await;
    assert_eq!(r.expect("prompt at the limit").into_inner().token_ids.len(), 1);

    // Adapters: unknown, another tenant's, path-like, 10 KB long, and refused at load.
    let with = |id: &str| GenerateRequest { adapter_id: id.into(), ..req(tokens(3), |_| {}) };
    let adapter_cases: Vec<(&str, &str, &str, Code, &str)> = vec![
        ("unknown adapter", "nobody", ACME, Code::NotFound, "nobody"),
        ("another tenant's adapter", "mine", BETA, Code::PermissionDenied, "may not use adapter \"mine\""),
        ("path-like adapter id", "../../etc/passwd", ACME, inv, "invalid adapter id"),
        ("absolute adapter id", "/etc", ACME, inv, "invalid adapter id"),
        ("wrong shape", "shape", ACME, inv, "lora_A"),
        ("another base model", "otherbase", ACME, inv, "self_attn.q_proj"),
        ("NaN weights", "nan", ACME, inv, "non-finite"),
        ("rank above the configured maximum", "rank80", ACME, inv, "rank 80 is above the configured maximum of 64"),
    ];
    for (what, id, key, code, needle) in adapter_cases {
        expect_code(&mut c, what, with(id), key, code, needle).await;
    }
    let long_id = "a".repeat(10 << 10);
    expect_code(&mut c, "10 KB adapter id", with(&long_id), ACME, inv, "1 to 128 characters").await;

    // Invalid UTF-8 in string fields, and messages around the 16 MiB limit.
    for (what, body, needle) in [
        ("invalid UTF-8 adapter id", [field(2, &field(1, &[7])), field(4, &[0xff, 0xfe])].concat(), "adapter_id"),
        ("invalid UTF-8 text prompt", field(1, &[b'h', 0xc3, 0x28]), "UTF-8"),
    ] {
        let err = raw_generate(&addr, body, ACME).await.expect_err(what);
        assert_eq!(err.code(), inv, "{what}: {err:?}");
        assert!(err.message().contains(needle), "{what}: {needle:?} not in {:?}", err.message());
        still_serving(&mut c, what).await;
    }
    let limit = moe_router::MAX_MESSAGE_BYTES;
    let under = req(Prompt::Text("a ".repeat((limit - 4096) / 2)), |_| {});
    let err = c.generate(keyed(under, Some(ACME))).await.expect_err("too long to tokenize");
    assert_eq!(err.code(), inv, "just under the size limit: {err:?}");
    // Refused before the tokenizer runs, naming the limit.
    assert!(err.message().contains("--max-prompt-bytes"), "{}", err.message());
    still_serving(&mut c, "a message just under the limit").await;
    let over = req(Prompt::Text("a".repeat(limit + 16)), |_| {});
    let err = c.generate(keyed(over, Some(ACME))).await.expect_err("over the size limit");
    assert_eq!(err.code(), Code::OutOfRange, "over the size limit: {err:?}");
    assert!(err.message().contains("limit"), "{}", err.message());
    still_serving(&mut c, "a message over the limit").await;

    // An expired deadline.
    let mut late = req(tokens(3), |s| s.max_new_tokens = Some(3000));
    late.timeout_ms = 50;
    let err = c.generate(keyed(late, Some(ACME))).await.expect_err("deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    still_serving(&mut c, "an expired deadline").await;

    // Forged and missing tenant keys.
    for key in [None, Some("forged-key-0123456789")] {
        let err = c.generate(keyed(req(tokens(3), |_| {}), key)).await.expect_err("no tenant");
        assert_eq!(err.code(), Code::Unauthenticated, "{key:?}: {err:?}");
    }
    still_serving(&mut c, "forged keys").await;

    // Cancellation right after sending, and mid-stream.
    for _ in 0..4 {
        let mut c2 = c.clone();
        let call = tokio::spawn(async move {
            c2.generate_stream(keyed(req(tokens(5), |s| s.max_new_tokens = Some(2000)), Some(ACME))).await
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
        call.abort();
    }
    let mut s = c
        .generate_stream(keyed(req(tokens(5), |s| s.max_new_tokens = Some(2000)), Some(ACME)))
        .await
        .expect("stream")
        .into_inner();
    assert!(s.message().await.expect("a token").is_some());
    drop(s);
    still_serving(&mut c, "cancellations").await;

    // The canary, which read slowly all along, got every token once, in order, and one finish.
    let (ids, finished) =
        tokio::time::timeout(Duration::from_secs(120), canary_task).await.expect("canary hung").expect("canary");
    assert_eq!((ids, finished), (solo, 1));
    wait_baseline(&engine, "after every hostile input").await;
}
