//! Structured output in the OpenAI API: `response_format` (`json_object`, `json_schema`), vLLM's
//! `guided_json` / `guided_regex` / `guided_grammar`, and tool calls forced by `tool_choice`
//! (`"required"` or a named function), whose output is a `{"name", "arguments"}` object matching
//! one tool's parameters schema and comes back as `message.tool_calls`. At most one of them per
//! request; each becomes the engine's [`ConstraintSpec`].

use moe_constrain::ConstraintSpec;
use moe_router::RouterError;
use serde_json::{json, Value};

/// The request fields that constrain the output.
#[derive(serde::Deserialize, Default)]
pub struct StructuredFields {
    pub response_format: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_grammar: Option<String>,
    /// Chat only: the functions the model may call, and whether it must.
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
}

/// What the output will be: free, constrained text, or a forced tool call.
pub struct Structured {
    pub constraint: Option<ConstraintSpec>,
    /// The output is a tool call (return it in `message.tool_calls`).
    pub tool_call: bool,
}

fn invalid(field: &'static str, message: impl Into<String>) -> RouterError {
    RouterError::invalid(field, message)
}

impl StructuredFields {
    /// The constraint these fields ask for (400 naming the field when they are malformed or
    /// more than one asks for a constraint).
    pub fn resolve(&self) -> Result<Structured, RouterError> {
        let mut found: Vec<(&'static str, ConstraintSpec)> = Vec::new();
        if let Some(rf) = &self.response_format {
            match rf.get("type").and_then(Value::as_str) {
                Some("text") => {}
                Some("json_object") => found.push(("response_format", ConstraintSpec::JsonObject)),
                Some("json_schema") => {
                    let schema = rf
                        .pointer("/json_schema/schema")
                        .ok_or_else(|| invalid("response_format.json_schema.schema", "is required"))?;
                    found.push(("response_format", ConstraintSpec::JsonSchema(schema.to_string())));
                }
                other => {
                    return Err(invalid(
                        "response_format.type",
                        format!("must be text, json_object or json_schema, got {other:?}"),
                    ))
                }
            }
        }
        if let Some(schema) = &self.guided_json {
            let text = match schema {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            found.push(("guided_json", ConstraintSpec::JsonSchema(text)));
        }
        if let Some(rx) = &self.guided_regex {
            found.push(("guided_regex", ConstraintSpec::Regex(rx.clone())));
        }
        if let Some(g) = &self.guided_grammar {
            found.push(("guided_grammar", ConstraintSpec::Lark(g.clone())));
        }
        let tool_call = match self.forced_tool_schema()? {
            Some(schema) => {
                found.push(("tool_choice", ConstraintSpec::JsonSchema(schema.to_string())));
                true
            }
            None => false,
        };
        if found.len() > 1 {
            let names: Vec<&str> = found.iter().map(|f| f.0).collect();
            return Err(invalid("response_format", format!("give one output constraint, not {}", names.join(" and "))));
        }
        Ok(Structured { constraint: found.pop().map(|f| f.1), tool_call })
    }

    /// With `tool_choice` `"required"` or a named function: the schema of a call to one of the
    /// allowed tools. `"auto"`, `"none"` or no choice: none (the model answers in text).
    fn forced_tool_schema(&self) -> Result<Option<Value>, RouterError> {
        let tools = self.tools.as_deref().unwrap_or_default();
        let wanted: Option<String> = match &self.tool_choice {
            None => return Ok(None),
            Some(Value::String(s)) if s == "auto" || s == "none" => return Ok(None),
            Some(Value::String(s)) if s == "required" => None,
            Some(v @ Value::Object(_)) => Some(
                v.pointer("/function/name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid("tool_choice.function.name", "is required"))?
                    .to_string(),
            ),
            Some(other) => {
                return Err(invalid(
                    "tool_choice",
                    format!("must be \"none\", \"auto\", \"required\" or a named function, got {other}"),
                ))
            }
        };
        let mut calls = Vec::new();
        for (i, t) in tools.iter().enumerate() {
            let name = t
                .pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("tools", format!("tool {i} has no function.name")))?;
            if wanted.as_deref().is_some_and(|w| w != name) {
                continue;
            }
            let params = t.pointer("/function/parameters").cloned().unwrap_or_else(|| json!({"type": "object"}));
            calls.push(json!({
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": false
            }));
        }
        match (calls.len(), wanted) {
            (0, Some(w)) => Err(invalid("tool_choice", format!("names function {w:?}, which is not in tools"))),
            (0, None) => Err(invalid("tools", "tool_choice \"required\" needs at least one tool")),
            (1, _) => Ok(calls.pop()),
            _ => Ok(Some(json!({"anyOf": calls}))),
        }
    }
}

/// The `message` of a completed forced tool call: `tool_calls` with the call's name and its
/// arguments as a JSON string (OpenAI's shape), or the text as content when it is not a call
/// (the generation ended early, `finish_reason` `length`).
pub fn tool_call_message(text: &str, id: &str) -> Value {
    let parsed: Option<Value> = serde_json::from_str(text).ok();
    match parsed.as_ref().and_then(|v| Some((v.get("name")?.as_str()?, v.get("arguments")?))) {
        Some((name, args)) => json!({
            "role": "assistant",
            "content": null,
            "tool_calls": [{"id": format!("call_{id}"), "type": "function",
                            "function": {"name": name, "arguments": args.to_string()}}]
        }),
        None => json!({"role": "assistant", "content": text}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: Value) -> StructuredFields {
        serde_json::from_value(v).expect("fields")
    }

    #[test]
    fn formats_map_to_constraints_and_conflicts_are_refused() {
        let s = fields(json!({"response_format": {"type": "json_object"}})).resolve().expect("ok");
        assert_eq!(s.constraint, Some(ConstraintSpec::JsonObject));
        let s = fields(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}}}))
            .resolve()
            .expect("ok");
        assert_eq!(s.constraint, Some(ConstraintSpec::JsonSchema("{\"type\":\"integer\"}".into())));
        let e = fields(json!({"response_format": {"type": "yaml"}})).resolve().err().expect("refused");
        assert!(e.to_string().contains("response_format.type"), "{e}");
        let e = fields(json!({"guided_regex": "a+", "guided_grammar": "start: \"a\""})).resolve().err().expect("two");
        assert!(e.to_string().contains("guided_regex and guided_grammar"), "{e}");
    }

    #[test]
    fn a_forced_tool_call_is_a_schema_over_the_allowed_tools() {
        let tools = json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "get_time"}}
        ]);
        let s = fields(json!({"tools": tools, "tool_choice": "required"})).resolve().expect("ok");
        assert!(s.tool_call);
        let Some(ConstraintSpec::JsonSchema(schema)) = s.constraint else { panic!("no schema") };
        assert!(schema.contains("anyOf") && schema.contains("get_time"), "{schema}");
        let s =
            fields(json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}))
                .resolve()
                .expect("ok");
        let Some(ConstraintSpec::JsonSchema(schema)) = s.constraint else { panic!("no schema") };
        assert!(!schema.contains("get_time"), "{schema}");
        let s = fields(json!({"tools": tools, "tool_choice": "auto"})).resolve().expect("ok");
        assert!(s.constraint.is_none() && !s.tool_call);
        let e = fields(json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}))
            .resolve()
            .err()
            .expect("unknown");
        assert!(e.to_string().contains("\"nope\""), "{e}");
        let m = tool_call_message(r#"{"name": "get_weather", "arguments": {"city": "Oslo"}}"#, "7");
        assert_eq!(m["tool_calls"][0]["function"]["name"], "get_weather");
        assert_eq!(m["tool_calls"][0]["function"]["arguments"], r#"{"city":"Oslo"}"#);
    }
}
