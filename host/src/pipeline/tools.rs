//! Tool calling on any model, the way llama.cpp's generic handler does it: the tools are
//! described in a system prompt, and the reply is constrained by grammar to JSON that is
//! either `{"tool_calls": [{"name", "arguments"}, …]}` or, when the model may choose
//! (`auto`), `{"response": "…"}`. `required` and a named tool leave only calls, so the
//! model cannot answer in prose; `none` leaves the tools out of the prompt and the grammar.
//! The reply is then read back into OpenAI's `tool_calls`.

use serde_json::{Value, json};

use crate::engine::grammar::Constraint;
use crate::engine::template::TemplateMessage;
use crate::store::TurnMessage;

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
    /// Answer: the tools are offered and not callable (left out of the prompt and grammar).
    None,
    /// Call at least one tool.
    Required,
    /// Call this one.
    Named(String),
}

/// The tools of a request.
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

impl ToolCall {
    /// OpenAI's `tool_calls[]` entry.
    pub fn to_openai(&self) -> Value {
        json!({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// A reply read back.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Text(String),
    Calls(Vec<ToolCall>),
}

/// The ids of one reply's calls, `call_<random><n>`: the same wherever that reply is read
/// back (the client's response, the session's stored turn).
#[derive(Debug, Clone, PartialEq)]
pub struct CallIds(String);

impl CallIds {
    pub fn new() -> CallIds {
        CallIds(uuid::Uuid::new_v4().simple().to_string()[..20].to_string())
    }

    fn id(&self, n: usize) -> String {
        format!("call_{}{n}", self.0)
    }
}

impl Default for CallIds {
    fn default() -> Self {
        CallIds::new()
    }
}

/// A finished reply with tools as the client gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The text (an answer, or a reply cut short as it came); `None` for calls.
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
}

impl Answer {
    /// `tool_calls` for calls, else the generation's `reason`.
    pub fn finish_reason<'a>(&self, reason: &'a str) -> &'a str {
        match self.calls.is_empty() {
            true => reason,
            false => "tool_calls",
        }
    }
}

/// Reads a finished reply: calls become `tool_calls`, an answer its text; a reply that did
/// not end on its own (`complete` false: cut by `max_tokens`, a plugin or a hang-up) stays
/// as it came.
pub fn answer(text: &str, complete: bool, ids: &CallIds) -> Answer {
    match read_reply(text, ids).filter(|_| complete) {
        Some(Reply::Calls(calls)) => Answer { content: None, calls },
        Some(Reply::Text(answer)) => Answer { content: Some(answer), calls: Vec::new() },
        None => Answer { content: Some(text.to_string()), calls: Vec::new() },
    }
}

impl Tools {
    /// Whether the model may call any (`tool_choice` is not `none`).
    pub fn callable(&self) -> bool {
        self.choice != Choice::None
    }

    /// The functions the grammar admits.
    fn admitted(&self) -> impl Iterator<Item = &Function> {
        self.functions.iter().filter(move |f| match &self.choice {
            Choice::Named(name) => &f.name == name,
            Choice::None => false,
            _ => true,
        })
    }

    /// The system prompt that describes the tools and the reply's shape.
    pub fn prompt(&self) -> String {
        let listing: Vec<Value> =
            self.admitted().map(|f| json!({"name": f.name, "description": f.description, "parameters": f.parameters})).collect();
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
            .admitted()
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
            Choice::Required | Choice::Named(_) | Choice::None => calls,
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

/// A conversation in OpenAI's roles as templates know it (user and assistant turns):
/// earlier calls become the JSON the model replies with, results a user turn
/// (consecutive results one turn).
pub fn template_messages(messages: &[TurnMessage]) -> Vec<TemplateMessage> {
    let mut out: Vec<TemplateMessage> = Vec::with_capacity(messages.len());
    for m in messages {
        let (role, content) = match (m.role.as_str(), &m.tool_calls) {
            ("tool", _) => {
                let result = result_as_text(m.tool_call_id.as_deref().unwrap_or_default(), &m.content);
                if let Some(last) = out.last_mut().filter(|l| l.role == "user" && l.content.starts_with(RESULT_PREFIX)) {
                    last.content.push_str("\n\n");
                    last.content.push_str(&result);
                    continue;
                }
                ("user", result)
            }
            ("assistant", Some(Value::Array(calls))) if !calls.is_empty() => ("assistant", calls_as_text(calls)),
            (role, _) => (role, m.content.clone()),
        };
        out.push(TemplateMessage { role: role.to_string(), content });
    }
    out
}

/// How an assistant's earlier calls (OpenAI's `tool_calls`) appear in a prompt: as the
/// JSON the model replies with.
fn calls_as_text(calls: &[Value]) -> String {
    let calls: Vec<Value> = calls
        .iter()
        .map(|call| {
            let arguments = call["function"]["arguments"].as_str().unwrap_or_default();
            let arguments = serde_json::from_str::<Value>(arguments).unwrap_or_else(|_| Value::String(arguments.to_string()));
            json!({"name": call["function"]["name"], "arguments": arguments})
        })
        .collect();
    json!({"tool_calls": calls}).to_string()
}

/// How a tool's result begins in a prompt.
const RESULT_PREFIX: &str = "Result of tool call ";

/// How a tool's result appears in a prompt (as a user turn: few templates know a tool role).
fn result_as_text(call_id: &str, content: &str) -> String {
    format!("{RESULT_PREFIX}{call_id}:\n{content}")
}

/// Reads a complete reply back; `None` if it is not the grammar's JSON (cut by
/// `max_tokens`, say).
pub fn read_reply(text: &str, ids: &CallIds) -> Option<Reply> {
    let value: Value = serde_json::from_str(text).ok()?;
    if let Some(response) = value.get("response").and_then(Value::as_str) {
        return Some(Reply::Text(response.to_string()));
    }
    let calls = value.get("tool_calls")?.as_array()?;
    let calls = calls
        .iter()
        .enumerate()
        .map(|(n, call)| {
            Some(ToolCall { id: ids.id(n), name: call.get("name")?.as_str()?.to_string(), arguments: call.get("arguments")?.to_string() })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Reply::Calls(calls))
}

/// A piece of a reply with tools, known before the reply ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// A call began: its index, id and name.
    Head { index: usize, id: String, name: String },
    /// More of a call's arguments (JSON text).
    Arguments { index: usize, text: String },
}

/// Reads a reply with tools as it grows, so calls stream as OpenAI streams them: each
/// call's id and name once known, then its arguments piece by piece. It follows the
/// layout the grammar emits (`{"tool_calls": [{"name": "…", "arguments": {…}}, …]}`);
/// anything else (an answer, a reply cut short) yields no pieces, and the end is read
/// whole by [`answer`], with the same ids.
pub struct CallStream {
    ids: CallIds,
    text: String,
    /// Bytes of `text` read.
    pos: usize,
    state: Scan,
    /// Calls whose head went out.
    heads: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Scan {
    Start,
    Head,
    /// Inside a call's arguments: nesting depth, within a string (after a backslash), and
    /// within a bare scalar (`12`, `true`) at the top.
    Arguments {
        depth: usize,
        in_string: bool,
        escaped: bool,
        scalar: bool,
    },
    AfterCall,
    /// Not (or no longer) calls in the grammar's layout, or the list ended.
    Done,
}

const CALLS_OPEN: &str = r#"{"tool_calls": ["#;
const NAME_OPEN: &str = r#"{"name": ""#;
const ARGUMENTS_OPEN: &str = r#"", "arguments": "#;

impl CallStream {
    pub fn new(ids: CallIds) -> CallStream {
        CallStream { ids, text: String::new(), pos: 0, state: Scan::Start, heads: 0 }
    }

    /// Calls whose head went out.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// More of the reply in; the pieces it completes out.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.text.push_str(text);
        let mut pieces = Vec::new();
        loop {
            let rest = &self.text[self.pos..];
            match self.state {
                Scan::Done => break,
                Scan::Start => match expect(rest, CALLS_OPEN) {
                    Some(n) => self.advance(n, Scan::Head),
                    None if CALLS_OPEN.starts_with(rest.trim_start()) => break,
                    None => self.state = Scan::Done,
                },
                Scan::Head => {
                    let Some(start) = expect(rest, NAME_OPEN) else {
                        if !NAME_OPEN.starts_with(rest.trim_start()) {
                            self.state = Scan::Done;
                        }
                        break;
                    };
                    // A tool name has no quotes or escapes: it ends at the next quote.
                    let Some(len) = rest[start..].find('"') else { break };
                    let after = &rest[start + len..];
                    if !after.starts_with(ARGUMENTS_OPEN) {
                        if !ARGUMENTS_OPEN.starts_with(after) {
                            self.state = Scan::Done;
                        }
                        break;
                    }
                    let name = rest[start..start + len].to_string();
                    pieces.push(Piece::Head { index: self.heads, id: self.ids.id(self.heads), name });
                    self.heads += 1;
                    self.advance(
                        start + len + ARGUMENTS_OPEN.len(),
                        Scan::Arguments { depth: 0, in_string: false, escaped: false, scalar: false },
                    );
                }
                Scan::Arguments { mut depth, mut in_string, mut escaped, mut scalar } => {
                    let mut end = None;
                    for (i, c) in rest.char_indices() {
                        match (in_string, escaped, c) {
                            (true, true, _) => escaped = false,
                            (true, false, '\\') => escaped = true,
                            (true, false, '"') => in_string = false,
                            (true, false, _) => {}
                            // A bare scalar ends before the delimiter that follows it.
                            (false, _, ',' | '}' | ']') if scalar && depth == 0 => {
                                end = Some(i);
                                break;
                            }
                            (false, _, c) if scalar && depth == 0 && c.is_whitespace() => {
                                end = Some(i);
                                break;
                            }
                            (false, _, '"') => in_string = true,
                            (false, _, '{' | '[') => depth += 1,
                            (false, _, '}' | ']') => depth = depth.saturating_sub(1),
                            (false, _, c) if depth == 0 && !c.is_whitespace() => scalar = true,
                            (false, _, _) => {}
                        }
                        if depth == 0 && !in_string && !scalar && !c.is_whitespace() {
                            end = Some(i + c.len_utf8());
                            break;
                        }
                    }
                    let taken = end.unwrap_or(rest.len());
                    if taken > 0 {
                        pieces.push(Piece::Arguments { index: self.heads - 1, text: rest[..taken].to_string() });
                    }
                    match end {
                        Some(n) => self.advance(n, Scan::AfterCall),
                        None => {
                            self.advance(taken, Scan::Arguments { depth, in_string, escaped, scalar });
                            break;
                        }
                    }
                }
                Scan::AfterCall => match rest.trim_start().as_bytes() {
                    [] | [b'}'] | [b'}', b','] => break,
                    [b'}', b',', ..] => {
                        let n = rest.len() - rest.trim_start().len() + 2;
                        self.advance(n, Scan::Head);
                    }
                    [b'}', b']', ..] => self.state = Scan::Done,
                    _ => self.state = Scan::Done,
                },
            }
        }
        pieces
    }

    fn advance(&mut self, n: usize, state: Scan) {
        self.pos += n;
        self.state = state;
    }
}

/// The length of `rest` up to and including `prefix` (after leading whitespace), if it
/// starts with it.
fn expect(rest: &str, prefix: &str) -> Option<usize> {
    let trimmed = rest.trim_start();
    trimmed.starts_with(prefix).then(|| rest.len() - trimmed.len() + prefix.len())
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
        let ids = CallIds::new();
        let text = r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]}"#;
        let reply = read_reply(text, &ids).unwrap();
        let Reply::Calls(calls) = reply.clone() else { panic!("{reply:?}") };
        assert_eq!((calls[0].name.as_str(), calls[0].arguments.as_str()), ("get_weather", r#"{"city":"Paris"}"#));
        assert!(calls[0].id.starts_with("call_") && calls[0].id != calls[1].id);
        assert_eq!(read_reply(text, &ids), Some(reply), "one reply read twice has the same ids");
        assert_ne!(read_reply(text, &CallIds::new()).unwrap(), read_reply(text, &ids).unwrap(), "another reply's ids differ");
        assert_eq!(read_reply(r#"{"response": "Hi."}"#, &ids), Some(Reply::Text("Hi.".into())));
        assert_eq!(read_reply(r#"{"tool_calls": [{"name": "get_wea"#, &ids), None);
        let cut = answer(r#"{"tool_calls": [{"name": "get_wea"#, false, &ids);
        assert_eq!((cut.content.as_deref(), cut.finish_reason("length")), (Some(r#"{"tool_calls": [{"name": "get_wea"#), "length"));
        assert_eq!(answer(text, true, &ids).finish_reason("stop"), "tool_calls");
        assert_eq!(answer(text, false, &ids).finish_reason("cancelled"), "cancelled", "a call not completed is not a call");
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
    #[test]
    fn calls_stream_as_they_are_generated_with_the_ids_the_end_reads() {
        let ids = CallIds::new();
        let text = r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Pa\"ris}", "n": [1, {"a": 2}]}}, {"name": "get_time", "arguments": {}}]}"#;
        // Token by token, in pieces of 3 bytes.
        let mut stream = CallStream::new(ids.clone());
        let mut pieces = Vec::new();
        for chunk in text.as_bytes().chunks(3) {
            pieces.extend(stream.push(std::str::from_utf8(chunk).unwrap()));
        }
        let heads: Vec<&Piece> = pieces.iter().filter(|p| matches!(p, Piece::Head { .. })).collect();
        let Reply::Calls(calls) = read_reply(text, &ids).unwrap() else { panic!() };
        assert_eq!(heads.len(), 2);
        for (n, call) in calls.iter().enumerate() {
            assert_eq!(heads[n], &Piece::Head { index: n, id: call.id.clone(), name: call.name.clone() });
            let arguments: String = pieces
                .iter()
                .filter_map(|p| match p {
                    Piece::Arguments { index, text } if *index == n => Some(text.as_str()),
                    _ => None,
                })
                .collect();
            let streamed: Value = serde_json::from_str(&arguments).unwrap();
            assert_eq!(streamed, serde_json::from_str::<Value>(&call.arguments).unwrap());
        }
        assert!(pieces.iter().filter(|p| matches!(p, Piece::Arguments { index: 0, .. })).count() > 3, "arguments came in pieces");
    }

    #[test]
    fn bare_scalar_arguments_stream_whole() {
        let text = r#"{"tool_calls": [{"name": "count", "arguments": 123}, {"name": "flag", "arguments": true}]}"#;
        let mut stream = CallStream::new(CallIds::new());
        let pieces: Vec<Piece> = text.as_bytes().chunks(2).flat_map(|c| stream.push(std::str::from_utf8(c).unwrap())).collect();
        let arguments = |n: usize| -> String {
            pieces
                .iter()
                .filter_map(|p| match p {
                    Piece::Arguments { index, text } if *index == n => Some(text.as_str()),
                    _ => None,
                })
                .collect()
        };
        assert_eq!((stream.heads(), arguments(0), arguments(1)), (2, "123".to_string(), "true".to_string()));
    }

    #[test]
    fn an_answer_streams_no_calls() {
        let mut stream = CallStream::new(CallIds::new());
        assert!(stream.push(r#"{"response": "Hi"#).is_empty());
        assert!(stream.push(r#", there."}"#).is_empty());
        assert_eq!(stream.heads(), 0);
    }
}
