//! Parity with Hugging Face transformers on the committed fixtures (see
//! tests/fixtures/make_fixtures.py): full logits of `moe logits` within 1e-4 relative for every
//! architecture and prompt (1 token up to 40, crossing several 16-token KV pages), greedy
//! generation token for token (local `moe generate` runs through the router's engine), greedy
//! generation with a repetition penalty and stop strings equal to transformers' `generate` with
//! the same settings (tests/fixtures/make_generate_fixtures.py), bf16/f16 and sharded
//! checkpoints, and KV-cache decoding equal to recomputing the whole sequence.

mod common;

use common::*;
use moe_compute::cpu::CpuBackend;
use moe_model::{BatchItem, LogitsFor, Model, SequenceCache};

const TOL: f32 = 1e-4;

fn check_logits(dir: &std::path::Path, expected: &serde_json::Value, key: &str, tol: f32) {
    for case in expected["cases"].as_array().expect("cases") {
        let ids = u32s(&case["token_ids"]);
        let out = moe(&["logits", "--model", dir.to_str().expect("utf8"), "--token-ids", &ids_arg(&ids), "--json"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let got = matrix(&out.json()["logits"]);
        let err = rel_err(&got, &matrix(&case[key]));
        assert!(err < tol, "{} prompt of {} tokens: relative error {err} >= {tol}", dir.display(), ids.len());
    }
}

#[test]
fn logits_match_transformers_for_all_architectures() {
    // deepseek_v3_fp8: block-scaled FP8 weights (partial edge blocks), dequantized at load;
    // deepseek_v3_lite: the V2-Lite form (one q_proj, rope not interleaved, no groups).
    for arch in all_archs().chain(["deepseek_v3_fp8", "gpt_oss_mxfp4", "deepseek_v3_lite"]) {
        check_logits(&fixture(arch), &expected(arch), "logits", TOL);
    }
}

#[test]
fn greedy_generation_matches_transformers_token_for_token() {
    for arch in all_archs().chain(["mixtral_bf16", "deepseek_v3_fp8", "gpt_oss_mxfp4", "deepseek_v3_lite"]) {
        let dir = fixture(arch);
        for case in expected(arch)["cases"].as_array().expect("cases") {
            let ids = u32s(&case["token_ids"]);
            let want = u32s(&case["greedy_new_tokens"]);
            let n = want.len().to_string();
            let out = moe(&[
                "generate",
                "--model",
                dir.to_str().expect("utf8"),
                "--token-ids",
                &ids_arg(&ids),
                "--max-new-tokens",
                &n,
                "--json",
            ]);
            assert_eq!(out.code, 0, "{}", out.stderr);
            let v = out.json();
            assert_eq!(u32s(&v["token_ids"]), want, "{arch}, prompt of {} tokens", ids.len());
            assert_eq!(v["finish_reason"], "length");
        }
    }
}

/// `moe generate --repetition-penalty R --stop S` (no server) equals transformers' `generate`
/// with `repetition_penalty=R, stop_strings=[S]`: the same tokens (the one completing the stop
/// string included), the text cut before the stop string, and the finish reason.
#[test]
fn generate_with_repetition_penalty_and_stop_strings_matches_transformers() {
    let fixtures = fixture("generate");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("expected.json")).expect("expected.json"))
            .expect("json");
    let tmp = tempfile::tempdir().expect("tmp");
    let cases = expected["cases"].as_array().expect("cases");
    assert!(cases.len() >= 8, "fixture cases");
    for case in cases {
        let arch = case["arch"].as_str().expect("arch");
        let dir = tmp.path().join(arch);
        if !dir.exists() {
            copy_fixture(arch, &dir);
            std::fs::copy(fixtures.join("tokenizer.json"), dir.join("tokenizer.json")).expect("tokenizer");
        }
        let n = case["max_new_tokens"].to_string();
        let ids = ids_arg(&u32s(&case["prompt"]));
        let mut args = vec!["generate", "--model", dir.to_str().expect("utf8"), "--token-ids", &ids];
        args.extend(["--max-new-tokens", &n, "--json"]);
        let penalty = case["repetition_penalty"].as_f64().map(|p| p.to_string());
        if let Some(p) = &penalty {
            args.extend(["--repetition-penalty", p]);
        }
        if let Some(stop) = case["stop"].as_str() {
            args.extend(["--stop", stop]);
        }
        let out = moe(&args);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let v = out.json();
        let what = format!("{arch}, penalty {penalty:?}, stop {:?}", case["stop"]);
        assert_eq!(u32s(&v["token_ids"]), u32s(&case["token_ids"]), "{what}");
        assert_eq!(v["text"], case["text"], "{what}");
        assert_eq!(v["finish_reason"], case["finish_reason"], "{what}");
    }
}

#[test]
fn bf16_checkpoint_within_bf16_tolerance() {
    let exp = expected("mixtral_bf16");
    // Same bf16 weights, transformers computing in f32: only accumulation order differs.
    check_logits(&fixture("mixtral_bf16"), &exp, "logits", TOL);
    // transformers computing in bf16 rounds every activation; we accumulate in f32.
    check_logits(&fixture("mixtral_bf16"), &exp, "bf16_logits", 5e-2);
}

#[test]
fn f16_and_sharded_checkpoints_load() {
    let tmp = tempfile::tempdir().expect("tmp");
    // f16: every f32 tensor converted; within f16 tolerance of the f32 reference.
    let f16_dir = tmp.path().join("f16");
    copy_fixture("qwen3_moe", &f16_dir);
    let st = RawSafetensors::read(&f16_dir.join("model.safetensors"));
    let converted: Vec<_> = st
        .all()
        .into_iter()
        .map(|(n, _, s, b)| {
            let halfs: Vec<u8> = b
                .chunks_exact(4)
                .flat_map(|c| half::f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
                .collect();
            (n, "F16".to_string(), s, halfs)
        })
        .collect();
    RawSafetensors::from_tensors(&converted).write(&f16_dir.join("model.safetensors"));
    check_logits(&f16_dir, &expected("qwen3_moe"), "logits", 2e-2);

    // Sharded: the tensors split over two files listed in model.safetensors.index.json.
    let sh_dir = tmp.path().join("sharded");
    copy_fixture("olmoe", &sh_dir);
    let st = RawSafetensors::read(&sh_dir.join("model.safetensors"));
    std::fs::remove_file(sh_dir.join("model.safetensors")).expect("rm");
    let all = st.all();
    let (a, b) = all.split_at(all.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)] {
        RawSafetensors::from_tensors(part).write(&sh_dir.join(file));
        for t in part {
            map.insert(t.0.clone(), serde_json::json!(file));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(sh_dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
    check_logits(&sh_dir, &expected("olmoe"), "logits", TOL);
}

/// Decoding with the KV cache (prefill, then chunks and single tokens, small pages) gives the
/// same logits as one pass over the whole sequence, and two sequences batched together give the
/// same logits as each alone.
#[test]
fn kv_cache_decode_equals_full_recompute() {
    for arch in all_archs().chain(["deepseek_v3_lite"]) {
        let model = Model::load(&fixture(arch), CpuBackend::new()).expect("load");
        let vocab = model.config.vocab_size;
        let tokens = u32s(&expected(arch)["cases"][3]["token_ids"]);
        let mut ws = model.workspace();
        let mut kv = model.kv_cache(64, 4).expect("kv");
        let mut full = Vec::new();
        let mut cache = SequenceCache::default();
        model
            .forward(&mut ws, &mut kv, &mut [BatchItem::new(&tokens, &mut cache)], LogitsFor::All, &mut full)
            .expect("full pass");
        kv.pages.release(&mut cache);

        let mut inc = SequenceCache::default();
        let mut pos = 0;
        for step in [10usize, 7, 1, 1, 1, 5, 1, 14] {
            let chunk = &tokens[pos..pos + step];
            let mut logits = Vec::new();
            let mut batch = [BatchItem::new(chunk, &mut inc)];
            model.forward(&mut ws, &mut kv, &mut batch, LogitsFor::All, &mut logits).expect("step");
            let want: Vec<Vec<f32>> =
                full[pos * vocab..(pos + step) * vocab].chunks(vocab).map(|r| r.to_vec()).collect();
            let got: Vec<Vec<f32>> = logits.chunks(vocab).map(|r| r.to_vec()).collect();
            let err = rel_err(&got, &want);
            assert!(err < 1e-5, "{arch}: positions {pos}..{}: relative error {err}", pos + step);
            pos += step;
        }
        assert_eq!(pos, tokens.len());
        assert_eq!(inc.len, tokens.len());

        // Batch: a decode token of one sequence next to a prefill of another.
        let other = u32s(&expected(arch)["cases"][2]["token_ids"]);
        let mut solo = Vec::new();
        let mut c2 = SequenceCache::default();
        model
            .forward(&mut ws, &mut kv, &mut [BatchItem::new(&other, &mut c2)], LogitsFor::Last, &mut solo)
            .expect("solo");
        kv.pages.release(&mut c2);
        let mut c1 = SequenceCache::default();
        let mut ignore = Vec::new();
        model
            .forward(&mut ws, &mut kv, &mut [BatchItem::new(&tokens[..20], &mut c1)], LogitsFor::Last, &mut ignore)
            .expect("prefix");
        let mut both = Vec::new();
        let mut batch = [BatchItem::new(&tokens[20..21], &mut c1), BatchItem::new(&other, &mut c2)];
        model.forward(&mut ws, &mut kv, &mut batch, LogitsFor::Last, &mut both).expect("batched");
        let err0 = rel_err(&[both[..vocab].to_vec()], &[full[20 * vocab..21 * vocab].to_vec()]);
        let err1 = rel_err(&[both[vocab..].to_vec()], &[solo]);
        assert!(err0 < 1e-5 && err1 < 1e-5, "{arch}: batched vs alone: {err0}, {err1}");
    }
}
