//! `moe-placement` plans where experts live from the load the routers observed: EPLB-style
//! greedy replication of the heaviest experts onto the least loaded workers that have room, and
//! dropping spare replicas of cold experts to make that room. It is pure: it reads a placement
//! (which worker holds which (layer, expert)), per-expert load and per-worker capacity, and
//! returns the steps to take with the balance before and after. It never proposes a plan that
//! leaves an expert without a holder, and [`check_plan`] refuses one that would, naming it.
//!
//! Balance of a layer is `mean / max` over workers of the load each would compute when every
//! expert's tokens are split evenly among its holders (1.0 = perfectly even).

use std::collections::BTreeSet;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("layer {layer} expert {expert} would have no holder")]
    Orphaned { layer: usize, expert: usize },
    #[error("worker {worker} would hold {held} experts, over its capacity of {capacity}")]
    OverCapacity { worker: String, held: usize, capacity: usize },
    #[error("step {step}: {message}")]
    BadStep { step: usize, message: String },
    #[error("the load covers {got} experts, the placement {want}")]
    Shape { got: usize, want: usize },
    #[error("worker {worker} says it hosts layer {layer} expert {expert}, which the model does not have")]
    UnknownExpert { worker: String, layer: usize, expert: usize },
}

/// One worker: its name (address), what it holds, and how many experts it may hold in all.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerSlots {
    pub name: String,
    /// (layer, expert) pairs it holds.
    pub experts: BTreeSet<(usize, usize)>,
    pub capacity: usize,
}

/// Which worker holds which expert, and each expert's observed load.
#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    pub num_layers: usize,
    pub num_experts: usize,
    pub workers: Vec<WorkerSlots>,
    /// Tokens per expert, `[layer * num_experts + expert]`.
    pub load: Vec<u64>,
}

/// One step of a plan. Loads come before the unloads they make room for, so an expert always
/// keeps a holder (make before break).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Load { worker: usize, layer: usize, expert: usize },
    Unload { worker: usize, layer: usize, expert: usize },
}

/// A plan and what it is expected to do.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Balance per layer before and after.
    pub before: Vec<f64>,
    pub after: Vec<f64>,
}

impl Plan {
    pub fn mean(balance: &[f64]) -> f64 {
        balance.iter().sum::<f64>() / balance.len().max(1) as f64
    }
}

impl Cluster {
    /// The load covers the model, and every worker's experts are the model's (what workers
    /// report in `Describe` is a peer's word: out of range it would index past the load).
    fn check_shape(&self) -> Result<(), PlanError> {
        let want = self.num_layers * self.num_experts;
        if self.load.len() != want {
            return Err(PlanError::Shape { got: self.load.len(), want });
        }
        for w in &self.workers {
            if let Some(&(layer, expert)) =
                w.experts.iter().find(|&&(l, e)| l >= self.num_layers || e >= self.num_experts)
            {
                return Err(PlanError::UnknownExpert { worker: w.name.clone(), layer, expert });
            }
        }
        Ok(())
    }

    fn holders(&self, layer: usize, expert: usize) -> usize {
        self.workers.iter().filter(|w| w.experts.contains(&(layer, expert))).count()
    }

    /// Each worker's share of layer `layer`'s load (an expert's load split evenly among holders).
    pub fn worker_load(&self, layer: usize) -> Vec<f64> {
        let mut per = vec![0.0; self.workers.len()];
        for e in 0..self.num_experts {
            let n = self.holders(layer, e);
            if n == 0 {
                continue;
            }
            let share = self.load[layer * self.num_experts + e] as f64 / n as f64;
            for (w, p) in self.workers.iter().zip(per.iter_mut()) {
                if w.experts.contains(&(layer, e)) {
                    *p += share;
                }
            }
        }
        per
    }

    /// `mean / max` of [`Self::worker_load`] (1.0 when the layer has no load).
    pub fn balance(&self, layer: usize) -> f64 {
        let per = self.worker_load(layer);
        let max = per.iter().copied().fold(0.0, f64::max);
        if max <= 0.0 {
            return 1.0;
        }
        per.iter().sum::<f64>() / per.len() as f64 / max
    }

    fn balances(&self) -> Vec<f64> {
        (0..self.num_layers).map(|l| self.balance(l)).collect()
    }

    fn apply(&mut self, step: &Step) {
        match *step {
            Step::Load { worker, layer, expert } => {
                self.workers[worker].experts.insert((layer, expert));
            }
            Step::Unload { worker, layer, expert } => {
                self.workers[worker].experts.remove(&(layer, expert));
            }
        }
    }
}

/// Plans replicas and moves until every layer's balance reaches `target` or no step helps, at
/// most `max_steps` steps.
pub fn plan(cluster: &Cluster, target: f64, max_steps: usize) -> Result<Plan, PlanError> {
    cluster.check_shape()?;
    let before = cluster.balances();
    let mut c = cluster.clone();
    let mut steps = Vec::new();
    while steps.len() + 2 <= max_steps {
        // The layers furthest from even first; the first that a replica improves gets it.
        let mut layers: Vec<(usize, f64)> = (0..c.num_layers).map(|l| (l, c.balance(l))).collect();
        layers.retain(|(_, b)| *b < target);
        layers.sort_by(|a, b| a.1.total_cmp(&b.1));
        let Some(new_steps) = layers.iter().find_map(|&(l, _)| best_replica(&c, l)) else { break };
        for s in &new_steps {
            c.apply(s);
        }
        steps.extend(new_steps);
    }
    let after = c.balances();
    Ok(Plan { steps, before, after })
}

/// The replica of one of `layer`'s experts that lowers its heaviest worker's load the most:
/// a load on the least loaded worker without it, after an unload of a spare replica of a cold
/// expert when that worker is full. `None` when nothing improves the layer.
fn best_replica(c: &Cluster, layer: usize) -> Option<Vec<Step>> {
    let per = c.worker_load(layer);
    let max = per.iter().copied().fold(0.0, f64::max);
    let heaviest = (0..per.len()).max_by(|&a, &b| per[a].total_cmp(&per[b]))?;
    // The heaviest worker's experts, heaviest share first.
    let mut candidates: Vec<(f64, usize)> = (0..c.num_experts)
        .filter(|&e| c.workers[heaviest].experts.contains(&(layer, e)))
        .map(|e| (c.load[layer * c.num_experts + e] as f64 / c.holders(layer, e).max(1) as f64, e))
        .collect();
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut order: Vec<usize> = (0..per.len()).collect();
    order.sort_by(|&a, &b| per[a].total_cmp(&per[b]));
    for (_, e) in candidates {
        for &w in &order {
            if c.workers[w].experts.contains(&(layer, e)) {
                continue;
            }
            let mut steps = Vec::new();
            if c.workers[w].experts.len() >= c.workers[w].capacity {
                match coldest_spare(c, w, layer, e) {
                    Some(s) => steps.push(s),
                    None => continue,
                }
            }
            // Make before break: the load first, then the unload it makes room for.
            steps.insert(0, Step::Load { worker: w, layer, expert: e });
            let mut trial = c.clone();
            for s in &steps {
                trial.apply(s);
            }
            let trial_per = trial.worker_load(layer);
            let trial_max = trial_per.iter().copied().fold(0.0, f64::max);
            let other_layers_ok = (0..c.num_layers).all(|l| l == layer || trial.balance(l) >= c.balance(l) - 1e-9);
            if trial_max < max - 1e-9 && other_layers_ok {
                return Some(steps);
            }
        }
    }
    None
}

/// A spare replica on worker `w` (its expert has another holder) with the least load per
/// holder, not (layer, expert) itself: what to drop to make room there.
fn coldest_spare(c: &Cluster, w: usize, layer: usize, expert: usize) -> Option<Step> {
    c.workers[w]
        .experts
        .iter()
        .filter(|&&(l, e)| (l, e) != (layer, expert) && c.holders(l, e) >= 2)
        .map(|&(l, e)| (c.load[l * c.num_experts + e] as f64 / c.holders(l, e) as f64, l, e))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, l, e)| Step::Unload { worker: w, layer: l, expert: e })
}

/// Checks a plan step by step against a placement: every step names a worker that exists and a
/// change that makes sense, no worker goes over capacity after a step's loads and unloads, and
/// no expert is ever left without a holder. The first violation is the error.
pub fn check_plan(cluster: &Cluster, steps: &[Step]) -> Result<(), PlanError> {
    cluster.check_shape()?;
    let mut c = cluster.clone();
    for (i, s) in steps.iter().enumerate() {
        let (Step::Load { worker, layer, expert } | Step::Unload { worker, layer, expert }) = *s;
        let bad = |m: String| PlanError::BadStep { step: i, message: m };
        let w = c.workers.get(worker).ok_or_else(|| bad(format!("no worker {worker}")))?;
        if layer >= c.num_layers || expert >= c.num_experts {
            return Err(bad(format!("layer {layer} expert {expert} is not in the model")));
        }
        let held = w.experts.contains(&(layer, expert));
        match s {
            Step::Load { .. } if held => {
                return Err(bad(format!("{} already holds layer {layer} expert {expert}", w.name)))
            }
            Step::Unload { .. } if !held => {
                return Err(bad(format!("{} does not hold layer {layer} expert {expert}", w.name)))
            }
            _ => {}
        }
        c.apply(s);
        if let Step::Unload { .. } = s {
            if c.holders(layer, expert) == 0 {
                return Err(PlanError::Orphaned { layer, expert });
            }
        }
    }
    // Capacity is checked on the result: a load may briefly precede the unload it makes room for.
    for w in &c.workers {
        if w.experts.len() > w.capacity {
            return Err(PlanError::OverCapacity {
                worker: w.name.clone(),
                held: w.experts.len(),
                capacity: w.capacity,
            });
        }
    }
    for l in 0..c.num_layers {
        for e in 0..c.num_experts {
            if c.holders(l, e) == 0 && cluster.holders(l, e) > 0 {
                return Err(PlanError::Orphaned { layer: l, expert: e });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
