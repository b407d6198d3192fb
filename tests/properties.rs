//! Property tests of everything that parses input from users or peers: for thousands of
//! generated and mutated inputs (a fixed seed, so a failure reproduces), the safetensors header
//! check, config.json, adapter_config.json, the tenants file, the wire row decoder, the worker's
//! message validation and compute, and request validation each return a value or an error, and
//! never panic. The same entry points are the `cargo fuzz` targets under fuzz/.

mod common;

use common::*;
use moe_proto::v1::WireDtype;
use std::path::Path;

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    /// A copy of `seed` with a few random byte edits, truncations or insertions.
    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..1 + self.below(8) {
            match self.below(4) {
                0 if !v.is_empty() => {
                    let i = self.below(v.len());
                    v[i] = self.next() as u8;
                }
                1 if !v.is_empty() => {
                    let n = self.below(v.len());
                    v.truncate(n);
                }
                2 => {
                    let i = self.below(v.len() + 1);
                    v.insert(i, self.next() as u8);
                }
                _ => {
                    let i = self.below(v.len() + 1);
                    let interesting = [b'"', b'{', b'}', b'[', b']', b',', b':', b'-', b'0', b'9', 0xff, 0];
                    v.insert(i, interesting[self.below(interesting.len())]);
                }
            }
        }
        v
    }
}

const CASES: usize = 3000;

#[test]
fn safetensors_header_check_never_panics() {
    let seed = std::fs::read(fixture("mixtral").join("adapters/gate/adapter_model.safetensors")).expect("fixture");
    let mut rng = Rng(1);
    assert!(moe_model::checkpoint::check_safetensors(&seed).is_ok());
    for _ in 0..CASES {
        // Mutate mostly the header (the first bytes), where the parser looks.
        let head = 8 + rng.below(600);
        let mut bytes = rng.mutate(&seed[..head.min(seed.len())]);
        bytes.extend_from_slice(&seed[head.min(seed.len())..]);
        let _ = moe_model::checkpoint::check_safetensors(&bytes);
    }
}

#[test]
fn config_and_adapter_and_tenant_parsers_never_panic() {
    let config = std::fs::read(fixture("qwen2_moe").join("config.json")).expect("config");
    let adapter = std::fs::read(fixture("olmoe").join("adapters/attn/adapter_config.json")).expect("adapter cfg");
    let tenants =
        b"[[tenants]]\nname = \"a\"\napi_key = \"0123456789abcdef\"\nadapters = [\"x\"]\nmax_concurrent = 2\n";
    let mut rng = Rng(2);
    for _ in 0..CASES {
        let c = String::from_utf8_lossy(&rng.mutate(&config)).to_string();
        let _ = moe_model::ModelConfig::parse(&c, Path::new("config.json"));
        let a = String::from_utf8_lossy(&rng.mutate(&adapter)).to_string();
        let _ = moe_lora::PeftConfig::parse(&a, Path::new("adapter_config.json"));
        let t = String::from_utf8_lossy(&rng.mutate(tenants)).to_string();
        let _ = moe_router::Tenants::parse(&t);
    }
}

#[test]
fn worker_message_decoding_validation_and_compute_never_panic() {
    use moe_worker::ExpertCompute;
    let spec = "0:0-1,1:2".parse().expect("spec");
    let host =
        moe_worker::ExpertHost::load(&fixture("mixtral"), &spec, moe_compute::cpu::CpuBackend::new()).expect("host");
    let mut rng = Rng(3);
    let mut out = Vec::new();
    let mut rows = Vec::new();
    for _ in 0..CASES {
        let n = rng.below(4);
        let hidden = [64usize, 64, 64, 32, 0][rng.below(5)];
        let dtype = if rng.below(2) == 0 { WireDtype::F32 } else { WireDtype::Bf16 };
        let values: Vec<f32> = (0..n * 64).map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0).collect();
        let bytes = rng.mutate(&moe_proto::wire::encode(&values, dtype));
        let _ = moe_proto::wire::decode_rows(&bytes, dtype, hidden, &mut rows);
        let row_pairs: Vec<u32> = (0..rng.below(5)).map(|_| rng.below(4) as u32).collect();
        let pairs: usize = row_pairs.iter().map(|&p| p as usize).sum::<usize>() + rng.below(2);
        let experts: Vec<u32> = (0..pairs).map(|_| rng.below(6) as u32).collect();
        let weights: Vec<f32> = (0..pairs).map(|_| [0.5, -1.0, f32::NAN, 1e30][rng.below(4)]).collect();
        let row_adapters: Vec<u32> = (0..rng.below(5)).map(|_| rng.below(3) as u32).collect();
        let input = moe_worker::ComputeInput {
            layer: rng.below(4),
            hidden_size: hidden,
            rows: &rows,
            row_pairs: &row_pairs,
            experts: &experts,
            weights: &weights,
            adapters: &[],
            row_adapters: &row_adapters,
        };
        let _ = host.compute(&input, &mut out);
    }
}

#[test]
fn request_validation_never_panics() {
    let dir = fixture("mixtral");
    let model = moe_model::Model::load(&dir, moe_compute::cpu::CpuBackend::new()).expect("model");
    let codec = moe_generate::TextCodec::from_dir(&dir).expect("codec");
    let mut rng = Rng(4);
    let floats = [0.0f32, 1.0, -1.0, 0.5, 2.0, f32::NAN, f32::INFINITY, -0.0, 1e-30, 1e30];
    for _ in 0..CASES {
        let ids: Vec<u32> = (0..rng.below(200)).map(|_| [0u32, 5, 127, 128, u32::MAX][rng.below(5)]).collect();
        let p = moe_router::GenerationParams {
            max_new_tokens: [None, Some(0), Some(1), Some(10_000), Some(u32::MAX)][rng.below(5)],
            temperature: Some(floats[rng.below(floats.len())]),
            top_k: Some([0, 1, -1, 50, i32::MAX, i32::MIN][rng.below(6)]),
            top_p: Some(floats[rng.below(floats.len())]),
            seed: Some(rng.next()),
            stop: (0..rng.below(3)).map(|_| "x".repeat(rng.below(300))).collect(),
            repetition_penalty: Some(floats[rng.below(floats.len())]),
            logprobs: rng.below(2) == 0,
            adapter_id: String::new(),
            timeout: None,
            cache_salt: [None, Some(String::new()), Some("s".repeat(rng.below(400)))][rng.below(3)].clone(),
            resume: (rng.below(2) == 0).then(|| moe_router::resume::ResumeParams {
                generated: (0..rng.below(40)).map(|_| [0u32, 7, 127, 128, u32::MAX][rng.below(5)]).collect(),
                digest: "0".repeat(rng.below(40)),
            }),
            constraint_scope: String::new(),
            priority: [0, 1, -1, i32::MAX, i32::MIN][rng.below(5)],
            constraint: {
                use moe_constrain::ConstraintSpec as C;
                let junk = String::from_utf8_lossy(&rng.mutate(b"{\"type\": \"object\"}")).to_string();
                [
                    None,
                    Some(C::JsonSchema(junk.clone())),
                    Some(C::Regex(junk.clone())),
                    Some(C::Lark(junk)),
                    Some(C::JsonObject),
                ][rng.below(5)]
                .clone()
            },
        };
        let prompt = if rng.below(3) == 0 {
            moe_router::PromptInput::Text(String::from_utf8_lossy(&rng.mutate(b"hello")).to_string())
        } else {
            moe_router::PromptInput::Ids(ids)
        };
        let _ = moe_router::ValidatedRequest::new(prompt, &p, &codec, &model.config, std::time::Duration::from_secs(5));
    }
}
