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

/// A tonic router with Inference, grpc.health.v1 (SERVING) and reflection.
pub async fn inference_routes(engine: Engine, workers: usize) -> Result<Router, tonic_reflection::server::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<InferenceServer<InferenceService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(moe_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let inference = InferenceServer::new(InferenceService::new(engine, workers))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Ok(Server::builder().tcp_nodelay(true).add_service(health).add_service(reflection).add_service(inference))
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve_inference(
    engine: Engine,
    workers: usize,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    inference_routes(engine, workers).await?.serve_with_incoming_shutdown(incoming, shutdown).await?;
    Ok(())
}
