//! A worker process (`moe worker`): loads the experts it hosts, serves them over gRPC, keeps its
//! etcd registration in step with what it hosts (`LoadExperts` / `UnloadExperts`), and on a
//! shutdown signal leaves the membership before it drains.

use crate::serving::{bind, run_until_signal, GRACE};
use crate::{invalid, Context, Result};
use moe_compute::Device;
use moe_worker::ExpertSpec;
use std::path::PathBuf;

/// What a worker process serves and how (the `moe worker` flags).
#[derive(Clone, Debug)]
pub struct WorkerProcess {
    pub model: PathBuf,
    /// `all`, `shard:I/N`, or a list like `0:0-3,1:4,*:7` (layer:experts).
    pub experts: String,
    pub listen: String,
    pub worker_id: Option<String>,
    pub advertise: Option<String>,
    pub lease_ttl_secs: u64,
    pub adapter_dir: Option<PathBuf>,
    pub max_adapters: usize,
    pub max_adapter_mb: usize,
    pub max_lora_rank: usize,
    pub max_batch_mb: usize,
    pub max_expert_mb: usize,
    pub drain_quiet_ms: u64,
    pub drain_max_ms: u64,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub etcd: Option<moe_membership::EtcdOptions>,
}

fn read_pem(path: &std::path::Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).context_with(|| format!("reading {what} {}", path.display()))
}

pub fn run_worker(a: WorkerProcess, device: Device) -> Result<()> {
    let spec: ExpertSpec = a.experts.parse()?;
    let mut options = crate::HostOptions {
        adapters: None,
        max_batch_bytes: Some(batch_budget_mb(a.max_batch_mb).saturating_mul(1 << 20)),
        max_expert_bytes: (a.max_expert_mb > 0).then(|| a.max_expert_mb.saturating_mul(1 << 20)),
        drain: moe_worker::DrainLimits {
            quiet: std::time::Duration::from_millis(a.drain_quiet_ms),
            max: std::time::Duration::from_millis(a.drain_max_ms.max(a.drain_quiet_ms)),
        },
    };
    if let Some(dir) = &a.adapter_dir {
        if !dir.is_dir() {
            return Err(invalid(format!("--adapter-dir {} is not a directory", dir.display())));
        }
        let limits = moe_lora::RegistryLimits {
            max_adapters: a.max_adapters,
            max_bytes: a.max_adapter_mb.saturating_mul(1 << 20),
            max_rank: a.max_lora_rank,
            ..Default::default()
        };
        options.adapters = Some((dir.clone(), limits));
    }
    let host = crate::expert_host(device, &a.model, &spec, &options)
        .map_err(|e| invalid(format!("--device {device}: {e}")))
        .context_with(|| format!("loading experts from {}", a.model.display()))?;
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(moe_worker::WorkerTls {
            cert_pem: read_pem(c, "--tls-cert")?,
            key_pem: read_pem(k, "--tls-key")?,
            client_ca_pem: a.tls_client_ca.as_deref().map(|p| read_pem(p, "--tls-client-ca")).transpose()?,
        }),
        _ => None,
    };
    let hosted: usize = host.hosted().iter().map(|(_, e)| e.len()).sum();
    if hosted == 0 {
        return Err(invalid(format!("the expert spec {:?} selects no experts of this model", a.experts)));
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let listener = bind(&a.listen, "worker").await?;
        let bound = listener.local_addr()?.to_string();
        let advertise = bracket_ipv6(&a.advertise.clone().unwrap_or(bound));
        if let Some(why) = moe_dispatch::address_problem(&advertise) {
            return Err(invalid(format!("--advertise: {why}")));
        }
        let id = a.worker_id.clone().unwrap_or_else(|| advertise.clone());
        tracing::info!(worker = %id, hosted, device = %host.device(), "serving experts");
        let cancel = tokio_util::sync::CancellationToken::new();
        let mut registration = None;
        if let Some(opts) = a.etcd.clone() {
            let mut hosted = host.watch_hosted();
            let experts_of = |h: &moe_worker::HostedList| h.iter().map(|(l, e)| (*l as u32, e.clone())).collect();
            let record = moe_membership::WorkerRecord {
                id: id.clone(),
                address: advertise.clone(),
                experts: experts_of(&hosted.borrow_and_update()),
                device: host.device().to_string(),
                fingerprint: host.fingerprint().to_string(),
                version: env!("CARGO_PKG_VERSION").into(),
                numerics: host.numerics(),
            };
            moe_membership::check_worker_id(&opts, &record).await?;
            let ttl = std::time::Duration::from_secs(a.lease_ttl_secs.max(1));
            // The record follows the hosted experts (LoadExperts / UnloadExperts).
            let (record_tx, record_rx) = tokio::sync::watch::channel(record);
            let follow = cancel.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = follow.cancelled() => return,
                        changed = hosted.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            let experts = experts_of(&hosted.borrow_and_update());
                            record_tx.send_modify(|r| r.experts = experts);
                        }
                    }
                }
            });
            registration = Some(tokio::spawn(moe_membership::register_worker(opts, record_rx, ttl, cancel.clone())));
        }
        run_until_signal(
            |stop| async move {
                let drain = async move {
                    stop.await;
                    // Drain: leave the membership first so routers stop sending, then finish.
                    cancel.cancel();
                    if let Some(r) = registration {
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), r).await;
                    }
                };
                moe_worker::serve_worker_with(host, id, listener, tls, drain).await
            },
            GRACE,
        )
        .await
    })
}

/// The batch budget in MiB: the flag, or by default a quarter of this machine's memory (4 GiB
/// where /proc/meminfo cannot be read), so that no single request can exhaust it.
fn batch_budget_mb(flag: usize) -> usize {
    if flag > 0 {
        return flag;
    }
    let total_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse::<usize>().ok());
    total_kb.map(|kb| (kb / 1024 / 4).max(64)).unwrap_or(4096)
}

/// `fd00::1:50061` (what `$(POD_IP):50061` gives for an IPv6 pod) as `[fd00::1]:50061`; any
/// other address unchanged.
fn bracket_ipv6(addr: &str) -> String {
    match addr.rsplit_once(':') {
        Some((host, port)) if host.parse::<std::net::Ipv6Addr>().is_ok() && port.parse::<u16>().is_ok() => {
            format!("[{host}]:{port}")
        }
        _ => addr.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ipv6_advertise_addresses_get_brackets() {
        assert_eq!(super::bracket_ipv6("fd00::1:50061"), "[fd00::1]:50061");
        assert_eq!(super::bracket_ipv6("[fd00::1]:50061"), "[fd00::1]:50061");
        assert_eq!(super::bracket_ipv6("10.0.0.5:50061"), "10.0.0.5:50061");
        assert_eq!(super::bracket_ipv6("worker-0.workers:50061"), "worker-0.workers:50061");
    }
}
