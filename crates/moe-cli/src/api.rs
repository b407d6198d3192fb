//! The public servers of `moe serve` and `moe router`: gRPC always, the OpenAI-compatible
//! HTTP API with `/metrics` when `--http-listen` is given (with tenants, `/metrics` there needs
//! an admin key), and `/metrics` without a key on `--metrics-listen`; all stopping together.

use clap::Args;
use futures::FutureExt;
use moe_router::{ClusterStatus, Engine};
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpListener;

#[derive(Args, Debug, Clone)]
pub struct HttpArgs {
    /// Also serve the OpenAI-compatible HTTP API and /metrics here (e.g. 0.0.0.0:8080).
    #[arg(long, env = "MOE_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Serve /metrics (and /health) here without a key, for Prometheus inside the cluster (e.g.
    /// 0.0.0.0:9090). With tenants configured, /metrics on --http-listen needs an admin key.
    #[arg(long, env = "MOE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// The model name of the HTTP API (default: the model directory's name).
    #[arg(long, env = "MOE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
}

/// Bound listeners.
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
}

pub async fn bind_all(grpc: &str, http: &HttpArgs, what: &str) -> anyhow::Result<Listeners> {
    // HTTP first: the gRPC "listening on" line (what tests and scripts wait for) then comes
    // only once every listener is bound, and a port that is taken is an error line instead.
    let http_listener = match &http.http_listen {
        None => None,
        Some(addr) => {
            let l = TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
            eprintln!("moe {what}: HTTP API on {}", l.local_addr()?);
            Some(l)
        }
    };
    let metrics = match &http.metrics_listen {
        None => None,
        Some(addr) => {
            let l = TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
            eprintln!("moe {what}: metrics on {}", l.local_addr()?);
            Some(l)
        }
    };
    let grpc = crate::engine_args::bind(grpc, what).await?;
    Ok(Listeners { grpc, http: http_listener, metrics })
}

/// Serves gRPC (and HTTP) until `stop` resolves.
pub async fn serve_all(
    engine: Engine,
    cluster: Arc<dyn ClusterStatus>,
    ready: Option<tokio::sync::watch::Receiver<bool>>,
    model_dir: &Path,
    http: &HttpArgs,
    listeners: Listeners,
    stop: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // On shutdown: refuse new requests, let running ones finish, and fail what is still open
    // with UNAVAILABLE shortly before the grace period ends, so no stream is cut without a status.
    let stopping = engine.clone();
    let stop = async move {
        stop.await;
        stopping.begin_drain();
        tokio::spawn(async move {
            tokio::time::sleep(crate::engine_args::GRACE.saturating_sub(std::time::Duration::from_millis(1500))).await;
            stopping.begin_shutdown();
        });
    }
    .boxed()
    .shared();
    let failed = engine_failure(engine.clone());
    let grpc = moe_router::serve_inference(engine.clone(), cluster, ready, listeners.grpc, stop.clone());
    if listeners.http.is_none() && listeners.metrics.is_none() {
        return tokio::select! {
            r = grpc => r,
            e = failed => Err(e.into()),
        };
    }
    let name = http.served_model_name.clone().unwrap_or_else(|| {
        model_dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "moe".into())
    });
    let chat = moe_http::ChatTemplate::from_model_dir(model_dir)?;
    let state = Arc::new(moe_http::HttpState::new(engine, name, chat));
    let http = {
        let (state, stop) = (state.clone(), stop.clone());
        async move {
            match listeners.http {
                Some(l) => moe_http::serve_http(state, l, stop).await,
                None => Ok(()),
            }
        }
    };
    let metrics = async move {
        match listeners.metrics {
            Some(l) => moe_http::serve_metrics(state, l, stop).await,
            None => Ok(()),
        }
    };
    let both = async {
        let (a, b, c) = tokio::join!(grpc, http, metrics);
        a.and(b).and(c)
    };
    tokio::select! {
        r = both => r,
        e = failed => Err(e.into()),
    }
}

/// Resolves once the engine has failed, after a short pause in which the servers still answer
/// (open requests get their INTERNAL status, health reads NOT_SERVING, new requests get
/// UNAVAILABLE); the process then exits non-zero so that it is restarted.
async fn engine_failure(engine: moe_router::Engine) -> String {
    let mut health = engine.watch_health();
    let why = loop {
        if let moe_router::EngineHealth::Failed(why) = &*health.borrow_and_update() {
            break why.clone();
        }
        if health.changed().await.is_err() {
            // The compute loop ended without failing (the process is stopping): never resolve.
            if let moe_router::EngineHealth::Failed(why) = &*health.borrow() {
                break why.clone();
            }
            std::future::pending::<()>().await;
        }
    };
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    format!("the engine failed: {why}")
}
