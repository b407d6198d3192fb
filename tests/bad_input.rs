//! Every kind of bad input gets an error that names the problem and a non-zero exit, never a
//! panic: broken checkpoints (missing, truncated, lying header, missing tensor, wrong shape,
//! unsupported dtype), a malformed or unsupported config, and bad prompts.

mod common;

use common::*;
use std::path::Path;

fn logits(dir: &Path, ids: &str) -> Output {
    moe(&["logits", "--model", dir.to_str().expect("utf8"), "--token-ids", ids, "--json"])
}

/// A copy of the mixtral fixture whose safetensors file is rewritten by `edit`.
fn broken_checkpoint(edit: impl FnOnce(&mut Vec<(String, String, Vec<usize>, Vec<u8>)>)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tmp");
    copy_fixture("mixtral", tmp.path());
    let path = tmp.path().join("model.safetensors");
    let mut tensors = RawSafetensors::read(&path).all();
    edit(&mut tensors);
    RawSafetensors::from_tensors(&tensors).write(&path);
    tmp
}

const GATE: &str = "model.layers.1.block_sparse_moe.gate.weight";

#[test]
fn missing_safetensors_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::copy(fixture("mixtral").join("config.json"), tmp.path().join("config.json")).expect("copy");
    logits(tmp.path(), "1,2").assert_error(&["model.safetensors", "no model.safetensors"]);
}

#[test]
fn missing_shard_named_by_index() {
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::copy(fixture("mixtral").join("config.json"), tmp.path().join("config.json")).expect("copy");
    let index = serde_json::json!({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}});
    std::fs::write(tmp.path().join("model.safetensors.index.json"), index.to_string()).expect("write");
    logits(tmp.path(), "1").assert_error(&["model-00001-of-00002.safetensors"]);
}

#[test]
fn truncated_safetensors_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    copy_fixture("mixtral", tmp.path());
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).expect("truncate");
    logits(tmp.path(), "1,2").assert_error(&["model.safetensors", "truncated"]);
    std::fs::write(&path, &bytes[..5]).expect("truncate");
    logits(tmp.path(), "1,2").assert_error(&["model.safetensors", "too short"]);
}

#[test]
fn header_that_lies_about_sizes() {
    let tmp = tempfile::tempdir().expect("tmp");
    copy_fixture("mixtral", tmp.path());
    let path = tmp.path().join("model.safetensors");
    let mut st = RawSafetensors::read(&path);
    // Claim a bigger shape than the bytes the offsets cover.
    st.header[GATE]["shape"] = serde_json::json!([5, 64]);
    st.write(&path);
    logits(tmp.path(), "1").assert_error(&["model.safetensors", GATE, "[5, 64]", "span"]);
}

#[test]
fn missing_tensor() {
    let tmp = broken_checkpoint(|t| t.retain(|x| x.0 != GATE));
    logits(tmp.path(), "1").assert_error(&[GATE, "missing"]);
}

#[test]
fn tensor_of_the_wrong_shape() {
    let tmp = broken_checkpoint(|t| {
        for x in t.iter_mut().filter(|x| x.0 == GATE) {
            x.2 = vec![64, 4];
        }
    });
    logits(tmp.path(), "1").assert_error(&[GATE, "[64, 4]", "[4, 64]"]);
}

#[test]
fn unsupported_dtype() {
    let tmp = broken_checkpoint(|t| {
        for x in t.iter_mut().filter(|x| x.0 == GATE) {
            x.1 = "I32".into();
        }
    });
    logits(tmp.path(), "1").assert_error(&[GATE, "I32", "not supported"]);
}

#[test]
fn malformed_and_unsupported_configs() {
    let tmp = tempfile::tempdir().expect("tmp");
    copy_fixture("mixtral", tmp.path());
    let cfg = tmp.path().join("config.json");
    std::fs::write(&cfg, "{\"architectures\": [\"MixtralForCausalLM\",").expect("write");
    logits(tmp.path(), "1").assert_error(&["config.json", "JSON"]);

    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("mixtral").join("config.json")).expect("read"))
            .expect("json");
    let mut v = original.clone();
    v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(&cfg, v.to_string()).expect("write");
    logits(tmp.path(), "1").assert_error(&[
        "GPT2LMHeadModel",
        "MixtralForCausalLM",
        "Qwen2MoeForCausalLM",
        "OlmoeForCausalLM",
    ]);

    let mut v = original.clone();
    v["num_attention_heads"] = serde_json::json!("four");
    std::fs::write(&cfg, v.to_string()).expect("write");
    logits(tmp.path(), "1").assert_error(&["config.json", "num_attention_heads"]);

    let mut v = original;
    v.as_object_mut().expect("obj").remove("hidden_size");
    std::fs::write(&cfg, v.to_string()).expect("write");
    logits(tmp.path(), "1").assert_error(&["hidden_size", "missing"]);
}

#[test]
fn token_id_out_of_vocabulary() {
    logits(&fixture("mixtral"), "1,128").assert_error(&["128", "vocab_size is 128"]);
    let dir = fixture("olmoe");
    moe(&["generate", "--model", dir.to_str().expect("utf8"), "--token-ids", "5,999"]).assert_error(&["999"]);
}

#[test]
fn empty_prompt() {
    logits(&fixture("mixtral"), "").assert_error(&["empty"]);
    moe(&["generate", "--demo", "--prompt", ""]).assert_error(&["empty"]);
}

#[test]
fn prompt_longer_than_context() {
    let ids = ids_arg(&vec![3u32; 97]);
    logits(&fixture("qwen2_moe"), &ids).assert_error(&["97", "max_position_embeddings = 96"]);
    let dir = fixture("qwen2_moe");
    moe(&["generate", "--model", dir.to_str().expect("utf8"), "--token-ids", &ids])
        .assert_error(&["max_position_embeddings"]);
}

#[test]
fn text_prompt_without_tokenizer() {
    let dir = fixture("mixtral");
    moe(&["generate", "--model", dir.to_str().expect("utf8"), "--prompt", "hi"]).assert_error(&["tokenizer.json"]);
}

#[test]
fn malformed_flags() {
    logits(&fixture("mixtral"), "1,x").assert_error(&["\"x\" is not a token id"]);
    moe(&["generate", "--demo", "--prompt", "a", "--top-p", "0"]).assert_error(&["top_p"]);
    moe(&["generate", "--demo", "--prompt", "a", "--temperature=-1"]).assert_error(&["temperature"]);
    let missing = moe(&["logits", "--model", "/nonexistent/model", "--token-ids", "1"]);
    missing.assert_error(&["/nonexistent/model"]);
}
