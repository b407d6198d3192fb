//! A worker that failed is left out for the suspect period, then probed out of band; it gets
//! traffic again only once the probe answers, even for an expert no other worker holds: those
//! rows fail at once instead of waiting on a worker that may be frozen.

mod common;

use common::run_layer;
use moe_dispatch::{BatchOutput, DispatchError, Dispatcher, Placement, Result, WorkerBatch, WorkerTransport};
use moe_model::AdapterIdentity;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Worker 0 fails while `fail0` is set; probes answer `probe_ok`; rows sent are recorded.
#[derive(Default)]
struct Flaky {
    fail0: AtomicBool,
    probe_ok: AtomicBool,
    probes: AtomicUsize,
    rows_to: Mutex<Vec<usize>>,
}

impl WorkerTransport for Flaky {
    fn worker_name(&self, worker: usize) -> String {
        format!("w{worker}")
    }

    fn execute(
        &self,
        _layer: usize,
        hidden: usize,
        _adapters: &[AdapterIdentity],
        batches: &[WorkerBatch],
        outputs: &mut [BatchOutput],
        results: &mut [Result<()>],
    ) {
        for ((b, o), r) in batches.iter().zip(outputs.iter_mut()).zip(results.iter_mut()) {
            if let Ok(mut v) = self.rows_to.lock() {
                v.extend(std::iter::repeat_n(b.worker, b.row_ids.len()));
            }
            if b.worker == 0 && self.fail0.load(Ordering::Relaxed) {
                *r = Err(DispatchError::Unavailable { worker: "w0".into(), message: "refused".into() });
                continue;
            }
            o.rows = vec![1.0; b.experts.len() * hidden];
            *r = Ok(());
        }
    }

    fn probe(&self, _worker: usize, done: Box<dyn FnOnce(bool) + Send>) {
        self.probes.fetch_add(1, Ordering::Relaxed);
        done(self.probe_ok.load(Ordering::Relaxed));
    }
}

/// One call of 4 rows, each routed to `expert`; returns which workers got rows.
fn call(d: &Dispatcher<Flaky>, expert: u32) -> Vec<usize> {
    if let Ok(mut v) = d.transport().rows_to.lock() {
        v.clear();
    }
    let (out, unserved) = run_layer(d, &[0.5; 8], 2, 2, 1, &[(expert, 1.0f32); 4]);
    assert!(unserved.is_empty(), "{unserved:?}");
    assert_eq!(out, vec![1.0; 8]);
    d.transport().rows_to.lock().map(|v| v.clone()).unwrap_or_default()
}

#[test]
fn a_suspect_gets_traffic_again_only_after_its_probe_answers() {
    let mut placement = Placement::new(1, 2);
    placement.add(0, 0, &[0, 1]).expect("w0");
    placement.add(1, 0, &[0]).expect("w1");
    let period = Duration::from_millis(60);
    let d = Dispatcher::with_suspect_for(Flaky::default(), placement, 2, period);
    let t = d.transport();

    // Worker 0 fails: its rows go to worker 1 in the same call, and it becomes suspect.
    t.fail0.store(true, Ordering::Relaxed);
    let _ = call(&d, 0);
    assert_eq!(d.suspects(), vec![0]);
    t.fail0.store(false, Ordering::Relaxed);

    // The period ends but the probe fails: worker 1 takes everything.
    std::thread::sleep(period + Duration::from_millis(20));
    assert!(call(&d, 0).iter().all(|&w| w == 1));
    assert_eq!(t.probes.load(Ordering::Relaxed), 1, "one probe when the period ended");
    assert!(call(&d, 0).iter().all(|&w| w == 1), "a failed probe restarts the period");
    assert_eq!(t.probes.load(Ordering::Relaxed), 1);

    // Expert 1 has no other holder. Defect: worker 0 was its "last resort" while being probed, so
    // a frozen sole holder stalled every batch for a dispatch deadline after each suspect period.
    // Now its rows fail at once, naming the expert, and no row is sent to worker 0.
    std::thread::sleep(period + Duration::from_millis(20));
    if let Ok(mut v) = t.rows_to.lock() {
        v.clear();
    }
    let (_, unserved) = run_layer(&d, &[0.5; 8], 2, 2, 1, &[(1, 1.0f32); 4]);
    assert_eq!(unserved.len(), 4, "every row needing the unprobed sole holder fails: {unserved:?}");
    assert!(unserved.iter().all(|(_, why)| why.contains("expert 1")), "{unserved:?}");
    assert!(t.rows_to.lock().map(|v| v.is_empty()).unwrap_or(false), "nothing was sent to the unprobed worker");

    // The probe answers: worker 0 is live and takes its share again.
    t.probe_ok.store(true, Ordering::Relaxed);
    std::thread::sleep(period + Duration::from_millis(20));
    let _ = call(&d, 0); // starts the probe, which answers at once
    assert!(d.suspects().is_empty());
    let to = call(&d, 0);
    assert!(to.contains(&0) && to.contains(&1), "both holders share the rows again: {to:?}");
}
