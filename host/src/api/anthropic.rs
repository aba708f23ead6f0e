//! Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.
//!
//! A request is translated into a chat completions body and runs the same pipeline (the
//! plugin chain included: `x-api-key` is the credential an auth plugin sees); the reply is
//! framed in Anthropic's shape, streamed with its typed events (`message_start`,
//! `content_block_start`, `ping`, `content_block_delta`, `content_block_stop`,
//! `message_delta`, `message_stop`), and every error is `{"type":"error","error":{"type",
//! "message"}}`.

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
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InputMessage {
    /// `user` or `assistant`.
    pub role: String,
    pub content: Content,
}

/// Text, or a list of content blocks (wisp serves text blocks).
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
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Handed on as the chat request's `user`.
    #[serde(default)]
    pub user_id: Option<String>,
}

impl Content {
    fn text(&self) -> String {
        match self {
            Content::Text(text) => text.clone(),
            Content::Blocks(blocks) => blocks.iter().map(|Block::Text { text, .. }| text.as_str()).collect::<Vec<_>>().join("\n\n"),
        }
    }
}

/// The chat completions body a Messages request means.
fn chat_body(model: &str, system: Option<&Content>, messages: &[InputMessage]) -> Result<serde_json::Map<String, Value>, ApiError> {
    let mut chat = Vec::with_capacity(messages.len() + 1);
    if let Some(system) = system {
        chat.push(json!({"role": "system", "content": system.text()}));
    }
    for (i, m) in messages.iter().enumerate() {
        if m.role != "user" && m.role != "assistant" {
            return Err(ApiError::invalid(format!("messages.{i}.role"), format!("`role` must be user or assistant, got `{}`", m.role)));
        }
        chat.push(json!({"role": m.role, "content": m.content.text()}));
    }
    let mut body = serde_json::Map::new();
    body.insert("model".into(), json!(model));
    body.insert("messages".into(), Value::Array(chat));
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
    content: Vec<TextBlock>,
    /// `end_turn` or `max_tokens`.
    stop_reason: Option<String>,
    stop_sequence: Option<String>,
    usage: MessageUsage,
}

#[derive(Serialize, ToSchema)]
struct TextBlock {
    /// `text`.
    #[serde(rename = "type")]
    kind: String,
    text: String,
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

/// A message in Anthropic's shape (a text reply; `x-api-key` or `Authorization: Bearer`
/// authenticate). `stream: true` answers with Anthropic's typed server-sent events.
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
    let mut chat = chat_body(&r.model, r.system.as_ref(), &r.messages)?;
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
    let message = Message::new(&generation.model);
    let mut output = generation.output;
    if !stream {
        let mut text = String::new();
        loop {
            let Some((events, done)) = output.next_before(&state.shutdown).await? else {
                return Err(ApiError::engine_failure("the engine ended the request without finishing".into()).into());
            };
            for event in events {
                match event {
                    StreamEvent::Token { text: piece, .. } => text.push_str(&piece),
                    StreamEvent::Finished { text: piece, reason, prompt_tokens, completion_tokens } => {
                        text.push_str(&piece);
                        res.render(Json(message.whole(&text, reason, prompt_tokens, completion_tokens)));
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
    let events = futures_util::stream::unfold(Some((output, message, true)), move |step| {
        let shutdown = shutdown.clone();
        async move {
            let (output, message, first) = step?;
            Some(next_events(output, message, first, &shutdown).await)
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

type Step = (Vec<(&'static str, Value)>, Option<(Output, Message, bool)>);

/// The events for the output's next step; `None` state once the stream is over.
async fn next_events(mut output: Output, message: Message, first: bool, shutdown: &Shutdown) -> Step {
    let mut frames = Vec::new();
    if first {
        frames.push(("message_start", json!({"type": "message_start", "message": message.head(output.prompt_tokens())})));
        frames.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ));
        frames.push(("ping", json!({"type": "ping"})));
        return (frames, Some((output, message, false)));
    }
    let delta = |text: String| {
        ("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}))
    };
    match output.next_before(shutdown).await {
        Ok(Some((events, _))) => {
            for event in events {
                match event {
                    StreamEvent::Token { text, .. } if !text.is_empty() => frames.push(delta(text)),
                    StreamEvent::Token { .. } => {}
                    StreamEvent::Finished { text, reason, completion_tokens, .. } => {
                        if !text.is_empty() {
                            frames.push(delta(text));
                        }
                        frames.push(("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
                        frames.push((
                            "message_delta",
                            json!({"type": "message_delta", "delta": {"stop_reason": stop_reason(reason), "stop_sequence": null},
                                   "usage": {"output_tokens": completion_tokens}}),
                        ));
                        frames.push(("message_stop", json!({"type": "message_stop"})));
                        return (frames, None);
                    }
                    StreamEvent::Error(e) => {
                        frames.push(("error", error_body(&ApiError::engine_failure(e))));
                        return (frames, None);
                    }
                }
            }
            (frames, Some((output, message, false)))
        }
        Ok(None) => {
            let e = ApiError::engine_failure("the engine ended the stream without finishing".into());
            (vec![("error", error_body(&e))], None)
        }
        Err(e) => (vec![("error", error_body(&e))], None),
    }
}

fn stop_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "end_turn",
        FinishReason::Length => "max_tokens",
    }
}

/// The identity of one reply.
struct Message {
    id: String,
    model: String,
}

impl Message {
    fn new(model: &str) -> Message {
        Message { id: format!("msg_{}", uuid::Uuid::new_v4().simple()), model: model.to_string() }
    }

    fn head(&self, input_tokens: usize) -> Value {
        json!({
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": input_tokens, "output_tokens": 0},
        })
    }

    fn whole(&self, text: &str, reason: FinishReason, input_tokens: usize, output_tokens: usize) -> Value {
        json!({
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": stop_reason(reason), "stop_sequence": null,
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
    let chat = chat_body(&r.model, r.system.as_ref(), &r.messages)?;
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
        let chat = chat_body(&r.model, r.system.as_ref(), &r.messages).unwrap();
        assert_eq!(
            chat["messages"],
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\n\nthere"}, {"role": "assistant", "content": "Hello"}])
        );
        let image = serde_json::from_value::<MessagesRequest>(json!({"model": "m", "max_tokens": 8,
            "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}));
        assert!(image.is_err());
    }
}
