//! `moe-model` owns the model: reading a Hugging Face MoE checkpoint (`config.json`,
//! safetensors, single or sharded; f32, bf16, f16), the forward pass of Mixtral, Qwen2-MoE,
//! Qwen3-MoE and OLMoE exactly as transformers defines them, expert routing, and the bookkeeping
//! of the paged KV cache. It computes through [`moe_compute::Backend`] and knows nothing of
//! tokenizers, sampling or serving.

pub mod adapter;
mod architecture;
mod batch;
mod cache;
pub mod checkpoint;
pub mod config;
mod config_reader;
mod config_variants;
mod delta_net_weights;
mod error;
mod experts;
mod fp8;
mod fused_experts;
mod gqa;
pub mod kv;
mod kv_states;
mod linear_attention;
mod loader;
mod mla;
mod mla_weights;
mod model;
mod overlap;
pub mod prefix;
pub mod rope;
pub mod routing;
pub mod sizing;
mod state_pool;
pub mod weights;
mod workspace;

pub use adapter::{AdapterIdentity, AdapterWeights, LayerLora};
pub use batch::BatchItem;
pub use config::{Architecture, LatentAttention, LinearAttention, ModelConfig, QkNorm, Quantization};
pub use delta_net_weights::gated_q_rows;
pub use error::{ModelError, Result};
pub use experts::{ExpertExecutor, ExpertRoutes, ExpertTicket, LayerCall, StartedExperts};
pub use kv::{PageAllocator, PageKey, SequenceCache};
pub use mla_weights::{absorbed_kv_b_lora, latent_kv_a_rows, latent_q_rows};
pub use model::{KvCache, LogitsFor, Model, Workspace};
pub use overlap::overlap_split;
pub use routing::{GateScoring, RoutingRule};
pub use sizing::ModelSize;
pub use workspace::StepPhases;
