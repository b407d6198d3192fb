//! Choosing the next token from a row of logits: greedy at temperature 0, otherwise temperature,
//! top-k and top-p (nucleus) filtering and a draw from a seeded generator, so that a seed
//! reproduces a run exactly. The exponential is `moe_compute::gpu_plan::numerics::exp` (IEEE
//! operations only), so the device sampler (`moe_compute::gpu_plan::sampling`) draws the same
//! tokens (compared below).

use crate::error::{GenerateError, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k filter.
    pub top_k: usize,
    /// 1.0 means no top-p filter.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(GenerateError::Sampling(format!("temperature must be >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(GenerateError::Sampling(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

/// Each sampler's own generator (the project's one RNG), so seeds stay reproducible.
type Rng = moe_compute::rng::SplitMix64;

/// A sampler with its own random state and reusable candidate buffer.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Self { rng: Rng::new(params.seed), params, candidates: Vec::new() })
    }

    /// Index of the largest logit (the first one on ties, as `torch.argmax`).
    pub fn argmax(logits: &[f32]) -> u32 {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        best as u32
    }

    fn draws(&self) -> bool {
        !(self.params.temperature == 0.0 || self.params.top_k == 1)
    }

    /// Advances the generator past `tokens` samples, as if they had been drawn: a resumed
    /// generation continues with the draws the first one would have made next.
    pub fn skip(&mut self, tokens: usize) {
        if self.draws() {
            for _ in 0..tokens {
                self.rng.unit();
            }
        }
    }

    /// The next token. Exactly one draw from the generator per call when sampling (none when
    /// greedy), so [`Self::skip`] can position it.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if !self.draws() {
            return Self::argmax(logits);
        }
        let unit = self.rng.unit();
        let p = &self.params;
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, l / p.temperature)));
        if c.is_empty() {
            return Self::argmax(logits);
        }
        c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && p.top_k < c.len() {
            c.truncate(p.top_k);
        }
        moe_compute::gpu_plan::sampling::draw_from_candidates(c, p.top_p, unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.1, 2.0, 1.9, -1.0];
        let mut g = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(g.sample(&logits), 1);
        let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 7 };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone()).unwrap();
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(&params), draw(&params), "same seed, same tokens");
        assert!(draw(&params).contains(&2), "temperature 1 explores");
        let topk = SamplingParams { top_k: 2, ..params.clone() };
        assert!(draw(&topk).iter().all(|&t| t == 1 || t == 2));
        let topp = SamplingParams { top_p: 0.3, ..params };
        assert!(draw(&topp).iter().all(|&t| t == 1), "top_p 0.3 keeps only the best token");
    }

    /// A sampler advanced past n tokens draws what a fresh one draws at token n + 1.
    #[test]
    fn skip_positions_the_generator() {
        let logits = [0.1, 2.0, 1.9, -1.0, 1.5];
        let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.95, seed: 11 };
        let mut whole = Sampler::new(params.clone()).unwrap();
        let all: Vec<u32> = (0..40).map(|_| whole.sample(&logits)).collect();
        for n in [0usize, 1, 7, 39] {
            let mut resumed = Sampler::new(params.clone()).unwrap();
            resumed.skip(n);
            let rest: Vec<u32> = (n..40).map(|_| resumed.sample(&logits)).collect();
            assert_eq!(rest, all[n..], "resumed after {n}");
        }
    }

    #[test]
    fn rejects_bad_params() {
        assert!(Sampler::new(SamplingParams { temperature: -1.0, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams { top_p: 0.0, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams { top_p: f32::NAN, ..Default::default() }).is_err());
    }

    /// The device sampler's algorithm gives this sampler's tokens, for greedy and top-k rows, with
    /// ties, NaN and −∞ logits, temperatures, top-p and resumed generators.
    #[test]
    fn the_device_sampler_draws_the_host_tokens() {
        use moe_compute::gpu_plan::sampling::{sample_row, RowParams};
        let mut rng = moe_compute::rng::SplitMix64::new(23);
        let mut served = 0;
        for case in 0..3000u64 {
            let vocab = [5usize, 40, 300][case as usize % 3];
            let logits: Vec<f32> = (0..vocab)
                .map(|_| match rng.below(20) {
                    0 => f32::NEG_INFINITY,
                    1 if case % 7 == 0 => f32::NAN,
                    2..=5 => 1.5, // ties
                    _ => rng.signed() * 6.0,
                })
                .collect();
            let params = SamplingParams {
                temperature: [0.0, 0.3, 1.0, 1.7][rng.below(4)],
                top_k: [0, 1, 2, 5, 40, 64, 65][rng.below(7)],
                top_p: [1.0, 0.9, 0.5, 0.05][rng.below(4)],
                seed: case * 7919,
            };
            let draw = rng.below(5) as u64;
            let mut host = Sampler::new(params.clone()).expect("valid");
            host.skip(draw as usize);
            let want = host.sample(&logits);
            let row = RowParams {
                temperature: params.temperature,
                top_k: params.top_k as u32,
                top_p: params.top_p,
                seed: params.seed,
                draw,
            };
            if let Some(got) = sample_row(&row, &logits, None) {
                assert_eq!(got, want, "case {case}: {params:?} draw {draw} {logits:?}");
                served += 1;
            }
        }
        assert!(served > 2000, "{served} rows served on the device");
    }
}
