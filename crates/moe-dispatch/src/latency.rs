//! Adaptive dispatch deadlines: each worker's recent expert-call times, kept by batch size, and
//! the hedge delay and give-up deadline derived from them. A call time depends on how many rows
//! the batch carries (a 512-token prefill chunk takes far longer than a decode step), so times
//! are kept per power-of-two row bucket, and a batch is judged by its own bucket or, while that
//! has too few samples, by the nearest bigger one (more rows never take less time).
//!
//! The hedge delay is a high percentile times [`HEDGE_FACTOR`] (at least [`HEDGE_FLOOR`]); the
//! give-up deadline, used only when a replica can take the batch, is the same percentile times
//! [`GIVE_UP_FACTOR`] (at least [`GIVE_UP_FLOOR`]); both are capped by the configured deadline.
//! Without enough samples the delays are [`COLD_HEDGE`] and the configured deadline.

use std::time::Duration;

/// Samples kept per bucket (the most recent ones).
const WINDOW: usize = 64;
/// A bucket judges batches once it holds this many samples.
const MIN_SAMPLES: usize = 8;
/// Buckets: rows 0, 1, 2–3, 4–7, …, 2^22 and more.
const BUCKETS: usize = 24;
/// The percentile the delays are derived from.
const PERCENTILE: f64 = 0.95;

pub const HEDGE_FACTOR: u32 = 4;
pub const HEDGE_FLOOR: Duration = Duration::from_millis(20);
pub const GIVE_UP_FACTOR: u32 = 25;
pub const GIVE_UP_FLOOR: Duration = Duration::from_millis(250);
/// The hedge delay while a worker has no history for the batch's size.
pub const COLD_HEDGE: Duration = Duration::from_millis(250);

/// When a batch is sent to a replica as well.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Hedging {
    /// After the worker's usual time for such a batch ([`hedge_delay`]), whenever a replica
    /// holds the batch's experts.
    #[default]
    Adaptive,
    /// After this fixed delay.
    After(Duration),
    /// Never.
    Off,
}

#[derive(Clone, Debug)]
struct Bucket {
    micros: [u32; WINDOW],
    len: usize,
    next: usize,
}

impl Default for Bucket {
    fn default() -> Self {
        Self { micros: [0; WINDOW], len: 0, next: 0 }
    }
}

/// One worker's recent successful call times by row bucket.
#[derive(Clone, Debug)]
pub struct CallTimes {
    buckets: Vec<Bucket>,
}

impl Default for CallTimes {
    fn default() -> Self {
        Self { buckets: vec![Bucket::default(); BUCKETS] }
    }
}

fn bucket_of(rows: usize) -> usize {
    ((usize::BITS - rows.leading_zeros()) as usize).min(BUCKETS - 1)
}

impl CallTimes {
    /// A successful call of `rows` rows took `took`.
    pub fn record(&mut self, rows: usize, took: Duration) {
        let b = &mut self.buckets[bucket_of(rows)];
        b.micros[b.next] = took.as_micros().min(u32::MAX as u128) as u32;
        b.next = (b.next + 1) % WINDOW;
        b.len = (b.len + 1).min(WINDOW);
    }

    /// The high percentile of calls of this size (or the nearest bigger size with history).
    pub fn high(&self, rows: usize) -> Option<Duration> {
        let b = self.buckets[bucket_of(rows)..].iter().find(|b| b.len >= MIN_SAMPLES)?;
        // A copy on the stack: this runs on every dispatch.
        let mut v = b.micros;
        v[..b.len].sort_unstable();
        let at = ((b.len - 1) as f64 * PERCENTILE).round() as usize;
        Some(Duration::from_micros(u64::from(v[at])))
    }
}

/// How long to wait for a worker before sending the batch to a replica as well (`None`: never).
pub fn hedge_delay(hedging: Hedging, high: Option<Duration>, cap: Duration) -> Option<Duration> {
    match hedging {
        Hedging::Off => None,
        Hedging::After(d) => Some(d),
        Hedging::Adaptive => Some(high.map_or(COLD_HEDGE, |h| (h * HEDGE_FACTOR).max(HEDGE_FLOOR)).min(cap)),
    }
}

/// How long to wait for a worker before counting it as failed: adaptive when a replica can take
/// the batch, the configured deadline (`cap`) otherwise (nothing else could serve the rows).
pub fn give_up_after(high: Option<Duration>, has_replica: bool, cap: Duration) -> Duration {
    match (high, has_replica) {
        (Some(h), true) => (h * GIVE_UP_FACTOR).max(GIVE_UP_FLOOR).min(cap),
        _ => cap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(10);

    #[test]
    fn buckets_by_rows_and_falls_back_to_bigger_batches() {
        let mut t = CallTimes::default();
        assert_eq!(t.high(1), None, "no history");
        for i in 0..MIN_SAMPLES as u64 {
            t.record(1, Duration::from_micros(900 + i * 10));
            t.record(300, Duration::from_millis(40));
        }
        let small = t.high(1).expect("history");
        assert!(small >= Duration::from_micros(900) && small <= Duration::from_micros(970), "{small:?}");
        // 20 rows have no history of their own: judged by the 300-row bucket, never the 1-row one.
        assert_eq!(t.high(20), Some(Duration::from_millis(40)));
        assert_eq!(t.high(5000), None, "nothing as big");
    }

    #[test]
    fn keeps_the_recent_window() {
        let mut t = CallTimes::default();
        for _ in 0..WINDOW {
            t.record(4, Duration::from_millis(500));
        }
        for _ in 0..WINDOW {
            t.record(4, Duration::from_millis(2));
        }
        assert_eq!(t.high(4), Some(Duration::from_millis(2)), "old slow calls are forgotten");
    }

    #[test]
    fn delays_follow_history_with_floors_and_caps() {
        let ms = Duration::from_millis;
        assert_eq!(hedge_delay(Hedging::Adaptive, None, CAP), Some(COLD_HEDGE));
        assert_eq!(hedge_delay(Hedging::Adaptive, Some(ms(1)), CAP), Some(HEDGE_FLOOR));
        assert_eq!(hedge_delay(Hedging::Adaptive, Some(ms(30)), CAP), Some(ms(120)));
        assert_eq!(hedge_delay(Hedging::Adaptive, Some(ms(30)), ms(50)), Some(ms(50)), "capped");
        assert_eq!(hedge_delay(Hedging::After(ms(7)), Some(ms(30)), CAP), Some(ms(7)), "override");
        assert_eq!(hedge_delay(Hedging::Off, Some(ms(30)), CAP), None);
        assert_eq!(give_up_after(Some(ms(1)), true, CAP), GIVE_UP_FLOOR);
        assert_eq!(give_up_after(Some(ms(100)), true, CAP), ms(2500));
        assert_eq!(give_up_after(Some(ms(1000)), true, CAP), CAP, "capped");
        assert_eq!(give_up_after(Some(ms(1)), false, CAP), CAP, "no replica: wait the full deadline");
        assert_eq!(give_up_after(None, true, CAP), CAP, "no history");
    }
}
