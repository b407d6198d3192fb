//! A worker's lease is renewed on a steady beat however often its record changes. Defect: the
//! keep-alive slept afresh after every record put (and the watch event it caused), so a worker
//! whose hosted experts changed more often than TTL/3 (a plan moving several replicas onto it)
//! never renewed and etcd deleted its record while it served.

mod common;

use common::*;
use moe_membership::{register_worker, watch_workers, EtcdOptions, WorkerRecord};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[test]
fn a_record_changing_faster_than_the_keep_alive_period_never_lapses() {
    let Some(etcd) = Etcd::start() else { return };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let opts = EtcdOptions { endpoints: vec![etcd.url()], cluster: "lease".into(), ..Default::default() };
    let record = |n: u32| WorkerRecord {
        id: "w0".into(),
        address: "127.0.0.1:1".into(),
        experts: vec![(0, (0..=n % 4).collect())],
        device: "cpu".into(),
        fingerprint: "f".into(),
        version: "v".into(),
        numerics: String::new(),
    };
    let (tx, rx) = tokio::sync::watch::channel(record(0));
    let cancel = CancellationToken::new();
    rt.spawn(register_worker(opts.clone(), rx, Duration::from_secs(3), cancel.clone()));
    let (snap_tx, mut snapshots) = tokio::sync::watch::channel(Vec::new());
    rt.spawn(watch_workers(opts, snap_tx, cancel.clone()));
    eventually("the worker registers", 10, || snapshots.borrow().iter().any(|r| r.id == "w0"));
    // Every snapshot the watch delivers from now on must hold the worker.
    let lapsed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = lapsed.clone();
    rt.spawn(async move {
        while snapshots.changed().await.is_ok() {
            if !snapshots.borrow_and_update().iter().any(|r| r.id == "w0") {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    // LoadExperts / UnloadExperts every 0.7 s for 10 s (more than three TTLs).
    let started = Instant::now();
    let mut n = 1;
    while started.elapsed() < Duration::from_secs(10) {
        tx.send_replace(record(n));
        n += 1;
        std::thread::sleep(Duration::from_millis(700));
    }
    std::thread::sleep(Duration::from_millis(500));
    let lapsed = lapsed.load(std::sync::atomic::Ordering::SeqCst);
    cancel.cancel();
    assert!(!lapsed, "the worker's record was deleted while it kept changing (its lease was not renewed)");
}
