//! Structured output on a random demo model (whose free output is noise): 200 requests each for
//! two JSON schemas (nested objects, arrays, enums, bounded numbers, `required`), a regex and a
//! Lark grammar, mixed greedy and temperature 1, some with a gate adapter, all in shared
//! batches: every output that completed keeps to its constraint (JSON outputs checked by the
//! `jsonschema` crate's validator). Unconstrained requests in the same
//! batches keep their solo tokens. Through HTTP: `response_format` as the `openai` client sends
//! it (whole and streamed), a forced tool call, and a bad schema's 400.

mod common;

use common::*;
use moe_constrain::ConstraintSpec;
use moe_router::{Engine, EngineConfig, Event, FinishReason, GenerationParams, PromptInput, ValidatedRequest};
use serde_json::{json, Value};
use std::path::Path;

const PET: &str = r#"{"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 999},
    "name": {"type": "string", "maxLength": 12},
    "kind": {"enum": ["cat", "dog", "fish"]},
    "score": {"type": "number", "minimum": -1, "maximum": 1},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    "owner": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"type": "integer"}},
              "required": ["city"], "additionalProperties": false}},
  "required": ["id", "kind", "owner"], "additionalProperties": false}"#;

const POINTS: &str = r#"{"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "object",
  "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5}, "ok": {"type": "boolean"}},
  "required": ["x", "ok"], "additionalProperties": false}}"#;

const REGEX: &str = "[a-z]{2,5}-[0-9]{1,3}";
const LARK: &str = "start: \"(\" item (\",\" item)* \")\"\nitem: /[0-9]{1,3}/ | \"x\"\n";

/// Whether `v` validates against `schema`, by the `jsonschema` crate (not our code), with the
/// validator's messages when it does not.
fn schema_ok(schema: &str, v: &Value) -> Result<(), String> {
    let schema: Value = serde_json::from_str(schema).map_err(|e| format!("schema: {e}"))?;
    let validator = jsonschema::validator_for(&schema).map_err(|e| format!("schema: {e}"))?;
    let errors: Vec<String> = validator.iter_errors(v).map(|e| format!("{} at {}", e, e.instance_path)).collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

#[test]
fn the_validator_refuses_what_the_schemas_forbid() {
    let good = json!({"id": 3, "kind": "cat", "owner": {"city": "Oslo"}, "tags": ["a"]});
    schema_ok(PET, &good).expect("a valid pet");
    for bad in [
        json!({"id": 3, "kind": "cow", "owner": {"city": "Oslo"}}),
        json!({"id": 1000, "kind": "cat", "owner": {"city": "Oslo"}}),
        json!({"id": 3, "kind": "cat", "owner": {"city": "Oslo", "street": "x"}}),
        json!({"id": 3, "kind": "cat"}),
        json!({"id": 3, "kind": "cat", "owner": {"city": "Oslo"}, "tags": ["a", "b", "c", "d"]}),
    ] {
        assert!(schema_ok(PET, &bad).is_err(), "{bad} must be refused");
    }
    schema_ok(POINTS, &json!([{"x": -5, "ok": true}])).expect("valid points");
    assert!(schema_ok(POINTS, &json!([])).is_err());
    assert!(schema_ok(POINTS, &json!([{"x": 6, "ok": true}])).is_err());
}

fn regex_ok(s: &str) -> bool {
    let Some((a, b)) = s.split_once('-') else { return false };
    (2..=5).contains(&a.len())
        && a.bytes().all(|c| c.is_ascii_lowercase())
        && (1..=3).contains(&b.len())
        && b.bytes().all(|c| c.is_ascii_digit())
}

fn lark_ok(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('(').and_then(|s| s.strip_suffix(')')) else { return false };
    inner.split(',').all(|i| i == "x" || ((1..=3).contains(&i.len()) && i.bytes().all(|c| c.is_ascii_digit())))
}

/// Submits every request at once (they share batches), then collects each one's tokens and
/// finish reason.
fn run_all(engine: &Engine, requests: Vec<(Vec<u32>, GenerationParams)>) -> Vec<(Vec<u32>, FinishReason)> {
    let mut streams = Vec::new();
    for (prompt, params) in requests {
        let mut req = ValidatedRequest::new(
            PromptInput::Ids(prompt),
            &params,
            engine.codec(),
            engine.model_config(),
            std::time::Duration::from_secs(600),
        )
        .expect("valid");
        if !params.adapter_id.is_empty() {
            req.adapter = Some(engine.adapters().expect("adapters").pin(&params.adapter_id).expect("adapter"));
        }
        streams.push(engine.submit(req).expect("submit").1);
    }
    streams
        .into_iter()
        .map(|mut s| {
            let mut got = Vec::new();
            loop {
                match s.blocking_recv() {
                    Some(Event::Delta { token_ids, .. }) => got.extend(token_ids),
                    Some(Event::Finished { reason, .. }) => return (got, reason),
                    Some(Event::Failed(e)) => panic!("a request failed: {e}"),
                    None => panic!("no terminal event"),
                }
            }
        })
        .collect()
}

fn setup(tmp: &Path) -> (std::path::PathBuf, Engine) {
    let model = tmp.join("model");
    endless_model(&model);
    let adapters = tmp.join("adapters");
    write_random_adapter(&model, &adapters.join("gate-a"), &["gate"], 4, 9);
    let opts = moe_cluster::AdapterOptions { dir: Some(adapters), ..Default::default() };
    let engine = moe_cluster::embedded_with(&model, 2, EngineConfig::default(), &opts).expect("engine");
    (model, engine)
}

#[test]
fn constrained_outputs_keep_to_their_constraint_in_mixed_batches() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (model, engine) = setup(tmp.path());
    let free_prompts: Vec<Vec<u32>> = (0..4u32).map(|i| vec![10 + i, 20, 30 + i]).collect();
    let cases: [(&str, ConstraintSpec); 4] = [
        ("pet", ConstraintSpec::JsonSchema(PET.into())),
        ("points", ConstraintSpec::JsonSchema(POINTS.into())),
        ("regex", ConstraintSpec::Regex(REGEX.into())),
        ("lark", ConstraintSpec::Lark(LARK.into())),
    ];
    for (name, spec) in cases {
        let mut requests: Vec<(Vec<u32>, GenerationParams)> = (0..200u32)
            .map(|i| {
                let params = GenerationParams {
                    max_new_tokens: Some(160),
                    temperature: Some(if i % 2 == 0 { 0.0 } else { 1.0 }),
                    seed: Some(i as u64),
                    adapter_id: if i % 4 == 1 { "gate-a".into() } else { String::new() },
                    constraint: Some(spec.clone()),
                    ..Default::default()
                };
                (vec![1 + i % 50, 2 + i % 7, 3], params)
            })
            .collect();
        // Free requests share the batches; their tokens must be their solo ones.
        let free = GenerationParams { max_new_tokens: Some(12), ..Default::default() };
        requests.extend(free_prompts.iter().map(|p| (p.clone(), free.clone())));
        let results = run_all(&engine, requests);
        let mut completed = 0;
        for (i, (tokens, reason)) in results[..200].iter().enumerate() {
            if *reason != FinishReason::Stop {
                continue;
            }
            completed += 1;
            let text = engine.codec().decode(tokens);
            let verdict = match name {
                "pet" => serde_json::from_str(&text).map_err(|e| e.to_string()).and_then(|v| schema_ok(PET, &v)),
                "points" => serde_json::from_str(&text).map_err(|e| e.to_string()).and_then(|v| schema_ok(POINTS, &v)),
                "regex" => regex_ok(&text).then_some(()).ok_or_else(|| "no match".to_string()),
                _ => lark_ok(&text).then_some(()).ok_or_else(|| "no match".to_string()),
            };
            if let Err(why) = verdict {
                panic!("{name} request {i}: {why}: {text:?}");
            }
        }
        eprintln!("{name}: {completed} of 200 completed within 160 tokens");
        assert!(completed >= 150, "{name}: only {completed} of 200 completed");
        for (p, (tokens, _)) in free_prompts.iter().zip(&results[200..]) {
            assert_eq!(tokens, &solo_greedy(&model, p, 12), "{name}: a free request in the batch changed");
        }
    }
}

#[test]
fn bad_constraints_are_refused_before_admission() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (_, engine) = setup(tmp.path());
    for (spec, needle) in [
        (ConstraintSpec::JsonSchema("{\"type\": ".into()), "not JSON"),
        (ConstraintSpec::Regex("(a".into()), "invalid regex"),
        (ConstraintSpec::Lark("start: nothing_defined".into()), "invalid lark"),
    ] {
        let params = GenerationParams { constraint: Some(spec), ..Default::default() };
        let e = ValidatedRequest::new(
            PromptInput::Ids(vec![1, 2]),
            &params,
            engine.codec(),
            engine.model_config(),
            std::time::Duration::from_secs(5),
        )
        .expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("constraint") && e.to_string().contains(needle), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_api_takes_response_format_and_forced_tool_calls() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (model, engine) = setup(tmp.path());
    let chat = moe_http::ChatTemplate::from_model_dir(&model).expect("template");
    let state = std::sync::Arc::new(moe_http::HttpState::new(engine, "base".into(), chat));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (_stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(moe_http::serve_http(state, listener, async {
        let _ = rx.await;
    }));
    let client = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        let r = client.post(format!("{base}{path}")).json(&body);
        async move {
            let resp = r.send().await.expect("http");
            (resp.status().as_u16(), resp.text().await.expect("body"))
        }
    };
    let schema: Value = serde_json::from_str(PET).expect("schema");
    // As the openai package sends response_format with a json_schema.
    let mut completed = 0;
    for seed in 0..10 {
        let body = json!({"model": "base", "messages": [{"role": "user", "content": "a pet"}], "max_tokens": 160,
            "temperature": 1.0, "seed": seed,
            "response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": true}}});
        let (status, text) = post("/v1/chat/completions", body).await;
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).expect("json");
        if v["choices"][0]["finish_reason"] == "stop" {
            let content = v["choices"][0]["message"]["content"].as_str().expect("content");
            schema_ok(PET, &serde_json::from_str(content).expect("content is JSON")).expect("valid pet");
            completed += 1;
        }
    }
    assert!(completed > 0, "no response_format request completed");
    // Streamed: the deltas join into a matching output.
    let body = json!({"prompt": "id:", "max_tokens": 30, "stream": true, "guided_regex": REGEX});
    let (status, text) = post("/v1/completions", body).await;
    assert_eq!(status, 200, "{text}");
    let joined: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(String::from))
        .collect();
    assert!(regex_ok(&joined), "{joined:?}");
    // A forced tool call comes back in message.tool_calls with arguments matching the tool.
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
        "properties": {"city": {"enum": ["Oslo", "Lima"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": false}}}]);
    let body = json!({"messages": [{"role": "user", "content": "weather?"}], "max_tokens": 200, "tools": tools,
        "tool_choice": "required"});
    let (status, text) = post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let call = &v["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "get_weather");
    let args: Value = serde_json::from_str(call["arguments"].as_str().expect("arguments string")).expect("JSON");
    let parameters = tools[0]["function"]["parameters"].to_string();
    schema_ok(&parameters, &args).unwrap_or_else(|e| panic!("tool arguments {args}: {e}"));
    // A schema that does not compile is a 400 naming the field, with the parser's message.
    let body = json!({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "bad",
        "schema": {"type": "no-such-type"}}}});
    let (status, text) = post("/v1/completions", body).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("constraint") && text.contains("\"error\""), "{text}");
}

/// Over `--max-constraint-ms`, a constrained request fails alone with RESOURCE_EXHAUSTED naming
/// the limit; a free request in the same batch finishes.
#[test]
fn a_mask_over_the_time_limit_fails_only_its_request() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("model");
    endless_model(&model);
    let config = EngineConfig { max_constraint_time: std::time::Duration::from_nanos(1), ..Default::default() };
    let engine = moe_cluster::embedded_with(&model, 1, config, &Default::default()).expect("engine");
    let timeout = std::time::Duration::from_secs(60);
    let submit = |params: GenerationParams| {
        let req = ValidatedRequest::new(
            PromptInput::Ids(vec![5, 6]),
            &params,
            engine.codec(),
            engine.model_config(),
            timeout,
        )
        .expect("valid");
        engine.submit(req).expect("submit").1
    };
    let constrained = GenerationParams {
        max_new_tokens: Some(8),
        constraint: Some(ConstraintSpec::JsonObject),
        ..Default::default()
    };
    let mut slow = submit(constrained);
    let mut free = submit(GenerationParams { max_new_tokens: Some(8), ..Default::default() });
    let failed = loop {
        match slow.blocking_recv() {
            Some(Event::Failed(e)) => break e,
            Some(Event::Delta { .. }) => continue,
            other => panic!("expected a failure, got {other:?}"),
        }
    };
    assert_eq!(failed.code(), tonic::Code::ResourceExhausted, "{failed}");
    assert!(failed.to_string().contains("--max-constraint-ms"), "{failed}");
    let mut n = 0;
    loop {
        match free.blocking_recv() {
            Some(Event::Delta { token_ids, .. }) => n += token_ids.len(),
            Some(Event::Finished { .. }) => break,
            other => panic!("the free request ended with {other:?}"),
        }
    }
    assert_eq!(n, 8);
}

/// Over gRPC with `moe serve --demo`: `constraint.regex` and `constraint.json_schema` shape the
/// text, and a bad grammar is INVALID_ARGUMENT naming `constraint`.
#[test]
fn grpc_requests_carry_a_constraint() {
    use moe_proto::v1::{constraint::Kind, generate_request::Prompt, inference_client::InferenceClient};
    use moe_proto::v1::{Constraint, FinishReason as Finish, GenerateRequest, SamplingParams};
    let server = spawn_server(&["serve", "--demo", "--listen", "127.0.0.1:0"]);
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let call = |kind: Kind| {
        rt.block_on(async {
            let mut c = InferenceClient::connect(format!("http://{}", server.addr)).await.expect("connect");
            let req = GenerateRequest {
                prompt: Some(Prompt::Text("id:".into())),
                sampling: Some(SamplingParams { max_new_tokens: Some(64), ..Default::default() }),
                constraint: Some(Constraint { kind: Some(kind) }),
                ..Default::default()
            };
            c.generate(req).await.map(|r| r.into_inner())
        })
    };
    let r = call(Kind::Regex(REGEX.into())).expect("regex");
    assert_eq!(r.finish_reason, Finish::Stop as i32);
    assert!(regex_ok(&r.text), "{:?}", r.text);
    let schema = r#"{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false}"#;
    let r = call(Kind::JsonSchema(schema.into())).expect("schema");
    let v: Value = serde_json::from_str(&r.text).expect("JSON");
    assert!(v["ok"].is_boolean() && v.as_object().map(|o| o.len()) == Some(1), "{v}");
    let e = call(Kind::Lark("start: missing".into())).expect_err("bad grammar");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("constraint"), "{}", e.message());
}

/// Defect: a resumed constrained stream whose resumed tokens already completed the constraint
/// ran one more step under an end-of-text-only mask and sent a token the original never did.
/// Resume ends it at once, as the original ended: Stop, the same completion count, no new token.
#[test]
fn a_resume_that_completed_its_constraint_ends_as_the_original_did() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (_model, engine) = setup(tmp.path());
    let finish = |resume: Option<Vec<u32>>| {
        let params = GenerationParams {
            max_new_tokens: Some(8),
            constraint: Some(ConstraintSpec::Regex("ab".into())),
            resume: resume.map(|generated| moe_router::resume::ResumeParams { generated, digest: "x".into() }),
            ..Default::default()
        };
        let req = ValidatedRequest::new(
            PromptInput::Ids(vec![5, 6, 7]),
            &params,
            engine.codec(),
            engine.model_config(),
            std::time::Duration::from_secs(60),
        )
        .expect("valid");
        let mut rx = engine.submit(req).expect("submit").1;
        let mut tokens = Vec::new();
        loop {
            match rx.blocking_recv() {
                Some(Event::Delta { token_ids, .. }) => tokens.extend(token_ids),
                Some(Event::Finished { reason, completion_tokens, .. }) => return (tokens, reason, completion_tokens),
                Some(Event::Failed(e)) => panic!("failed: {e}"),
                None => panic!("no terminal event"),
            }
        }
    };
    let (original, reason, count) = finish(None);
    assert_eq!((reason, count), (FinishReason::Stop, original.len()), "{original:?}");
    let text = engine.codec().decode(&original);
    assert_eq!(text, "ab");
    let (more, reason, count) = finish(Some(original.clone()));
    assert!(more.is_empty(), "the resumed stream sent {more:?}, which the original never did");
    assert_eq!((reason, count), (FinishReason::Stop, original.len()));
}
