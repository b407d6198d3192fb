//! A 60-second load at twice the admission limit with three tenants against `moe serve --demo`:
//! every request ends in exactly one terminal state (loadgen's check), the excess is shed with
//! RESOURCE_EXHAUSTED and nothing else fails, and afterwards running and waiting requests, KV
//! pages, tenant permits and adapter pins are all back to zero on `/metrics`, and every page the
//! prefix cache kept is evictable. And a short loadgen run with adapters, streams and
//! too-short deadlines: still one terminal state each.

mod common;

use common::*;

const KEYS: [&str; 3] = ["tenant-one-key-0123456789", "tenant-two-key-0123456789", "tenant-three-key-012345"];

fn gauge(text: &str, name: &str) -> Vec<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect()
}

#[test]
fn sixty_seconds_at_twice_the_admission_limit_with_three_tenants() {
    let secs = std::env::var("MOE_LOAD_TEST_SECS").unwrap_or_else(|_| "60".into());
    let tmp = tempfile::tempdir().expect("tmp");
    let tenants = tmp.path().join("tenants.toml");
    let text: String = ["one", "two", "three"]
        .iter()
        .zip(KEYS)
        .map(|(n, k)| {
            format!("[[tenants]]\nname = \"{n}\"\napi_key = \"{k}\"\nadapters = [\"*\"]\nmax_concurrent = 2\n\n")
        })
        .collect();
    std::fs::write(&tenants, text).expect("write");
    // With tenants, /metrics is scraped on the metrics listener (the public one needs a key).
    let http = format!("127.0.0.1:{}", free_port());
    let server = spawn_server(&[
        "serve",
        "--demo",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        &http,
        "--tenants",
        tenants.to_str().expect("utf8"),
    ]);
    let pid = server.child.id().to_string();
    // Three tenants of 2 permits each: 6 admitted at once; 12 clients is twice that.
    let mut args = vec![
        "loadgen",
        "--endpoint",
        &server.addr,
        "--duration-secs",
        &secs,
        "--requests",
        "1000000",
        "--concurrency",
        "12",
        "--max-new-tokens",
        "12",
        "--prompt-len",
        "2-48",
        "--watch-pid",
        &pid,
        "--json",
    ];
    for k in KEYS {
        args.extend(["--api-key", k]);
    }
    for a in ["", "prose", "code", "attn"] {
        args.extend(["--adapter", a]);
    }
    let out = moe(&args);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let v = out.json();
    assert_eq!(v["violations"], serde_json::json!([]), "{v}");
    let outcomes = v["outcomes"].as_object().expect("outcomes");
    let count = |k: &str| outcomes.get(k).and_then(|n| n.as_u64()).unwrap_or(0);
    assert!(count("ok") > 0 && count("resource_exhausted") > 0, "{v}");
    assert_eq!(count("ok") + count("resource_exhausted"), v["requests"].as_u64().unwrap_or(0), "other outcomes: {v}");
    eprintln!("load: {v}");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let scrape = || {
        rt.block_on(async {
            reqwest::get(format!("http://{http}/metrics")).await.expect("scrape").text().await.expect("body")
        })
    };
    let mut last = String::new();
    eventually("counts back to baseline", 10, || {
        last = scrape();
        let zero = |name: &str| {
            let v = gauge(&last, name);
            !v.is_empty() && v.iter().all(|x| *x == 0.0)
        };
        zero("moe_running_requests")
            && zero("moe_queue_depth")
            && zero("moe_kv_cache_pages_used")
            && zero("moe_tenant_in_flight")
            && zero("moe_adapters_pinned")
    });
    assert_eq!(gauge(&last, "moe_tenant_in_flight").len(), 3, "{last}");
    // The prefix cache kept pages of the prompts, and no request holds any of them: every
    // cached page can be evicted.
    let cached = gauge(&last, "moe_prefix_cache_pages");
    assert!(cached.first().is_some_and(|c| *c > 0.0), "prefix cache kept nothing: {last}");
    assert_eq!(cached, gauge(&last, "moe_prefix_cache_evictable_pages"), "{last}");
}

/// `moe loadgen` against `moe serve --demo`: every request ends exactly once, with adapters and
/// streams mixed in; with a deadline too short to finish, the failures are DEADLINE_EXCEEDED and
/// still terminal (never a hang or a normal finish).
#[test]
fn loadgen_sees_exactly_one_terminal_state_per_request() {
    let server = spawn_server(&["serve", "--demo", "--listen", "127.0.0.1:0"]);
    let out = moe(&[
        "loadgen",
        "--endpoint",
        &server.addr,
        "--requests",
        "40",
        "--concurrency",
        "8",
        "--max-new-tokens",
        "8",
        "--prompt-len",
        "2-40",
        "--adapter",
        "",
        "--adapter",
        "prose",
        "--json",
    ]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let v = out.json();
    assert_eq!(v["outcomes"], serde_json::json!({"ok": 40}), "{v}");
    assert_eq!(v["violations"], serde_json::json!([]));
    assert!(v["tokens_per_s"].as_f64().unwrap_or(0.0) > 0.0);

    let out = moe(&[
        "loadgen",
        "--endpoint",
        &server.addr,
        "--requests",
        "12",
        "--concurrency",
        "4",
        "--max-new-tokens",
        "2000",
        "--timeout-ms",
        "30",
        "--stream-share",
        "1",
        "--json",
    ]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let v = out.json();
    assert_eq!(v["outcomes"]["deadline_exceeded"], 12, "{v}");
}
