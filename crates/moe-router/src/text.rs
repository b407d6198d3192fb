//! Incremental detokenization for streaming: the text of the generated ids so far, released in
//! deltas that never split a UTF-8 character or the start of a possible stop sequence, and cut
//! before the first stop sequence.

use moe_generate::TextCodec;

#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    text: String,
    sent: usize,
    stops: Vec<String>,
    hold_chars: usize,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        let hold_chars = stops.iter().map(|s| s.chars().count()).max().unwrap_or(1).saturating_sub(1);
        Self { stops, hold_chars, ..Default::default() }
    }

    /// Adds a generated token; returns the text now safe to send and whether a stop sequence
    /// was completed (the text then ends just before it).
    pub fn push(&mut self, codec: &TextCodec, id: u32) -> (String, bool) {
        self.ids.push(id);
        self.text = codec.decode(&self.ids);
        let mut stopped = false;
        if let Some(pos) = self.stops.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.text.truncate(pos);
            stopped = true;
        }
        let end = if stopped {
            self.text.len()
        } else {
            let mut end = self.text.len();
            // An incomplete multi-byte character decodes as U+FFFD until its last byte arrives.
            while self.text[..end].ends_with('\u{FFFD}') {
                end -= '\u{FFFD}'.len_utf8();
            }
            for _ in 0..self.hold_chars {
                match self.text[..end].char_indices().next_back() {
                    Some((i, _)) => end = i,
                    None => break,
                }
            }
            end
        };
        (self.take_until(end), stopped)
    }

    /// Everything not yet sent (at the end of generation).
    pub fn flush(&mut self) -> String {
        self.take_until(self.text.len())
    }

    fn take_until(&mut self, end: usize) -> String {
        if end <= self.sent || !self.text.is_char_boundary(self.sent) || !self.text.is_char_boundary(end) {
            return String::new();
        }
        let delta = self.text[self.sent..end].to_string();
        self.sent = end;
        delta
    }
}
