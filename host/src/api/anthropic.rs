//! Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.
//!
//! A request is translated into a chat completions body and runs the same pipeline (the
//! plugin chain included: `x-api-key` is the credential an auth plugin sees); the reply is
//! framed in Anthropic's shape, streamed with its typed events (`message_start`,
//! `content_block_start`, `ping`, `content_block_delta`, `content_block_stop`,
//! `message_delta`, `message_stop`), and every error is `{"type":"error","error":{"type",
//! "message"}}`. Tools are chat's tools in Anthropic's words: `tools` with `input_schema`,
//! `tool_choice` (`auto`, `any`, `tool`, `none`), `tool_use` blocks out (streamed as
//! `input_json_delta`s) and `tool_result` blocks back in.

use std::convert::Infallible;

use futures_util::StreamExt;
use salvo::http::StatusCode;
use salvo::oapi::{ToSchema, endpoint};
use salvo::prelude::*;
use salvo::sse::{self, SseEvent};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{caller, read_body, state};
use crate::engine::{FinishReason, StreamEvent};
use crate::error::{ApiError, ErrorLabel};
use crate::pipeline::tools::{self, CallIds, CallStream, Piece};
use crate::pipeline::{self, Output};
use crate::request::{ChatCompletionRequest, parse_body, parse_request};
use crate::shutdown::Shutdown;

/// `POST /v1/messages`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[salvo(schema(example = json!({"model": "gemma-3-270m", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]})))]
pub struct MessagesRequest {
    pub model: String,
    /// New tokens to generate at most.
    pub max_tokens: u32,
    pub messages: Vec<InputMessage>,
    /// A system prompt: text, or text blocks.
    #[serde(default)]
    pub system: Option<Content>,
    #[serde(default)]
    pub stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub metadata: Option<Metadata>,
    #[serde(default)]
    pub stream: Option<bool>,
    /// Client tools: `{"name", "description", "input_schema"}`.
    #[serde(default)]
    pub tools: Option<Vec<ToolDef>>,
    /// `{"type": "auto" | "any" | "tool" | "none", "name", "disable_parallel_tool_use"}`.
    #[serde(default)]
    pub tool_choice: Option<ToolChoiceDef>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolDef {
    /// `custom` (the default); Anthropic's server tools are not served.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// The JSON schema of the tool's input (an object).
    pub input_schema: Value,
    /// Accepted and ignored.
    #[serde(default)]
    pub cache_control: Option<Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolChoiceDef {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub disable_parallel_tool_use: Option<bool>,
}

/// `POST /v1/messages/count_tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[salvo(schema(example = json!({"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Hello"}]})))]
pub struct CountTokensRequest {
    pub model: String,
    pub messages: Vec<InputMessage>,
    #[serde(default)]
    pub system: Option<Content>,
    #[serde(default)]
    pub tools: Option<Vec<ToolDef>>,
    #[serde(default)]
    pub tool_choice: Option<ToolChoiceDef>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InputMessage {
    /// `user` or `assistant`.
    pub role: String,
    pub content: Content,
}

/// Text, or a list of content blocks (wisp serves text, `tool_use` and `tool_result`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Block {
    Text {
        text: String,
        /// Accepted and ignored (wisp reuses prompt prefixes by itself).
        #[serde(default)]
        cache_control: Option<Value>,
    },
    /// An earlier call of the assistant's.
    ToolUse {
        id: String,
        name: String,
        input: Value,
        #[serde(default)]
        cache_control: Option<Value>,
    },
    /// A call's result, in a user message.
    ToolResult {
        tool_use_id: String,
        /// Text, or text blocks.
        #[serde(default)]
        content: Option<Content>,
        #[serde(default)]
        is_error: Option<bool>,
        #[serde(default)]
        cache_control: Option<Value>,
    },
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Handed on as the chat request's `user`.
    #[serde(default)]
    pub user_id: Option<String>,
}

impl Content {
    /// The text blocks' text (`param` names the content in an error about other blocks).
    fn text(&self, param: &str) -> Result<String, ApiError> {
        match self {
            Content::Text(text) => Ok(text.clone()),
            Content::Blocks(blocks) => blocks
                .iter()
                .enumerate()
                .map(|(i, b)| match b {
                    Block::Text { text, .. } => Ok(text.as_str()),
                    _ => Err(ApiError::invalid(format!("{param}.{i}"), "only text blocks are taken here")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|texts| texts.join("\n\n")),
        }
    }
}

/// The chat messages of one Messages message: an assistant's text and `tool_use` blocks
/// are one message with `tool_calls`; a user's `tool_result` blocks are `tool` messages,
/// before the user's text (Anthropic puts results first).
fn chat_messages(m: &InputMessage, i: usize) -> Result<Vec<Value>, ApiError> {
    let param = format!("messages.{i}.content");
    let blocks = match &m.content {
        Content::Text(text) => return Ok(vec![json!({"role": m.role, "content": text})]),
        Content::Blocks(blocks) => blocks,
    };
    let (mut texts, mut calls, mut out) = (Vec::new(), Vec::new(), Vec::new());
    for (j, block) in blocks.iter().enumerate() {
        match (m.role.as_str(), block) {
            (_, Block::Text { text, .. }) => texts.push(text.as_str()),
            ("assistant", Block::ToolUse { id, name, input, .. }) => {
                calls.push(json!({"id": id, "type": "function", "function": {"name": name, "arguments": input.to_string()}}))
            }
            ("user", Block::ToolResult { tool_use_id, content, is_error, .. }) => {
                let text = content.as_ref().map(|c| c.text(&format!("{param}.{j}.content"))).transpose()?.unwrap_or_default();
                let text = if *is_error == Some(true) { format!("Error: {text}") } else { text };
                out.push(json!({"role": "tool", "tool_call_id": tool_use_id, "content": text}));
            }
            (role, _) => return Err(ApiError::invalid(format!("{param}.{j}"), format!("a {role} message cannot hold this block"))),
        }
    }
    let text = texts.join("\n\n");
    match calls.is_empty() {
        false => out.push(json!({"role": "assistant", "content": (!text.is_empty()).then_some(text), "tool_calls": calls})),
        true if !text.is_empty() || out.is_empty() => out.push(json!({"role": m.role, "content": text})),
        true => {}
    }
    Ok(out)
}

/// The chat completions body a Messages request means.
fn chat_body(
    model: &str,
    system: Option<&Content>,
    messages: &[InputMessage],
    tools: Option<&[ToolDef]>,
    tool_choice: Option<&ToolChoiceDef>,
) -> Result<serde_json::Map<String, Value>, ApiError> {
    let mut chat = Vec::with_capacity(messages.len() + 1);
    if let Some(system) = system {
        chat.push(json!({"role": "system", "content": system.text("system")?}));
    }
    for (i, m) in messages.iter().enumerate() {
        if m.role != "user" && m.role != "assistant" {
            return Err(ApiError::invalid(format!("messages.{i}.role"), format!("`role` must be user or assistant, got `{}`", m.role)));
        }
        chat.extend(chat_messages(m, i)?);
    }
    let mut body = serde_json::Map::new();
    body.insert("model".into(), json!(model));
    body.insert("messages".into(), Value::Array(chat));
    if let Some(tools) = tools {
        let functions = tools
            .iter()
            .enumerate()
            .map(|(i, t)| match t.kind.as_deref() {
                None | Some("custom") => {
                    let mut function = json!({"name": t.name, "parameters": t.input_schema});
                    if let Some(description) = &t.description {
                        function["description"] = json!(description);
                    }
                    Ok(json!({"type": "function", "function": function}))
                }
                Some(kind) => {
                    Err(ApiError::invalid(format!("tools.{i}.type"), format!("server tool `{kind}` is not served; client tools are")))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        body.insert("tools".into(), Value::Array(functions));
    }
    if let Some(choice) = tool_choice {
        let mapped = match (choice.kind.as_str(), &choice.name) {
            ("auto", _) => json!("auto"),
            ("any", _) => json!("required"),
            ("none", _) => json!("none"),
            ("tool", Some(name)) => json!({"type": "function", "function": {"name": name}}),
            ("tool", None) => return Err(ApiError::invalid("tool_choice.name", "`tool_choice` of type `tool` names the tool")),
            (other, _) => {
                return Err(ApiError::invalid("tool_choice.type", format!("`tool_choice.type` is auto, any, tool or none, got `{other}`")));
            }
        };
        body.insert("tool_choice".into(), mapped);
        if choice.disable_parallel_tool_use == Some(true) {
            body.insert("parallel_tool_calls".into(), json!(false));
        }
    }
    Ok(body)
}

/// Anthropic's error types by status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

fn error_body(e: &ApiError) -> Value {
    let message = match &e.param {
        Some(param) => format!("{param}: {}", e.message),
        None => e.message.clone(),
    };
    json!({"type": "error", "error": {"type": error_type(e.status), "message": message}})
}

/// An [`ApiError`] in Anthropic's shape.
pub struct AnthropicError(ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        AnthropicError(e)
    }
}

impl Scribe for AnthropicError {
    fn render(self, res: &mut Response) {
        res.extensions.insert(ErrorLabel(self.0.metric_type().to_string()));
        res.status_code(self.0.status);
        res.render(Json(error_body(&self.0)));
    }
}

/// `{"type": "error", "error": {…}}`, the error shape of these routes.
#[derive(Serialize, ToSchema)]
struct ErrorBody {
    /// `error`.
    #[serde(rename = "type")]
    kind: String,
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
#[salvo(schema(name = "AnthropicErrorDetail"))]
struct ErrorDetail {
    /// `invalid_request_error`, `authentication_error`, `permission_error`, `not_found_error`,
    /// `request_too_large`, `rate_limit_error`, `api_error`, `overloaded_error`.
    #[serde(rename = "type")]
    kind: String,
    message: String,
}

impl salvo::oapi::EndpointOutRegister for AnthropicError {
    fn register(components: &mut salvo::oapi::Components, operation: &mut salvo::oapi::Operation) {
        let schema = <ErrorBody as ToSchema>::to_schema(components);
        super::openapi::error_responses(operation, schema);
    }
}

/// A reply in Anthropic's shape.
#[derive(Serialize, ToSchema)]
#[salvo(schema(name = "AnthropicMessage"))]
struct MessageBody {
    id: String,
    /// `message`.
    #[serde(rename = "type")]
    kind: String,
    role: String,
    model: String,
    content: Vec<ContentBlock>,
    /// `end_turn`, `max_tokens` or `tool_use`.
    stop_reason: Option<String>,
    stop_sequence: Option<String>,
    usage: MessageUsage,
}

#[derive(Serialize, ToSchema)]
struct ContentBlock {
    /// `text` or `tool_use`.
    #[serde(rename = "type")]
    kind: String,
    /// A text block's text.
    text: Option<String>,
    /// A `tool_use` block's id, tool name and input.
    id: Option<String>,
    name: Option<String>,
    input: Option<Value>,
}

#[derive(Serialize, ToSchema)]
struct MessageUsage {
    input_tokens: u64,
    output_tokens: u64,
}

#[derive(Serialize, ToSchema)]
struct TokenCount {
    input_tokens: u64,
}

/// A message in Anthropic's shape (text, or `tool_use` blocks with `tools`; `x-api-key` or
/// `Authorization: Bearer` authenticate). `stream: true` answers with Anthropic's typed server-sent events.
#[endpoint(
    tags("anthropic"),
    status_codes(200, 400, 401, 403, 404, 413, 429, 500, 503),
    request_body(content = MessagesRequest, description = "An Anthropic Messages body"),
    responses((status_code = 200, description = "The message, or its event stream", content(("application/json" = MessageBody), ("text/event-stream" = super::openapi::NamedEvent))))
)]
pub async fn create_message(req: &mut Request, depot: &mut Depot, res: &mut Response) -> Result<(), AnthropicError> {
    let state = state(depot);
    let body = read_body(req, &state).await?;
    let r: MessagesRequest = parse_body(&body)?;
    let stream = r.stream.unwrap_or(false);
    let mut chat = chat_body(&r.model, r.system.as_ref(), &r.messages, r.tools.as_deref(), r.tool_choice.as_ref())?;
    chat.insert("max_tokens".into(), json!(r.max_tokens));
    let optional = [
        ("stop", r.stop_sequences.map(|s| json!(s))),
        ("temperature", r.temperature.map(|t| json!(t))),
        ("top_p", r.top_p.map(|p| json!(p))),
        ("top_k", r.top_k.map(|k| json!(k))),
        ("user", r.metadata.and_then(|m| m.user_id).map(|u| json!(u))),
    ];
    chat.extend(optional.into_iter().filter_map(|(k, v)| Some((k.to_string(), v?))));
    let chat = serde_json::to_vec(&chat).map_err(|e| ApiError::engine_failure(e.to_string()))?;
    let (request, sampling) = parse_request::<ChatCompletionRequest>(&chat)?;
    let generation = pipeline::start_chat(&state, &caller(req), request, sampling).await?;
    let mut message = Message::new(&generation.model, generation.tools.clone());
    let mut output = generation.output;
    if !stream {
        loop {
            let Some((events, done)) = output.next_before(&state.shutdown).await? else {
                return Err(ApiError::engine_failure("the engine ended the request without finishing".into()).into());
            };
            for event in events {
                match event {
                    StreamEvent::Token { text, .. } => message.text.push_str(&text),
                    StreamEvent::Finished { text, reason, prompt_tokens, completion_tokens } => {
                        message.text.push_str(&text);
                        res.render(Json(message.whole(reason, prompt_tokens, completion_tokens)));
                        return Ok(());
                    }
                    StreamEvent::Error(e) => return Err(ApiError::engine_failure(e).into()),
                }
            }
            if done {
                return Err(ApiError::engine_failure("the engine ended the request without finishing".into()).into());
            }
        }
    }
    let shutdown = state.shutdown.clone();
    let calls = message.tools.clone().map(CallStream::new);
    let streamer = Streamer { output, message, started: false, calls, open: None, blocks: 0, open_text: false };
    let events = futures_util::stream::unfold(Some(streamer), move |streamer| {
        let shutdown = shutdown.clone();
        async move {
            let mut streamer = streamer?;
            let (frames, over) = streamer.next(&shutdown).await;
            Some((frames, (!over).then_some(streamer)))
        }
    });
    let events = events.flat_map(|frames: Vec<(&'static str, Value)>| {
        futures_util::stream::iter(
            frames.into_iter().map(|(name, data)| Ok::<_, Infallible>(SseEvent::default().name(name).text(data.to_string()))),
        )
    });
    sse::stream(res, events);
    Ok(())
}

/// The typed events of a streamed message. Without tools, one text block from the start;
/// with tools, the reply is read as it grows ([`CallStream`]): an answer's text as a text
/// block, each call as a `tool_use` block whose input streams as `input_json_delta`s.
struct Streamer {
    output: Output,
    message: Message,
    started: bool,
    calls: Option<CallStream>,
    /// The index of the open block (the next one's, less one), if one is open.
    open: Option<usize>,
    /// Blocks started.
    blocks: usize,
    /// Whether the open block is text.
    open_text: bool,
}

impl Streamer {
    fn start_block(&mut self, frames: &mut Vec<(&'static str, Value)>, block: Value, text: bool) {
        self.stop_block(frames);
        let index = self.blocks;
        (self.open, self.blocks, self.open_text) = (Some(index), index + 1, text);
        frames.push(("content_block_start", json!({"type": "content_block_start", "index": index, "content_block": block})));
    }

    fn stop_block(&mut self, frames: &mut Vec<(&'static str, Value)>) {
        if let Some(index) = self.open.take() {
            frames.push(("content_block_stop", json!({"type": "content_block_stop", "index": index})));
        }
    }

    fn delta(&mut self, frames: &mut Vec<(&'static str, Value)>, delta: Value) {
        let index = self.open.expect("a block is open");
        frames.push(("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": delta})));
    }

    fn text(&mut self, frames: &mut Vec<(&'static str, Value)>, text: &str) {
        if text.is_empty() {
            return;
        }
        if self.open.is_none() || !self.open_text {
            self.start_block(frames, json!({"type": "text", "text": ""}), true);
        }
        self.delta(frames, json!({"type": "text_delta", "text": text}));
    }

    fn call(&mut self, frames: &mut Vec<(&'static str, Value)>, id: &str, name: &str) {
        self.start_block(frames, json!({"type": "tool_use", "id": id, "name": name, "input": {}}), false);
    }

    fn input(&mut self, frames: &mut Vec<(&'static str, Value)>, json: &str) {
        self.delta(frames, json!({"type": "input_json_delta", "partial_json": json}));
    }

    /// The events for more of the reply's text.
    fn push(&mut self, frames: &mut Vec<(&'static str, Value)>, text: &str) {
        let Some(calls) = &mut self.calls else { return self.text(frames, text) };
        for piece in calls.push(text) {
            match piece {
                Piece::Text(text) => self.text(frames, &text),
                Piece::Head { id, name, .. } => self.call(frames, &id, &name),
                Piece::Arguments { text, .. } => self.input(frames, &text),
            }
        }
    }

    /// The events for the output's next step, and whether the stream is over.
    async fn next(&mut self, shutdown: &Shutdown) -> (Vec<(&'static str, Value)>, bool) {
        let mut frames = Vec::new();
        if !self.started {
            self.started = true;
            frames.push(("message_start", json!({"type": "message_start", "message": self.message.head(self.output.prompt_tokens())})));
            if self.calls.is_none() {
                self.start_block(&mut frames, json!({"type": "text", "text": ""}), true);
            }
            frames.push(("ping", json!({"type": "ping"})));
            return (frames, false);
        }
        let events = match self.output.next_before(shutdown).await {
            Ok(Some((events, _))) => events,
            Ok(None) => {
                let e = ApiError::engine_failure("the engine ended the stream without finishing".into());
                return (vec![("error", error_body(&e))], true);
            }
            Err(e) => return (vec![("error", error_body(&e))], true),
        };
        for event in events {
            match event {
                StreamEvent::Token { text, .. } => {
                    self.message.text.push_str(&text);
                    self.push(&mut frames, &text);
                }
                StreamEvent::Finished { text, reason, completion_tokens, .. } => {
                    self.message.text.push_str(&text);
                    self.push(&mut frames, &text);
                    let (blocks, stop) = self.message.blocks(reason);
                    // What the stream could not read as it grew goes out whole.
                    if self.calls.as_ref().is_some_and(|c| !c.streamed()) {
                        for block in blocks {
                            match block["type"].as_str() {
                                Some("tool_use") => {
                                    self.call(
                                        &mut frames,
                                        block["id"].as_str().unwrap_or_default(),
                                        block["name"].as_str().unwrap_or_default(),
                                    );
                                    self.input(&mut frames, &block["input"].to_string());
                                }
                                _ => self.text(&mut frames, block["text"].as_str().unwrap_or_default()),
                            }
                        }
                    }
                    if self.blocks == 0 {
                        self.start_block(&mut frames, json!({"type": "text", "text": ""}), true);
                    }
                    self.stop_block(&mut frames);
                    frames.push((
                        "message_delta",
                        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                               "usage": {"output_tokens": completion_tokens}}),
                    ));
                    frames.push(("message_stop", json!({"type": "message_stop"})));
                    return (frames, true);
                }
                StreamEvent::Error(e) => {
                    frames.push(("error", error_body(&ApiError::engine_failure(e))));
                    return (frames, true);
                }
            }
        }
        (frames, false)
    }
}

fn stop_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "end_turn",
        FinishReason::Length => "max_tokens",
    }
}

/// One reply.
struct Message {
    id: String,
    model: String,
    /// With tools: the reply is read back into `tool_use` blocks or text.
    tools: Option<CallIds>,
    /// The reply's text so far.
    text: String,
}

impl Message {
    fn new(model: &str, tools: Option<CallIds>) -> Message {
        Message { id: format!("msg_{}", uuid::Uuid::new_v4().simple()), model: model.to_string(), tools, text: String::new() }
    }

    fn head(&self, input_tokens: usize) -> Value {
        json!({
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": input_tokens, "output_tokens": 0},
        })
    }

    /// The reply's content blocks and stop reason: with tools, its calls as `tool_use`
    /// blocks (an input cut short is `{}`) and `tool_use`, or its answer's text.
    fn blocks(&self, reason: FinishReason) -> (Vec<Value>, &'static str) {
        let Some(ids) = &self.tools else { return (vec![json!({"type": "text", "text": self.text})], stop_reason(reason)) };
        let answer = tools::answer(&self.text, reason == FinishReason::Stop, ids);
        let mut blocks: Vec<Value> = answer.content.iter().filter(|t| !t.is_empty()).map(|t| json!({"type": "text", "text": t})).collect();
        blocks.extend(answer.calls.iter().map(|c| {
            let input = serde_json::from_str::<Value>(&c.arguments).ok().filter(Value::is_object).unwrap_or_else(|| json!({}));
            json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input})
        }));
        if blocks.is_empty() {
            blocks.push(json!({"type": "text", "text": ""}));
        }
        let stop = if answer.finish_reason("stop") == "tool_calls" { "tool_use" } else { stop_reason(reason) };
        (blocks, stop)
    }

    fn whole(&self, reason: FinishReason, input_tokens: usize, output_tokens: usize) -> Value {
        let (content, stop) = self.blocks(reason);
        json!({
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": content,
            "stop_reason": stop, "stop_sequence": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        })
    }
}

/// Counts a Messages request's prompt tokens as the model will see them (template
/// included), without generating.
#[endpoint(
    tags("anthropic"),
    status_codes(200, 400, 401, 403, 404, 413, 429),
    request_body(content = CountTokensRequest, description = "The model, system and messages of a Messages body"),
    responses((status_code = 200, description = "The prompt's tokens", body = TokenCount))
)]
pub async fn count_message_tokens(req: &mut Request, depot: &mut Depot) -> Result<Json<Value>, AnthropicError> {
    let state = state(depot);
    let body = read_body(req, &state).await?;
    let r: CountTokensRequest = parse_body(&body)?;
    let chat = chat_body(&r.model, r.system.as_ref(), &r.messages, r.tools.as_deref(), r.tool_choice.as_ref())?;
    let chat = serde_json::to_vec(&chat).map_err(|e| ApiError::engine_failure(e.to_string()))?;
    let (request, sampling) = parse_request::<ChatCompletionRequest>(&chat)?;
    let input_tokens = pipeline::count_chat_tokens(&state, &caller(req), request, sampling).await?;
    Ok(Json(json!({"input_tokens": input_tokens})))
}

/// The catcher's answer on these routes (an unmatched method, salvo's own limits).
pub fn is_anthropic_path(path: &str) -> bool {
    path == "/v1/messages" || path.starts_with("/v1/messages/")
}

/// The catcher body for an error status on these routes.
pub fn catch(status: StatusCode, res: &mut Response) {
    AnthropicError(ApiError::from_status(status)).render(res);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_anthropics_shape_and_types() {
        let e = ApiError::invalid("max_tokens", "must be at least 1");
        assert_eq!(
            error_body(&e),
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: must be at least 1"}})
        );
        assert_eq!(error_type(StatusCode::UNAUTHORIZED), "authentication_error");
        assert_eq!(error_type(StatusCode::TOO_MANY_REQUESTS), "rate_limit_error");
        assert_eq!(error_type(StatusCode::SERVICE_UNAVAILABLE), "overloaded_error");
    }

    #[test]
    fn a_messages_body_becomes_a_chat_body() {
        let r: MessagesRequest = serde_json::from_value(json!({
            "model": "m", "max_tokens": 8, "system": [{"type": "text", "text": "Be brief."}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}, {"role": "assistant", "content": "Hello"}],
        }))
        .unwrap();
        let chat = chat_body(&r.model, r.system.as_ref(), &r.messages, None, None).unwrap();
        assert_eq!(
            chat["messages"],
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\n\nthere"}, {"role": "assistant", "content": "Hello"}])
        );
        let tools: MessagesRequest = serde_json::from_value(json!({
            "model": "m", "max_tokens": 8,
            "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Looking."}, {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "18 C"}]},
                                             {"type": "tool_result", "tool_use_id": "t2", "content": "down", "is_error": true},
                                             {"type": "text", "text": "Thanks"}]},
            ],
        }))
        .unwrap();
        let chat = chat_body(&tools.model, None, &tools.messages, tools.tools.as_deref(), tools.tool_choice.as_ref()).unwrap();
        assert_eq!(
            chat["messages"],
            json!([
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Looking.", "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "t1", "content": "18 C"},
                {"role": "tool", "tool_call_id": "t2", "content": "Error: down"},
                {"role": "user", "content": "Thanks"},
            ])
        );
        assert_eq!(chat["tool_choice"], json!({"type": "function", "function": {"name": "get_weather"}}));
        assert_eq!(
            (chat["parallel_tool_calls"].clone(), chat["tools"][0]["function"]["parameters"].clone()),
            (json!(false), json!({"type": "object"}))
        );
        // A block in the wrong role, and a server tool, are refused by name.
        let wrong = |body: Value| {
            let r: MessagesRequest = serde_json::from_value(body).unwrap();
            chat_body(&r.model, None, &r.messages, r.tools.as_deref(), r.tool_choice.as_ref()).unwrap_err().param
        };
        let use_by_user = json!({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": {}}]}]});
        assert_eq!(wrong(use_by_user).as_deref(), Some("messages.0.content.0"));
        let server = json!({"model": "m", "max_tokens": 8, "messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search", "input_schema": {}}]});
        assert_eq!(wrong(server).as_deref(), Some("tools.0.type"));
        let image = serde_json::from_value::<MessagesRequest>(json!({"model": "m", "max_tokens": 8,
            "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}));
        assert!(image.is_err());
    }
}
