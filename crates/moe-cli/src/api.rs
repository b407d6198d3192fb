//! The flags of the public servers of `moe serve` and `moe router` (gRPC always, the
//! OpenAI-compatible HTTP API with `/metrics` when `--http-listen` is given (with tenants,
//! `/metrics` there needs an admin key), and `/metrics` without a key on `--metrics-listen`);
//! `moe_cluster::serving` runs them.

use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct HttpArgs {
    /// Also serve the OpenAI-compatible HTTP API and /metrics here (e.g. 0.0.0.0:8080).
    #[arg(long, env = "MOE_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Serve /metrics (and /health) here without a key, for Prometheus inside the cluster (e.g.
    /// 0.0.0.0:9090). With tenants configured, /metrics on --http-listen needs an admin key.
    #[arg(long, env = "MOE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// The model name of the HTTP API (default: the model directory's name).
    #[arg(long, env = "MOE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
}

impl HttpArgs {
    pub fn apis(&self) -> moe_cluster::serving::PublicApis {
        moe_cluster::serving::PublicApis {
            http_listen: self.http_listen.clone(),
            metrics_listen: self.metrics_listen.clone(),
            served_model_name: self.served_model_name.clone(),
        }
    }
}
