//! What the engine records per token and per step allocates nothing: once a series exists,
//! recording is atomic adds on handles the engine holds. Counted with an allocator that counts
//! this thread's allocations (this test binary has no other test).

use moe_router::EngineMetrics;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|a| a.set(a.get() + 1));
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout (see `alloc`).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn recording_a_decode_step_allocates_nothing() {
    let registry = moe_metrics::Registry::new();
    let metrics = EngineMetrics::new(&registry);
    let (experts, layers) = (8, 4);
    let mut counts = vec![0u64; experts * layers];
    let step = |counts: &mut Vec<u64>| {
        for (i, c) in counts.iter_mut().enumerate() {
            *c = (i % 3) as u64;
        }
        metrics.first_token(Duration::from_millis(12));
        for _ in 0..16 {
            metrics.next_token(Duration::from_millis(3));
        }
        metrics.state(2, 16, 40, 100);
        metrics.prefix_pages(10, 4, 1);
        metrics.expert_tokens(experts, counts);
    };
    // The first step creates the (layer, expert) series; later ones only add.
    step(&mut counts);
    let before = allocations();
    for _ in 0..10 {
        step(&mut counts);
    }
    let during = allocations() - before;
    assert_eq!(during, 0, "recording ten decode steps allocated {during} times");
    assert!(counts.iter().all(|c| *c == 0), "the per-step expert counts are consumed");
    // And what was recorded is there.
    assert_eq!(registry.value("moe_inter_token_latency_seconds_count", &[]), Some(176.0));
    assert_eq!(registry.value("moe_expert_tokens_total", &[("layer", "0"), ("expert", "2")]), Some(22.0));
    assert_eq!(registry.value("moe_running_requests", &[]), Some(16.0));
}
