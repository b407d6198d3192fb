//! Tests of config.json parsing (a module of `config`, in its own file for size).
use super::*;

fn base() -> Value {
    serde_json::json!({
        "architectures": ["MixtralForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 96,
        "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 100,
        "max_position_embeddings": 128, "rope_theta": 1e6, "head_dim": null, "eos_token_id": [2, 7]
    })
}

fn parse(v: &Value) -> Result<ModelConfig> {
    ModelConfig::parse(&v.to_string(), Path::new("config.json"))
}

#[test]
fn rope_forms_and_null_head_dim() {
    let mut v = base();
    let c = parse(&v).unwrap();
    assert_eq!((c.head_dim, c.rope_theta, c.eos_token_ids.clone()), (16, 1e6, vec![2, 7]));
    v.as_object_mut().unwrap().remove("rope_theta");
    v["rope_parameters"] = serde_json::json!({"rope_theta": 5e5, "rope_type": "default"});
    v["eos_token_id"] = serde_json::json!(3);
    let c = parse(&v).unwrap();
    assert_eq!((c.rope_theta, c.eos_token_ids), (5e5, vec![3]));
}

#[test]
fn unknown_architecture_lists_supported() {
    let mut v = base();
    v["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    let e = parse(&v).unwrap_err().to_string();
    assert!(
        e.contains("LlamaForCausalLM") && e.contains("OlmoeForCausalLM") && e.contains("Qwen3MoeForCausalLM"),
        "{e}"
    );
}

#[test]
fn bad_values_are_named() {
    let mut v = base();
    v["hidden_size"] = serde_json::json!("big");
    assert!(parse(&v).unwrap_err().to_string().contains("hidden_size"));
    let mut v = base();
    v["num_experts_per_tok"] = serde_json::json!(9);
    assert!(parse(&v).unwrap_err().to_string().contains("num_experts_per_tok"));
    let e = ModelConfig::parse("{not json", Path::new("x/config.json")).unwrap_err().to_string();
    assert!(e.contains("x/config.json") && e.contains("JSON"), "{e}");
}
