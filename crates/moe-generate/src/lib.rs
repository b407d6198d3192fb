//! `moe-generate` turns a loaded [`moe_model::Model`] into text generation: the tokenizer
//! (`tokenizer.json` through the `tokenizers` crate, optional), sampling (greedy, temperature,
//! top-k, top-p, seeded), and the prefill-then-decode loop with its stop rules. It does not
//! schedule several requests; the router does that.

mod error;
mod generator;
mod sampler;
mod text;

pub use error::{GenerateError, Result};
pub use generator::{FinishReason, GenerateOutput, GenerateRequest, Generator};
pub use sampler::{Sampler, SamplingParams};
pub use text::TextCodec;
