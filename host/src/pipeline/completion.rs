//! A legacy completions request: a raw prompt (text or token ids), no template, no session.

use std::sync::Arc;

use super::output::{Governed, Output};
use super::{Caller, Generation, apply_sampling, blocking, decide, generate_request, vocab_of};
use crate::engine::template::TemplateMessage;
use crate::engine::{Backend, Prompt};
use crate::error::ApiError;
use crate::request::{self, CompletionRequest, SamplingFields, ValidPrompt};
use crate::state::AppState;
use crate::store::ANONYMOUS;

/// Legacy completions default to 16 new tokens when `max_tokens` is absent (OpenAI's
/// documented default).
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

pub async fn start_completion(
    state: &AppState,
    caller: &Caller,
    request: CompletionRequest,
    sampling: SamplingFields,
) -> Result<Generation, ApiError> {
    let model = state.backend(request.model.as_deref()).await?;
    let mut valid = request::validate_completion(request, sampling, vocab_of(model.as_ref()), &state.config.limits)?;
    let (mut prompt, mut prompt_text) = match valid.prompt {
        ValidPrompt::Text(text) => encode_text(&model, text).await?,
        ValidPrompt::Tokens(ids) => {
            // Plugins read the prompt as text: a backend that cannot decode ids (an
            // upstream's) cannot take them governed.
            let text = model.decode(&ids).ok_or_else(|| {
                ApiError::unsupported(
                    "prompt",
                    format!("`{}` is served by upstreams (proxy mode): send the prompt as text, not token ids", model.id()),
                )
            })?;
            (Prompt::Tokens(ids), text)
        }
    };
    let mut principal = ANONYMOUS.to_string();
    let policies = match state.policies.current().start().await? {
        s if s.is_empty() => None,
        mut policies => {
            // Plugins see a completions prompt as one user message.
            let messages = [TemplateMessage { role: "user".into(), content: prompt_text.clone() }];
            let request = caller.policy_request("completion", model.id(), &messages, Some(&valid.params), prompt.len());
            let allowed = decide(&mut policies, request).await?;
            principal = super::chat::principal_of(&allowed);
            let rewritten: String = allowed.messages.into_iter().map(|m| m.content).collect::<Vec<_>>().join("\n");
            if rewritten != prompt_text {
                (prompt, prompt_text) = encode_text(&model, rewritten).await?;
            }
            apply_sampling(&mut valid.params, allowed.sampling);
            Some(policies)
        }
    };
    let job = generate_request(model.as_ref(), prompt, &valid.params, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt")?;
    let prompt_tokens = job.prompt.len();
    let stream = model.clone().generate(job).await?;
    Ok(Generation {
        model: model.id().to_string(),
        output: Output::new(stream, policies.map(|p| Governed::new(p, prompt_tokens)), None, prompt_tokens, Some(model.clone())),
        stream: valid.params.stream,
        include_usage: valid.params.include_usage,
        logprobs: valid.logprobs.is_some(),
        tools: None,
        echo: valid.echo.then_some(prompt_text),
        session: None,
        principal,
    })
}

/// Tokenizes a raw prompt (with the model's BOS) off the async executor.
async fn encode_text(model: &Arc<dyn Backend>, text: String) -> Result<(Prompt, String), ApiError> {
    let model = model.clone();
    blocking(move || (model.text_prompt(text.clone()), text)).await
}
