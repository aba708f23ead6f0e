//! The HTTP API: OpenAI-compatible routes, SSE streaming, health, readiness and metrics.
//!
//! Handlers parse and validate (types.rs), resolve the model, tokenize off the async
//! executor, check the context, schedule, and then frame the engine's events
//! (openai.rs). Every failure is an [`ApiError`], rendered in one place (error.rs).

pub mod error;
pub mod openai;
pub mod types;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use salvo::affix_state;
use salvo::catcher::Catcher;
use salvo::http::StatusCode;
use salvo::prelude::*;
use salvo::sse::{self, SseEvent};
use serde_json::json;

use crate::config::Config;
use crate::engine::{GenerateRequest, LoadedModel, Registry, TokenStream};
use crate::telemetry::Metrics;
use error::ApiError;
use openai::{Collector, Endpoint, ResponseMeta, StreamFramer};
use types::{ValidParams, ValidPrompt};

/// What every handler shares.
pub struct AppState {
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
}

/// Legacy completions default to 16 new tokens when `max_tokens` is absent (OpenAI's
/// documented default).
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

/// The salvo service: routes, shared state, metrics and the OpenAI-shaped catcher.
pub fn service(state: Arc<AppState>) -> Service {
    let router = Router::new()
        .hoop(affix_state::inject(state))
        .hoop(track)
        .push(Router::with_path("health").get(health))
        .push(Router::with_path("ready").get(ready))
        .push(Router::with_path("metrics").get(metrics))
        .push(
            Router::with_path("v1")
                .push(Router::with_path("models").get(list_models))
                .push(Router::with_path("models/{**id}").get(get_model))
                .push(Router::with_path("chat/completions").post(chat_completions))
                .push(Router::with_path("completions").post(completions)),
        );
    Service::new(router).catcher(Catcher::default().hoop(error::catch_errors))
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
        p if p.starts_with("/v1/models/") => "model",
        _ => "other",
    }
}

/// Counts requests by route and status and times them (to the response head for streams).
#[handler]
async fn track(req: &mut Request, depot: &mut Depot, res: &mut Response, ctrl: &mut FlowCtrl) {
    let started = Instant::now();
    let route = route_label(req.uri().path());
    ctrl.call_next(req, depot, res).await;
    let state = state(depot);
    let status = res.status_code.unwrap_or(StatusCode::OK);
    state.metrics.requests.with_label_values(&[route, status.as_str()]).inc();
    state.metrics.request_seconds.with_label_values(&[route]).observe(started.elapsed().as_secs_f64());
}

#[handler]
async fn health(res: &mut Response) {
    res.render(Json(json!({"status": "ok"})));
}

/// 200 once the default model is loaded, 503 before (Kubernetes readiness).
#[handler]
async fn ready(depot: &mut Depot) -> Result<Json<serde_json::Value>, ApiError> {
    let state = state(depot);
    match state.registry.is_ready() {
        true => Ok(Json(json!({"status": "ready", "model": state.registry.default_id()}))),
        false => Err(ApiError::not_ready(format!("the default model `{}` is still loading", state.registry.default_id()))),
    }
}

#[handler]
async fn metrics(depot: &mut Depot, res: &mut Response) {
    let body = state(depot).metrics.render();
    res.add_header("content-type", "text/plain; version=0.0.4; charset=utf-8", true).ok();
    res.render(body);
}

fn model_json(info: &crate::engine::ModelInfo) -> serde_json::Value {
    json!({"id": info.id, "object": "model", "created": info.created, "owned_by": "wisp", "loaded": info.loaded})
}

#[handler]
async fn list_models(depot: &mut Depot) -> Json<serde_json::Value> {
    let data: Vec<_> = state(depot).registry.list().iter().map(model_json).collect();
    Json(json!({"object": "list", "data": data}))
}

#[handler]
async fn get_model(req: &mut Request, depot: &mut Depot) -> Result<Json<serde_json::Value>, ApiError> {
    let id: String = req.param("id").unwrap_or_default();
    let info = state(depot).registry.info(&id).ok_or_else(|| ApiError::model_not_found(&id))?;
    Ok(Json(model_json(&info)))
}

#[handler]
async fn chat_completions(req: &mut Request, depot: &mut Depot, res: &mut Response) -> Result<(), ApiError> {
    let state = state(depot);
    let body = read_body(req, &state).await?;
    let (request, sampling) = types::parse_request::<types::ChatCompletionRequest>(&body)?;
    let model = state.model(request.model.as_deref()).await?;
    let valid = types::validate_chat(request, sampling, model.vocab_size(), &state.config.limits)?;
    let prompt = {
        let model = model.clone();
        let messages = valid.messages;
        blocking(move || -> Result<Vec<u32>, ApiError> { Ok(model.encode(&model.render_chat(&messages)?, false)) }).await??
    };
    let default_max = state.config.limits.default_max_tokens;
    let job = generate_request(&model, prompt, &valid.params, default_max, "messages")?;
    let meta = ResponseMeta::new(Endpoint::Chat, &model.id, valid.params.include_usage, valid.logprobs);
    let stream = model.schedule(job)?;
    respond(res, meta, stream, valid.params.stream, None).await
}

#[handler]
async fn completions(req: &mut Request, depot: &mut Depot, res: &mut Response) -> Result<(), ApiError> {
    let state = state(depot);
    let body = read_body(req, &state).await?;
    let (request, sampling) = types::parse_request::<types::CompletionRequest>(&body)?;
    let model = state.model(request.model.as_deref()).await?;
    let valid = types::validate_completion(request, sampling, model.vocab_size(), &state.config.limits)?;
    let (prompt, prompt_text) = match valid.prompt {
        ValidPrompt::Text(text) => {
            let model = model.clone();
            blocking(move || (model.encode(&text, true), text)).await?
        }
        ValidPrompt::Tokens(ids) => {
            let text = model.decode(&ids);
            (ids, text)
        }
    };
    let job = generate_request(&model, prompt, &valid.params, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt")?;
    let meta = ResponseMeta::new(Endpoint::Completion, &model.id, valid.params.include_usage, valid.logprobs.is_some());
    let stream = model.schedule(job)?;
    let echo = valid.echo.then_some(prompt_text);
    respond(res, meta, stream, valid.params.stream, echo).await
}

impl AppState {
    /// The model a request names, or the default one.
    async fn model(&self, id: Option<&str>) -> Result<Arc<LoadedModel>, ApiError> {
        let id = id.unwrap_or(self.registry.default_id());
        Ok(self.registry.get(id).await?)
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

/// Runs CPU work (templating, tokenizing) off the async executor.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::engine_failure(format!("tokenizer task failed: {e}")))
}

/// Checks the prompt against the context and settles `max_tokens`.
fn generate_request(
    model: &LoadedModel,
    prompt: Vec<u32>,
    params: &ValidParams,
    default_max_tokens: usize,
    prompt_param: &str,
) -> Result<GenerateRequest, ApiError> {
    let context = model.context_length;
    let n = prompt.len();
    if n == 0 {
        return Err(ApiError::invalid(prompt_param, "the prompt is empty after tokenization"));
    }
    if n >= context {
        return Err(ApiError::invalid_code(
            Some(prompt_param),
            "context_length_exceeded",
            format!(
                "This model's maximum context length is {context} tokens. However, your {prompt_param} resulted in {n} tokens. \
                 Please reduce the length of the {prompt_param}."
            ),
        ));
    }
    let max_tokens = match params.max_tokens {
        Some(max) if n + max > context => {
            return Err(ApiError::invalid_code(
                Some("max_tokens"),
                "context_length_exceeded",
                format!(
                    "This model's maximum context length is {context} tokens. However, you requested {} tokens \
                     ({n} in the {prompt_param}, {max} in the completion). Please reduce the length of the {prompt_param} \
                     or the completion.",
                    n + max
                ),
            ));
        }
        Some(max) => max,
        None => default_max_tokens.min(context - n),
    };
    Ok(GenerateRequest {
        prompt,
        max_tokens,
        sampling: params.sampling.clone(),
        stop: params.stop.clone(),
        received: Instant::now(),
    })
}

/// Sends the generation as SSE or as one JSON response.
async fn respond(
    res: &mut Response,
    meta: ResponseMeta,
    mut stream: TokenStream,
    streaming: bool,
    echo: Option<String>,
) -> Result<(), ApiError> {
    if !streaming {
        let mut collector = Collector::new(meta, echo.as_deref());
        while let Some(event) = stream.recv().await {
            collector.push(event)?;
        }
        res.render(Json(collector.finish()?));
        return Ok(());
    }
    let mut framer = StreamFramer::new(meta);
    let first = framer.start(echo.as_deref());
    // Dropping this stream (client gone) drops `stream`, which cancels the generation.
    let events = futures_util::stream::unfold((stream, framer), |(mut stream, mut framer)| async move {
        if framer.is_done() {
            return None;
        }
        let payloads = match stream.recv().await {
            Some(event) => framer.push(event),
            None => framer.error(&ApiError::engine_failure("the engine ended the stream without finishing".into())),
        };
        Some((payloads, (stream, framer)))
    });
    let events = futures_util::stream::iter([first])
        .chain(events)
        .flat_map(|payloads| futures_util::stream::iter(payloads.into_iter().map(|p| Ok::<_, Infallible>(SseEvent::default().text(p)))));
    sse::stream(res, events);
    Ok(())
}
