//! `moe-router` owns requests: validating them, admitting them under a KV-cache budget and a
//! queue bound, iteration-level continuous batching (requests join and leave between steps,
//! prefill chunked under a per-step token budget) on a compute thread of its own, sampling and
//! stop rules, deadlines and cancellation, resumable generation, tenants (API keys, adapter rights, concurrency) and
//! LoRA adapters per request, and the public `Inference` gRPC service. Where the
//! experts run is not its business: it is handed a [`moe_model::ExpertExecutor`].

pub mod access;
pub mod adapter_sync;
pub mod budget;
pub mod constraint;
mod detokenize;
mod engine;
pub mod engine_metrics;
mod error;
pub mod expert_load;
mod request;
pub mod resume;
mod server;
mod service;
mod tenants;

pub use engine::{
    router_adapters, Engine, EngineConfig, EngineHealth, EngineParts, EngineStats, PrefixCacheScope, RouterAdapters,
    Scheduling, SchedulingConfig,
};
pub use engine_metrics::{outcome_label, EngineMetrics};
pub use error::RouterError;
pub use request::{Event, FinishReason, GenerationParams, PromptInput, ValidatedRequest};
pub use server::{inference_routes, serve_inference, MAX_MESSAGE_BYTES};
pub use service::{ClusterStatus, InferenceService, StaticCluster};
pub use tenants::{Tenant, Tenants};
