//! Resumable generation. Inference is deterministic, so a generation is a function of the
//! request; a client whose stream broke sends the same request again with the tokens it
//! received (`Resume`), and any router of the same model recomputes their KV state (from the
//! prefix cache where it can) and continues with exactly the tokens the first stream would have
//! produced: the sampler's generator is advanced by one draw per token already drawn.
//!
//! The first delta of every stream carries the request's digest: a stable hash (FNV-1a, the
//! same on every build) of everything that decides its tokens — the model's fingerprint, the
//! prompt, the sampling parameters, stop sequences, `max_new_tokens` and the adapter's identity.
//! A resume must send it back, so a resume of another request is refused, not continued.

use crate::error::RouterError;
pub use crate::request::ResumeParams;
use crate::request::ValidatedRequest;

/// Two FNV-1a 64-bit hashes with different offsets: 128 bits, stable across builds.
struct Fnv128 {
    lo: u64,
    hi: u64,
}

impl Fnv128 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Self {
        Self { lo: 0xcbf2_9ce4_8422_2325, hi: 0x6c62_272e_07bb_0142 }
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        for &x in b {
            self.lo = (self.lo ^ u64::from(x)).wrapping_mul(Self::PRIME);
            self.hi = (self.hi ^ u64::from(x.rotate_left(3))).wrapping_mul(Self::PRIME);
        }
        self
    }

    /// A length-prefixed field, so adjacent fields cannot run into each other.
    fn field(&mut self, b: &[u8]) -> &mut Self {
        self.bytes(&(b.len() as u64).to_le_bytes()).bytes(b)
    }

    fn hex(&self) -> String {
        format!("{:016x}{:016x}", self.hi, self.lo)
    }
}

/// The digest of everything that decides `req`'s tokens on a model with this fingerprint (the
/// adapter must be attached already).
pub fn request_digest(req: &ValidatedRequest, model_fingerprint: &str) -> String {
    let mut h = Fnv128::new();
    h.field(b"moe-resume-v1").field(model_fingerprint.as_bytes());
    let prompt: Vec<u8> = req.prompt.iter().flat_map(|t| t.to_le_bytes()).collect();
    h.field(&prompt);
    let s = &req.sampling;
    h.field(&(req.max_new_tokens as u64).to_le_bytes())
        .field(&s.temperature.to_bits().to_le_bytes())
        .field(&(s.top_k as u64).to_le_bytes())
        .field(&s.top_p.to_bits().to_le_bytes())
        .field(&s.seed.to_le_bytes())
        .field(&req.repetition_penalty.to_bits().to_le_bytes());
    h.field(&(req.stop.len() as u64).to_le_bytes());
    for stop in &req.stop {
        h.field(stop.as_bytes());
    }
    match &req.adapter {
        Some(pin) => {
            let a = pin.identity();
            h.field(a.id.as_bytes()).field(a.digest.as_bytes())
        }
        None => h.field(b""),
    };
    // A constraint decides the tokens too (unconstrained requests keep their earlier digests).
    if let Some(c) = &req.constraint {
        h.field(b"constraint").field(c.kind().as_bytes()).field(c.spec().text().as_bytes());
    }
    h.hex()
}

/// The request's digest, after checking the one a resume claims (if any) against it: what both
/// the gRPC service and the HTTP API run once the adapter is attached.
pub fn seal(req: &ValidatedRequest, model_fingerprint: &str) -> Result<String, RouterError> {
    let digest = request_digest(req, model_fingerprint);
    match req.resume_digest.as_deref() {
        Some("") => Err(RouterError::invalid(
            "resume.digest",
            "required: the resume_digest of the broken stream's first delta",
        )),
        Some(claimed) if claimed != digest => Err(RouterError::invalid(
            "resume.digest",
            "does not match this request: the prompt, sampling parameters, stop sequences, max_new_tokens or adapter differ from the request being resumed (or the model does)",
        )),
        _ => Ok(digest),
    }
}
