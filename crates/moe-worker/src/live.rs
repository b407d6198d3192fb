//! Experts loaded and unloaded while the worker serves.
//!
//! A load reads the weights with no lock held, within the expert memory budget (all of the
//! requested experts or none), makes the adapter registry read pairs for them from then on
//! (loaded versions are forgotten, so no request combines a new expert with an adapter version
//! that lacks its pair), inserts them under the layers' write lock, and only then publishes
//! them: routers send to an expert only once it is computable.
//!
//! An unload is make-before-break. The experts leave the published list at once (the worker's
//! membership record follows, and routers stop choosing this worker for them), but they are
//! still computed for a router that has not seen the change yet. They are dropped once no
//! request has named them for the quiet period (counted from the start of the drain), or when
//! the drain limit is reached; a request that still names one afterwards is refused as "not
//! hosted", which routers treat like a dead worker for those rows (a replica computes them).

use crate::error::{Result, WorkerError};
use crate::host::{hosted_of, DrainLimits, ExpertHost, HostedLayer};
use moe_compute::Backend;
use moe_model::checkpoint::Checkpoint;
use moe_model::weights::load_expert;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const MIB: f64 = (1 << 20) as f64;

impl<B: Backend> ExpertHost<B> {
    /// Caps the weight memory of hosted experts (`--max-expert-mb`); refuses when the experts
    /// already loaded exceed it.
    pub fn with_expert_budget(mut self, bytes: Option<usize>) -> Result<Self> {
        if let Some(max) = bytes {
            let held = self.hosted().iter().map(|(_, e)| e.len()).sum::<usize>();
            let need = held * self.bytes_per_expert.load(Ordering::Relaxed);
            if need > max {
                return Err(WorkerError::ResourceExhausted(format!(
                    "the {held} experts selected need {:.1} MiB, over the expert budget of {:.1} MiB (--max-expert-mb)",
                    need as f64 / MIB,
                    max as f64 / MIB
                )));
            }
        }
        self.max_expert_bytes = bytes;
        Ok(self)
    }

    /// How long unloads wait for routers to stop sending.
    pub fn with_drain_limits(mut self, drain: DrainLimits) -> Self {
        self.drain = drain;
        self
    }

    fn check_names(&self, experts: &[(usize, u32)]) -> Result<BTreeSet<(usize, u32)>> {
        let c = &self.config;
        if experts.is_empty() {
            return Err(WorkerError::InvalidRequest("no experts named".into()));
        }
        for &(layer, expert) in experts {
            if layer >= c.num_layers || !c.is_moe_layer(layer) {
                return Err(WorkerError::UnknownLayer { layer, num_layers: c.num_layers });
            }
            if expert as usize >= c.num_experts {
                return Err(WorkerError::InvalidRequest(format!(
                    "layer {layer} expert {expert}: the model has {} experts per layer",
                    c.num_experts
                )));
            }
        }
        Ok(experts.iter().copied().collect())
    }

    fn publish(&self) {
        let hosted = hosted_of(&self.read_layers());
        self.hosted_tx.send_if_modified(|h| {
            let changed = *h != hosted;
            *h = hosted;
            changed
        });
    }

    /// Loads `experts` (those already hosted are skipped; a draining one stops draining).
    /// All or none: over the budget or on a read error nothing changes.
    pub fn load_experts(&self, experts: &[(usize, u32)]) -> Result<usize> {
        let _one = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let wanted = self.check_names(experts)?;
        let (mut revive, mut fresh) = (Vec::new(), Vec::new());
        {
            let layers = self.read_layers();
            for &(l, e) in &wanted {
                match layers[l].as_ref() {
                    Some(h) if h.draining.contains_key(&e) => revive.push((l, e)),
                    Some(h) if h.local.contains_key(&e) => {}
                    _ => fresh.push((l, e)),
                }
            }
        }
        if let Some(max) = self.max_expert_bytes {
            let held: usize = self.read_layers().iter().flatten().map(|l| l.ids.len()).sum();
            let per = self.bytes_per_expert.load(Ordering::Relaxed);
            let need = (held + fresh.len()) * per;
            if need > max {
                return Err(WorkerError::ResourceExhausted(format!(
                    "loading {} more experts would hold {} ({:.1} MiB), over the expert budget of {:.1} MiB (--max-expert-mb)",
                    fresh.len(),
                    held + fresh.len(),
                    need as f64 / MIB,
                    max as f64 / MIB
                )));
            }
        }
        let mut loaded = Vec::with_capacity(fresh.len());
        if !fresh.is_empty() {
            let ckpt = Checkpoint::open(&self.dir)?;
            for &(l, e) in &fresh {
                loaded.push((l, e, load_expert(&ckpt, &self.config, &self.backend, l, e as usize)?));
            }
            if let Some((_, _, w)) = loaded.first() {
                let per = self.backend.matrix_bytes(&w.gate_up) + self.backend.matrix_bytes(&w.down);
                self.bytes_per_expert.store(per, Ordering::Relaxed);
            }
            // Adapter versions loaded from now on carry pairs for the new experts.
            if let Ok(mut set) = self.adapter_experts.write() {
                set.extend(fresh.iter().map(|&(l, e)| (l, e as usize)));
            }
            if let Some(registry) = &self.adapters {
                registry.forget_loaded();
            }
        }
        {
            let mut layers = self.layers.write().unwrap_or_else(|p| p.into_inner());
            for (l, e, w) in loaded {
                layers[l].get_or_insert_with(HostedLayer::empty).push(e, w);
            }
            for (l, e) in &revive {
                if let Some(h) = layers[*l].as_mut() {
                    h.draining.remove(e);
                }
            }
        }
        self.publish();
        tracing::info!(added = fresh.len(), revived = revive.len(), "experts loaded");
        Ok(fresh.len() + revive.len())
    }

    /// Unloads `experts` make-before-break (see the module doc); all must be hosted and not
    /// already draining. Returns how many were dropped and how long the drain took.
    pub fn unload_experts(&self, experts: &[(usize, u32)]) -> Result<(usize, Duration)> {
        let _one = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let wanted = self.check_names(experts)?;
        let start = Instant::now();
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        {
            let mut layers = self.layers.write().unwrap_or_else(|p| p.into_inner());
            for &(l, e) in &wanted {
                let hosted =
                    layers[l].as_ref().is_some_and(|h| h.local.contains_key(&e) && !h.draining.contains_key(&e));
                if !hosted {
                    return Err(WorkerError::NotHosted { layer: l, expert: e });
                }
            }
            for &(l, e) in &wanted {
                if let Some(h) = layers[l].as_mut() {
                    h.draining.insert(e, AtomicU64::new(now_ms));
                }
            }
        }
        self.publish();
        tracing::info!(experts = wanted.len(), "draining experts before unloading them");
        let quiet = self.drain.quiet.as_millis() as u64;
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let now = self.epoch.elapsed().as_millis() as u64;
            let last_named = {
                let layers = self.read_layers();
                let named = wanted.iter().filter_map(|&(l, e)| layers[l].as_ref()?.draining.get(&e));
                named.map(|t| t.load(Ordering::Relaxed)).max().unwrap_or(0)
            };
            if now.saturating_sub(last_named) >= quiet {
                break;
            }
            if start.elapsed() >= self.drain.max {
                tracing::warn!("drain limit reached while routers still name the experts; dropping them");
                break;
            }
        }
        {
            let mut layers = self.layers.write().unwrap_or_else(|p| p.into_inner());
            let mut by_layer: HashMap<usize, Vec<u32>> = HashMap::new();
            for &(l, e) in &wanted {
                by_layer.entry(l).or_default().push(e);
            }
            for (l, gone) in by_layer {
                let Some(old) = layers[l].take() else { continue };
                let mut kept = HostedLayer::empty();
                let draining = old.draining;
                for (e, w) in old.ids.into_iter().zip(old.weights) {
                    if !gone.contains(&e) {
                        kept.push(e, w);
                    }
                }
                kept.draining = draining.into_iter().filter(|(e, _)| !gone.contains(e)).collect();
                layers[l] = (!kept.ids.is_empty()).then_some(kept);
            }
        }
        if let Ok(mut set) = self.adapter_experts.write() {
            for &(l, e) in &wanted {
                set.remove(&(l, e as usize));
            }
        }
        self.publish();
        let took = start.elapsed();
        tracing::info!(experts = wanted.len(), drain_ms = took.as_millis() as u64, "experts unloaded");
        Ok((wanted.len(), took))
    }
}
