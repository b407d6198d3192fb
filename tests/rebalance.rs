//! Live expert placement with etcd: experts move between worker processes while requests run
//! (`LoadExperts` on one, `UnloadExperts` on the other, and back) with no failed request, no
//! changed token and no expert call a worker refused; a `LoadExperts` over a worker's
//! `--max-expert-mb` changes neither the worker nor its record; a plan that would orphan an
//! expert is refused before anything is sent; routers elect one planner at a time; and a
//! router with `--rebalance-every` replicates the experts its skewed load makes hot; and `moe
//! bench-placement` runs end to end.

mod common;

use common::router_client::{generate, health, model_info};
use common::*;
use moe_membership::{hold_planner, watch_workers, EtcdOptions, WorkerRecord};
use moe_proto::v1::expert_worker_client::ExpertWorkerClient;
use moe_proto::v1::{ChangeExpertsRequest, DescribeRequest, DescribeResponse, HostedLayer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// etcd, a runtime, and a random model of hidden size `hidden` (two MoE layers of 8 experts)
/// at `<tmp>/m`; `None` (the test skips) without etcd.
fn start(hidden: usize) -> Option<(Etcd, tokio::runtime::Runtime, tempfile::TempDir)> {
    let etcd = Etcd::start()?;
    let tmp = tempfile::tempdir().expect("tmp");
    endless_model_sized(&tmp.path().join("m"), hidden, 2);
    Some((etcd, tokio::runtime::Runtime::new().expect("rt"), tmp))
}

fn worker(etcd: &Etcd, cluster: &str, model: &str, experts: &str, extra: &[&str]) -> Server {
    let url = etcd.url();
    let mut args = vec!["worker", "--model", model, "--experts", experts, "--listen", "127.0.0.1:0"];
    args.extend_from_slice(&["--etcd", &url, "--cluster", cluster, "--lease-ttl-secs", "5", "--drain-quiet-ms", "500"]);
    args.extend_from_slice(extra);
    spawn_server(&args)
}

fn router(etcd: &Etcd, cluster: &str, model: &str, extra: &[&str]) -> Server {
    let url = etcd.url();
    let mut args = vec!["router", "--model", model, "--etcd", &url, "--cluster", cluster, "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    spawn_server(&args)
}

async fn client(addr: &str) -> ExpertWorkerClient<tonic::transport::Channel> {
    ExpertWorkerClient::connect(format!("http://{addr}")).await.expect("connect to the worker")
}

async fn describe(addr: &str) -> DescribeResponse {
    client(addr).await.describe(DescribeRequest {}).await.expect("describe").into_inner()
}

async fn change(addr: &str, layers: &[HostedLayer], unload: bool) -> Result<u64, tonic::Status> {
    let req = ChangeExpertsRequest { experts: layers.to_vec() };
    let mut c = client(addr).await;
    let r = if unload { c.unload_experts(req).await } else { c.load_experts(req).await };
    r.map(|r| r.into_inner().drain_ms)
}

fn records(
    rt: &tokio::runtime::Runtime,
    etcd: &Etcd,
    cluster: &str,
) -> tokio::sync::watch::Receiver<Vec<WorkerRecord>> {
    let (tx, rx) = tokio::sync::watch::channel(Vec::new());
    let opts = EtcdOptions { endpoints: vec![etcd.url()], cluster: cluster.into(), ..Default::default() };
    rt.spawn(watch_workers(opts, tx, CancellationToken::new()));
    rx
}

/// The experts `id`'s record lists, as (layer, expert) pairs.
fn listed(rx: &tokio::sync::watch::Receiver<Vec<WorkerRecord>>, addr: &str) -> Vec<(u32, u32)> {
    let all = rx.borrow();
    let r = all.iter().find(|r| r.address == addr);
    r.map(|r| r.experts.iter().flat_map(|(l, es)| es.iter().map(move |e| (*l, *e))).collect()).unwrap_or_default()
}

fn pairs(layers: &[HostedLayer]) -> Vec<(u32, u32)> {
    layers.iter().flat_map(|l| l.experts.iter().map(move |e| (l.layer, *e))).collect()
}

fn scrape(http: &str) -> String {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        reqwest::get(format!("http://{http}/metrics")).await.expect("scrape").text().await.expect("body")
    })
}

fn error_calls(metrics: &str) -> f64 {
    let lines =
        metrics.lines().filter(|l| l.starts_with("moe_dispatch_seconds_count") && l.contains("outcome=\"error\""));
    lines.filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// Which prompt, and what the router answered.
type Answer = (usize, Result<Vec<u32>, String>);

#[test]
fn experts_move_between_workers_under_load_without_a_failed_request_or_a_changed_token() {
    let Some((etcd, rt, tmp)) = start(256) else { return };
    let model = tmp.path().join("m");
    let m = model.to_str().expect("utf8");
    let a = worker(&etcd, "live", m, "shard:0/2", &[]);
    let b = worker(&etcd, "live", m, "shard:1/2", &[]);
    let http = format!("127.0.0.1:{}", free_port());
    let r = router(&etcd, "live", m, &["--http-listen", &http]);
    eventually("both workers in the router", 30, || {
        rt.block_on(health(&r.addr)) == 1 && rt.block_on(model_info(&r.addr)).workers == 2
    });
    let prompts: Vec<Vec<u32>> = (0..6u32).map(|i| vec![1 + i, 2, 3 + 5 * i, 7, 11 * i % 300]).collect();
    let want: Vec<Vec<u32>> =
        prompts.iter().map(|p| rt.block_on(generate(&r.addr, p.clone())).expect("reference")).collect();
    let watch = records(&rt, &etcd, "live");

    // Three clients keep asking while the experts of worker A move to B and back.
    let stop = Arc::new(AtomicBool::new(false));
    let got: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let clients: Vec<_> = (0..3)
        .map(|c| {
            let (stop, got, prompts, addr) = (stop.clone(), got.clone(), prompts.clone(), r.addr.clone());
            rt.spawn(async move {
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    let res = generate(&addr, prompts[i % prompts.len()].clone()).await.map_err(|s| s.to_string());
                    got.lock().expect("lock").push((i % prompts.len(), res));
                    i += 1;
                }
            })
        })
        .collect();
    let a_layers = rt.block_on(describe(&a.addr)).layers;
    let moved = pairs(&a_layers);
    let mut phases = Vec::new();
    for (from, to) in [(&a, &b), (&b, &a)] {
        let before = got.lock().expect("lock").len();
        rt.block_on(change(&to.addr, &a_layers, false)).expect("LoadExperts");
        eventually("the record lists the loaded experts", 10, || {
            let l = listed(&watch, &to.addr);
            moved.iter().all(|p| l.contains(p))
        });
        let drain_ms = rt.block_on(change(&from.addr, &a_layers, true)).expect("UnloadExperts");
        assert!(drain_ms >= 500, "the unload drained ({drain_ms} ms)");
        let left = pairs(&rt.block_on(describe(&from.addr)).layers);
        assert!(moved.iter().all(|p| !left.contains(p)), "{left:?}");
        eventually("the record no longer lists them", 10, || {
            listed(&watch, &from.addr).iter().all(|p| !moved.contains(p))
        });
        std::thread::sleep(Duration::from_millis(800));
        phases.push(got.lock().expect("lock").len() - before);
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        rt.block_on(c).expect("client");
    }
    let got = got.lock().expect("lock");
    assert!(phases.iter().all(|&n| n >= 3), "requests ran during every move: {phases:?}");
    for (i, res) in got.iter() {
        assert_eq!(res.as_ref().map_err(String::clone), Ok(&want[*i]), "prompt {i}");
    }
    // No worker ever refused a call: every dispatch found its experts.
    let metrics = scrape(&http);
    let ok = metrics.lines().filter(|l| l.starts_with("moe_dispatch_seconds_count") && l.contains("outcome=\"ok\""));
    assert!(ok.filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum::<f64>() > 100.0, "{metrics}");
    assert_eq!(error_calls(&metrics), 0.0, "expert calls answered with an error");
    eprintln!("{} requests, {phases:?} during the two moves", got.len());
    assert_eq!(pairs(&rt.block_on(describe(&a.addr)).layers).len(), moved.len(), "A holds its experts again");
}

#[test]
fn a_failed_load_or_a_refused_plan_leaves_the_cluster_as_it_was() {
    let Some((etcd, rt, tmp)) = start(256) else { return };
    let model = tmp.path().join("m");
    let m = model.to_str().expect("utf8");
    let a = worker(&etcd, "budget", m, "all", &[]);
    let c = worker(&etcd, "budget", m, "0:0", &["--max-expert-mb", "1"]);
    let watch = records(&rt, &etcd, "budget");
    eventually("both records", 10, || watch.borrow().len() == 2);
    let before = rt.block_on(describe(&c.addr));
    assert!(before.max_expert_bytes == 1 << 20 && before.bytes_per_expert > 0, "{before:?}");
    let all = rt.block_on(describe(&a.addr)).layers;
    let err = rt.block_on(change(&c.addr, &all, false)).expect_err("over the budget");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("--max-expert-mb"), "{}", err.message());
    assert_eq!(rt.block_on(describe(&c.addr)).layers, before.layers, "the worker is unchanged");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(listed(&watch, &c.addr), vec![(0, 0)], "its record is unchanged");

    // A plan that unloads the only holder of an expert is refused, naming it, before any call.
    let slots = |w: &Server, capacity| {
        rt.block_on(moe_cluster::rebalance::describe_worker(&w.addr, capacity, &Default::default())).expect("describe")
    };
    let cluster = moe_placement::Cluster {
        num_layers: 2,
        num_experts: all[0].experts.len(),
        workers: vec![slots(&a, 64), slots(&c, 64)],
        load: vec![1; 2 * all[0].experts.len()],
    };
    let steps = [
        moe_placement::Step::Load { worker: 1, layer: 0, expert: 1 },
        moe_placement::Step::Unload { worker: 0, layer: 1, expert: 3 },
    ];
    let refused = rt
        .block_on(moe_cluster::rebalance::apply(&cluster, &steps, &Default::default(), &|| true))
        .expect_err("orphans layer 1 expert 3");
    assert!(refused.to_string().contains("layer 1 expert 3 would have no holder"), "{refused}");
    assert_eq!(rt.block_on(describe(&c.addr)).layers, before.layers, "nothing was sent");
    assert_eq!(pairs(&rt.block_on(describe(&a.addr)).layers).len(), pairs(&all).len());
}

#[test]
fn routers_elect_one_planner_at_a_time() {
    let Some(etcd) = Etcd::start() else { return };
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let opts = EtcdOptions { endpoints: vec![etcd.url()], cluster: "elect".into(), ..Default::default() };
    let contenders: Vec<(tokio::sync::watch::Receiver<bool>, CancellationToken)> = (0..3)
        .map(|i| {
            let (tx, rx) = tokio::sync::watch::channel(false);
            let cancel = CancellationToken::new();
            rt.spawn(hold_planner(opts.clone(), format!("router-{i}"), Duration::from_secs(3), tx, cancel.clone()));
            (rx, cancel)
        })
        .collect();
    let holders = || contenders.iter().filter(|(rx, _)| *rx.borrow()).count();
    let (mut samples, mut held, start) = (0, 0, Instant::now());
    let mut handed_over = false;
    while start.elapsed() < Duration::from_secs(12) {
        let n = holders();
        assert!(n <= 1, "{n} planners at once");
        samples += 1;
        held += n;
        if !handed_over && start.elapsed() > Duration::from_secs(3) && n == 1 {
            // The planner goes away: another takes over once its key is gone.
            let (_, cancel) = contenders.iter().find(|(rx, _)| *rx.borrow()).expect("the planner");
            cancel.cancel();
            handed_over = true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(handed_over, "a planner was elected");
    assert!(held * 10 > samples * 7, "a planner most of the time: {held} of {samples} samples");
    assert_eq!(holders(), 1, "another router took over");
}

#[test]
fn a_rebalancing_router_replicates_the_experts_its_load_makes_hot() {
    let Some((etcd, rt, tmp)) = start(64) else { return };
    let model = tmp.path().join("m");
    let m = model.to_str().expect("utf8");
    // Worker A holds every expert, B only one: B idles while A computes everything.
    let a = worker(&etcd, "auto", m, "all", &[]);
    let b = worker(&etcd, "auto", m, "0:0", &[]);
    let http = format!("127.0.0.1:{}", free_port());
    let r = router(&etcd, "auto", m, &["--rebalance-every", "1", "--http-listen", &http]);
    eventually("router ready", 30, || {
        rt.block_on(health(&r.addr)) == 1 && rt.block_on(model_info(&r.addr)).workers == 2
    });
    let held_before = pairs(&rt.block_on(describe(&b.addr)).layers).len();
    for i in 0..6u32 {
        rt.block_on(generate(&r.addr, vec![1 + i, 2, 3])).expect("generate");
    }
    eventually("B was given replicas", 20, || pairs(&rt.block_on(describe(&b.addr)).layers).len() > held_before);
    let metrics = scrape(&http);
    assert!(moe_metrics::sample(&metrics, "moe_placement_steps_total", &[]).is_some_and(|n| n >= 1.0));
    // A second rebalancing router: exactly one of the two is the planner, every time we look.
    let http2 = format!("127.0.0.1:{}", free_port());
    let r2 = router(&etcd, "auto", m, &["--rebalance-every", "1", "--http-listen", &http2]);
    eventually("the second router ready", 30, || rt.block_on(health(&r2.addr)) == 1);
    let planner = |h: &str| moe_metrics::sample(&scrape(h), "moe_placement_planner", &[]).unwrap_or(-1.0);
    for _ in 0..10 {
        assert_eq!(planner(&http) + planner(&http2), 1.0, "one planner among two routers");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A keeps every expert (nothing was orphaned) and requests still give the same tokens.
    assert_eq!(pairs(&rt.block_on(describe(&a.addr)).layers).len(), 16);
    let got = rt.block_on(generate(&r.addr, vec![1, 2, 3])).expect("generate");
    assert_eq!(got, solo_greedy(&model, &[1, 2, 3], got.len()));
}

/// `moe bench-placement` runs end to end (short phases): both runs report every phase, the
/// skew shows under static sharding, and every balance is a ratio.
#[test]
fn the_placement_benchmark_runs_and_reports_both_runs() {
    let Some(etcd) = Etcd::start() else { return };
    let url = etcd.url();
    let out = moe(&[
        "bench-placement",
        "--phase-secs",
        "3",
        "--rebalance-every",
        "1",
        "--concurrency",
        "8",
        "--etcd",
        &url,
        "--json",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v = out.json();
    for run in ["static_sharding", "planner"] {
        let phases = v[run].as_array().expect("phases");
        assert_eq!(phases.len(), 3, "{v}");
        for p in phases {
            let b = p["balance"].as_f64().expect("balance");
            assert!(b > 0.0 && b <= 1.0, "{run}: {p}");
            assert!(p["projected_tokens_per_s"].as_f64().is_some_and(|t| t > 0.0), "{p}");
        }
    }
    assert!(v["static_sharding"][0]["balance"].as_f64().is_some_and(|b| b < 0.8), "the prose-heavy mix is skewed: {v}");
    assert!(v["pair_cost_us"].as_f64().is_some_and(|c| c > 0.0));
}

/// Placement flags that cannot work say why and exit non-zero, before anything starts.
#[test]
fn placement_flags_that_cannot_work_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("m");
    endless_model_sized(&model, 256, 2); // 16 experts of 196 KB: over a 1 MiB budget
    let m = model.to_str().expect("utf8");
    moe(&["router", "--model", m, "--workers", "127.0.0.1:1", "--rebalance-every", "5"])
        .assert_error(&["--rebalance-every needs --etcd"]);
    moe(&["worker", "--model", m, "--experts", "all", "--max-expert-mb", "1", "--listen", "127.0.0.1:0"])
        .assert_error(&["--max-expert-mb", "expert budget"]);
    moe(&["placement", "plan", "--endpoint", "127.0.0.1:1", "--workers", "127.0.0.1:2", "--capacity", "0"])
        .assert_error(&["--capacity must be at least 1"]);
}

/// Planner split-brain. Two planners that read the same snapshot make plans that are each valid
/// (each unloads a different replica of one expert) but orphan it together; and a router whose
/// planner lease lapsed must not go on applying. `apply` reads the workers before every unload
/// and refuses the step that would leave an expert without a holder, and stops before any step
/// once the role is lost.
#[test]
fn interleaved_plans_cannot_orphan_an_expert_and_a_lost_role_stops_the_plan() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("m");
    endless_model_sized(&model, 64, 2);
    let m = model.to_str().expect("utf8");
    let spawn = || {
        spawn_server(&[
            "worker",
            "--model",
            m,
            "--experts",
            "all",
            "--listen",
            "127.0.0.1:0",
            "--drain-quiet-ms",
            "200",
        ])
    };
    let (w0, w1) = (spawn(), spawn());
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let slots = |w: &Server| {
        rt.block_on(moe_cluster::rebalance::describe_worker(&w.addr, 64, &Default::default())).expect("describe")
    };
    let experts = rt.block_on(describe(&w0.addr)).layers[0].experts.len();
    let cluster = moe_placement::Cluster {
        num_layers: 2,
        num_experts: experts,
        workers: vec![slots(&w0), slots(&w1)],
        load: vec![1; 2 * experts],
    };
    let apply = |steps: &[moe_placement::Step], planner: bool| {
        rt.block_on(moe_cluster::rebalance::apply(&cluster, steps, &Default::default(), &|| planner))
    };
    // A lost role: nothing is sent.
    let first = [moe_placement::Step::Unload { worker: 0, layer: 1, expert: 2 }];
    let fenced = apply(&first, false).expect_err("not the planner");
    assert!(fenced.to_string().contains("lost the planner role"), "{fenced}");
    assert!(pairs(&rt.block_on(describe(&w0.addr)).layers).contains(&(1, 2)), "nothing was unloaded");
    // Planner A unloads w0's replica; planner B, from the same snapshot, w1's: refused.
    assert_eq!(apply(&first, true).expect("planner A"), 1);
    let second = [moe_placement::Step::Unload { worker: 1, layer: 1, expert: 2 }];
    let refused = apply(&second, true).expect_err("would orphan layer 1 expert 2");
    assert!(refused.to_string().contains("layer 1 expert 2 would leave it without a holder"), "{refused}");
    assert!(pairs(&rt.block_on(describe(&w1.addr)).layers).contains(&(1, 2)), "the last holder keeps it");
}

/// Defect: a router stopping did not revoke its planner lease (the process exited before the
/// election task could), so no router planned until the lease's TTL ran out. Now another
/// contender takes over within moments of a SIGTERM, long before the 15 s TTL.
#[test]
fn a_stopping_router_hands_the_planner_role_over_at_once() {
    let Some((etcd, rt, tmp)) = start(64) else { return };
    let m = tmp.path().join("m");
    let router = router(&etcd, "handover", m.to_str().expect("utf8"), &["--rebalance-every", "15"]);
    let opts = EtcdOptions { endpoints: vec![etcd.url()], cluster: "handover".into(), ..Default::default() };
    let (tx, other) = tokio::sync::watch::channel(false);
    let cancel = CancellationToken::new();
    // Let the router take the role first, then contend.
    std::thread::sleep(Duration::from_secs(2));
    rt.spawn(hold_planner(opts, "contender".into(), Duration::from_secs(3), tx, cancel.clone()));
    std::thread::sleep(Duration::from_secs(2));
    assert!(!*other.borrow(), "the router should hold the role");
    let stopped = Instant::now();
    sigterm(&router.child);
    eventually("the contender takes over", 12, || *other.borrow());
    let took = stopped.elapsed();
    cancel.cancel();
    assert!(took < Duration::from_secs(8), "the role came free only after {took:?} (the lease's TTL is 15 s)");
}
