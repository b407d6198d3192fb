//! Serving the Inference API with the standard health service and server reflection, on a
//! listener the caller bound (port 0 in tests), with TCP_NODELAY on accepted sockets.

use crate::engine::Engine;
use crate::service::InferenceService;
use moe_proto::v1::inference_server::InferenceServer;
use std::future::Future;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::Server;

/// Largest message the public API accepts or sends.
pub const MAX_MESSAGE_BYTES: usize = moe_proto::INFERENCE_MAX_MESSAGE_BYTES;

/// A tonic router with Inference, grpc.health.v1 and reflection. Health is SERVING, or follows
/// `ready` when given (a router is not ready while some expert has no live holder).
pub async fn inference_routes(
    engine: Engine,
    cluster: std::sync::Arc<dyn crate::service::ClusterStatus>,
    ready: Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<Router, tonic_reflection::server::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    // SERVING while the engine runs and (when given) `ready` holds; NOT_SERVING for good once
    // the engine has failed.
    let mut engine_health = engine.watch_health();
    let mut ready = ready;
    let mut engine_open = true;
    // NOT_SERVING from the first moment the routes exist (a probe before the task below runs
    // must not get NOT_FOUND "service not registered"); the task then says what holds.
    reporter.set_not_serving::<InferenceServer<InferenceService>>().await;
    reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    tokio::spawn(async move {
        loop {
            let failed = matches!(*engine_health.borrow_and_update(), crate::engine::EngineHealth::Failed(_));
            let is_ready = ready.as_mut().is_none_or(|r| *r.borrow_and_update());
            if is_ready && !failed {
                reporter.set_serving::<InferenceServer<InferenceService>>().await;
                reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
            } else {
                reporter.set_not_serving::<InferenceServer<InferenceService>>().await;
                reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            }
            let ready_changed = async {
                match ready.as_mut() {
                    Some(r) => r.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = engine_health.changed(), if engine_open => engine_open = r.is_ok(),
                ok = ready_changed => if !ok { ready = None },
            }
            if !engine_open && ready.is_none() {
                return;
            }
        }
    });
    // Reflection in both versions: grpcurl speaks v1; Python's grpcio-reflection, Postman and
    // older grpcurl speak only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(moe_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection, reflection_alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);
    let inference = InferenceServer::new(InferenceService::new(engine, cluster))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Ok(Server::builder()
        .tcp_nodelay(true)
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(inference))
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
