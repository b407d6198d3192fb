//! A router process's end, however it comes, ends every open stream with a status, never a hang
//! or a clean end that passes for a finish. Engine supervision: a panic in the compute loop
//! (injected with the hidden `--fault-panic-after-steps` flag) must not leave a zombie that
//! reports SERVING: the open stream ends with INTERNAL naming the failure, health reads
//! NOT_SERVING, a new request is refused with UNAVAILABLE, and `moe serve` exits non-zero (so
//! Kubernetes restarts it). A router killed (SIGKILL) or stopped (SIGTERM) mid-stream likewise.

mod common;

use common::router_client::request;
use common::*;
use moe_proto::v1::generate_stream_response::Event as StreamEvent;
use moe_proto::v1::{GenerateRequest, SamplingParams};
use std::time::{Duration, Instant};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn short(max_new: u32) -> GenerateRequest {
    request(vec![1, 2, 3], SamplingParams { max_new_tokens: Some(max_new), ..Default::default() })
}

#[test]
fn a_panicking_compute_loop_fails_requests_goes_not_serving_and_exits_non_zero() {
    let mut server = spawn_server(&["serve", "--demo", "--listen", "127.0.0.1:0", "--fault-panic-after-steps", "5"]);
    let addr = format!("http://{}", server.addr);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let channel =
            tonic::transport::Endpoint::from_shared(addr.clone()).expect("uri").connect().await.expect("connect");
        let mut health = HealthClient::new(channel);
        let check = HealthCheckRequest { service: "moe.v1.Inference".into() };
        let serving = health.check(check.clone()).await.expect("health").into_inner().status;
        assert_eq!(serving, ServingStatus::Serving as i32, "serving before the fault");

        // The open stream gets a few tokens, then INTERNAL naming the failure.
        let mut api = api_client(&addr).await;
        let mut stream = api.generate_stream(short(200)).await.expect("stream starts").into_inner();
        let mut tokens = 0;
        let status = loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    if let Some(StreamEvent::Delta(d)) = m.event {
                        tokens += d.token_ids.len();
                    }
                }
                Ok(None) => panic!("the stream ended without a status after {tokens} tokens"),
                Err(status) => break status,
            }
        };
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        assert!(status.message().contains("injected fault"), "the status names the failure: {status:?}");
        assert!((1..200).contains(&tokens), "{tokens} tokens before the fault");

        // Then: NOT_SERVING, and new requests are refused with UNAVAILABLE.
        // (The health service learns of the failure asynchronously: allow it a moment; the
        // process lives on for two seconds after the failure.)
        let mut status = ServingStatus::Serving as i32;
        for _ in 0..20 {
            status = health.check(check.clone()).await.expect("health").into_inner().status;
            if status == ServingStatus::NotServing as i32 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(status, ServingStatus::NotServing as i32, "health after the fault");
        let refused = api.generate(short(4)).await.expect_err("a failed engine takes no request");
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        assert!(refused.message().contains("engine has failed"), "{refused:?}");
    });
    // The process exits non-zero by itself.
    let started = Instant::now();
    let code = loop {
        if let Some(s) = server.child.try_wait().expect("wait") {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "moe serve did not exit after the engine failed");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!code.success(), "moe serve must exit non-zero after an engine failure, got {code:?}");
}

/// A router killed mid-stream: the client's stream ends with an error at once (never a clean
/// end that would pass for a finish, never a hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_killed_mid_stream_fails_the_stream_promptly() {
    let tmp = tempfile::tempdir().expect("tmp");
    endless_model(tmp.path());
    let server = spawn_server(&["serve", "--model", tmp.path().to_str().expect("utf8"), "--listen", "127.0.0.1:0"]);
    let mut c = api_client(&format!("http://{}", server.addr)).await;
    let long = request(vec![5, 6, 7], SamplingParams { max_new_tokens: Some(4000), ..Default::default() });
    let mut s = c.generate_stream(long).await.expect("stream").into_inner();
    assert!(s.message().await.expect("first").is_some());
    drop(server); // SIGKILL
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream must end within 5 s of the router dying");
    let err = ended.expect_err("a dead router must not look like a normal end of stream");
    assert!(matches!(err.code(), Code::Unavailable | Code::Unknown | Code::Internal), "{err:?}");
    eprintln!("stream ended with {:?}: {}", err.code(), err.message());
}

/// A router stopping (SIGTERM) mid-stream lets the stream run while it drains, then ends it with
/// UNAVAILABLE before its 5 s grace period runs out (never a cut connection or a hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_stopping_ends_open_streams_with_unavailable() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Big enough that 4000 tokens take longer than the drain.
    endless_model_sized(tmp.path(), 256, 4);
    let server = spawn_server(&["serve", "--model", tmp.path().to_str().expect("utf8"), "--listen", "127.0.0.1:0"]);
    let mut c = api_client(&format!("http://{}", server.addr)).await;
    let long = || request(vec![5, 6, 7], SamplingParams { max_new_tokens: Some(4000), ..Default::default() });
    let mut s = c.generate_stream(long()).await.expect("stream").into_inner();
    assert!(s.message().await.expect("first").is_some());
    let t0 = std::time::Instant::now();
    sigterm(&server.child);
    // While draining, new requests are refused: by the engine (UNAVAILABLE, "shutting down") or,
    // once the server has sent GOAWAY on this connection, by HTTP/2 itself.
    let mut refused = None;
    for _ in 0..50 {
        match c.generate(long()).await {
            Err(e) => {
                refused = Some(e);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let refused = refused.expect("a draining router must refuse new requests");
    // tonic reports a request refused by the server's GOAWAY as INTERNAL "h2 protocol error"
    // (GoAway, NO_ERROR): a transport-level refusal, which a client retries elsewhere.
    let by_goaway = refused.code() == Code::Internal && format!("{refused:?}").contains("GoAway");
    assert!(matches!(refused.code(), Code::Unavailable | Code::Unknown | Code::Cancelled) || by_goaway, "{refused:?}");
    let ended = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match s.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream must end before the grace period");
    let err = ended.expect_err("stopping must not look like a normal end of stream");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("shutting down"), "{}", err.message());
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
}
