//! `moe-generate` holds what generation needs around a model: the tokenizer (`tokenizer.json`
//! through the `tokenizers` crate, optional), sampling (greedy, temperature, top-k, top-p,
//! seeded), and one prompt's logits ([`PromptLogits`]). The generation loop is the router's engine
//! (continuous batching, stop rules), used in process by `moe generate` and by every server.

mod error;
mod prompt_logits;
mod sampler;
mod tokenizer;

pub use error::{GenerateError, Result};
pub use prompt_logits::PromptLogits;
pub use sampler::{Sampler, SamplingParams};
pub use tokenizer::TextCodec;
