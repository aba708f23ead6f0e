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
    /// The text (an answer, or a reply in no layout the grammar makes, as it came); `None`
    /// for calls.
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
    /// Whether the reply ended on its own.
    complete: bool,
}

impl Answer {
    /// A reply without tools: its text.
    pub fn text(text: String) -> Answer {
        Answer { content: Some(text), calls: Vec::new(), complete: true }
    }

    /// `tool_calls` for complete calls, else the generation's `reason` (a call cut by
    /// `max_tokens` ends with `length`, its arguments as far as they came, as OpenAI's do).
    pub fn finish_reason<'a>(&self, reason: &'a str) -> &'a str {
        match self.calls.is_empty() || !self.complete {
            true => reason,
            false => "tool_calls",
        }
    }
}

/// Reads a finished reply: calls become `tool_calls`, an answer its text. A reply that did
/// not end on its own (`complete` false: cut by `max_tokens`, a plugin or a hang-up) is
/// read as [`CallStream`] read it while it grew: the answer's text so far, or the calls
/// begun with their arguments so far; never the grammar's JSON wrapper as text. Text in no
/// layout of the grammar's (a plugin rewrote it) stays as it came.
pub fn answer(text: &str, complete: bool, ids: &CallIds) -> Answer {
    match read_reply(text, ids).filter(|_| complete) {
        Some(Reply::Calls(calls)) => return Answer { content: None, calls, complete },
        Some(Reply::Text(answer)) => return Answer { content: Some(answer), calls: Vec::new(), complete },
        None => {}
    }
    let mut stream = CallStream::new(ids.clone());
    let pieces = stream.push(text);
    if stream.strayed {
        return Answer { content: Some(text.to_string()), calls: Vec::new(), complete };
    }
    let mut calls: Vec<ToolCall> = Vec::new();
    let mut content = String::new();
    for piece in pieces {
        match piece {
            Piece::Head { id, name, .. } => calls.push(ToolCall { id, name, arguments: String::new() }),
            Piece::Arguments { index, text } => calls[index].arguments.push_str(&text),
            Piece::Text(text) => content.push_str(&text),
        }
    }
    Answer { content: calls.is_empty().then_some(content), calls, complete }
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

    /// The system prompt that describes the tools and the reply's shape; `answer` is the
    /// JSON schema of an answer (a `response_format` beside the tools), else it is text.
    pub fn prompt(&self, answer: Option<&Value>) -> String {
        let listing: Vec<Value> =
            self.admitted().map(|f| json!({"name": f.name, "description": f.description, "parameters": f.parameters})).collect();
        let listing = serde_json::to_string_pretty(&listing).unwrap_or_default();
        let calls = if self.parallel { "one or more tools" } else { "a tool" };
        let mut prompt = format!(
            "You can call these tools:\n{listing}\n\nTo call {calls}, reply with JSON only: \
             {{\"tool_calls\": [{{\"name\": \"<tool name>\", \"arguments\": {{<arguments>}}}}]}}"
        );
        match (&self.choice, answer) {
            (Choice::Auto, None) => prompt.push_str("\nTo answer without a tool, reply with JSON only: {\"response\": \"<your answer>\"}"),
            (Choice::Auto, Some(schema)) => prompt.push_str(&format!(
                "\nTo answer without a tool, reply with JSON only: {{\"response\": <your answer as JSON of this schema: {schema}>}}"
            )),
            _ => {}
        }
        prompt
    }

    /// The grammar every reply must follow (`answer` as for [`Tools::prompt`]).
    pub fn constraint(&self, answer: Option<&Value>) -> Constraint {
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
                "properties": {"response": answer.cloned().unwrap_or(json!({"type": "string"}))},
                "required": ["response"],
                "additionalProperties": false,
            }]}),
            Choice::Required | Choice::Named(_) | Choice::None => calls,
        })
    }

    /// The conversation with the tool prompt in its system message (added first, or
    /// appended to the one there).
    pub fn with_prompt(&self, mut messages: Vec<TemplateMessage>, answer: Option<&Value>) -> Vec<TemplateMessage> {
        match messages.first_mut() {
            Some(first) if first.role == "system" => {
                first.content.push_str("\n\n");
                first.content.push_str(&self.prompt(answer));
            }
            _ => messages.insert(0, TemplateMessage { role: "system".into(), content: self.prompt(answer) }),
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
    match value.get("response") {
        Some(Value::String(response)) => return Some(Reply::Text(response.clone())),
        // An answer in JSON: its text as the model wrote it (as it streamed).
        Some(_) => {
            let mut stream = CallStream::new(ids.clone());
            let pieces = stream.push(text);
            return (!stream.strayed).then(|| Reply::Text(pieces.into_iter().filter_map(Piece::into_text).collect()));
        }
        None => {}
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
    /// More of an answer's text (decoded from the JSON string it is written as, or JSON
    /// when the answer has a `response_format`).
    Text(String),
}

impl Piece {
    fn into_text(self) -> Option<String> {
        match self {
            Piece::Text(text) => Some(text),
            _ => None,
        }
    }
}

/// Reads a reply with tools as it grows, so it streams as OpenAI streams one: each call's
/// id and name once known, then its arguments piece by piece; an answer's text as it
/// comes. It follows the layouts the grammar emits
/// (`{"tool_calls": [{"name": "…", "arguments": {…}}, …]}`, `{"response": "…"}`); anything
/// else yields no pieces, and the end is read whole by [`answer`], with the same ids.
pub struct CallStream {
    ids: CallIds,
    text: String,
    /// Bytes of `text` read.
    pos: usize,
    state: Scan,
    /// Calls whose head went out.
    heads: usize,
    /// Whether any piece went out.
    any: bool,
    /// The text left the grammar's layouts.
    strayed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Scan {
    Start,
    Head,
    /// Inside a JSON value (a call's arguments, or an answer in JSON): nesting depth, within
    /// a string (after a backslash), and within a bare scalar (`12`, `true`) at the top.
    Value {
        answer: bool,
        depth: usize,
        in_string: bool,
        escaped: bool,
        scalar: bool,
    },
    AfterCall,
    /// Inside an answer's JSON string.
    Text,
    /// Not (or no longer) in the grammar's layout, or the list or answer ended.
    Done,
}

const CALLS_OPEN: &str = r#"{"tool_calls": ["#;
const ANSWER_OPEN: &str = r#"{"response": ""#;
const VALUE_OPEN: &str = r#"{"response": "#;
const NAME_OPEN: &str = r#"{"name": ""#;
const ARGUMENTS_OPEN: &str = r#"", "arguments": "#;

impl CallStream {
    pub fn new(ids: CallIds) -> CallStream {
        CallStream { ids, text: String::new(), pos: 0, state: Scan::Start, heads: 0, any: false, strayed: false }
    }

    /// Calls whose head went out.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Whether any piece went out (else the end goes out whole).
    pub fn streamed(&self) -> bool {
        self.any
    }

    /// More of the reply in; the pieces it completes out.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        let pieces = self.scan(text);
        self.any |= !pieces.is_empty();
        pieces
    }

    fn stray(&mut self) {
        (self.state, self.strayed) = (Scan::Done, true);
    }

    fn scan(&mut self, text: &str) -> Vec<Piece> {
        self.text.push_str(text);
        let mut pieces = Vec::new();
        loop {
            let rest = &self.text[self.pos..];
            match self.state {
                Scan::Done => break,
                Scan::Start => match (expect(rest, CALLS_OPEN), expect(rest, ANSWER_OPEN), expect(rest, VALUE_OPEN)) {
                    (Some(n), _, _) => self.advance(n, Scan::Head),
                    (_, Some(n), _) => self.advance(n, Scan::Text),
                    // An answer in JSON (a `response_format` beside the tools): its text as it came.
                    (_, _, Some(n)) if !rest[n..].trim_start().is_empty() => {
                        let n = rest.len() - rest[n..].trim_start().len();
                        self.advance(n, Scan::Value { answer: true, depth: 0, in_string: false, escaped: false, scalar: false })
                    }
                    _ if [CALLS_OPEN, ANSWER_OPEN].iter().any(|open| open.starts_with(rest.trim_start()))
                        || expect(rest, VALUE_OPEN).is_some() =>
                    {
                        break;
                    }
                    _ => self.stray(),
                },
                Scan::Text => {
                    let (taken, closed) = string_prefix(rest);
                    if taken > 0 {
                        match serde_json::from_str::<String>(&format!("\"{}\"", &rest[..taken])) {
                            Ok(text) => pieces.push(Piece::Text(text)),
                            Err(_) => {
                                self.stray();
                                break;
                            }
                        }
                    }
                    match closed {
                        true => self.advance(taken + 1, Scan::Done),
                        false => {
                            self.advance(taken, Scan::Text);
                            break;
                        }
                    }
                }
                Scan::Head => {
                    let Some(start) = expect(rest, NAME_OPEN) else {
                        if !NAME_OPEN.starts_with(rest.trim_start()) {
                            self.stray();
                        }
                        break;
                    };
                    // A tool name has no quotes or escapes: it ends at the next quote.
                    let Some(len) = rest[start..].find('"') else { break };
                    let after = &rest[start + len..];
                    if !after.starts_with(ARGUMENTS_OPEN) {
                        if !ARGUMENTS_OPEN.starts_with(after) {
                            self.stray();
                        }
                        break;
                    }
                    let name = rest[start..start + len].to_string();
                    pieces.push(Piece::Head { index: self.heads, id: self.ids.id(self.heads), name });
                    self.heads += 1;
                    self.advance(
                        start + len + ARGUMENTS_OPEN.len(),
                        Scan::Value { answer: false, depth: 0, in_string: false, escaped: false, scalar: false },
                    );
                }
                Scan::Value { answer, mut depth, mut in_string, mut escaped, mut scalar } => {
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
                        let text = rest[..taken].to_string();
                        pieces.push(if answer { Piece::Text(text) } else { Piece::Arguments { index: self.heads - 1, text } });
                    }
                    match end {
                        Some(n) => self.advance(n, if answer { Scan::Done } else { Scan::AfterCall }),
                        None => {
                            self.advance(taken, Scan::Value { answer, depth, in_string, escaped, scalar });
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
                    _ => self.stray(),
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

/// How much of `rest`, the inside of a JSON string, can be decoded now: up to its closing
/// quote (and whether it was found) or to the last whole escape (a `\uD83D` high surrogate
/// waits for its low half).
fn string_prefix(rest: &str) -> (usize, bool) {
    let bytes = rest.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => return (i, true),
            b'\\' => {
                let width = match bytes.get(i + 1) {
                    None => return (i, false),
                    Some(b'u') => match rest.get(i + 2..i + 6).map(|hex| u16::from_str_radix(hex, 16)) {
                        None => return (i, false),
                        Some(Ok(0xd800..=0xdbff)) => 12,
                        Some(_) => 6,
                    },
                    Some(_) => 2,
                };
                if i + width > bytes.len() {
                    return (i, false);
                }
                i += width;
            }
            _ => i += 1,
        }
    }
    (i, false)
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
        let Constraint::JsonSchema(schema) = tools(Choice::Named("get_time".into()), true).constraint(None) else { panic!() };
        let items = &schema["properties"]["tool_calls"]["items"]["anyOf"];
        assert_eq!(items.as_array().unwrap().len(), 1);
        assert_eq!(items[0]["properties"]["name"]["const"], "get_time");
        assert!(!tools(Choice::Named("get_time".into()), true).prompt(None).contains("get_weather"));
    }

    #[test]
    fn only_auto_admits_an_answer_and_parallel_false_admits_one_call() {
        let Constraint::JsonSchema(auto) = tools(Choice::Auto, false).constraint(None) else { panic!() };
        assert_eq!(auto["anyOf"][1]["required"], json!(["response"]));
        assert_eq!(auto["anyOf"][0]["properties"]["tool_calls"]["maxItems"], 1);
        let Constraint::JsonSchema(required) = tools(Choice::Required, true).constraint(None) else { panic!() };
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
        assert_eq!(answer(text, true, &ids).finish_reason("stop"), "tool_calls");
        assert_eq!(answer(text, false, &ids).finish_reason("cancelled"), "cancelled", "a call not completed is not a call");
    }

    #[test]
    fn a_reply_cut_short_keeps_what_came_and_never_the_wrapper() {
        let ids = CallIds::new();
        // Cut inside a call's name: nothing of it is known yet.
        let cut = answer(r#"{"tool_calls": [{"name": "get_wea"#, false, &ids);
        assert_eq!((cut.content.as_deref(), cut.calls.len(), cut.finish_reason("length")), (Some(""), 0, "length"));
        // Cut inside the arguments: the call with its arguments so far, as OpenAI cuts one.
        let cut = answer(r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Par"#, false, &ids);
        assert_eq!((cut.content.as_deref(), cut.calls.len(), cut.finish_reason("length")), (None, 1, "length"));
        assert_eq!((cut.calls[0].name.as_str(), cut.calls[0].arguments.as_str()), ("get_weather", r#"{"city": "Par"#));
        // Cut inside an answer: its text, decoded, up to the last whole escape.
        let cut = answer(r#"{"response": "Caf\u00e9 \"ok\" \u00"#, false, &ids);
        assert_eq!(cut.content.as_deref(), Some("Café \"ok\" "));
        // Text in no layout of the grammar's stays as it came.
        assert_eq!(answer("plain words", false, &ids).content.as_deref(), Some("plain words"));
        assert_eq!(answer("plain words", true, &ids).content.as_deref(), Some("plain words"));
    }

    #[test]
    fn the_prompt_goes_into_the_system_message() {
        let t = tools(Choice::Auto, true);
        let user = TemplateMessage { role: "user".into(), content: "hi".into() };
        let added = t.with_prompt(vec![user.clone()], None);
        assert_eq!((added.len(), added[0].role.as_str()), (2, "system"));
        let system = TemplateMessage { role: "system".into(), content: "Be brief.".into() };
        let merged = t.with_prompt(vec![system, user], None);
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
    fn an_answer_streams_as_text_and_no_calls() {
        let text = r#"{"response": "Hi, \"there\"\\n\u00e9 \ud83d\ude00 — done."}"#;
        let want = "Hi, \"there\"\\n\u{e9} \u{1f600} — done.";
        assert_eq!(read_reply(text, &CallIds::new()), Some(Reply::Text(want.into())));
        // Byte by byte where the text is whole characters: no piece splits an escape.
        for width in [1, 2, 5] {
            let mut stream = CallStream::new(CallIds::new());
            let mut streamed = String::new();
            let mut rest = text;
            while !rest.is_empty() {
                let mut cut = width.min(rest.len());
                while !rest.is_char_boundary(cut) {
                    cut += 1;
                }
                for piece in stream.push(&rest[..cut]) {
                    let Piece::Text(t) = piece else { panic!("{piece:?}") };
                    streamed.push_str(&t);
                }
                rest = &rest[cut..];
            }
            assert_eq!((streamed.as_str(), stream.heads(), stream.streamed()), (want, 0, true), "pieces of {width}");
        }
        let mut stream = CallStream::new(CallIds::new());
        assert!(stream.push(r#"{"resp"#).is_empty() && !stream.strayed, "a prefix of either layout waits");
        assert!(stream.push(r#"onse": "#).is_empty());
        assert_eq!(stream.push("Hi"), [Piece::Text("Hi".into())]);
    }
}
