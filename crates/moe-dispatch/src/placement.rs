//! Which workers hold each (layer, expert). Built from what the workers describe; checks that
//! every expert of every MoE layer has a holder.

use crate::error::{DispatchError, Result};

#[derive(Clone, Debug, Default)]
pub struct Placement {
    num_experts: usize,
    /// `holders[layer][expert]` = indices of the workers that host it.
    holders: Vec<Vec<Vec<usize>>>,
}

impl Placement {
    pub fn new(num_layers: usize, num_experts: usize) -> Self {
        Self { num_experts, holders: vec![vec![Vec::new(); num_experts]; num_layers] }
    }

    /// Records that `worker` hosts `experts` of `layer`.
    pub fn add(&mut self, worker: usize, layer: usize, experts: &[u32]) -> Result<()> {
        let num_layers = self.holders.len();
        let layer_holders = self.holders.get_mut(layer).ok_or_else(|| {
            DispatchError::Placement(format!("worker {worker} reports layer {layer}, but the model has {num_layers}"))
        })?;
        for &e in experts {
            let h = layer_holders.get_mut(e as usize).ok_or_else(|| {
                DispatchError::Placement(format!(
                    "worker {worker} reports expert {e}, but the model has {}",
                    self.num_experts
                ))
            })?;
            if !h.contains(&worker) {
                h.push(worker);
            }
        }
        Ok(())
    }

    pub fn holders(&self, layer: usize, expert: u32) -> &[usize] {
        self.holders.get(layer).and_then(|l| l.get(expert as usize)).map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// The (layer, expert) pairs of `moe_layers` with no holder, in order.
    pub fn missing(&self, moe_layers: &[usize]) -> Vec<(usize, u32)> {
        let mut out = Vec::new();
        for &l in moe_layers {
            for e in 0..self.num_experts as u32 {
                if self.holders(l, e).is_empty() {
                    out.push((l, e));
                }
            }
        }
        out
    }

    /// A readable summary of missing experts, e.g. `layer 0: experts 2, 3; layer 1: expert 5`.
    pub fn describe_missing(missing: &[(usize, u32)]) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut i = 0;
        while i < missing.len() {
            let layer = missing[i].0;
            let ids: Vec<String> = missing[i..].iter().take_while(|m| m.0 == layer).map(|m| m.1.to_string()).collect();
            i += ids.len();
            parts.push(format!("layer {layer}: expert{} {}", if ids.len() > 1 { "s" } else { "" }, ids.join(", ")));
        }
        parts.join("; ")
    }
}
