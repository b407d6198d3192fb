//! `moe demo`: a tour of the trained demo model and its tenants, measured here, not recorded:
//! the held-out loss of each domain with and without each tenant's adapter, which experts each
//! tenant's tokens visit on the same text (a per-layer heatmap in Unicode blocks), greedy
//! continuations of a prose and a code prompt, and how to serve it with the demo's tenant keys.

use anyhow::Context;
use clap::Args;
use moe_compute::{on_device, Backend, Device, OnBackend};
use moe_demo::demo_dir;
use moe_generate::{PromptLogits, Sampler};
use moe_lora::{load_adapter, AdapterParts};
use moe_model::{AdapterIdentity, AdapterWeights, Model};
use serde_json::json;
use std::path::Path;

#[derive(Args, Debug)]
pub struct TourArgs {
    /// Print the measurements as one JSON object instead of the tour.
    #[arg(long, env = "MOE_JSON")]
    pub json: bool,
    /// Bytes generated for each sample continuation.
    #[arg(long, env = "MOE_MAX_NEW_TOKENS", default_value_t = 48)]
    pub max_new_tokens: usize,
}

/// The adapters the tour measures, in order (`None`: the base model).
const TENANT_ADAPTERS: [(&str, Option<&str>); 4] =
    [("base", None), ("prose", Some("prose")), ("code", Some("code")), ("attn", Some("attn"))];
/// Prompts of the sample continuations.
const PROMPTS: [&str; 2] = ["The value of the expression is", "import os\nimport sys\n\ndef "];

/// What the tour measured for one adapter.
struct Measured {
    name: &'static str,
    /// Mean next-byte cross-entropy (nats) per held-out domain.
    loss: Vec<(String, f64)>,
    /// Share of routed tokens per layer and expert, on all held-out text.
    usage: Vec<Vec<f64>>,
    samples: Vec<String>,
}

struct TourOnDevice<'a>(&'a Path, &'a TourArgs);

impl OnBackend for TourOnDevice<'_> {
    type Output = anyhow::Result<Vec<Measured>>;
    fn run<B: Backend>(self, backend: B) -> Self::Output {
        let TourOnDevice(dir, args) = self;
        let model = Model::load(dir, backend).with_context(|| format!("loading {}", dir.display()))?;
        let held = moe_demo::trained::heldout_samples()?;
        let mut out = Vec::new();
        for (name, id) in TENANT_ADAPTERS {
            let adapter = match id {
                None => None,
                Some(id) => Some(load_demo_adapter(dir, id, &model)?),
            };
            out.push(measure(&model, name, adapter.as_ref(), &held, args.max_new_tokens)?);
        }
        Ok(out)
    }
}

fn load_demo_adapter<B: Backend>(dir: &Path, id: &str, model: &Model<B>) -> anyhow::Result<AdapterWeights<B>> {
    let identity = AdapterIdentity { id: id.into(), path: id.into(), digest: String::new() };
    let path = dir.join("adapters").join(id);
    load_adapter(&path, identity, &model.config, model.backend(), AdapterParts::all())
        .with_context(|| format!("loading the demo adapter {}", path.display()))
}

fn measure<B: Backend>(
    model: &Model<B>,
    name: &'static str,
    adapter: Option<&AdapterWeights<B>>,
    held: &[(String, Vec<String>)],
    max_new: usize,
) -> anyhow::Result<Measured> {
    let (layers, experts) = (model.config.num_layers, model.config.num_experts);
    let longest = held.iter().flat_map(|(_, t)| t.iter().map(|s| s.len())).max().unwrap_or(0);
    let mut run = PromptLogits::new(model, longest.max(PROMPTS[1].len() + max_new) + 1)?.with_adapter(adapter);
    let vocab = model.config.vocab_size;
    let mut loss = Vec::new();
    let mut counts = vec![0u64; layers * experts];
    for (domain, texts) in held {
        let (mut sum, mut n) = (0.0f64, 0usize);
        for text in texts {
            let ids: Vec<u32> = text.bytes().map(u32::from).collect();
            if ids.len() < 2 {
                continue;
            }
            let logits = run.prompt_logits(&ids)?;
            for (row, next) in logits.chunks(vocab).zip(&ids[1..]) {
                sum += cross_entropy(row, *next as usize);
                n += 1;
            }
            for (c, t) in counts.iter_mut().zip(run.take_expert_tokens()) {
                *c += t;
            }
        }
        loss.push((domain.clone(), sum / n.max(1) as f64));
    }
    let usage = counts
        .chunks(experts)
        .map(|layer| {
            let total = layer.iter().sum::<u64>().max(1) as f64;
            layer.iter().map(|c| *c as f64 / total).collect()
        })
        .collect();
    let mut samples = Vec::new();
    for prompt in PROMPTS {
        let mut ids: Vec<u32> = prompt.bytes().map(u32::from).collect();
        for _ in 0..max_new {
            let logits = run.prompt_logits(&ids)?;
            let last = logits.chunks(vocab).last().context("no logits")?;
            ids.push(Sampler::argmax(last));
        }
        let bytes: Vec<u8> = ids[prompt.len()..].iter().filter_map(|t| u8::try_from(*t).ok()).collect();
        samples.push(String::from_utf8_lossy(&bytes).into_owned());
    }
    Ok(Measured { name, loss, usage, samples })
}

fn cross_entropy(row: &[f32], target: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|x| (*x as f64 - max).exp()).sum();
    max + sum.ln() - row.get(target).copied().unwrap_or(f32::NEG_INFINITY) as f64
}

/// The largest total variation distance between two per-layer histograms, and its layer.
fn max_tvd(a: &[Vec<f64>], b: &[Vec<f64>]) -> (usize, f64) {
    a.iter()
        .zip(b)
        .map(|(x, y)| 0.5 * x.iter().zip(y).map(|(p, q)| (p - q).abs()).sum::<f64>())
        .enumerate()
        .fold((0, 0.0), |best, (l, d)| if d > best.1 { (l, d) } else { best })
}

pub fn run(args: TourArgs, device: Device) -> anyhow::Result<()> {
    let dir = demo_dir()?;
    let measured =
        on_device(device, TourOnDevice(&dir, &args)).map_err(|e| anyhow::anyhow!("--device {device}: {e}"))??;
    let by_name = |n: &str| measured.iter().find(|m| m.name == n);
    let (layer, tvd) = match (by_name("prose"), by_name("code")) {
        (Some(p), Some(c)) => max_tvd(&p.usage, &c.usage),
        _ => (0, 0.0),
    };
    if args.json {
        let tenants: serde_json::Map<String, serde_json::Value> = measured
            .iter()
            .map(|m| {
                let loss: serde_json::Map<String, serde_json::Value> =
                    m.loss.iter().map(|(d, l)| (d.clone(), json!(l))).collect();
                (m.name.to_string(), json!({"heldout_loss": loss, "expert_usage": m.usage, "samples": m.samples}))
            })
            .collect();
        let out = json!({"model_dir": dir, "adapters": tenants, "tvd_prose_code": {"layer": layer, "distance": tvd}});
        println!("{out}");
        return Ok(());
    }
    let config = moe_model::ModelConfig::from_dir(&dir)?;
    print_tour(&dir, &config, &measured, layer, tvd);
    Ok(())
}

const BLOCKS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

fn print_tour(dir: &Path, c: &moe_model::ModelConfig, measured: &[Measured], layer: usize, tvd: f64) {
    println!(
        "The trained demo model: byte-level, hidden {}, {} layers x {} experts (top-{}), trained by crates/moe-demo/train/train_demo.py",
        c.hidden_size, c.num_layers, c.num_experts, c.top_k
    );
    println!("  at {}\n", dir.display());
    println!("Held-out loss (nats per byte; lower is better) — each tenant's adapter on each domain:");
    let domains: Vec<&String> = measured.first().map(|m| m.loss.iter().map(|(d, _)| d).collect()).unwrap_or_default();
    print!("  {:<8}", "adapter");
    for d in &domains {
        print!("{d:>18}");
    }
    println!();
    let base: Vec<f64> = measured.first().map(|m| m.loss.iter().map(|(_, l)| *l).collect()).unwrap_or_default();
    for m in measured {
        print!("  {:<8}", m.name);
        for (i, (_, l)) in m.loss.iter().enumerate() {
            let delta = l - base.get(i).copied().unwrap_or(*l);
            if m.name == "base" {
                print!("{l:>18.3}");
            } else {
                print!("{:>18}", format!("{l:.3} ({delta:+.3})"));
            }
        }
        println!();
    }
    println!("\nWhich experts each tenant's tokens visit, on the same held-out text (share per layer, █ = most):");
    for m in measured.iter().filter(|m| m.name != "attn") {
        print!("  {:<8}", m.name);
        for row in &m.usage {
            let max = row.iter().copied().fold(0.0, f64::max).max(1e-9);
            let cells: String = row.iter().map(|s| BLOCKS[(((s / max) * 8.0).round() as usize).min(8)]).collect();
            print!(" |{cells}|");
        }
        println!();
    }
    let header: String =
        (0..measured.first().map_or(0, |m| m.usage.len())).map(|l| format!(" {:^10}", format!("layer {l}"))).collect();
    println!("  {:<8}{header}", "");
    println!("  prose vs code routing differ most on layer {layer}: total variation distance {tvd:.2}\n");
    println!("Greedy continuations:");
    for m in measured {
        for (prompt, sample) in PROMPTS.iter().zip(&m.samples) {
            println!("  [{}] {:?} -> {:?}", m.name, prompt, sample);
        }
    }
    println!("\nServe it with the demo's tenants (writers: prose; coders: code, attn; operator: any, admin):");
    println!("  moe serve --demo --tenants demo");
    for (name, key, adapters) in moe_demo::DEMO_TENANTS {
        println!("    {name:<9} key {key:<24} adapters {}", adapters.join(", "));
    }
    println!(
        "  moe generate --endpoint 127.0.0.1:50051 --api-key demo-writers-key-0001 --adapter prose --prompt \"The \""
    );
}
