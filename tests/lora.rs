//! LoRA adapters give transformers' answers (base model with the adapter merged into the
//! weights) for gate, attention and expert adapters of all four architectures: through
//! `moe logits --adapter`, the embedded cluster with 3 workers, and 3 worker processes over
//! gRPC (expert pairs loaded by the workers from their own adapter dir). A batch mixing 8
//! different adapters and base rows gives every row its solo result.

mod common;

use common::*;
use moe_cluster::{in_process_dispatcher_on, load_router_model, remote_dispatcher, AdapterOptions};
use moe_compute::cpu::CpuBackend;
use moe_dispatch::GrpcTransportConfig;
use moe_lora::{load_adapter, AdapterParts, RegistryLimits};
use moe_model::{AdapterIdentity, AdapterWeights, BatchItem, ExpertExecutor, LogitsFor, Model, SequenceCache};
use moe_proto::v1::WireDtype;
use std::path::Path;
use std::sync::Arc;

const ADAPTERS: [&str; 3] = ["gate", "attn", "experts"];

fn adapter_expected(arch: &str, name: &str) -> serde_json::Value {
    let path = fixture(arch).join("adapters").join(name).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("adapter fixture")).expect("json")
}

fn load(model: &Model<CpuBackend>, dir: &Path, id: &str, parts: AdapterParts<'_>) -> AdapterWeights<CpuBackend> {
    let identity = AdapterIdentity { id: id.into(), path: id.into(), digest: String::new() };
    load_adapter(dir, identity, &model.config, model.backend(), parts).expect("adapter loads")
}

#[test]
fn moe_logits_with_adapter_matches_transformers() {
    for arch in ARCHS {
        let dir = fixture(arch);
        for name in ADAPTERS {
            let adapter = dir.join("adapters").join(name);
            for case in adapter_expected(arch, name)["cases"].as_array().expect("cases") {
                let ids = u32s(&case["token_ids"]);
                let out = moe(&[
                    "logits",
                    "--model",
                    dir.to_str().expect("utf8"),
                    "--adapter",
                    adapter.to_str().expect("utf8"),
                    "--token-ids",
                    &ids_arg(&ids),
                    "--json",
                ]);
                assert_eq!(out.code, 0, "{arch}/{name}: {}", out.stderr);
                let err = rel_err(&matrix(&out.json()["logits"]), &matrix(&case["logits"]));
                assert!(err < 1e-4, "{arch}/{name}, {} tokens: relative error {err}", ids.len());
            }
        }
    }
}

#[test]
fn adapter_really_changes_the_logits() {
    // Guards the fixtures: if an adapter were ignored, the tests above would have to fail.
    for arch in ARCHS {
        let base = expected(arch);
        for name in ADAPTERS {
            let case = &adapter_expected(arch, name)["cases"][0];
            let base_case = base["cases"]
                .as_array()
                .expect("cases")
                .iter()
                .find(|c| c["token_ids"] == case["token_ids"])
                .expect("same prompt in the base fixture");
            let diff = rel_err(&matrix(&case["logits"]), &matrix(&base_case["logits"]));
            assert!(diff > 1e-2, "{arch}/{name} barely changes the logits ({diff})");
        }
    }
}

#[test]
fn embedded_cluster_with_adapters_matches_transformers() {
    for arch in ARCHS {
        let dir = fixture(arch);
        let adapters = dir.join("adapters");
        let (model, _) = load_router_model(&dir, moe_compute::cpu::CpuBackend::new()).expect("dense model");
        let opts = AdapterOptions { dir: Some(adapters.clone()), limits: RegistryLimits::default() };
        let dispatcher = in_process_dispatcher_on(moe_compute::Device::Cpu, &dir, 3, &opts).expect("workers");
        for name in ADAPTERS {
            let adapter = load(&model, &adapters.join(name), name, AdapterParts::router());
            for case in adapter_expected(arch, name)["cases"].as_array().expect("cases") {
                let ids = u32s(&case["token_ids"]);
                let got = logits_with(&model, Some(&dispatcher), Some(&adapter), &ids);
                let err = rel_err(&got, &matrix(&case["logits"]));
                assert!(err < 1e-4, "{arch}/{name}, embedded 3 workers: relative error {err}");
            }
        }
    }
}

#[test]
fn worker_processes_over_grpc_with_adapters_match_transformers() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for arch in ARCHS {
        let dir = fixture(arch);
        let adapters = dir.join("adapters");
        let (d, a) = (dir.to_str().expect("utf8"), adapters.to_str().expect("utf8"));
        let specs: [&str; 3] = match arch {
            "mixtral" => ["0:0-2", "0:3,1:0", "1:1-3"],
            "qwen2_moe" => ["*:0", "*:1-3", "*:4-5"],
            "qwen3_moe" => ["*:0-4", "*:5", "*:6-7"],
            _ => ["*:0", "*:1", "*:2-7"],
        };
        let workers: Vec<Server> = specs
            .iter()
            .map(|s| {
                spawn_server(&["worker", "--model", d, "--experts", s, "--listen", "127.0.0.1:0", "--adapter-dir", a])
            })
            .collect();
        let addrs: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
        let (model, _) = load_router_model(&dir, moe_compute::cpu::CpuBackend::new()).expect("dense model");
        let cfg = GrpcTransportConfig { wire: WireDtype::F32, ..Default::default() };
        let dispatcher = Arc::new(rt.block_on(remote_dispatcher(&model.config, &addrs, cfg)).expect("connect"));
        for name in ADAPTERS {
            // The router holds attention and gate pairs only; workers load the expert pairs.
            let adapter = Arc::new(load(&model, &adapters.join(name), name, AdapterParts::router()));
            for case in adapter_expected(arch, name)["cases"].as_array().expect("cases") {
                let ids = u32s(&case["token_ids"]);
                let (m, disp, ad) = (model.clone(), dispatcher.clone(), adapter.clone());
                let got = std::thread::spawn(move || logits_with(&m, Some(disp.as_ref()), Some(&ad), &ids))
                    .join()
                    .expect("thread");
                let err = rel_err(&got, &matrix(&case["logits"]));
                assert!(err < 1e-4, "{arch}/{name} over gRPC: relative error {err}");
            }
        }
    }
}

/// Eight adapters on different modules (and two rows of none) in one prefill batch and one
/// decode batch: every row equals its solo run, in one process and in the embedded cluster.
#[test]
fn batch_mixing_8_adapters_and_base_rows_equals_solo() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = fixture("mixtral");
    let kinds: [&[&str]; 8] = [
        &["gate"],
        &["q", "v"],
        &["experts"],
        &["gate", "experts"],
        &["k", "o"],
        &["q", "k", "v", "o", "gate", "experts"],
        &["gate"],
        &["o", "experts"],
    ];
    for (i, k) in kinds.iter().enumerate() {
        write_random_adapter(&dir, &tmp.path().join(format!("a{i}")), k, 2 + i % 3, 100 + i as u64);
    }
    let full = Model::load(&dir, CpuBackend::new()).expect("model");
    let (dense, _) = load_router_model(&dir, moe_compute::cpu::CpuBackend::new()).expect("dense model");
    let opts = AdapterOptions { dir: Some(tmp.path().into()), limits: RegistryLimits::default() };
    let dispatcher = in_process_dispatcher_on(moe_compute::Device::Cpu, &dir, 3, &opts).expect("workers");
    let local: Vec<_> =
        (0..8).map(|i| load(&full, &tmp.path().join(format!("a{i}")), &format!("a{i}"), AdapterParts::all())).collect();
    let routed: Vec<_> = (0..8)
        .map(|i| load(&dense, &tmp.path().join(format!("a{i}")), &format!("a{i}"), AdapterParts::router()))
        .collect();
    // Rows: base, a0..a7, base; prompts of different lengths.
    let which: Vec<Option<usize>> =
        std::iter::once(None).chain((0..8).map(Some)).chain(std::iter::once(None)).collect();
    let prompts: Vec<Vec<u32>> =
        (0..which.len()).map(|i| (0..(3 + i * 2) as u32).map(|j| (j * 13 + i as u32 * 7) % 128).collect()).collect();
    for (model, adapters, experts) in
        [(&full, &local, None), (&dense, &routed, Some(&dispatcher as &dyn ExpertExecutor<CpuBackend>))]
    {
        // Solo: prefill then one decode token, each sequence alone.
        let solo: Vec<(Vec<f32>, Vec<f32>)> = which
            .iter()
            .zip(&prompts)
            .map(|(w, p)| {
                let ad = w.map(|i| &adapters[i]);
                let mut ws = model.workspace();
                let mut kv = model.kv_cache(32, 16).expect("kv");
                let mut cache = SequenceCache::default();
                let (mut pre, mut dec) = (Vec::new(), Vec::new());
                let mut b = [BatchItem::new(p, &mut cache).with_adapter(ad)];
                model.forward_with(&mut ws, &mut kv, &mut b, LogitsFor::Last, &mut pre, experts).expect("prefill");
                let mut b = [BatchItem::new(&[5], &mut cache).with_adapter(ad)];
                model.forward_with(&mut ws, &mut kv, &mut b, LogitsFor::Last, &mut dec, experts).expect("decode");
                (pre, dec)
            })
            .collect();
        let mut ws = model.workspace();
        let mut kv = model.kv_cache(64, 16).expect("kv");
        let mut caches: Vec<SequenceCache> = which.iter().map(|_| SequenceCache::default()).collect();
        let (mut pre, mut dec) = (Vec::new(), Vec::new());
        let mut batch: Vec<BatchItem<'_, CpuBackend>> = caches
            .iter_mut()
            .zip(&prompts)
            .zip(&which)
            .map(|((c, p), w)| BatchItem::new(p, c).with_adapter(w.map(|i| &adapters[i])))
            .collect();
        model.forward_with(&mut ws, &mut kv, &mut batch, LogitsFor::Last, &mut pre, experts).expect("batch prefill");
        let mut batch: Vec<BatchItem<'_, CpuBackend>> = caches
            .iter_mut()
            .zip(&which)
            .map(|(c, w)| BatchItem::new(&[5], c).with_adapter(w.map(|i| &adapters[i])))
            .collect();
        model.forward_with(&mut ws, &mut kv, &mut batch, LogitsFor::Last, &mut dec, experts).expect("batch decode");
        let v = model.config.vocab_size;
        for (r, (sp, sd)) in solo.iter().enumerate() {
            for (got, want, what) in
                [(&pre[r * v..(r + 1) * v], sp, "prefill"), (&dec[r * v..(r + 1) * v], sd, "decode")]
            {
                let err = rel_err(&[got.to_vec()], std::slice::from_ref(want));
                assert!(err < 1e-5, "row {r} ({:?}) {what}: batched differs from solo by {err}", which[r]);
            }
        }
        // Different adapters do give different answers (the mix is not trivially equal).
        assert!(rel_err(&[solo[1].0.clone()], &[solo[0].0.clone()]) > 1e-3);
    }
}

/// Adapters that must be refused at load, each with an error naming what is wrong: NaN weights,
/// a rank above the maximum, another base model's shapes, an unsupported target.
#[test]
fn bad_adapters_are_refused_naming_the_module() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = fixture("mixtral");
    let (model, _) = load_router_model(&dir, moe_compute::cpu::CpuBackend::new()).expect("model");
    let try_load = |path: &Path| {
        let identity = AdapterIdentity { id: "x".into(), path: "x".into(), digest: String::new() };
        load_adapter(path, identity, &model.config, model.backend(), AdapterParts::all())
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    // NaN in a weight.
    let nan = tmp.path().join("nan");
    write_random_adapter(&dir, &nan, &["gate"], 2, 1);
    let mut st = RawSafetensors::read(&nan.join("adapter_model.safetensors"));
    let name = st.names().into_iter().find(|n| n.ends_with("lora_B.weight")).expect("a B");
    let off = st.header[&name]["data_offsets"][0].as_u64().expect("offset") as usize;
    st.data[off..off + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    st.write(&nan.join("adapter_model.safetensors"));
    let e = try_load(&nan);
    assert!(e.contains("non-finite") && e.contains("block_sparse_moe.gate"), "{e}");
    // Rank above the maximum.
    let big = tmp.path().join("big");
    write_random_adapter(&dir, &big, &["gate"], 600, 2);
    let e = try_load(&big);
    assert!(e.contains("rank 600 is above the maximum"), "{e}");
    // Another base model (qwen3's head_dim 24 makes q_proj 96 wide).
    let other = tmp.path().join("other");
    write_random_adapter(&fixture("qwen3_moe"), &other, &["q"], 4, 3);
    let e = try_load(&other);
    assert!(e.contains("self_attn.q_proj") && e.contains("lora_B is [96, 4]"), "{e}");
}

async fn generate_with(addr: &str, adapter: &str) -> Result<Vec<u32>, tonic::Status> {
    use moe_proto::v1::{generate_request::Prompt, inference_client::InferenceClient};
    use moe_proto::v1::{GenerateRequest, SamplingParams, TokenIds};
    let mut c = InferenceClient::connect(format!("http://{addr}")).await.expect("connect");
    let req = GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: vec![1, 2, 3, 4, 5] })),
        sampling: Some(SamplingParams { max_new_tokens: Some(8), ..Default::default() }),
        adapter_id: adapter.into(),
        ..Default::default()
    };
    c.generate(req).await.map(|r| r.into_inner().token_ids)
}

/// An adapter's files replaced in place on the volume a router and two worker processes share:
/// the router notices at the next request and reloads, the workers load the version it names
/// (by digest), and the request gives what the new files give (the same tokens as another id
/// holding those files), with no failed request. Before, the router kept its old copy, the
/// workers loaded the new files, and every request failed on the digest mismatch.
#[test]
fn an_adapter_replaced_in_place_is_reloaded_by_the_router_and_its_workers() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tmp = tempfile::tempdir().expect("tmp");
    let model = fixture("mixtral");
    let ads = tmp.path().join("adapters");
    write_random_adapter(&model, &ads.join("a"), &["gate", "experts", "q"], 4, 11);
    write_random_adapter(&model, &ads.join("b"), &["gate", "experts", "q"], 4, 12);
    let (m, a) = (model.to_str().expect("utf8"), ads.to_str().expect("utf8"));
    let workers: Vec<Server> = ["shard:0/2", "shard:1/2"]
        .iter()
        .map(|s| spawn_server(&["worker", "--model", m, "--experts", s, "--listen", "127.0.0.1:0", "--adapter-dir", a]))
        .collect();
    let addrs = workers.iter().map(|w| w.addr.clone()).collect::<Vec<_>>().join(",");
    let router =
        spawn_server(&["router", "--model", m, "--workers", &addrs, "--listen", "127.0.0.1:0", "--adapter-dir", a]);
    let before = rt.block_on(generate_with(&router.addr, "a")).expect("a before the update");
    let b = rt.block_on(generate_with(&router.addr, "b")).expect("b");
    assert_ne!(before, b, "the two adapters must differ for this test to mean anything");
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(ads.join("b").join(f), ads.join("a").join(f)).expect("replace in place");
    }
    // Within about a second (the router's file check interval) the new version serves; until
    // then the old one does, consistently; no request fails on the way.
    let started = std::time::Instant::now();
    loop {
        let after = rt.block_on(generate_with(&router.addr, "a")).map_err(|s| s.message().to_string());
        let after = after.unwrap_or_else(|e| panic!("a request failed after the update: {e}"));
        if after == b {
            break;
        }
        assert_eq!(after, before, "neither the old nor the new version");
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "the update was not picked up");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for _ in 0..2 {
        assert_eq!(rt.block_on(generate_with(&router.addr, "a")).map_err(|s| s.message().to_string()), Ok(b.clone()));
    }
}
