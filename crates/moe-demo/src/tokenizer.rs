//! A byte-level BPE `tokenizer.json` with no merges: every byte is one token (ids 0..=255, in
//! GPT-2's byte-to-character mapping), plus `<s>` and `</s>`. Any text round-trips exactly.

use serde_json::json;

pub const BOS_ID: u32 = 256;
pub const EOS_ID: u32 = 257;
/// The smallest vocabulary that holds the byte tokens and the two special tokens.
pub const MIN_VOCAB: usize = 258;

/// GPT-2's reversible byte -> printable character table.
fn byte_to_char() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec!['\0'; 256];
    for (b, c) in printable.into_iter().zip(chars) {
        table[b as usize] = char::from_u32(c).unwrap_or('\0');
    }
    table
}

pub fn byte_level_tokenizer_json() -> String {
    let table = byte_to_char();
    let vocab: serde_json::Map<String, serde_json::Value> =
        table.iter().enumerate().map(|(id, c)| (c.to_string(), json!(id))).collect();
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let t = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(BOS_ID, "<s>"), special(EOS_ID, "</s>")],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    serde_json::to_string(&t).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_any_text() {
        let t: tokenizers::Tokenizer = byte_level_tokenizer_json().parse().expect("valid tokenizer.json");
        let text = "Hello, MoE! ünïcode ✓\n";
        let ids = t.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids.len(), text.len(), "one token per byte");
        assert_eq!(ids[0], b'H' as u32);
        assert_eq!(t.decode(&ids, true).unwrap(), text);
    }
}
