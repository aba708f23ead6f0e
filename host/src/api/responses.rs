//! OpenAI's Responses API: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`,
//! `GET /v1/responses/{id}/input_items`.
//!
//! A response is a chat turn: its input items become chat messages after the instructions
//! and the stored chain that `previous_response_id` names, and run the chat pipeline (the
//! plugin chain included). With `store` (the default) the response is written to the store
//! before its last event goes out, so a chain continues after a restart or on another
//! replica on the same Postgres, and the KV prefix of the chain's earlier turns is reused
//! by the engine's prefix cache like a session's.

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
use crate::error::ApiError;
use crate::pipeline::tools::{self, CallIds, CallStream, Piece};
use crate::pipeline::{self, Output};
use crate::request::{ChatCompletionRequest, parse_body, parse_request};
use crate::shutdown::Shutdown;
use crate::state::AppState;
use crate::store::StoreError;
use crate::store::responses::StoredResponse;

/// `POST /v1/responses`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[salvo(schema(example = json!({"model": "gemma-3-270m", "input": "Hello", "max_output_tokens": 8})))]
pub struct CreateResponse {
    /// The model (default: the server's default model).
    #[serde(default)]
    pub model: Option<String>,
    /// Text, or a list of input items (messages with text, `function_call`,
    /// `function_call_output`).
    pub input: Value,
    /// A system prompt for this response only (not carried along a chain).
    #[serde(default)]
    pub instructions: Option<String>,
    /// Continue the conversation of this stored response.
    #[serde(default)]
    pub previous_response_id: Option<String>,
    /// Keep the response (default true): it can then be read, continued and deleted.
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub stream: Option<bool>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", …}}`.
    #[serde(default)]
    pub text: Option<TextConfig>,
    /// Functions: `{"type": "function", "name", "description", "parameters"}`.
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub user: Option<String>,
    /// Extra output data: agent SDKs send it on every request (often `[]`). Every value
    /// OpenAI documents is taken; none adds anything to wisp's output items (it serves no
    /// reasoning items, images or built-in tools) but `message.output_text.logprobs`, which
    /// is refused as not served.
    #[serde(default)]
    pub include: Option<Vec<String>>,
}

/// `include` values OpenAI documents that add nothing wisp produces.
const INCLUDES: [&str; 7] = [
    "reasoning.encrypted_content",
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
];

/// Checks `include` (see [`CreateResponse::include`]).
fn check_include(include: &[String]) -> Result<(), ApiError> {
    for (i, value) in include.iter().enumerate() {
        if value == "message.output_text.logprobs" {
            return Err(ApiError::invalid(
                format!("include[{i}]"),
                "`message.output_text.logprobs` is not served by the Responses API here; chat completions' `logprobs` is",
            ));
        }
        if !INCLUDES.contains(&value.as_str()) {
            return Err(ApiError::invalid(
                format!("include[{i}]"),
                format!("unknown `include` value `{value}`; known: {}", INCLUDES.join(", ")),
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    #[serde(default)]
    pub format: Option<Value>,
}

fn response_not_found(id: &str, param: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        message: format!("No response `{id}`"),
        param: Some(param.to_string()),
        code: Some("response_not_found".into()),
    }
}

fn not_found_as(param: &'static str) -> impl Fn(StoreError) -> ApiError {
    move |e| match e {
        StoreError::NotFound(id) => response_not_found(&id, param),
        e => ApiError::from(e),
    }
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// The id of the `function_call` item of a call (the same while it streams and once done).
fn call_item_id(call_id: &str) -> String {
    format!("fc_{}", call_id.strip_prefix("call_").unwrap_or(call_id))
}

/// Text of a message's content: a string, or parts with `text` (`input_text`, `output_text`).
fn content_text(content: &Value, param: &str) -> Result<String, ApiError> {
    match content {
        Value::String(text) => Ok(text.clone()),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(i, part)| match (part["type"].as_str(), part["text"].as_str()) {
                (Some("input_text" | "output_text" | "text"), Some(text)) => Ok(text.to_string()),
                (kind, _) => Err(ApiError::invalid(
                    format!("{param}[{i}]"),
                    format!("content parts are `input_text` or `output_text` with `text`; got {}", kind.unwrap_or("no type")),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|texts| texts.join("\n\n")),
        _ => Err(ApiError::invalid(param, "`content` is text or a list of text parts")),
    }
}

/// The input as items, each with an id (as `input_items` lists them), and as chat messages.
fn read_input(input: &Value) -> Result<(Vec<Value>, Vec<Value>), ApiError> {
    let items: Vec<Value> = match input {
        Value::String(text) => vec![json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})],
        Value::Array(items) if !items.is_empty() => items.clone(),
        _ => return Err(ApiError::invalid("input", "`input` is text or a non-empty list of items")),
    };
    let mut listed = Vec::with_capacity(items.len());
    let mut chat: Vec<Value> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let param = format!("input[{i}]");
        let kind = item.get("type").and_then(Value::as_str).unwrap_or("message").to_string();
        let mut item = item;
        match kind.as_str() {
            "message" => {
                let role = match item["role"].as_str() {
                    Some(role @ ("user" | "assistant" | "system" | "developer")) => role.to_string(),
                    _ => return Err(ApiError::invalid(format!("{param}.role"), "`role` is user, assistant, system or developer")),
                };
                let text = content_text(&item["content"], &format!("{param}.content"))?;
                chat.push(json!({"role": role, "content": text}));
                let part = if role == "assistant" { "output_text" } else { "input_text" };
                item = json!({"type": "message", "role": role, "content": [{"type": part, "text": text}]});
            }
            "function_call" => {
                let (Some(call_id), Some(name), Some(arguments)) =
                    (item["call_id"].as_str(), item["name"].as_str(), item["arguments"].as_str())
                else {
                    return Err(ApiError::invalid(param, "a `function_call` item has `call_id`, `name` and `arguments`"));
                };
                let call = json!({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}});
                match chat.last_mut() {
                    // Consecutive calls are one assistant message.
                    Some(last) if last["role"] == "assistant" && last["tool_calls"].is_array() => {
                        last["tool_calls"].as_array_mut().expect("checked above").push(call)
                    }
                    _ => chat.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            "function_call_output" => {
                let (Some(call_id), Some(output)) = (item["call_id"].as_str(), item["output"].as_str()) else {
                    return Err(ApiError::invalid(param, "a `function_call_output` item has `call_id` and `output` (text)"));
                };
                chat.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
            }
            other => return Err(ApiError::invalid(format!("{param}.type"), format!("unsupported input item type `{other}`"))),
        }
        if item.get("id").is_none() {
            let prefix = if kind == "message" { "msg" } else { "fc" };
            item["id"] = json!(new_id(prefix));
        }
        listed.push(item);
    }
    Ok((listed, chat))
}

/// Responses' `tools` in chat's shape (functions only).
fn chat_tools(tools: &[Value]) -> Result<Vec<Value>, ApiError> {
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| match t["type"].as_str() {
            Some("function") => {
                let mut function =
                    json!({"name": t["name"], "parameters": t.get("parameters").cloned().unwrap_or(json!({"type": "object"}))});
                if let Some(description) = t.get("description").filter(|d| d.is_string()) {
                    function["description"] = description.clone();
                }
                Ok(json!({"type": "function", "function": function}))
            }
            kind => Err(ApiError::invalid(format!("tools[{i}].type"), format!("only `function` tools are served; got {kind:?}"))),
        })
        .collect()
}

/// The chat completions body a request means, after the chain's messages.
fn chat_body(r: &CreateResponse, mut messages: Vec<Value>) -> Result<Vec<u8>, ApiError> {
    if let Some(instructions) = &r.instructions {
        messages.insert(0, json!({"role": "system", "content": instructions}));
    }
    let mut body = json!({"messages": messages});
    let set = |body: &mut Value, key: &str, value: Option<Value>| {
        if let Some(value) = value {
            body[key] = value;
        }
    };
    set(&mut body, "model", r.model.clone().map(Value::from));
    set(&mut body, "max_tokens", r.max_output_tokens.map(Value::from));
    set(&mut body, "temperature", r.temperature.map(Value::from));
    set(&mut body, "top_p", r.top_p.map(Value::from));
    set(&mut body, "user", r.user.clone().map(Value::from));
    set(&mut body, "parallel_tool_calls", r.parallel_tool_calls.map(Value::from));
    if let Some(tools) = &r.tools {
        body["tools"] = Value::Array(chat_tools(tools)?);
    }
    set(
        &mut body,
        "tool_choice",
        r.tool_choice.clone().map(|c| match c["type"].as_str() {
            Some("function") => json!({"type": "function", "function": {"name": c["name"]}}),
            _ => c,
        }),
    );
    if let Some(format) = r.text.as_ref().and_then(|t| t.format.clone()) {
        body["response_format"] = match format["type"].as_str() {
            Some("json_schema") => {
                let mut schema = json!({"name": format["name"], "schema": format.get("schema").cloned().unwrap_or(json!({}))});
                if let Some(strict) = format.get("strict") {
                    schema["strict"] = strict.clone();
                }
                json!({"type": "json_schema", "json_schema": schema})
            }
            _ => format,
        };
    }
    serde_json::to_vec(&body).map_err(|e| ApiError::engine_failure(e.to_string()))
}

/// What a request asked for, echoed in the response object.
struct Echo {
    model: String,
    instructions: Option<String>,
    previous_response_id: Option<String>,
    store: bool,
    temperature: Option<f32>,
    top_p: Option<f32>,
    max_output_tokens: Option<u32>,
    text: Value,
    tools: Value,
    tool_choice: Value,
    parallel_tool_calls: bool,
    metadata: Value,
}

impl Echo {
    fn new(r: &CreateResponse, model: &str) -> Echo {
        Echo {
            model: model.to_string(),
            instructions: r.instructions.clone(),
            previous_response_id: r.previous_response_id.clone(),
            store: r.store.unwrap_or(true),
            temperature: r.temperature,
            top_p: r.top_p,
            max_output_tokens: r.max_output_tokens,
            text: json!({"format": r.text.as_ref().and_then(|t| t.format.clone()).unwrap_or(json!({"type": "text"}))}),
            tools: json!(r.tools.clone().unwrap_or_default()),
            tool_choice: r.tool_choice.clone().unwrap_or(json!("auto")),
            parallel_tool_calls: r.parallel_tool_calls.unwrap_or(true),
            metadata: r.metadata.clone().unwrap_or(json!({})),
        }
    }

    /// The response object in a state.
    fn object(
        &self,
        id: &str,
        created_at: u64,
        status: &str,
        output: &[Value],
        usage: Option<(usize, usize)>,
        reason: Option<&str>,
    ) -> Value {
        json!({
            "id": id,
            "object": "response",
            "created_at": created_at,
            "status": status,
            "error": null,
            "incomplete_details": reason.map(|r| json!({"reason": r})),
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": self.previous_response_id,
            "store": self.store,
            "temperature": self.temperature.unwrap_or(1.0),
            "top_p": self.top_p.unwrap_or(1.0),
            "text": self.text,
            "tools": self.tools,
            "tool_choice": self.tool_choice,
            "truncation": "disabled",
            "metadata": self.metadata,
            "usage": usage.map(|(input, output)| json!({
                "input_tokens": input,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input + output,
            })),
        })
    }
}

/// One response being produced.
struct Reply {
    id: String,
    created_at: u64,
    echo: Echo,
    /// The output message's id (a text reply).
    message_id: String,
    /// With tools: the reply is read back at the end into calls or text.
    tools: Option<CallIds>,
    text: String,
    // What storing needs.
    principal: String,
    input_items: Vec<Value>,
    input_chat: Vec<Value>,
    state: std::sync::Arc<AppState>,
}

/// The end of a reply: the output items, its chat messages, status and why it is incomplete.
struct Ending {
    items: Vec<Value>,
    chat: Vec<Value>,
    status: &'static str,
    reason: Option<&'static str>,
}

impl Reply {
    fn message_item(&self, text: &str, status: &str) -> Value {
        json!({"type": "message", "id": self.message_id, "status": status, "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]})
    }

    fn ending(&self, reason: FinishReason) -> Ending {
        let (status, why) = match reason {
            FinishReason::Stop => ("completed", None),
            FinishReason::Length => ("incomplete", Some("max_output_tokens")),
        };
        let answer = match &self.tools {
            Some(ids) => tools::answer(&self.text, reason == FinishReason::Stop, ids),
            None => tools::Answer::text(self.text.clone()),
        };
        if answer.calls.is_empty() {
            let text = answer.content.unwrap_or_default();
            let item = self.message_item(&text, status);
            return Ending { items: vec![item], chat: vec![json!({"role": "assistant", "content": text})], status, reason: why };
        }
        let items = answer
            .calls
            .iter()
            .map(|c| json!({"type": "function_call", "id": call_item_id(&c.id), "call_id": c.id, "name": c.name, "arguments": c.arguments, "status": "completed"}))
            .collect();
        let chat = vec![
            json!({"role": "assistant", "content": null, "tool_calls": answer.calls.iter().map(tools::ToolCall::to_openai).collect::<Vec<_>>()}),
        ];
        Ending { items, chat, status, reason: why }
    }

    /// The finished response object, stored first when asked.
    async fn finish(&self, reason: FinishReason, prompt_tokens: usize, completion_tokens: usize) -> Result<(Value, Vec<Value>), ApiError> {
        let ending = self.ending(reason);
        let body = self.echo.object(
            &self.id,
            self.created_at,
            ending.status,
            &ending.items,
            Some((prompt_tokens, completion_tokens)),
            ending.reason,
        );
        if self.echo.store {
            let stored = StoredResponse {
                id: self.id.clone(),
                principal: self.principal.clone(),
                previous_response_id: self.echo.previous_response_id.clone(),
                input: Value::Array(self.input_chat.clone()),
                input_items: Value::Array(self.input_items.clone()),
                output: Value::Array(ending.chat),
                body: body.clone(),
            };
            self.state.store.put_response(&stored).await?;
        }
        Ok((body, ending.items))
    }
}

/// Creates a model response (OpenAI's Responses API); `stream: true` answers with its
/// typed server-sent events.
#[endpoint(
    tags("responses"),
    status_codes(200, 400, 401, 403, 404, 413, 429, 500, 503),
    request_body(content = CreateResponse, description = "A Responses API body"),
    responses((status_code = 200, description = "The response, or its event stream", content(("application/json" = Value), ("text/event-stream" = super::openapi::NamedEvent))))
)]
pub async fn create_response(req: &mut Request, depot: &mut Depot, res: &mut Response) -> Result<(), ApiError> {
    let state = state(depot);
    let body = read_body(req, &state).await?;
    let r: CreateResponse = parse_body(&body)?;
    check_include(r.include.as_deref().unwrap_or_default())?;
    let (input_items, input_chat) = read_input(&r.input)?;
    let (mut messages, owner) = match &r.previous_response_id {
        Some(previous) => match state.store.response_chain(previous).await {
            Ok(chain) => {
                let owner = chain[0].principal.clone();
                let messages = chain.into_iter().flat_map(|link| array(link.input).into_iter().chain(array(link.output))).collect();
                (messages, Some(owner))
            }
            // An unknown id is answered like someone else's, after the plugins (an
            // unauthenticated caller learns nothing of which ids exist): no principal has
            // a control character, so this owner is nobody.
            Err(StoreError::NotFound(_)) => (Vec::new(), Some("\0nobody".to_string())),
            Err(e) => return Err(not_found_as("previous_response_id")(e)),
        },
        None => (Vec::new(), None),
    };
    messages.extend(input_chat.iter().cloned());
    let (request, sampling) = parse_request::<ChatCompletionRequest>(&chat_body(&r, messages)?)?;
    let not_found = response_not_found(r.previous_response_id.as_deref().unwrap_or_default(), "previous_response_id");
    let generation = pipeline::start_owned_chat(&state, &caller(req), request, sampling, owner.as_deref().map(|o| (o, not_found))).await?;
    let reply = Reply {
        id: new_id("resp"),
        created_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        echo: Echo::new(&r, &generation.model),
        message_id: new_id("msg"),
        tools: generation.tools.clone(),
        text: String::new(),
        principal: generation.principal.clone(),
        input_items,
        input_chat,
        state: state.clone(),
    };
    let mut output = generation.output;
    if !r.stream.unwrap_or(false) {
        let mut reply = reply;
        loop {
            let Some((events, _)) = output.next_before(&state.shutdown).await? else {
                return Err(ApiError::engine_failure("the engine ended the request without finishing".into()));
            };
            for event in events {
                match event {
                    StreamEvent::Token { text, .. } => reply.text.push_str(&text),
                    StreamEvent::Finished { text, reason, prompt_tokens, completion_tokens } => {
                        reply.text.push_str(&text);
                        let (body, _) = reply.finish(reason, prompt_tokens, completion_tokens).await?;
                        res.render(Json(body));
                        return Ok(());
                    }
                    StreamEvent::Error(e) => return Err(ApiError::engine_failure(e)),
                }
            }
        }
    }
    let shutdown = state.shutdown.clone();
    let calls = reply.tools.clone().map(CallStream::new);
    let streamer = Streamer { output, reply, sequence: 0, started: false, calls, call_items: Vec::new(), text_open: false };
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

fn array(value: Value) -> Vec<Value> {
    match value {
        Value::Array(items) => items,
        _ => Vec::new(),
    }
}

/// The typed events of a streamed response. Text goes out as it generates; with tools, the
/// reply is read as it grows ([`CallStream`]): an answer's text as text deltas, each call
/// as its item (name first) and then its arguments piece by piece, as OpenAI streams them.
struct Streamer {
    output: Output,
    reply: Reply,
    sequence: u64,
    started: bool,
    /// With tools: the reply's reader.
    calls: Option<CallStream>,
    /// The item ids of the calls that went out.
    call_items: Vec<String>,
    /// Whether the message item and its text part went out.
    text_open: bool,
}

impl Streamer {
    fn event(&mut self, frames: &mut Vec<(&'static str, Value)>, name: &'static str, mut data: Value) {
        data["type"] = json!(name);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        frames.push((name, data));
    }

    /// The message item and its text part, before the first text.
    fn open_message(&mut self, frames: &mut Vec<(&'static str, Value)>) {
        self.text_open = true;
        let id = self.reply.message_id.clone();
        let item = json!({"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []});
        self.event(frames, "response.output_item.added", json!({"output_index": 0, "item": item}));
        let part = json!({"type": "output_text", "text": "", "annotations": []});
        self.event(frames, "response.content_part.added", json!({"item_id": id, "output_index": 0, "content_index": 0, "part": part}));
    }

    fn text_delta(&mut self, frames: &mut Vec<(&'static str, Value)>, text: &str) {
        if text.is_empty() {
            return;
        }
        if !self.text_open {
            self.open_message(frames);
        }
        let id = self.reply.message_id.clone();
        self.event(frames, "response.output_text.delta", json!({"item_id": id, "output_index": 0, "content_index": 0, "delta": text}));
    }

    /// A call's item, before its arguments.
    fn open_call(&mut self, frames: &mut Vec<(&'static str, Value)>, index: usize, call_id: &str, name: &str) {
        let id = call_item_id(call_id);
        self.call_items.push(id.clone());
        let item = json!({"type": "function_call", "id": id, "call_id": call_id, "name": name, "arguments": "", "status": "in_progress"});
        self.event(frames, "response.output_item.added", json!({"output_index": index, "item": item}));
    }

    fn arguments_delta(&mut self, frames: &mut Vec<(&'static str, Value)>, index: usize, text: &str) {
        let id = self.call_items[index].clone();
        self.event(frames, "response.function_call_arguments.delta", json!({"item_id": id, "output_index": index, "delta": text}));
    }

    /// The events for more of the reply's text.
    fn text(&mut self, frames: &mut Vec<(&'static str, Value)>, text: &str) {
        self.reply.text.push_str(text);
        let Some(calls) = &mut self.calls else { return self.text_delta(frames, text) };
        for piece in calls.push(text) {
            match piece {
                Piece::Text(text) => self.text_delta(frames, &text),
                Piece::Head { index, id, name } => self.open_call(frames, index, &id, &name),
                Piece::Arguments { index, text } => self.arguments_delta(frames, index, &text),
            }
        }
    }

    /// The closing events of the output items: any not yet opened go out whole first.
    fn close(&mut self, frames: &mut Vec<(&'static str, Value)>, items: &[Value]) {
        for (index, item) in items.iter().enumerate() {
            let id = item["id"].clone();
            if item["type"] == "function_call" {
                let arguments = item["arguments"].as_str().unwrap_or_default();
                if index >= self.call_items.len() {
                    self.open_call(frames, index, item["call_id"].as_str().unwrap_or_default(), item["name"].as_str().unwrap_or_default());
                    self.arguments_delta(frames, index, arguments);
                }
                self.event(
                    frames,
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": index, "arguments": arguments}),
                );
            } else {
                let text = item["content"][0]["text"].as_str().unwrap_or_default().to_string();
                if !self.text_open {
                    self.open_message(frames);
                    self.text_delta(frames, &text);
                }
                self.event(
                    frames,
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
                );
                let part = json!({"type": "output_text", "text": text, "annotations": []});
                self.event(
                    frames,
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                );
            }
            self.event(frames, "response.output_item.done", json!({"output_index": index, "item": item}));
        }
    }

    /// The events for the next step, and whether the stream is over.
    async fn next(&mut self, shutdown: &Shutdown) -> (Vec<(&'static str, Value)>, bool) {
        let mut frames = Vec::new();
        if !self.started {
            self.started = true;
            let object = self.reply.echo.object(&self.reply.id, self.reply.created_at, "in_progress", &[], None, None);
            self.event(&mut frames, "response.created", json!({"response": object}));
            self.event(&mut frames, "response.in_progress", json!({"response": object}));
            if self.calls.is_none() {
                self.open_message(&mut frames);
            }
            return (frames, false);
        }
        let events = match self.output.next_before(shutdown).await {
            Ok(Some((events, _))) => events,
            Ok(None) => return (self.failed(ApiError::engine_failure("the engine ended the stream without finishing".into())), true),
            Err(e) => return (self.failed(e), true),
        };
        for event in events {
            match event {
                StreamEvent::Token { text, .. } => self.text(&mut frames, &text),
                StreamEvent::Finished { text, reason, prompt_tokens, completion_tokens } => {
                    self.text(&mut frames, &text);
                    let (body, items) = match self.reply.finish(reason, prompt_tokens, completion_tokens).await {
                        Ok(done) => done,
                        Err(e) => {
                            frames.extend(self.failed(e));
                            return (frames, true);
                        }
                    };
                    self.close(&mut frames, &items);
                    // Also when cut at max_output_tokens (the body's status says `incomplete`):
                    // the SDKs' stream helpers finish on this event only.
                    self.event(&mut frames, "response.completed", json!({"response": body}));
                    return (frames, true);
                }
                StreamEvent::Error(e) => {
                    frames.extend(self.failed(ApiError::engine_failure(e)));
                    return (frames, true);
                }
            }
        }
        (frames, false)
    }

    fn failed(&mut self, e: ApiError) -> Vec<(&'static str, Value)> {
        let mut frames = Vec::new();
        self.event(&mut frames, "error", json!({"code": e.code, "message": e.message, "param": e.param}));
        frames
    }
}

/// A stored response (the caller's own).
#[endpoint(tags("responses"), status_codes(200, 401, 403, 404, 429), parameters(("id" = String, Path, description = "The response id")), responses((status_code = 200, description = "The response", body = Value)))]
pub async fn get_response(req: &mut Request, depot: &mut Depot) -> Result<Json<Value>, ApiError> {
    let state = state(depot);
    let principal = caller(req).identify(&state, "responses").await?;
    let id: String = req.param("id").unwrap_or_default();
    Ok(Json(state.store.get_response(&principal, &id).await.map_err(not_found_as("id"))?.body))
}

/// Deletes a stored response; a chain continued past it starts after it.
#[endpoint(tags("responses"), status_codes(200, 401, 403, 404, 429), parameters(("id" = String, Path, description = "The response id")), responses((status_code = 200, description = "Deleted", body = Value)))]
pub async fn delete_response(req: &mut Request, depot: &mut Depot) -> Result<Json<Value>, ApiError> {
    let state = state(depot);
    let principal = caller(req).identify(&state, "responses").await?;
    let id: String = req.param("id").unwrap_or_default();
    state.store.delete_response(&principal, &id).await.map_err(not_found_as("id"))?;
    Ok(Json(json!({"id": id, "object": "response", "deleted": true})))
}

#[derive(Debug, Deserialize, salvo::oapi::ToParameters)]
#[serde(deny_unknown_fields)]
#[salvo(parameters(default_parameter_in = Query))]
struct ItemsQuery {
    /// `asc` or `desc` (default).
    order: Option<String>,
    /// Items per page, 1 to 100 (default 20).
    limit: Option<usize>,
    /// The last id of the previous page.
    after: Option<String>,
}

/// A stored response's input items.
#[endpoint(tags("responses"), status_codes(200, 400, 401, 403, 404, 429), parameters(("id" = String, Path, description = "The response id"), ItemsQuery), responses((status_code = 200, description = "The items", body = Value)))]
pub async fn list_input_items(req: &mut Request, depot: &mut Depot) -> Result<Json<Value>, ApiError> {
    let state = state(depot);
    let principal = caller(req).identify(&state, "responses").await?;
    let id: String = req.param("id").unwrap_or_default();
    let query: ItemsQuery = req.parse_queries().map_err(|e| ApiError::invalid_code(None, "invalid_query", e.to_string()))?;
    let limit = query.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid("limit", format!("`limit` must be between 1 and 100, got {limit}")));
    }
    let mut items = array(state.store.get_response(&principal, &id).await.map_err(not_found_as("id"))?.input_items);
    match query.order.as_deref() {
        None | Some("desc") => items.reverse(),
        Some("asc") => {}
        Some(other) => return Err(ApiError::invalid("order", format!("`order` is asc or desc, got `{other}`"))),
    }
    if let Some(after) = &query.after {
        let at = items
            .iter()
            .position(|i| i["id"] == *after.as_str())
            .ok_or_else(|| ApiError::invalid("after", format!("no item `{after}`")))?;
        items.drain(..=at);
    }
    let has_more = items.len() > limit;
    items.truncate(limit);
    Ok(Json(json!({
        "object": "list",
        "data": items,
        "first_id": items.first().map(|i| i["id"].clone()),
        "last_id": items.last().map(|i| i["id"].clone()),
        "has_more": has_more,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_items_become_chat_messages_with_ids() {
        let (items, chat) = read_input(&json!("Hi")).unwrap();
        assert_eq!(chat, [json!({"role": "user", "content": "Hi"})]);
        assert!(items[0]["id"].as_str().unwrap().starts_with("msg_"));
        let (items, chat) = read_input(&json!([
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "18 C"},
        ]))
        .unwrap();
        assert_eq!(items.len(), 4);
        assert_eq!(chat.len(), 3, "consecutive calls are one assistant message: {chat:?}");
        assert_eq!(chat[1]["tool_calls"][1]["id"], "c2");
        assert_eq!(chat[2], json!({"role": "tool", "tool_call_id": "c1", "content": "18 C"}));
        let e = read_input(&json!([{"type": "image", "url": "x"}])).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input[0].type"));
        assert!(read_input(&json!([])).is_err());
    }
}
