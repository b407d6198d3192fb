//! Every CUDA kernel compiles with NVRTC (built with `--features cuda`; no GPU needed), for the
//! H100/H200 architecture and for sm_80, and a compile error names the kernel file and line.
//! NVRTC comes from the pip wheel `nvidia-cuda-nvrtc` (found through python3) or from
//! MOE_NVRTC_LIB_DIR. Skips with a note when it is missing, unless MOE_REQUIRE_NVRTC is set (as
//! .ci/run does).

mod common;

use common::moe;
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
    assert!(files.len() >= 9, "{files:?}");
    for arch in ["compute_90", "compute_80"] {
        let Some(out) = moe_with_nvrtc(&["kernels", "compile", "--arch", arch]) else { return };
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{arch}: {}{}", stdout, String::from_utf8_lossy(&out.stderr));
        for f in &files {
            assert!(stdout.lines().any(|l| l.starts_with(f.as_str())), "{arch}: {f} not compiled:\n{stdout}");
        }
    }
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
