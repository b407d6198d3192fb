//! Clients of a router process at `host:port`: one greedy `Generate` of 8 tokens, the resident
//! adapters, `ModelInfo` and the gRPC health status of `moe.v1.Inference`.

use moe_proto::v1::generate_request::Prompt;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{GenerateRequest, SamplingParams, TokenIds};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A request for `ids` with sampling `s` and nothing else set.
pub fn request(ids: Vec<u32>, s: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids })),
        sampling: Some(s),
        adapter_id: String::new(),
        timeout_ms: 0,
        cache_salt: String::new(),
        resume: None,
        constraint: None,
        priority: 0,
    }
}

pub async fn generate(addr: &str, ids: Vec<u32>) -> Result<Vec<u32>, tonic::Status> {
    generate_with(addr, ids, "").await
}

pub async fn generate_with(addr: &str, ids: Vec<u32>, adapter: &str) -> Result<Vec<u32>, tonic::Status> {
    let mut c = InferenceClient::connect(format!("http://{addr}")).await.expect("connect");
    let req = GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids })),
        sampling: Some(SamplingParams { max_new_tokens: Some(8), ..Default::default() }),
        adapter_id: adapter.into(),
        ..Default::default()
    };
    c.generate(req).await.map(|r| r.into_inner().token_ids)
}

/// The resident adapters of the router at `addr`.
pub async fn resident_adapters(addr: &str) -> Vec<String> {
    let mut c = InferenceClient::connect(format!("http://{addr}")).await.expect("connect");
    let list = c.list_adapters(moe_proto::v1::ListAdaptersRequest {}).await.expect("list").into_inner();
    list.adapters.into_iter().filter(|a| a.resident).map(|a| a.id).collect()
}

pub async fn model_info(addr: &str) -> moe_proto::v1::ModelInfoResponse {
    let mut c = InferenceClient::connect(format!("http://{addr}")).await.expect("connect");
    c.model_info(moe_proto::v1::ModelInfoRequest {}).await.expect("info").into_inner()
}

pub async fn health(addr: &str) -> i32 {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut h = HealthClient::new(channel);
    h.check(HealthCheckRequest { service: "moe.v1.Inference".into() }).await.expect("health").into_inner().status
}
