//! Expert load per adapter over a sliding window: how many tokens each adapter's requests
//! (the base model is `base`) routed to each (layer, expert) in the last [`WINDOW`]. A tenant's
//! gate adapter changes where its tokens go, so the hot experts depend on who is active; this is
//! what expert placement reads (the `ExpertLoad` RPC, `moe placement plan`).
//!
//! Bounded: [`TRACKED`] adapters have a key of their own (a key whose adapter neither was asked
//! for nor routed a token during a whole window is given to the next newcomer); the rest count
//! under `other` (key 0). The
//! compute loop adds its per-key counters once a step; buckets are reused, so recording does not
//! allocate in steady state.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How far back the load reaches.
pub const WINDOW: Duration = Duration::from_secs(60);
/// The window's granularity.
pub const BUCKET: Duration = Duration::from_secs(5);
/// Adapters counted under their own name; the rest are `other`.
pub const TRACKED: usize = 16;
/// The name of key 0.
pub const OTHER: &str = "other";
/// The name the base model's load counts under.
pub const BASE: &str = "base";

/// One adapter's load in the window.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterLoad {
    /// The adapter id, [`BASE`] or [`OTHER`].
    pub name: String,
    /// Tokens routed per expert, `[layer * num_experts + expert]`.
    pub tokens: Vec<u64>,
}

/// The load of the last window, heaviest adapter first.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadSnapshot {
    pub num_layers: usize,
    pub num_experts: usize,
    /// How much time the counts cover (less than [`WINDOW`] shortly after start).
    pub window: Duration,
    pub adapters: Vec<AdapterLoad>,
}

impl LoadSnapshot {
    /// Every adapter's load added up, `[layer * num_experts + expert]`.
    pub fn total(&self) -> Vec<u64> {
        let mut sum = vec![0u64; self.num_layers * self.num_experts];
        for a in &self.adapters {
            for (s, t) in sum.iter_mut().zip(&a.tokens) {
                *s += t;
            }
        }
        sum
    }
}

struct Inner {
    layers: usize,
    experts: usize,
    /// Key -> adapter name (`None`: free) and when it was last asked for; key 0 is [`OTHER`].
    names: Vec<Option<(String, Instant)>>,
    /// (start, counts per key) oldest first; each `[(key * layers + layer) * experts + expert]`.
    buckets: VecDeque<(Instant, Vec<u64>)>,
    started: Instant,
}

/// The shared window: the compute loop records into it, the API side reads it.
#[derive(Clone)]
pub struct ExpertLoad {
    inner: Arc<Mutex<Inner>>,
}

impl ExpertLoad {
    pub fn new(num_layers: usize, num_experts: usize) -> Self {
        let mut names = vec![None; TRACKED + 1];
        let started = Instant::now();
        names[0] = Some((OTHER.to_string(), started));
        let inner = Inner { layers: num_layers, experts: num_experts, names, buckets: VecDeque::new(), started };
        Self { inner: Arc::new(Mutex::new(inner)) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the counts consistent; a panic elsewhere cannot half-write them.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key to count `adapter`'s tokens under (`""`: the base model), asked for at `now`.
    pub fn key_for(&self, adapter: &str, now: Instant) -> u32 {
        let name = if adapter.is_empty() { BASE } else { adapter };
        let mut inner = self.lock();
        if let Some(k) = inner.names.iter().position(|n| n.as_ref().is_some_and(|(n, _)| n == name)) {
            if let Some((_, used)) = inner.names[k].as_mut() {
                *used = now;
            }
            return k as u32;
        }
        let idle = |n: &Option<(String, Instant)>| match n {
            None => true,
            Some((_, used)) => now.saturating_duration_since(*used) >= WINDOW,
        };
        match (1..inner.names.len()).find(|&k| idle(&inner.names[k])) {
            Some(k) => {
                let per_key = inner.layers * inner.experts;
                // The previous holder's counts are not the newcomer's.
                for (_, counts) in inner.buckets.iter_mut() {
                    if let Some(slice) = counts.get_mut(k * per_key..(k + 1) * per_key) {
                        slice.fill(0);
                    }
                }
                inner.names[k] = Some((name.to_string(), now));
                k as u32
            }
            None => 0,
        }
    }

    /// Adds a step's per-key counters (as `Workspace::keyed_expert_tokens_mut` holds them) and
    /// zeroes them.
    pub fn record(&self, now: Instant, keyed: &mut [u64]) {
        if keyed.iter().all(|&c| c == 0) {
            return;
        }
        let mut inner = self.lock();
        let len = inner.names.len() * inner.layers * inner.experts;
        let current = inner.buckets.back().is_some_and(|(start, _)| now.saturating_duration_since(*start) < BUCKET);
        if !current {
            let expired =
                inner.buckets.front().is_some_and(|(start, _)| now.saturating_duration_since(*start) >= WINDOW);
            let mut counts = match expired {
                true => inner.buckets.pop_front().map(|(_, c)| c).unwrap_or_default(),
                false => Vec::new(),
            };
            counts.clear();
            counts.resize(len, 0);
            inner.buckets.push_back((now, counts));
        }
        while inner.buckets.len() > 1
            && inner.buckets.front().is_some_and(|(start, _)| now.saturating_duration_since(*start) >= WINDOW)
        {
            inner.buckets.pop_front();
        }
        // A key whose tokens are still coming is in use, however long ago it was asked for.
        let per_key = inner.layers * inner.experts;
        for (k, name) in inner.names.iter_mut().enumerate() {
            let busy = keyed.get(k * per_key..(k + 1) * per_key).is_some_and(|c| c.iter().any(|&n| n > 0));
            if let (true, Some((_, used))) = (busy, name.as_mut()) {
                *used = now;
            }
        }
        if let Some((_, counts)) = inner.buckets.back_mut() {
            for (c, k) in counts.iter_mut().zip(keyed.iter_mut()) {
                *c += std::mem::take(k);
            }
        }
        // Keys are never past the tracked ones; anything else is dropped, not kept for later.
        keyed.fill(0);
    }

    /// The window's load, heaviest adapter first; adapters with no tokens are left out.
    pub fn snapshot(&self, now: Instant) -> LoadSnapshot {
        self.snapshot_within(now, WINDOW)
    }

    /// [`Self::snapshot`] of the buckets that started within the last `span` (at least one
    /// bucket, at most the window): what a planner reacting to a shift in the tenant mix reads.
    pub fn snapshot_within(&self, now: Instant, span: Duration) -> LoadSnapshot {
        let span = span.clamp(BUCKET, WINDOW);
        let inner = self.lock();
        let per_key = inner.layers * inner.experts;
        let mut adapters: Vec<AdapterLoad> = Vec::new();
        for (k, name) in inner.names.iter().enumerate() {
            let Some((name, _)) = name else { continue };
            let mut tokens = vec![0u64; per_key];
            for (start, counts) in &inner.buckets {
                if now.saturating_duration_since(*start) >= span {
                    continue;
                }
                if let Some(slice) = counts.get(k * per_key..(k + 1) * per_key) {
                    for (t, c) in tokens.iter_mut().zip(slice) {
                        *t += c;
                    }
                }
            }
            if tokens.iter().any(|&t| t > 0) {
                adapters.push(AdapterLoad { name: name.clone(), tokens });
            }
        }
        adapters.sort_by_key(|a| std::cmp::Reverse(a.tokens.iter().sum::<u64>()));
        let window = now.saturating_duration_since(inner.started).min(span);
        LoadSnapshot { num_layers: inner.layers, num_experts: inner.experts, window, adapters }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_adapter_within_the_window_and_bounds_the_names() {
        let load = ExpertLoad::new(2, 4);
        let t0 = Instant::now();
        let (base, acme) = (load.key_for("", t0), load.key_for("acme", t0));
        assert_eq!(load.key_for("acme", t0), acme);
        assert_ne!(base, acme);
        let mut keyed = vec![0u64; (TRACKED + 1) * 8];
        keyed[base as usize * 8 + 1] = 3; // base: layer 0, expert 1
        keyed[acme as usize * 8 + 4 + 2] = 5; // acme: layer 1, expert 2
        load.record(t0, &mut keyed);
        assert!(keyed.iter().all(|&c| c == 0), "record zeroes what it took");
        let s = load.snapshot(t0);
        assert_eq!(s.adapters[0].name, "acme");
        assert_eq!(s.adapters[0].tokens[6], 5);
        assert_eq!(s.adapters[1].name, "base");
        assert_eq!(s.total()[1], 3);
        // Past the window the counts are gone.
        assert!(load.snapshot(t0 + WINDOW + BUCKET).adapters.is_empty());
        // Every key taken: a newcomer counts as other, until a key has been idle for a window.
        for i in 0..TRACKED - 2 {
            assert!(load.key_for(&format!("t{i}"), t0) > 0);
        }
        assert_eq!(load.key_for("newcomer", t0 + BUCKET), 0);
        load.key_for("acme", t0 + WINDOW);
        let late = load.key_for("newcomer", t0 + WINDOW + BUCKET);
        assert!(late > 0 && late != load.key_for("acme", t0 + WINDOW + BUCKET));
    }

    #[test]
    fn a_key_whose_tokens_keep_coming_is_not_given_away() {
        let load = ExpertLoad::new(1, 2);
        let t0 = Instant::now();
        let long = load.key_for("long", t0);
        // A request admitted a window ago is still decoding: its tokens keep its key.
        let mut keyed = vec![0u64; (TRACKED + 1) * 2];
        keyed[long as usize * 2] = 1;
        load.record(t0 + WINDOW - BUCKET, &mut keyed);
        for i in 0..TRACKED - 1 {
            let k = load.key_for(&format!("t{i}"), t0 + WINDOW);
            assert!(k > 0 && k != long, "t{i} got key {k}");
        }
        assert_eq!(load.key_for("newcomer", t0 + WINDOW + BUCKET), 0);
        assert_eq!(load.key_for("long", t0 + WINDOW + BUCKET), long);
    }

    #[test]
    fn a_recent_snapshot_holds_only_the_last_buckets() {
        let load = ExpertLoad::new(1, 2);
        let t0 = Instant::now();
        let base = load.key_for("", t0);
        let mut keyed = vec![0u64; (TRACKED + 1) * 2];
        keyed[base as usize * 2] = 7; // expert 0, then later expert 1
        load.record(t0, &mut keyed);
        keyed[base as usize * 2 + 1] = 4;
        load.record(t0 + 4 * BUCKET, &mut keyed);
        let now = t0 + 4 * BUCKET + Duration::from_secs(1);
        assert_eq!(load.snapshot(now).total(), vec![7, 4]);
        let recent = load.snapshot_within(now, 2 * BUCKET);
        assert_eq!(recent.total(), vec![0, 4], "the shift shows at once");
        assert_eq!(recent.window, 2 * BUCKET);
    }
}
