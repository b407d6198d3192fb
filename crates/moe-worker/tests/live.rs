//! Experts loaded and unloaded while a host serves: a loaded expert computes exactly what a
//! host that had it from the start computes; a load over the expert budget changes nothing; an
//! unloaded expert leaves the published list at once, is still computed while requests name it,
//! and is dropped once they stop for the quiet period.

use moe_compute::cpu::CpuBackend;
use moe_worker::{ComputeInput, DrainLimits, ExpertCompute, ExpertHost, ExpertSpec, WorkerError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn spec() -> moe_demo::DemoSpec {
    moe_demo::DemoSpec { num_layers: 2, hidden_size: 64, intermediate_size: 96, ..moe_demo::DemoSpec::demo() }
}

fn model() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tmp");
    moe_demo::write_demo_model(tmp.path(), &spec()).expect("demo model");
    tmp
}

fn host(dir: &std::path::Path, spec: &str) -> ExpertHost<CpuBackend> {
    ExpertHost::load(dir, &spec.parse::<ExpertSpec>().expect("spec"), CpuBackend::new()).expect("host")
}

/// One row through `expert` of `layer` with weight 0.5.
fn run(h: &dyn ExpertCompute, layer: usize, expert: u32) -> Result<Vec<f32>, WorkerError> {
    run_with(h, layer, expert, &[])
}

/// [`run`] with the row carrying `adapter` (when given).
fn run_with(
    h: &dyn ExpertCompute,
    layer: usize,
    expert: u32,
    adapter: &[moe_model::AdapterIdentity],
) -> Result<Vec<f32>, WorkerError> {
    let hidden = h.config().hidden_size;
    let rows: Vec<f32> = (0..hidden).map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0).collect();
    let mut out = Vec::new();
    let (row_pairs, experts, weights) = ([1], [expert], [0.5]);
    let mut input = ComputeInput::base(layer, hidden, &rows, &row_pairs, &experts, &weights);
    let slots = [adapter.len() as u32];
    if !adapter.is_empty() {
        (input.adapters, input.row_adapters) = (adapter, &slots);
    }
    let failed = h.compute(&input, &mut out)?;
    assert!(failed.is_empty(), "{failed:?}");
    Ok(out)
}

#[test]
fn a_loaded_expert_gets_its_pair_of_an_adapter_loaded_before() {
    let tmp = model();
    let adapters = tmp.path().join("adapters");
    let experts = [moe_demo::DemoTarget::Experts];
    moe_demo::write_demo_adapter(&adapters.join("acme"), &spec(), &experts, 4, 1.0, 7).expect("adapter");
    let limits = moe_lora::RegistryLimits::default();
    let all = host(tmp.path(), "all").with_adapter_dir(adapters.clone(), limits);
    let live = host(tmp.path(), "0:0").with_adapter_dir(adapters, limits);
    // The version a router names: the files' digest, as the registry computes it.
    let loaded = all.adapters().expect("registry").acquire("acme").expect("acme loads");
    let acme = [loaded.identity.clone()];
    // The adapter is resident (with pairs for expert 0 only) before expert 5 arrives.
    assert_eq!(run_with(&live, 0, 0, &acme).expect("run"), run_with(&all, 0, 0, &acme).expect("run"));
    live.load_experts(&[(0, 5)]).expect("load");
    let want = run_with(&all, 0, 5, &acme).expect("run");
    assert_ne!(want, run(&all, 0, 5).expect("run"), "the adapter changes expert 5");
    assert_eq!(run_with(&live, 0, 5, &acme).expect("run"), want);
}

#[test]
fn a_loaded_expert_computes_what_a_host_that_had_it_computes() {
    let tmp = model();
    let all = host(tmp.path(), "all");
    let live = host(tmp.path(), "0:0,1:0");
    let mut hosted = live.watch_hosted();
    assert!(matches!(run(&live, 1, 5), Err(WorkerError::NotHosted { layer: 1, expert: 5 })));
    assert_eq!(live.load_experts(&[(1, 5), (0, 3), (0, 0)]).expect("load"), 2, "(0, 0) was already hosted");
    assert!(hosted.has_changed().expect("watch"), "the published list changed");
    assert_eq!(hosted.borrow_and_update().clone(), vec![(0, vec![0, 3]), (1, vec![0, 5])]);
    for (l, e) in [(1, 5), (0, 3), (0, 0)] {
        assert_eq!(run(&live, l, e).expect("run"), run(&all, l, e).expect("run"), "layer {l} expert {e}");
    }
}

#[test]
fn a_load_over_the_expert_budget_changes_nothing() {
    let tmp = model();
    let one = host(tmp.path(), "0:0").expert_memory().0;
    assert!(one > 0);
    let live = host(tmp.path(), "0:0-1").with_expert_budget(Some(3 * one)).expect("two fit in three");
    let hosted = live.watch_hosted();
    let err = live.load_experts(&[(0, 2), (0, 3)]).expect_err("four do not fit in three");
    assert!(matches!(err, WorkerError::ResourceExhausted(_)), "{err}");
    assert!(err.to_string().contains("--max-expert-mb"), "{err}");
    assert!(!hosted.has_changed().expect("watch"));
    assert_eq!(live.hosted(), vec![(0, vec![0, 1])]);
    assert!(run(&live, 0, 2).is_err());
    assert_eq!(live.load_experts(&[(0, 2)]).expect("one more fits"), 1);
    assert!(host(tmp.path(), "0:0-3").with_expert_budget(Some(3 * one)).is_err(), "a start over the budget");
    let bad = live.load_experts(&[(0, 99)]).expect_err("no such expert");
    assert!(bad.to_string().contains("expert 99"), "{bad}");
}

#[test]
fn an_unloaded_expert_is_served_while_requests_name_it_then_dropped() {
    let tmp = model();
    let quiet = Duration::from_millis(300);
    let live =
        Arc::new(host(tmp.path(), "0:0-1").with_drain_limits(DrainLimits { quiet, max: Duration::from_secs(20) }));
    let want = run(live.as_ref(), 0, 1).expect("run");
    // A router that has not seen the change keeps sending expert 1 for a while.
    let sending = Arc::new(AtomicBool::new(true));
    let (h, s) = (live.clone(), sending.clone());
    let sender = std::thread::spawn(move || {
        let mut served = 0;
        while s.load(Ordering::Relaxed) {
            assert_eq!(run(h.as_ref(), 0, 1).expect("still computed while draining"), want);
            served += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        served
    });
    let (h, start) = (live.clone(), Instant::now());
    let unload = std::thread::spawn(move || h.unload_experts(&[(0, 1)]));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(live.hosted(), vec![(0, vec![0])], "no longer published");
    assert_eq!(live.draining(), vec![(0, vec![1])]);
    std::thread::sleep(Duration::from_millis(900));
    assert!(!unload.is_finished(), "the drain waits while requests name the expert");
    sending.store(false, Ordering::Relaxed);
    assert!(sender.join().expect("sender") > 10);
    let (n, took) = unload.join().expect("unload").expect("unloaded");
    assert_eq!(n, 1);
    assert!(took >= Duration::from_millis(1000) && start.elapsed() < Duration::from_secs(10), "{took:?}");
    assert!(live.draining().is_empty());
    assert!(matches!(run(live.as_ref(), 0, 1), Err(WorkerError::NotHosted { .. })));
    assert!(run(live.as_ref(), 0, 0).is_ok(), "the other expert stays");
    let again = live.unload_experts(&[(0, 1)]).expect_err("not hosted any more");
    assert!(matches!(again, WorkerError::NotHosted { .. }), "{again}");
}
