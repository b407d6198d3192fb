//! Turning a checked manifest into backend weights, keeping only the pairs this process applies:
//! a router the attention and gate pairs, a worker the pairs of the experts it hosts, a
//! single-process model all of them.

use crate::error::Result;
use crate::peft::{AdapterManifest, ExpertProj, ModuleKind};
use moe_compute::{Backend, ExpertLora, LoraWeights};
use moe_model::{AdapterIdentity, AdapterWeights, LayerLora, ModelConfig};
use std::path::Path;

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
        let wanted = match m.target.kind {
            ModuleKind::Expert { expert, .. } => {
                layer.has_expert_lora = true;
                (parts.experts)(m.target.layer, expert)
            }
            _ => parts.dense,
        };
        if !wanted {
            continue;
        }
        let (a, b) = manifest.read_pair(m, &identity.id)?;
        if let Some(bad) = a.iter().chain(&b).find(|v| !v.is_finite()) {
            return Err(crate::LoraError::Module {
                adapter: identity.id.clone(),
                module: m.module.clone(),
                message: format!("weights contain a non-finite value ({bad})"),
            });
        }
        bytes += 4 * (a.len() + b.len());
        let pair = LoraWeights {
            a: backend.matrix(m.rank, m.in_features, a)?,
            b: backend.matrix(m.out_features, m.rank, b)?,
            scale: m.scale,
        };
        let slot = match m.target.kind {
            ModuleKind::Q => &mut layer.q,
            ModuleKind::K => &mut layer.k,
            ModuleKind::V => &mut layer.v,
            ModuleKind::O => &mut layer.o,
            ModuleKind::Gate => &mut layer.gate,
            ModuleKind::Expert { expert, proj } => {
                if layer.experts.len() < cfg.num_experts {
                    layer.experts.resize_with(cfg.num_experts, || None);
                }
                let e = layer.experts[expert].get_or_insert_with(|| ExpertLora { gate: None, up: None, down: None });
                match proj {
                    ExpertProj::Gate => &mut e.gate,
                    ExpertProj::Up => &mut e.up,
                    ExpertProj::Down => &mut e.down,
                }
            }
        };
        *slot = Some(pair);
    }
    tracing::info!(adapter = %identity.id, digest = %identity.digest, modules = manifest.modules.len(), bytes, "adapter loaded");
    Ok(AdapterWeights { identity, layers, bytes })
}
