//! A TCP relay on loopback between a router and a worker, for fault tests: it forwards bytes
//! both ways, and on command delays every chunk (a slow worker or link) or holds all traffic
//! while keeping the connections open (a network partition: no reset, no data, until healed).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Relay {
    /// `host:port` to give the router in place of the worker's.
    pub addr: String,
    delay_ms: Arc<AtomicU64>,
    partitioned: Arc<AtomicBool>,
    /// Connections accepted before this many were made hold their traffic (a route that died
    /// for established flows only).
    held_before: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

impl Relay {
    pub fn start(upstream: &str) -> Relay {
        let upstream = upstream.split_once("://").map(|(_, a)| a).unwrap_or(upstream).to_string();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let partitioned = Arc::new(AtomicBool::new(false));
        let held_before = Arc::new(AtomicU64::new(0));
        let (d, p, h) = (delay_ms.clone(), partitioned.clone(), held_before.clone());
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { continue };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, d.clone(), p.clone(), (n, h.clone())));
                tokio::spawn(pump(sr, cw, d.clone(), p.clone(), (n, h.clone())));
            }
        });
        Relay { addr, delay_ms, partitioned, held_before, accepted, _rt: rt }
    }

    /// Holds the traffic of every connection open now, for good, without closing them; new
    /// connections pass (a route that lost its established flows, as a blackhole does).
    pub fn blackhole_open_connections(&self) {
        self.held_before.store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Every chunk waits this long before it is passed on (0: none).
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Holds all traffic both ways (connections stay open), or lets it flow again.
    pub fn set_partitioned(&self, on: bool) {
        self.partitioned.store(on, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_ms: Arc<AtomicU64>,
    partitioned: Arc<AtomicBool>,
    (connection, held_before): (u64, Arc<AtomicU64>),
) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let d = delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        while partitioned.load(Ordering::SeqCst) || connection < held_before.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
