//! A generation request as callers give it, its validation into a [`ValidatedRequest`] (every
//! rejection names the field), and the events a request produces.

use crate::error::RouterError;
use moe_generate::{SamplingParams, TextCodec};
use moe_model::ModelConfig;
use std::time::{Duration, Instant};

/// The prompt: text for the tokenizer, or token ids.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

/// Request fields as received; `None` means the default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationParams {
    pub max_new_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_k: Option<i32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub repetition_penalty: Option<f32>,
    pub logprobs: bool,
    pub adapter_id: String,
    pub timeout: Option<Duration>,
    /// Mixed into the prefix cache's keys (requests share cached pages only with equal salts).
    pub cache_salt: Option<String>,
    /// Continue a broken generation ([`crate::resume`]).
    pub resume: Option<ResumeParams>,
    /// What the output must match (structured output).
    pub constraint: Option<moe_constrain::ConstraintSpec>,
    /// Whose compiled constraints this request may reuse (its tenant; see
    /// [`crate::access::constraint_scope`]).
    pub constraint_scope: String,
    /// Scheduling class: higher is admitted first and may preempt lower (default 0; capped by
    /// the tenant's `max_priority`). Unlike vLLM, where lower values go first.
    pub priority: i32,
}

pub const DEFAULT_MAX_NEW_TOKENS: usize = 64;
/// The longest timeout a request may ask for (a week): longer ones are capped to it.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// At most this many stop sequences per request.
pub const MAX_STOP_SEQUENCES: usize = 16;
/// At most this many bytes of `cache_salt`.
pub const MAX_CACHE_SALT_BYTES: usize = 256;
/// At most this many bytes per stop sequence.
pub const MAX_STOP_BYTES: usize = 1024;

/// A request that passed validation, ready for the engine.
#[derive(Clone, Debug)]
pub struct ValidatedRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub repetition_penalty: f32,
    pub logprobs: bool,
    pub stop_ids: Vec<u32>,
    pub deadline: Instant,
    pub timeout: Duration,
    /// The LoRA adapter, resolved and pinned (resident while this request holds it).
    pub adapter: Option<moe_lora::AdapterPin>,
    /// The tenant's name (a metrics label), when tenants are configured.
    pub tenant: Option<String>,
    /// Scheduling class (see [`GenerationParams::priority`]), after the tenant's cap.
    pub priority: i32,
    /// The tenant's share weight under fair scheduling (1 without tenants).
    pub share_weight: f64,
    /// The tenant's token budget, spent as the engine processes this request's tokens.
    pub budget: Option<std::sync::Arc<crate::budget::TokenBudget>>,
    /// See [`GenerationParams::cache_salt`].
    pub cache_salt: Option<String>,
    /// Tokens generated before a broken stream (see [`crate::resume`]): the engine recomputes
    /// their KV state and continues after them; they count in `max_new_tokens`.
    pub resumed: Vec<u32>,
    /// The digest the resume claims; checked against the request once its adapter is attached.
    pub resume_digest: Option<String>,
    /// The compiled output constraint, already past any resumed tokens; the engine masks each
    /// step's logits with it.
    pub constraint: Option<moe_constrain::Constraint>,
    /// The detokenizer after the resumed tokens (whose text was sent already) and whether they
    /// completed a stop sequence: replayed here, during validation off the engine's thread, so
    /// that no request's resume makes every other request's step wait.
    pub(crate) resumed_text: crate::detokenize::DetokenizeStream,
    pub(crate) resumed_stopped: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

/// What a request emits: deltas, then exactly one `Finished` or `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Delta { text: String, token_ids: Vec<u32>, logprobs: Vec<f32> },
    Finished { reason: FinishReason, prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize },
    Failed(RouterError),
}

impl ValidatedRequest {
    pub fn new(
        prompt: PromptInput,
        p: &GenerationParams,
        codec: &TextCodec,
        config: &ModelConfig,
        default_timeout: Duration,
    ) -> Result<Self, RouterError> {
        let prompt = match prompt {
            PromptInput::Ids(ids) => ids,
            PromptInput::Text(text) => {
                if !codec.has_tokenizer() {
                    return Err(RouterError::invalid(
                        "prompt",
                        "the model has no tokenizer.json; send token_ids instead of text",
                    ));
                }
                codec.encode(&text).map_err(|e| RouterError::invalid("prompt", e.to_string()))?
            }
        };
        if prompt.is_empty() {
            return Err(RouterError::invalid("prompt", "the prompt is empty"));
        }
        if let Some((i, &id)) = prompt.iter().enumerate().find(|(_, &t)| t as usize >= config.vocab_size) {
            return Err(RouterError::invalid(
                "prompt",
                format!("token id {id} at position {i} is out of range: vocab_size is {}", config.vocab_size),
            ));
        }
        let max_pos = config.max_position_embeddings;
        if prompt.len() >= max_pos {
            return Err(RouterError::invalid(
                "prompt",
                format!(
                    "prompt of {} tokens leaves no room in the context of {max_pos} tokens (max_position_embeddings)",
                    prompt.len()
                ),
            ));
        }
        let room = max_pos - prompt.len();
        let max_new_tokens = match p.max_new_tokens {
            None => DEFAULT_MAX_NEW_TOKENS.min(room),
            Some(0) => return Err(RouterError::invalid("max_new_tokens", "must be at least 1")),
            Some(n) if n as usize > room => {
                return Err(RouterError::invalid(
                    "max_new_tokens",
                    format!(
                        "{n} new tokens after a prompt of {} exceed the context of {max_pos} tokens (max_position_embeddings)",
                        prompt.len()
                    ),
                ))
            }
            Some(n) => n as usize,
        };
        let temperature = p.temperature.unwrap_or(0.0);
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(RouterError::invalid("temperature", format!("must be >= 0, got {temperature}")));
        }
        let top_k = p.top_k.unwrap_or(0);
        if top_k < 0 || top_k as usize > config.vocab_size {
            return Err(RouterError::invalid(
                "top_k",
                format!("must be 0 (off) to vocab_size {}, got {top_k}", config.vocab_size),
            ));
        }
        let top_p = p.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(RouterError::invalid("top_p", format!("must be in (0, 1], got {top_p}")));
        }
        let repetition_penalty = p.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
            return Err(RouterError::invalid("repetition_penalty", format!("must be > 0, got {repetition_penalty}")));
        }
        if p.stop.len() > MAX_STOP_SEQUENCES {
            return Err(RouterError::invalid(
                "stop",
                format!("{} stop sequences; at most {MAX_STOP_SEQUENCES} are allowed", p.stop.len()),
            ));
        }
        if let Some((i, s)) = p.stop.iter().enumerate().find(|(_, s)| s.len() > MAX_STOP_BYTES) {
            return Err(RouterError::invalid(
                "stop",
                format!("stop sequence {i} is {} bytes; at most {MAX_STOP_BYTES} are allowed", s.len()),
            ));
        }
        if let Some(i) = p.stop.iter().position(|s| s.is_empty()) {
            return Err(RouterError::invalid("stop", format!("stop sequence {i} is empty")));
        }
        if !p.stop.is_empty() && !codec.has_tokenizer() {
            return Err(RouterError::invalid("stop", "stop sequences need the model's tokenizer.json"));
        }
        let (resumed, resume_digest) = match &p.resume {
            None => (Vec::new(), None),
            Some(r) => {
                let field = "resume.generated_token_ids";
                if let Some((i, &id)) = r.generated.iter().enumerate().find(|(_, &t)| t as usize >= config.vocab_size) {
                    return Err(RouterError::invalid(
                        field,
                        format!("token id {id} at position {i} is out of range: vocab_size is {}", config.vocab_size),
                    ));
                }
                if r.generated.len() > max_new_tokens {
                    return Err(RouterError::invalid(
                        field,
                        format!(
                            "{} tokens, more than the request's max_new_tokens of {max_new_tokens}",
                            r.generated.len()
                        ),
                    ));
                }
                (r.generated.clone(), Some(r.digest.clone()))
            }
        };
        let constraint = match &p.constraint {
            None => None,
            Some(spec) => Some(compile_constraint(spec, &p.constraint_scope, codec, config, &resumed)?),
        };
        let mut resumed_text = crate::detokenize::DetokenizeStream::new(p.stop.clone());
        let mut resumed_stopped = false;
        for &t in &resumed {
            resumed_stopped |= resumed_text.push(codec, t).1;
        }
        // A client's timeout is capped, so the deadline is always a representable instant.
        let timeout = p.timeout.filter(|t| !t.is_zero()).unwrap_or(default_timeout).min(MAX_REQUEST_TIMEOUT);
        let now = Instant::now();
        Ok(Self {
            prompt,
            max_new_tokens,
            sampling: SamplingParams { temperature, top_k: top_k as usize, top_p, seed: p.seed.unwrap_or(0) },
            stop: p.stop.clone(),
            repetition_penalty,
            logprobs: p.logprobs,
            stop_ids: config.eos_token_ids.clone(),
            deadline: now.checked_add(timeout).unwrap_or(now),
            timeout,
            adapter: None,
            tenant: None,
            priority: p.priority,
            share_weight: 1.0,
            budget: None,
            cache_salt: match &p.cache_salt {
                Some(salt) if salt.len() > MAX_CACHE_SALT_BYTES => {
                    return Err(RouterError::invalid(
                        "cache_salt",
                        format!("{} bytes; at most {MAX_CACHE_SALT_BYTES}", salt.len()),
                    ))
                }
                Some(salt) if !salt.is_empty() => Some(salt.clone()),
                _ => None,
            },
            resumed,
            resume_digest,
            constraint,
            resumed_text,
            resumed_stopped,
        })
    }
}

/// Compiles a request's output constraint (INVALID_ARGUMENT `constraint` with the parser's
/// message when it does not compile) and advances it past the resumed tokens.
fn compile_constraint(
    spec: &moe_constrain::ConstraintSpec,
    scope: &str,
    codec: &TextCodec,
    config: &ModelConfig,
    resumed: &[u32],
) -> Result<moe_constrain::Constraint, RouterError> {
    let field = "constraint";
    // The model's end-of-text token, or (a config without one) the tokenizer's usual spelling.
    let eos = config
        .eos_token_ids
        .first()
        .copied()
        .or_else(|| ["</s>", "<|endoftext|>", "<|im_end|>", "<eos>"].iter().find_map(|t| codec.token_id(t)))
        .ok_or_else(|| RouterError::invalid(field, "the model has no end-of-text token to end constrained output"))?;
    let grammars = codec.grammars(config.vocab_size, eos).map_err(|e| RouterError::invalid(field, e))?;
    let mut c = grammars.compile_in(scope, spec).map_err(|e| RouterError::invalid(field, e.to_string()))?;
    if !resumed.is_empty() {
        c.consume(resumed).map_err(|e| {
            RouterError::invalid("resume.generated_token_ids", format!("the tokens do not follow the constraint: {e}"))
        })?;
    }
    Ok(c)
}

/// A resume as the client sent it (validated against the model in [`ValidatedRequest::new`],
/// against the request's digest here).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResumeParams {
    pub generated: Vec<u32>,
    pub digest: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A client's timeout of u64::MAX milliseconds is capped instead of overflowing the deadline.
    #[test]
    fn huge_timeouts_are_capped() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mixtral");
        let config = ModelConfig::from_dir(&dir).expect("config");
        let codec = TextCodec::from_dir(&dir).expect("codec");
        let p = GenerationParams { timeout: Some(Duration::from_millis(u64::MAX)), ..Default::default() };
        let r = ValidatedRequest::new(PromptInput::Ids(vec![1, 2]), &p, &codec, &config, Duration::from_secs(60))
            .expect("valid");
        assert_eq!(r.timeout, MAX_REQUEST_TIMEOUT);
        assert!(r.deadline > Instant::now() + Duration::from_secs(3600));
    }
}
