//! Every CUDA kernel compiles with NVRTC (built with `--features cuda`; no GPU needed), for the
//! H100/H200 architecture and for sm_80, and a compile error names the kernel file and line.
//! NVRTC comes from the pip wheel `nvidia-cuda-nvrtc` (found through python3) or from
//! MOE_NVRTC_LIB_DIR. Skips with a note when it is missing, unless MOE_REQUIRE_NVRTC is set (as
//! .ci/run does).

mod common;

use common::{all_archs, fixture, moe};
use std::path::PathBuf;
use std::process::Command;

/// A directory holding libnvrtc.so.*.
fn nvrtc_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("MOE_NVRTC_LIB_DIR") {
        return Some(PathBuf::from(d));
    }
    let out =
        Command::new("python3").args(["-c", "import nvidia, sys; print('\\n'.join(nvidia.__path__))"]).output().ok()?;
    let roots: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from).collect();
    let mut stack = roots;
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libnvrtc.so")) {
                return Some(dir);
            }
        }
    }
    None
}

fn moe_with_nvrtc(args: &[&str]) -> Option<std::process::Output> {
    let Some(dir) = nvrtc_dir() else {
        assert!(std::env::var_os("MOE_REQUIRE_NVRTC").is_none(), "NVRTC is required but was not found");
        eprintln!("note: skipping: no libnvrtc found (pip install nvidia-cuda-nvrtc)");
        return None;
    };
    let path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(old) => format!("{}:{old}", dir.display()),
        Err(_) => dir.display().to_string(),
    };
    Some(Command::new(env!("CARGO_BIN_EXE_moe")).args(args).env("LD_LIBRARY_PATH", path).output().expect("run moe"))
}

#[test]
fn every_kernel_compiles_with_nvrtc() {
    let list = Command::new(env!("CARGO_BIN_EXE_moe")).args(["kernels", "list"]).output().expect("list");
    let files: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    assert!(files.len() >= 12, "{files:?}");
    // PTX for two virtual architectures, and a cubin for the H100/H200's sm_90 as the CUDA
    // backend loads it (PTX from an NVRTC newer than the driver does not load).
    for arch in ["compute_90", "compute_80", "sm_90"] {
        let Some(out) = moe_with_nvrtc(&["kernels", "compile", "--arch", arch]) else { return };
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{arch}: {}{}", stdout, String::from_utf8_lossy(&out.stderr));
        for f in &files {
            assert!(stdout.lines().any(|l| l.starts_with(f.as_str())), "{arch}: {f} not compiled:\n{stdout}");
        }
        if arch == "sm_90" {
            // ptxas's report for every entry point: registers and no spills (a spill fails the compile).
            let entries: Vec<String> = String::from_utf8_lossy(&list.stdout)
                .lines()
                .flat_map(|l| {
                    l.split_whitespace().skip(1).map(|e| e.trim_end_matches(',').to_string()).collect::<Vec<_>>()
                })
                .collect();
            for e in &entries {
                let line = stdout
                    .lines()
                    .find(|l| l.trim_start().starts_with(&format!("{e}: ")))
                    .unwrap_or_else(|| panic!("no resources for {e}:\n{stdout}"));
                assert!(line.contains(" registers") && line.contains(" 0 B spill stores, 0 B spill loads"), "{line}");
            }
            assert!(
                entries.iter().any(|e| e == "grouped_gemm_tc_bf16") && entries.iter().any(|e| e == "flash_decode_bf16")
            );
        }
    }
}

/// With MOE_CUBIN_CACHE set, compiling for sm_90 leaves one cubin per kernel file in that
/// directory (what the GPU acceptance carries and every later process loads instead of
/// compiling again).
#[test]
fn compiled_cubins_are_kept_in_the_cache_directory() {
    let tmp = tempfile::tempdir().expect("tmp");
    let Some(dir) = nvrtc_dir() else {
        assert!(std::env::var_os("MOE_REQUIRE_NVRTC").is_none(), "NVRTC is required but was not found");
        return;
    };
    let out = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["kernels", "compile", "--arch", "sm_90"])
        .env("LD_LIBRARY_PATH", &dir)
        .env("MOE_CUBIN_CACHE", tmp.path())
        .output()
        .expect("run moe");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list = Command::new(env!("CARGO_BIN_EXE_moe")).args(["kernels", "list"]).output().expect("list");
    let files: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(|f| f.trim_end_matches(".cu").to_string()))
        .collect();
    let cached: Vec<String> = std::fs::read_dir(tmp.path())
        .expect("cache dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    for f in &files {
        let name = cached.iter().find(|c| c.starts_with(&format!("{f}-sm_90-")) && c.ends_with(".cubin"));
        let name = name.unwrap_or_else(|| panic!("{f} not cached: {cached:?}"));
        assert!(std::fs::metadata(tmp.path().join(name)).expect("file").len() > 1000);
    }
    assert_eq!(cached.len(), files.len(), "{cached:?}");
}

/// A kernel that spills registers fails `moe kernels compile --arch sm_90`, naming it.
#[test]
fn a_spilling_kernel_fails_the_compile() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("spills_f32.cu");
    // 96 values live at once under a 32-register limit (1024 threads, 2 blocks per SM).
    std::fs::write(
        &src,
        "extern \"C\" __global__ void __launch_bounds__(1024, 2) spills_f32(float* x, int n) {\n\
         float a[96];\n\
         #pragma unroll\n\
         for (int i = 0; i < 96; ++i) a[i] = x[i * n + threadIdx.x];\n\
         float s = 0;\n\
         #pragma unroll\n\
         for (int i = 0; i < 96; ++i) s += a[i] * a[95 - i] * x[i + 7];\n\
         x[threadIdx.x] = s;\n}\n",
    )
    .expect("write");
    let Some(out) = moe_with_nvrtc(&["kernels", "compile", "--arch", "sm_90", "--file", src.to_str().expect("utf8")])
    else {
        return;
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains("spill") && stderr.contains("spills_f32"), "{stderr}");
}

#[test]
fn a_compile_error_names_the_file_and_line() {
    let tmp = tempfile::tempdir().expect("tmp");
    let bad = tmp.path().join("broken_f32.cu");
    std::fs::write(
        &bad,
        "// fine\nextern \"C\" __global__ void broken_f32(float* x) {\n    x[0] = undefined_name;\n}\n",
    )
    .expect("write");
    let Some(out) = moe_with_nvrtc(&["kernels", "compile", "--file", bad.to_str().expect("utf8")]) else { return };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("broken_f32.cu(3)") && stderr.contains("undefined_name"), "{stderr}");
}

/// `moe kernels check` on a machine without a GPU (this one, CI) is a clear error, never a
/// panic; where a GPU is present it runs the quick check and must pass.
#[test]
fn kernel_check_without_a_gpu_is_a_clear_error() {
    let out = moe(&["kernels", "check", "--quick", "--iters", "1"]);
    if out.code == 0 {
        assert!(out.stdout.contains("grouped_gemm_bf16"), "{}", out.stdout);
        return;
    }
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert!(out.stderr.contains("CUDA"), "{}", out.stderr);
    let out = moe(&["kernels", "check", "--iters", "0"]);
    assert_ne!(out.code, 0);
}

/// The fixture check the GPU acceptance runs (step 3), here on the CPU backend: every
/// architecture and PEFT adapter within 1e-4 of transformers, and a device that cannot be
/// opened is a clear error.
#[test]
fn fixture_check_runs_every_architecture_and_adapter() {
    let out = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["kernels", "fixtures", "--dir", "tests/fixtures", "--bound", "1e-4"])
        .current_dir(env!("CARGO_MANIFEST_DIR").to_string() + "/../..")
        .output()
        .expect("run moe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let extra = ["mixtral_bf16", "deepseek_v3_fp8", "gpt_oss_mxfp4", "deepseek_v3_lite"];
    for arch in all_archs().chain(extra) {
        assert!(stdout.contains(&format!("| {arch} | - |")), "{arch} missing:\n{stdout}");
    }
    for adapter in ["gate", "attn", "experts"] {
        let made = all_archs().filter(|a| fixture(a).join("peft").join(adapter).is_dir()).count();
        assert!(made >= 6, "{adapter}: {made} fixtures");
        assert_eq!(stdout.matches(&format!("| peft/{adapter} |")).count(), made, "{adapter}:\n{stdout}");
    }
    // A bound nothing can meet fails, naming the fixtures.
    let strict = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["kernels", "fixtures", "--dir", "tests/fixtures", "--bound", "0"])
        .current_dir(env!("CARGO_MANIFEST_DIR").to_string() + "/../..")
        .output()
        .expect("run moe");
    assert!(!strict.status.success());
    assert!(String::from_utf8_lossy(&strict.stderr).contains("outside the bound"));
    let gpu = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["--device", "cuda:0", "kernels", "fixtures", "--dir", "tests/fixtures"])
        .current_dir(env!("CARGO_MANIFEST_DIR").to_string() + "/../..")
        .env("LD_LIBRARY_PATH", "/nonexistent")
        .output()
        .expect("run moe");
    assert!(!gpu.status.success());
    assert!(String::from_utf8_lossy(&gpu.stderr).contains("cuda:0"), "{}", String::from_utf8_lossy(&gpu.stderr));
}

/// `moe bench-device` (step 5 of the GPU acceptance) on small shapes on the CPU: every row is
/// produced, and a bad --expert-gemm is refused.
#[test]
fn bench_device_reports_prefill_decode_and_experts() {
    let out = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["bench-device", "--layers", "1", "--hidden", "128", "--intermediate", "256", "--vocab", "300"])
        .args(["--batches", "1,3", "--prefill", "32", "--steps", "2"])
        .output()
        .expect("run moe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for row in ["| prefill 32 tokens |", "| decode batch 1 ", "| decode batch 3 ", "| expert FFN, 4096 tokens"] {
        assert!(stdout.contains(row), "{row} missing:\n{stdout}");
    }
    // The CPU backend is batch-invariant: the row says so (on a GPU it is measured both ways).
    assert!(
        stdout.contains("| batch invariance: a prompt alone vs 18th of 64 |") && stdout.contains("| bitwise equal |"),
        "{stdout}"
    );
    // Qwen3-30B-A3B's shape: 128 experts top-8 (no 8-expert FFN row).
    let qwen = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["bench-device", "--shape", "qwen3-moe", "--layers", "1", "--hidden", "256", "--intermediate", "64"])
        .args(["--vocab", "300", "--batches", "2", "--prefill", "16", "--steps", "1"])
        .output()
        .expect("run moe");
    let stdout = String::from_utf8_lossy(&qwen.stdout);
    assert!(qwen.status.success(), "{stdout}{}", String::from_utf8_lossy(&qwen.stderr));
    assert!(stdout.contains("128 experts x 64 top-8") && stdout.contains("| decode batch 2 "), "{stdout}");
    let bad = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["--expert-gemm", "fast", "bench-device"])
        .output()
        .expect("run moe");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expert-gemm"));
    // The GPU modes are accepted everywhere (the CPU backend ignores them) and checked by name.
    let modes = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["--expert-gemm", "tc", "--cuda-attention", "flash", "--deterministic", "bench-device"])
        .args(["--layers", "1", "--hidden", "128", "--intermediate", "64", "--vocab", "100", "--batches", "1"])
        .args(["--prefill", "8", "--steps", "1"])
        .output()
        .expect("run moe");
    assert!(modes.status.success(), "{}", String::from_utf8_lossy(&modes.stderr));
    let bad = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["--cuda-attention", "fast", "bench-device"])
        .env("MOE_CUDA_ATTENTION", "")
        .output()
        .expect("run moe");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cuda-attention"));
}
