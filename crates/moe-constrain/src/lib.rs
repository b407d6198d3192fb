//! `moe-constrain` turns a request's output constraint (a JSON schema, any JSON object, a regex
//! or a Lark grammar) into the set of tokens allowed at each step, with `llguidance` (the engine
//! behind structured output in vLLM and SGLang). A [`Grammars`] is built once per model from its
//! `tokenizer.json` (the bytes of every token); each request compiles its own [`Constraint`],
//! which computes the mask for its next token (tens of microseconds; the engine runs them in
//! parallel with the forward pass), masks the logits, and follows the sampled tokens. It knows
//! nothing of models or serving.

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;

/// What a request's output must match.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ConstraintSpec {
    /// A JSON document valid against this JSON schema (text).
    JsonSchema(String),
    /// Any JSON object.
    JsonObject,
    /// The whole output matches this regular expression.
    Regex(String),
    /// A Lark grammar (llguidance's dialect: `start: ...`).
    Lark(String),
}

impl ConstraintSpec {
    /// The schema, regex or grammar text (empty for `JsonObject`).
    pub fn text(&self) -> &str {
        match self {
            Self::JsonSchema(t) | Self::Regex(t) | Self::Lark(t) => t,
            Self::JsonObject => "",
        }
    }

    /// The kind, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::JsonSchema(_) => "json_schema",
            Self::JsonObject => "json_object",
            Self::Regex(_) => "regex",
            Self::Lark(_) => "lark",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConstrainError {
    #[error("the model has no tokenizer.json, so its output cannot be constrained")]
    NoTokenizer,
    #[error("cannot read the tokenizer for constraints: {0}")]
    Tokenizer(String),
    #[error("invalid {kind}: {message}")]
    Invalid { kind: &'static str, message: String },
    #[error("the {kind} is {bytes} bytes; the limit is {limit}")]
    TooLarge { kind: &'static str, bytes: usize, limit: usize },
    #[error("the constraint failed: {0}")]
    Failed(String),
}

pub type Result<T> = std::result::Result<T, ConstrainError>;

/// The longest constraint text accepted (schema, regex or grammar).
pub const MAX_CONSTRAINT_BYTES: usize = 256 * 1024;

/// The model's tokens as llguidance sees them, and its parser factory. Cheap to clone.
#[derive(Clone)]
pub struct Grammars {
    factory: Arc<ParserFactory>,
    vocab: usize,
    /// Compiled constraints by spec: a request repeating a schema (the common case: one schema
    /// per tool or endpoint) starts from a copy instead of compiling again.
    /// Compiled constraints by (scope, spec).
    compiled: Arc<std::sync::Mutex<std::collections::HashMap<(String, ConstraintSpec), Constraint>>>,
    compiles: Arc<std::sync::atomic::AtomicU64>,
}

/// At most this many compiled constraints are kept (the cache starts over when full).
const COMPILED_CACHE: usize = 256;

impl Grammars {
    /// From the text of `tokenizer.json`, for a model with `vocab_size` logits and end-of-text
    /// token `eos`. Tokens past the tokenizer's own (padding rows of the embedding) are never
    /// allowed.
    pub fn from_tokenizer_json(json: &str, vocab_size: usize, eos: u32) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| ConstrainError::Tokenizer(e.to_string()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&value)
            .map_err(|e| ConstrainError::Tokenizer(e.to_string()))?;
        if words.len() > vocab_size {
            return Err(ConstrainError::Tokenizer(format!(
                "the tokenizer has {} tokens, more than the model's {vocab_size} logits",
                words.len()
            )));
        }
        // Padding ids get a special-token spelling nothing can match.
        for i in words.len()..vocab_size {
            words.push(format!("\u{ff}<|pad{i}|>").into_bytes());
        }
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| ConstrainError::Tokenizer(e.to_string()))?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
            vocab: vocab_size,
            compiled: Default::default(),
            compiles: Default::default(),
        })
    }

    /// Compiles `spec` for one request; a bad schema, regex or grammar is refused with the
    /// parser's message.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint> {
        self.compile_in("", spec)
    }

    /// [`Self::compile`] with compiled constraints cached per `scope` (a tenant), so that one
    /// scope's compile time never tells another whether the same spec was sent before.
    pub fn compile_in(&self, scope: &str, spec: &ConstraintSpec) -> Result<Constraint> {
        let lock = || self.compiled.lock().unwrap_or_else(|p| p.into_inner());
        let key = (scope.to_string(), spec.clone());
        if let Some(c) = lock().get(&key) {
            return Ok(c.clone());
        }
        let c = self.compile_uncached(spec)?;
        self.compiles.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut cache = lock();
        if cache.len() >= COMPILED_CACHE {
            cache.clear();
        }
        cache.insert(key, c.clone());
        Ok(c)
    }

    /// Specs compiled (cache misses) so far.
    pub fn compiles(&self) -> u64 {
        self.compiles.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn compile_uncached(&self, spec: &ConstraintSpec) -> Result<Constraint> {
        let kind = spec.kind();
        let text_len = spec.text().len();
        if text_len > MAX_CONSTRAINT_BYTES {
            return Err(ConstrainError::TooLarge { kind, bytes: text_len, limit: MAX_CONSTRAINT_BYTES });
        }
        let invalid = |message: String| ConstrainError::Invalid { kind, message };
        let grammar = match spec {
            ConstraintSpec::JsonSchema(text) => {
                let schema: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| invalid(format!("not JSON: {e}")))?;
                TopLevelGrammar::from_json_schema(compact(schema))
            }
            ConstraintSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
            }
            ConstraintSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            ConstraintSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        };
        let parser = self.factory.create_parser(grammar).map_err(|e| invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(e));
        }
        Ok(Constraint {
            matcher,
            mask: None,
            mask_time: Default::default(),
            vocab: self.vocab,
            kind,
            spec: Arc::new(spec.clone()),
        })
    }
}

/// JSON written on one line with single spaces after `,` and `:` (as OpenAI's structured output
/// reads), unless the schema chooses its own layout with llguidance's `x-guidance` options:
/// free whitespace would let a model spend its tokens on newlines.
fn compact(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(
            || serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// One request's constraint: where it stands in the grammar, and the mask for its next token.
pub struct Constraint {
    matcher: Matcher,
    mask: Option<SimpleVob>,
    /// How long the last mask took to compute.
    mask_time: std::time::Duration,
    vocab: usize,
    kind: &'static str,
    spec: Arc<ConstraintSpec>,
}

impl Clone for Constraint {
    /// An independent copy (its own parser state).
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            mask: self.mask.clone(),
            mask_time: self.mask_time,
            vocab: self.vocab,
            kind: self.kind,
            spec: self.spec.clone(),
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl Constraint {
    /// What was compiled.
    pub fn spec(&self) -> &ConstraintSpec {
        &self.spec
    }

    /// The kind of constraint ([`ConstraintSpec::kind`]).
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Follows tokens generated before (a resumed request), without sampling them.
    pub fn consume(&mut self, tokens: &[u32]) -> Result<()> {
        self.mask = None;
        self.matcher.consume_tokens(tokens).map_err(|e| ConstrainError::Failed(e.to_string()))
    }

    /// Computes the mask of tokens allowed next (call before [`Self::apply`]; may run on another
    /// thread). When the grammar is complete only end-of-text is allowed.
    pub fn compute_mask(&mut self) -> Result<()> {
        if self.mask.is_none() {
            let started = std::time::Instant::now();
            let mask = self.matcher.compute_mask_or_eos().map_err(|e| ConstrainError::Failed(e.to_string()));
            self.mask_time = started.elapsed();
            self.mask = Some(mask?);
        }
        Ok(())
    }

    /// How long the last [`Self::compute_mask`] took.
    pub fn mask_time(&self) -> std::time::Duration {
        self.mask_time
    }

    /// Sets the logits of disallowed tokens to −∞ (computing the mask first if needed). Fails
    /// when no token is allowed.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<()> {
        self.compute_mask()?;
        let mask = self.mask.as_ref().ok_or_else(|| ConstrainError::Failed("no mask".into()))?;
        if mask.num_set() == 0 {
            return Err(ConstrainError::Failed("no token can continue the output".into()));
        }
        for (i, l) in logits.iter_mut().enumerate().take(self.vocab) {
            if !mask.is_allowed(i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Whether the output is complete: the grammar allows nothing more (after the tokens
    /// committed or consumed so far).
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Follows the sampled `token`. Returns true when the output is complete (the grammar allows
    /// nothing more, or the token was end-of-text).
    pub fn commit(&mut self, token: u32) -> Result<bool> {
        self.mask = None;
        if self.matcher.is_stopped() {
            return Ok(true);
        }
        self.matcher.consume_token(token).map_err(|e| ConstrainError::Failed(e.to_string()))?;
        Ok(self.matcher.is_stopped())
    }
}

#[cfg(test)]
mod tests;
