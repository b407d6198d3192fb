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
        let (d, p) = (delay_ms.clone(), partitioned.clone());
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { continue };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, d.clone(), p.clone()));
                tokio::spawn(pump(sr, cw, d.clone(), p.clone()));
            }
        });
        Relay { addr, delay_ms, partitioned, _rt: rt }
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
        while partitioned.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
