//! Keeps the compute pool's other threads awake through a forward pass. Between two parallel
//! kernels the calling thread runs short serial work (norms, rotary, routing, the expert plan,
//! sampling); a pool thread that finds nothing to do for ~30 µs goes to sleep, and waking it for
//! the next kernel costs about as long again on a virtual machine, while the caller streams the
//! weights alone. A decode step at batch 1 has dozens of such gaps. Here the other threads poll
//! the pool for work until the pass ends instead (giving up after a longer idle spell, so a pass
//! that waits on the network does not keep cores busy).

use rayon::Yield;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A helper that found no work for this long returns to the pool (which may put it to sleep).
const IDLE_LIMIT: Duration = Duration::from_micros(500);
/// Idle polls between two looks at the clock (and between two yields to the OS scheduler, so a
/// runnable thread on this core still gets it).
const POLLS_PER_CHECK: u32 = 32;

/// Runs `f` on this thread while the other threads of the current rayon pool poll it for work.
/// Outside a pool, or in a pool of one thread, it is just `f()`.
pub fn with_pool_awake<R>(f: impl FnOnce() -> R) -> R {
    let Some(me) = rayon::current_thread_index() else { return f() };
    if rayon::current_num_threads() < 2 {
        return f();
    }
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    rayon::spawn_broadcast(move |ctx| {
        // This thread's own copy returns at once: it is the one running `f`.
        if ctx.index() != me {
            poll_for_work(&flag);
        }
    });
    let _end = EndOfPass(done);
    f()
}

/// Sets the flag when the pass ends, panicking or not, so the helpers return.
struct EndOfPass(Arc<AtomicBool>);

impl Drop for EndOfPass {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Executes the pool's jobs as they appear until `done`, or until none appeared for
/// [`IDLE_LIMIT`].
fn poll_for_work(done: &AtomicBool) {
    let mut idle_since: Option<Instant> = None;
    let mut polls = 0u32;
    while !done.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(Yield::Executed) => {
                idle_since = None;
                polls = 0;
            }
            Some(Yield::Idle) => {
                polls += 1;
                if polls.is_multiple_of(POLLS_PER_CHECK) {
                    if idle_since.get_or_insert_with(Instant::now).elapsed() > IDLE_LIMIT {
                        return;
                    }
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
            None => return,
        }
    }
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
        // The helpers return once the pass is over: the pool still runs later work.
        let again: u64 = pool.install(|| (0..100u64).into_par_iter().sum());
        assert_eq!(again, 4950);
        // Outside a pool it is a plain call.
        assert_eq!(with_pool_awake(|| 7), 7);
    }

    #[test]
    fn a_panicking_pass_still_ends() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("pool");
        let caught = pool.install(|| std::panic::catch_unwind(|| with_pool_awake(|| panic!("boom"))));
        assert!(caught.is_err());
        assert_eq!(pool.install(|| (0..10u64).into_par_iter().sum::<u64>()), 45);
    }
}
