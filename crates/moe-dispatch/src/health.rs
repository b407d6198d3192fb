//! Which workers get traffic. A worker that failed a call (refused connection, reset, deadline,
//! malformed answer) is suspect for a while; when that while ends it is probed out of band (the
//! transport's cheap health call) and gets traffic again only once it answers, so an unreachable
//! worker that keeps its lease costs one probe per period instead of a dispatch deadline per
//! step. While the probe runs (or after it failed) the worker gets nothing, not even the rows of
//! an expert it alone holds: those rows fail at once (UNAVAILABLE naming the expert), because a
//! frozen sole holder used as a last resort stalled every batch for a whole dispatch deadline,
//! again after each suspect period.

use crate::transport::WorkerTransport;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a worker that failed a call is left out before it is probed.
pub const SUSPECT_FOR: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Live,
    /// Left out until then.
    Suspect(Instant),
    /// Its probe is in flight.
    Probing,
}

/// Whether a worker may take rows now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Availability {
    Live,
    Out,
}

/// The states of one dispatcher's workers (shared with the probes in flight).
pub(crate) struct WorkerHealth {
    states: Arc<Mutex<Vec<State>>>,
    suspect_for: Duration,
}

impl WorkerHealth {
    pub(crate) fn new(workers: usize, suspect_for: Duration) -> Self {
        Self { states: Arc::new(Mutex::new(vec![State::Live; workers])), suspect_for }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<State>> {
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Leaves `worker` out for the suspect period.
    pub(crate) fn mark_suspect(&self, worker: usize) {
        self.set_suspect_until(worker, Instant::now() + self.suspect_for);
    }

    /// Leaves `worker` out for the suspect period counted from `since` (a failure noticed
    /// late), unless that period is already over; whether it did.
    pub(crate) fn mark_suspect_since(&self, worker: usize, since: Instant) -> bool {
        let until = since + self.suspect_for;
        let fresh = until > Instant::now();
        if fresh {
            self.set_suspect_until(worker, until);
        }
        fresh
    }

    pub(crate) fn set_suspect_until(&self, worker: usize, until: Instant) {
        if let Some(s) = self.lock().get_mut(worker) {
            *s = State::Suspect(until);
        }
    }

    /// Workers that do not get traffic now (suspect or being probed), with the end of their
    /// suspect period (now for a probe in flight).
    pub(crate) fn suspects(&self) -> Vec<(usize, Instant)> {
        let now = Instant::now();
        let states = self.lock();
        states
            .iter()
            .enumerate()
            .filter_map(|(w, s)| match *s {
                State::Suspect(until) => Some((w, until.max(now))),
                State::Probing => Some((w, now)),
                State::Live => None,
            })
            .collect()
    }

    /// Each worker's availability into `out`; a worker whose suspect period is over gets its
    /// probe started through `transport` (at most one in flight per worker).
    pub(crate) fn snapshot<T: WorkerTransport>(&self, transport: &T, out: &mut Vec<Availability>) {
        let now = Instant::now();
        let mut to_probe = Vec::new();
        {
            let mut states = self.lock();
            out.clear();
            for (w, s) in states.iter_mut().enumerate() {
                out.push(match *s {
                    State::Live => Availability::Live,
                    State::Suspect(until) if until > now => Availability::Out,
                    State::Suspect(_) => {
                        *s = State::Probing;
                        to_probe.push(w);
                        Availability::Out
                    }
                    State::Probing => Availability::Out,
                });
            }
        }
        for w in to_probe {
            let states = self.states.clone();
            let suspect_for = self.suspect_for;
            transport.probe(
                w,
                Box::new(move |ok| {
                    let mut states = states.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(s) = states.get_mut(w) {
                        // A failure reported meanwhile (Suspect) stands; only a probe's own
                        // state is resolved here.
                        if *s == State::Probing {
                            *s = if ok { State::Live } else { State::Suspect(Instant::now() + suspect_for) };
                        }
                    }
                }),
            );
        }
    }
}
