//! `moe-demo` writes the demo checkpoints in Hugging Face layout (`config.json`,
//! `model.safetensors`, a byte-level `tokenizer.json`), so the project runs with nothing
//! downloaded: the trained demo model that `--demo` serves (embedded, see [`trained`]), and small
//! random Mixtral-layout checkpoints, so benchmarks and tests have models of a known size, with
//! random PEFT LoRA adapters for that layout. It does not load or run models.

mod adapter;
mod cached;
mod deepseek;
mod tokenizer;
pub mod trained;

pub use adapter::{write_demo_adapter, DemoTarget};
pub use cached::{cached_model_dir, demo_dir};
pub use tokenizer::byte_level_tokenizer_json;
pub use trained::{trained_demo_fingerprint, write_trained_demo, DEMO_TENANTS};

use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: writing safetensors failed: {message}")]
    Write { path: PathBuf, message: String },
    #[error("invalid demo model shape: {0}")]
    Shape(String),
}

pub type Result<T> = std::result::Result<T, DemoError>;

/// Weight dtype written to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DemoDtype {
    F32,
    Bf16,
}

/// The shape of a demo checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct DemoSpec {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_experts: usize,
    pub top_k: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub max_position_embeddings: usize,
    pub seed: u64,
    pub dtype: DemoDtype,
    pub layout: DemoLayout,
}

/// Which architecture's layout a demo checkpoint has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DemoLayout {
    /// Mixtral: grouped-query attention, top-k of the routed experts.
    Mixtral,
    /// DeepSeek-V3 with the Mixtral spec's active parameters (see `deepseek.rs`).
    DeepseekV3,
}

impl DemoSpec {
    /// The default demo: small enough to load and generate in well under a second.
    pub fn demo() -> Self {
        Self {
            hidden_size: 256,
            num_layers: 4,
            num_experts: 8,
            top_k: 2,
            intermediate_size: 512,
            vocab_size: 512,
            num_heads: 8,
            num_kv_heads: 2,
            max_position_embeddings: 4096,
            seed: 1,
            dtype: DemoDtype::F32,
            layout: DemoLayout::Mixtral,
        }
    }

    /// The standard benchmark model: hidden 512, 8 layers, 8 experts top-2, intermediate 1024,
    /// vocab 32000, 8 heads / 2 KV heads (about 140M parameters).
    pub fn bench() -> Self {
        Self { hidden_size: 512, num_layers: 8, intermediate_size: 1024, vocab_size: 32000, ..Self::demo() }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(DemoError::Shape(m));
        if self.num_heads == 0 || self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "heads ({}) must be a positive multiple of kv heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) || !(self.hidden_size / self.num_heads).is_multiple_of(2) {
            return bad(format!(
                "hidden size {} must split into an even head_dim over {} heads",
                self.hidden_size, self.num_heads
            ));
        }
        if self.top_k == 0 || self.top_k > self.num_experts {
            return bad(format!("top_k {} must be between 1 and the {} experts", self.top_k, self.num_experts));
        }
        if self.vocab_size < tokenizer::MIN_VOCAB {
            return bad(format!(
                "vocab size {} is below the byte tokenizer's {}",
                self.vocab_size,
                tokenizer::MIN_VOCAB
            ));
        }
        if self.num_layers == 0 || self.intermediate_size == 0 || self.max_position_embeddings == 0 {
            return bad("layers, intermediate size and max positions must be positive".into());
        }
        Ok(())
    }

    /// Parameters the checkpoint holds.
    pub fn parameter_count(&self) -> usize {
        let h = self.hidden_size;
        let hd = h / self.num_heads.max(1);
        let attn = h * h * 2 + 2 * h * self.num_kv_heads * hd;
        let experts = self.num_experts * 3 * h * self.intermediate_size;
        let layer = attn + experts + self.num_experts * h + 2 * h;
        self.num_layers * layer + 2 * self.vocab_size * h + h
    }
}

struct Tensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Tensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Reproducible weights from a seed.
type Rng = moe_compute::rng::SplitMix64;

fn tensor(rng: &mut Rng, dtype: DemoDtype, shape: &[usize], std: f32) -> Tensor {
    let n: usize = shape.iter().product();
    // Uniform with the requested standard deviation.
    let a = std * 3f32.sqrt();
    let values = (0..n).map(|_| rng.signed() * a);
    let (dtype, bytes) = match dtype {
        DemoDtype::F32 => (Dtype::F32, values.flat_map(|v| v.to_le_bytes()).collect()),
        DemoDtype::Bf16 => (Dtype::BF16, values.flat_map(|v| half::bf16::from_f32(v).to_le_bytes()).collect()),
    };
    Tensor { dtype, shape: shape.to_vec(), bytes }
}

fn ones(dtype: DemoDtype, len: usize) -> Tensor {
    let (dtype, bytes) = match dtype {
        DemoDtype::F32 => (Dtype::F32, (0..len).flat_map(|_| 1f32.to_le_bytes()).collect()),
        DemoDtype::Bf16 => (Dtype::BF16, (0..len).flat_map(|_| half::bf16::ONE.to_le_bytes()).collect()),
    };
    Tensor { dtype, shape: vec![len], bytes }
}

/// Writes a random Mixtral-layout checkpoint with a byte-level tokenizer into `dir` (created if
/// missing). Returns the parameter count.
pub fn write_demo_model(dir: &Path, spec: &DemoSpec) -> Result<usize> {
    spec.validate()?;
    if spec.layout == DemoLayout::DeepseekV3 {
        return deepseek::write(dir, spec);
    }
    std::fs::create_dir_all(dir).map_err(|error| DemoError::Io { path: dir.to_path_buf(), error })?;
    let (h, i, e) = (spec.hidden_size, spec.intermediate_size, spec.num_experts);
    let hd = h / spec.num_heads;
    let kvw = spec.num_kv_heads * hd;
    let mut rng = Rng::new(spec.seed);
    let dt = spec.dtype;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let proj = 1.0 / (h as f32).sqrt();
    tensors.push(("model.embed_tokens.weight".into(), tensor(&mut rng, dt, &[spec.vocab_size, h], 1.0)));
    for l in 0..spec.num_layers {
        let p = format!("model.layers.{l}");
        tensors.push((format!("{p}.input_layernorm.weight"), ones(dt, h)));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), ones(dt, h)));
        tensors.push((format!("{p}.self_attn.q_proj.weight"), tensor(&mut rng, dt, &[h, h], proj)));
        tensors.push((format!("{p}.self_attn.k_proj.weight"), tensor(&mut rng, dt, &[kvw, h], proj)));
        tensors.push((format!("{p}.self_attn.v_proj.weight"), tensor(&mut rng, dt, &[kvw, h], proj)));
        tensors.push((format!("{p}.self_attn.o_proj.weight"), tensor(&mut rng, dt, &[h, h], proj * 0.5)));
        // A larger gate spread makes routing decisive, as trained routers are.
        tensors.push((format!("{p}.block_sparse_moe.gate.weight"), tensor(&mut rng, dt, &[e, h], 2.0 * proj)));
        for x in 0..e {
            let q = format!("{p}.block_sparse_moe.experts.{x}");
            tensors.push((format!("{q}.w1.weight"), tensor(&mut rng, dt, &[i, h], proj)));
            tensors.push((format!("{q}.w3.weight"), tensor(&mut rng, dt, &[i, h], proj)));
            tensors.push((format!("{q}.w2.weight"), tensor(&mut rng, dt, &[h, i], 0.5 / (i as f32).sqrt())));
        }
    }
    tensors.push(("model.norm.weight".into(), ones(dt, h)));
    tensors.push(("lm_head.weight".into(), tensor(&mut rng, dt, &[spec.vocab_size, h], proj * 4.0)));

    let st_path = dir.join("model.safetensors");
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), None, &st_path)
        .map_err(|e| DemoError::Write { path: st_path.clone(), message: e.to_string() })?;
    let config = serde_json::json!({
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": null,
        "num_local_experts": e,
        "num_experts_per_tok": spec.top_k,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": false,
        "bos_token_id": tokenizer::BOS_ID,
        "eos_token_id": tokenizer::EOS_ID,
        "sliding_window": null,
        "hidden_act": "silu",
        "dtype": match dt { DemoDtype::F32 => "float32", DemoDtype::Bf16 => "bfloat16" },
    });
    write_file(&dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap_or_default().as_bytes())?;
    write_file(&dir.join("tokenizer.json"), byte_level_tokenizer_json().as_bytes())?;
    Ok(spec.parameter_count())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|error| DemoError::Io { path: path.to_path_buf(), error })
}
