//! Adapters made by the real `peft` package (0.21, transformers 5; see
//! tests/fixtures/make_peft_fixtures.py) give PEFT's own forward: the MoE gate through
//! `target_parameters`, attention through `target_modules`, the fused experts (one pair per
//! parameter for every expert, nested `base_layer` naming), a `layers_to_transform` adapter and
//! rank/alpha patterns keyed by parameter names, for all four architectures (the gate and the
//! fused experts on DeepSeek-V3 and GLM-4.5), through `moe logits
//! --adapter` and through a router with two worker processes over gRPC (the workers load only
//! their experts' slices). And what PEFT can write but this project cannot apply is refused at
//! load, naming it.

mod common;

use common::*;
use moe_cluster::{load_router_model, remote_dispatcher};
use moe_compute::cpu::CpuBackend;
use moe_dispatch::GrpcTransportConfig;
use moe_lora::{load_adapter, AdapterParts};
use moe_model::AdapterIdentity;
use moe_proto::v1::WireDtype;
use std::path::Path;
use std::sync::Arc;

const ADAPTERS: [&str; 5] = ["gate", "attn", "experts", "layers", "patterns"];

/// The PEFT fixtures of an architecture: all five on the first four; on the 2026 ones
/// (tests/fixtures/make_fixtures_2026.py): DeepSeek-V3's gate, fused experts and latent attention
/// (q_a, q_b, kv_a, kv_b absorbed, o; V2-Lite's q_proj form too), GLM-4.5's gate, experts and
/// attention, gpt-oss's router, attention and interleaved biased experts, Qwen3-Next's gate, fused experts and
/// gated attention (q_proj's rows make q and the output gate;
/// tests/fixtures/make_fixtures_qwen3_next.py).
fn adapters_of(arch: &str) -> &'static [&'static str] {
    match arch {
        "deepseek_v3" => &["gate", "experts", "mla"],
        "deepseek_v3_lite" => &["mla"],
        "glm4_moe" => &["gate", "experts", "attn"],
        "gpt_oss" => &["gate", "attn", "experts"],
        "qwen3_next" => &["gate", "experts", "attn"],
        _ => &ADAPTERS,
    }
}

fn peft_expected(arch: &str, name: &str) -> serde_json::Value {
    let path = fixture(arch).join("peft").join(name).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("peft fixture")).expect("json")
}

#[test]
fn moe_logits_with_peft_adapters_matches_peft() {
    for arch in all_archs().chain(["deepseek_v3_lite"]) {
        let dir = fixture(arch);
        let base = expected(arch);
        for &name in adapters_of(arch) {
            let adapter = dir.join("peft").join(name);
            for case in peft_expected(arch, name)["cases"].as_array().expect("cases") {
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
                let want = matrix(&case["logits"]);
                let err = rel_err(&matrix(&out.json()["logits"]), &want);
                assert!(err < 1e-4, "{arch}/{name}, {} tokens: relative error {err}", ids.len());
                // Guard: the adapter really changes the logits, so ignoring it would fail above.
                let base_case = base["cases"]
                    .as_array()
                    .expect("cases")
                    .iter()
                    .find(|c| c["token_ids"] == case["token_ids"])
                    .expect("same prompt in the base fixture");
                let diff = rel_err(&want, &matrix(&base_case["logits"]));
                assert!(diff > 1e-2, "{arch}/{name} barely changes the logits ({diff})");
            }
        }
    }
}

#[test]
fn router_with_two_worker_processes_matches_peft() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for arch in all_archs().chain(["deepseek_v3_lite"]) {
        let dir = fixture(arch);
        let adapters = dir.join("peft");
        let (d, a) = (dir.to_str().expect("utf8"), adapters.to_str().expect("utf8"));
        let workers: Vec<Server> = ["shard:0/2", "shard:1/2"]
            .iter()
            .map(|s| {
                spawn_server(&["worker", "--model", d, "--experts", s, "--listen", "127.0.0.1:0", "--adapter-dir", a])
            })
            .collect();
        let addrs: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
        let (model, _) = load_router_model(&dir, CpuBackend::new()).expect("dense model");
        let cfg = GrpcTransportConfig { wire: WireDtype::F32, ..Default::default() };
        let dispatcher = Arc::new(rt.block_on(remote_dispatcher(&model.config, &addrs, cfg)).expect("connect"));
        for &name in adapters_of(arch) {
            // The router holds the attention and gate pairs; the workers load the expert slices.
            let identity = AdapterIdentity { id: name.into(), path: name.into(), digest: String::new() };
            let adapter =
                load_adapter(&adapters.join(name), identity, &model.config, model.backend(), AdapterParts::router())
                    .expect("adapter loads on the router");
            let adapter = Arc::new(adapter);
            for case in peft_expected(arch, name)["cases"].as_array().expect("cases") {
                let ids = u32s(&case["token_ids"]);
                let (m, disp, ad) = (model.clone(), dispatcher.clone(), adapter.clone());
                let got = std::thread::spawn(move || logits_with(&m, Some(disp.as_ref()), Some(&ad), &ids))
                    .join()
                    .expect("thread");
                let err = rel_err(&got, &matrix(&case["logits"]));
                assert!(err < 1e-4, "{arch}/{name} through 2 workers: relative error {err}");
            }
        }
    }
}

/// Copies a PEFT fixture adapter with its config edited by `edit`.
fn edited(src: &Path, dst: &Path, edit: impl Fn(&mut serde_json::Value)) {
    std::fs::create_dir_all(dst).expect("mkdir");
    std::fs::copy(src.join("adapter_model.safetensors"), dst.join("adapter_model.safetensors")).expect("copy");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).expect("read")).expect("json");
    edit(&mut cfg);
    std::fs::write(dst.join("adapter_config.json"), cfg.to_string()).expect("write");
}

#[test]
fn unsupported_peft_features_are_refused_naming_them() {
    let dir = fixture("qwen3_moe");
    let tmp = tempfile::tempdir().expect("tmp");
    let cases: [(&str, &str, serde_json::Value, &str); 7] = [
        ("experts", "use_dora", serde_json::json!(true), "use_dora"),
        ("gate", "lora_bias", serde_json::json!(true), "lora_bias"),
        ("gate", "modules_to_save", serde_json::json!(["lm_head"]), "modules_to_save"),
        ("gate", "target_parameters", serde_json::json!(["lm_head.weight"]), "lm_head.weight"),
        ("experts", "target_parameters", serde_json::json!(["mlp.experts.gate_up_proj"]), "down_proj"),
        ("attn", "layers_to_transform", serde_json::json!([0]), "layers_to_transform"),
        ("attn", "layer_replication", serde_json::json!([[0, 1]]), "layer_replication"),
    ];
    for (i, (adapter, key, value, needle)) in cases.into_iter().enumerate() {
        let out = tmp.path().join(format!("case{i}"));
        edited(&dir.join("peft").join(adapter), &out, |c| c[key] = value.clone());
        let got = moe(&[
            "logits",
            "--model",
            dir.to_str().expect("utf8"),
            "--adapter",
            out.to_str().expect("utf8"),
            "--token-ids",
            "1,2",
        ]);
        assert_ne!(got.code, 0, "{key}: must be refused");
        assert!(got.stderr.contains(needle), "{key}: the error names {needle:?}: {}", got.stderr);
        assert!(!got.stderr.contains("panicked"), "{}", got.stderr);
    }
}

#[test]
fn adapter_inspect_names_targets_or_the_reason() {
    let dir = fixture("olmoe");
    let model = dir.to_str().expect("utf8");
    let experts = dir.join("peft").join("experts");
    let out = moe(&["adapter", "inspect", experts.to_str().expect("utf8"), "--model", model, "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v = out.json();
    let modules = v["modules"].as_array().expect("modules");
    assert_eq!(modules.len(), 4, "{v}");
    assert!(modules.iter().all(|m| m["experts"] == 8 && m["applied_on"] == "workers hosting the experts"), "{v}");
    assert!(modules.iter().any(|m| m["target"] == "all experts, fused gate_up_proj"), "{v}");
    let gate = dir.join("peft").join("layers");
    let out = moe(&["adapter", "inspect", gate.to_str().expect("utf8"), "--model", model, "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.json()["modules"].as_array().expect("modules").iter().any(|m| m["applied_on"] == "router"));
    // Another model's adapter: refused with the module and the reason.
    let foreign = fixture("qwen3_moe").join("peft").join("attn");
    let out = moe(&["adapter", "inspect", foreign.to_str().expect("utf8"), "--model", model]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("cannot be served") && out.stderr.contains("self_attn"), "{}", out.stderr);
}

/// Qwen3-Next: LoRA on self_attn of a linear-attention layer (another model's adapter) is refused
/// at load, naming the reason.
#[test]
fn qwen3_next_refuses_attention_pairs_on_its_deltanet_layers() {
    let model = fixture("qwen3_next");
    let m = model.to_str().expect("utf8");
    let cases = [(fixture("qwen3_moe").join("peft").join("attn"), "linear-attention (gated DeltaNet) layer")];
    for (adapter, needle) in cases {
        let a = adapter.to_str().expect("utf8");
        for args in [
            vec!["adapter", "inspect", a, "--model", m],
            vec!["logits", "--model", m, "--adapter", a, "--token-ids", "1,2"],
        ] {
            let out = moe(&args);
            assert_ne!(out.code, 0, "{args:?}");
            assert!(out.stderr.contains(needle) && !out.stderr.contains("panicked"), "{args:?}: {}", out.stderr);
        }
    }
}
