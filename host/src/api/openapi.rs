//! The OpenAPI 3 document at `/openapi.json`, generated from the routes' `#[endpoint]`
//! attributes and the wire types' `ToSchema` derives, and Swagger UI at `/docs` (its assets
//! are embedded in the binary by salvo-oapi: no CDN).
//!
//! Handlers build most responses with `serde_json::json!`; the response types here describe
//! those shapes for the document. schemathesis checks, in CI, that every response the
//! server gives conforms (scripts/check-openapi.sh).

use salvo::oapi::{Components, EndpointOutRegister, OpenApi, Operation, ToSchema};
use salvo::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::error::ApiError;
use crate::request::SamplingFields;

/// `{"error": {…}}`, the one error shape of every route.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
struct ErrorDetail {
    message: String,
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error`, `server_error`, …
    #[serde(rename = "type")]
    kind: String,
    /// The offending request field, when there is one.
    param: Option<String>,
    /// A machine-readable code (`model_not_found`, `context_length_exceeded`, a plugin's code, …).
    code: Option<String>,
}

impl EndpointOutRegister for ApiError {
    fn register(components: &mut Components, operation: &mut Operation) {
        let schema = ErrorBody::to_schema(components);
        error_responses(operation, schema);
    }
}

/// The error statuses every API route may answer, each with `schema` (the error body of
/// the route's API: OpenAI's, or Anthropic's on its routes).
pub fn error_responses(operation: &mut Operation, schema: salvo::oapi::RefOr<salvo::oapi::schema::Schema>) {
    for (status, description) in [
        ("400", "The request is malformed, a value is out of range, or a plugin refused it"),
        ("401", "An API key is required or wrong (auth plugin)"),
        ("403", "The key may not do this (auth plugin), or the admin routes are off"),
        ("404", "No such model, session, response or route"),
        ("413", "The body is over `server.max_body_bytes`"),
        ("429", "A rate limit was reached (the message says when to retry)"),
        ("500", "The engine or a fail-closed plugin failed"),
        ("503", "Not ready, overloaded, shutting down, or over the route's time limit"),
    ] {
        let response = salvo::oapi::Response::new(description).add_content("application/json", salvo::oapi::Content::new(schema.clone()));
        operation.responses.insert(status, response);
    }
}

#[derive(Serialize, ToSchema)]
pub struct Status {
    status: String,
    /// The default model (on `/ready`).
    model: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Model {
    id: String,
    object: String,
    created: i64,
    owned_by: String,
    /// wisp: whether the model is in memory now.
    loaded: bool,
    /// wisp: idle seconds before it is unloaded; -1 never.
    keep_alive: i64,
    /// wisp: the model carries a chat template of its own (an instruct model); null until
    /// it is loaded.
    chat_template: Option<bool>,
}

/// One server-sent event of a stream with typed events (Anthropic's Messages, the
/// Responses API): its name and its JSON data.
#[derive(Serialize, ToSchema)]
pub struct NamedEvent {
    /// The event type (`message_start`, `response.output_text.delta`, …).
    event: String,
    /// The event's JSON object, as text.
    data: String,
}

/// What the admin model routes answer.
#[derive(Serialize, ToSchema)]
pub struct ModelState {
    id: String,
    loaded: bool,
    /// Load: how long it took.
    seconds: Option<f64>,
    /// Unload: whether it was loaded.
    was_loaded: Option<bool>,
}

#[derive(Serialize, ToSchema)]
pub struct ModelList {
    object: String,
    data: Vec<Model>,
}

#[derive(Serialize, ToSchema)]
pub struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize, ToSchema)]
struct AssistantMessage {
    role: String,
    content: Option<String>,
    refusal: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct ChatChoice {
    index: u32,
    message: AssistantMessage,
    /// `stop` or `length`.
    finish_reason: Option<String>,
    /// With `logprobs: true`: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
    logprobs: Option<Value>,
}

/// A chat reply (`stream: false`). With `stream: true` the response is
/// `text/event-stream`: `chat.completion.chunk` objects, then `data: [DONE]`.
#[derive(Serialize, ToSchema)]
pub struct ChatCompletion {
    id: String,
    object: String,
    created: i64,
    model: String,
    system_fingerprint: Option<String>,
    choices: Vec<ChatChoice>,
    usage: Option<Usage>,
    /// wisp: the session this turn was stored in.
    session_id: Option<String>,
    /// wisp: history messages left out of the prompt to fit the context.
    pruned_messages: Option<u64>,
}

#[derive(Serialize, ToSchema)]
struct CompletionChoice {
    index: u32,
    text: String,
    finish_reason: Option<String>,
    logprobs: Option<Value>,
}

/// A text completion (`stream: false`); streams as `text_completion` chunks otherwise.
#[derive(Serialize, ToSchema)]
pub struct Completion {
    id: String,
    object: String,
    created: i64,
    model: String,
    system_fingerprint: Option<String>,
    choices: Vec<CompletionChoice>,
    usage: Option<Usage>,
}

/// A session with its messages (what `GET /v1/sessions/{id}` and the writes return).
#[derive(Serialize, ToSchema)]
pub struct SessionWithMessages {
    #[serde(flatten)]
    session: crate::store::Session,
    messages: Vec<crate::store::StoredMessage>,
}

#[derive(Serialize, ToSchema)]
pub struct SessionList {
    object: String,
    data: Vec<crate::store::Session>,
    first_id: Option<String>,
    last_id: Option<String>,
    has_more: bool,
}

#[derive(Serialize, ToSchema)]
pub struct SessionDeleted {
    id: String,
    object: String,
    deleted: bool,
}

#[derive(Serialize, ToSchema)]
pub struct PluginChain {
    /// Counts chain loads; a reload makes a new generation.
    generation: u64,
    plugins: Vec<Value>,
    /// Set by a reload.
    reloaded: Option<bool>,
}

/// The document for `router`: every `#[endpoint]` under it, plus the sampling fields that
/// chat and completions share (parsed apart from the rest of the body, see types.rs) added
/// to both request schemas.
pub fn document(router: &Router) -> OpenApi {
    let mut doc = OpenApi::new("wisp", env!("CARGO_PKG_VERSION")).merge_router(router);
    let mut components = Components::new();
    let sampling = SamplingFields::to_schema(&mut components);
    let sampling = match sampling {
        salvo::oapi::RefOr::Type(schema) => Some(schema),
        salvo::oapi::RefOr::Ref(r) => {
            let name = r.ref_location.rsplit('/').next().unwrap_or_default().to_string();
            components.schemas.get(&name).and_then(|s| match s {
                salvo::oapi::RefOr::Type(schema) => Some(schema.clone()),
                _ => None,
            })
        }
    };
    // The types the sampling schema refers to (`StopField`, …).
    for (name, schema) in components.schemas.iter() {
        if !doc.components.schemas.contains_key(name) {
            doc.components.schemas.insert(name.clone(), schema.clone());
        }
    }
    if let Some(salvo::oapi::schema::Schema::Object(sampling)) = sampling {
        for body in ["ChatCompletionRequest", "CompletionRequest"] {
            if let Some(salvo::oapi::RefOr::Type(salvo::oapi::schema::Schema::Object(target))) = doc.components.schemas.get_mut(body) {
                for (name, property) in sampling.properties.iter() {
                    target.properties.insert(name.clone(), property.clone());
                }
            }
        }
    }
    doc
}
