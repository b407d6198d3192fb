//! Chat prompts: the model's own chat template from `tokenizer_config.json` (a Jinja template, or
//! a list of named templates where `default` is used) rendered with `minijinja`, with the
//! variables Hugging Face templates expect (`messages`, `bos_token`, `eos_token`,
//! `add_generation_prompt`, `raise_exception`). Models without a template get a plain
//! `role: content` transcript ending in `assistant:`.

use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: String,
}

/// A model's chat template and its special tokens.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

const FALLBACK: &str = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}\
{% if add_generation_prompt %}assistant:{% endif %}";

impl ChatTemplate {
    /// The template of the model in `dir` (its `tokenizer_config.json`), or the fallback.
    pub fn from_model_dir(dir: &Path) -> Result<Self, String> {
        let path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?,
            Err(_) => Value::Null,
        };
        let template = match cfg.get("chat_template") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .unwrap_or(FALLBACK)
                .to_string(),
            _ => FALLBACK.to_string(),
        };
        Self::new(&template, token_text(cfg.get("bos_token")), token_text(cfg.get("eos_token")))
    }

    pub fn new(template: &str, bos: String, eos: String) -> Result<Self, String> {
        let mut env = Environment::new();
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", template.to_string()).map_err(|e| format!("chat template: {e}"))?;
        Ok(Self { env, bos, eos })
    }

    /// The prompt text for `messages`, ready for the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, String> {
        if messages.is_empty() {
            return Err("messages must not be empty".into());
        }
        let t = self.env.get_template("chat").map_err(|e| e.to_string())?;
        t.render(minijinja::context! {
            messages => messages,
            bos_token => self.bos,
            eos_token => self.eos,
            add_generation_prompt => true,
        })
        .map_err(|e| format!("the chat template refused these messages: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> Vec<ChatMessage> {
        vec![
            ChatMessage { role: "system".into(), content: "Be brief.".into() },
            ChatMessage { role: "user".into(), content: "Hi".into() },
        ]
    }

    #[test]
    fn fallback_transcript() {
        let t = ChatTemplate::new(FALLBACK, String::new(), String::new()).unwrap();
        assert_eq!(t.render(&msgs()).unwrap(), "system: Be brief.\nuser: Hi\nassistant:");
    }

    #[test]
    fn hugging_face_style_template_with_special_tokens_and_exceptions() {
        let tpl = "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}\
                   <|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
        let t = ChatTemplate::new(tpl, "<s>".into(), "</s>".into()).unwrap();
        assert_eq!(t.render(&msgs()).unwrap(), "<s><|system|>Be brief.</s><|user|>Hi</s><|assistant|>");
        let tool = vec![ChatMessage { role: "tool".into(), content: String::new() }];
        assert!(t.render(&tool).unwrap_err().contains("no tools"));
        assert!(t.render(&[]).is_err());
    }
}
