//! The Inference API of an engine served in the test's own runtime on a loopback port, and a
//! client that waits for it.

use moe_proto::v1::inference_client::InferenceClient;
use moe_router::Engine;
use std::time::Duration;

/// A served engine; the server stops when this is dropped.
pub struct Api {
    /// `http://127.0.0.1:PORT`.
    pub addr: String,
    pub engine: Engine,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Serves `engine` (Inference, health, reflection) on a free loopback port.
pub async fn serve_api(engine: Engine) -> Api {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let e = engine.clone();
    tokio::spawn(async move {
        let cluster = std::sync::Arc::new(moe_router::StaticCluster(2));
        let _ = moe_router::serve_inference(e, cluster, None, listener, async {
            let _ = rx.await;
        })
        .await;
    });
    Api { addr, engine, _stop: stop }
}

/// A client of `addr`, retried until the server accepts.
pub async fn api_client(addr: &str) -> InferenceClient<tonic::transport::Channel> {
    for _ in 0..50 {
        if let Ok(c) = InferenceClient::connect(addr.to_string()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("cannot connect to {addr}");
}
