//! Connecting to a worker: the transport's configuration, address checks (IPv6 in brackets),
//! the endpoint with TLS, keepalives and TCP_NODELAY, and a client with the message limit.

use super::MAX_MESSAGE_BYTES;
use crate::error::{DispatchError, Result};
use crate::latency::Hedging;
use moe_proto::v1::expert_worker_client::ExpertWorkerClient;
use moe_proto::v1::WireDtype;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// How the router reaches its workers: wire dtype, deadlines, message size, TLS and hedging.
#[derive(Clone, Debug)]
pub struct GrpcTransportConfig {
    pub wire: WireDtype,
    /// How long one layer's dispatch to a worker may take before the worker counts as dead: the
    /// deadline when no replica could take the batch, and the cap of the adaptive one.
    pub deadline: Duration,
    pub connect_timeout: Duration,
    /// Row bytes per message; larger batches are split into several messages.
    pub max_rows_bytes: usize,
    /// Where each worker's dispatch latency and failures are recorded.
    pub metrics: moe_metrics::Registry,
    /// TLS to the workers (`https`), with this process's client identity for mutual TLS.
    pub tls: Option<TransportTls>,
    /// When a batch is sent to a replica as well.
    pub hedging: Hedging,
}

/// PEM material for TLS from a router to its workers.
#[derive(Clone, Debug)]
pub struct TransportTls {
    /// The CA that signed the workers' certificates.
    pub ca_pem: Vec<u8>,
    /// This router's certificate and key, for workers that require client certificates.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the workers' certificates carry, when it is not the address's host.
    pub domain: Option<String>,
}

impl Default for GrpcTransportConfig {
    fn default() -> Self {
        Self {
            wire: WireDtype::Bf16,
            deadline: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            max_rows_bytes: 8 << 20,
            metrics: moe_metrics::Registry::new(),
            tls: None,
            hedging: Hedging::Adaptive,
        }
    }
}

pub(super) fn unavailable(addr: &str, message: impl std::fmt::Display) -> DispatchError {
    DispatchError::Unavailable { worker: addr.to_string(), message: message.to_string() }
}

/// Why `addr` cannot be a worker's address (`host:port`, IPv6 in brackets), if it cannot.
pub fn address_problem(addr: &str) -> Option<String> {
    let bare = addr.split_once("://").map(|(_, rest)| rest).unwrap_or(addr);
    let hint = |why: &str| {
        let v6 =
            bare.rsplit_once(':').filter(|(h, p)| h.parse::<std::net::Ipv6Addr>().is_ok() && p.parse::<u16>().is_ok());
        match v6 {
            Some((h, p)) => format!("{why}; an IPv6 address needs brackets: [{h}]:{p}"),
            None => why.to_string(),
        }
    };
    match format!("http://{bare}").parse::<tonic::codegen::http::Uri>() {
        Err(e) => Some(hint(&format!("address {addr:?} does not parse: {e}"))),
        Ok(uri) if uri.port_u16().is_none() => Some(hint(&format!("address {addr:?} has no port"))),
        Ok(uri) if uri.path() != "/" && !uri.path().is_empty() => Some(format!("address {addr:?} has a path")),
        Ok(_) => None,
    }
}

pub(super) fn endpoint(addr: &str, config: &GrpcTransportConfig) -> Result<Endpoint> {
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    let bare = addr.split_once("://").map(|(_, rest)| rest).unwrap_or(addr);
    let mut ep = Endpoint::from_shared(format!("{scheme}://{bare}"))
        .map_err(|e| unavailable(addr, format!("invalid address: {e}")))?;
    if let Some(tls) = &config.tls {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
        if let Some((cert, key)) = &tls.identity {
            cfg = cfg.identity(Identity::from_pem(cert, key));
        }
        if let Some(d) = &tls.domain {
            cfg = cfg.domain_name(d.clone());
        }
        ep = ep.tls_config(cfg).map_err(|e| unavailable(addr, format!("TLS configuration: {e}")))?;
    }
    Ok(ep
        .tcp_nodelay(true)
        .connect_timeout(config.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}

pub(super) async fn client(
    addr: &str,
    ep: &Endpoint,
    config: &GrpcTransportConfig,
) -> Result<ExpertWorkerClient<Channel>> {
    let channel = tokio::time::timeout(config.connect_timeout, ep.connect())
        .await
        .map_err(|_| unavailable(addr, "connect timed out"))?
        .map_err(|e| unavailable(addr, format!("connect failed: {e}")))?;
    Ok(ExpertWorkerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A client of one worker with the transport's TLS, timeouts and message limits, for calls
/// outside dispatch (placement's `Describe`, `LoadExperts`, `UnloadExperts`).
pub async fn connect_worker(addr: &str, config: &GrpcTransportConfig) -> Result<ExpertWorkerClient<Channel>> {
    client(addr, &endpoint(addr, config)?, config).await
}
