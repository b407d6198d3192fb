//! Turning a checked manifest into backend weights, keeping only the pairs this process applies:
//! a router the attention and gate pairs, a worker the pairs of the experts it hosts, a
//! single-process model all of them.

use crate::error::Result;
use crate::peft::{AdapterManifest, ExpertProj, FusedProj, ModuleKind, TargetModule};
use moe_compute::{Backend, ExpertLora, LoraWeights};
use moe_model::{AdapterIdentity, AdapterWeights, Architecture, LayerLora, ModelConfig};
use std::path::{Path, PathBuf};

/// Which pairs to hold.
#[derive(Clone, Copy)]
pub struct AdapterParts<'a> {
    /// Attention (q, k, v, o) and MoE gate pairs.
    pub dense: bool,
    /// Pairs of expert `(layer, expert)` when this returns true.
    pub experts: &'a (dyn Fn(usize, usize) -> bool + Sync),
    /// Modules of a higher rank are refused (the operator's `--max-lora-rank`).
    pub max_rank: usize,
}

impl AdapterParts<'static> {
    /// Everything (a model that runs its own experts).
    pub fn all() -> Self {
        Self { dense: true, experts: &|_, _| true, max_rank: crate::peft::MAX_RANK }
    }

    /// What a router holds: no expert pairs.
    pub fn router() -> Self {
        Self { dense: true, experts: &|_, _| false, max_rank: crate::peft::MAX_RANK }
    }
}

impl<'a> AdapterParts<'a> {
    /// The same parts, refusing modules of rank above `max_rank`.
    pub fn with_max_rank(self, max_rank: usize) -> Self {
        Self { max_rank, ..self }
    }
}

/// Loads the adapter in `dir` for `cfg`'s model. `identity.digest` is filled from the files.
pub fn load_adapter<B: Backend>(
    dir: &Path,
    mut identity: AdapterIdentity,
    cfg: &ModelConfig,
    backend: &B,
    parts: AdapterParts<'_>,
) -> Result<AdapterWeights<B>> {
    let manifest = AdapterManifest::read(dir, &identity.id, cfg)?;
    identity.digest = manifest.digest.clone();
    if let Some(m) = manifest.modules.iter().find(|m| m.rank > parts.max_rank) {
        return Err(crate::LoraError::Module {
            adapter: identity.id.clone(),
            module: m.module.clone(),
            message: format!("rank {} is above the configured maximum of {} (--max-lora-rank)", m.rank, parts.max_rank),
        });
    }
    let mut layers: Vec<LayerLora<B>> = (0..cfg.num_layers).map(|_| LayerLora::default()).collect();
    let mut bytes = 0usize;
    for m in &manifest.modules {
        let layer = &mut layers[m.target.layer];
        let (expert, proj) = match m.target.kind {
            ModuleKind::FusedExperts { proj } => {
                layer.has_expert_lora = true;
                let wanted: Vec<usize> = (0..m.experts).filter(|&e| (parts.experts)(m.target.layer, e)).collect();
                if wanted.is_empty() {
                    continue;
                }
                let (a, b) = read_finite(&manifest, m, &identity.id)?;
                for e in wanted {
                    let (a_e, b_e) = expert_slice(&a, &b, m, e);
                    let slot = expert_slot(layer, cfg.num_experts, e);
                    let mut pair = |a: Vec<f32>, b: Vec<f32>, out: usize| -> Result<LoraWeights<B>> {
                        bytes += 4 * (a.len() + b.len());
                        Ok(LoraWeights {
                            a: backend.lora_matrix(m.rank, m.in_features, a)?,
                            b: backend.lora_matrix(out, m.rank, b)?,
                            scale: m.scale,
                        })
                    };
                    match proj {
                        FusedProj::GateUp => {
                            // Gate rows first, then up rows, as in the fused weight; gpt-oss's
                            // columns alternate gate and up.
                            let i = m.out_features / 2;
                            let (gate_b, up_b) = match cfg.architecture {
                                Architecture::GptOss => {
                                    (every_other_row(&b_e, m.rank, 0), every_other_row(&b_e, m.rank, 1))
                                }
                                _ => (b_e[..i * m.rank].to_vec(), b_e[i * m.rank..].to_vec()),
                            };
                            slot.gate = Some(pair(a_e.clone(), gate_b, i)?);
                            slot.up = Some(pair(a_e, up_b, i)?);
                        }
                        FusedProj::Down => slot.down = Some(pair(a_e, b_e, m.out_features)?),
                    }
                }
                continue;
            }
            ModuleKind::Expert { expert, proj } => {
                layer.has_expert_lora = true;
                if !(parts.experts)(m.target.layer, expert) {
                    continue;
                }
                (Some(expert), Some(proj))
            }
            _ if !parts.dense => continue,
            _ => (None, None),
        };
        let (a, mut b) = read_finite(&manifest, m, &identity.id)?;
        bytes += 4 * (a.len() + b.len());
        if let Some(lat) = &cfg.latent {
            // Latent attention: B's rope rows follow the weight's reordering; kv_b_proj's pair is
            // absorbed as its weight is.
            match m.target.kind {
                ModuleKind::Q => b = reorder_rows(&b, m.rank, moe_model::latent_q_rows(lat)),
                ModuleKind::KvA => b = reorder_rows(&b, m.rank, moe_model::latent_kv_a_rows(lat)),
                ModuleKind::KvB => {
                    let heads = cfg.num_heads;
                    let ((ka, kb), (va, vb)) = moe_model::absorbed_kv_b_lora(lat, heads, m.rank, &a, &b);
                    let lora = |rows: usize, cols: usize, v: Vec<f32>| backend.lora_matrix(rows, cols, v);
                    layer.kv_b_keys = Some(LoraWeights {
                        a: lora(heads * m.rank, lat.qk_nope_head_dim, ka)?,
                        b: lora(lat.kv_lora_rank, m.rank, kb)?,
                        scale: m.scale,
                    });
                    layer.kv_b_values = Some(LoraWeights {
                        a: lora(m.rank, lat.kv_lora_rank, va)?,
                        b: lora(heads * lat.v_head_dim, m.rank, vb)?,
                        scale: m.scale,
                    });
                    continue;
                }
                _ => {}
            }
        }
        if cfg.gated_attention && m.target.kind == ModuleKind::Q {
            // B's rows interleave each head's q and output-gate rows: two pairs sharing A.
            let rows = |gate| -> Vec<f32> {
                moe_model::gated_q_rows(cfg.num_heads, cfg.head_dim, gate)
                    .into_iter()
                    .flat_map(|r| b[r * m.rank..(r + 1) * m.rank].iter().copied())
                    .collect()
            };
            let half = m.out_features / 2;
            let pair = |b: Vec<f32>| -> Result<LoraWeights<B>> {
                Ok(LoraWeights {
                    a: backend.lora_matrix(m.rank, m.in_features, a.clone())?,
                    b: backend.lora_matrix(half, m.rank, b)?,
                    scale: m.scale,
                })
            };
            layer.q = Some(pair(rows(false))?);
            layer.q_gate = Some(pair(rows(true))?);
            continue;
        }
        let pair = LoraWeights {
            a: backend.lora_matrix(m.rank, m.in_features, a)?,
            b: backend.lora_matrix(m.out_features, m.rank, b)?,
            scale: m.scale,
        };
        let slot = match (m.target.kind, expert, proj) {
            (ModuleKind::Q, ..) => &mut layer.q,
            (ModuleKind::K, ..) => &mut layer.k,
            (ModuleKind::V, ..) => &mut layer.v,
            (ModuleKind::O, ..) => &mut layer.o,
            (ModuleKind::QA, ..) => &mut layer.q_a,
            (ModuleKind::KvA, ..) => &mut layer.kv_a,
            (ModuleKind::Gate, ..) => &mut layer.gate,
            (_, Some(e), Some(proj)) => {
                let slot = expert_slot(layer, cfg.num_experts, e);
                match proj {
                    ExpertProj::Gate => &mut slot.gate,
                    ExpertProj::Up => &mut slot.up,
                    ExpertProj::Down => &mut slot.down,
                }
            }
            _ => continue,
        };
        *slot = Some(pair);
    }
    tracing::info!(adapter = %identity.id, digest = %identity.digest, modules = manifest.modules.len(), bytes, "adapter loaded");
    Ok(AdapterWeights { identity, layers, bytes })
}

/// Where a local command's `--adapter ARG` is: ARG itself when it is a PEFT directory, else the id
/// ARG under `adapter_dir` (or under the model's own `adapters/` directory). Returns the
/// directory and the adapter's id.
pub fn locate_adapter(arg: &str, adapter_dir: Option<&Path>, model_dir: &Path) -> Result<(PathBuf, String)> {
    let as_dir = Path::new(arg);
    if as_dir.join(crate::peft::CONFIG_FILE).is_file() {
        let id = as_dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| arg.to_string());
        return Ok((as_dir.to_path_buf(), id));
    }
    let own = model_dir.join("adapters");
    let root = adapter_dir.map(Path::to_path_buf).or_else(|| Some(own).filter(|d| d.is_dir()));
    let Some(root) = root else {
        return Err(crate::LoraError::NotFound {
            id: arg.to_string(),
            why: format!("--adapter {arg:?} is not a directory with adapter_config.json (or give --adapter-dir)"),
        });
    };
    crate::validate_id(arg)?;
    Ok((root.join(arg), arg.to_string()))
}

/// Loads every pair of the adapter in `dir` (a model that runs its own experts), named `id`.
pub fn load_local_adapter<B: Backend>(
    dir: &Path,
    id: &str,
    cfg: &ModelConfig,
    backend: &B,
) -> Result<AdapterWeights<B>> {
    let identity = AdapterIdentity { path: id.to_string(), id: id.to_string(), digest: String::new() };
    load_adapter(dir, identity, cfg, backend, AdapterParts::all())
}

/// Reads a module's pair, refusing non-finite weights.
fn read_finite(manifest: &AdapterManifest, m: &TargetModule, adapter: &str) -> Result<(Vec<f32>, Vec<f32>)> {
    let (a, b) = manifest.read_pair(m, adapter)?;
    if let Some(bad) = a.iter().chain(&b).find(|v| !v.is_finite()) {
        return Err(crate::LoraError::Module {
            adapter: adapter.into(),
            module: m.module.clone(),
            message: format!("weights contain a non-finite value ({bad})"),
        });
    }
    Ok((a, b))
}

/// Expert `e`'s own pair out of a fused one: rows `e·r..(e+1)·r` of A (`[E·r, in]`, expert-major)
/// and, of B (`[out, E·r]`, expert index fastest), the columns `j·E + e` for `j < r`.
fn expert_slice(a: &[f32], b: &[f32], m: &TargetModule, e: usize) -> (Vec<f32>, Vec<f32>) {
    let (r, n, inp) = (m.rank, m.experts, m.in_features);
    let a_e = a[e * r * inp..(e + 1) * r * inp].to_vec();
    let mut b_e = Vec::with_capacity(m.out_features * r);
    for row in b.chunks_exact(n * r) {
        b_e.extend((0..r).map(|j| row[j * n + e]));
    }
    (a_e, b_e)
}

/// Rows `parity, parity + 2, ..` of a `[rows, cols]` matrix.
fn every_other_row(m: &[f32], cols: usize, parity: usize) -> Vec<f32> {
    m.chunks_exact(cols).skip(parity).step_by(2).flatten().copied().collect()
}

/// `new row i = old row source(i)` of a `[rows, cols]` matrix.
fn reorder_rows(m: &[f32], cols: usize, source: impl Fn(usize) -> usize) -> Vec<f32> {
    (0..m.len() / cols.max(1)).flat_map(|i| m[source(i) * cols..(source(i) + 1) * cols].iter().copied()).collect()
}

/// Expert `e`'s LoRA slot of a layer, created on first use.
fn expert_slot<B: Backend>(layer: &mut LayerLora<B>, num_experts: usize, e: usize) -> &mut ExpertLora<B> {
    if layer.experts.len() < num_experts {
        layer.experts.resize_with(num_experts, || None);
    }
    layer.experts[e].get_or_insert_with(|| ExpertLora { gate: None, up: None, down: None })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft::LoraTarget;

    #[test]
    fn fused_pairs_split_as_peft_reshapes_them() {
        // E = 2 experts, r = 2, in = 3, out = 2. PEFT: A.reshape(E, r, in), B.reshape(out, r, E).
        let m = TargetModule {
            module: "m".into(),
            target: LoraTarget { layer: 0, kind: ModuleKind::FusedExperts { proj: FusedProj::Down } },
            rank: 2,
            experts: 2,
            in_features: 3,
            out_features: 2,
            scale: 1.0,
        };
        let a: Vec<f32> = (0..12).map(|x| x as f32).collect();
        // B[o, j*E + e] = 100*o + 10*j + e
        let b: Vec<f32> = (0..2).flat_map(|o| (0..4).map(move |c| (100 * o + 10 * (c / 2) + c % 2) as f32)).collect();
        let (a1, b1) = expert_slice(&a, &b, &m, 1);
        assert_eq!(a1, vec![6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
        assert_eq!(b1, vec![1.0, 11.0, 101.0, 111.0]);
    }
}
