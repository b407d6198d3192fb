//! `moe demo-model DIR`: writes a random Mixtral-layout checkpoint, the default demo or the
//! standard benchmark size, with any dimension overridable.

use clap::{Args, ValueEnum};
use moe_demo::{write_demo_model, DemoDtype, DemoSpec};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Preset {
    /// hidden 256, 4 layers, 8 experts top-2, vocab 512
    Demo,
    /// hidden 512, 8 layers, 8 experts top-2, intermediate 1024, vocab 32000 (~140M parameters)
    Bench,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Dtype {
    F32,
    Bf16,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Directory to write (created if missing).
    pub dir: PathBuf,
    #[arg(long, env = "MOE_DEMO_PRESET", value_enum, default_value = "demo")]
    pub preset: Preset,
    #[arg(long, env = "MOE_DEMO_DTYPE", value_enum, default_value = "f32")]
    pub dtype: Dtype,
    #[arg(long, env = "MOE_DEMO_HIDDEN_SIZE")]
    pub hidden_size: Option<usize>,
    #[arg(long, env = "MOE_DEMO_LAYERS")]
    pub layers: Option<usize>,
    #[arg(long, env = "MOE_DEMO_EXPERTS")]
    pub experts: Option<usize>,
    #[arg(long, env = "MOE_DEMO_TOP_K")]
    pub top_k: Option<usize>,
    #[arg(long, env = "MOE_DEMO_INTERMEDIATE_SIZE")]
    pub intermediate_size: Option<usize>,
    #[arg(long, env = "MOE_DEMO_VOCAB_SIZE")]
    pub vocab_size: Option<usize>,
    #[arg(long, env = "MOE_DEMO_HEADS")]
    pub heads: Option<usize>,
    #[arg(long, env = "MOE_DEMO_KV_HEADS")]
    pub kv_heads: Option<usize>,
    #[arg(long, env = "MOE_DEMO_SEED")]
    pub seed: Option<u64>,
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let mut s = match a.preset {
        Preset::Demo => DemoSpec::demo(),
        Preset::Bench => DemoSpec::bench(),
    };
    s.dtype = match a.dtype {
        Dtype::F32 => DemoDtype::F32,
        Dtype::Bf16 => DemoDtype::Bf16,
    };
    s.hidden_size = a.hidden_size.unwrap_or(s.hidden_size);
    s.num_layers = a.layers.unwrap_or(s.num_layers);
    s.num_experts = a.experts.unwrap_or(s.num_experts);
    s.top_k = a.top_k.unwrap_or(s.top_k);
    s.intermediate_size = a.intermediate_size.unwrap_or(s.intermediate_size);
    s.vocab_size = a.vocab_size.unwrap_or(s.vocab_size);
    s.num_heads = a.heads.unwrap_or(s.num_heads);
    s.num_kv_heads = a.kv_heads.unwrap_or(s.num_kv_heads);
    s.seed = a.seed.unwrap_or(s.seed);
    let params = write_demo_model(&a.dir, &s)?;
    eprintln!("wrote {} ({:.1}M parameters)", a.dir.display(), params as f64 / 1e6);
    Ok(())
}
