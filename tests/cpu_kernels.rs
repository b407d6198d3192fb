//! The CPU kernel sets (`--cpu-kernels`): every set this machine runs gives the same logits bit
//! for bit on every architecture's fixture (so the parity and determinism tests, which run with
//! `auto`, hold for each set) and stays within 1e-4 of transformers; a set the machine cannot
//! run, or an unknown name, is refused with a message and a non-zero exit. Sets this machine
//! cannot run are named on stderr (an AVX2-only machine runs avx2 and portable).

mod common;

use common::*;
use moe_compute::cpu::CpuKernels;

/// The logits of `ids` computed with the kernel set `set`; checks from the start-up log that
/// the set was the one used.
fn logits(dir: &std::path::Path, ids: &[u32], set: &str) -> Vec<Vec<f32>> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["--log-format", "json", "logits", "--cpu-kernels", set, "--model", dir.to_str().expect("utf8")])
        .args(["--token-ids", &ids_arg(ids), "--json"])
        .env("MOE_LOG", "moe_cluster=info")
        .env_remove("MOE_MODEL")
        .output()
        .expect("run moe");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "--cpu-kernels {set}: {stderr}");
    let chosen = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["fields"]["cpu_kernels"].as_str().map(String::from));
    assert_eq!(chosen.as_deref(), Some(set), "the start-up log names the set: {stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON logits");
    matrix(&json["logits"])
}

#[test]
fn every_kernel_set_gives_the_same_bits_on_every_architecture() {
    let sets: Vec<&str> = CpuKernels::all_available().iter().map(|k| k.name()).collect();
    let missing: Vec<&str> = [CpuKernels::Avx512, CpuKernels::Avx2, CpuKernels::Neon]
        .iter()
        .filter(|k| !k.available())
        .map(|k| k.name())
        .collect();
    eprintln!("kernel sets compared here: {}; not on this CPU: {}", sets.join(", "), missing.join(", "));
    assert!(sets.contains(&"portable"));
    for arch in all_archs().chain(["gpt_oss_mxfp4", "deepseek_v3_lite"]) {
        let dir = fixture(arch);
        let want = expected(arch);
        // The longest prompt crosses KV pages and runs the tiled prefill attention.
        let case = want["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .max_by_key(|c| c["token_ids"].as_array().map_or(0, |a| a.len()))
            .expect("a case");
        let ids = u32s(&case["token_ids"]);
        let reference = matrix(&case["logits"]);
        let first = logits(&dir, &ids, sets[0]);
        for set in &sets {
            let got = logits(&dir, &ids, set);
            let err = rel_err(&got, &reference);
            assert!(err < 1e-4, "{arch} with {set}: relative error {err} against transformers");
            let bits = |m: &[Vec<f32>]| m.iter().flatten().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert!(bits(&got) == bits(&first), "{arch}: {set} gives other bits than {}", sets[0]);
        }
    }
}

#[test]
fn unknown_and_unavailable_sets_are_refused() {
    let dir = fixture("mixtral");
    let out = moe(&["logits", "--cpu-kernels", "sse9", "--model", dir.to_str().expect("utf8"), "--token-ids", "1,2"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("one of auto, avx512, avx2, neon, portable"), "{}", out.stderr);
    for k in [CpuKernels::Avx512, CpuKernels::Avx2, CpuKernels::Neon] {
        let out =
            moe(&["logits", "--cpu-kernels", k.name(), "--model", dir.to_str().expect("utf8"), "--token-ids", "1,2"]);
        if k.available() {
            assert_eq!(out.code, 0, "{}", out.stderr);
        } else {
            assert_ne!(out.code, 0, "{} accepted on a CPU without it", k.name());
            assert!(out.stderr.contains("this CPU cannot run it"), "{}", out.stderr);
        }
    }
}
