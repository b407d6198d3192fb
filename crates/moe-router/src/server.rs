//! Serving the Inference API with the standard health service and server reflection, on a
//! listener the caller bound (port 0 in tests), with TCP_NODELAY on accepted sockets.

use crate::engine::Engine;
use crate::service::InferenceService;
use moe_proto::v1::inference_server::InferenceServer;
use std::future::Future;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::Server;

/// Largest message the public API accepts or sends.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// A tonic router with Inference, grpc.health.v1 and reflection. Health is SERVING, or follows
/// `ready` when given (a router is not ready while some expert has no live holder).
pub async fn inference_routes(
    engine: Engine,
    cluster: std::sync::Arc<dyn crate::service::ClusterStatus>,
    ready: Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<Router, tonic_reflection::server::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    match ready {
        None => reporter.set_serving::<InferenceServer<InferenceService>>().await,
        Some(mut ready) => {
            tokio::spawn(async move {
                loop {
                    let now = *ready.borrow_and_update();
                    if now {
                        reporter.set_serving::<InferenceServer<InferenceService>>().await;
                        reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
                    } else {
                        reporter.set_not_serving::<InferenceServer<InferenceService>>().await;
                        reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
                    }
                    if ready.changed().await.is_err() {
                        return;
                    }
                }
            });
        }
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(moe_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let inference = InferenceServer::new(InferenceService::new(engine, cluster))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Ok(Server::builder().tcp_nodelay(true).add_service(health).add_service(reflection).add_service(inference))
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve_inference(
    engine: Engine,
    cluster: std::sync::Arc<dyn crate::service::ClusterStatus>,
    ready: Option<tokio::sync::watch::Receiver<bool>>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    inference_routes(engine, cluster, ready).await?.serve_with_incoming_shutdown(incoming, shutdown).await?;
    Ok(())
}
