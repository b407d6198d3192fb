//! The trained demo model, embedded in the binary: a byte-level Mixtral-layout MoE (hidden 128,
//! 4 layers, 8 experts top-2, bf16) trained by `train/train_demo.py` on prose and code that every
//! CPython install ships, with three tenant adapters made by PEFT (`prose` and `code`: gate-only
//! LoRA; `attn`: q/v LoRA), the measurements the script made (`report.json`), a sample of held-out
//! text (`heldout.json`) and a tenants file that gives two demo tenants their keys.

use crate::{byte_level_tokenizer_json, DemoError, Result};
use std::path::Path;

/// One file of the trained demo, relative to the model directory.
pub struct EmbeddedFile {
    pub path: &'static str,
    pub bytes: &'static [u8],
}

macro_rules! embed {
    ($p:literal) => {
        EmbeddedFile { path: $p, bytes: include_bytes!(concat!("../trained/", $p)) }
    };
}

/// Every committed file of the trained demo.
pub const TRAINED_FILES: &[EmbeddedFile] = &[
    embed!("config.json"),
    embed!("model.safetensors"),
    embed!("report.json"),
    embed!("heldout.json"),
    embed!("adapters/prose/adapter_config.json"),
    embed!("adapters/prose/adapter_model.safetensors"),
    embed!("adapters/code/adapter_config.json"),
    embed!("adapters/code/adapter_model.safetensors"),
    embed!("adapters/attn/adapter_config.json"),
    embed!("adapters/attn/adapter_model.safetensors"),
];

/// The demo's tenants: each may use its own adapters and the base model.
pub const DEMO_TENANTS_TOML: &str = r#"# The demo's tenants (keys for trying things out, not secrets).
[[tenants]]
name = "writers"
api_key = "demo-writers-key-0001"
adapters = ["prose"]

[[tenants]]
name = "coders"
api_key = "demo-coders-key-0001"
adapters = ["code", "attn"]

[[tenants]]
name = "operator"
api_key = "demo-operator-key-0001"
adapters = ["*"]
admin = true
"#;

/// The demo tenants' (name, API key, adapters), as in [`DEMO_TENANTS_TOML`].
pub const DEMO_TENANTS: &[(&str, &str, &[&str])] = &[
    ("writers", "demo-writers-key-0001", &["prose"]),
    ("coders", "demo-coders-key-0001", &["code", "attn"]),
    ("operator", "demo-operator-key-0001", &["*"]),
];

/// A short fingerprint of the embedded files (FNV-1a over paths and bytes), so that a cached copy
/// of an older demo is never mistaken for this one.
pub fn trained_demo_fingerprint() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for f in TRAINED_FILES {
        eat(f.path.as_bytes());
        eat(f.bytes);
    }
    h
}

/// Writes the trained demo (the embedded files, a byte-level `tokenizer.json` and `tenants.toml`)
/// into `dir`.
pub fn write_trained_demo(dir: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| DemoError::Io { path, error }
    };
    let mut files: Vec<(&str, &[u8])> = TRAINED_FILES.iter().map(|f| (f.path, f.bytes)).collect();
    let tokenizer = byte_level_tokenizer_json();
    files.push(("tokenizer.json", tokenizer.as_bytes()));
    files.push(("tenants.toml", DEMO_TENANTS_TOML.as_bytes()));
    for (rel, bytes) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&path, bytes).map_err(io(&path))?;
    }
    Ok(())
}

/// The held-out text samples the training script kept out of training: (domain, texts).
pub fn heldout_samples() -> Result<Vec<(String, Vec<String>)>> {
    let bad = |m: String| DemoError::Shape(format!("embedded heldout.json: {m}"));
    let file = TRAINED_FILES.iter().find(|f| f.path == "heldout.json").ok_or_else(|| bad("missing".into()))?;
    let v: serde_json::Value = serde_json::from_slice(file.bytes).map_err(|e| bad(e.to_string()))?;
    let obj = v.as_object().ok_or_else(|| bad("not an object".into()))?;
    let mut out = Vec::new();
    for (domain, texts) in obj {
        let texts = texts.as_array().ok_or_else(|| bad(format!("{domain} is not a list")))?;
        out.push((domain.clone(), texts.iter().filter_map(|t| t.as_str().map(String::from)).collect()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trained_demo_is_complete_and_small() {
        let total: usize = TRAINED_FILES.iter().map(|f| f.bytes.len()).sum();
        assert!(total < 8 << 20, "the trained demo is {total} bytes (at most 8 MiB)");
        let tmp = std::env::temp_dir().join(format!("moe-trained-demo-test-{}", std::process::id()));
        write_trained_demo(&tmp).expect("write");
        for f in ["config.json", "tokenizer.json", "tenants.toml", "adapters/prose/adapter_config.json"] {
            assert!(tmp.join(f).is_file(), "{f}");
        }
        for (name, key, adapters) in DEMO_TENANTS {
            let entry = format!("name = \"{name}\"\napi_key = \"{key}\"\nadapters = {adapters:?}\n");
            assert!(DEMO_TENANTS_TOML.contains(&entry), "the tenants file and DEMO_TENANTS disagree on {name}");
        }
        let held = heldout_samples().expect("heldout");
        assert!(held.iter().any(|(d, t)| d == "prose" && !t.is_empty()));
        assert!(held.iter().any(|(d, t)| d == "code" && !t.is_empty()));
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
