//! After a step: each sequence whose prefill is complete samples its next token (repetition
//! penalty, sampler, logprob), its text is detokenized incrementally and checked for stop
//! sequences, and it receives a delta and, when it ends, its one terminal event. Sequences with
//! a row some expert could not serve fail alone.

use super::compute_loop::ComputeLoop;
use crate::error::RouterError;
use crate::request::{Event, FinishReason};
use moe_compute::Backend;
use std::time::Instant;

impl<B: Backend> ComputeLoop<B> {
    /// Emits for every batch member (`members[row]` is the running index of logits row `row`;
    /// `chunk[i]` the rows sequence i had in the step); indices of sequences that ended go to
    /// `done`.
    pub(super) fn emit(&mut self, chunk: &[usize], members: &[usize], done: &mut Vec<usize>) {
        let mut failed: Vec<(usize, String)> = Vec::new();
        if !self.ws.unserved_rows().is_empty() {
            let mut start = 0u32;
            for &i in members.iter() {
                let end = start + chunk[i] as u32;
                if let Some((_, why)) = self.ws.unserved_rows().iter().find(|(r, _)| (start..end).contains(r)) {
                    failed.push((i, why.clone()));
                }
                start = end;
            }
        }
        let vocab = self.model.config.vocab_size;
        let max_pos = self.model.config.max_position_embeddings;
        for (row, &i) in members.iter().enumerate() {
            let s = &mut self.running[i];
            if let Some((_, why)) = failed.iter().find(|(f, _)| *f == i) {
                s.kv_incomplete = true;
                self.metrics.ended("unavailable", s.tenant(), s.req.prompt.len(), s.generated, s.submitted.elapsed());
                tracing::warn!(request = s.id, reason = %why, "request failed: experts unavailable");
                s.end(Event::Failed(RouterError::Unavailable(why.clone())));
                done.push(i);
                continue;
            }
            if s.cache.len < s.tokens.len() {
                continue; // prefill not finished: no token yet
            }
            let logits = &mut self.logits[row * vocab..(row + 1) * vocab];
            if s.req.repetition_penalty != 1.0 {
                apply_repetition_penalty(logits, &s.tokens, s.req.repetition_penalty, &mut self.seen);
            }
            // The constraint's mask (computed during the forward pass) before any sampling.
            let limit = self.config.max_constraint_time;
            let masked = s.req.constraint.as_mut().map(|c| match c.apply(logits) {
                Err(e) => Err(RouterError::invalid("constraint", e.to_string())),
                Ok(()) if c.mask_time() > limit => Err(RouterError::ResourceExhausted(format!(
                    "the constraint's token mask took {} ms to compute; the limit is {} ms (--max-constraint-ms)",
                    c.mask_time().as_millis(),
                    limit.as_millis()
                ))),
                Ok(()) => Ok(()),
            });
            if let Some(Err(err)) = masked {
                let outcome = crate::engine_metrics::outcome_label(err.code());
                self.metrics.ended(outcome, s.tenant(), s.req.prompt.len(), s.generated, s.submitted.elapsed());
                s.end(Event::Failed(err));
                done.push(i);
                continue;
            }
            let next = s.sampler.sample(logits);
            let lp = if s.req.logprobs { vec![logprob_of(logits, next)] } else { Vec::new() };
            s.tokens.push(next);
            s.generated += 1;
            if let Some(budget) = &s.req.budget {
                budget.spend(1);
            }
            let is_eos = s.req.stop_ids.contains(&next);
            let complete = match s.req.constraint.as_mut().map(|c| c.commit(next)) {
                Some(Err(e)) => {
                    let err = RouterError::Internal(format!("the output constraint failed: {e}"));
                    self.metrics.ended("internal", s.tenant(), s.req.prompt.len(), s.generated, s.submitted.elapsed());
                    s.end(Event::Failed(err));
                    done.push(i);
                    continue;
                }
                Some(Ok(complete)) => complete,
                None => false,
            };
            let (text, stopped) = if is_eos { (String::new(), false) } else { s.text.push(&self.codec, next) };
            let finish = if is_eos || stopped || complete {
                Some(FinishReason::Stop)
            } else if s.generated >= s.req.max_new_tokens || s.tokens.len() >= max_pos {
                Some(FinishReason::Length)
            } else {
                None
            };
            let text = if finish.is_some() { text + &s.text.flush(&self.codec) } else { text };
            let now = Instant::now();
            if s.generated == s.req.resumed.len() + 1 {
                self.metrics.first_token(now - s.submitted);
            } else {
                self.metrics.next_token(now - s.last_token);
            }
            s.last_token = now;
            let _ = s.events.send(Event::Delta { text, token_ids: vec![next], logprobs: lp });
            if let Some(reason) = finish {
                self.metrics.ended("ok", s.tenant(), s.req.prompt.len(), s.generated, s.submitted.elapsed());
                let (prompt_tokens, completion_tokens) = (s.req.prompt.len(), s.generated);
                let cached_tokens = s.cached_tokens;
                s.end(Event::Finished { reason, prompt_tokens, completion_tokens, cached_tokens });
                done.push(i);
            }
        }
    }
}

/// The log-probability of token `t` under `logits`.
fn logprob_of(logits: &[f32], t: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits.iter().map(|x| (x - max).exp()).sum::<f32>().ln() + max;
    logits[t as usize] - lse
}

/// transformers' repetition penalty: logits of tokens already present are divided by the penalty
/// when positive and multiplied when negative (each token once).
fn apply_repetition_penalty(logits: &mut [f32], tokens: &[u32], penalty: f32, seen: &mut [bool]) {
    for &t in tokens {
        let t = t as usize;
        if t < logits.len() && !seen[t] {
            seen[t] = true;
            let l = &mut logits[t];
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
    for &t in tokens {
        if let Some(s) = seen.get_mut(t as usize) {
            *s = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::apply_repetition_penalty;

    #[test]
    fn repetition_penalty_as_transformers_once_per_token() {
        let mut logits = [2.0f32, -2.0, 1.0, 0.5];
        let mut seen = vec![false; 4];
        apply_repetition_penalty(&mut logits, &[0, 1, 0, 0], 2.0, &mut seen);
        assert_eq!(logits, [1.0, -4.0, 1.0, 0.5]);
        assert!(seen.iter().all(|s| !s), "scratch marks are cleared");
    }
}
