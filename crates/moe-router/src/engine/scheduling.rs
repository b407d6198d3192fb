//! The admission policy's configuration (`--scheduling fair|fcfs` and its knobs) and the
//! fair-share state it keeps: every client's virtual service counter (see `fair` for how
//! admission and preemption use them).

use std::collections::HashMap;
use std::time::Duration;

/// The admission policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scheduling {
    /// Arrival order; never preempts.
    Fcfs,
    /// Priority classes, token-weighted fair share within a class, preemption (module doc).
    #[default]
    Fair,
}

impl std::str::FromStr for Scheduling {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fcfs" => Ok(Scheduling::Fcfs),
            "fair" => Ok(Scheduling::Fair),
            other => Err(format!("unknown scheduling {other:?}: use fair or fcfs")),
        }
    }
}

/// The knobs of fair scheduling.
#[derive(Clone, Debug)]
pub struct SchedulingConfig {
    pub policy: Scheduling,
    /// Cost of one prompt (or recomputed) token.
    pub prefill_weight: f64,
    /// Cost of one generated token.
    pub decode_weight: f64,
    /// How long the best waiting request must have waited before it may preempt.
    pub preempt_after: Duration,
    /// How far (weighted tokens) a client must be behind another of the same class to preempt it.
    pub preempt_margin: f64,
    /// How often one sequence may be preempted.
    pub max_preemptions: u32,
}

impl Default for SchedulingConfig {
    fn default() -> Self {
        Self {
            policy: Scheduling::Fair,
            prefill_weight: 1.0,
            decode_weight: 2.0,
            preempt_after: Duration::from_millis(5),
            preempt_margin: 256.0,
            max_preemptions: 2,
        }
    }
}

/// The virtual service counters of the clients.
#[derive(Debug, Default)]
pub(super) struct FairShare {
    counters: HashMap<String, f64>,
}

impl FairShare {
    pub fn counter(&self, client: &str) -> f64 {
        self.counters.get(client).copied().unwrap_or(0.0)
    }

    pub fn charge(&mut self, client: &str, cost: f64) {
        match self.counters.get_mut(client) {
            Some(c) => *c += cost,
            None => {
                self.counters.insert(client.to_string(), cost);
            }
        }
    }

    /// A client that becomes active: lifted to `floor` (the least active counter) if below it.
    pub(super) fn lift(&mut self, client: &str, floor: f64) {
        let c = self.counters.entry(client.to_string()).or_insert(floor);
        *c = c.max(floor);
    }
}
