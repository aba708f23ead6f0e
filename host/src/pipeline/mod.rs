//! A request's flow, whatever transport carried it (HTTP, SSE, WebSocket): resolve the
//! model's [`Backend`], load and prune a session's history, tokenize, run the plugin
//! chain's `on-request`, check the context and the session's owner, start the
//! generation, and drive its output through the plugins into the session turn.
//!
//! The api only parses and frames: it hands a parsed request to [`chat::start_chat`] or
//! [`completion::start_completion`] and frames the [`Generation`] that comes back. What a
//! request owes when it ends (`on-finish` for every plugin that saw it, the turn written
//! whole) is owned here, by the [`output`] driver, so no transport can lose it.

pub mod chat;
pub mod completion;
pub mod output;
pub mod shape;
pub mod tools;
pub mod turn;

use std::time::Instant;

use crate::engine::{Backend, GenerateRequest, Prompt};
use crate::error::ApiError;
use crate::policy::{self, Decision, PolicySession};
use crate::request::ValidParams;
pub use chat::{Caller, count_chat_tokens, start_chat, start_owned_chat};
pub use completion::start_completion;
pub use output::Output;

/// A started generation, for a transport to frame.
pub struct Generation {
    /// The model that serves it.
    pub model: String,
    pub output: Output,
    pub stream: bool,
    /// The client asked for usage on the stream (`stream_options.include_usage`).
    pub include_usage: bool,
    pub logprobs: bool,
    /// The reply is the tool grammar's JSON, to be read back into `tool_calls` with these
    /// ids.
    pub tools: Option<tools::CallIds>,
    /// The prompt text to echo before the completion (legacy completions' `echo`).
    pub echo: Option<String>,
    /// Set for a session turn.
    pub session: Option<SessionTurnInfo>,
    /// Who is calling, as the plugins said (`anonymous` without auth).
    pub principal: String,
}

#[derive(Debug, Clone)]
pub struct SessionTurnInfo {
    pub id: String,
    /// History messages left out to fit the context.
    pub pruned_messages: usize,
}

/// Runs the chain's `on-request`; a denial becomes the response.
async fn decide(session: &mut PolicySession, request: policy::Request) -> Result<policy::Request, ApiError> {
    match session.on_request(request).await? {
        Decision::Allow(request) => Ok(request),
        Decision::Deny(denial) => Err(ApiError::denied(denial)),
    }
}

/// Takes the sampling settings the plugins left (the policy runtime has checked a
/// rewrite against the rules a client's request keeps: policy/checks.rs).
fn apply_sampling(params: &mut ValidParams, sampling: policy::Sampling) {
    params.sampling.temperature = sampling.temperature;
    params.sampling.top_p = sampling.top_p;
    params.max_tokens = sampling.max_tokens.map(|n| n as usize);
    params.stop = sampling.stop;
}

/// Runs CPU work (templating, tokenizing) off the async executor.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::engine_failure(format!("tokenizer task failed: {e}")))
}

/// The vocabulary size requests are checked against: any id where an upstream checks them.
fn vocab_of(model: &dyn Backend) -> usize {
    model.vocab_size().unwrap_or(usize::MAX)
}

/// Checks the prompt against the context (where the backend knows it; an upstream checks
/// its own) and settles `max_tokens`.
fn generate_request(
    model: &dyn Backend,
    prompt: Prompt,
    params: &ValidParams,
    default_max_tokens: usize,
    prompt_param: &str,
) -> Result<GenerateRequest, ApiError> {
    let n = prompt.len();
    if prompt.is_empty() || n == 0 {
        return Err(ApiError::invalid(prompt_param, "the prompt is empty after tokenization"));
    }
    if params.sampling.logprobs.is_some() && model.is_remote() {
        return Err(ApiError::unsupported(
            "logprobs",
            format!("`{}` is served by upstreams (proxy mode), which report no logprobs through wisp", model.id()),
        ));
    }
    let Some(context) = model.context_length() else {
        return Ok(job(prompt, params.max_tokens.unwrap_or(default_max_tokens), params));
    };
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
    Ok(job(prompt, max_tokens, params))
}

fn job(prompt: Prompt, max_tokens: usize, params: &ValidParams) -> GenerateRequest {
    GenerateRequest {
        prompt,
        max_tokens,
        sampling: params.sampling.clone(),
        stop: params.stop.clone(),
        constraint: params.constraint.clone(),
        received: Instant::now(),
        span: tracing::Span::current(),
    }
}
