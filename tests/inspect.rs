//! `moe inspect` on the published configs of the models teams serve in 2026
//! (tests/fixtures/configs/): parameters, active parameters and the KV cache per token, from
//! config.json alone. DeepSeek-V3's KV cache is its latent (`kv_lora_rank + qk_rope_head_dim`
//! values per layer), not full heads; Qwen3-Next's is its full-attention layers' only, beside a
//! recurrent state per sequence.

mod common;

use common::*;

fn inspect(name: &str) -> serde_json::Value {
    let path = fixture("configs").join(name);
    let out = moe(&["inspect", "--model", path.to_str().expect("utf8"), "--json"]);
    assert_eq!(out.code, 0, "{name}: {}", out.stderr);
    out.json()
}

fn near(got: &serde_json::Value, want: f64, what: &str) {
    let got = got.as_f64().expect("number");
    assert!((got / want - 1.0).abs() < 0.02, "{what}: {got} is not within 2% of {want}");
}

#[test]
fn published_configs_are_sized_as_their_model_cards_say() {
    let v3 = inspect("deepseek_v3.json");
    assert_eq!(v3["architecture"], "DeepseekV3ForCausalLM");
    near(&v3["total_params"], 671e9, "DeepSeek-V3 parameters");
    near(&v3["active_params"], 37e9, "DeepSeek-V3 active parameters");
    // The latent: (512 + 64) values per token in each of 61 layers; full heads would be
    // 2 x 128 heads x 192 x 61, 85x more.
    assert_eq!(v3["kv_values_per_token"], 576 * 61);
    assert_eq!(v3["latent_attention"], true);
    assert!(v3["quantization"].as_str().expect("fp8").contains("Fp8Block { block: [128, 128] }"));

    let k2 = inspect("kimi_k2.json");
    near(&k2["total_params"], 1.03e12, "Kimi K2 parameters");
    near(&k2["active_params"], 32e9, "Kimi K2 active parameters");
    assert_eq!(k2["kv_values_per_token"], 576 * 61);

    let air = inspect("glm_4_5_air.json");
    assert_eq!(air["architecture"], "Glm4MoeForCausalLM");
    near(&air["total_params"], 106.9e9, "GLM-4.5-Air parameters");
    assert_eq!(air["kv_values_per_token"], 2 * 8 * 128 * 46);
    near(&inspect("glm_4_5.json")["total_params"], 352.8e9, "GLM-4.5 parameters");

    let oss = inspect("gpt_oss_20b.json");
    assert_eq!(oss["architecture"], "GptOssForCausalLM");
    near(&oss["total_params"], 20.9e9, "gpt-oss-20b parameters");
    near(&oss["active_params"], 3.6e9, "gpt-oss-20b active parameters");
    near(&inspect("gpt_oss_120b.json")["total_params"], 116.8e9, "gpt-oss-120b parameters");

    // The fixture this project checks against transformers reports its latent too.
    let tiny = moe(&["inspect", "--model", fixture("deepseek_v3").to_str().expect("utf8")]);
    assert_eq!(tiny.code, 0, "{}", tiny.stderr);
    assert!(tiny.stdout.contains("latent: 40 values x 3 layers"), "{}", tiny.stdout);
}

/// Qwen3-Next: only its 12 full-attention layers keep KV pages (2 KV heads x 256 x 2 each); its 36
/// gated DeltaNet layers keep a recurrent state per sequence instead (the convolution's last 3
/// inputs of 8192 channels and 32 value heads of 128 x 128).
#[test]
fn a_hybrid_model_reports_its_kv_and_its_recurrent_state() {
    let next = inspect("qwen3_next_80b_a3b.json");
    assert_eq!(next["architecture"], "Qwen3NextForCausalLM");
    near(&next["total_params"], 80e9, "Qwen3-Next-80B-A3B parameters");
    assert_eq!(next["kv_values_per_token"], 2 * 2 * 256 * 12);
    assert_eq!(next["state_values_per_sequence"], 36 * (8192 * 3 + 32 * 128 * 128));
    let path = fixture("configs").join("qwen3_next_80b_a3b.json");
    let out = moe(&["inspect", "--model", path.to_str().expect("utf8")]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("recurrent state of 75.4 MiB per sequence"), "{}", out.stdout);
}

/// A checkpoint quantized by a method this build cannot read is refused before any tensor is,
/// naming the method.
#[test]
fn an_unsupported_quantization_is_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tmp");
    copy_fixture("glm4_moe", tmp.path());
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    cfg["quantization_config"] = serde_json::json!({"quant_method": "awq", "bits": 4});
    std::fs::write(&path, cfg.to_string()).expect("write");
    let out = moe(&["logits", "--model", tmp.path().to_str().expect("utf8"), "--token-ids", "1,2"]);
    out.assert_error(&["\"awq\"", "not supported"]);
}

/// `moe bench`'s DeepSeek-V3-shaped model has the benchmark model's active parameters (so its
/// decode ratio compares layouts, not sizes), a latent KV cache, and serves.
#[test]
fn the_deepseek_shaped_bench_model_matches_the_mixtral_one_in_active_parameters() {
    let tmp = tempfile::tempdir().expect("tmp");
    let spec = moe_demo::DemoSpec { num_layers: 3, vocab_size: 300, ..moe_demo::DemoSpec::demo() };
    let ds = moe_demo::DemoSpec { layout: moe_demo::DemoLayout::DeepseekV3, ..spec.clone() };
    let (m, d) = (tmp.path().join("mixtral"), tmp.path().join("deepseek"));
    moe_demo::write_demo_model(&m, &spec).expect("mixtral");
    moe_demo::write_demo_model(&d, &ds).expect("deepseek");
    let size = |dir: &std::path::Path| {
        let out = moe(&["inspect", "--model", dir.to_str().expect("utf8"), "--json"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        out.json()
    };
    let (mv, dv) = (size(&m), size(&d));
    assert_eq!(dv["architecture"], "DeepseekV3ForCausalLM");
    let (ma, da) = (mv["active_params"].as_f64().expect("m"), dv["active_params"].as_f64().expect("d"));
    assert!((da / ma - 1.0).abs() < 0.05, "active parameters {da} vs {ma}");
    assert!(dv["kv_values_per_token"].as_u64() < mv["kv_values_per_token"].as_u64(), "{dv} {mv}");
    let out = moe(&["generate", "--model", d.to_str().expect("utf8"), "--prompt", "hello", "--max-new-tokens", "4"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
}
