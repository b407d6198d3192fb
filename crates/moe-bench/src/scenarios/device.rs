//! `moe bench-device`: throughput of Mixtral-8x7B- or Qwen3-30B-A3B-shaped models on a device,
//! without a checkpoint (step 5 of the GPU acceptance). The weights are random bf16 made from a
//! seed where they live (`Backend::random_matrix_bf16`: on a GPU by a kernel, so a full-depth
//! Mixtral-8x7B, 87 GB, is ready in about a second; on the CPU by its cores); then prefill of 2048 tokens and decode at
//! batch 1/16/64/256 run through the model's forward pass (the engine's scheduling is not in the
//! numbers), and the grouped expert FFN alone on 4096 tokens, each next to its roofline: the
//! device's copy bandwidth (decode) and cuBLAS's dense bf16 GEMM (prefill and experts), both
//! measured in the same run when the device is a GPU.

use anyhow::Context;
use clap::Args;
use moe_compute::{on_device, Backend, Device, ExpertPlan, FfnScratch, OnBackend, SwigluWeights};
use moe_model::weights::{AttentionWeights, FfnWeights, LayerAttention, LayerWeights, ModelWeights, MoeWeights};
use moe_model::{BatchItem, LogitsFor, Model, ModelConfig, SequenceCache};
use std::fmt::Write as _;
use std::time::Instant;

/// The model shapes `moe bench-device` builds.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchShape {
    /// Mixtral-8x7B: hidden 4096, 8 experts of 14336 top-2, 32 heads of 128 over 8 KV heads.
    Mixtral,
    /// Qwen3-30B-A3B: hidden 2048, 128 experts of 768 top-8, 32 heads of 128 over 4 KV heads.
    Qwen3Moe,
}

#[derive(Args, Debug, Clone)]
pub struct BenchDeviceArgs {
    /// The model's shape (its layer count, hidden size, expert size and vocabulary can be changed
    /// with the flags below).
    #[arg(long, env = "MOE_BENCH_SHAPE", value_enum, default_value = "mixtral")]
    pub shape: BenchShape,
    /// Layers of the model (32 for a full-depth Mixtral-8x7B, 48 for Qwen3-30B-A3B).
    #[arg(long, env = "MOE_BENCH_LAYERS", default_value_t = 2)]
    pub layers: usize,
    /// Hidden size (default: the shape's).
    #[arg(long, env = "MOE_BENCH_HIDDEN")]
    pub hidden: Option<usize>,
    /// Each expert's intermediate size (default: the shape's).
    #[arg(long, env = "MOE_BENCH_INTERMEDIATE")]
    pub intermediate: Option<usize>,
    /// Vocabulary (default: the shape's).
    #[arg(long, env = "MOE_BENCH_VOCAB")]
    pub vocab: Option<usize>,
    /// Decode batch sizes.
    #[arg(long, env = "MOE_BENCH_BATCHES", value_delimiter = ',', default_value = "1,16,64,256")]
    pub batches: Vec<usize>,
    #[arg(long, env = "MOE_BENCH_PREFILL", default_value_t = 2048)]
    pub prefill: usize,
    /// Decode steps timed per batch size.
    #[arg(long, env = "MOE_BENCH_STEPS", default_value_t = 16)]
    pub steps: usize,
    /// Also write the table to this file.
    #[arg(long, env = "MOE_MARKDOWN")]
    pub markdown: Option<std::path::PathBuf>,
}

impl BenchDeviceArgs {
    /// (hidden, expert intermediate, vocabulary) after the shape's defaults.
    fn sizes(&self) -> (usize, usize, usize) {
        let (h, i, v) = match self.shape {
            BenchShape::Mixtral => (4096, 14336, 32000),
            BenchShape::Qwen3Moe => (2048, 768, 151_936),
        };
        (self.hidden.unwrap_or(h), self.intermediate.unwrap_or(i), self.vocab.unwrap_or(v))
    }
}

fn config(a: &BenchDeviceArgs) -> anyhow::Result<ModelConfig> {
    let (hidden, inter, vocab) = a.sizes();
    let heads = (hidden / 128).max(1);
    let json = match a.shape {
        BenchShape::Mixtral => serde_json::json!({
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": a.layers,
            "num_attention_heads": heads, "num_key_value_heads": (hidden / 512).max(1),
            "head_dim": 128.min(hidden),
            "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": vocab, "rms_norm_eps": 1e-5,
            "rope_theta": 1e6, "max_position_embeddings": 32768, "tie_word_embeddings": false
        }),
        BenchShape::Qwen3Moe => serde_json::json!({
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "hidden_size": hidden, "intermediate_size": 3 * hidden, "moe_intermediate_size": inter,
            "num_hidden_layers": a.layers, "num_attention_heads": 2 * heads,
            "num_key_value_heads": (heads / 4).max(1), "head_dim": 128,
            "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "max_position_embeddings": 40960, "tie_word_embeddings": false
        }),
    };
    Ok(ModelConfig::parse(&json.to_string(), std::path::Path::new("<bench-device>"))?)
}

struct Random<'a, B: Backend> {
    backend: &'a B,
    seed: u64,
}

impl<B: Backend> Random<'_, B> {
    fn matrix(&mut self, rows: usize, cols: usize) -> anyhow::Result<B::Matrix> {
        self.seed += 1;
        let scale = 1.0 / (cols as f32).sqrt();
        Ok(self.backend.random_matrix_bf16(rows, cols, self.seed, scale)?)
    }
    fn ones(&self, n: usize) -> anyhow::Result<B::Vector> {
        Ok(self.backend.vector(vec![1.0; n])?)
    }
    fn swiglu(&mut self, h: usize, inter: usize) -> anyhow::Result<SwigluWeights<B>> {
        Ok(SwigluWeights::plain(self.matrix(2 * inter, h)?, self.matrix(h, inter)?))
    }
}

fn weights<B: Backend>(b: &B, c: &ModelConfig) -> anyhow::Result<ModelWeights<B>> {
    let h = c.hidden_size;
    let (qw, kw) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    b.ensure_room("the benchmark's weights", 2 * crate::bytes_per_decoded_token(c, 1) * c.num_experts / c.top_k)?;
    let mut r = Random { backend: b, seed: 17 };
    let mut layers = Vec::new();
    for _ in 0..c.num_layers {
        let experts =
            (0..c.num_experts).map(|_| r.swiglu(h, c.expert_intermediate_size)).collect::<anyhow::Result<_>>()?;
        layers.push(LayerWeights {
            input_norm: r.ones(h)?,
            attention: LayerAttention::Grouped(AttentionWeights {
                qkv: r.matrix(qw + 2 * kw, h)?,
                qkv_bias: None,
                o: r.matrix(h, qw)?,
                o_bias: None,
                q_norm: None,
                k_norm: None,
                sinks: None,
            }),
            post_attention_norm: r.ones(h)?,
            ffn: FfnWeights::Moe(MoeWeights {
                gate: r.matrix(c.num_experts, h)?,
                gate_bias: None,
                router_bias: None,
                experts,
                shared: None,
            }),
        });
    }
    Ok(ModelWeights {
        embed: r.matrix(c.vocab_size, h)?,
        layers,
        norm: r.ones(h)?,
        lm_head: Some(r.matrix(c.vocab_size, h)?),
    })
}

/// The grouped expert FFN alone: 4096 tokens top-2 over 8 experts (cuBLAS per expert).
fn expert_ffn_row<B: Backend>(
    backend: &B,
    c: &ModelConfig,
    w: &ModelWeights<B>,
    gemm_tflops: Option<f64>,
    path: &str,
) -> Option<(Row, Vec<f32>)> {
    let FfnWeights::Moe(m) = &w.layers.first()?.ffn else { return None };
    if m.experts.len() != 8 {
        return None; // the row's routing is Mixtral's 8 experts top-2
    }
    let tokens = 4096usize;
    let mut plan = ExpertPlan::default();
    // Two distinct experts per token, every expert equally loaded over the batch.
    let choices: Vec<(u32, f32)> = (0..tokens)
        .flat_map(|t| {
            let first = t % 8;
            [(first as u32, 0.6), (((first + 1 + (t / 8) % 7) % 8) as u32, 0.4)]
        })
        .collect();
    plan.rebuild(8, 2, &choices);
    let x_host: Vec<f32> = moe_compute::gpu_plan::draws::random_bf16_vec(tokens * c.hidden_size, 5, 1.0)
        .iter()
        .map(|&b| f32::from_bits((b as u32) << 16))
        .collect();
    let mut x = backend.act();
    backend.upload(tokens, c.hidden_size, &x_host, &mut x);
    let mut out = backend.act();
    let mut s = FfnScratch::new(backend);
    let mut host = Vec::new();
    let mut run = |n: usize, host: &mut Vec<f32>| {
        for _ in 0..n {
            backend.zeros(tokens, c.hidden_size, &mut out);
            backend.expert_ffn(&x, &m.experts, &plan, &mut s, &mut out);
        }
        backend.download(&out, host);
    };
    run(1, &mut host);
    let t = Instant::now();
    run(5, &mut host);
    let s_per = t.elapsed().as_secs_f64() / 5.0;
    let flops = 2.0 * (2 * tokens) as f64 * 3.0 * (c.hidden_size * c.expert_intermediate_size) as f64;
    let tflops = flops / s_per / 1e12;
    let row = (
        format!("expert FFN, {tokens} tokens top-2, 8 experts ({path})"),
        format!("{:.2} ms", s_per * 1e3),
        format!("{tflops:.1} TFLOP/s"),
        gemm_tflops.map(|g| format!("{:.0}% of cuBLAS", 100.0 * tflops / g)).unwrap_or_default(),
    );
    Some((row, host))
}

struct Measure<'a>(&'a BenchDeviceArgs, ModelConfig);

/// A row of the report: (what, time, rate, roofline fraction).
type Row = (String, String, String, String);
type Rows = Vec<Row>;

impl OnBackend for Measure<'_> {
    type Output = anyhow::Result<(String, Rows)>;
    fn run<B: Backend>(self, backend: B) -> Self::Output {
        let Measure(a, c) = self;
        let name = backend.name();
        let t = Instant::now();
        let w = weights(&backend, &c)?;
        eprintln!("weights ready in {:.1} s", t.elapsed().as_secs_f64());
        let (copy_gbps, gemm_tflops) = baselines(&backend);
        let mut rows = Rows::new();
        let mut expert_rows = Vec::new();
        if matches!(backend.device(), Device::Cuda(_)) {
            // Both GPU paths on the same weights and routing: cuBLAS per expert, then ours.
            #[cfg(feature = "cuda")]
            {
                use moe_compute::cuda::backend::{expert_gemm, set_expert_gemm, ExpertGemm};
                let chosen = expert_gemm();
                set_expert_gemm(ExpertGemm::Cublas);
                let reference = expert_ffn_row(&backend, &c, &w, gemm_tflops, "cuBLAS per expert");
                for (mode, label) in
                    [(ExpertGemm::Grouped, "grouped GEMM kernel"), (ExpertGemm::Tc, "tensor-core grouped GEMM")]
                {
                    set_expert_gemm(mode);
                    let ours = expert_ffn_row(&backend, &c, &w, gemm_tflops, label);
                    if let (Some((_, want)), Some((row, got))) = (&reference, ours) {
                        let err = crate::fixture_check::rel_err(&got, want);
                        expert_rows.push((row.0, row.1, row.2, format!("{}; output vs cuBLAS path: {err:.1e}", row.3)));
                    }
                }
                set_expert_gemm(chosen);
                if let Some((row, _)) = reference {
                    expert_rows.insert(0, row);
                }
            }
        } else {
            expert_rows.extend(expert_ffn_row(&backend, &c, &w, gemm_tflops, "host").map(|r| r.0));
        }
        let model = Model::from_parts(c.clone(), w, backend.clone());
        let max_batch = a.batches.iter().copied().max().unwrap_or(1);
        let ctx = 128usize;
        // (at least room for the invariance check's 64 prompts of 24 tokens)
        let pages = ((max_batch * (ctx + a.steps + 16)).max(a.prefill + 16).div_ceil(16) + max_batch).max(64 * 2 + 8);
        let mut kv = model.kv_cache(pages, 16)?;
        let mut ws = model.workspace();
        let mut logits = Vec::new();
        let ids = |n: usize, s: usize| -> Vec<u32> {
            (0..n).map(|i| ((i * 7919 + s * 104729) % c.vocab_size) as u32).collect()
        };

        // Prefill: one sequence of `prefill` tokens (after a short warm-up); on a GPU with each
        // attention kernel.
        let flops_tok = crate::flops_per_prefill_token(&c);
        let on_gpu = matches!(backend.device(), Device::Cuda(_));
        let mut classic_logits: Option<Vec<f32>> = None;
        for flash in if on_gpu { vec![false, true] } else { vec![false] } {
            #[cfg(feature = "cuda")]
            let chosen = moe_compute::cuda::backend::attention_kernel();
            #[cfg(feature = "cuda")]
            if on_gpu {
                use moe_compute::cuda::backend::{set_attention_kernel, AttentionKernel};
                set_attention_kernel(if flash { AttentionKernel::Flash } else { AttentionKernel::Classic });
            }
            for (n, timed) in [(64usize, false), (a.prefill, true)] {
                let toks = ids(n, 1);
                let mut cache = SequenceCache::default();
                let t = Instant::now();
                model.forward(
                    &mut ws,
                    &mut kv,
                    &mut [BatchItem::new(&toks, &mut cache)],
                    LogitsFor::Last,
                    &mut logits,
                )?;
                let s = t.elapsed().as_secs_f64();
                kv.pages.release(&mut cache);
                if timed {
                    let tflops = flops_tok * n as f64 / s / 1e12;
                    // The flash kernels' logits against the classic kernel's, same weights and tokens.
                    let versus = match (&classic_logits, flash) {
                        (Some(want), true) => {
                            format!("; logits vs classic: {:.1e}", crate::fixture_check::rel_err(&logits, want))
                        }
                        _ => String::new(),
                    };
                    if !flash {
                        classic_logits = Some(logits.clone());
                    }
                    rows.push((
                        format!("prefill {n} tokens{}", if flash { " (flash attention)" } else { "" }),
                        format!("{:.1} ms", s * 1e3),
                        format!("{:.0} tok/s, {tflops:.1} TFLOP/s", n as f64 / s),
                        gemm_tflops
                            .map(|g| format!("{:.0}% of cuBLAS{versus}", 100.0 * tflops / g))
                            .unwrap_or_default(),
                    ));
                }
            }
            #[cfg(feature = "cuda")]
            moe_compute::cuda::backend::set_attention_kernel(chosen);
        }
        // Decode: `batch` sequences of `ctx` tokens, then `steps` one-token steps.
        let bytes_expert = 3 * c.hidden_size * c.expert_intermediate_size * 2;
        let dense = crate::bytes_per_decoded_token(&c, 2) - c.num_layers * c.top_k * bytes_expert;
        // Batch 64 on a GPU also with routing on the device (MOE_CUDA_ROUTING=device).
        // Batch 64 on a GPU also with routing on the device, and with flash attention.
        let runs: Vec<(usize, bool, bool)> = a
            .batches
            .iter()
            .flat_map(|&b| {
                if on_gpu && b == 64 {
                    vec![(b, false, false), (b, true, false), (b, false, true)]
                } else {
                    vec![(b, false, false)]
                }
            })
            .collect();
        for (batch, device_routing, flash) in runs {
            #[cfg(feature = "cuda")]
            let chosen = (moe_compute::cuda::backend::device_routing(), moe_compute::cuda::backend::attention_kernel());
            #[cfg(feature = "cuda")]
            {
                use moe_compute::cuda::backend::{set_attention_kernel, set_device_routing, AttentionKernel};
                if device_routing {
                    set_device_routing(true);
                }
                if flash {
                    set_attention_kernel(AttentionKernel::Flash);
                }
            }
            let mut caches: Vec<SequenceCache> = (0..batch).map(|_| SequenceCache::default()).collect();
            let prompts: Vec<Vec<u32>> = (0..batch).map(|i| ids(ctx, i + 2)).collect();
            for chunk in (0..batch).collect::<Vec<_>>().chunks(16) {
                let mut items: Vec<BatchItem<'_, B>> = Vec::new();
                let (lo, hi) = (chunk[0], chunk[chunk.len() - 1] + 1);
                for (p, cache) in prompts[lo..hi].iter().zip(caches[lo..hi].iter_mut()) {
                    items.push(BatchItem::new(p, cache));
                }
                model.forward(&mut ws, &mut kv, &mut items, LogitsFor::Last, &mut logits)?;
            }
            let next: Vec<Vec<u32>> = (0..batch).map(|i| ids(1, i + 3)).collect();
            let mut timed = 0.0;
            let syncs_before = super::device_invariance::host_syncs();
            for step in 0..a.steps + 1 {
                let t = Instant::now();
                let mut items: Vec<BatchItem<'_, B>> =
                    next.iter().zip(caches.iter_mut()).map(|(tk, cache)| BatchItem::new(tk, cache)).collect();
                model.forward(&mut ws, &mut kv, &mut items, LogitsFor::Last, &mut logits)?;
                if step > 0 {
                    timed += t.elapsed().as_secs_f64();
                }
            }
            for cache in caches.iter_mut() {
                kv.pages.release(cache);
            }
            let step_s = timed / a.steps.max(1) as f64;
            let syncs = (super::device_invariance::host_syncs() - syncs_before) as f64 / (a.steps + 1) as f64;
            // Weights a step must read: the dense part and every expert some row chose.
            let touched = (c.num_experts as f64
                * (1.0 - (1.0 - c.top_k as f64 / c.num_experts as f64).powi(batch as i32)))
            .max(c.top_k as f64);
            let bytes = dense as f64 + c.num_layers as f64 * touched * bytes_expert as f64;
            let roof_s = copy_gbps.map(|g| bytes / (g * 1e9));
            rows.push((
                format!(
                    "decode batch {batch} (context {ctx}){}{}",
                    if device_routing { ", device routing" } else { "" },
                    if flash { ", flash attention" } else { "" }
                ),
                format!("{:.2} ms/step", step_s * 1e3),
                if on_gpu {
                    format!("{:.0} tok/s, {syncs:.0} host syncs/step", batch as f64 / step_s)
                } else {
                    format!("{:.0} tok/s", batch as f64 / step_s)
                },
                roof_s.map(|r| format!("{:.0}% of HBM roofline", 100.0 * r / step_s)).unwrap_or_default(),
            ));
            #[cfg(feature = "cuda")]
            {
                moe_compute::cuda::backend::set_device_routing(chosen.0);
                moe_compute::cuda::backend::set_attention_kernel(chosen.1);
            }
        }
        rows.extend(expert_rows);
        rows.extend(super::device_invariance::invariance(&model, &mut kv, &mut ws, &c, on_gpu)?);
        let head = format!(
            "{name}; {} layers of hidden {}, {} experts x {} top-{}, vocab {}; copy {} GB/s, cuBLAS bf16 {} TFLOP/s",
            c.num_layers,
            c.hidden_size,
            c.num_experts,
            c.expert_intermediate_size,
            c.top_k,
            c.vocab_size,
            copy_gbps.map(|g| format!("{g:.0}")).unwrap_or_else(|| "-".into()),
            gemm_tflops.map(|g| format!("{g:.0}")).unwrap_or_else(|| "-".into()),
        );
        Ok((head, rows))
    }
}

/// The device's copy bandwidth (GB/s) and cuBLAS bf16 GEMM peak (TFLOP/s), when it is a GPU.
fn baselines<B: Backend>(backend: &B) -> (Option<f64>, Option<f64>) {
    match backend.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => match moe_compute::cuda::check::baselines(n) {
            Ok((copy, gemm)) => (Some(copy), gemm),
            Err(e) => {
                eprintln!("baselines unavailable: {e}");
                (None, None)
            }
        },
        _ => (None, None),
    }
}

pub fn run(a: BenchDeviceArgs, device: Device) -> anyhow::Result<()> {
    let (hidden, inter, vocab) = a.sizes();
    anyhow::ensure!(
        a.layers >= 1 && hidden >= 128 && hidden.is_multiple_of(128) && inter >= 1 && vocab >= 2,
        "--layers >= 1, --hidden a multiple of 128, --intermediate >= 1, --vocab >= 2"
    );
    anyhow::ensure!(!a.batches.is_empty() && a.batches.iter().all(|&b| b >= 1), "--batches: sizes of at least 1");
    let c = config(&a)?;
    let (head, rows) = on_device(device, Measure(&a, c)).map_err(|e| anyhow::anyhow!("--device {device}: {e}"))??;
    let mut text = format!("{head}\n\n| run | time | rate | of roofline |\n|---|---|---|---|\n");
    for (what, time, rate, frac) in rows {
        let _ = writeln!(text, "| {what} | {time} | {rate} | {frac} |");
    }
    println!("{text}");
    if let Some(p) = &a.markdown {
        std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
