//! `GET /v1/chat/ws`: chat over a WebSocket. One JSON object per text frame.
//!
//! Client to server:
//! - `{"type":"chat","id":"r1","request":{…},"api_key":"sk-…"}`: `request` is a
//!   `/v1/chat/completions` body (with `session_id` to chat in a session; `stream` is
//!   implied); `id` (optional) is echoed on every frame of the reply; `api_key` (optional)
//!   is presented to the plugins as `Authorization: Bearer`, since browsers cannot set
//!   headers on a WebSocket. One request runs at a time per socket; send the next after
//!   its `done` or `error`.
//! - `{"type":"cancel","id":"r1"}` stops the running generation at once.
//! - `{"type":"ping"}` is answered with `{"type":"pong"}` (WebSocket pings are answered too).
//!
//! Server to client:
//! - `{"type":"start","id","model","session_id","pruned_messages"}` when generation begins,
//! - `{"type":"delta","id","content"}` for each piece of text,
//! - `{"type":"tool_calls","id","tool_calls":[…]}` once, before `done`, when a request with
//!   `tools` is answered with calls (OpenAI's `tool_calls` shape; `finish_reason` is then
//!   `tool_calls`; with tools the reply is framed when complete, as calls or one delta),
//! - `{"type":"done","id","finish_reason","usage":{prompt_tokens,completion_tokens,total_tokens}}`
//!   at the end (`finish_reason` is `cancelled` after a cancel frame),
//! - `{"type":"error","id","error":{message,type,param,code}}` (the OpenAI error shape) for
//!   a refused request, a failed generation or a malformed frame; the socket stays open.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use salvo::oapi::endpoint;
use salvo::prelude::*;
use salvo::websocket::{Message, WebSocket, WebSocketUpgrade};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument;

use super::{caller, state};
use crate::engine::{FinishReason, StreamEvent};
use crate::error::ApiError;
use crate::pipeline::tools::{self, CallIds, ToolCall};
use crate::pipeline::{Caller, Generation, Output, start_chat};
use crate::request::{ChatCompletionRequest, parse_request};
use crate::shutdown::Shutdown;
use crate::state::AppState;

/// Chat over a WebSocket (upgrade with `GET`). Frames are JSON text: the client sends
/// `chat` (a chat completions body in `request`), `cancel` and `ping`; the server answers
/// `start`, `delta`, `done`, `error` (OpenAI error shape) and `pong`. See README.md.
#[endpoint(
    tags("chat"),
    status_codes(101, 400),
    responses((status_code = 101, description = "Switching to the WebSocket chat protocol"))
)]
pub async fn chat_socket(req: &mut Request, depot: &mut Depot, res: &mut Response) -> Result<(), ApiError> {
    let state = state(depot);
    let caller = caller(req);
    let max = state.config.server.max_body_bytes as usize;
    WebSocketUpgrade::new()
        .max_message_size(max)
        .max_frame_size(max)
        .upgrade(req, res, move |socket| Socket { state, caller, running: None }.serve(socket))
        .await
        .map_err(|e| ApiError::invalid_code(None, "websocket_upgrade_required", format!("{}: connect with a WebSocket client", e.brief)))
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum Frame {
    Chat {
        #[serde(default)]
        id: Option<Value>,
        request: Value,
        #[serde(default)]
        api_key: Option<String>,
    },
    Cancel {
        #[serde(default)]
        id: Option<Value>,
    },
    Ping,
}

/// The generation a socket is streaming.
struct Running {
    id: Value,
    output: Output,
    /// With tools: the reply is held and framed once complete (as calls or text).
    tools: Option<CallIds>,
    held: String,
}

struct Socket {
    state: Arc<AppState>,
    caller: Caller,
    running: Option<Running>,
}

fn error_frame(id: &Value, error: &ApiError) -> Value {
    let mut frame = error.body();
    frame["type"] = json!("error");
    frame["id"] = id.clone();
    frame
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

impl Socket {
    async fn serve(mut self, socket: WebSocket) {
        let (mut tx, mut rx) = socket.split();
        loop {
            let frames = tokio::select! {
                message = rx.next() => match message {
                    Some(Ok(message)) if message.is_close() => break,
                    Some(Ok(message)) if message.is_ping() || message.is_pong() => continue,
                    Some(Ok(message)) => self.on_message(message).await,
                    // Gone: dropping a running generation cancels it (a session keeps
                    // the partial reply as `cancelled`).
                    Some(Err(_)) | None => break,
                },
                frames = Self::next_event(&mut self.running, &self.state.shutdown) => frames,
            };
            for frame in frames {
                if tx.send(Message::text(frame.to_string())).await.is_err() {
                    return;
                }
            }
        }
    }

    /// The frames for the running generation's next engine events; pending while idle.
    async fn next_event(running: &mut Option<Running>, shutdown: &Shutdown) -> Vec<Value> {
        let Some(run) = running.as_mut() else { return std::future::pending().await };
        let id = run.id.clone();
        let (frames, over) = match run.output.next_before(shutdown).await {
            Ok(Some((events, _))) => {
                let mut frames = Vec::new();
                let mut over = false;
                for event in events {
                    match event {
                        StreamEvent::Token { text, .. } if run.tools.is_some() => run.held.push_str(&text),
                        StreamEvent::Token { text, .. } => {
                            if !text.is_empty() {
                                frames.push(json!({"type": "delta", "id": id, "content": text}));
                            }
                        }
                        StreamEvent::Finished { text, reason, prompt_tokens, completion_tokens } => {
                            let mut finish_reason = reason.as_str();
                            let text = match &run.tools {
                                Some(ids) => {
                                    run.held.push_str(&text);
                                    let answer = tools::answer(&run.held, reason == FinishReason::Stop, ids);
                                    finish_reason = answer.finish_reason(finish_reason);
                                    if !answer.calls.is_empty() {
                                        let calls: Vec<Value> = answer.calls.iter().map(ToolCall::to_openai).collect();
                                        frames.push(json!({"type": "tool_calls", "id": id, "tool_calls": calls}));
                                    }
                                    answer.content.unwrap_or_default()
                                }
                                None => text,
                            };
                            if !text.is_empty() {
                                frames.push(json!({"type": "delta", "id": id, "content": text}));
                            }
                            frames.push(json!({"type": "done", "id": id, "finish_reason": finish_reason, "usage": usage(prompt_tokens, completion_tokens)}));
                            over = true;
                        }
                        StreamEvent::Error(message) => {
                            frames.push(error_frame(&id, &ApiError::engine_failure(message)));
                            over = true;
                        }
                    }
                }
                (frames, over)
            }
            Ok(None) => (vec![error_frame(&id, &ApiError::engine_failure("the engine ended the stream without finishing".into()))], true),
            Err(e) => (vec![error_frame(&id, &e)], true),
        };
        if over {
            *running = None;
        }
        frames
    }

    async fn on_message(&mut self, message: Message) -> Vec<Value> {
        let Ok(text) = message.as_str() else {
            return vec![error_frame(&Value::Null, &ApiError::invalid_code(None, "invalid_frame", "Frames must be JSON text, not binary"))];
        };
        let frame: Frame = match serde_json::from_str(text) {
            Ok(frame) => frame,
            Err(e) => {
                let error = ApiError::invalid_code(None, "invalid_frame", format!("Invalid frame: {e}"));
                let id = serde_json::from_str::<Value>(text).ok().and_then(|v| v.get("id").cloned()).unwrap_or(Value::Null);
                return vec![error_frame(&id, &error)];
            }
        };
        match frame {
            Frame::Ping => vec![json!({"type": "pong"})],
            Frame::Cancel { id } => self.cancel(id.unwrap_or(Value::Null)).await,
            Frame::Chat { id, request, api_key } => {
                let id = id.unwrap_or(Value::Null);
                if let Some(running) = &self.running {
                    let error = ApiError::invalid_code(
                        None,
                        "request_in_progress",
                        format!("Request {} is still running; cancel it or wait for its `done`", running.id),
                    );
                    return vec![error_frame(&id, &error)];
                }
                let caller = match api_key {
                    Some(key) => self.caller.with_api_key(&key),
                    None => self.caller.clone(),
                };
                match start(&self.state, &caller, request).await {
                    Ok(generation) => {
                        let start = json!({
                            "type": "start",
                            "id": id,
                            "model": generation.model,
                            "session_id": generation.session.as_ref().map(|s| s.id.clone()),
                            "pruned_messages": generation.session.as_ref().map(|s| s.pruned_messages).unwrap_or(0),
                        });
                        self.running = Some(Running { id, output: generation.output, tools: generation.tools, held: String::new() });
                        vec![start]
                    }
                    Err(e) => vec![error_frame(&id, &e)],
                }
            }
        }
    }
}

/// Starts a chat frame's request (a free function: a `&Socket` held across an await would
/// need the running generation to be `Sync`).
async fn start(state: &AppState, caller: &Caller, mut request: Value) -> Result<Generation, ApiError> {
    let span = tracing::info_span!("request", id = %uuid::Uuid::new_v4().simple(), route = "chat_ws");
    let Some(fields) = request.as_object_mut() else {
        return Err(ApiError::invalid_code(Some("request"), "invalid_frame", "`request` must be a chat completions body (an object)"));
    };
    // A socket always streams; the SSE-only fields do not apply.
    fields.remove("stream");
    fields.remove("stream_options");
    let body = serde_json::to_vec(&request).map_err(|e| ApiError::engine_failure(e.to_string()))?;
    let (request, sampling) = parse_request::<ChatCompletionRequest>(&body)?;
    start_chat(state, caller, request, sampling).instrument(span).await
}

impl Socket {
    async fn cancel(&mut self, id: Value) -> Vec<Value> {
        let Some(running) = self.running.take() else {
            return vec![error_frame(&id, &ApiError::invalid_code(None, "nothing_to_cancel", "No request is running"))];
        };
        let Running { id, output, held, .. } = running;
        match output.cancel().await {
            Ok((tail, prompt_tokens, completion_tokens)) => {
                let tail = held + &tail;
                let mut frames = Vec::new();
                if !tail.is_empty() {
                    frames.push(json!({"type": "delta", "id": id, "content": tail}));
                }
                frames.push(
                    json!({"type": "done", "id": id, "finish_reason": "cancelled", "usage": usage(prompt_tokens, completion_tokens)}),
                );
                frames
            }
            Err(e) => vec![error_frame(&id, &e)],
        }
    }
}
