//! The OpenAI-compatible endpoints. The tenant key (`Authorization: Bearer`) is checked before
//! the body is parsed; requests are then validated exactly as on gRPC (size limit first, the
//! tokenizer on a blocking thread: [`moe_router::access::validate`]); a body that does not fit
//! the schema is a 400 naming the field; and the
//! `model` field names the base model or an adapter (as LoRAX does). gRPC codes map to HTTP
//! statuses (400, 401, 403, 404, 429, 503, 504); errors have OpenAI's `{"error": {...}}` shape.
//! A streamed failure ends the stream with an error event, never with a normal finish.

use crate::api_error::{error_body, field, json_object, ApiError};
use crate::chat::ChatMessage;
use crate::HttpState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use moe_router::access::{authenticate, validate};
use moe_router::{Event, FinishReason, GenerationParams, PromptInput, RouterError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A string or a list of strings (OpenAI's `stop`).
#[derive(Deserialize, Default)]
#[serde(untagged)]
pub enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `prompt`: text, or token ids.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum CompletionPrompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
}

/// Fields shared by both endpoints.
#[derive(Deserialize, Default)]
pub struct SamplingFields {
    #[serde(default)]
    pub model: String,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: OneOrMany,
    #[serde(default)]
    pub stream: bool,
    pub repetition_penalty: Option<f32>,
    pub n: Option<u32>,
    pub timeout_ms: Option<u64>,
    /// Mixed into the prefix cache's keys (vLLM's extra field): only requests with the same
    /// salt share cached pages.
    pub cache_salt: Option<String>,
    /// Scheduling class (an extra field, as vLLM takes it): higher is admitted first and may
    /// preempt lower classes (default 0; lowered to the tenant's `max_priority`). vLLM's runs
    /// the other way (lower first).
    #[serde(default)]
    pub priority: i32,
    /// Put each choice's generated `token_ids` in the answer (and in every streamed chunk), and
    /// the request's `resume_digest` (vLLM's extra field, plus what a resume needs).
    #[serde(default)]
    pub return_token_ids: bool,
    /// Continue a broken generation (see the gRPC API's `Resume`).
    pub resume: Option<HttpResume>,
    /// Structured output: `response_format`, `guided_*`, forced tool calls.
    #[serde(flatten)]
    pub structured: crate::structured::StructuredFields,
}

/// `resume`: the tokens a broken stream delivered and its `resume_digest`.
#[derive(Deserialize, Default)]
pub struct HttpResume {
    #[serde(default)]
    pub generated_token_ids: Vec<u32>,
    #[serde(default)]
    pub digest: String,
}

/// What a started request carries back to its handler.
struct Started {
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    held: moe_router::access::Admission,
    model: String,
    /// The resume digest, when the caller asked for token ids.
    digest: Option<String>,
    resumed: usize,
    /// The output is a forced tool call (chat answers it in `message.tool_calls`).
    tool_call: bool,
    /// Resolves when the server begins shutting down: the request then ends with 503 at once.
    shutdown: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

fn going_away() -> RouterError {
    RouterError::Unavailable("the router is shutting down; retry (or resume) on another router".into())
}

/// `/v1/completions`: the prompt, and the sampling fields at the top level of the body.
pub struct CompletionRequest {
    pub prompt: CompletionPrompt,
    pub sampling: SamplingFields,
}

/// `/v1/chat/completions`: the messages, and the sampling fields at the top level of the body.
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub sampling: SamplingFields,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn finish_name(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers.get("authorization").and_then(|v| v.to_str().ok())
}

/// The adapter a `model` value selects: none for the base model's name (or no name).
fn adapter_of(state: &HttpState, model: &str) -> String {
    if model.is_empty() || model == state.model_name {
        String::new()
    } else {
        model.to_string()
    }
}

/// Entitles (tenant rights and slot), validates, pins the adapter and submits; a refusal is
/// counted in the metrics.
async fn start(
    state: &HttpState,
    headers: &HeaderMap,
    prompt: PromptInput,
    s: SamplingFields,
) -> Result<Started, RouterError> {
    let engine = &state.engine;
    let attempt = async {
        if s.n.is_some_and(|n| n != 1) {
            return Err(RouterError::invalid("n", "only n = 1 is supported"));
        }
        let adapter = adapter_of(state, &s.model);
        // The tenant's rights and slot before any costly work (tokenizing, compiling a
        // constraint, replaying a resume, loading the adapter).
        let mut admission = moe_router::access::entitle(engine, authorization(headers), &adapter)?;
        let constraint_scope = moe_router::access::constraint_scope(engine, &admission);
        let structured = s.structured.resolve()?;
        if structured.tool_call && s.stream {
            return Err(RouterError::invalid("stream", "a forced tool call (tool_choice) cannot be streamed yet"));
        }
        let params = GenerationParams {
            max_new_tokens: s.max_completion_tokens.or(s.max_tokens),
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed: s.seed,
            stop: s.stop.into_vec(),
            repetition_penalty: s.repetition_penalty,
            logprobs: false,
            adapter_id: adapter.clone(),
            timeout: s.timeout_ms.filter(|&t| t > 0).map(Duration::from_millis),
            cache_salt: s.cache_salt,
            resume: s
                .resume
                .map(|r| moe_router::resume::ResumeParams { generated: r.generated_token_ids, digest: r.digest }),
            constraint: structured.constraint,
            constraint_scope,
            priority: s.priority,
        };
        let mut req = validate(engine, prompt, params).await?;
        moe_router::access::pin_adapter(engine, &mut admission, &adapter).await?;
        req.adapter = admission.adapter.take();
        admission.apply(&mut req);
        let digest = moe_router::resume::seal(&req, &engine.model_config().fingerprint())?;
        let resumed = req.resumed.len();
        let (id, events) = engine.submit(req)?;
        let model = if adapter.is_empty() { state.model_name.clone() } else { adapter };
        tracing::info!(request = id, model = %model, resumed, "http request started");
        let digest = s.return_token_ids.then_some(digest);
        let shutdown = Box::pin(engine.shutting_down());
        let tool_call = structured.tool_call;
        Ok(Started { events, held: admission, model, digest, resumed, tool_call, shutdown })
    };
    attempt.await.inspect_err(|e| engine.record_rejection(e))
}

/// Everything a request produced, for the non-streaming answers.
struct Collected {
    text: String,
    token_ids: Vec<u32>,
    reason: FinishReason,
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
}

async fn collect(
    mut events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    mut shutdown: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
) -> Result<Collected, RouterError> {
    let (mut text, mut ids) = (String::new(), Vec::new());
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = &mut shutdown => return Err(going_away()),
        };
        let Some(ev) = ev else { break };
        match ev {
            Event::Delta { text: t, token_ids, .. } => {
                text.push_str(&t);
                ids.extend(token_ids);
            }
            Event::Finished { reason, prompt_tokens, completion_tokens, cached_tokens } => {
                let token_ids = ids;
                return Ok(Collected { text, token_ids, reason, prompt_tokens, completion_tokens, cached_tokens });
            }
            Event::Failed(e) => return Err(e),
        }
    }
    Err(RouterError::Internal("the engine dropped the request".into()))
}

fn usage(c: &Collected, resumed: usize) -> Value {
    let mut u = json!({"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
           "total_tokens": c.prompt_tokens + c.completion_tokens,
           "prompt_tokens_details": {"cached_tokens": c.cached_tokens}});
    if resumed > 0 {
        u["resumed_tokens"] = json!(resumed);
    }
    u
}

/// With `return_token_ids`: the choice's token ids, and the resume digest at the top.
fn add_token_ids(body: &mut Value, ids: &[u32], digest: Option<&str>) {
    if let Some(choice) = body.get_mut("choices").and_then(|c| c.get_mut(0)) {
        choice["token_ids"] = json!(ids);
    }
    if let Some(d) = digest {
        body["resume_digest"] = json!(d);
    }
}

/// The stream of SSE events: one per delta (built by `chunk`), a final chunk with the finish
/// reason, then `[DONE]`; a failure sends an error event instead of the final chunk.
/// With a digest (`return_token_ids`), every chunk carries its token ids and the first delta
/// the digest.
fn sse_stream(
    started: Started,
    chunk: impl Fn(Option<&str>, Option<&str>) -> Value + Send + 'static,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let Started { events, held, mut digest, shutdown, .. } = started;
    let with_ids = digest.is_some();
    let (mut ended, mut finished) = (false, false);
    // Shutdown cuts the events short: the stream then ends with an error event at once, even
    // while the engine is still inside a step.
    let body = tokio_stream::wrappers::UnboundedReceiverStream::new(events)
        .map(Some)
        .take_until(shutdown)
        .chain(futures::stream::iter([None]))
        .filter_map(move |ev| {
            let _held = &held;
            let out = if ended {
                None
            } else {
                match ev {
                    Some(Event::Delta { text, .. }) if text.is_empty() && !with_ids => None,
                    Some(Event::Delta { text, token_ids, .. }) => {
                        let mut body = chunk(Some(&text), None);
                        if with_ids {
                            add_token_ids(&mut body, &token_ids, digest.take().as_deref());
                        }
                        Some(SseEvent::default().data(body.to_string()))
                    }
                    Some(Event::Finished { reason, .. }) => {
                        finished = true;
                        let mut body = chunk(None, Some(finish_name(reason)));
                        if with_ids {
                            add_token_ids(&mut body, &[], None);
                        }
                        Some(SseEvent::default().data(body.to_string()))
                    }
                    Some(Event::Failed(e)) => {
                        ended = true;
                        Some(SseEvent::default().event("error").data(error_body(&e).to_string()))
                    }
                    None if finished => {
                        ended = true;
                        Some(SseEvent::default().data("[DONE]"))
                    }
                    None => {
                        ended = true;
                        Some(SseEvent::default().event("error").data(error_body(&going_away()).to_string()))
                    }
                }
            };
            std::future::ready(out.map(Ok))
        });
    Sse::new(body).keep_alive(KeepAlive::default())
}

pub async fn completions(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    raw: Bytes,
) -> Result<Response, ApiError> {
    authenticate(&state.engine, authorization(&headers))?;
    let body = json_object(&raw)?;
    let req = CompletionRequest { prompt: field(&body, "prompt")?, sampling: field(&body, "")? };
    let prompt = match req.prompt {
        CompletionPrompt::Text(t) => PromptInput::Text(t),
        CompletionPrompt::Ids(ids) => PromptInput::Ids(ids),
        CompletionPrompt::Texts(mut v) if v.len() == 1 => PromptInput::Text(v.remove(0)),
        CompletionPrompt::Texts(_) => return Err(RouterError::invalid("prompt", "give one prompt per request").into()),
    };
    let stream = req.sampling.stream;
    let started = start(&state, &headers, prompt, req.sampling).await?;
    let (id, created) = (format!("cmpl-{}", state.next_id()), now_secs());
    let model = started.model.clone();
    if stream {
        let chunk = move |text: Option<&str>, finish: Option<&str>| {
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null}]})
        };
        return Ok(sse_stream(started, chunk).into_response());
    }
    let Started { events, held, digest, resumed, shutdown, .. } = started;
    let c = collect(events, shutdown).await?;
    drop(held);
    let mut body = json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": c.text, "finish_reason": finish_name(c.reason), "logprobs": null}],
        "usage": usage(&c, resumed),
    });
    if digest.is_some() {
        add_token_ids(&mut body, &c.token_ids, digest.as_deref());
    }
    Ok(Json(body).into_response())
}

pub async fn chat_completions(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    raw: Bytes,
) -> Result<Response, ApiError> {
    authenticate(&state.engine, authorization(&headers))?;
    let body = json_object(&raw)?;
    let req = ChatRequest { messages: field(&body, "messages")?, sampling: field(&body, "")? };
    let text = state.chat.render(&req.messages).map_err(|m| RouterError::invalid("messages", m))?;
    let stream = req.sampling.stream;
    let started = start(&state, &headers, PromptInput::Text(text), req.sampling).await?;
    let (id, created) = (format!("chatcmpl-{}", state.next_id()), now_secs());
    let model = started.model.clone();
    if stream {
        let first = std::sync::atomic::AtomicBool::new(true);
        let chunk = move |text: Option<&str>, finish: Option<&str>| {
            let mut delta = json!({});
            if first.swap(false, std::sync::atomic::Ordering::Relaxed) {
                delta["role"] = json!("assistant");
            }
            if let Some(t) = text {
                delta["content"] = json!(t);
            }
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        return Ok(sse_stream(started, chunk).into_response());
    }
    let Started { events, held, digest, resumed, tool_call, shutdown, .. } = started;
    let c = collect(events, shutdown).await?;
    drop(held);
    let (message, finish) = if tool_call && c.reason == FinishReason::Stop {
        (crate::structured::tool_call_message(&c.text, &id), "tool_calls")
    } else {
        (json!({"role": "assistant", "content": c.text}), finish_name(c.reason))
    };
    let mut body = json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage(&c, resumed),
    });
    if digest.is_some() {
        add_token_ids(&mut body, &c.token_ids, digest.as_deref());
    }
    Ok(Json(body).into_response())
}

/// The base model and the adapters the caller may use.
pub async fn models(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let tenant = authenticate(&state.engine, authorization(&headers))?;
    let created = now_secs();
    let mut data = vec![json!({"id": state.model_name, "object": "model", "created": created, "owned_by": "moe"})];
    if let Some(registry) = state.engine.adapters() {
        for a in registry.list() {
            if tenant.as_ref().is_none_or(|t| t.admin || t.may_use(&a.id)) {
                data.push(json!({"id": a.id, "object": "model", "created": created, "owned_by": "moe",
                                 "parent": state.model_name, "resident": a.resident}));
            }
        }
    }
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}
