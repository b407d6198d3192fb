//! One forward step: decode tokens first (one each, so long prefills never stall running
//! streams), then prefill chunks under the token budget; the batch goes through the model (with
//! two-batch overlap when configured and the experts are remote); a failed step fails its
//! requests, rows an expert could not serve fail only their own request, and the rest sample.

use super::compute_loop::ComputeLoop;
use crate::engine_metrics::outcome_label;
use crate::error::RouterError;
use crate::request::Event;
use moe_compute::Backend;
use moe_model::{BatchItem, LogitsFor};
use std::sync::atomic::Ordering;

impl<B: Backend> ComputeLoop<B> {
    pub(super) fn step(&mut self) {
        let started = std::time::Instant::now();
        let (mut chunk, mut members, mut done) =
            (std::mem::take(&mut self.chunk), std::mem::take(&mut self.members), std::mem::take(&mut self.done));
        self.step_with(&mut chunk, &mut members, &mut done);
        (self.chunk, self.members, self.done) = (chunk, members, done);
        let phases = self.ws.take_phases();
        let st = &self.stats;
        st.dense_ns.fetch_add(phases.dense_ns, Ordering::Relaxed);
        st.experts_ns.fetch_add(phases.experts_ns, Ordering::Relaxed);
        st.head_ns.fetch_add(phases.head_ns, Ordering::Relaxed);
        st.step_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// How many new tokens each running sequence brings to this step (`chunk[i]`).
    fn plan_chunks(&self, chunk: &mut Vec<usize>) {
        let mut budget = self.config.max_batch_tokens.max(1);
        chunk.clear();
        chunk.resize(self.running.len(), 0);
        for (i, s) in self.running.iter().enumerate() {
            if s.cache.len + 1 == s.tokens.len() && budget > 0 {
                chunk[i] = 1;
                budget -= 1;
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            let left = s.tokens.len() - s.cache.len;
            if chunk[i] == 0 && left > 0 && budget > 0 {
                let mut n = left.min(budget);
                // A hybrid model's prefill stops once at the page boundary it checkpoints at.
                if let Some(b) = checkpoint_at(&self.kv.pages, s) {
                    if s.cache.len < b && s.cache.len + n > b {
                        n = b - s.cache.len;
                    }
                }
                chunk[i] = n;
                budget -= n;
            }
        }
    }

    fn step_with(&mut self, chunk: &mut Vec<usize>, members: &mut Vec<usize>, done: &mut Vec<usize>) {
        self.plan_chunks(chunk);
        let mut batch: Vec<BatchItem<'_, B>> = Vec::new();
        // Constraints of the sequences that sample after this step: their masks are computed
        // on another thread while the forward pass runs.
        let mut constraints: Vec<&mut moe_constrain::Constraint> = Vec::new();
        members.clear();
        for (i, s) in self.running.iter_mut().enumerate() {
            if chunk[i] > 0 {
                let start = s.cache.len;
                if start + chunk[i] == s.tokens.len() {
                    constraints.extend(s.req.constraint.as_mut());
                }
                let item = BatchItem::new(&s.tokens[start..start + chunk[i]], &mut s.cache);
                batch.push(item.with_adapter(s.adapter.as_deref()).with_request(s.id).with_load_key(s.load_key));
                members.push(i);
            }
        }
        if batch.is_empty() {
            return;
        }
        let experts = self.experts.as_deref();
        let split = match experts {
            Some(e) if self.config.two_batch_overlap && batch.len() >= 2 && e.overlaps() => {
                moe_model::overlap_split(&batch)
            }
            _ => 0,
        };
        let mask_time = self.metrics.constraint_mask_seconds();
        let (model, ws, ws_b, kv, logits) = (&self.model, &mut self.ws, &mut self.ws_b, &mut self.kv, &mut self.logits);
        let result = std::thread::scope(|scope| {
            let masks = (!constraints.is_empty()).then(|| {
                scope.spawn(move || {
                    for c in constraints {
                        // An error surfaces when the mask is applied (and fails that request).
                        let _ = c.compute_mask();
                        mask_time.observe(c.mask_time().as_secs_f64());
                    }
                })
            });
            let mut forward = || match experts {
                Some(e) if split > 0 => {
                    model.forward_overlapped(ws, ws_b, kv, &mut batch, split, LogitsFor::Last, logits, e)
                }
                _ => model.forward_with(ws, kv, &mut batch, LogitsFor::Last, logits, experts),
            };
            let result = if model.backend().computes_on_host_threads() {
                moe_compute::cpu::with_pool_awake(forward)
            } else {
                forward()
            };
            if let Some(m) = masks {
                let _ = m.join();
            }
            result
        });
        drop(batch);
        self.metrics.expert_tokens(self.model.config.num_experts, self.ws.expert_tokens_mut());
        self.expert_load.record(std::time::Instant::now(), self.ws.keyed_expert_tokens_mut());
        if let Err(e) = result {
            let err = RouterError::from(e);
            tracing::warn!(error = %err, "step failed; failing its requests");
            members.sort_unstable_by(|a, b| b.cmp(a));
            for &i in members.iter() {
                let mut s = self.running.swap_remove(i);
                let elapsed = s.submitted.elapsed();
                self.metrics.ended(outcome_label(err.code()), s.tenant(), s.req.prompt.len(), s.generated, elapsed);
                s.end(Event::Failed(err.clone()));
                self.kv.pages.release(&mut s.cache);
            }
            return;
        }
        self.charge(chunk, members);
        for &i in members.iter() {
            let Some(s) = self.running.get_mut(i) else { continue };
            if chunk[i] > 0 && checkpoint_at(&self.kv.pages, s) == Some(s.cache.len) {
                if let Err(e) = self.model.checkpoint_state(&mut self.kv, &mut s.cache) {
                    tracing::warn!(error = %e, request = s.id, "no state snapshot; this prefix is not cached");
                }
            }
        }
        done.clear();
        self.emit(chunk, members, done);
        // Prompts whose prefill just completed share their full pages at once, so concurrent
        // requests with the same prefix need not wait for this one to finish.
        for &i in members.iter() {
            let ready = self
                .running
                .get(i)
                .is_some_and(|s| (chunk[i] > 1 || s.cache.checkpoint.is_some()) && s.cache.len >= s.req.prompt.len());
            if ready {
                share_pages(&mut self.kv.pages, &mut self.running[i]);
            }
        }
        done.sort_unstable_by(|a, b| b.cmp(a));
        done.dedup();
        for &i in done.iter() {
            let mut s = self.running.swap_remove(i);
            share_pages(&mut self.kv.pages, &mut s);
            self.kv.pages.release(&mut s.cache);
        }
    }
}

/// Publishes a sequence's full, written pages in the prefix cache (when it is on), unless some
/// step wrote them without all of the sequence's experts (those pages would hand later requests
/// wrong keys and values under the prefix's normal key).
pub(super) fn share_pages<B: Backend>(pages: &mut moe_model::PageAllocator, s: &mut super::compute_loop::Sequence<B>) {
    if s.kv_incomplete {
        return;
    }
    if let Some(ns) = s.prefix_namespace {
        let ps = pages.page_size();
        let keys = moe_model::prefix::page_keys(ns, &s.tokens, ps, s.cache.len.min(s.tokens.len()) / ps);
        pages.publish(&mut s.cache, &keys);
    }
}

/// Where a hybrid model's sequence checkpoints its recurrent state for the prefix cache: the last
/// page boundary before its prompt's last token (as far as a later request with the same prompt
/// can reuse). `None` for other models, without the prefix cache, or for a short prompt.
fn checkpoint_at<B: Backend>(pages: &moe_model::PageAllocator, s: &super::compute_loop::Sequence<B>) -> Option<usize> {
    if s.prefix_namespace.is_none() || s.kv_incomplete || !pages.keeps_states() {
        return None;
    }
    let ps = pages.page_size();
    let prompt = s.req.prompt.len() + s.req.resumed.len();
    let at = prompt.saturating_sub(1) / ps * ps;
    (at > 0).then_some(at)
}
