//! Streaming detokenization: the text of the generated ids so far, released in deltas that never
//! split a UTF-8 character or the start of a possible stop sequence, and cut before the first
//! stop sequence. Incremental (as TGI and vLLM do it): each token decodes only the few ids since
//! the last complete text, as `decode(ids[prefix..])` minus `decode(ids[prefix..read])`, so a
//! long output costs O(n), not O(n²); stop sequences are searched only where new text can
//! complete one. Ids that never complete a character (any client can send them as resume ids)
//! are taken as they decode (U+FFFD) once [`MAX_PENDING_IDS`] of them wait, so the re-decoded
//! tail stays bounded and the cost linear whatever the ids.

use moe_generate::TextCodec;

/// Ids that may wait for the rest of a character: a UTF-8 character is at most 4 bytes and a
/// byte-level token holds at least one, so more than this never complete one.
pub const MAX_PENDING_IDS: usize = 8;

#[derive(Clone, Debug, Default)]
pub struct DetokenizeStream {
    ids: Vec<u32>,
    /// `ids[prefix_offset..read_offset]` decode to the tail of `text` that later ids may change
    /// (a leading space, a merged character); `ids[read_offset..]` are not in `text` yet.
    prefix_offset: usize,
    read_offset: usize,
    text: String,
    sent: usize,
    stops: Vec<String>,
    hold_chars: usize,
    longest_stop: usize,
}

impl DetokenizeStream {
    pub fn new(stops: Vec<String>) -> Self {
        let hold_chars = stops.iter().map(|s| s.chars().count()).max().unwrap_or(1).saturating_sub(1);
        let longest_stop = stops.iter().map(String::len).max().unwrap_or(0);
        Self { stops, hold_chars, longest_stop, ..Default::default() }
    }

    /// Decodes the ids not yet in `text`; with `complete`, even an unfinished character.
    /// Returns where the new text starts.
    fn absorb(&mut self, codec: &TextCodec, complete: bool) -> usize {
        let before = self.text.len();
        if self.read_offset == self.ids.len() {
            return before;
        }
        let prefix = codec.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = codec.decode(&self.ids[self.prefix_offset..]);
        // An incomplete multi-byte character decodes as U+FFFD until its last byte arrives; ids
        // that have waited for more than any character needs are taken as they decode.
        let stale = self.ids.len() - self.read_offset > MAX_PENDING_IDS;
        let ready = complete || stale || !full.ends_with('\u{FFFD}');
        if ready && full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            self.text.push_str(&full[prefix.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        } else if stale {
            // Nothing decodable came of them (the decoded text did not grow): drop them from the
            // window rather than decode them again and again.
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        before
    }

    /// Ids the next [`Self::push`] decodes again (bounded: see [`MAX_PENDING_IDS`]).
    #[cfg(test)]
    pub fn window(&self) -> usize {
        self.ids.len() - self.prefix_offset
    }

    /// Adds a generated token; returns the text now safe to send and whether a stop sequence
    /// was completed (the text then ends just before it).
    pub fn push(&mut self, codec: &TextCodec, id: u32) -> (String, bool) {
        self.ids.push(id);
        let new_from = self.absorb(codec, false);
        if self.cut_at_stop(new_from) {
            return (self.take_until(self.text.len()), true);
        }
        let mut end = self.text.len();
        for _ in 0..self.hold_chars {
            match self.text[..end].char_indices().next_back() {
                Some((i, _)) => end = i,
                None => break,
            }
        }
        (self.take_until(end), false)
    }

    /// Cuts `text` before the first stop sequence that text from `new_from` on completes.
    fn cut_at_stop(&mut self, new_from: usize) -> bool {
        if self.stops.is_empty() || new_from == self.text.len() {
            return false;
        }
        let mut from = new_from.saturating_sub(self.longest_stop.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let window = &self.text[from..];
        match self.stops.iter().filter_map(|s| window.find(s.as_str())).min() {
            Some(pos) => {
                self.text.truncate(from + pos);
                true
            }
            None => false,
        }
    }

    /// Everything not yet sent (at the end of generation), without stop sequences.
    pub fn flush(&mut self, codec: &TextCodec) -> String {
        let new_from = self.absorb(codec, true);
        self.cut_at_stop(new_from);
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

#[cfg(test)]
mod tests {
    use super::DetokenizeStream;
    use moe_generate::TextCodec;

    fn codec() -> (tempfile::TempDir, TextCodec) {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("tokenizer.json"), moe_demo::byte_level_tokenizer_json()).expect("write");
        let codec = TextCodec::from_dir(dir.path()).expect("codec");
        (dir, codec)
    }

    /// The deltas of a byte-per-token stream, and whether it stopped.
    fn stream(codec: &TextCodec, text: &str, stops: &[&str]) -> (Vec<String>, bool) {
        let mut s = DetokenizeStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut deltas = Vec::new();
        for b in text.bytes() {
            let (d, stopped) = s.push(codec, b as u32);
            deltas.push(d);
            if stopped {
                return (deltas, true);
            }
        }
        deltas.push(s.flush(codec));
        (deltas, false)
    }

    #[test]
    fn deltas_add_up_to_the_whole_text_and_never_split_a_character() {
        let (_dir, codec) = codec();
        let text = "naïve café — 日本語 🙂 done";
        let (deltas, stopped) = stream(&codec, text, &[]);
        assert!(!stopped);
        assert_eq!(deltas.concat(), text);
        // Multi-byte characters arrive whole: some deltas are empty while their bytes gather.
        assert!(deltas.iter().any(|d| d.is_empty()));
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')));
    }

    #[test]
    fn stop_sequences_cut_the_text_and_are_never_sent() {
        let (_dir, codec) = codec();
        let (deltas, stopped) = stream(&codec, "one two STOP three", &["STOP", "zzz"]);
        assert!(stopped);
        assert_eq!(deltas.concat(), "one two ");
        // A stop sequence split across many tokens (and characters) is still found.
        let (deltas, stopped) = stream(&codec, "alpha 日本 beta", &["本 b"]);
        assert!(stopped);
        assert_eq!(deltas.concat(), "alpha 日");
        // Text that only starts like a stop sequence is released at the end.
        let (deltas, stopped) = stream(&codec, "ends with ST", &["STOP"]);
        assert!(!stopped);
        assert_eq!(deltas.concat(), "ends with ST");
    }

    /// Defect: ids that never complete a character were all decoded again at every push
    /// (quadratic; 4,000 such resume ids stalled the engine ~1.1 s). The window stays bounded.
    #[test]
    fn ids_that_never_complete_a_character_keep_the_window_bounded() {
        let (_dir, codec) = codec();
        let mut s = DetokenizeStream::new(vec![]);
        let mut text = String::new();
        for _ in 0..4000 {
            // 0xF0 starts a 4-byte character; another 0xF0 never continues it.
            text.push_str(&s.push(&codec, 0xF0).0);
            assert!(s.window() <= 2 * super::MAX_PENDING_IDS + 1, "window {}", s.window());
        }
        text.push_str(&s.flush(&codec));
        assert!(!text.is_empty() && text.chars().all(|c| c == '\u{FFFD}'), "{text:?}");
        // Valid text still streams exactly.
        let (deltas, _) = stream(&codec, "ok 🙂 ok", &[]);
        assert_eq!(deltas.concat(), "ok 🙂 ok");
    }
}
