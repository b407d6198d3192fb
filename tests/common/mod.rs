//! Helpers shared by the cross-crate tests: fixture paths, running the `moe` binary, comparing
//! logits, and reading/rewriting safetensors files byte by byte (to make broken checkpoints).
#![allow(dead_code)]

pub mod api;
#[allow(unused_imports)]
pub use api::{api_client, serve_api, Api};
pub mod etcd;
#[allow(unused_imports)]
pub use etcd::{Etcd, EtcdCluster};
pub mod relay;
pub mod router_client;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const ARCHS: [&str; 4] = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"];
/// The 2026 architectures (tests/fixtures/make_fixtures_2026.py): DeepSeek-V3 (latent attention,
/// YaRN, grouped sigmoid routing), GLM-4.5 (partial rotary, q/k norm, grouped sigmoid routing) and
/// gpt-oss (attention sinks, alternating sliding windows, biased clamped experts).
pub const ARCHS_2026: [&str; 4] = ["deepseek_v3", "glm4_moe", "gpt_oss", "qwen3_next"];

/// Every architecture with a transformers fixture.
pub fn all_archs() -> impl Iterator<Item = &'static str> {
    ARCHS.into_iter().chain(ARCHS_2026)
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

pub fn expected(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).expect("fixture expected.json");
    serde_json::from_str(&text).expect("expected.json is JSON")
}

/// A case's token ids as the CLI's comma list.
pub fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("int") as u32).collect()
}

pub fn matrix(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .expect("rows")
        .iter()
        .map(|r| r.as_array().expect("row").iter().map(|x| x.as_f64().expect("number") as f32).collect())
        .collect()
}

pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }

    /// Asserts a clean failure: non-zero exit, no panic, and every needle in stderr.
    pub fn assert_error(&self, needles: &[&str]) {
        assert_ne!(self.code, 0, "expected failure, got success: {}", self.stdout);
        assert!(!self.stderr.contains("panicked"), "panicked: {}", self.stderr);
        for n in needles {
            assert!(self.stderr.contains(n), "stderr lacks {n:?}: {}", self.stderr);
        }
    }
}

pub fn moe(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_moe")).args(args).env_remove("MOE_MODEL").output().expect("run moe");
    let o = Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!o.stderr.contains("panicked"), "moe {args:?} panicked: {}", o.stderr);
    o
}

/// Max |a - b| over max |b|.
pub fn rel_err(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    assert_eq!(got.len(), want.len(), "row count");
    let mut diff = 0f32;
    let mut scale = 0f32;
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.len(), w.len(), "row width");
        for (a, b) in g.iter().zip(w) {
            diff = diff.max((a - b).abs());
            scale = scale.max(b.abs());
        }
    }
    diff / scale.max(f32::MIN_POSITIVE)
}

/// Copies a fixture directory's files into `dst`.
pub fn copy_fixture(name: &str, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(fixture(name)).expect("fixture dir") {
        let e = e.expect("entry");
        if e.path().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy");
        }
    }
}

/// A safetensors file as its JSON header and data section.
pub struct RawSafetensors {
    pub header: serde_json::Map<String, Value>,
    pub data: Vec<u8>,
}

impl RawSafetensors {
    pub fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).expect("read safetensors");
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header json");
        Self { header: header.as_object().expect("object").clone(), data: bytes[8 + n..].to_vec() }
    }

    pub fn write(&self, path: &Path) {
        let mut h = serde_json::to_vec(&self.header).expect("json");
        while !(h.len() + 8).is_multiple_of(8) {
            h.push(b' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(&self.data);
        std::fs::write(path, out).expect("write safetensors");
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.header.keys().filter(|k| *k != "__metadata__").cloned().collect();
        n.sort();
        n
    }

    /// (dtype, shape, bytes) of one tensor.
    pub fn tensor(&self, name: &str) -> (String, Vec<usize>, Vec<u8>) {
        let info = &self.header[name];
        let off = info["data_offsets"].as_array().expect("offsets");
        let (s, e) = (off[0].as_u64().expect("s") as usize, off[1].as_u64().expect("e") as usize);
        let shape =
            info["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().expect("dim") as usize).collect();
        (info["dtype"].as_str().expect("dtype").to_string(), shape, self.data[s..e].to_vec())
    }

    /// Builds a file from (name, dtype, shape, bytes) tensors.
    pub fn from_tensors(tensors: &[(String, String, Vec<usize>, Vec<u8>)]) -> Self {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            let start = data.len();
            data.extend(bytes);
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        Self { header, data }
    }

    pub fn all(&self) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
        self.names()
            .into_iter()
            .map(|n| {
                let (d, s, b) = self.tensor(&n);
                (n, d, s, b)
            })
            .collect()
    }
}

/// A `moe` child process (worker, router or server) that is killed when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts one `moe worker` on `model` per expert spec, and their addresses, comma separated.
pub fn spawn_workers(model: &str, specs: &[&str]) -> (Vec<Server>, String) {
    let workers: Vec<Server> = specs
        .iter()
        .map(|s| spawn_server(&["worker", "--model", model, "--experts", s, "--listen", "127.0.0.1:0"]))
        .collect();
    let addrs = workers.iter().map(|w| w.addr.clone()).collect::<Vec<_>>().join(",");
    (workers, addrs)
}

/// Starts `moe ARGS` and waits for its "listening on ADDR" line.
pub fn spawn_server(args: &[&str]) -> Server {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args)
        .env_remove("MOE_MODEL")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn moe");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("listening on ").nth(1) {
                let _ = tx.send(Ok(addr.trim().to_string()));
            } else if line.starts_with("error") {
                let _ = tx.send(Err(line));
            }
        }
    });
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(Ok(addr)) => Server { child, addr },
        Ok(Err(line)) => {
            let _ = child.kill();
            panic!("moe {args:?} failed: {line}")
        }
        Err(_) => {
            let _ = child.kill();
            panic!("moe {args:?} did not start listening")
        }
    }
}

/// A small random model with no end-of-sequence token and a long context, so that generation
/// runs as long as a test needs.
pub fn endless_model(dir: &Path) {
    endless_model_sized(dir, 64, 2);
}

/// [`endless_model`] with a chosen hidden size and layer count (slower models for tests that
/// need generation to outlast something).
pub fn endless_model_sized(dir: &Path, hidden_size: usize, num_layers: usize) {
    let spec = moe_demo::DemoSpec {
        hidden_size,
        num_layers,
        num_heads: 4,
        num_kv_heads: 2,
        intermediate_size: 64,
        vocab_size: 300,
        max_position_embeddings: 4096,
        ..moe_demo::DemoSpec::demo()
    };
    moe_demo::write_demo_model(dir, &spec).expect("demo model");
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    cfg["eos_token_id"] = serde_json::Value::Null;
    std::fs::write(&path, cfg.to_string()).expect("write");
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Sends SIGTERM to a child process.
pub fn sigterm(child: &std::process::Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
}

/// Polls `cond` every 50 ms for up to `secs` seconds.
pub fn eventually(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < std::time::Duration::from_secs(secs), "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Every expert of 8 has two holders among three workers; worker 0 holds the most.
pub const REPLICATED_SPECS: [&str; 3] = ["*:0-5", "*:4-7,*:0-1", "*:2-3,*:6-7"];

/// Runs 16 concurrent greedy generations of 200 tokens on `engine`, kills `workers[0]`
/// (SIGKILL) once every stream has produced tokens, and checks that every generation completes
/// equal, token for token, to the single-process model's.
pub fn generations_survive_a_kill(engine: &moe_router::Engine, dir: &Path, workers: &mut [Option<Server>]) {
    use moe_router::{Event, GenerationParams, PromptInput, ValidatedRequest};
    let n_new = 200usize;
    let prompts: Vec<Vec<u32>> =
        (0..16u32).map(|i| (0..(3 + i % 7)).map(|j| (i * 37 + j * 11) % 300).collect()).collect();
    let mut streams = Vec::new();
    for p in &prompts {
        let params = GenerationParams { max_new_tokens: Some(n_new as u32), ..Default::default() };
        let req = ValidatedRequest::new(
            PromptInput::Ids(p.clone()),
            &params,
            engine.codec(),
            engine.model_config(),
            std::time::Duration::from_secs(120),
        )
        .expect("valid");
        streams.push(engine.submit(req).expect("submit").1);
    }
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); streams.len()];
    for (s, g) in streams.iter_mut().zip(got.iter_mut()) {
        while g.len() < 5 {
            match s.blocking_recv() {
                Some(Event::Delta { token_ids, .. }) => g.extend(token_ids),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    workers[0] = None;
    for (i, (s, g)) in streams.iter_mut().zip(got.iter_mut()).enumerate() {
        loop {
            match s.blocking_recv() {
                Some(Event::Delta { token_ids, .. }) => g.extend(token_ids),
                Some(Event::Finished { .. }) => break,
                Some(Event::Failed(e)) => panic!("request {i} failed after the kill: {e}"),
                None => panic!("request {i}: no terminal event"),
            }
        }
        assert!(g.len() == n_new, "request {i} finished early");
    }
    for (i, (p, g)) in prompts.iter().zip(&got).enumerate() {
        assert_eq!(g, &solo_greedy(dir, p, n_new), "request {i} differs from the run without failure");
    }
}

/// Writes a random PEFT adapter for the model in `model_dir` to `out`. `targets` names what to
/// adapt on every layer where it exists: `q`, `k`, `v`, `o`, `gate` (the MoE router linear) and
/// `experts` (every routed expert's three projections).
pub fn write_random_adapter(model_dir: &Path, out: &Path, targets: &[&str], rank: usize, seed: u64) {
    let c = moe_model::ModelConfig::from_dir(model_dir).expect("config");
    let (h, qw, kw) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rand = |n: usize, scale: f32| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (((state >> 11) % 20001) as f32 / 10000.0 - 1.0) * scale
                }
                .to_le_bytes()
            })
            .collect()
    };
    let mut modules: Vec<(String, usize, usize)> = Vec::new();
    let prefix = c.architecture.moe_prefix();
    let (g, u, d) = match c.architecture {
        moe_model::Architecture::Mixtral => ("w1", "w3", "w2"),
        _ => ("gate_proj", "up_proj", "down_proj"),
    };
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        for t in targets {
            match *t {
                "q" => modules.push((format!("{p}.self_attn.q_proj"), h, qw)),
                "k" => modules.push((format!("{p}.self_attn.k_proj"), h, kw)),
                "v" => modules.push((format!("{p}.self_attn.v_proj"), h, kw)),
                "o" => modules.push((format!("{p}.self_attn.o_proj"), qw, h)),
                "gate" if c.is_moe_layer(l) => modules.push((format!("{p}.{prefix}.gate"), h, c.num_experts)),
                "experts" if c.is_moe_layer(l) => {
                    let i = c.expert_intermediate_size;
                    for e in 0..c.num_experts {
                        modules.push((format!("{p}.{prefix}.experts.{e}.{g}"), h, i));
                        modules.push((format!("{p}.{prefix}.experts.{e}.{u}"), h, i));
                        modules.push((format!("{p}.{prefix}.experts.{e}.{d}"), i, h));
                    }
                }
                _ => {}
            }
        }
    }
    let mut tensors = Vec::new();
    for (m, inp, outp) in modules {
        let a_scale = 2.0 / (inp as f32).sqrt();
        tensors.push((
            format!("base_model.model.{m}.lora_A.weight"),
            "F32".into(),
            vec![rank, inp],
            rand(rank * inp, a_scale),
        ));
        tensors.push((
            format!("base_model.model.{m}.lora_B.weight"),
            "F32".into(),
            vec![outp, rank],
            rand(outp * rank, 0.5),
        ));
    }
    std::fs::create_dir_all(out).expect("mkdir adapter");
    RawSafetensors::from_tensors(&tensors).write(&out.join("adapter_model.safetensors"));
    let cfg = serde_json::json!({"peft_type": "LORA", "r": rank, "lora_alpha": rank, "bias": "none"});
    std::fs::write(out.join("adapter_config.json"), cfg.to_string()).expect("write adapter config");
}

/// The tokens of one request generated alone by a local engine on the whole model (its own
/// experts, the prompt in one prefill chunk): the reference that served generation must equal.
/// `adapter_dir` serves `params.adapter_id`. Runs on a thread of its own (it blocks).
pub fn solo_generate(
    model_dir: &Path,
    prompt: &[u32],
    params: moe_router::GenerationParams,
    adapter_dir: Option<&Path>,
) -> Vec<u32> {
    let (dir, prompt, adapter_dir) = (model_dir.to_path_buf(), prompt.to_vec(), adapter_dir.map(Path::to_path_buf));
    std::thread::spawn(move || {
        use moe_router::{EngineConfig, Event, PromptInput, ValidatedRequest};
        let cfg = EngineConfig { max_batch_tokens: prompt.len().max(1), max_running: 1, ..Default::default() };
        let adapters = moe_cluster::AdapterOptions { dir: adapter_dir, ..Default::default() };
        let engine = moe_cluster::local_engine(moe_compute::Device::Cpu, &dir, cfg, &adapters).expect("local engine");
        let timeout = std::time::Duration::from_secs(600);
        let mut req =
            ValidatedRequest::new(PromptInput::Ids(prompt), &params, engine.codec(), engine.model_config(), timeout)
                .expect("valid request");
        if !params.adapter_id.is_empty() {
            let registry = engine.adapters().expect("adapters");
            req.adapter = Some(registry.pin(&params.adapter_id).expect("adapter"));
        }
        let (_, mut events) = engine.submit(req).expect("submit");
        let mut got = Vec::new();
        loop {
            match events.blocking_recv() {
                Some(Event::Delta { token_ids, .. }) => got.extend(token_ids),
                Some(Event::Finished { .. }) => return got,
                Some(Event::Failed(e)) => panic!("solo generation failed: {e}"),
                None => panic!("solo generation: no terminal event"),
            }
        }
    })
    .join()
    .expect("solo generation thread")
}

/// [`solo_generate`], greedy, `n` new tokens.
pub fn solo_greedy(model_dir: &Path, prompt: &[u32], n: usize) -> Vec<u32> {
    let params = moe_router::GenerationParams { max_new_tokens: Some(n as u32), ..Default::default() };
    solo_generate(model_dir, prompt, params, None)
}

/// Full logits of one prompt (`vocab_size` per position) through `model`, its routed experts on
/// `experts` (or its own), with `adapter` (or none).
pub fn logits_with(
    model: &moe_model::Model<moe_compute::cpu::CpuBackend>,
    experts: Option<&dyn moe_model::ExpertExecutor<moe_compute::cpu::CpuBackend>>,
    adapter: Option<&moe_model::AdapterWeights<moe_compute::cpu::CpuBackend>>,
    ids: &[u32],
) -> Vec<Vec<f32>> {
    let mut ws = model.workspace();
    let mut kv = model.kv_cache(16, 16).expect("kv");
    let mut cache = moe_model::SequenceCache::default();
    let mut out = Vec::new();
    let mut batch = [moe_model::BatchItem::new(ids, &mut cache).with_adapter(adapter)];
    model.forward_with(&mut ws, &mut kv, &mut batch, moe_model::LogitsFor::All, &mut out, experts).expect("forward");
    out.chunks(model.config.vocab_size).map(|r| r.to_vec()).collect()
}
