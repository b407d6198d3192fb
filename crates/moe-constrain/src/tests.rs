//! Constraints on the demo model's byte-level tokenizer: a greedy walk that always picks the
//! highest allowed token of some arbitrary logits produces output that matches.

use super::*;

const EOS: u32 = 257;

fn grammars() -> Grammars {
    Grammars::from_tokenizer_json(&moe_demo::byte_level_tokenizer_json(), 300, EOS).expect("grammars")
}

/// Generates with pseudo-random logits until the constraint completes; returns the bytes.
fn walk(c: &mut Constraint, seed: u64, max: usize) -> Option<Vec<u8>> {
    let mut state = seed | 1;
    let mut out = Vec::new();
    for _ in 0..max {
        let mut logits: Vec<f32> = (0..300)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 1000) as f32 / 100.0
            })
            .collect();
        c.apply(&mut logits).expect("mask");
        let t = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32)?;
        if t == EOS {
            return Some(out);
        }
        out.extend(u8::try_from(t).ok());
        if c.commit(t).expect("commit") {
            return Some(out);
        }
    }
    None
}

#[test]
fn regex_output_matches() {
    let g = grammars();
    for seed in 1..20 {
        let mut c = g.compile(&ConstraintSpec::Regex("(yes|no) [0-9]{2}".into())).expect("compile");
        let out = walk(&mut c, seed, 50).expect("completes");
        let s = String::from_utf8(out).expect("utf8");
        assert!(s.starts_with("yes ") || s.starts_with("no "), "{s:?}");
        assert_eq!(s.len(), if s.starts_with("yes") { 6 } else { 5 }, "{s:?}");
    }
}

#[test]
fn bad_constraints_are_refused_with_the_parser_message() {
    let g = grammars();
    let e = g.compile(&ConstraintSpec::JsonSchema("{not json".into())).expect_err("bad");
    assert!(e.to_string().contains("invalid json_schema: not JSON"), "{e}");
    let e = g.compile(&ConstraintSpec::Regex("(unclosed".into())).expect_err("bad");
    assert!(e.to_string().starts_with("invalid regex"), "{e}");
    let e = g.compile(&ConstraintSpec::Lark("start: undefined_rule".into())).expect_err("bad");
    assert!(e.to_string().starts_with("invalid lark"), "{e}");
}

#[test]
fn json_schema_output_parses_and_keeps_to_the_schema() {
    let g = grammars();
    let schema = r#"{"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9},
        "tag": {"enum": ["x", "yy"]}}, "required": ["n", "tag"], "additionalProperties": false}"#;
    let mut completed = 0;
    for seed in 1..30 {
        let mut c = g.compile(&ConstraintSpec::JsonSchema(schema.into())).expect("compile");
        let Some(out) = walk(&mut c, seed, 60) else { continue };
        let v: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
        let n = v["n"].as_i64().expect("n");
        assert!((1..=9).contains(&n), "{v}");
        assert!(v["tag"] == "x" || v["tag"] == "yy", "{v}");
        assert_eq!(v.as_object().map(|o| o.len()), Some(2), "{v}");
        assert!(!out.contains(&b'\n'), "compact JSON: {}", String::from_utf8_lossy(&out));
        completed += 1;
    }
    assert!(completed >= 20, "only {completed} of 29 completed");
}
