//! Who is in the batch: dropping requests whose client went away or whose deadline passed
//! (freeing their pages), admitting waiting and preempted requests in the order `fair.rs`
//! decides while their whole KV need fits (preempting when it allows), and failing everything at
//! shutdown or after a failure.

use super::compute_loop::{ComputeLoop, Sequence};
use super::fair::Candidate;
use crate::error::RouterError;
use crate::request::{Event, FinishReason};
use moe_compute::Backend;
use moe_generate::Sampler;
use moe_model::{AdapterWeights, SequenceCache};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

impl<B: Backend> ComputeLoop<B> {
    /// Ends every waiting and running request with `err` (counted as `outcome`), freeing its
    /// pages and pins.
    pub(super) fn fail_all(&mut self, err: &RouterError, outcome: &'static str) {
        for mut s in self.paused.drain(..) {
            self.metrics.ended(outcome, s.tenant(), s.req.prompt.len(), s.generated, s.submitted.elapsed());
            s.end(Event::Failed(err.clone()));
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        for mut w in self.waiting.drain(..) {
            w.req.adapter = None;
            self.metrics.ended(outcome, w.tenant(), w.req.prompt.len(), 0, w.submitted.elapsed());
            let _ = w.events.send(Event::Failed(err.clone()));
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        for mut s in self.running.drain(..) {
            self.kv.pages.release(&mut s.cache);
            self.metrics.ended(outcome, s.tenant(), s.req.prompt.len(), s.generated, s.submitted.elapsed());
            s.end(Event::Failed(err.clone()));
        }
    }

    /// Drops requests whose client went away and fails expired ones, freeing their pages.
    pub(super) fn reap(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.paused.len() {
            let s = &self.paused[i];
            let expired = now >= s.req.deadline;
            if s.events.is_closed() || expired {
                let mut s = self.paused.swap_remove(i);
                if expired && !s.events.is_closed() {
                    s.end(Event::Failed(RouterError::DeadlineExceeded { millis: s.req.timeout.as_millis() as u64 }));
                }
                self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                let outcome = if expired { "deadline_exceeded" } else { "cancelled" };
                self.metrics.ended(outcome, s.tenant(), s.req.prompt.len(), s.generated, s.submitted.elapsed());
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            let expired = now >= s.req.deadline;
            if s.events.is_closed() || expired {
                let mut s = self.running.swap_remove(i);
                if expired && !s.events.is_closed() {
                    s.end(Event::Failed(RouterError::DeadlineExceeded { millis: s.req.timeout.as_millis() as u64 }));
                }
                tracing::debug!(request = s.id, expired, "request left the batch");
                self.kv.pages.release(&mut s.cache);
                let outcome = if expired { "deadline_exceeded" } else { "cancelled" };
                self.metrics.ended(outcome, s.tenant(), s.req.prompt.len(), s.generated, s.submitted.elapsed());
            } else {
                i += 1;
            }
        }
        let before = self.waiting.len();
        let metrics = self.metrics.clone();
        self.waiting.retain_mut(|w| {
            if w.events.is_closed() {
                metrics.ended("cancelled", w.tenant(), w.req.prompt.len(), 0, w.submitted.elapsed());
                return false;
            }
            if now >= w.req.deadline {
                w.req.adapter = None;
                metrics.ended("deadline_exceeded", w.tenant(), w.req.prompt.len(), 0, w.submitted.elapsed());
                let _ = w
                    .events
                    .send(Event::Failed(RouterError::DeadlineExceeded { millis: w.req.timeout.as_millis() as u64 }));
                return false;
            }
            true
        });
        self.stats.waiting.fetch_sub(before - self.waiting.len(), Ordering::SeqCst);
    }

    /// The weights of the adapter a request pinned, from this engine's registry.
    fn adapter_weights(
        &self,
        pin: Option<&moe_lora::AdapterPin>,
    ) -> Result<Option<Arc<AdapterWeights<B>>>, RouterError> {
        let Some(pin) = pin else { return Ok(None) };
        let registry = self.adapters.as_ref().ok_or_else(|| {
            RouterError::Internal(format!("adapter {:?} was pinned, but this engine has no adapters", pin.id()))
        })?;
        registry.resolve(pin).map(Some).map_err(|e| RouterError::Internal(e.to_string()))
    }

    /// The prefix cache's namespace of a request: its adapter (id and digest), its tenant under
    /// scope `tenant`, and its salt.
    fn prefix_namespace(&self, req: &crate::request::ValidatedRequest) -> Option<u128> {
        if !self.config.prefix_cache {
            return None;
        }
        let adapter = req.adapter.as_ref().map(|p| (p.identity().id.as_str(), p.identity().digest.as_str()));
        let tenant = match self.config.prefix_cache_scope {
            super::PrefixCacheScope::Tenant => req.tenant.as_deref(),
            super::PrefixCacheScope::Global => None,
        };
        Some(moe_model::prefix::namespace(adapter, tenant, req.cache_salt.as_deref()))
    }

    /// Moves waiting and preempted requests into the batch, in the order [`Self::pick`] gives,
    /// while their whole KV need fits (pages found in the prefix cache are reused and not
    /// counted again), preempting where the policy allows.
    pub(super) fn admit(&mut self) {
        while let Some(next) = self.pick() {
            let started = Instant::now();
            let room = self.running.len() < self.config.max_running;
            let admitted = room
                && match next {
                    Candidate::Waiting(i) => self.admit_waiting(i),
                    Candidate::Paused(i) => self.admit_paused(i),
                };
            let us = started.elapsed().as_micros() as u64;
            self.stats.max_admission_us.fetch_max(us, Ordering::Relaxed);
            if !admitted && !self.preempt_for(next) {
                break;
            }
        }
    }

    /// Puts a preempted sequence back into the batch; false when it does not fit now.
    fn admit_paused(&mut self, i: usize) -> bool {
        let Some(s) = self.paused.get_mut(i) else { return false };
        if super::fair::resume_paused(&mut self.kv.pages, s).is_err() {
            return false;
        }
        let mut s = self.paused.swap_remove(i);
        self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
        s.admitted = Instant::now();
        tracing::debug!(request = s.id, cached = s.cache.len, "resumed after preemption");
        self.running.push(s);
        true
    }

    /// Admits (or ends) waiting request `index`; false when it cannot be now.
    fn admit_waiting(&mut self, index: usize) -> bool {
        {
            let Some(front) = self.waiting.get(index) else { return false };
            let need = front.req.prompt.len() + front.req.max_new_tokens;
            // The prompt, then any tokens a resumed generation already produced.
            let mut tokens = Vec::with_capacity(need);
            tokens.extend_from_slice(&front.req.prompt);
            tokens.extend_from_slice(&front.req.resumed);
            let mut cache = SequenceCache::default();
            let namespace = self.prefix_namespace(&front.req);
            if let Some(ns) = namespace {
                // Every full page before the last token (which must be computed for its logits).
                let ps = self.kv.pages.page_size();
                let keys = moe_model::prefix::page_keys(ns, &tokens, ps, (tokens.len() - 1) / ps);
                self.kv.pages.reuse(&mut cache, &keys);
            }
            if self.kv.pages.reserve(&mut cache, need).is_err() {
                self.kv.pages.release(&mut cache);
                return false;
            }
            let cached_tokens = cache.len;
            if namespace.is_some() {
                let tenant = front.tenant().to_string();
                self.metrics.prefix_cache(&tenant, tokens.len(), cached_tokens);
            }
            let Some(mut sub) = self.waiting.remove(index) else { return false };
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            self.metrics.queued(sub.tenant(), sub.submitted.elapsed());
            if let Some(budget) = &sub.req.budget {
                budget.spend(sub.req.prompt.len());
            }
            if let Some(c) = &sub.req.constraint {
                self.metrics.constrained(c.kind());
            }
            // Read before the pin is dropped (without tenants the client is the adapter).
            let client = super::fair::client_of(&sub.req).to_string();
            let resolved = self.adapter_weights(sub.req.adapter.as_ref());
            // The weights are the pin from here on.
            sub.req.adapter = None;
            let started = resolved.and_then(|adapter| {
                let mut sampler = Sampler::new(sub.req.sampling.clone())
                    .map_err(|e| RouterError::invalid("sampling", e.to_string()))?;
                // A resumed generation's generator continues after the draws already made.
                sampler.skip(sub.req.resumed.len());
                Ok((adapter, sampler))
            });
            let (adapter, sampler) = match started {
                Ok(s) => s,
                Err(e) => {
                    let outcome = crate::engine_metrics::outcome_label(e.code());
                    self.metrics.ended(outcome, sub.tenant(), sub.req.prompt.len(), 0, sub.submitted.elapsed());
                    let _ = sub.events.send(Event::Failed(e));
                    self.kv.pages.release(&mut cache);
                    return true;
                }
            };
            // Resumed tokens were sent already: the detokenizer takes up their state, replayed
            // during validation (off this thread).
            let text = std::mem::take(&mut sub.req.resumed_text);
            let stopped = sub.req.resumed_stopped;
            let resumed = sub.req.resumed.len();
            // The resumed tokens completed the output constraint: the original stream ended there
            // (Stop), as `emit` ends it when a committed token completes it.
            let complete = resumed > 0 && sub.req.constraint.as_ref().is_some_and(|c| c.is_complete());
            let over = resumed > 0
                && (stopped
                    || complete
                    || resumed >= sub.req.max_new_tokens
                    || sub.req.resumed.last().is_some_and(|t| sub.req.stop_ids.contains(t))
                    || tokens.len() >= self.model.config.max_position_embeddings);
            if over {
                // The resumed tokens already ended the generation: only its end was lost.
                let stop = stopped || complete || sub.req.resumed.last().is_some_and(|t| sub.req.stop_ids.contains(t));
                let reason = if stop { FinishReason::Stop } else { FinishReason::Length };
                let (prompt_tokens, completion_tokens) = (sub.req.prompt.len(), resumed);
                self.metrics.ended("ok", sub.tenant(), prompt_tokens, 0, sub.submitted.elapsed());
                let _ = sub.events.send(Event::Finished { reason, prompt_tokens, completion_tokens, cached_tokens });
                self.kv.pages.release(&mut cache);
                return true;
            }
            let adapter_id = adapter.as_ref().map_or("", |a| a.identity.id.as_str());
            let load_key = self.expert_load.key_for(adapter_id, Instant::now());
            let now = Instant::now();
            self.running.push(Sequence {
                client,
                preemptions: 0,
                recompute_until: 0,
                scheduled: self.metrics.scheduled(sub.tenant()),
                admitted: now,
                paused_at: now,
                load_key,
                id: sub.id,
                req: sub.req,
                adapter,
                events: sub.events,
                cache,
                tokens,
                generated: resumed,
                sampler,
                text,
                submitted: sub.submitted,
                last_token: sub.submitted,
                cached_tokens,
                prefix_namespace: namespace,
                kv_incomplete: false,
            });
        }
        true
    }
}
