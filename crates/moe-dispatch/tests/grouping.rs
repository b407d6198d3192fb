//! Grouping one layer's rows per worker and summing the answers, against a recording
//! transport: each row travels to a worker once with its request ids and adapter slots, the
//! sum comes back onto the backend, and a worker's bogus adapter slot fails only its rows.

use moe_dispatch::{BatchOutput, Dispatcher, Placement, Result, WorkerBatch, WorkerTransport};
use moe_model::AdapterIdentity;

mod common;
use common::run_layer;
use std::sync::Mutex;

use moe_compute::cpu::{CpuBackend, HostTensor};
use moe_compute::ExpertPlan;
use moe_model::{ExpertExecutor, LayerCall};

/// Records the batches it is given and answers each row with its worker's number.
struct Recorder(Mutex<Vec<WorkerBatch>>);

impl WorkerTransport for Recorder {
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
            o.rows = vec![1.0 + b.worker as f32; b.experts.len() * hidden]; // one row per pair
            *r = Ok(());
        }
        if let Ok(mut v) = self.0.lock() {
            v.extend(batches.iter().cloned());
        }
    }
}

#[test]
fn rows_go_once_per_worker_with_their_request_ids_and_adapters() {
    let mut placement = Placement::new(1, 2);
    placement.add(0, 0, &[0]).unwrap();
    placement.add(1, 0, &[1]).unwrap();
    let d = Dispatcher::new(Recorder(Mutex::new(Vec::new())), placement, 2);
    // Rows 0 and 1 belong to request 7, row 2 to request 9; row 1 carries adapter slot 1.
    let choices = [(0, 0.5), (1, 0.5), (0, 0.6), (1, 0.4), (1, 0.7), (0, 0.3)];
    let mut plan = ExpertPlan::default();
    plan.rebuild(2, 2, &choices);
    let routes = moe_model::ExpertRoutes {
        top_k: 2,
        choices: &choices,
        plan: &plan,
        adapters: &[],
        row_adapter: &[0, 1, 0],
        row_request: &[7, 7, 9],
    };
    let backend = CpuBackend::new();
    let x = HostTensor { rows: 3, cols: 4, data: vec![1.0; 12] };
    let mut out = HostTensor { rows: 3, cols: 4, data: vec![0.0; 12] };
    let mut unserved = Vec::new();
    let call = LayerCall { backend: &backend, layer: 0, x: &x, routes, out: &mut out, unserved: &mut unserved };
    ExpertExecutor::<CpuBackend>::run_experts(&d, call).unwrap();
    let sent = d.transport().0.lock().unwrap().clone();
    let w0 = sent.iter().find(|b| b.worker == 0).unwrap();
    let w1 = sent.iter().find(|b| b.worker == 1).unwrap();
    assert_eq!(
        (w0.row_ids.as_slice(), w0.request_ids.as_slice(), w0.row_adapters.as_slice()),
        (&[0, 1, 2][..], &[7, 9][..], &[0, 1, 0][..])
    );
    assert_eq!((w1.row_ids.as_slice(), w1.request_ids.as_slice()), (&[0, 1, 2][..], &[7, 9][..]));
    assert_eq!((w0.weights.as_slice(), w1.weights.as_slice()), (&[0.5, 0.6, 0.3][..], &[0.5, 0.4, 0.7][..]));
    // Each row is the sum of both workers' answers, back on the backend.
    assert_eq!(out.data, vec![3.0; 12]);
}

/// A worker that names an adapter slot of 0 (no adapter) as failed sent a malformed answer: it
/// is left out (no panic, no underflow), and with no other holder the row fails alone.
#[test]
fn a_failed_adapter_slot_of_zero_fails_its_rows_without_a_panic() {
    struct ZeroSlot;
    impl WorkerTransport for ZeroSlot {
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
                o.rows = vec![0.0; b.row_ids.len() * hidden];
                o.failed_adapters = vec![(0, "bogus".into())];
                *r = Ok(());
            }
        }
    }
    let mut placement = Placement::new(1, 1);
    placement.add(0, 0, &[0]).unwrap();
    let d = Dispatcher::new(ZeroSlot, placement, 1);
    let choices = [(0, 1.0)];
    let mut plan = ExpertPlan::default();
    plan.rebuild(1, 1, &choices);
    let routes = moe_model::ExpertRoutes {
        top_k: 1,
        choices: &choices,
        plan: &plan,
        adapters: &[],
        row_adapter: &[0],
        row_request: &[],
    };
    let backend = CpuBackend::new();
    let x = HostTensor { rows: 1, cols: 2, data: vec![1.0; 2] };
    let mut out = HostTensor { rows: 1, cols: 2, data: vec![0.0; 2] };
    let mut unserved = Vec::new();
    let call = LayerCall { backend: &backend, layer: 0, x: &x, routes, out: &mut out, unserved: &mut unserved };
    ExpertExecutor::<CpuBackend>::run_experts(&d, call).unwrap();
    assert_eq!(unserved.len(), 1, "{unserved:?}");
}

/// Worker 0 answers malformed (too few values, an adapter slot of 0, a slot past the call's
/// adapters); worker 1 holds the same expert and answers well. Every call ends with worker 1's
/// rows, worker 0 is left out as a suspect, and nothing panics.
#[test]
fn malformed_answers_fail_over_to_a_replica() {
    struct Bad(usize);
    impl WorkerTransport for Bad {
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
                *o = BatchOutput { rows: vec![2.0; b.row_ids.len() * hidden], failed_adapters: Vec::new() };
                if b.worker == 0 {
                    match self.0 {
                        0 => o.rows.pop().map(|_| ()).unwrap_or(()),
                        1 => o.failed_adapters = vec![(0, "bogus".into())],
                        _ => o.failed_adapters = vec![(7, "bogus".into())],
                    }
                }
                *r = Ok(());
            }
        }
    }
    for kind in 0..3 {
        let mut placement = Placement::new(1, 1);
        placement.add(0, 0, &[0]).unwrap();
        placement.add(1, 0, &[0]).unwrap();
        let d = Dispatcher::new(Bad(kind), placement, 2);
        for _ in 0..3 {
            let (out, unserved) = run_layer(&d, &[1.0; 6], 3, 1, 1, &[(0, 1.0), (0, 1.0)]);
            assert!(unserved.is_empty(), "kind {kind}: {unserved:?}");
            assert_eq!(out, vec![2.0; 6], "kind {kind}: only the good worker's rows are used");
        }
        assert_eq!(d.suspects(), vec![0], "kind {kind}: the malformed worker is left out");
    }
}

/// A replicated expert's rows go where they even out the work, counting the pairs that have
/// only one possible worker first: expert 0 is held by both workers, experts 1 and 2 only by
/// worker 0, so every expert-0 pair goes to worker 1 (worker 0 already has the four others).
#[test]
fn replicated_experts_balance_around_the_pairs_with_one_holder() {
    let mut placement = Placement::new(1, 3);
    placement.add(0, 0, &[0, 1, 2]).unwrap();
    placement.add(1, 0, &[0]).unwrap();
    let d = Dispatcher::new(Recorder(Mutex::new(Vec::new())), placement, 2);
    // Four rows; each routes to expert 0 and to expert 1 or 2 (top-2).
    let choices = [(0, 0.5), (1, 0.5), (0, 0.5), (2, 0.5), (0, 0.5), (1, 0.5), (0, 0.5), (2, 0.5)];
    let (out, unserved) = run_layer(&d, &[1.0; 16], 4, 3, 2, &choices);
    assert!(unserved.is_empty(), "{unserved:?}");
    let sent = d.transport().0.lock().unwrap().clone();
    let pairs = |w: usize| sent.iter().filter(|b| b.worker == w).map(|b| b.experts.len()).sum::<usize>();
    assert_eq!((pairs(0), pairs(1)), (4, 4), "{sent:?}");
    assert!(sent.iter().filter(|b| b.worker == 1).all(|b| b.experts.iter().all(|&e| e == 0)));
    // Worker 0 answers 1.0 and worker 1 answers 2.0 per pair: each row gets 1 + 2.
    assert_eq!(out, vec![3.0; 16]);
}
