//! `moe kernels fixtures`: the committed transformers/PEFT fixtures recomputed on a device. For
//! every architecture under `--dir` (a directory with `config.json` and `expected.json`), every
//! case's prompt logits are computed on the chosen backend, without and with each PEFT adapter
//! that has its own `expected.json` (gate, attention, fused experts...), and compared with what
//! transformers/PEFT computed: max |got - want| / max |want| within `--bound`. This is step 3 of
//! the GPU acceptance (`kernels/gpu-acceptance.sh`); on the CPU it checks the same numbers the
//! tests check.

use anyhow::Context;
use moe_compute::{on_device, Backend, Device, OnBackend};
use moe_generate::PromptLogits;
use moe_model::Model;
use std::path::{Path, PathBuf};

/// One compared fixture: (architecture, adapter or "-", cases, worst relative error).
type Row = (String, String, usize, f64);

/// Largest |got - want| over the largest |want|; infinity on a size mismatch or a non-finite value.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let (mut diff, mut scale) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        diff = diff.max((g as f64 - w as f64).abs());
        scale = scale.max((w as f64).abs());
    }
    diff / scale.max(1e-30)
}

/// The cases of an `expected.json`: (token ids, flattened logits).
fn cases(path: &Path) -> anyhow::Result<Vec<(Vec<u32>, Vec<f32>)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let list = v["cases"].as_array().with_context(|| format!("{}: no cases", path.display()))?;
    list.iter()
        .map(|c| {
            let ids = serde_json::from_value::<Vec<u32>>(c["token_ids"].clone())?;
            let rows = serde_json::from_value::<Vec<Vec<f32>>>(c["logits"].clone())?;
            Ok((ids, rows.into_iter().flatten().collect()))
        })
        .collect()
}

struct OnArch<'a>(&'a Path, String);

impl OnBackend for OnArch<'_> {
    type Output = anyhow::Result<Vec<Row>>;
    fn run<B: Backend>(self, backend: B) -> Self::Output {
        let OnArch(dir, arch) = self;
        let model = match Model::load(dir, backend) {
            Ok(m) => m,
            // An architecture this backend cannot run yet is reported, not a failed check.
            Err(e @ moe_model::ModelError::BackendLacks { .. }) => {
                println!("| {arch} | - | 0 | - | - | skipped: {e} |");
                return Ok(Vec::new());
            }
            Err(e) => return Err(e).with_context(|| format!("loading {}", dir.display())),
        };
        let mut rows = Vec::new();
        let mut adapters: Vec<(String, Option<PathBuf>)> = vec![("-".into(), None)];
        if let Ok(entries) = std::fs::read_dir(dir.join("peft")) {
            let mut found: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            found.sort();
            for p in found.into_iter().filter(|p| p.join("expected.json").is_file()) {
                let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                adapters.push((format!("peft/{name}"), Some(p)));
            }
        }
        for (name, adapter_dir) in adapters {
            let expected = adapter_dir.as_deref().unwrap_or(dir).join("expected.json");
            let adapter = match &adapter_dir {
                Some(d) => Some(
                    moe_lora::load_local_adapter(d, &name, &model.config, model.backend())
                        .with_context(|| format!("loading adapter {}", d.display()))?,
                ),
                None => None,
            };
            let all = cases(&expected)?;
            let mut worst = 0.0f64;
            for (ids, want) in &all {
                let mut gen = PromptLogits::new(&model, ids.len())?.with_adapter(adapter.as_ref());
                worst = worst.max(rel_err(&gen.prompt_logits(ids)?, want));
            }
            rows.push((arch.clone(), name, all.len(), worst));
        }
        Ok(rows)
    }
}

/// Runs every fixture under `dir` on `device`; fails when one exceeds `bound`.
pub fn run(dir: &Path, device: Device, bound: f64) -> anyhow::Result<()> {
    let mut archs: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("config.json").is_file() && p.join("expected.json").is_file())
        .collect();
    archs.sort();
    anyhow::ensure!(!archs.is_empty(), "no fixtures (config.json + expected.json) under {}", dir.display());
    println!("| fixture | adapter | cases | rel. error | bound | ok |\n|---|---|---|---|---|---|");
    let mut failed = Vec::new();
    for p in archs {
        let arch = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let rows =
            on_device(device, OnArch(&p, arch.clone())).map_err(|e| anyhow::anyhow!("--device {device}: {e}"))?;
        for (arch, adapter, n, err) in rows? {
            let ok = err <= bound;
            println!("| {arch} | {adapter} | {n} | {err:.2e} | {bound:.0e} | {} |", if ok { "yes" } else { "**NO**" });
            if !ok {
                failed.push(format!("{arch} {adapter}"));
            }
        }
    }
    anyhow::ensure!(failed.is_empty(), "{} fixtures outside the bound: {}", failed.len(), failed.join(", "));
    Ok(())
}
