//! `moe-bench` holds the measurements behind `moe bench`: this machine's ceilings (memory copy
//! bandwidth, the backend's own peak GEMM rate), an engine's prefill and decode throughput with
//! time to first token and inter-token latency, and the grouped expert FFN rate. Every figure is
//! measured in the same run as the ceiling it is compared with; nothing here asserts a speed.
//!
//! It owns every measurement scenario the `moe` command runs ([`scenarios`]: `bench`,
//! `bench-device`, `bench-placement`, `loadgen` and the scenarios `bench` runs in turn), the GPU
//! check commands ([`kernels`]) and the fixture recomputation on a device ([`fixture_check`]);
//! each scenario's flags are its `Args` struct, which the `moe` binary parses.

mod ceilings;
mod engine;
pub mod fixture_check;
pub mod kernels;
mod processes;
pub mod report;
pub mod scenarios;
pub mod tour;

pub use ceilings::{expert_gflops, gemm_peak_gflops, memory_copy_gbps};
pub use engine::{decode, decode_with, prefill, AdapterOf, DecodeReport, PrefillReport};

use serde::Serialize;

/// Median and 99th percentile of a sample, in the sample's unit.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    pub median: f64,
    pub p99: f64,
}

impl Percentiles {
    pub fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Self { median: at(0.5), p99: at(0.99) }
    }
}

/// Bytes of weights one decoded token reads (attention, gate, the chosen experts of each MoE
/// layer, dense MLPs, the output head), at `bytes_per_value` each.
pub fn bytes_per_decoded_token(c: &moe_model::ModelConfig, bytes_per_value: usize) -> usize {
    let h = c.hidden_size;
    let attn = h * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * h;
    let mut params = c.vocab_size * h;
    for l in 0..c.num_layers {
        params += attn + 2 * h;
        if c.is_moe_layer(l) {
            params += c.num_experts * h + c.top_k * 3 * h * c.expert_intermediate_size;
            if let Some(s) = c.shared_expert_intermediate_size {
                params += 3 * h * s + h;
            }
        } else {
            params += 3 * h * c.intermediate_size;
        }
    }
    params * bytes_per_value
}

/// Multiply-adds x2 per prompt token in the dense and expert matrix multiplies (attention
/// scores excluded): the prefill roofline's work.
pub fn flops_per_prefill_token(c: &moe_model::ModelConfig) -> f64 {
    // Prefill does not run the output head except for the last token.
    let lm = c.vocab_size * c.hidden_size;
    2.0 * (bytes_per_decoded_token(c, 1) - lm) as f64
}
