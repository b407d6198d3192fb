//! A serving process's public side: binding its listeners (gRPC always; the OpenAI-compatible
//! HTTP API with `/metrics`, and `/metrics` alone without a key, when asked), serving them all
//! until a shutdown signal, draining on the way out, and exiting non-zero when the engine fails.
//! `moe serve`, `moe router` and `moe worker` run through here.

use crate::{ClusterError, Result};
use futures::FutureExt;
use moe_router::{ClusterStatus, Engine};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How long a stopping server waits for open connections.
pub const GRACE: Duration = Duration::from_secs(5);

/// A future that resolves when the server should stop.
pub type StopSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A server's own error, as tonic and axum report them.
pub type ServerError = Box<dyn std::error::Error + Send + Sync>;

/// Where the public APIs listen.
#[derive(Clone, Debug, Default)]
pub struct PublicApis {
    /// The OpenAI-compatible HTTP API with `/metrics` (a key is needed there with tenants).
    pub http_listen: Option<String>,
    /// `/metrics` and `/health` without a key.
    pub metrics_listen: Option<String>,
    /// The model name of the HTTP API (default: the model directory's name).
    pub served_model_name: Option<String>,
}

/// Bound listeners.
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
}

async fn listen(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|error| ClusterError::Listen { addr: addr.to_string(), error })
}

fn local(l: &TcpListener, addr: &str) -> Result<String> {
    let a = l.local_addr().map_err(|error| ClusterError::Listen { addr: addr.to_string(), error })?;
    Ok(a.to_string())
}

/// Binds `addr` and says where it listens (tests read this line to find port 0's choice).
pub async fn bind(addr: &str, what: &str) -> Result<TcpListener> {
    let listener = listen(addr).await?;
    eprintln!("moe {what}: listening on {}", local(&listener, addr)?);
    Ok(listener)
}

/// Binds every listener: HTTP first, so the gRPC "listening on" line (what tests and scripts
/// wait for) comes only once every listener is bound, and a port that is taken is an error line.
pub async fn bind_all(grpc: &str, apis: &PublicApis, what: &str) -> Result<Listeners> {
    let mut extra = [None, None];
    for (slot, (addr, label)) in
        extra.iter_mut().zip([(&apis.http_listen, "HTTP API"), (&apis.metrics_listen, "metrics")])
    {
        if let Some(addr) = addr {
            let l = listen(addr).await?;
            eprintln!("moe {what}: {label} on {}", local(&l, addr)?);
            *slot = Some(l);
        }
    }
    let [http, metrics] = extra;
    Ok(Listeners { grpc: bind(grpc, what).await?, http, metrics })
}

/// Serves gRPC (and HTTP) until `stop` resolves. On shutdown: refuse new requests, let running
/// ones finish, and fail what is still open with UNAVAILABLE shortly before the grace period
/// ends, so no stream is cut without a status.
pub async fn serve_all(
    engine: Engine,
    cluster: Arc<dyn ClusterStatus>,
    ready: Option<tokio::sync::watch::Receiver<bool>>,
    model_dir: &Path,
    apis: &PublicApis,
    listeners: Listeners,
    stop: StopSignal,
) -> std::result::Result<(), ServerError> {
    let stopping = engine.clone();
    let stop = async move {
        stop.await;
        stopping.begin_drain();
        tokio::spawn(async move {
            tokio::time::sleep(GRACE.saturating_sub(Duration::from_millis(1500))).await;
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
    let name = apis.served_model_name.clone().unwrap_or_else(|| {
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
    let all = async {
        let (a, b, c) = tokio::join!(grpc, http, metrics);
        a.and(b).and(c)
    };
    tokio::select! {
        r = all => r,
        e = failed => Err(e.into()),
    }
}

/// Resolves once the engine has failed, after a short pause in which the servers still answer
/// (open requests get their INTERNAL status, health reads NOT_SERVING, new requests get
/// UNAVAILABLE); the process then exits non-zero so that it is restarted.
async fn engine_failure(engine: Engine) -> String {
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
    tokio::time::sleep(Duration::from_secs(2)).await;
    format!("the engine failed: {why}")
}

/// Resolves once Ctrl-C or SIGTERM arrives.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

/// Runs a server until it stops by itself, or until a shutdown signal plus `grace` (graceful
/// shutdown waits for open connections, and routers keep long-lived streams open).
pub async fn run_until_signal<F, Fut>(serve: F, grace: Duration) -> Result<()>
where
    F: FnOnce(StopSignal) -> Fut,
    Fut: Future<Output = std::result::Result<(), ServerError>>,
{
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = tx.send(true);
    });
    let mut rx_serve = rx.clone();
    let stop = Box::pin(async move {
        let _ = rx_serve.wait_for(|v| *v).await;
    });
    let mut rx_grace = rx;
    tokio::select! {
        r = serve(stop) => r.map_err(|e| ClusterError::Server(e.to_string())),
        _ = async {
            let _ = rx_grace.wait_for(|v| *v).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("grace period over; exiting with connections still open");
            Ok(())
        }
    }
}
