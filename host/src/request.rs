//! OpenAI wire types for requests, and their validation into the engine's types.
//!
//! Parsing rejects unknown fields (as OpenAI does) and names the offending field; the
//! `validate_*` functions check every range and limit once, so nothing downstream
//! re-checks (STYLE.md, "Validate once").

use std::collections::HashMap;

use salvo::oapi::ToSchema;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::config::Limits;
use crate::engine::grammar::Constraint;
use crate::engine::sampling::SamplingParams;
use crate::error::ApiError;
use crate::pipeline::shape::{Format, Shape};
use crate::pipeline::tools::{Choice, Function, ToolCall, Tools};
use crate::store::TurnMessage;

/// Parses a request body into the endpoint's fields and the shared sampling fields.
/// The sampling keys are split off first so each part is parsed with exact field paths:
/// a failure names the field as `param`, and unknown fields are refused by name.
pub fn parse_request<T: DeserializeOwned>(body: &[u8]) -> Result<(T, SamplingFields), ApiError> {
    let mut fields = json_object(body)?;
    let sampling: serde_json::Map<String, serde_json::Value> =
        SamplingFields::KEYS.iter().filter_map(|k| fields.remove(*k).map(|v| (k.to_string(), v))).collect();
    let sampling = from_value(serde_json::Value::Object(sampling))?;
    let request = from_value(serde_json::Value::Object(fields))?;
    Ok((request, sampling))
}

/// Parses a request body that is one JSON object into `T`, naming the offending field.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    from_value(serde_json::Value::Object(json_object(body)?))
}

fn json_object(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_code(None, "invalid_json", format!("The request body is not valid JSON: {e}")))?;
    match value {
        serde_json::Value::Object(fields) => Ok(fields),
        _ => Err(ApiError::invalid_code(None, "invalid_json", "The request body must be a JSON object")),
    }
}

fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if let Some(field) = inner.strip_prefix("unknown field `").and_then(|r| r.split('`').next()) {
            return ApiError::invalid_code(Some(field), "unknown_parameter", format!("Unrecognized request argument supplied: {field}"));
        }
        match path.as_str() {
            "." => ApiError::invalid_code(None, "invalid_request", format!("Invalid request: {inner}")),
            _ => ApiError {
                param: Some(path.clone()),
                ..ApiError::invalid_code(None, "invalid_type", format!("Invalid value for `{path}`: {inner}"))
            },
        }
    })
}

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// `response_format`: what the reply must be. `json_object` and `json_schema` are enforced
/// by grammar on every sampled token.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    /// Free text (the default).
    Text,
    /// Any JSON object.
    JsonObject,
    /// A JSON value valid against `json_schema.schema`.
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    /// `[a-zA-Z0-9_-]`, at most 64 characters.
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// The JSON schema (an object); absent means any JSON value.
    #[serde(default)]
    pub schema: Option<serde_json::Value>,
    /// Accepted for compatibility: wisp enforces every schema strictly.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// `tools[]`: a function the model may call.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: FunctionKind,
    pub function: FunctionDef,
}

/// The only kind of tool: `function`.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FunctionKind {
    Function,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionDef {
    /// `[a-zA-Z0-9_-]`, at most 64 characters.
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// JSON schema of the arguments; absent means no arguments.
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
    /// Accepted for compatibility: wisp enforces every schema strictly.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// `tool_choice`: `none`, `auto`, `required`, or `{"type": "function", "function": {"name"}}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ToolChoice {
    Mode(String),
    Named(NamedTool),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedTool {
    #[serde(rename = "type")]
    pub kind: FunctionKind,
    pub function: ToolName,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolName {
    pub name: String,
}

/// An assistant message's earlier call.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: FunctionKind,
    pub function: CalledFunction,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CalledFunction {
    pub name: String,
    /// The arguments as a JSON text.
    pub arguments: String,
}

/// At most this many tools in one request.
const MAX_TOOLS: usize = 128;
/// The longest tool call id a message may carry (they are stored in sessions).
const MAX_CALL_ID_BYTES: usize = 256;

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The tools a request offers and what the model must do with them, checked; `None` when
/// there are none.
pub(crate) fn tools(list: Option<Vec<Tool>>, choice: Option<ToolChoice>, parallel: Option<bool>) -> Result<Option<Tools>, ApiError> {
    let list = list.unwrap_or_default();
    if list.len() > MAX_TOOLS {
        return Err(ApiError::invalid("tools", format!("at most {MAX_TOOLS} tools are allowed, got {}", list.len())));
    }
    let mut functions: Vec<Function> = Vec::with_capacity(list.len());
    for (i, tool) in list.into_iter().enumerate() {
        let f = tool.function;
        if !valid_name(&f.name) {
            return Err(ApiError::invalid(
                format!("tools[{i}].function.name"),
                "a function name must be 1 to 64 characters of a-z, A-Z, 0-9, `_` and `-`",
            ));
        }
        if functions.iter().any(|g| g.name == f.name) {
            return Err(ApiError::invalid(format!("tools[{i}].function.name"), format!("the function `{}` is listed twice", f.name)));
        }
        let parameters = match f.parameters {
            None => serde_json::json!({"type": "object", "properties": {}, "additionalProperties": false}),
            Some(p @ serde_json::Value::Object(_)) => p,
            Some(_) => {
                return Err(ApiError::invalid(format!("tools[{i}].function.parameters"), "`parameters` must be a JSON schema object"));
            }
        };
        functions.push(Function { name: f.name, description: f.description, parameters });
    }
    let choice = match choice {
        None => Choice::Auto,
        Some(ToolChoice::Mode(mode)) => match mode.as_str() {
            "none" => Choice::None,
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("`tool_choice` must be none, auto, required or a named function, got `{other}`"),
                ));
            }
        },
        Some(ToolChoice::Named(named)) => {
            if !functions.iter().any(|f| f.name == named.function.name) {
                return Err(ApiError::invalid(
                    "tool_choice.function.name",
                    format!("`{}` is not one of the request's tools", named.function.name),
                ));
            }
            Choice::Named(named.function.name)
        }
    };
    if functions.is_empty() {
        return match choice {
            Choice::Auto | Choice::None => Ok(None),
            _ => Err(ApiError::invalid("tool_choice", "`tool_choice` needs `tools`")),
        };
    }
    Ok(Some(Tools { functions, choice, parallel: parallel.unwrap_or(true) }))
}

/// The JSON a `response_format` asks for, checked; `None` for free text.
pub(crate) fn format(format: Option<ResponseFormat>) -> Result<Option<Format>, ApiError> {
    Ok(match format {
        None | Some(ResponseFormat::Text) => None,
        Some(ResponseFormat::JsonObject) => Some(Format::JsonObject),
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            if !valid_name(&json_schema.name) {
                return Err(ApiError::invalid(
                    "response_format.json_schema.name",
                    "`name` must be 1 to 64 characters of a-z, A-Z, 0-9, `_` and `-`",
                ));
            }
            let schema = match json_schema.schema {
                None => serde_json::json!({}),
                Some(schema @ serde_json::Value::Object(_)) => schema,
                Some(_) => return Err(ApiError::invalid("response_format.json_schema.schema", "`schema` must be a JSON schema object")),
            };
            Some(Format::JsonSchema { name: json_schema.name, schema })
        }
    })
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
    #[serde(default)]
    pub continuous_usage_stats: bool,
}

/// Message content: a string or a list of parts.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    #[salvo(schema(pattern = "^(system|developer|user|assistant|tool)$"))]
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Vec<MessageToolCall>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub refusal: Option<String>,
}

/// The sampling fields chat and completions share (split off by [`parse_request`]).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[salvo(schema(name = SamplingFields))]
pub struct SamplingFields {
    #[salvo(schema(minimum = 0, maximum = 2))]
    pub temperature: Option<f32>,
    #[salvo(schema(exclusive_minimum = 0, maximum = 1))]
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    #[salvo(schema(minimum = 0, maximum = 1))]
    pub min_p: Option<f32>,
    #[salvo(schema(exclusive_minimum = 0, maximum = 2))]
    pub repetition_penalty: Option<f32>,
    #[salvo(schema(minimum = -2, maximum = 2))]
    pub presence_penalty: Option<f32>,
    #[salvo(schema(minimum = -2, maximum = 2))]
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    #[salvo(schema(minimum = 1, maximum = 1))]
    pub n: Option<u32>,
}

impl SamplingFields {
    /// The JSON keys of the fields above (a test keeps the two in step).
    pub const KEYS: &[&str] = &[
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "seed",
        "stop",
        "n",
    ];
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[salvo(schema(name = ChatCompletionRequest, example = json!({"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0})))]
pub struct ChatCompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    #[salvo(schema(minimum = 1))]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    #[salvo(schema(minimum = 1))]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    #[salvo(schema(maximum = 20))]
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub tools: Option<Vec<Tool>>,
    #[serde(default)]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    /// wisp: chat in this server-side session; `messages` holds only the new messages.
    #[serde(default)]
    pub session_id: Option<String>,
}

/// `prompt`: a string, a list of one string, token ids, or a list of one token-id list.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[salvo(schema(name = CompletionRequest, example = json!({"model": "gemma-3-270m", "prompt": "The capital of France is", "max_tokens": 8})))]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: PromptField,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub best_of: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
}

/// What both endpoints hand on after validation, besides the prompt.
#[derive(Debug, Clone)]
pub struct ValidParams {
    pub model: Option<String>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Explicit `max_tokens`; `None` takes the default for the endpoint.
    pub max_tokens: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// What the reply must be (`response_format`).
    pub constraint: Option<Constraint>,
}

pub struct ValidChat {
    /// `constraint` is left to the pipeline: it follows the shape plugins leave.
    pub params: ValidParams,
    /// The conversation as the client sent it, in OpenAI's roles (rendered for the
    /// template by [`tools::template_messages`]; the tool prompt is added from `shape`).
    pub messages: Vec<TurnMessage>,
    pub logprobs: bool,
    /// The tools and response format.
    pub shape: Shape,
}

pub enum ValidPrompt {
    Text(String),
    Tokens(Vec<u32>),
}

pub struct ValidCompletion {
    pub params: ValidParams,
    pub prompt: ValidPrompt,
    pub echo: bool,
    /// Alternatives per position for the legacy `logprobs` object.
    pub logprobs: Option<usize>,
}

fn range(param: &str, value: Option<f32>, lo: f32, hi: f32) -> Result<Option<f32>, ApiError> {
    match value {
        Some(v) if !(lo..=hi).contains(&v) || v.is_nan() => {
            Err(ApiError::invalid(param, format!("`{param}` must be between {lo} and {hi}, got {v}")))
        }
        v => Ok(v),
    }
}

fn validate_sampling(f: SamplingFields, vocab: usize, limits: &Limits) -> Result<(SamplingParams, Vec<String>), ApiError> {
    if let Some(n) = f.n
        && n != 1
    {
        return Err(ApiError::unsupported("n", format!("wisp generates one choice per request; `n` must be 1, got {n}")));
    }
    let temperature = range("temperature", f.temperature, 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = range("top_p", f.top_p, 0.0, 1.0)?.unwrap_or(1.0);
    if top_p == 0.0 {
        return Err(ApiError::invalid("top_p", "`top_p` must be greater than 0, got 0"));
    }
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(ApiError::invalid("top_k", format!("`top_k` must be -1, 0 (off) or positive, got {k}"))),
    };
    let min_p = range("min_p", f.min_p, 0.0, 1.0)?.unwrap_or(0.0);
    let repetition_penalty = range("repetition_penalty", f.repetition_penalty, 0.0, 2.0)?.unwrap_or(1.0);
    if repetition_penalty == 0.0 {
        return Err(ApiError::invalid("repetition_penalty", "`repetition_penalty` must be greater than 0, got 0"));
    }
    let presence_penalty = range("presence_penalty", f.presence_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    let frequency_penalty = range("frequency_penalty", f.frequency_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    let mut logit_bias = Vec::new();
    for (key, bias) in f.logit_bias.unwrap_or_default() {
        let param = format!("logit_bias.{key}");
        let token: u32 = key.parse().map_err(|_| ApiError::invalid(&param, format!("`logit_bias` keys must be token ids, got `{key}`")))?;
        if token as usize >= vocab {
            return Err(ApiError::invalid(&param, format!("token id {token} is outside the vocabulary of {vocab} tokens")));
        }
        range(&param, Some(bias), -100.0, 100.0)?;
        logit_bias.push((token, bias));
    }
    logit_bias.sort_by_key(|(t, _)| *t);
    let stop = match f.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    if stop.len() > limits.max_stop_sequences {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {} stop sequences are allowed, got {}", limits.max_stop_sequences, stop.len()),
        ));
    }
    for s in &stop {
        if s.is_empty() {
            return Err(ApiError::invalid("stop", "stop sequences must not be empty"));
        }
        if s.len() > limits.max_stop_bytes {
            return Err(ApiError::invalid(
                "stop",
                format!("a stop sequence may be at most {} bytes, got {}", limits.max_stop_bytes, s.len()),
            ));
        }
    }
    let sampling = SamplingParams {
        temperature,
        top_p,
        top_k,
        min_p,
        repetition_penalty,
        presence_penalty,
        frequency_penalty,
        logit_bias,
        seed: f.seed.map(|s| s as u64),
        logprobs: None,
    };
    Ok((sampling, stop))
}

fn max_tokens(param: &str, value: Option<u32>) -> Result<Option<usize>, ApiError> {
    match value {
        Some(0) => Err(ApiError::invalid(param, format!("`{param}` must be at least 1, got 0"))),
        v => Ok(v.map(|v| v as usize)),
    }
}

fn stream_flags(stream: Option<bool>, options: Option<StreamOptions>) -> Result<(bool, bool), ApiError> {
    let stream = stream.unwrap_or(false);
    match options {
        Some(_) if !stream => Err(ApiError::invalid("stream_options", "`stream_options` is only allowed when `stream` is true")),
        Some(o) => Ok((true, o.include_usage)),
        None => Ok((stream, false)),
    }
}

/// Flattens one message's content to text; only text parts are supported.
fn message_text(idx: usize, content: Option<Content>) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for (p, part) in parts.into_iter().enumerate() {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    ("text", None) => {
                        return Err(ApiError::invalid(format!("messages[{idx}].content[{p}].text"), "a text part needs `text`"));
                    }
                    (other, _) => {
                        return Err(ApiError::unsupported(
                            &format!("messages[{idx}].content[{p}].type"),
                            format!("content parts of type `{other}` are not supported; only `text`"),
                        ));
                    }
                }
            }
            Ok(text)
        }
    }
}

pub fn validate_chat(r: ChatCompletionRequest, sampling: SamplingFields, vocab: usize, limits: &Limits) -> Result<ValidChat, ApiError> {
    if r.messages.is_empty() && r.session_id.is_none() {
        return Err(ApiError::invalid("messages", "`messages` must contain at least one message"));
    }
    if r.messages.len() > limits.max_messages {
        return Err(ApiError::invalid(
            "messages",
            format!("at most {} messages are allowed, got {}", limits.max_messages, r.messages.len()),
        ));
    }
    let mut messages: Vec<TurnMessage> = Vec::with_capacity(r.messages.len());
    for (i, m) in r.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!("unknown role `{other}`; expected system, developer, user, assistant or tool"),
                ));
            }
        };
        if m.content.is_none() && role != "assistant" {
            return Err(ApiError::invalid(format!("messages[{i}].content"), "`content` is required"));
        }
        if m.tool_calls.is_some() && role != "assistant" {
            return Err(ApiError::invalid(format!("messages[{i}].tool_calls"), "only assistant messages carry `tool_calls`"));
        }
        match &m.tool_call_id {
            None if role == "tool" => {
                return Err(ApiError::invalid(format!("messages[{i}].tool_call_id"), "a tool message needs `tool_call_id`"));
            }
            Some(id) if id.len() > MAX_CALL_ID_BYTES || id.chars().any(char::is_control) => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].tool_call_id"),
                    format!("a call id has at most {MAX_CALL_ID_BYTES} bytes and no control characters"),
                ));
            }
            _ => {}
        }
        if let Some((j, call)) = m.tool_calls.iter().flatten().enumerate().find(|(_, c)| c.id.len() > MAX_CALL_ID_BYTES) {
            return Err(ApiError::invalid(
                format!("messages[{i}].tool_calls[{j}].id"),
                format!("a call id has at most {MAX_CALL_ID_BYTES} bytes, got {}", call.id.len()),
            ));
        }
        let tool_calls = m.tool_calls.filter(|calls| !calls.is_empty()).map(|calls| {
            calls.into_iter().map(|c| ToolCall { id: c.id, name: c.function.name, arguments: c.function.arguments }.to_openai()).collect()
        });
        let content = message_text(i, m.content)?;
        let tool_call_id = m.tool_call_id.filter(|_| role == "tool");
        messages.push(TurnMessage { role: role.to_string(), content, tool_calls, tool_call_id });
    }
    let logprobs = r.logprobs.unwrap_or(false);
    let top = match (logprobs, r.top_logprobs) {
        (_, Some(n)) if n > 20 => {
            return Err(ApiError::invalid("top_logprobs", format!("`top_logprobs` must be between 0 and 20, got {n}")));
        }
        (false, Some(_)) => {
            return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs` set to true"));
        }
        (true, n) => Some(n.unwrap_or(0) as usize),
        (false, None) => None,
    };
    let (mut sampling, stop) = validate_sampling(sampling, vocab, limits)?;
    sampling.logprobs = top;
    let max_tokens = match (max_tokens("max_completion_tokens", r.max_completion_tokens)?, max_tokens("max_tokens", r.max_tokens)?) {
        (Some(a), _) => Some(a),
        (None, b) => b,
    };
    let (stream, include_usage) = stream_flags(r.stream, r.stream_options)?;
    let shape = Shape::new(tools(r.tools, r.tool_choice, r.parallel_tool_calls)?, format(r.response_format)?);
    Ok(ValidChat {
        params: ValidParams { model: r.model, sampling, stop, max_tokens, stream, include_usage, constraint: None },
        messages,
        logprobs,
        shape,
    })
}

pub fn validate_completion(
    r: CompletionRequest,
    sampling: SamplingFields,
    vocab: usize,
    limits: &Limits,
) -> Result<ValidCompletion, ApiError> {
    if r.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", "`suffix` (fill-in-the-middle) is not supported"));
    }
    if let Some(b) = r.best_of
        && b != 1
    {
        return Err(ApiError::unsupported("best_of", format!("`best_of` must be 1, got {b}")));
    }
    let prompt = match r.prompt {
        PromptField::Text(t) => ValidPrompt::Text(t),
        PromptField::Texts(mut v) if v.len() == 1 => ValidPrompt::Text(v.remove(0)),
        PromptField::Tokens(t) => ValidPrompt::Tokens(t),
        PromptField::TokenLists(mut v) if v.len() == 1 => ValidPrompt::Tokens(v.remove(0)),
        _ => return Err(ApiError::unsupported("prompt", "wisp accepts one prompt per request (a string or one list of token ids)")),
    };
    match &prompt {
        ValidPrompt::Text(t) if t.is_empty() => return Err(ApiError::invalid("prompt", "`prompt` must not be empty")),
        ValidPrompt::Tokens(t) if t.is_empty() => return Err(ApiError::invalid("prompt", "`prompt` must not be empty")),
        ValidPrompt::Tokens(t) => {
            if let Some(bad) = t.iter().find(|id| **id as usize >= vocab) {
                return Err(ApiError::invalid("prompt", format!("token id {bad} is outside the vocabulary of {vocab} tokens")));
            }
        }
        ValidPrompt::Text(_) => {}
    }
    let logprobs = match r.logprobs {
        Some(n) if n > 5 => return Err(ApiError::invalid("logprobs", format!("`logprobs` must be between 0 and 5, got {n}"))),
        n => n.map(|n| n as usize),
    };
    let echo = r.echo.unwrap_or(false);
    if echo && logprobs.is_some() {
        return Err(ApiError::unsupported("echo", "`echo` together with `logprobs` is not supported"));
    }
    let (mut sampling, stop) = validate_sampling(sampling, vocab, limits)?;
    sampling.logprobs = logprobs;
    let (stream, include_usage) = stream_flags(r.stream, r.stream_options)?;
    Ok(ValidCompletion {
        params: ValidParams {
            model: r.model,
            sampling,
            stop,
            max_tokens: max_tokens("max_tokens", r.max_tokens)?,
            stream,
            include_usage,
            constraint: None,
        },
        prompt,
        echo,
        logprobs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(json: &str) -> Result<ValidChat, ApiError> {
        let (r, sampling) = parse_request::<ChatCompletionRequest>(json.as_bytes())?;
        validate_chat(r, sampling, 1000, &Limits::default())
    }

    #[test]
    fn sampling_keys_match_the_struct() {
        for key in SamplingFields::KEYS {
            let body = format!(r#"{{"{key}": {{"x": [true]}}}}"#);
            let err = from_value::<SamplingFields>(serde_json::from_str(&body).unwrap()).err().unwrap();
            // A known key fails on its type, never as an unknown field.
            assert_ne!(err.code.as_deref(), Some("unknown_parameter"), "{key}");
        }
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = chat(r#"{"messages":[{"role":"user","content":"hi"}],"temperature":"hot"}"#).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert_eq!(e.status.as_u16(), 400);
    }

    #[test]
    fn malformed_json_is_400() {
        let e = chat(r#"{"messages": ["#).err().unwrap();
        assert_eq!(e.status.as_u16(), 400);
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let e = chat(r#"{"messages":[{"role":"user","content":"hi"}],"temprature":1}"#).err().unwrap();
        assert!(e.message.contains("temprature"), "{}", e.message);
        assert_eq!(e.param.as_deref(), Some("temprature"));
    }

    #[test]
    fn out_of_range_values_say_the_range() {
        let e = chat(r#"{"messages":[{"role":"user","content":"hi"}],"temperature":3}"#).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert!(e.message.contains("between 0 and 2"), "{}", e.message);
    }

    #[test]
    fn n_above_one_is_refused_and_malformed_tools_name_the_field() {
        let e = chat(r#"{"messages":[{"role":"user","content":"hi"}],"n":2}"#).err().unwrap();
        assert_eq!(e.code.as_deref(), Some("unsupported_parameter"));
        let e = chat(r#"{"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}]}"#).err().unwrap();
        assert!(e.param.as_deref().is_some_and(|p| p.starts_with("tools")), "{e:?}");
    }

    const WEATHER: &str =
        r#"{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}"#;

    #[test]
    fn tools_are_checked_and_none_drops_them() {
        let with = |rest: &str| chat(&format!(r#"{{"messages":[{{"role":"user","content":"hi"}}],"tools":[{WEATHER}]{rest}}}"#));
        let ok = with("").ok().unwrap();
        assert_eq!(ok.shape.tools.as_ref().map(|t| t.choice.clone()), Some(Choice::Auto));
        assert!(ok.shape.calls_tools() && ok.messages.len() == 1, "the tool prompt is the pipeline's to add");
        let none = with(r#","tool_choice":"none""#).ok().unwrap();
        assert!(!none.shape.calls_tools() && none.shape.tools.is_some() && none.messages.len() == 1);
        let e = with(r#","tool_choice":{"type":"function","function":{"name":"nope"}}"#).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("tool_choice.function.name"));
        // Beside the tools, a format shapes the answer the model may give instead of calls.
        let both = with(r#","response_format":{"type":"json_object"}"#).ok().unwrap();
        let Some(crate::engine::grammar::Constraint::JsonSchema(schema)) = both.shape.constraint() else { panic!() };
        assert_eq!(schema["anyOf"][1]["properties"]["response"], serde_json::json!({"type": "object"}));
        let e = chat(r#"{"messages":[{"role":"user","content":"hi"}],"tool_choice":"required"}"#).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
    }

    #[test]
    fn earlier_calls_and_their_results_become_turns_the_template_knows() {
        let body = r#"{"messages":[{"role":"user","content":"Weather in Paris?"},
            {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
            {"role":"tool","tool_call_id":"call_1","content":"18 C"},{"role":"tool","tool_call_id":"call_2","content":"sunny"}]}"#;
        let ok = chat(body).ok().unwrap();
        assert_eq!(ok.messages[1].tool_calls.as_ref().unwrap()[0]["id"], "call_1", "kept in OpenAI's shape, for a session");
        assert_eq!(ok.messages[2].tool_call_id.as_deref(), Some("call_1"));
        let rendered = crate::pipeline::tools::template_messages(&ok.messages);
        let roles: Vec<&str> = rendered.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "user"]);
        let call: serde_json::Value = serde_json::from_str(&rendered[1].content).unwrap();
        assert_eq!(call, serde_json::json!({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}));
        assert!(rendered[2].content.contains("call_1:\n18 C") && rendered[2].content.contains("call_2:\nsunny"));
        let e = chat(r#"{"messages":[{"role":"tool","content":"x"}]}"#).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("messages[0].tool_call_id"));
    }

    #[test]
    fn stop_takes_a_string_or_up_to_four() {
        let ok = chat(r#"{"messages":[{"role":"user","content":"hi"}],"stop":"x"}"#).ok().unwrap();
        assert_eq!(ok.params.stop, vec!["x"]);
        let e = chat(r#"{"messages":[{"role":"user","content":"hi"}],"stop":["a","b","c","d","e"]}"#).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("stop"));
    }

    #[test]
    fn text_parts_are_joined_and_images_refused() {
        let ok = chat(r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#).ok().unwrap();
        assert_eq!(ok.messages[0].content, "ab");
        let e = chat(r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].type"));
    }

    #[test]
    fn max_completion_tokens_wins_over_max_tokens() {
        let ok = chat(r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":5,"max_completion_tokens":7}"#).ok().unwrap();
        assert_eq!(ok.params.max_tokens, Some(7));
    }

    #[test]
    fn logit_bias_keys_must_be_token_ids_in_the_vocabulary() {
        let e = chat(r#"{"messages":[{"role":"user","content":"hi"}],"logit_bias":{"5000":1}}"#).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("logit_bias.5000"));
    }
}
