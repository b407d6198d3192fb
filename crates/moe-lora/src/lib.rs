//! `moe-lora` owns LoRA adapters: reading PEFT directories (`adapter_config.json` +
//! `adapter_model.safetensors`), checking every module against the base model (what can be
//! applied, and with which shapes) before any weight is read, uploading the pairs a process needs
//! (a router: attention and gate; a worker: the experts it hosts), and the registry of resident
//! adapters (load on first use, count and byte limits, least-recently-used eviction of idle
//! adapters, pins held by running requests).
//!
//! The math of applying adapters is the compute backend's (`lora_add`, `expert_ffn_lora`), and
//! the forward pass's (`moe_model::AdapterWeights`); this crate does not serve or authenticate.

mod catalog;
mod config;
mod error;
mod freshness;
mod load;
mod peft;
mod registry;

pub use catalog::{AdapterCatalog, AdapterPin};
pub use config::{PeftConfig, TargetModules};
pub use error::{LoraError, Result};
pub use freshness::FileStamp;
pub use load::{load_adapter, load_local_adapter, locate_adapter, AdapterParts};
pub use peft::{AdapterManifest, FusedProj, LoraTarget, ModuleKind, TargetModule};
pub use registry::{
    validate_id, validate_rel_path, AdapterInfo, AdapterRegistry, RegistryCounters, RegistryLimits, Resident,
    DEFAULT_MAX_RANK, RECHECK_AFTER,
};
