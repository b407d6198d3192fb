//! Criterion benchmarks of the CPU backend's hot kernels on the standard bench model's shapes
//! (hidden 512, intermediate 1024, 8 experts top-2, 8 heads / 2 KV heads of 64, vocab 32000):
//! GEMM (decode GEMV and prefill GEMM, f32 and bf16 weights), the grouped expert FFN, paged
//! attention (decode and prefill), and gating (gate projection + softmax top-k).
//!
//! `cargo bench -p moe-model --bench kernels` (add `-- gemm` to pick a group). Each group also
//! has a baseline measured in the same run where one exists (the f32 path for bf16), so read
//! the ratios rather than absolute times on a noisy machine.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moe_compute::cpu::{CpuBackend, HostTensor};
use moe_compute::{AttentionSeq, AttentionShape, Backend, ExpertPlan, FfnScratch, KvLayout, SwigluWeights};
use moe_model::routing::route_row;
use std::hint::black_box;

const HIDDEN: usize = 512;
const INTER: usize = 1024;
const EXPERTS: usize = 8;
const TOP_K: usize = 2;

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|x| (x.to_bits() >> 16) as u16).collect()
}

fn act(b: &CpuBackend, rows: usize, cols: usize, seed: u64) -> HostTensor {
    let mut a = b.act();
    b.upload(rows, cols, &rand_vec(rows * cols, seed), &mut a);
    a
}

fn gemm(c: &mut Criterion) {
    let b = CpuBackend::new();
    let mut g = c.benchmark_group("gemm");
    let w = rand_vec(INTER * HIDDEN, 1);
    let wf = b.matrix(INTER, HIDDEN, w.clone()).expect("matrix");
    let wb = b.matrix_bf16(INTER, HIDDEN, bf16_bits(&w)).expect("matrix");
    for rows in [1usize, 16, 512] {
        let x = act(&b, rows, HIDDEN, 2);
        let mut out = b.act();
        g.throughput(Throughput::Elements((2 * rows * INTER * HIDDEN) as u64));
        g.bench_with_input(BenchmarkId::new("f32", rows), &rows, |bench, _| {
            bench.iter(|| b.linear(black_box(&x), &wf, None, &mut out))
        });
        g.bench_with_input(BenchmarkId::new("bf16", rows), &rows, |bench, _| {
            bench.iter(|| b.linear(black_box(&x), &wb, None, &mut out))
        });
    }
    g.finish();
}

fn expert_ffn(c: &mut Criterion) {
    let b = CpuBackend::new();
    let experts: Vec<SwigluWeights<CpuBackend>> = (0..EXPERTS)
        .map(|e| {
            SwigluWeights::plain(
                b.matrix(2 * INTER, HIDDEN, rand_vec(2 * INTER * HIDDEN, 10 + e as u64)).expect("matrix"),
                b.matrix(HIDDEN, INTER, rand_vec(HIDDEN * INTER, 20 + e as u64)).expect("matrix"),
            )
        })
        .collect();
    let mut g = c.benchmark_group("expert_ffn");
    for rows in [1usize, 16, 512] {
        let x = act(&b, rows, HIDDEN, 3);
        let choices: Vec<(u32, f32)> =
            (0..rows * TOP_K).map(|i| (((i * 5 + i / TOP_K) % EXPERTS) as u32, 0.5)).collect();
        let mut plan = ExpertPlan::default();
        plan.rebuild(EXPERTS, TOP_K, &choices);
        let mut scratch = FfnScratch::new(&b);
        let mut out = b.act();
        g.throughput(Throughput::Elements((rows * TOP_K * 3 * 2 * INTER * HIDDEN) as u64));
        g.bench_with_input(BenchmarkId::new("top2_of_8", rows), &rows, |bench, _| {
            bench.iter(|| {
                b.zeros(rows, HIDDEN, &mut out);
                b.expert_ffn(black_box(&x), &experts, &plan, &mut scratch, &mut out)
            })
        });
    }
    g.finish();
}

fn attention(c: &mut Criterion) {
    let b = CpuBackend::new();
    let (heads, kv_heads, hd, page) = (8usize, 2usize, 64usize, 16usize);
    let shape = AttentionShape {
        n_heads: heads,
        n_kv_heads: kv_heads,
        head_dim: hd,
        q_col: 0,
        k_col: heads * hd,
        v_col: (heads + kv_heads) * hd,
        scale: 1.0 / (hd as f32).sqrt(),
        sliding_window: None,
        sinks: None,
    };
    let cols = (heads + 2 * kv_heads) * hd;
    let mut g = c.benchmark_group("attention");
    // (name, sequences, context already cached, new rows per sequence)
    for (name, seqs, ctx, new) in [("decode_16x512", 16usize, 511usize, 1usize), ("prefill_1x512", 1, 0, 512)] {
        let pages_per = (ctx + new).div_ceil(page);
        let layout = KvLayout {
            layers: 1,
            num_pages: seqs * pages_per,
            page_size: page,
            n_kv_heads: kv_heads,
            head_dim: hd,
            values_are_keys: false,
            states: Default::default(),
        };
        let mut store = b.kv_store(layout).expect("store");
        let page_table: Vec<u32> = (0..(seqs * pages_per) as u32).collect();
        let specs: Vec<AttentionSeq> = (0..seqs)
            .map(|s| AttentionSeq {
                rows: s * new..(s + 1) * new,
                start_pos: ctx,
                pages: s * pages_per..(s + 1) * pages_per,
            })
            .collect();
        let qkv = act(&b, seqs * new, cols, 4);
        let mut out = b.act();
        g.throughput(Throughput::Elements((seqs * new) as u64));
        g.bench_function(name, |bench| {
            bench.iter(|| {
                b.attention(black_box(&qkv), &shape, &specs, &page_table, &mut store, 0, &mut out).expect("attention")
            })
        });
    }
    g.finish();
}

fn gating(c: &mut Criterion) {
    let b = CpuBackend::new();
    let gate = b.matrix(EXPERTS, HIDDEN, rand_vec(EXPERTS * HIDDEN, 5)).expect("matrix");
    let mut g = c.benchmark_group("gating");
    for rows in [16usize, 512] {
        let x = act(&b, rows, HIDDEN, 6);
        let (mut logits, mut host) = (b.act(), Vec::new());
        let mut choices = vec![(0u32, 0.0f32); rows * TOP_K];
        g.throughput(Throughput::Elements(rows as u64));
        g.bench_with_input(BenchmarkId::new("linear_softmax_top2", rows), &rows, |bench, _| {
            bench.iter(|| {
                b.linear(black_box(&x), &gate, None, &mut logits);
                b.download(&logits, &mut host);
                for r in 0..rows {
                    route_row(
                        &host[r * EXPERTS..(r + 1) * EXPERTS],
                        TOP_K,
                        true,
                        &mut choices[r * TOP_K..(r + 1) * TOP_K],
                    );
                }
            })
        });
    }
    g.finish();
}

criterion_group!(kernels, gemm, expert_ffn, attention, gating);
criterion_main!(kernels);
