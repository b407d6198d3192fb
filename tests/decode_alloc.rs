//! The decode loop allocates nothing once its buffers have grown: a counting global allocator
//! watches forward calls of a batch of two sequences decoding token by token. The loop runs on a
//! compute thread of the pool, as a serving loop does.

mod common;

use common::*;
use moe_compute::cpu::CpuBackend;
use moe_model::{BatchItem, LogitsFor, Model, SequenceCache};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decode_steps_do_not_allocate() {
    for arch in all_archs() {
        let model = Model::load(&fixture(arch), CpuBackend::new()).expect("load");
        let prompt = u32s(&expected(arch)["cases"][2]["token_ids"]);
        let allocs = rayon::scope(|_| {
            let mut ws = model.workspace();
            let mut kv = model.kv_cache(32, 16).expect("kv");
            let (mut a, mut b) = (SequenceCache::default(), SequenceCache::default());
            let mut logits = Vec::new();
            let mut batch = [BatchItem::new(&prompt, &mut a), BatchItem::new(&prompt[..3], &mut b)];
            model.forward(&mut ws, &mut kv, &mut batch, LogitsFor::Last, &mut logits).expect("prefill");
            // Pre-grow the page lists so that crossing a page boundary does not reallocate them.
            a.pages.reserve(8);
            b.pages.reserve(8);
            let mut next = [1u32, 2u32];
            let mut step = |count: bool| {
                COUNTING.store(count, Ordering::SeqCst);
                let (ta, tb) = ([next[0]], [next[1]]);
                let mut batch = [BatchItem::new(&ta, &mut a), BatchItem::new(&tb, &mut b)];
                model.forward(&mut ws, &mut kv, &mut batch, LogitsFor::Last, &mut logits).expect("decode");
                COUNTING.store(false, Ordering::SeqCst);
                let vocab = model.config.vocab_size;
                next = [argmax(&logits[..vocab]), argmax(&logits[vocab..])];
            };
            for _ in 0..3 {
                step(false);
            }
            // The counter sees every thread. The thread pool's own queues may still grow once to a
            // new high-water mark under load, so look at several windows of 20 steps: any
            // allocation per step would show in every window; one-off growth cannot.
            let mut windows = Vec::new();
            // Three windows keep the sequences within the fixtures' 96-token context.
            for _ in 0..3 {
                ALLOCS.store(0, Ordering::SeqCst);
                for _ in 0..20 {
                    step(true);
                }
                windows.push(ALLOCS.load(Ordering::SeqCst));
                if windows.last() == Some(&0) {
                    break;
                }
            }
            windows
        });
        assert_eq!(allocs.last(), Some(&0), "{arch}: allocations per window of 20 decode steps: {allocs:?}");
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}
