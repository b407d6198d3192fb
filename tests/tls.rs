//! Mutual TLS between a router and its workers: with certificates from files (as Kubernetes
//! Secrets mount them), a router with a client certificate the worker's CA signed is served and
//! gives transformers' greedy tokens; a plaintext router, and a router whose client certificate
//! another CA signed, are refused at startup with an error naming the worker.

mod common;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use std::path::Path;

struct Pki {
    ca: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().expect("key");
        let ca = params.self_signed(&key).expect("ca").pem();
        Self { ca, issuer: Issuer::new(params, key) }
    }

    /// (certificate, key) PEM for `name`, signed by this CA.
    fn leaf(&self, name: &str) -> (String, String) {
        let params = CertificateParams::new(vec![name.to_string()]).expect("params");
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write pem");
    p.to_str().expect("utf8").to_string()
}

#[test]
fn mutual_tls_between_router_and_worker() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    let pki = Pki::new("moe test CA");
    let rogue = Pki::new("someone else");
    let (worker_cert, worker_key) = pki.leaf("localhost");
    let (router_cert, router_key) = pki.leaf("moe-router");
    let (rogue_cert, rogue_key) = rogue.leaf("moe-router");
    let ca = write(d, "ca.pem", &pki.ca);
    let (wc, wk) = (write(d, "worker.pem", &worker_cert), write(d, "worker.key", &worker_key));
    let (rc, rk) = (write(d, "router.pem", &router_cert), write(d, "router.key", &router_key));
    let (xc, xk) = (write(d, "rogue.pem", &rogue_cert), write(d, "rogue.key", &rogue_key));

    let dir = fixture("mixtral");
    let m = dir.to_str().expect("utf8");
    let worker = spawn_server(&[
        "worker",
        "--model",
        m,
        "--experts",
        "all",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        &wc,
        "--tls-key",
        &wk,
        "--tls-client-ca",
        &ca,
    ]);
    let router = spawn_server(&[
        "router",
        "--model",
        m,
        "--workers",
        &worker.addr,
        "--listen",
        "127.0.0.1:0",
        "--wire",
        "f32",
        "--worker-ca",
        &ca,
        "--worker-client-cert",
        &rc,
        "--worker-client-key",
        &rk,
        "--worker-tls-domain",
        "localhost",
    ]);
    let case = &expected("mixtral")["cases"][1];
    let want = u32s(&case["greedy_new_tokens"]);
    let ids = ids_arg(&u32s(&case["token_ids"]));
    let n = want.len().to_string();
    let out = moe(&["generate", "--endpoint", &router.addr, "--token-ids", &ids, "--max-new-tokens", &n, "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(u32s(&out.json()["token_ids"]), want, "greedy tokens through mutual TLS");

    // Plaintext to a TLS worker, and a client certificate from another CA: refused.
    for extra in [
        vec![],
        vec![
            "--worker-ca",
            ca.as_str(),
            "--worker-client-cert",
            xc.as_str(),
            "--worker-client-key",
            xk.as_str(),
            "--worker-tls-domain",
            "localhost",
        ],
        vec!["--worker-ca", ca.as_str(), "--worker-tls-domain", "localhost"],
    ] {
        let mut args = vec!["router", "--model", m, "--workers", worker.addr.as_str(), "--listen", "127.0.0.1:0"];
        args.extend(extra.iter().copied());
        let out = moe(&args);
        out.assert_error(&[worker.addr.as_str()]);
    }
}
