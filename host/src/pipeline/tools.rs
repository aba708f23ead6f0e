//! Tool calling on any model, the way llama.cpp's generic handler does it: the tools are
//! described in a system prompt, and the reply is constrained by grammar to JSON that is
//! either `{"tool_calls": [{"name", "arguments"}, …]}` or, when the model may choose
//! (`auto`), `{"response": "…"}`. `required` and a named tool leave only calls, so the
//! model cannot answer in prose; `none` leaves the tools out of the prompt and the grammar.
//! The reply is then read back into OpenAI's `tool_calls`.

use serde_json::{Value, json};

use crate::engine::grammar::Constraint;
use crate::engine::template::TemplateMessage;

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub name: String,
    pub description: Option<String>,
    /// JSON schema of the arguments (an object).
    pub parameters: Value,
}

/// What the model must do with the tools.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// Call tools or answer.
    Auto,
    /// Call at least one tool.
    Required,
    /// Call this one.
    Named(String),
}

/// The tools of a request whose `tool_choice` is not `none`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    pub functions: Vec<Function>,
    pub choice: Choice,
    /// More than one call per reply (`parallel_tool_calls`, default true).
    pub parallel: bool,
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as a JSON text (OpenAI's shape).
    pub arguments: String,
}

/// A reply read back.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Text(String),
    Calls(Vec<ToolCall>),
}

impl Tools {
    /// The functions the grammar admits.
    fn callable(&self) -> impl Iterator<Item = &Function> {
        self.functions.iter().filter(move |f| match &self.choice {
            Choice::Named(name) => &f.name == name,
            _ => true,
        })
    }

    /// The system prompt that describes the tools and the reply's shape.
    pub fn prompt(&self) -> String {
        let listing: Vec<Value> =
            self.callable().map(|f| json!({"name": f.name, "description": f.description, "parameters": f.parameters})).collect();
        let listing = serde_json::to_string_pretty(&listing).unwrap_or_default();
        let calls = if self.parallel { "one or more tools" } else { "a tool" };
        let mut prompt = format!(
            "You can call these tools:\n{listing}\n\nTo call {calls}, reply with JSON only: \
             {{\"tool_calls\": [{{\"name\": \"<tool name>\", \"arguments\": {{<arguments>}}}}]}}"
        );
        if self.choice == Choice::Auto {
            prompt.push_str("\nTo answer without a tool, reply with JSON only: {\"response\": \"<your answer>\"}");
        }
        prompt
    }

    /// The grammar every reply must follow.
    pub fn constraint(&self) -> Constraint {
        let call: Vec<Value> = self
            .callable()
            .map(|f| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let mut list = json!({"type": "array", "items": {"anyOf": call}, "minItems": 1});
        if !self.parallel {
            list["maxItems"] = json!(1);
        }
        let calls = json!({
            "type": "object",
            "properties": {"tool_calls": list},
            "required": ["tool_calls"],
            "additionalProperties": false,
        });
        Constraint::JsonSchema(match self.choice {
            Choice::Auto => json!({"anyOf": [calls, {
                "type": "object",
                "properties": {"response": {"type": "string"}},
                "required": ["response"],
                "additionalProperties": false,
            }]}),
            Choice::Required | Choice::Named(_) => calls,
        })
    }

    /// The conversation with the tool prompt in its system message (added first, or
    /// appended to the one there).
    pub fn with_prompt(&self, mut messages: Vec<TemplateMessage>) -> Vec<TemplateMessage> {
        match messages.first_mut() {
            Some(first) if first.role == "system" => {
                first.content.push_str("\n\n");
                first.content.push_str(&self.prompt());
            }
            _ => messages.insert(0, TemplateMessage { role: "system".into(), content: self.prompt() }),
        }
        messages
    }
}

/// How an assistant's earlier calls appear in a prompt: as the JSON the model replies with.
pub fn calls_as_text(calls: &[(String, String)]) -> String {
    let calls: Vec<Value> = calls
        .iter()
        .map(|(name, arguments)| {
            let arguments = serde_json::from_str::<Value>(arguments).unwrap_or_else(|_| Value::String(arguments.clone()));
            json!({"name": name, "arguments": arguments})
        })
        .collect();
    json!({"tool_calls": calls}).to_string()
}

/// How a tool's result begins in a prompt.
pub const RESULT_PREFIX: &str = "Result of tool call ";

/// How a tool's result appears in a prompt (as a user turn: few templates know a tool role).
pub fn result_as_text(call_id: &str, content: &str) -> String {
    format!("{RESULT_PREFIX}{call_id}:\n{content}")
}

/// Reads a complete reply back; `None` if it is not the grammar's JSON (cut by
/// `max_tokens`, say).
pub fn read_reply(text: &str) -> Option<Reply> {
    let value: Value = serde_json::from_str(text).ok()?;
    if let Some(response) = value.get("response").and_then(Value::as_str) {
        return Some(Reply::Text(response.to_string()));
    }
    let calls = value.get("tool_calls")?.as_array()?;
    let calls = calls
        .iter()
        .map(|call| {
            Some(ToolCall {
                id: format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24]),
                name: call.get("name")?.as_str()?.to_string(),
                arguments: call.get("arguments")?.to_string(),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Reply::Calls(calls))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Function {
        Function {
            name: "get_weather".into(),
            description: Some("The weather in a city".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        }
    }

    fn tools(choice: Choice, parallel: bool) -> Tools {
        let time = Function { name: "get_time".into(), description: None, parameters: json!({"type": "object"}) };
        Tools { functions: vec![weather(), time], choice, parallel }
    }

    #[test]
    fn a_named_choice_admits_only_that_tool() {
        let Constraint::JsonSchema(schema) = tools(Choice::Named("get_time".into()), true).constraint() else { panic!() };
        let items = &schema["properties"]["tool_calls"]["items"]["anyOf"];
        assert_eq!(items.as_array().unwrap().len(), 1);
        assert_eq!(items[0]["properties"]["name"]["const"], "get_time");
        assert!(!tools(Choice::Named("get_time".into()), true).prompt().contains("get_weather"));
    }

    #[test]
    fn only_auto_admits_an_answer_and_parallel_false_admits_one_call() {
        let Constraint::JsonSchema(auto) = tools(Choice::Auto, false).constraint() else { panic!() };
        assert_eq!(auto["anyOf"][1]["required"], json!(["response"]));
        assert_eq!(auto["anyOf"][0]["properties"]["tool_calls"]["maxItems"], 1);
        let Constraint::JsonSchema(required) = tools(Choice::Required, true).constraint() else { panic!() };
        assert!(required.get("anyOf").is_none() && required["properties"]["tool_calls"].get("maxItems").is_none());
    }

    #[test]
    fn replies_read_back_into_calls_or_text() {
        let reply = read_reply(r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}"#).unwrap();
        let Reply::Calls(calls) = reply else { panic!("{reply:?}") };
        assert_eq!((calls[0].name.as_str(), calls[0].arguments.as_str()), ("get_weather", r#"{"city":"Paris"}"#));
        assert!(calls[0].id.starts_with("call_"));
        assert_eq!(read_reply(r#"{"response": "Hi."}"#), Some(Reply::Text("Hi.".into())));
        assert_eq!(read_reply(r#"{"tool_calls": [{"name": "get_wea"#), None);
    }

    #[test]
    fn the_prompt_goes_into_the_system_message() {
        let t = tools(Choice::Auto, true);
        let user = TemplateMessage { role: "user".into(), content: "hi".into() };
        let added = t.with_prompt(vec![user.clone()]);
        assert_eq!((added.len(), added[0].role.as_str()), (2, "system"));
        let system = TemplateMessage { role: "system".into(), content: "Be brief.".into() };
        let merged = t.with_prompt(vec![system, user]);
        assert_eq!(merged.len(), 2);
        assert!(merged[0].content.starts_with("Be brief.\n\nYou can call these tools:"));
    }
}
