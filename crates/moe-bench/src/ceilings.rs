//! Ceilings of this machine, measured with the same code paths the model uses.

use moe_compute::cpu::matmul_t;
use std::time::Instant;

/// Copy bandwidth in GB/s (bytes read plus bytes written per second) over `mb` MiB, all
/// threads, best of a few runs.
pub fn memory_copy_gbps(mb: usize) -> f64 {
    use rayon::prelude::*;
    let n = (mb << 20) / 4;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let chunk = n.div_ceil(rayon::current_num_threads().max(1) * 4);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    (2 * n * 4) as f64 / best / 1e9
}

/// The backend's f32 matrix multiply on `n x n x n`, GFLOP/s, best of a few runs.
pub fn gemm_peak_gflops(n: usize) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0.0f32; n * n];
    let mut best = f64::MAX;
    for _ in 0..4 {
        let t = Instant::now();
        matmul_t(&a, n, n, &b, n, &mut c);
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (n * n * n) as f64 / best / 1e9
}

/// Grouped expert FFN rate of a worker hosting every expert: `rows` rows, each routed to `top_k`
/// experts in turn, GFLOP/s (best of a few runs).
pub fn expert_gflops(host: &dyn moe_worker::ExpertCompute, layer: usize, rows: usize) -> f64 {
    let c = host.config();
    let (h, k, e) = (c.hidden_size, c.top_k, c.num_experts);
    let x: Vec<f32> = (0..rows * h).map(|i| ((i % 13) as f32 - 6.0) * 0.05).collect();
    let row_pairs = vec![k as u32; rows];
    let experts: Vec<u32> = (0..rows * k).map(|i| ((i / k + i % k) % e) as u32).collect();
    let weights = vec![1.0 / k as f32; rows * k];
    let input = moe_worker::ComputeInput::base(layer, h, &x, &row_pairs, &experts, &weights);
    let mut out = Vec::new();
    let mut best = f64::MAX;
    for _ in 0..4 {
        let t = Instant::now();
        if host.compute(&input, &mut out).is_err() {
            return 0.0;
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    let flops = 2.0 * 3.0 * (rows * k * h * c.expert_intermediate_size) as f64;
    flops / best / 1e9
}
