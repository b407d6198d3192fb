//! The public `Inference` gRPC service over an [`Engine`]: request conversion and validation,
//! unary and streaming generation, tokenization, model info and the adapter admin RPCs. Each RPC
//! runs in a tracing span carrying its request id (from `x-request-id` metadata, or assigned).
//! Tenant checks and adapter loading happen in [`crate::access`] before the engine sees a request.

use crate::access::{adapter_info, authenticate, entitle, require_admin, Admission};
use crate::engine::Engine;
use crate::error::RouterError;
use crate::request::{Event, FinishReason, GenerationParams, PromptInput, ValidatedRequest};
use moe_proto::v1::generate_request::Prompt;
use moe_proto::v1::generate_stream_response::Event as StreamEvent;
use moe_proto::v1::inference_server::Inference;
use moe_proto::v1::{
    ExpertLoadRequest, ExpertLoadResponse, Finished, GenerateRequest, GenerateResponse, GenerateStreamResponse,
    ListAdaptersRequest, ListAdaptersResponse, LoadAdapterRequest, LoadAdapterResponse, ModelInfoRequest,
    ModelInfoResponse, TokenDelta, TokenizeRequest, TokenizeResponse, UnloadAdapterRequest, UnloadAdapterResponse,
    Usage,
};
use std::pin::Pin;
use std::time::Duration;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// What the router knows of its workers, for `ModelInfo`.
pub trait ClusterStatus: Send + Sync {
    /// Workers in use.
    fn workers(&self) -> usize;
    /// Empty when every expert has a live holder, else what is missing.
    fn not_ready_reason(&self) -> String;
    /// Workers seen but refused, each with its reason.
    fn refused(&self) -> Vec<String>;
}

/// A fixed set of workers, all in use (the embedded cluster, a static worker list).
pub struct StaticCluster(pub usize);

impl ClusterStatus for StaticCluster {
    fn workers(&self) -> usize {
        self.0
    }
    fn not_ready_reason(&self) -> String {
        String::new()
    }
    fn refused(&self) -> Vec<String> {
        Vec::new()
    }
}

pub struct InferenceService {
    engine: Engine,
    cluster: std::sync::Arc<dyn ClusterStatus>,
}

impl InferenceService {
    pub fn new(engine: Engine, cluster: std::sync::Arc<dyn ClusterStatus>) -> Self {
        Self { engine, cluster }
    }

    /// Converts and validates a request; text is tokenized on a blocking thread, never on the
    /// async runtime.
    async fn validate(&self, req: GenerateRequest, constraint_scope: String) -> Result<ValidatedRequest, RouterError> {
        let prompt = match req.prompt {
            Some(Prompt::Text(t)) => PromptInput::Text(t),
            Some(Prompt::TokenIds(ids)) => PromptInput::Ids(ids.ids),
            None => return Err(RouterError::invalid("prompt", "give either text or token_ids")),
        };
        let s = req.sampling.unwrap_or_default();
        let params = GenerationParams {
            max_new_tokens: s.max_new_tokens,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed: s.seed,
            stop: s.stop,
            repetition_penalty: s.repetition_penalty,
            logprobs: s.logprobs,
            adapter_id: req.adapter_id,
            timeout: (req.timeout_ms > 0).then(|| Duration::from_millis(req.timeout_ms as u64)),
            cache_salt: Some(req.cache_salt).filter(|s| !s.is_empty()),
            resume: req
                .resume
                .map(|r| crate::request::ResumeParams { generated: r.generated_token_ids, digest: r.digest }),
            constraint: crate::constraint::from_proto(req.constraint),
            constraint_scope,
            priority: req.priority,
        };
        crate::access::validate(&self.engine, prompt, params).await
    }

    /// The caller's key first (an unauthenticated request does no work), then the tenant's
    /// rights and slot (cheap), then validation (tokenizing, compiling, replaying a resume; the
    /// slot is released on failure), then the adapter, then a resume's digest. Returns the
    /// request's resume digest too.
    async fn prepare(
        &self,
        request: &Request<GenerateRequest>,
    ) -> Result<(ValidatedRequest, Admission, String), RouterError> {
        authenticate(&self.engine, authorization(request))?;
        let adapter_id = &request.get_ref().adapter_id;
        let mut admission = entitle(&self.engine, authorization(request), adapter_id)?;
        let scope = crate::access::constraint_scope(&self.engine, &admission);
        let mut validated = self.validate(request.get_ref().clone(), scope).await?;
        crate::access::pin_adapter(&self.engine, &mut admission, adapter_id).await?;
        // The request holds the one pin; the engine drops it when the request ends.
        validated.adapter = admission.adapter.take();
        admission.apply(&mut validated);
        let digest = crate::resume::seal(&validated, &self.engine.model_config().fingerprint())?;
        Ok((validated, admission, digest))
    }

    /// Prepares and submits; a refusal is counted in the metrics.
    async fn start(&self, request: &Request<GenerateRequest>) -> Result<Started, RouterError> {
        let attempt = async {
            let (validated, admission, digest) = self.prepare(request).await?;
            let resumed = validated.resumed.len();
            let (id, events) = self.engine.submit(validated)?;
            Ok(Started { id, events, admission, digest, resumed })
        };
        attempt.await.inspect_err(|e| self.engine.record_rejection(e))
    }
}

/// A submitted request: its engine id and events, what it holds, its resume digest and how many
/// of its tokens came from a resume.
struct Started {
    id: u64,
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    admission: Admission,
    digest: String,
    resumed: usize,
}

fn usage(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize, resumed: usize) -> Usage {
    Usage {
        prompt_tokens: prompt_tokens as u32,
        completion_tokens: completion_tokens as u32,
        cached_tokens: cached_tokens as u32,
        resumed_tokens: resumed as u32,
    }
}

/// What open requests get when the server shuts down.
fn going_away() -> RouterError {
    RouterError::Unavailable("the router is shutting down; retry (or resume) on another router".into())
}

fn authorization<T>(req: &Request<T>) -> Option<&str> {
    req.metadata().get("authorization").and_then(|v| v.to_str().ok())
}

fn request_id<T>(req: &Request<T>, assigned: u64) -> String {
    req.metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(128).collect())
        .unwrap_or_else(|| format!("req-{assigned}"))
}

fn finish_reason(r: FinishReason) -> i32 {
    match r {
        FinishReason::Stop => moe_proto::v1::FinishReason::Stop as i32,
        FinishReason::Length => moe_proto::v1::FinishReason::Length as i32,
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateResponse>, Status> {
        let hint = request.metadata().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let span = tracing::info_span!("generate", request_id = %hint);
        async move {
            let Started { id, mut events, admission: _admission, resumed, .. } = self.start(&request).await?;
            let rid = request_id(&request, id);
            tracing::info!(request_id = %rid, engine_request = id, "request started");
            let mut out = GenerateResponse { request_id: rid, ..Default::default() };
            let shutdown = self.engine.shutting_down();
            tokio::pin!(shutdown);
            loop {
                let ev = tokio::select! {
                    ev = events.recv() => ev,
                    _ = &mut shutdown => return Err(going_away().into()),
                };
                let Some(ev) = ev else { break };
                match ev {
                    Event::Delta { text, token_ids, logprobs } => {
                        out.text.push_str(&text);
                        out.token_ids.extend(token_ids);
                        out.logprobs.extend(logprobs);
                    }
                    Event::Finished { reason, prompt_tokens, completion_tokens, cached_tokens } => {
                        out.finish_reason = finish_reason(reason);
                        out.usage = Some(usage(prompt_tokens, completion_tokens, cached_tokens, resumed));
                        return Ok(Response::new(out));
                    }
                    Event::Failed(e) => return Err(e.into()),
                }
            }
            Err(RouterError::Internal("the engine dropped the request".into()).into())
        }
        .instrument(span)
        .await
    }

    type GenerateStreamStream = GenerateStream;

    async fn generate_stream(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let Started { id, events, admission, digest, resumed } = self.start(&request).await?;
        let rid = request_id(&request, id);
        tracing::info!(request_id = %rid, engine_request = id, resumed, "stream started");
        let mut finished = false;
        // The first delta carries the digest a resume needs.
        let mut digest = Some(digest);
        // The tenant's slot and the adapter pin live as long as the stream.
        let held = admission;
        // Shutdown ends the stream with UNAVAILABLE at once, even while the engine is still
        // inside a step (a stuck dispatch, a long prefill) that would outlast the grace period.
        let events = tokio_stream::wrappers::UnboundedReceiverStream::new(events).map(Some);
        let events =
            futures::StreamExt::take_until(events, self.engine.shutting_down()).chain(tokio_stream::once(None));
        let stream = events.map_while(move |ev| {
            let _held = &held;
            if finished {
                return None;
            }
            let Some(ev) = ev else {
                finished = true;
                return Some(Err(going_away().into()));
            };
            Some(match ev {
                Event::Delta { text, token_ids, logprobs } => {
                    let resume_digest = digest.take().unwrap_or_default();
                    Ok(GenerateStreamResponse {
                        event: Some(StreamEvent::Delta(TokenDelta { text, token_ids, logprobs, resume_digest })),
                    })
                }
                Event::Finished { reason, prompt_tokens, completion_tokens, cached_tokens } => {
                    finished = true;
                    Ok(GenerateStreamResponse {
                        event: Some(StreamEvent::Finished(Finished {
                            finish_reason: finish_reason(reason),
                            usage: Some(usage(prompt_tokens, completion_tokens, cached_tokens, resumed)),
                            request_id: rid.clone(),
                        })),
                    })
                }
                Event::Failed(e) => {
                    finished = true;
                    Err(e.into())
                }
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(&self, request: Request<TokenizeRequest>) -> Result<Response<TokenizeResponse>, Status> {
        authenticate(&self.engine, authorization(&request))?;
        let codec = self.engine.codec_arc();
        if !codec.has_tokenizer() {
            return Err(RouterError::invalid("text", "the model has no tokenizer.json").into());
        }
        let text = request.into_inner().text;
        crate::access::check_text_size(&self.engine, "text", &text)?;
        let ids = tokio::task::spawn_blocking(move || codec.encode(&text))
            .await
            .map_err(|e| RouterError::Internal(format!("tokenizer task: {e}")))?
            .map_err(|e| RouterError::invalid("text", e.to_string()))?;
        Ok(Response::new(TokenizeResponse { token_ids: ids }))
    }

    async fn model_info(&self, request: Request<ModelInfoRequest>) -> Result<Response<ModelInfoResponse>, Status> {
        authenticate(&self.engine, authorization(&request))?;
        let c = self.engine.model_config();
        Ok(Response::new(ModelInfoResponse {
            architecture: c.architecture.hf_name().to_string(),
            vocab_size: c.vocab_size as u32,
            hidden_size: c.hidden_size as u32,
            num_layers: c.num_layers as u32,
            num_experts: c.num_experts as u32,
            experts_per_token: c.top_k as u32,
            max_position_embeddings: c.max_position_embeddings as u32,
            model_fingerprint: c.fingerprint(),
            workers: self.cluster.workers() as u32,
            has_tokenizer: self.engine.codec().has_tokenizer(),
            ready: self.cluster.not_ready_reason().is_empty(),
            not_ready_reason: self.cluster.not_ready_reason(),
            refused_workers: self.cluster.refused(),
        }))
    }

    async fn list_adapters(
        &self,
        request: Request<ListAdaptersRequest>,
    ) -> Result<Response<ListAdaptersResponse>, Status> {
        let tenant = authenticate(&self.engine, authorization(&request))?;
        let Some(registry) = self.engine.adapters() else {
            return Ok(Response::new(ListAdaptersResponse::default()));
        };
        let visible = |id: &str| tenant.as_ref().is_none_or(|t| t.admin || t.may_use(id));
        let limits = registry.limits();
        Ok(Response::new(ListAdaptersResponse {
            adapters: registry.list().iter().filter(|a| visible(&a.id)).map(adapter_info).collect(),
            max_adapters: limits.max_adapters as u32,
            max_bytes: limits.max_bytes as u64,
        }))
    }

    async fn load_adapter(
        &self,
        request: Request<LoadAdapterRequest>,
    ) -> Result<Response<LoadAdapterResponse>, Status> {
        require_admin(&self.engine, authorization(&request), "manage adapters")?;
        let registry = self.engine.adapters().cloned().ok_or_else(|| {
            RouterError::FailedPrecondition("this router serves no adapters (start it with --adapter-dir)".into())
        })?;
        let req = request.into_inner();
        let id = req.id.clone();
        tracing::info!(adapter = %id, path = %req.path, "load adapter");
        let info = tokio::task::spawn_blocking(move || registry.load(&req.id, &req.path))
            .await
            .map_err(|e| RouterError::Internal(format!("adapter load task: {e}")))?
            .map_err(RouterError::from)?;
        if let Some(sync) = self.engine.adapter_sync() {
            sync.loaded(&id, &info.path).await.map_err(|e| {
                RouterError::Unavailable(format!(
                    "adapter {id:?} is loaded on this router, but the other routers were not told: {e}"
                ))
            })?;
        }
        Ok(Response::new(LoadAdapterResponse { adapter: Some(adapter_info(&info)) }))
    }

    async fn unload_adapter(
        &self,
        request: Request<UnloadAdapterRequest>,
    ) -> Result<Response<UnloadAdapterResponse>, Status> {
        require_admin(&self.engine, authorization(&request), "manage adapters")?;
        let registry = self.engine.adapters().ok_or_else(|| {
            RouterError::FailedPrecondition("this router serves no adapters (start it with --adapter-dir)".into())
        })?;
        let id = &request.get_ref().id;
        registry.unload(id).map_err(RouterError::from)?;
        if let Some(sync) = self.engine.adapter_sync() {
            sync.unloaded(id).await.map_err(|e| {
                RouterError::Unavailable(format!(
                    "adapter {id:?} is unloaded on this router, but the other routers were not told: {e}"
                ))
            })?;
        }
        Ok(Response::new(UnloadAdapterResponse {}))
    }

    async fn expert_load(&self, request: Request<ExpertLoadRequest>) -> Result<Response<ExpertLoadResponse>, Status> {
        require_admin(&self.engine, authorization(&request), "read the expert load")?;
        let s = self.engine.expert_load().snapshot(std::time::Instant::now());
        Ok(Response::new(ExpertLoadResponse {
            num_layers: s.num_layers as u32,
            num_experts: s.num_experts as u32,
            window_seconds: s.window.as_secs_f64(),
            adapters: s
                .adapters
                .into_iter()
                .map(|a| moe_proto::v1::AdapterExpertLoad { adapter: a.name, tokens: a.tokens })
                .collect(),
        }))
    }
}
