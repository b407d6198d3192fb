//! Client-side bookkeeping for resumable generation: feed a stream's messages to
//! [`ResumeState`]; when the stream breaks, [`ResumeState::request`] is the request to send to
//! another router (or the same one), which continues with exactly the tokens the broken stream
//! would have produced. A client that shows the deltas it receives ends up with one unbroken
//! answer.

use crate::v1::generate_stream_response::Event;
use crate::v1::{GenerateRequest, GenerateStreamResponse, Resume};

/// What a client must remember of a stream to resume it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResumeState {
    /// Every token received so far, over all attempts.
    pub generated: Vec<u32>,
    /// The request's resume digest (from the first delta); empty until one arrived.
    pub digest: String,
    /// The stream ended with `Finished`: nothing to resume.
    pub finished: bool,
}

impl ResumeState {
    /// Takes in one message of a stream (the original or a resumed one).
    pub fn observe(&mut self, msg: &GenerateStreamResponse) {
        match &msg.event {
            Some(Event::Delta(d)) => {
                if self.digest.is_empty() && !d.resume_digest.is_empty() {
                    self.digest = d.resume_digest.clone();
                }
                self.generated.extend_from_slice(&d.token_ids);
            }
            Some(Event::Finished(_)) => self.finished = true,
            None => {}
        }
    }

    /// The request that continues `original` after what was received: `original` itself while
    /// no token (or no digest) arrived, since starting over is then the same thing.
    pub fn request(&self, original: &GenerateRequest) -> GenerateRequest {
        let mut req = original.clone();
        if !self.generated.is_empty() && !self.digest.is_empty() {
            req.resume = Some(Resume { generated_token_ids: self.generated.clone(), digest: self.digest.clone() });
        }
        req
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Finished, TokenDelta};

    fn delta(ids: &[u32], digest: &str) -> GenerateStreamResponse {
        let d = TokenDelta { token_ids: ids.to_vec(), resume_digest: digest.into(), ..Default::default() };
        GenerateStreamResponse { event: Some(Event::Delta(d)) }
    }

    #[test]
    fn keeps_the_first_digest_and_every_token() {
        let original = GenerateRequest { adapter_id: "a".into(), ..Default::default() };
        let mut s = ResumeState::default();
        assert_eq!(s.request(&original), original, "nothing received: start over");
        s.observe(&delta(&[5], "d1"));
        s.observe(&delta(&[6, 7], ""));
        let r = s.request(&original);
        assert_eq!(r.adapter_id, "a");
        assert_eq!(r.resume, Some(Resume { generated_token_ids: vec![5, 6, 7], digest: "d1".into() }));
        // A resumed stream's first delta repeats the digest; tokens keep accumulating.
        s.observe(&delta(&[8], "d1"));
        assert_eq!(s.request(&original).resume.map(|r| r.generated_token_ids), Some(vec![5, 6, 7, 8]));
        s.observe(&GenerateStreamResponse { event: Some(Event::Finished(Finished::default())) });
        assert!(s.finished);
    }
}
