//! A chat request, from any transport (HTTP, SSE, WebSocket), to a started generation:
//! resolve the model, load and prune the session's history, tokenize, run the plugin
//! chain, check the session's owner, start. The transports only frame what
//! [`start_chat`] returns, so governance and sessions are the same on all of them.

use std::sync::Arc;

use super::output::{Governed, Output};
use super::shape::Shape;
use super::tools::{self, CallIds};
use super::turn::TurnRecord;
use super::{Generation, SessionTurnInfo, apply_sampling, blocking, decide, generate_request, vocab_of};
use crate::engine::template::TemplateMessage;
use crate::engine::{Backend, Prompt};
use crate::error::ApiError;
use crate::policy;
use crate::request::{self, ChatCompletionRequest, SamplingFields, ValidParams};
use crate::state::AppState;
use crate::store::{ANONYMOUS, Session, SessionStore, TurnMessage};

/// Who is calling, as the transport knows it: what plugins may see of the request (the
/// api fills it from the request's headers and peer address).
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub headers: Vec<policy::Header>,
    pub client_addr: String,
}

impl Caller {
    /// The same caller presenting `key` as a bearer token (WebSocket frames carry the key,
    /// since browsers cannot set headers on a WebSocket).
    pub fn with_api_key(&self, key: &str) -> Caller {
        let mut caller = self.clone();
        caller.headers.retain(|h| h.name != "authorization");
        caller.headers.push(policy::Header { name: "authorization".into(), value: format!("Bearer {key}") });
        caller
    }

    /// The request as plugins see it.
    pub fn policy_request(
        &self,
        route: &str,
        model: &str,
        messages: &[TemplateMessage],
        params: Option<&ValidParams>,
        prompt_tokens: usize,
    ) -> policy::Request {
        policy::Request {
            route: route.to_string(),
            model: model.to_string(),
            messages: messages.iter().map(|m| policy::Message { role: m.role.clone(), content: m.content.clone() }).collect(),
            sampling: match params {
                Some(params) => policy::Sampling {
                    temperature: params.sampling.temperature,
                    top_p: params.sampling.top_p,
                    max_tokens: params.max_tokens.map(|n| n.min(u32::MAX as usize) as u32),
                    stop: params.stop.clone(),
                },
                None => policy::Sampling { temperature: 1.0, top_p: 1.0, max_tokens: None, stop: Vec::new() },
            },
            principal: None,
            headers: self.headers.clone(),
            client_addr: self.client_addr.clone(),
            prompt_tokens: prompt_tokens.min(u32::MAX as usize) as u32,
            tools: Vec::new(),
            tool_choice: policy::ToolChoice::None,
            parallel_tool_calls: true,
            response_format: policy::ResponseFormat::Text,
        }
    }

    /// The principal for a request that generates nothing (the sessions and models
    /// routes): the chain runs `on-request` with no messages and no model, so auth and rate
    /// limits apply as to chat.
    pub async fn identify(&self, state: &AppState, route: &str) -> Result<String, ApiError> {
        self.identify_for(state, route, "").await
    }

    /// [`Caller::identify`] for a route that names `model` (plugins' per-model rules apply).
    pub async fn identify_for(&self, state: &AppState, route: &str, model: &str) -> Result<String, ApiError> {
        let mut session = state.policies.current().start().await?;
        if session.is_empty() {
            return Ok(ANONYMOUS.to_string());
        }
        let request = self.policy_request(route, model, &[], None, 0);
        let allowed = decide(&mut session, request).await?;
        session.finish(policy::Finish { reason: "stop".into(), usage: policy::Usage { prompt_tokens: 0, completion_tokens: 0 } }).await?;
        Ok(principal_of(&allowed))
    }
}

pub(super) fn principal_of(request: &policy::Request) -> String {
    request.principal.clone().filter(|p| !p.is_empty()).unwrap_or_else(|| ANONYMOUS.to_string())
}

/// A session's history with the new messages, pruned to fit.
struct Conversation {
    messages: Vec<TemplateMessage>,
    prompt: Prompt,
    pruned: usize,
}

pub async fn start_chat(
    state: &AppState,
    caller: &Caller,
    request: ChatCompletionRequest,
    sampling: SamplingFields,
) -> Result<Generation, ApiError> {
    start_owned_chat(state, caller, request, sampling, None).await
}

/// [`start_chat`] for a conversation that belongs to `owner` (a stored response chain):
/// any other principal is told it does not exist, before anything is generated.
pub async fn start_owned_chat(
    state: &AppState,
    caller: &Caller,
    request: ChatCompletionRequest,
    sampling: SamplingFields,
    owner: Option<(&str, ApiError)>,
) -> Result<Generation, ApiError> {
    let session = match &request.session_id {
        Some(id) => Some(state.store.find(id).await.map_err(ApiError::from)?),
        None => None,
    };
    let model_id = request.model.clone().or_else(|| session.as_ref().map(|s| s.model.clone()));
    let model = state.backend(model_id.as_deref()).await?;
    let mut valid = request::validate_chat(request, sampling, vocab_of(model.as_ref()), &state.config.limits)?;
    let mut shape = std::mem::take(&mut valid.shape);
    let new_messages = std::mem::take(&mut valid.messages);
    let conversation = match &session {
        Some(session) => {
            for (i, m) in new_messages.iter().enumerate() {
                let calls = m.tool_calls.as_ref().map(|c| c.to_string()).unwrap_or_default();
                state
                    .store
                    .check_message(&m.content, "messages")
                    .and_then(|()| state.store.check_message(&calls, "messages"))
                    .map_err(|e| ApiError::from(e).with_param(format!("messages[{i}]")))?;
            }
            let reserve = valid.params.max_tokens.unwrap_or(state.config.limits.default_max_tokens);
            session_conversation(&state.store, &model, session, tools::template_messages(&new_messages), &shape, reserve).await?
        }
        None => {
            let messages = tools::template_messages(&new_messages);
            let prompt = encode_chat(&model, &shape, messages.clone()).await?;
            Conversation { messages, prompt, pruned: 0 }
        }
    };
    let mut messages = conversation.messages;
    let mut prompt = conversation.prompt;
    let mut principal = ANONYMOUS.to_string();
    let governed = match state.policies.current().start().await? {
        s if s.is_empty() => None,
        mut policies => {
            let mut request = caller.policy_request("chat", model.id(), &messages, Some(&valid.params), prompt.len());
            shape.to_policy(&mut request);
            let allowed = decide(&mut policies, request).await?;
            principal = principal_of(&allowed);
            // The chain has checked a rewrite by the rules a client's request keeps.
            let before = shape.clone();
            shape = shape.after_policy(&allowed).map_err(ApiError::engine_failure)?;
            let rewrote = allowed.messages.iter().map(|m| (&m.role, &m.content)).ne(messages.iter().map(|m| (&m.role, &m.content)));
            if rewrote {
                messages = allowed.messages.into_iter().map(|m| TemplateMessage { role: m.role, content: m.content }).collect();
            }
            if rewrote || shape != before {
                prompt = encode_chat(&model, &shape, messages.clone()).await?;
            }
            apply_sampling(&mut valid.params, allowed.sampling);
            Some(policies)
        }
    };
    // Only now is the principal known; someone else's session is "not found", the same
    // answer as for an id that never existed.
    if let Some(session) = &session
        && session.principal != principal
    {
        return Err(crate::store::StoreError::NotFound(session.id.clone()).into());
    }
    if let Some((owner, not_found)) = owner
        && owner != principal
    {
        return Err(not_found);
    }
    valid.params.constraint = shape.constraint();
    let job = generate_request(model.as_ref(), prompt, &valid.params, state.config.limits.default_max_tokens, "messages")?;
    let prompt_tokens = job.prompt.len();
    let governed = governed.map(|session| Governed::new(session, prompt_tokens));
    let call_ids = shape.calls_tools().then(CallIds::new);
    let turn = session.as_ref().map(|s| TurnRecord::new(state.store.clone(), s.id.clone(), new_messages, call_ids.clone()));
    let stream = model.clone().generate(job).await?;
    Ok(Generation {
        model: model.id().to_string(),
        output: Output::new(stream, governed, turn, prompt_tokens, Some(model.clone())),
        stream: valid.params.stream,
        include_usage: valid.params.include_usage,
        logprobs: valid.logprobs,
        tools: call_ids,
        echo: None,
        session: session.map(|s| SessionTurnInfo { id: s.id, pruned_messages: conversation.pruned }),
        principal,
    })
}

/// The prompt tokens a chat request would take (template and tool prompt included),
/// without generating. The chain runs as on the models route (auth, rate limits; route
/// `count_tokens`).
pub async fn count_chat_tokens(
    state: &AppState,
    caller: &Caller,
    request: ChatCompletionRequest,
    sampling: SamplingFields,
) -> Result<usize, ApiError> {
    let model_id = request.model.clone().unwrap_or_else(|| state.registry.default_id().to_string());
    caller.identify_for(state, "count_tokens", &model_id).await?;
    let model = state.backend(Some(&model_id)).await?;
    let valid = request::validate_chat(request, sampling, vocab_of(model.as_ref()), &state.config.limits)?;
    Ok(encode_chat(&model, &valid.shape, tools::template_messages(&valid.messages)).await?.len())
}

/// The backend's prompt of a conversation, with the tool prompt the shape adds (rendered
/// and tokenized off the async executor for the local engine).
pub async fn encode_chat(model: &Arc<dyn Backend>, shape: &Shape, messages: Vec<TemplateMessage>) -> Result<Prompt, ApiError> {
    let (model, shape) = (model.clone(), shape.clone());
    blocking(move || render(model.as_ref(), &shape, messages)).await?
}

fn render(model: &dyn Backend, shape: &Shape, messages: Vec<TemplateMessage>) -> Result<Prompt, ApiError> {
    Ok(model.chat_prompt(shape.prompt_messages(messages))?)
}

/// The session's system prompt, its history and the new messages, leaving out the oldest
/// whole turns until the prompt and `reserve` completion tokens fit the context. The system
/// prompt and the new messages are always kept.
async fn session_conversation(
    store: &SessionStore,
    model: &Arc<dyn Backend>,
    session: &Session,
    new_messages: Vec<TemplateMessage>,
    shape: &Shape,
    reserve: usize,
) -> Result<Conversation, ApiError> {
    if let Some(i) = new_messages.iter().position(|m| m.role == "system") {
        return Err(ApiError::invalid(
            format!("messages[{i}].role"),
            "a session keeps its system prompt on the session; set it with PATCH /v1/sessions/{id}",
        ));
    }
    let history: Vec<TurnMessage> = store.messages(session).await?.into_iter().map(TurnMessage::from).collect();
    let history = tools::template_messages(&history);
    if new_messages.is_empty() && history.last().is_none_or(|m| m.role != "user") {
        return Err(ApiError::invalid(
            "messages",
            "`messages` may be empty only to answer the session's last user message (regenerate); send a new user message",
        ));
    }
    let system: Vec<TemplateMessage> =
        session.system_prompt.iter().map(|p| TemplateMessage { role: "system".into(), content: p.clone() }).collect();
    // Without a known context (an upstream's), nothing is left out here.
    let context = model.context_length().unwrap_or(usize::MAX);
    let budget = context.saturating_sub(reserve.min(context / 2));
    let (model, shape) = (model.clone(), shape.clone());
    blocking(move || -> Result<Conversation, ApiError> {
        // Cut points: drop everything before a user message (Gemma-style templates need the
        // roles to alternate from a user turn), or all of the history.
        let cuts: Vec<usize> = (0..history.len()).filter(|&i| history[i].role == "user").chain(std::iter::once(history.len())).collect();
        let build = |cut: usize| -> Result<(Vec<TemplateMessage>, Prompt), ApiError> {
            let messages: Vec<TemplateMessage> = system.iter().chain(&history[cut..]).chain(&new_messages).cloned().collect();
            let prompt = render(model.as_ref(), &shape, messages.clone())?;
            Ok((messages, prompt))
        };
        // Fewer messages never make more tokens: binary search for the first cut that fits.
        let (mut lo, mut hi) = (0, cuts.len() - 1);
        let mut best = None;
        while lo <= hi {
            let mid = (lo + hi) / 2;
            let (messages, prompt) = build(cuts[mid])?;
            if prompt.len() <= budget {
                best = Some((cuts[mid], messages, prompt));
                if mid == 0 {
                    break;
                }
                hi = mid - 1;
            } else {
                lo = mid + 1;
            }
        }
        match best {
            Some((cut, messages, prompt)) => Ok(Conversation { messages, prompt, pruned: cut }),
            None => {
                let (_, prompt) = build(history.len())?;
                Err(ApiError::invalid_code(
                    Some("messages"),
                    "context_length_exceeded",
                    format!(
                        "This model's maximum context length is {context} tokens. The system prompt and the new messages \
                         alone take {} tokens, and {} are kept for the reply.",
                        prompt.len(),
                        context - budget
                    ),
                ))
            }
        }
    })
    .await?
}
