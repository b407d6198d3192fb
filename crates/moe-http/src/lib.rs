//! `moe-http` serves a router's engine over HTTP next to gRPC: the OpenAI-compatible
//! `/v1/completions`, `/v1/chat/completions` (server-sent events with `stream: true`) and
//! `/v1/models`, Prometheus metrics at `/metrics`, and `/health`. Validation, tenants, adapters
//! and error codes are the gRPC service's (shared through `moe_router::access`); this crate only
//! translates. With tenants configured, `/metrics` on the public listener needs an admin key
//! (it shows per-tenant counts and per-adapter expert load); a separate metrics listener
//! ([`serve_metrics`], `--metrics-listen`, for Prometheus inside the cluster) serves it without.

mod api_error;
pub mod chat;
mod openai;
pub mod structured;

pub use api_error::http_status;
pub use chat::{ChatMessage, ChatTemplate};

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use moe_router::Engine;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What the handlers share.
pub struct HttpState {
    pub engine: Engine,
    /// The name `/v1/models` lists and requests may give as `model` for the base model.
    pub model_name: String,
    pub chat: ChatTemplate,
    next: AtomicU64,
}

impl HttpState {
    pub fn new(engine: Engine, model_name: String, chat: ChatTemplate) -> Self {
        Self { engine, model_name, chat, next: AtomicU64::new(1) }
    }

    fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

/// `/metrics` on the public listener: with tenants configured, only for admin keys.
async fn guarded_metrics(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
) -> Result<axum::response::Response, api_error::ApiError> {
    let key = headers.get("authorization").and_then(|v| v.to_str().ok());
    moe_router::access::require_admin(&state.engine, key, "read the metrics")?;
    Ok(metrics(State(state)).await.into_response())
}

/// Refreshes the gauges read from elsewhere (engine state, tenant permits, adapter residency),
/// then renders everything. After load stops these return to their baseline, which tests check.
async fn metrics(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    use moe_router::engine_metrics as em;
    let r = state.engine.metrics();
    let s = state.engine.stats();
    let (total, free) = (s.total_pages.load(Ordering::Relaxed), s.free_pages.load(Ordering::Relaxed));
    em::queue_depth(r).set(s.waiting.load(Ordering::Relaxed) as i64);
    em::running_requests(r).set(s.running.load(Ordering::Relaxed) as i64);
    em::kv_pages_used(r).set(total.saturating_sub(free) as i64);
    em::kv_pages_total(r).set(total as i64);
    if let Some(tenants) = state.engine.tenants() {
        let in_flight = r.gauge_family::<[(&'static str, String); 1]>(
            "moe_tenant_in_flight",
            "Requests of each tenant holding an admission permit.",
        );
        for t in tenants.all() {
            in_flight.get_or_create(&[("tenant", t.name.clone())]).set(t.in_flight() as i64);
        }
    }
    if let Some(reg) = state.engine.adapters() {
        let (resident, pinned, bytes) = reg.usage();
        r.gauge("moe_adapters_resident", "LoRA adapters resident on this router.").set(resident as i64);
        r.gauge("moe_adapters_pinned", "Resident adapters used by running requests.").set(pinned as i64);
        r.gauge("moe_adapter_bytes", "Bytes of resident adapters.").set(bytes as i64);
        let c = reg.counters();
        let count = |a: &AtomicU64| a.load(Ordering::Relaxed) as i64;
        r.gauge("moe_adapter_loads", "Adapter loads since start.").set(count(&c.loads));
        r.gauge("moe_adapter_load_failures", "Adapter loads that failed.").set(count(&c.load_failures));
        r.gauge("moe_adapter_evictions", "Idle adapters evicted to make room.").set(count(&c.evictions));
    }
    let load = state.engine.expert_load().snapshot(std::time::Instant::now());
    let window = r.gauge_family::<[(&'static str, String); 3]>(
        "moe_expert_load_window_tokens",
        "Tokens each adapter routed to each expert in the last minute (base: the base model).",
    );
    window.clear();
    for a in &load.adapters {
        for (i, &n) in a.tokens.iter().enumerate().filter(|(_, n)| **n > 0) {
            let (layer, expert) = (i / load.num_experts.max(1), i % load.num_experts.max(1));
            let labels = [("adapter", a.name.clone()), ("layer", layer.to_string()), ("expert", expert.to_string())];
            window.get_or_create(&labels).set(n as i64);
        }
    }
    ([(CONTENT_TYPE, moe_metrics::CONTENT_TYPE)], r.render())
}

async fn health() -> &'static str {
    "ok"
}

/// The HTTP routes over `state`.
pub fn http_routes(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route("/metrics", get(guarded_metrics))
        .route("/health", get(health))
        .with_state(state)
}

/// Serves `/metrics` (no key) and `/health` on `listener` until `shutdown` resolves: the
/// listener Prometheus scrapes inside the cluster, kept off the public port.
pub async fn serve_metrics(
    state: Arc<HttpState>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let routes = Router::new().route("/metrics", get(metrics)).route("/health", get(health)).with_state(state);
    axum::serve(listener, routes).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

/// Serves the HTTP API on `listener` until `shutdown` resolves.
pub async fn serve_http(
    state: Arc<HttpState>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use axum::serve::ListenerExt;
    // Streamed tokens go out as they come: without TCP_NODELAY a small chunk waits for the
    // client's delayed ACK (~40 ms), which would dominate the time to first token.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set on an HTTP connection");
        }
    });
    axum::serve(listener, http_routes(state)).with_graceful_shutdown(shutdown).await?;
    Ok(())
}
