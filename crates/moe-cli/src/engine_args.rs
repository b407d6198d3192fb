//! Flags of the router's engine, shared by `moe serve` and `moe router`.

use clap::Args;
use moe_cluster::EngineConfig;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Tokens per batch step (decode tokens plus prefill chunks).
    #[arg(long, env = "MOE_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Requests in the running batch at most.
    #[arg(long, env = "MOE_MAX_RUNNING", default_value_t = 64)]
    pub max_running: usize,
    /// Requests waiting for admission at most; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "MOE_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,
    /// KV-cache memory budget in MiB.
    #[arg(long, env = "MOE_KV_CACHE_MB", default_value_t = 512)]
    pub kv_cache_mb: usize,
    /// Deadline of requests that set none, in seconds.
    #[arg(long, env = "MOE_REQUEST_TIMEOUT_SECS", default_value_t = 600)]
    pub request_timeout_secs: u64,
    /// Two-batch overlap with remote workers: each step's batch runs as two interleaved halves,
    /// one half's attention overlapping the other's expert round trips. Pays where routers and
    /// workers run on their own processors; measure with `moe bench`.
    #[arg(long, env = "MOE_TWO_BATCH_OVERLAP", default_value_t = false, action = clap::ArgAction::Set)]
    pub two_batch_overlap: bool,
    /// Text prompts longer than this many bytes are refused (INVALID_ARGUMENT) before the
    /// tokenizer runs.
    #[arg(long, env = "MOE_MAX_PROMPT_BYTES", default_value_t = 1 << 20)]
    pub max_prompt_bytes: usize,
    /// A constrained request whose token mask takes longer than this to compute in one step
    /// fails alone (RESOURCE_EXHAUSTED naming the limit).
    #[arg(long, env = "MOE_MAX_CONSTRAINT_MS", default_value_t = 200)]
    pub max_constraint_ms: u64,
    /// Automatic prefix caching: full KV pages are kept after a request and reused by later
    /// requests that start with the same tokens, on the same adapter, in the same scope.
    #[arg(long, env = "MOE_PREFIX_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_cache: bool,
    /// Who shares cached pages: `tenant` (requests of one tenant; no tenant can probe another's
    /// prompts by timing) or `global` (every tenant on the same adapter). Without a tenants
    /// file every request is in one scope either way.
    #[arg(long, env = "MOE_PREFIX_CACHE_SCOPE", default_value = "tenant", value_parser = ["tenant", "global"])]
    pub prefix_cache_scope: String,
    /// Admission policy: `fair` (priority classes, then token-weighted fair share between
    /// tenants — or adapters without a tenants file — with preemption) or `fcfs` (arrival order).
    #[arg(long, env = "MOE_SCHEDULING", default_value = "fair", value_parser = ["fair", "fcfs"])]
    pub scheduling: String,
    /// Under fair scheduling: how long the best waiting request must have waited before it may
    /// preempt a running one of a lower class, or of a tenant over its fair share (of tokens
    /// served, or of the running batch) while the waiting one's tenant is under it.
    #[arg(long, env = "MOE_PREEMPT_AFTER_MS", default_value_t = 5)]
    pub preempt_after_ms: u64,
    /// Under fair scheduling: how many weighted tokens a tenant must be ahead of another (of the
    /// same class) before the other's waiting request may preempt it.
    #[arg(long, env = "MOE_PREEMPT_MARGIN_TOKENS", default_value_t = 256.0)]
    pub preempt_margin_tokens: f64,
    /// Fault injection for tests of the engine's supervision: the compute loop panics after
    /// this many steps. Never use it in production.
    #[arg(long, env = "MOE_FAULT_PANIC_AFTER_STEPS", hide = true)]
    pub fault_panic_after_steps: Option<usize>,
}

impl EngineArgs {
    pub fn config(&self) -> anyhow::Result<EngineConfig> {
        anyhow::ensure!(self.max_batch_tokens > 0, "--max-batch-tokens must be at least 1");
        anyhow::ensure!(self.max_running > 0, "--max-running must be at least 1");
        anyhow::ensure!(self.kv_cache_mb > 0, "--kv-cache-mb must be at least 1");
        Ok(EngineConfig {
            max_batch_tokens: self.max_batch_tokens,
            max_running: self.max_running,
            max_waiting: self.max_waiting,
            kv_cache_bytes: self.kv_cache_mb << 20,
            page_size: 16,
            default_timeout: Duration::from_secs(self.request_timeout_secs.max(1)),
            two_batch_overlap: self.two_batch_overlap,
            panic_after_steps: self.fault_panic_after_steps,
            max_prompt_bytes: self.max_prompt_bytes,
            max_constraint_time: std::time::Duration::from_millis(self.max_constraint_ms.max(1)),
            prefix_cache: self.prefix_cache,
            prefix_cache_scope: if self.prefix_cache_scope == "global" {
                moe_cluster::PrefixCacheScope::Global
            } else {
                moe_cluster::PrefixCacheScope::Tenant
            },
            scheduling: moe_cluster::SchedulingConfig {
                policy: self.scheduling.parse().map_err(anyhow::Error::msg)?,
                preempt_after: Duration::from_millis(self.preempt_after_ms),
                preempt_margin: self.preempt_margin_tokens.max(0.0),
                ..Default::default()
            },
            ..Default::default()
        })
    }
}

/// LoRA adapter and tenant flags of `moe serve` and `moe router`.
#[derive(Args, Debug, Clone)]
pub struct AdapterServeArgs {
    /// Directory of LoRA adapters (each subdirectory a PEFT adapter, its name the id); workers
    /// read the same directory (mount one volume everywhere).
    #[arg(long, env = "MOE_ADAPTER_DIR")]
    pub adapter_dir: Option<PathBuf>,
    /// Resident adapters at most; idle ones are evicted least recently used first.
    #[arg(long, env = "MOE_MAX_ADAPTERS", default_value_t = 64)]
    pub max_adapters: usize,
    /// Memory for resident adapters, in MiB.
    #[arg(long, env = "MOE_MAX_ADAPTER_MB", default_value_t = 4096)]
    pub max_adapter_mb: usize,
    /// Highest LoRA rank accepted; adapters with a module above it are refused at load.
    #[arg(long, env = "MOE_MAX_LORA_RANK", default_value_t = moe_cluster::DEFAULT_MAX_RANK,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=512))]
    pub max_lora_rank: usize,
    /// Tenants file (TOML: api keys, allowed adapters, concurrency limits); requests must then
    /// present `authorization: Bearer KEY`. With `--demo`, `--tenants demo` is the demo's own
    /// (tenants `writers`, `coders` and `operator`; `moe demo` prints their keys).
    #[arg(long, env = "MOE_TENANTS")]
    pub tenants: Option<PathBuf>,
}

impl AdapterServeArgs {
    pub fn options(&self) -> anyhow::Result<moe_cluster::AdapterOptions> {
        if let Some(d) = &self.adapter_dir {
            anyhow::ensure!(d.is_dir(), "--adapter-dir {} is not a directory", d.display());
        }
        Ok(moe_cluster::AdapterOptions {
            dir: self.adapter_dir.clone(),
            limits: moe_cluster::RegistryLimits {
                max_adapters: self.max_adapters,
                max_bytes: self.max_adapter_mb.saturating_mul(1 << 20),
                max_rank: self.max_lora_rank,
                ..Default::default()
            },
        })
    }

    /// `--tenants demo` means the demo model's own tenants file (in `model_dir`), when `demo`.
    pub fn resolve_demo_tenants(&mut self, demo: bool, model_dir: &std::path::Path) {
        if demo && self.tenants.as_deref() == Some(std::path::Path::new("demo")) {
            self.tenants = Some(model_dir.join("tenants.toml"));
        }
    }
}

/// etcd connection flags, shared by `moe worker` and `moe router`.
#[derive(clap::Args, Debug, Clone)]
pub struct EtcdArgs {
    /// etcd endpoints, comma separated (e.g. http://127.0.0.1:2379).
    #[arg(long, env = "MOE_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Cluster name: workers register under /moe/<cluster>/workers/.
    #[arg(long, env = "MOE_CLUSTER", default_value = "default")]
    pub cluster: String,
    #[arg(long, env = "MOE_ETCD_USER")]
    pub etcd_user: Option<String>,
    #[arg(long, env = "MOE_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
    /// CA certificate (PEM) for https etcd endpoints.
    #[arg(long, env = "MOE_ETCD_CA")]
    pub etcd_ca: Option<std::path::PathBuf>,
}

impl EtcdArgs {
    pub fn options(&self) -> Option<moe_cluster::EtcdOptions> {
        (!self.etcd.is_empty()).then(|| moe_cluster::EtcdOptions {
            endpoints: self.etcd.clone(),
            cluster: self.cluster.clone(),
            user: self.etcd_user.clone(),
            password: self.etcd_password.clone(),
            ca_file: self.etcd_ca.clone(),
        })
    }
}
