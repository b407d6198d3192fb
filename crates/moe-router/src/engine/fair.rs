//! Who is admitted next, and who makes room. Under fair scheduling (the default) every client — a
//! tenant, or without a tenants file an adapter (the base model is one) — has a virtual counter
//! of the service it got: each step adds its sequences' prefill tokens times `prefill_weight`
//! and decode tokens times `decode_weight`, divided by the tenant's `weight` (the Virtual Token
//! Counter of Sheng et al., OSDI 2024). Tokens served from the prefix cache cost nothing; a
//! resume's recomputation costs what it computes; a preempted request's recomputation of what it
//! had is not charged (the scheduler chose it). A client that
//! becomes active again starts at the least counter among the active ones (no banked credit).
//!
//! Admission takes, among the waiting requests and the preempted ones, the highest priority
//! class, then the least-served client, then the earliest arrival. When the best candidate does
//! not fit (the batch or the KV cache is full) and has waited `preempt_after`, a running
//! sequence is preempted if it is of a lower class, or of the same class and its client is over
//! its fair share while the candidate's is under it: more than `preempt_margin` weighted tokens
//! ahead, or holding more than its weighted share of the running batch while the candidate's
//! client holds less than its own (so a light tenant's request does not wait for a flooding
//! tenant's requests to finish). The preempted sequence's full pages go to the prefix cache, the
//! rest are freed, and it waits (stream open) to be resumed by recomputation, which determinism
//! makes give exactly the tokens it would have produced. A sequence is preempted at most
//! `max_preemptions` times. First-come-first-served (`--scheduling fcfs`) keeps arrival order
//! and never preempts.

use super::compute_loop::{ComputeLoop, Sequence};
use super::scheduling::Scheduling;
use super::Submission;
use moe_compute::Backend;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Whose service a request counts as: its tenant, or without tenants its adapter.
pub(super) fn client_of(req: &crate::request::ValidatedRequest) -> &str {
    match (&req.tenant, &req.adapter) {
        (Some(t), _) => t,
        (None, Some(pin)) => &pin.identity().id,
        (None, None) => "",
    }
}

/// A request that may be admitted next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Candidate {
    Waiting(usize),
    Paused(usize),
}

impl<B: Backend> ComputeLoop<B> {
    /// Takes in a new submission; under fair scheduling its client, if idle until now, starts
    /// at the least counter among the active clients.
    pub(super) fn enqueue(&mut self, s: Submission) {
        if self.config.scheduling.policy == Scheduling::Fair {
            let client = client_of(&s.req);
            let active = |c: &str| {
                self.running.iter().any(|r| r.client == c)
                    || self.paused.iter().any(|r| r.client == c)
                    || self.waiting.iter().any(|w| client_of(&w.req) == c)
            };
            if !active(client) {
                let floor = self
                    .running
                    .iter()
                    .chain(self.paused.iter())
                    .map(|r| self.fair.counter(&r.client))
                    .chain(self.waiting.iter().map(|w| self.fair.counter(client_of(&w.req))))
                    .fold(f64::INFINITY, f64::min);
                if floor.is_finite() {
                    self.fair.lift(client, floor);
                }
            }
        }
        self.waiting.push_back(s);
    }

    /// The request to admit next (module doc).
    pub(super) fn pick(&self) -> Option<Candidate> {
        if self.config.scheduling.policy == Scheduling::Fcfs {
            return match (self.paused.is_empty(), self.waiting.is_empty()) {
                (false, _) => Some(Candidate::Paused(0)),
                (true, false) => Some(Candidate::Waiting(0)),
                (true, true) => None,
            };
        }
        // Higher class, then less service, then earlier arrival.
        let rank = |priority: i32, client: &str, at: Instant| (-(priority as i64), self.fair.counter(client), at);
        let better = |a: &(i64, f64, Instant), b: &(i64, f64, Instant)| {
            a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)).is_lt()
        };
        let mut best: Option<(Candidate, (i64, f64, Instant))> = None;
        let paused = self
            .paused
            .iter()
            .enumerate()
            .map(|(i, s)| (Candidate::Paused(i), rank(s.req.priority, &s.client, s.submitted)));
        let waiting = self
            .waiting
            .iter()
            .enumerate()
            .map(|(i, w)| (Candidate::Waiting(i), rank(w.req.priority, client_of(&w.req), w.submitted)));
        for (c, r) in paused.chain(waiting) {
            if best.as_ref().is_none_or(|(_, b)| better(&r, b)) {
                best = Some((c, r));
            }
        }
        best.map(|(c, _)| c)
    }

    /// The candidate's priority, client, and how long it has waited.
    fn describe(&self, c: Candidate) -> Option<(i32, String, Duration)> {
        match c {
            Candidate::Waiting(i) => {
                self.waiting.get(i).map(|w| (w.req.priority, client_of(&w.req).to_string(), w.submitted.elapsed()))
            }
            Candidate::Paused(i) => {
                self.paused.get(i).map(|s| (s.req.priority, s.client.clone(), s.paused_at.elapsed()))
            }
        }
    }

    /// Under fair scheduling, preempts one running sequence in favour of `c` when the module
    /// doc's rule allows; true when one was preempted.
    pub(super) fn preempt_for(&mut self, c: Candidate) -> bool {
        let cfg = &self.config.scheduling;
        if cfg.policy != Scheduling::Fair {
            return false;
        }
        let Some((priority, client, waited)) = self.describe(c) else { return false };
        if waited < cfg.preempt_after {
            return false;
        }
        let mine = self.fair.counter(&client);
        let weight = match c {
            Candidate::Waiting(i) => self.waiting.get(i).map_or(1.0, |w| w.req.share_weight),
            Candidate::Paused(i) => self.paused.get(i).map_or(1.0, |s| s.req.share_weight),
        };
        let slots = SlotShares::of(&self.running, &client, weight, self.config.max_running);
        let under = slots.held(&client) < slots.share(&client).floor();
        // The lowest class, then the most-served client, then the latest admitted.
        let victim = self
            .running
            .iter()
            .enumerate()
            .filter(|(_, s)| s.preemptions < cfg.max_preemptions)
            .filter(|(_, s)| {
                let theirs = self.fair.counter(&s.client);
                let ahead = theirs - mine > cfg.preempt_margin;
                // Holding more than its share of the batch, and ahead in service (or level with a
                // tenant that has nothing running: its first request should not wait).
                let level = theirs > mine || (theirs >= mine && slots.held(&client) == 0.0);
                let over = under && slots.held(&s.client) > slots.share(&s.client) && level;
                s.req.priority < priority || (s.req.priority == priority && s.client != client && (ahead || over))
            })
            .min_by(|(_, a), (_, b)| {
                a.req
                    .priority
                    .cmp(&b.req.priority)
                    .then(self.fair.counter(&b.client).total_cmp(&self.fair.counter(&a.client)))
                    .then(b.admitted.cmp(&a.admitted))
            })
            .map(|(i, _)| i);
        let Some(i) = victim else { return false };
        let mut s = self.running.swap_remove(i);
        tracing::debug!(request = s.id, tenant = s.tenant(), for_priority = priority, "preempted");
        self.metrics.preempted(s.tenant());
        super::step::share_pages(&mut self.kv.pages, &mut s);
        self.kv.pages.release(&mut s.cache);
        // Recomputing what it had is the scheduler's cost, not its tenant's.
        s.recompute_until = s.recompute_until.max(s.tokens.len().saturating_sub(1));
        s.preemptions += 1;
        s.paused_at = Instant::now();
        self.paused.push(s);
        self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// Charges each member's tokens of the step just taken to its client (and the metrics).
    pub(super) fn charge(&mut self, chunk: &[usize], members: &[usize]) {
        let cfg = &self.config.scheduling;
        for &i in members {
            let Some(s) = self.running.get(i) else { continue };
            let n = chunk[i];
            // A generated token fed back is decode; everything else is (re)computed prompt, but
            // what a preemption made it recompute is not charged.
            let decode = n == 1 && s.generated > 0 && s.cache.len == s.tokens.len();
            let start = s.cache.len.saturating_sub(n);
            let free = s.recompute_until.min(s.cache.len).saturating_sub(start);
            let charged = n - free.min(n);
            let cost = if decode && free == 0 { cfg.decode_weight } else { cfg.prefill_weight * charged as f64 };
            let cost = cost / s.req.share_weight.max(1e-6);
            let series = if decode { &s.scheduled.1 } else { &s.scheduled.0 };
            series.inc_by(n as u64);
            self.fair.charge(&s.client, cost);
        }
    }
}

/// How the running batch is shared among the clients of its sequences and a candidate's: each
/// holds some slots and is due `max_running × weight / total weight`.
struct SlotShares<'a> {
    /// (client, weight, slots held).
    clients: Vec<(&'a str, f64, f64)>,
    max_running: f64,
    total_weight: f64,
}

impl<'a> SlotShares<'a> {
    fn of<B: Backend>(running: &'a [Sequence<B>], candidate: &'a str, weight: f64, max_running: usize) -> Self {
        let mut clients: Vec<(&str, f64, f64)> = vec![(candidate, weight, 0.0)];
        for s in running {
            match clients.iter_mut().find(|c| c.0 == s.client) {
                Some(c) => c.2 += 1.0,
                None => clients.push((&s.client, s.req.share_weight, 1.0)),
            }
        }
        let total_weight = clients.iter().map(|c| c.1).sum::<f64>().max(1e-9);
        Self { clients, max_running: max_running as f64, total_weight }
    }

    fn held(&self, client: &str) -> f64 {
        self.clients.iter().find(|c| c.0 == client).map_or(0.0, |c| c.2)
    }

    fn share(&self, client: &str) -> f64 {
        self.clients.iter().find(|c| c.0 == client).map_or(0.0, |c| self.max_running * c.1 / self.total_weight)
    }
}

/// Re-admits a preempted sequence: its prefix from the cache, pages for the rest.
pub(super) fn resume_paused<B: Backend>(
    pages: &mut moe_model::PageAllocator,
    s: &mut Sequence<B>,
) -> Result<(), moe_model::ModelError> {
    if let Some(ns) = s.prefix_namespace {
        let ps = pages.page_size();
        let keys = moe_model::prefix::page_keys(ns, &s.tokens, ps, (s.tokens.len() - 1) / ps);
        pages.reuse(&mut s.cache, &keys);
    }
    let need = s.req.prompt.len() + s.req.max_new_tokens;
    if let Err(e) = pages.reserve(&mut s.cache, need.max(s.tokens.len())) {
        pages.release(&mut s.cache);
        return Err(e);
    }
    Ok(())
}
