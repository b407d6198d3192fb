//! The `ExpertWorker` gRPC service over an expert host ([`ExpertCompute`]). Compute runs on blocking threads (the
//! compute pool), never on the async runtime. On the long-lived stream a bad message gets a
//! response carrying an error and the stream goes on; the unary call returns a status.
//!
//! The batch budget (`--max-batch-mb`) bounds one request and all requests in flight together:
//! each takes its working memory from one pool (in KiB) before computing. A stream's request
//! waits for room (backpressure to its router); a unary call that finds no room is answered
//! RESOURCE_EXHAUSTED at once, so no number of concurrent callers can exhaust the worker.

use crate::error::WorkerError;
use crate::host::{ComputeInput, ExpertCompute};
use moe_model::AdapterIdentity;
use moe_proto::v1::expert_worker_server::ExpertWorker;
use moe_proto::v1::{
    ChangeExpertsRequest, ChangeExpertsResponse, DescribeRequest, DescribeResponse, ExpertError, ExpertRequest,
    ExpertResponse, HostedLayer, WireDtype,
};
use moe_proto::wire;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

pub struct ExpertWorkerService {
    host: Arc<dyn ExpertCompute>,
    worker_id: String,
    memory: MemoryPool,
}

impl ExpertWorkerService {
    pub fn new(host: Arc<dyn ExpertCompute>, worker_id: impl Into<String>) -> Self {
        let memory = MemoryPool::new(host.batch_memory(0, 0).1);
        Self { host, worker_id: worker_id.into(), memory }
    }
}

/// The working memory of requests in flight, in KiB, within the batch budget.
#[derive(Clone)]
struct MemoryPool {
    kib: Option<Arc<tokio::sync::Semaphore>>,
    total_kib: usize,
}

impl MemoryPool {
    fn new(budget: Option<usize>) -> Self {
        let total_kib = budget.map_or(0, |b| (b / 1024).clamp(1, tokio::sync::Semaphore::MAX_PERMITS));
        Self { kib: budget.map(|_| Arc::new(tokio::sync::Semaphore::new(total_kib))), total_kib }
    }

    /// The KiB a request needs (a request over the whole budget is refused later, by
    /// `check_budget`, with both sizes named; here it takes the whole pool).
    fn cost(&self, host: &dyn ExpertCompute, req: &ExpertRequest) -> u32 {
        let (bytes, _) = host.batch_memory(req.row_pairs.len(), req.experts.len());
        bytes.div_ceil(1024).clamp(1, self.total_kib.max(1)).min(u32::MAX as usize) as u32
    }

    /// Waits for room (streams).
    async fn wait(&self, host: &dyn ExpertCompute, req: &ExpertRequest) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let pool = self.kib.clone()?;
        pool.acquire_many_owned(self.cost(host, req)).await.ok()
    }

    /// Takes room now or refuses (unary calls).
    fn take(
        &self,
        host: &dyn ExpertCompute,
        req: &ExpertRequest,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, WorkerError> {
        let Some(pool) = self.kib.clone() else { return Ok(None) };
        let cost = self.cost(host, req);
        let held = self.total_kib - pool.available_permits().min(self.total_kib);
        pool.try_acquire_many_owned(cost).map(Some).map_err(|_| {
            WorkerError::ResourceExhausted(format!(
                "this request needs {} KiB of working memory, but requests in flight hold {} of the {} KiB this \
                 worker allows (--max-batch-mb); retry, or send on the stream",
                cost, held, self.total_kib
            ))
        })
    }
}

/// Decodes, validates and computes one request on a blocking thread.
async fn run(host: Arc<dyn ExpertCompute>, req: ExpertRequest) -> Result<ExpertResponse, WorkerError> {
    let dtype = WireDtype::try_from(req.dtype)
        .map_err(|_| WorkerError::InvalidRequest(format!("unknown wire dtype {}", req.dtype)))?;
    tokio::task::spawn_blocking(move || {
        let hidden = req.hidden_size as usize;
        // Refuse what would not fit before allocating anything; an allocation that fails is an
        // error answer, not an abort.
        host.check_budget(req.row_pairs.len(), req.experts.len())?;
        let values = req.rows.len() / wire::bytes_per_value(dtype).max(1);
        let mut rows = Vec::new();
        rows.try_reserve_exact(values).map_err(|_| {
            WorkerError::ResourceExhausted(format!("cannot allocate {} bytes for the request's rows", 4 * values))
        })?;
        let n = wire::decode_rows(&req.rows, dtype, hidden, &mut rows)
            .map_err(|e| WorkerError::InvalidRequest(format!("rows: {e}")))?;
        if n != req.row_pairs.len() {
            return Err(WorkerError::InvalidRequest(format!(
                "{n} rows but row_pairs has {} entries",
                req.row_pairs.len()
            )));
        }
        let adapters: Vec<AdapterIdentity> = req
            .adapters
            .iter()
            .map(|a| AdapterIdentity { id: a.id.clone(), path: a.path.clone(), digest: a.digest.clone() })
            .collect();
        let input = ComputeInput {
            layer: req.layer as usize,
            hidden_size: hidden,
            rows: &rows,
            row_pairs: &req.row_pairs,
            experts: &req.experts,
            weights: &req.weights,
            adapters: &adapters,
            row_adapters: &req.row_adapters,
        };
        let mut out = Vec::new();
        let failed = host.compute(&input, &mut out)?;
        Ok(ExpertResponse {
            id: req.id,
            dtype: dtype as i32,
            rows: wire::encode(&out, dtype).into(),
            error: None,
            failed_adapters: failed
                .into_iter()
                .map(|f| moe_proto::v1::AdapterFailure { slot: f.slot, message: f.message })
                .collect(),
        })
    })
    .await
    .map_err(|e| WorkerError::Internal(e.to_string()))?
}

fn to_proto(list: Vec<(usize, Vec<u32>)>) -> Vec<HostedLayer> {
    list.into_iter().map(|(layer, experts)| HostedLayer { layer: layer as u32, experts }).collect()
}

fn named(req: &ChangeExpertsRequest) -> Vec<(usize, u32)> {
    req.experts.iter().flat_map(|l| l.experts.iter().map(move |&e| (l.layer as usize, e))).collect()
}

/// Runs a load or unload on a blocking thread and answers with what is hosted afterwards.
async fn change(
    host: Arc<dyn ExpertCompute>,
    req: ChangeExpertsRequest,
    unload: bool,
) -> Result<ChangeExpertsResponse, Status> {
    let experts = named(&req);
    let h = host.clone();
    let (changed, took) = tokio::task::spawn_blocking(move || {
        if unload {
            h.unload_experts(&experts)
        } else {
            h.load_experts(&experts).map(|n| (n, std::time::Duration::ZERO))
        }
    })
    .await
    .map_err(|e| Status::internal(format!("expert change task failed: {e}")))??;
    Ok(ChangeExpertsResponse {
        hosted: to_proto(host.hosted()),
        changed: changed as u32,
        drain_ms: took.as_millis() as u64,
    })
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ExpertResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExpertWorker for ExpertWorkerService {
    #[tracing::instrument(skip_all, fields(layer = request.get_ref().layer, rows = request.get_ref().row_pairs.len(), requests = ?request.get_ref().request_ids))]
    async fn compute(&self, request: Request<ExpertRequest>) -> Result<Response<ExpertResponse>, Status> {
        let req = request.into_inner();
        let _room = self.memory.take(self.host.as_ref(), &req)?;
        Ok(Response::new(run(self.host.clone(), req).await?))
    }

    type ComputeStreamStream = ResponseStream;

    async fn compute_stream(
        &self,
        request: Request<Streaming<ExpertRequest>>,
    ) -> Result<Response<Self::ComputeStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let host = self.host.clone();
        let memory = self.memory.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(%status, "expert stream closed by peer");
                        break;
                    }
                };
                let (id, dtype) = (msg.id, msg.dtype);
                let span = tracing::debug_span!(
                    "expert_compute",
                    id,
                    layer = msg.layer,
                    rows = msg.row_pairs.len(),
                    requests = ?msg.request_ids
                );
                let room = memory.wait(host.as_ref(), &msg).await;
                let result = run(host.clone(), msg).instrument(span).await;
                drop(room);
                let resp = match result {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, "rejected expert request");
                        ExpertResponse {
                            id,
                            dtype,
                            rows: Default::default(),
                            error: Some(ExpertError { code: e.code() as i32, message: e.to_string() }),
                            failed_adapters: Vec::new(),
                        }
                    }
                };
                if tx.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn describe(&self, _request: Request<DescribeRequest>) -> Result<Response<DescribeResponse>, Status> {
        let c = self.host.config();
        Ok(Response::new(DescribeResponse {
            worker_id: self.worker_id.clone(),
            layers: to_proto(self.host.hosted()),
            model_fingerprint: self.host.fingerprint().to_string(),
            hidden_size: c.hidden_size as u32,
            device: self.host.device().to_string(),
            num_layers: c.num_layers as u32,
            num_experts: c.num_experts as u32,
            bytes_per_expert: self.host.expert_memory().0 as u64,
            max_expert_bytes: self.host.expert_memory().1.unwrap_or(0) as u64,
            draining: to_proto(self.host.draining()),
            numerics: self.host.numerics(),
        }))
    }

    #[tracing::instrument(skip_all, fields(experts = named(request.get_ref()).len()))]
    async fn load_experts(
        &self,
        request: Request<ChangeExpertsRequest>,
    ) -> Result<Response<ChangeExpertsResponse>, Status> {
        Ok(Response::new(change(self.host.clone(), request.into_inner(), false).await?))
    }

    #[tracing::instrument(skip_all, fields(experts = named(request.get_ref()).len()))]
    async fn unload_experts(
        &self,
        request: Request<ChangeExpertsRequest>,
    ) -> Result<Response<ChangeExpertsResponse>, Status> {
        Ok(Response::new(change(self.host.clone(), request.into_inner(), true).await?))
    }
}

/// Serves `ExpertWorker` (with grpc.health.v1 and reflection) on `listener` until `shutdown`.
/// Message limits are raised deliberately: a large prefill step's rows may be many megabytes.
pub async fn serve_worker(
    host: Arc<dyn ExpertCompute>,
    worker_id: String,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    serve_worker_with(host, worker_id, listener, None, shutdown).await
}

/// PEM files of a worker's TLS identity; with `client_ca`, clients must present a certificate
/// it signed (mutual TLS). A worker with TLS refuses plaintext connections.
#[derive(Clone, Debug)]
pub struct WorkerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

/// [`serve_worker`] with optional TLS.
pub async fn serve_worker_with(
    host: Arc<dyn ExpertCompute>,
    worker_id: String,
    listener: tokio::net::TcpListener,
    tls: Option<WorkerTls>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use moe_proto::v1::expert_worker_server::ExpertWorkerServer;
    const MAX_MESSAGE_BYTES: usize = moe_proto::EXPERT_MAX_MESSAGE_BYTES;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<ExpertWorkerServer<ExpertWorkerService>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(moe_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection, reflection_alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);
    let svc = ExpertWorkerServer::new(ExpertWorkerService::new(host, worker_id))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
    if let Some(t) = tls {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(t.cert_pem, t.key_pem));
        if let Some(ca) = t.client_ca_pem {
            cfg = cfg.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(cfg)?;
    }
    builder
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
