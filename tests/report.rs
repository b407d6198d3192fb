//! `moe bench --report DIR`, `moe bench-placement --report DIR` and `moe loadgen --report DIR`
//! write a self-contained report.html that a browser draws: here the bench report of a canned run (with a peer's
//! figures from `peers.json`, as `benches/hf_compare.py --report DIR` leaves them) is drawn again
//! with `--from-json`, and headless Chromium loads it: every chart gets a size (the page's own
//! script counts them into `data-rendered`), no script error is logged, and a screenshot of the
//! page is a real picture, not a blank one. Chromium comes from the `chromium` package (.ci/run
//! installs it); without it the browser part is skipped unless MOE_REQUIRE_CHROMIUM is set.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn chromium() -> Option<PathBuf> {
    let candidates = [std::env::var("MOE_CHROMIUM").unwrap_or_default(), "/usr/bin/chromium".into()];
    let found = candidates.iter().map(PathBuf::from).find(|p| p.is_file());
    if found.is_none() {
        assert!(std::env::var_os("MOE_REQUIRE_CHROMIUM").is_none(), "MOE_REQUIRE_CHROMIUM is set but no chromium");
        eprintln!("skipping the browser check: no chromium (apt-get install chromium)");
    }
    found
}

/// Runs headless Chromium on `page` with `args`; (stdout, stderr).
fn headless(chrome: &Path, profile: &Path, page: &Path, args: &[&str]) -> (String, String) {
    let out = Command::new(chrome)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium runs");
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let be = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    (be(16), be(20))
}

fn canned_bench() -> serde_json::Value {
    let d = |b: u64, t: f64| {
        serde_json::json!({"batch": b, "new_tokens": 32, "tokens_per_s": t,
            "ttft_ms": {"median": 4.0 * b as f64, "p99": 7.0 * b as f64}, "itl_ms": {"median": 12.0, "p99": 19.0}})
    };
    serde_json::json!({
        "model": "/tmp/moe-bench-model-v0.1.0", "threads": 2, "commit": "0123456789ab",
        "ceilings": {"memory_copy_gbps": 9.8, "gemm_peak_gflops": 95.0, "expert_gflops": 60.0,
                     "bytes_per_decoded_token": 93_000_000, "flops_per_prefill_token": 1.5e8,
                     "decode_roofline_tokens_per_s": 105.0, "prefill_roofline_tokens_per_s": 633.0},
        "topologies": [
            {"name": "embedded (2 workers)", "prefill": {"prompt_tokens": 512, "tokens_per_s": 610.0, "ttft_ms": 840.0},
             "decode": [d(1, 66.0), d(16, 280.0), d(64, 440.0)]},
            {"name": "router + 2 worker processes", "prefill": {"prompt_tokens": 512, "tokens_per_s": 520.0, "ttft_ms": 985.0},
             "decode": [d(1, 48.0), d(16, 230.0), d(64, 390.0)]}
        ]
    })
}

#[test]
fn bench_report_renders_in_headless_chromium() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (json, dir) = (tmp.path().join("run.json"), tmp.path().join("report"));
    std::fs::write(&json, canned_bench().to_string()).expect("write");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let peers = serde_json::json!({"peers": [{"name": "transformers (PyTorch, f32)", "prefill_tokens_per_s": 240.0,
        "decode": [{"batch": 1, "tokens_per_s": 21.0}, {"batch": 16, "tokens_per_s": 150.0}]}]});
    std::fs::write(dir.join("peers.json"), peers.to_string()).expect("write");
    let out = moe(&["bench", "--from-json", json.to_str().expect("utf8"), "--report", dir.to_str().expect("utf8")]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let html = std::fs::read_to_string(dir.join("report.html")).expect("report.html");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).expect("report.json")).expect("json");
    assert_eq!(written["peers"][0]["name"], "transformers (PyTorch, f32)");
    assert_eq!(html.matches("<svg").count(), 4, "decode, prefill, TTFT and ITL charts");
    assert!(html.contains("transformers (PyTorch, f32)") && html.contains("roofline"));
    assert!(!html.contains("src=") && !html.contains("<link"), "the page loads nothing else");

    let Some(chrome) = chromium() else { return };
    let page = dir.join("report.html");
    let (dom, log) = headless(&chrome, &tmp.path().join("p1"), &page, &["--dump-dom"]);
    assert!(
        dom.contains("data-charts=\"4\" data-rendered=\"4\""),
        "not every chart drew: {}",
        &dom[..dom.len().min(300)]
    );
    assert!(!log.contains("Uncaught"), "script errors: {log}");
    let shot = tmp.path().join("shot.png");
    let arg = format!("--screenshot={}", shot.display());
    headless(&chrome, &tmp.path().join("p2"), &page, &[&arg, "--window-size=900,2200"]);
    let png = std::fs::read(&shot).expect("screenshot");
    assert_eq!(png_size(&png), (900, 2200));
    // A blank 900x2200 page compresses to a few KB; four charts and a table do not.
    assert!(png.len() > 60_000, "the screenshot looks blank ({} bytes)", png.len());
}

/// `moe loadgen --report DIR` against `moe serve --demo`: the report keeps every latency and
/// draws their distribution, and the page renders.
#[test]
fn loadgen_report_keeps_the_latencies_and_renders() {
    let server = spawn_server(&["serve", "--demo", "--listen", "127.0.0.1:0"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("load");
    let out = moe(&[
        "loadgen",
        "--endpoint",
        &server.addr,
        "--requests",
        "12",
        "--concurrency",
        "3",
        "--max-new-tokens",
        "4",
        "--report",
        dir.to_str().expect("utf8"),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("loadgen: 12/12 requests"), "progress ends with the total: {}", out.stderr);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).expect("report.json")).expect("json");
    assert_eq!(json["samples"]["latency_ms"].as_array().map(Vec::len), Some(12));
    let page = dir.join("report.html");
    assert_eq!(std::fs::read_to_string(&page).expect("html").matches("<svg").count(), 1);
    let Some(chrome) = chromium() else { return };
    let (dom, log) = headless(&chrome, &tmp.path().join("p"), &page, &["--dump-dom"]);
    assert!(dom.contains("data-charts=\"1\" data-rendered=\"1\""), "{}", &dom[..dom.len().min(300)]);
    assert!(!log.contains("Uncaught"), "script errors: {log}");
}

#[test]
fn a_report_of_the_wrong_kind_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let json = tmp.path().join("x.json");
    std::fs::write(&json, "{\"hello\": 1}").expect("write");
    let out =
        moe(&["bench", "--from-json", json.to_str().expect("utf8"), "--report", tmp.path().to_str().expect("utf8")]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("not a `moe bench` report"), "{}", out.stderr);
    let out = moe(&["bench", "--from-json", "/nonexistent.json", "--report", tmp.path().to_str().expect("utf8")]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("/nonexistent.json"), "{}", out.stderr);
}
