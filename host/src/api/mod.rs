//! The HTTP API: OpenAI-compatible routes, SSE streaming, health, readiness and metrics.
//!
//! Handlers parse (crate::request), hand the request to the pipeline (crate::pipeline,
//! which owns everything from the model to the session turn), and frame what comes back
//! (openai.rs). Every failure is an [`ApiError`], rendered in one place (crate::error).

pub mod anthropic;
pub mod openai;
pub mod openapi;
pub mod responses;
pub mod sessions;
pub mod web;
pub mod ws;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use salvo::affix_state;
use salvo::catcher::Catcher;
use salvo::http::{Method, StatusCode};
use salvo::oapi::endpoint;
use salvo::prelude::*;
use salvo::sse::{self, SseEvent};
use serde_json::json;
use tracing::Instrument;

use crate::error::{self, ApiError};
use crate::pipeline::{self, Caller, Generation};
use crate::policy;
use crate::request::{self as types, ChatCompletionRequest, CompletionRequest};
use crate::state::AppState;
use openai::{Collector, Endpoint, ResponseMeta, StreamFramer};

/// Request headers plugins may see (an auth plugin needs the key; nothing else leaks).
const POLICY_HEADERS: &[&str] = &["authorization", "x-api-key", "user-agent", "x-request-id", "x-forwarded-for"];

/// The salvo service: routes, shared state, metrics, request ids, time limits, CORS and
/// the OpenAI-shaped catcher.
pub fn service(state: Arc<AppState>) -> Service {
    let server = &state.config.server;
    let quick = Deadline(server.timeout_seconds);
    let generation = Deadline(server.generation_timeout_seconds);
    let router = Router::new()
        .hoop(affix_state::inject(state.clone()))
        .hoop(track)
        .push(Router::with_path("health").get(health))
        .push(Router::with_path("ready").get(ready))
        .push(Router::with_path("metrics").get(metrics))
        .push(
            Router::with_path("v1")
                .push(Router::with_path("models").hoop(quick).get(list_models))
                .push(Router::with_path("models/{id}").hoop(quick).get(get_model))
                .push(Router::with_path("chat/completions").hoop(generation).post(chat_completions))
                .push(Router::with_path("chat/ws").get(ws::chat_socket))
                .push(Router::with_path("completions").hoop(generation).post(completions))
                .push(Router::with_path("messages").hoop(generation).post(anthropic::create_message))
                .push(Router::with_path("messages/count_tokens").hoop(quick).post(anthropic::count_message_tokens))
                .push(Router::with_path("responses").hoop(generation).post(responses::create_response))
                .push(
                    Router::with_path("responses/{id}")
                        .hoop(quick)
                        .get(responses::get_response)
                        .delete(responses::delete_response)
                        .push(Router::with_path("input_items").get(responses::list_input_items)),
                )
                .push(sessions::router().hoop(quick)),
        )
        .push(
            Router::with_path("admin")
                .hoop(quick)
                .hoop(admin_auth)
                .push(Router::with_path("plugins").get(list_plugins))
                .push(Router::with_path("plugins/reload").post(reload_plugins))
                .push(Router::with_path("models/{id}/load").post(load_model))
                .push(Router::with_path("models/{id}/unload").post(unload_model)),
        )
        .get(web::index);
    let doc = openapi::document(&router);
    let router = router
        .push(doc.into_router("openapi.json"))
        .push(salvo::oapi::swagger_ui::SwaggerUi::new("/openapi.json").into_router("docs"))
        .push(web::assets());
    let mut service = Service::new(router).catcher(Catcher::default().hoop(catch_errors));
    if !server.cors_origins.is_empty() {
        service = service.hoop(cors(&server.cors_origins));
    }
    service
}

/// CORS for the configured origins (`*` for any); preflights are answered for every route.
fn cors(origins: &[String]) -> salvo::cors::CorsHandler {
    use salvo::cors::{AllowHeaders, AllowOrigin, Cors};
    let origin = match origins.iter().any(|o| o == "*") {
        true => AllowOrigin::any(),
        false => AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok())),
    };
    Cors::new()
        .allow_origin(origin)
        .allow_methods(vec![Method::GET, Method::POST, Method::PATCH, Method::DELETE, Method::OPTIONS])
        .allow_headers(AllowHeaders::list(
            ["authorization", "content-type", "x-api-key", "x-request-id", "anthropic-version", "anthropic-beta"]
                .map(|h| h.parse().expect("a valid header name")),
        ))
        .expose_headers(["x-request-id", "x-wisp-session-id", "x-wisp-pruned-messages"].map(|h| h.parse().expect("a valid header name")))
        .max_age(600)
        .into_handler()
}

/// A route's time limit: past it the request ends with a 503 `request_timeout`.
#[derive(Clone, Copy)]
struct Deadline(u64);

#[async_trait::async_trait]
impl Handler for Deadline {
    async fn handle(&self, req: &mut Request, depot: &mut Depot, res: &mut Response, ctrl: &mut FlowCtrl) {
        let limit = std::time::Duration::from_secs(self.0);
        if tokio::time::timeout(limit, ctrl.call_next(req, depot, res)).await.is_err() {
            ctrl.skip_rest();
            ApiError::timed_out(self.0).render(res);
        }
    }
}

fn state(depot: &Depot) -> Arc<AppState> {
    depot.get_typed::<Arc<AppState>>().expect("state is injected on the root router; this is a bug").clone()
}

/// Bounded route label for metrics (never the raw path).
fn route_label(path: &str) -> &'static str {
    match path {
        "/health" => "health",
        "/ready" => "ready",
        "/metrics" => "metrics",
        "/v1/models" => "models",
        "/v1/chat/completions" => "chat_completions",
        "/v1/completions" => "completions",
        "/v1/chat/ws" => "chat_ws",
        "/v1/messages" => "messages",
        "/v1/messages/count_tokens" => "count_tokens",
        "/openapi.json" => "openapi",
        p if p == "/docs" || p.starts_with("/docs/") => "docs",
        "/" | "/app.js" | "/style.css" | "/favicon.svg" => "web",
        "/admin/plugins" | "/admin/plugins/reload" => "admin",
        p if p.starts_with("/admin/models/") => "admin",
        p if p.starts_with("/v1/models/") => "model",
        p if p.starts_with("/v1/sessions") => "sessions",
        p if p == "/v1/responses" || p.starts_with("/v1/responses/") => "responses",
        _ => "other",
    }
}

/// The longest accepted incoming `x-request-id`.
const MAX_REQUEST_ID: usize = 128;

/// The caller's `x-request-id` when it is a sane token, else a new one.
fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= MAX_REQUEST_ID)
        .filter(|id| id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

/// Per request: an id (echoed as `x-request-id`, on every log line through the `request`
/// span, handed to the engine's spans), counts by route and status, errors by code, and
/// the time to the response head (streams continue after it).
#[handler]
async fn track(req: &mut Request, depot: &mut Depot, res: &mut Response, ctrl: &mut FlowCtrl) {
    let started = Instant::now();
    let route = route_label(req.uri().path());
    let id = request_id(req);
    res.add_header("x-request-id", &id, true).ok();
    let span = tracing::info_span!("request", id = %id, route, method = %req.method());
    ctrl.call_next(req, depot, res).instrument(span.clone()).await;
    let state = state(depot);
    let status = res.status_code.unwrap_or(StatusCode::OK);
    state.metrics.requests.with_label_values(&[route, status.as_str()]).inc();
    state.metrics.request_seconds.with_label_values(&[route]).observe(started.elapsed().as_secs_f64());
    if let Some(error::ErrorLabel(code)) = res.extensions.get::<error::ErrorLabel>() {
        state.metrics.count_error(code);
    }
    span.in_scope(|| tracing::info!(status = status.as_u16(), ms = started.elapsed().as_millis() as u64, "response"));
}

/// The process is up (Kubernetes liveness).
#[endpoint(tags("operations"), responses((status_code = 200, description = "The process is up", body = openapi::Status)))]
async fn health(res: &mut Response) {
    res.render(Json(json!({"status": "ok"})));
}

/// 200 once the default model is loaded and the store answers, 503 otherwise (Kubernetes
/// readiness).
#[endpoint(tags("operations"), status_codes(200, 503), responses((status_code = 200, description = "Ready to serve", body = openapi::Status)))]
async fn ready(depot: &mut Depot) -> Result<Json<serde_json::Value>, ApiError> {
    let state = state(depot);
    if state.shutdown.is_draining() {
        return Err(ApiError::not_ready("the server is shutting down"));
    }
    state.registry.readiness().map_err(ApiError::not_ready)?;
    if let Err(e) = state.store.ping().await {
        return Err(ApiError::not_ready(format!("the session store is unreachable: {e}")));
    }
    Ok(Json(json!({"status": "ready", "model": state.registry.default_id()})))
}

/// Prometheus metrics (text exposition format), all named `wisp_*`.
#[endpoint(tags("operations"), responses((status_code = 200, description = "Prometheus text", body = String, content_type = "text/plain")))]
async fn metrics(depot: &mut Depot, res: &mut Response) {
    let body = state(depot).metrics.render();
    res.add_header("content-type", "text/plain; version=0.0.4; charset=utf-8", true).ok();
    res.render(body);
}

fn model_json(info: &crate::engine::ModelInfo) -> serde_json::Value {
    json!({
        "id": info.id,
        "object": "model",
        "created": info.created,
        "owned_by": "wisp",
        "loaded": info.loaded,
        "keep_alive": info.keep_alive,
        "chat_template": info.chat_template,
    })
}

/// The configured models (the plugin chain runs first, as on every API route).
#[endpoint(tags("models"), status_codes(200, 401, 403, 429), responses((status_code = 200, description = "The models", body = openapi::ModelList)))]
async fn list_models(req: &mut Request, depot: &mut Depot) -> Result<Json<serde_json::Value>, ApiError> {
    let state = state(depot);
    caller(req).identify(&state, "models").await?;
    let data: Vec<_> = state.registry.list().iter().map(model_json).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// One model.
#[endpoint(tags("models"), status_codes(200, 401, 403, 404, 429), parameters(("id" = String, Path, description = "The model id")), responses((status_code = 200, description = "The model", body = openapi::Model)))]
async fn get_model(req: &mut Request, depot: &mut Depot) -> Result<Json<serde_json::Value>, ApiError> {
    let state = state(depot);
    caller(req).identify(&state, "models").await?;
    let id: String = req.param("id").unwrap_or_default();
    let info = state.registry.info(&id).ok_or_else(|| ApiError::model_not_found(&id))?;
    Ok(Json(model_json(&info)))
}

/// Chat completion (OpenAI-compatible). `stream: true` answers with server-sent events
/// (`chat.completion.chunk` objects, then `data: [DONE]`); `session_id` chats in a
/// server-side session (send only the new messages).
#[endpoint(
    tags("chat"),
    status_codes(200, 400, 401, 403, 404, 413, 429, 500, 503),
    request_body(content = types::ChatCompletionRequest, description = "A chat completions body"),
    responses((status_code = 200, description = "The reply, or its event stream", content(("application/json" = openapi::ChatCompletion), ("text/event-stream" = String))))
)]
async fn chat_completions(req: &mut Request, depot: &mut Depot, res: &mut Response) -> Result<(), ApiError> {
    let state = state(depot);
    let body = read_body(req, &state).await?;
    let (request, sampling) = types::parse_request::<ChatCompletionRequest>(&body)?;
    let generation = pipeline::start_chat(&state, &caller(req), request, sampling).await?;
    if let Some(session) = &generation.session {
        res.add_header("x-wisp-session-id", &session.id, true).ok();
        res.add_header("x-wisp-pruned-messages", session.pruned_messages.to_string(), true).ok();
    }
    respond(res, &state, Endpoint::Chat, generation).await
}

/// Text completion (OpenAI-compatible legacy endpoint); `stream: true` gives SSE.
#[endpoint(
    tags("completions"),
    status_codes(200, 400, 401, 403, 404, 413, 429, 500, 503),
    request_body(content = types::CompletionRequest, description = "A completions body"),
    responses((status_code = 200, description = "The completion, or its event stream", content(("application/json" = openapi::Completion), ("text/event-stream" = String))))
)]
async fn completions(req: &mut Request, depot: &mut Depot, res: &mut Response) -> Result<(), ApiError> {
    let state = state(depot);
    let body = read_body(req, &state).await?;
    let (request, sampling) = types::parse_request::<CompletionRequest>(&body)?;
    let generation = pipeline::start_completion(&state, &caller(req), request, sampling).await?;
    respond(res, &state, Endpoint::Completion, generation).await
}

/// Who is calling, as plugins may see it: a few headers and the peer's address.
fn caller(req: &Request) -> Caller {
    let headers = POLICY_HEADERS
        .iter()
        .filter_map(|name| {
            let value = req.headers().get(*name)?.to_str().ok()?;
            Some(policy::Header { name: name.to_string(), value: value.to_string() })
        })
        .collect();
    let client_addr = req.remote_addr().clone().into_std().map(|a| a.ip().to_string()).unwrap_or_default();
    Caller { headers, client_addr }
}

/// `/admin/*` needs `Authorization: Bearer <admin.key>`; without a configured key the
/// routes are off.
#[handler]
async fn admin_auth(req: &mut Request, depot: &mut Depot, res: &mut Response, ctrl: &mut FlowCtrl) {
    let state = state(depot);
    let presented = req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let verdict = match (&state.config.admin.key, presented) {
        (None, _) => {
            Err(ApiError::admin(StatusCode::FORBIDDEN, "admin_disabled", "The admin routes are off: set admin.key (WISP_ADMIN__KEY)"))
        }
        (Some(key), Some(given)) if same_secret(key, given.trim()) => Ok(()),
        (Some(_), _) => Err(ApiError::admin(StatusCode::UNAUTHORIZED, "invalid_admin_key", "A valid admin key is required")),
    };
    if let Err(e) = verdict {
        e.render(res);
        ctrl.skip_rest();
    }
}

/// Compares a presented secret with the configured one in time that depends on neither:
/// both are hashed, and the digests compared without an early exit.
fn same_secret(expected: &str, given: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(expected.as_bytes()), Sha256::digest(given.as_bytes()));
    a.iter().zip(b.iter()).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The plugin chain now serving (admin key).
#[endpoint(tags("admin"), status_codes(200, 401, 403), responses((status_code = 200, description = "The chain", body = openapi::PluginChain)))]
async fn list_plugins(depot: &mut Depot) -> Json<serde_json::Value> {
    let chain = state(depot).policies.current();
    Json(json!({"generation": chain.generation(), "plugins": chain.info()}))
}

/// Loads a model now (admin key); answers once it is loaded.
#[endpoint(tags("admin"), status_codes(200, 401, 403, 404, 500), parameters(("id" = String, Path, description = "The model id")), responses((status_code = 200, description = "Loaded", body = openapi::ModelState)))]
async fn load_model(req: &mut Request, depot: &mut Depot) -> Result<Json<serde_json::Value>, ApiError> {
    let state = state(depot);
    let id: String = req.param("id").unwrap_or_default();
    let started = Instant::now();
    state.registry.get(&id).await?;
    Ok(Json(json!({"id": id, "loaded": true, "seconds": started.elapsed().as_secs_f64()})))
}

/// Unloads a model (admin key): requests running on it finish first, then its memory goes
/// back to the OS; the next request for it loads it again.
#[endpoint(tags("admin"), status_codes(200, 401, 403, 404), parameters(("id" = String, Path, description = "The model id")), responses((status_code = 200, description = "Unloaded", body = openapi::ModelState)))]
async fn unload_model(req: &mut Request, depot: &mut Depot) -> Result<Json<serde_json::Value>, ApiError> {
    let state = state(depot);
    let id: String = req.param("id").unwrap_or_default();
    let was_loaded = state.registry.unload(&id).await?;
    Ok(Json(json!({"id": id, "loaded": false, "was_loaded": was_loaded})))
}

/// Reloads the plugin chain from the config file (admin key); the old chain keeps serving
/// if the new one fails to load.
#[endpoint(tags("admin"), status_codes(200, 400, 401, 403), responses((status_code = 200, description = "The new chain", body = openapi::PluginChain)))]
async fn reload_plugins(depot: &mut Depot) -> Result<Json<serde_json::Value>, ApiError> {
    let policies = state(depot).policies.clone();
    match policies.reload().await {
        Ok(info) => Ok(Json(json!({"reloaded": true, "generation": policies.current().generation(), "plugins": info}))),
        Err(e) => Err(ApiError::invalid_code(None, "reload_failed", e.to_string())),
    }
}

async fn read_body(req: &mut Request, state: &AppState) -> Result<bytes::Bytes, ApiError> {
    let limit = state.config.server.max_body_bytes as usize;
    match req.payload_with_max_size(limit).await {
        Ok(body) => Ok(body.clone()),
        Err(salvo::http::ParseError::PayloadTooLarge) => Err(ApiError {
            message: format!("The request body is larger than the limit of {limit} bytes"),
            ..ApiError::from_status(StatusCode::PAYLOAD_TOO_LARGE)
        }),
        Err(e) => Err(ApiError::invalid_code(None, "invalid_body", format!("The request body could not be read: {e}"))),
    }
}

/// Sends the generation as SSE or as one JSON response.
async fn respond(res: &mut Response, state: &AppState, endpoint: Endpoint, generation: Generation) -> Result<(), ApiError> {
    let Generation { model, mut output, stream, include_usage, logprobs, tools, echo, session, .. } = generation;
    let meta = ResponseMeta::new(endpoint, &model, include_usage, logprobs, tools);
    if !stream {
        let mut collector = Collector::new(meta, echo.as_deref());
        while let Some((events, done)) = output.next_before(&state.shutdown).await? {
            for event in events {
                collector.push(event)?;
            }
            if done {
                break;
            }
        }
        let mut body = collector.finish()?;
        if let Some(session) = session {
            body["session_id"] = json!(session.id);
            body["pruned_messages"] = json!(session.pruned_messages);
        }
        res.render(Json(body));
        return Ok(());
    }
    let mut framer = StreamFramer::new(meta);
    let first = framer.start(echo.as_deref());
    // Dropping this stream (client gone) drops the engine's stream, which cancels the
    // generation; a plugin's stop ends it the same way.
    let shutdown = state.shutdown.clone();
    let events = futures_util::stream::unfold((output, framer), move |(mut output, mut framer)| {
        let shutdown = shutdown.clone();
        async move {
            if framer.is_done() {
                return None;
            }
            let payloads = match output.next_before(&shutdown).await {
                Ok(Some((events, _))) => events.into_iter().flat_map(|e| framer.push(e)).collect(),
                Ok(None) => framer.error(&ApiError::engine_failure("the engine ended the stream without finishing".into())),
                Err(e) => framer.error(&e),
            };
            Some((payloads, (output, framer)))
        }
    });
    let events = futures_util::stream::iter([first])
        .chain(events)
        .flat_map(|payloads| futures_util::stream::iter(payloads.into_iter().map(|p| Ok::<_, Infallible>(SseEvent::default().text(p)))));
    sse::stream(res, events);
    Ok(())
}

/// Catcher hoop: any error status without a body (unmatched route, wrong method, salvo's
/// own limits) gets the OpenAI shape too (Anthropic's on its routes).
#[handler]
pub async fn catch_errors(req: &mut Request, res: &mut Response, ctrl: &mut FlowCtrl) {
    let status = res.status_code.unwrap_or(StatusCode::NOT_FOUND);
    if status.is_client_error() || status.is_server_error() {
        match anthropic::is_anthropic_path(req.uri().path()) {
            true => anthropic::catch(status, res),
            false => ApiError::from_status(status).render(res),
        }
        ctrl.skip_rest();
    }
}
