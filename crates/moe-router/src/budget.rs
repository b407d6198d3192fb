//! A tenant's token budget (`tokens_per_minute` in the tenants file): a bucket that holds at most
//! one minute's tokens and refills continuously. Every prompt and generated token of the
//! tenant's requests is taken from it as the engine processes it (so the bucket may go below
//! zero by the requests already running); while it is empty, new requests are refused with
//! RESOURCE_EXHAUSTED (HTTP 429) and a retry delay that says when it will hold a token again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct TokenBudget {
    per_minute: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl TokenBudget {
    pub fn new(per_minute: u64) -> Self {
        Self {
            per_minute: per_minute as f64,
            state: Mutex::new(Bucket { tokens: per_minute as f64, at: Instant::now() }),
        }
    }

    pub fn per_minute(&self) -> u64 {
        self.per_minute as u64
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_minute / 60.0).min(self.per_minute);
        b.at = now;
    }

    /// `None` when a request may start now; otherwise how long until the bucket holds a token.
    pub fn retry_after(&self) -> Option<Duration> {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refill(&mut b, Instant::now());
        if b.tokens >= 1.0 {
            return None;
        }
        let missing = 1.0 - b.tokens;
        Some(Duration::from_secs_f64(missing * 60.0 / self.per_minute.max(1.0)))
    }

    /// Takes `tokens` processed tokens from the bucket.
    pub fn spend(&self, tokens: usize) {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refill(&mut b, Instant::now());
        b.tokens -= tokens as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_budget_refuses_until_it_refills() {
        let b = TokenBudget::new(600); // 10 tokens a second
        assert_eq!(b.retry_after(), None);
        b.spend(590);
        assert_eq!(b.retry_after(), None, "10 tokens left");
        b.spend(25);
        let wait = b.retry_after().expect("empty");
        // 15 below one token: about 1.6 s of refill.
        assert!(wait > Duration::from_millis(1400) && wait < Duration::from_millis(1700), "{wait:?}");
    }
}
