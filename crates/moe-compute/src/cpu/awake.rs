//! Keeps the compute pool's other threads awake through a forward pass. Between two parallel
//! kernels the calling thread runs short serial work (norms, rotary, routing, the expert plan,
//! sampling); a pool thread that finds nothing to do for ~30 µs goes to sleep, and waking it for
//! the next kernel costs about as long again on a virtual machine, while the caller streams the
//! weights alone. A decode step at batch 1 has dozens of such gaps. Here the other threads poll
//! the pool for work until the pass ends instead (giving up after a longer idle spell, so a pass
//! that waits on the network does not keep cores busy).

use rayon::Yield;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// During a pass, a helper that found no work for this long returns to the pool (which may put
/// it to sleep): the pass is waiting on something else (the network, a device).
const IDLE_LIMIT: Duration = Duration::from_micros(500);
/// After a pass, helpers keep polling this long for the next one: the engine's next step
/// usually starts within it (sampling and scheduling in between), and one helper loop then
/// serves many passes.
const BETWEEN_PASSES: Duration = Duration::from_micros(300);
/// Idle polls between two looks at the clock (and between two yields to the OS scheduler, so a
/// runnable thread on this core still gets it).
const POLLS_PER_CHECK: u32 = 32;

/// What the passes of one calling thread share with the helpers they started.
#[derive(Default)]
struct Passes {
    /// A pass is running.
    running: AtomicBool,
    /// Helpers now polling (started by an earlier pass and still there, or by this one).
    polling: AtomicUsize,
}

thread_local! {
    /// The passes this thread runs (an engine's loop thread: one engine, one pool).
    static PASSES: RefCell<Option<Arc<Passes>>> = const { RefCell::new(None) };
}

/// Runs `f` on this thread while the other threads of the current rayon pool poll it for work.
/// Outside a pool, or in a pool of one thread, it is just `f()`.
pub fn with_pool_awake<R>(f: impl FnOnce() -> R) -> R {
    let Some(me) = rayon::current_thread_index() else { return f() };
    if rayon::current_num_threads() < 2 {
        return f();
    }
    let passes = PASSES.with(|p| p.borrow_mut().get_or_insert_with(Default::default).clone());
    passes.running.store(true, Ordering::Release);
    if passes.polling.load(Ordering::Acquire) == 0 {
        let shared = passes.clone();
        rayon::spawn_broadcast(move |ctx| {
            // This thread's own copy returns at once: it is the one running the passes.
            if ctx.index() != me {
                poll_for_work(&shared);
            }
        });
    }
    let _end = EndOfPass(passes);
    f()
}

/// Marks the pass over when it ends, panicking or not, so the helpers can leave.
struct EndOfPass(Arc<Passes>);

impl Drop for EndOfPass {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
    }
}

/// Executes the pool's jobs as they appear, until none appeared for [`IDLE_LIMIT`] during a
/// pass or for [`BETWEEN_PASSES`] outside one.
fn poll_for_work(passes: &Passes) {
    // A helper that gave up during a pass leaves (the pass waits on something else); one that
    // left between passes polls again if a pass began as it was leaving: that pass saw it
    // polling and started no other.
    while !poll_while_busy(passes) {
        if !(passes.running.load(Ordering::Acquire) && passes.polling.load(Ordering::Acquire) == 0) {
            return;
        }
    }
}

/// Polls until idle for the limit; true when it gave up during a pass.
fn poll_while_busy(passes: &Passes) -> bool {
    passes.polling.fetch_add(1, Ordering::AcqRel);
    let mut idle_since: Option<Instant> = None;
    let mut polls = 0u32;
    loop {
        match rayon::yield_now() {
            Some(Yield::Executed) => {
                idle_since = None;
                polls = 0;
            }
            Some(Yield::Idle) => {
                polls += 1;
                if !polls.is_multiple_of(POLLS_PER_CHECK) {
                    std::hint::spin_loop();
                    continue;
                }
                let running = passes.running.load(Ordering::Acquire);
                let limit = if running { IDLE_LIMIT } else { BETWEEN_PASSES };
                if idle_since.get_or_insert_with(Instant::now).elapsed() > limit {
                    passes.polling.fetch_sub(1, Ordering::AcqRel);
                    return running;
                }
                std::thread::yield_now();
            }
            None => break,
        }
    }
    passes.polling.fetch_sub(1, Ordering::AcqRel);
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn runs_the_pass_and_lets_helpers_go() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("pool");
        let sum: u64 = pool.install(|| with_pool_awake(|| (0..10_000u64).into_par_iter().sum()));
        assert_eq!(sum, 49_995_000);
        // The helpers leave once idle after the pass: the pool still runs later work, and a
        // second pass finds them polling or starts them again.
        let twice: u64 = pool.install(|| with_pool_awake(|| (0..100u64).into_par_iter().sum()));
        assert_eq!(twice, 4950);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let again: u64 = pool.install(|| (0..100u64).into_par_iter().sum());
        assert_eq!(again, 4950);
        // Outside a pool it is a plain call.
        assert_eq!(with_pool_awake(|| 7), 7);
    }

    /// A pass that waits on something else (the network) does not keep its helpers spinning:
    /// they leave after the idle limit, though the pass still runs.
    #[test]
    fn helpers_leave_a_pass_that_waits() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("pool");
        let polling = pool.install(|| {
            with_pool_awake(|| {
                std::thread::sleep(IDLE_LIMIT * 40);
                PASSES.with(|p| p.borrow().as_ref().map(|p| p.polling.load(Ordering::Acquire)))
            })
        });
        assert_eq!(polling, Some(0), "a helper still polls after the pass idled for 40 idle limits");
    }

    #[test]
    fn a_panicking_pass_still_ends() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("pool");
        let caught = pool.install(|| std::panic::catch_unwind(|| with_pool_awake(|| panic!("boom"))));
        assert!(caught.is_err());
        assert_eq!(pool.install(|| (0..10u64).into_par_iter().sum::<u64>()), 45);
    }
}
