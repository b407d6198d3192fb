//! The host-side logic of the GPU decode step, in plain Rust so it is tested on every machine:
//! what the device kernels compute and how the step is laid out, as references the kernels
//! follow and the GPU check compares against.
//!
//! - [`numerics`]: one `exp` and one `sigmoid` made of IEEE operations only (the same bits on
//!   the host and the device), and the one rule for NaN and infinite gate logits.
//! - [`routing`]: the gating kernel's algorithm (warp-parallel arg-max with ties to the lower
//!   index), bit-identical to the host's sequential routing.
//! - [`plan`]: the plan kernel's algorithm (histogram, scan, stable scatter in row order, in
//!   chunks of a block), equal to [`crate::ExpertPlan`], and the GEMM tile table it writes.
//! - [`tiles`]: the grouped GEMM's block tiles, the shared-memory swizzle and the gate/up
//!   interleaving done at upload so SwiGLU runs in the GEMM's epilogue.
//! - [`step`]: batch buckets for CUDA graphs, graph keys and the one pinned upload per step.
//! - [`splits`]: flash-decoding's split of a context (a function of its length only, never of
//!   the batch) and the merge of the splits' partial softmax results.
//! - [`sampling`]: the device sampler's algorithm (greedy and top-k rows), equal to the host
//!   sampler's tokens, and structured-output masks as bitmasks.
//! - `fragments` (tests): the tensor-core kernels' lane and fragment arithmetic run on the CPU
//!   with ldmatrix and mma emulated, equal to plain products bit for bit.
//! - `flash_emulation` (tests): flash_decode.cu's blocks and merge executed on the CPU with the
//!   kernel's thread loops and indices, equal to plain attention.
//! - [`draws`]: the sampler's uniform draws as a counter (seed, draw index), so a device
//!   sampler draws what the host sampler draws.

pub mod draws;
#[cfg(test)]
mod flash_emulation;
#[cfg(test)]
mod fragments;
pub mod numerics;
pub mod plan;
pub mod routing;
pub mod sampling;
pub mod splits;
pub mod step;
pub mod tiles;
