//! OpenAI response framing as pure state machines: engine [`StreamEvent`]s in, chat or
//! completion chunks (streaming) or one response object (non-streaming) out. No server or
//! model is needed to test them.
//!
//! Streams follow what OpenAI sends: a first chunk with the assistant role (chat), content
//! deltas, a chunk with `finish_reason`, then, only with `stream_options.include_usage`, a
//! chunk with empty `choices` and the usage (every earlier chunk then carries
//! `"usage": null`), then `data: [DONE]`.

use serde_json::{Value, json};

use crate::engine::{FinishReason, StreamEvent, TokenLogprob};
use crate::error::ApiError;
use crate::pipeline::tools::{self, CallIds, CallStream, Piece, ToolCall};

/// Which API shape to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// The identity every chunk of one response repeats.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
    pub include_usage: bool,
    /// Chat: `logprobs: true`. Completion: `logprobs: N` given.
    pub logprobs: bool,
    /// Chat with tools: the reply is the tool grammar's JSON, read back into `tool_calls`
    /// with these ids (streamed at the end, when it is complete).
    pub tools: Option<CallIds>,
}

pub const SYSTEM_FINGERPRINT: &str = concat!("wisp-", env!("CARGO_PKG_VERSION"));

impl ResponseMeta {
    pub fn new(endpoint: Endpoint, model: &str, include_usage: bool, logprobs: bool, tools: Option<CallIds>) -> ResponseMeta {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        ResponseMeta {
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            model: model.to_string(),
            endpoint,
            include_usage,
            logprobs,
            tools,
        }
    }

    fn object(&self, streaming: bool) -> &'static str {
        match (self.endpoint, streaming) {
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn chunk(&self, choices: Value, usage: Option<Value>) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        });
        if self.include_usage {
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        chunk
    }
}

fn usage_json(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// One chat `logprobs.content` entry.
fn chat_logprob(lp: &TokenLogprob) -> Value {
    json!({
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": lp.token.as_bytes(),
        "top_logprobs": lp.top.iter().map(|(t, l)| json!({"token": t, "logprob": l, "bytes": t.as_bytes()})).collect::<Vec<_>>(),
    })
}

/// The legacy completions `logprobs` object for a run of tokens starting at `offset`.
fn completion_logprobs(lps: &[TokenLogprob], mut offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(lps.len());
    for lp in lps {
        text_offset.push(offset);
        offset += lp.token.len();
    }
    json!({
        "tokens": lps.iter().map(|l| &l.token).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| l.top.iter().map(|(t, p)| (t.clone(), json!(p))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

/// The chat message and finish reason of a reply with tools (see [`tools::answer`]).
fn tool_message(text: &str, reason: FinishReason, ids: &CallIds) -> (Value, &'static str) {
    let answer = tools::answer(text, reason == FinishReason::Stop, ids);
    let mut message = json!({"role": "assistant", "content": answer.content, "refusal": null});
    if !answer.calls.is_empty() {
        message["tool_calls"] = answer.calls.iter().map(ToolCall::to_openai).collect();
    }
    (message, answer.finish_reason(reason.as_str()))
}

/// Streaming: turns events into SSE `data:` payloads.
pub struct StreamFramer {
    meta: ResponseMeta,
    /// Characters emitted so far (completion `text_offset`).
    offset: usize,
    /// With tools: the reply so far (framed as calls while it grows, or whole at the end)
    /// and the calls read from it.
    held: String,
    calls: Option<CallStream>,
    done: bool,
}

impl StreamFramer {
    pub fn new(meta: ResponseMeta) -> StreamFramer {
        let calls = meta.tools.clone().map(CallStream::new);
        StreamFramer { meta, offset: 0, held: String::new(), calls, done: false }
    }

    /// OpenAI's `tool_calls` and `content` deltas for the pieces a reply's new text completed.
    fn call_deltas(&mut self, text: &str) -> Vec<String> {
        let Some(calls) = &mut self.calls else { return Vec::new() };
        let pieces = calls.push(text);
        pieces
            .into_iter()
            .map(|piece| {
                let delta = match piece {
                    Piece::Head { index, id, name } => {
                        json!({"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}})
                    }
                    Piece::Arguments { index, text } => json!({"index": index, "function": {"arguments": text}}),
                    Piece::Text(text) => return self.choice(json!({"content": text}), None, None),
                };
                self.choice(json!({"tool_calls": [delta]}), None, None)
            })
            .collect()
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// What goes out before any token: the role chunk (chat) or the echoed prompt.
    pub fn start(&mut self, echo: Option<&str>) -> Vec<String> {
        match (self.meta.endpoint, echo) {
            (Endpoint::Chat, _) => vec![self.delta(json!({"role": "assistant", "content": ""}), None, None)],
            (Endpoint::Completion, Some(prompt)) => {
                self.offset += prompt.len();
                vec![self.delta(json!(prompt), None, None)]
            }
            (Endpoint::Completion, None) => Vec::new(),
        }
    }

    /// One engine event in, zero or more payloads out.
    pub fn push(&mut self, event: StreamEvent) -> Vec<String> {
        if self.done {
            return Vec::new();
        }
        match event {
            // As OpenAI streams calls: each call's id and name, then its arguments in pieces.
            StreamEvent::Token { text, .. } if self.meta.tools.is_some() => {
                self.held.push_str(&text);
                self.call_deltas(&text)
            }
            StreamEvent::Finished { text, reason, prompt_tokens, completion_tokens } if let Some(ids) = self.meta.tools.clone() => {
                self.held.push_str(&text);
                let mut out = self.call_deltas(&text);
                let streamed = self.calls.as_ref().map_or(0, CallStream::heads);
                let any = self.calls.as_ref().is_some_and(CallStream::streamed);
                let (message, finish) = tool_message(&self.held, reason, &ids);
                // Calls and an answer's text went out as they grew; calls the stream could
                // not read as they grew (a plugin changed the text's layout, say) go out
                // whole now, and so does text when nothing streamed.
                let calls = message["tool_calls"].as_array().cloned().unwrap_or_default();
                for (index, call) in calls.iter().enumerate().skip(streamed) {
                    let mut head = call.clone();
                    head["index"] = json!(index);
                    head["function"]["arguments"] = json!("");
                    out.push(self.choice(json!({"tool_calls": [head]}), None, None));
                    let arguments = json!({"index": index, "function": {"arguments": call["function"]["arguments"]}});
                    out.push(self.choice(json!({"tool_calls": [arguments]}), None, None));
                }
                if !any && message["content"].as_str().is_some_and(|c| !c.is_empty()) {
                    out.push(self.choice(json!({"content": message["content"]}), None, None));
                }
                out.extend(self.end(finish, prompt_tokens, completion_tokens));
                out
            }
            StreamEvent::Token { text, logprob, .. } => {
                let logprob = logprob.filter(|_| self.meta.logprobs);
                if text.is_empty() && logprob.is_none() {
                    return Vec::new();
                }
                let lp = logprob.map(|lp| self.logprobs(std::slice::from_ref(&lp)));
                let content = self.content(&text);
                self.offset += text.len();
                vec![self.delta(content, lp, None)]
            }
            StreamEvent::Finished { text, reason, prompt_tokens, completion_tokens } => {
                let mut out = Vec::new();
                if !text.is_empty() {
                    let content = self.content(&text);
                    out.push(self.delta(content, None, None));
                }
                out.extend(self.end(reason.as_str(), prompt_tokens, completion_tokens));
                out
            }
            StreamEvent::Error(message) => self.error(&ApiError::engine_failure(message)),
        }
    }

    /// An error after the first byte: an error event, then `[DONE]`.
    pub fn error(&mut self, error: &ApiError) -> Vec<String> {
        self.done = true;
        vec![error.body().to_string(), "[DONE]".to_string()]
    }

    fn content(&self, text: &str) -> Value {
        match self.meta.endpoint {
            Endpoint::Chat => json!({"content": text}),
            Endpoint::Completion => json!(text),
        }
    }

    fn logprobs(&self, lps: &[TokenLogprob]) -> Value {
        match self.meta.endpoint {
            Endpoint::Chat => json!({"content": lps.iter().map(chat_logprob).collect::<Vec<_>>()}),
            Endpoint::Completion => completion_logprobs(lps, self.offset),
        }
    }

    /// The finish chunk, the usage chunk when asked for, and `[DONE]`.
    fn end(&mut self, reason: &str, prompt_tokens: usize, completion_tokens: usize) -> Vec<String> {
        let empty = match self.meta.endpoint {
            Endpoint::Chat => json!({}),
            Endpoint::Completion => json!(""),
        };
        let mut out = vec![self.choice(empty, None, Some(reason))];
        if self.meta.include_usage {
            let usage = usage_json(prompt_tokens, completion_tokens);
            out.push(self.meta.chunk(json!([]), Some(usage)).to_string());
        }
        out.push("[DONE]".to_string());
        self.done = true;
        out
    }

    fn delta(&self, content: Value, logprobs: Option<Value>, finish: Option<FinishReason>) -> String {
        self.choice(content, logprobs, finish.map(FinishReason::as_str))
    }

    fn choice(&self, content: Value, logprobs: Option<Value>, finish_reason: Option<&str>) -> String {
        let choice = match self.meta.endpoint {
            Endpoint::Chat => json!({"index": 0, "delta": content, "logprobs": logprobs, "finish_reason": finish_reason}),
            Endpoint::Completion => json!({"index": 0, "text": content, "logprobs": logprobs, "finish_reason": finish_reason}),
        };
        self.meta.chunk(json!([choice]), None).to_string()
    }
}

/// Non-streaming: gathers every event, then builds one response.
pub struct Collector {
    meta: ResponseMeta,
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish: Option<(FinishReason, usize, usize)>,
    /// Length of the echoed prompt (completion `text_offset` starts after it).
    echo_len: usize,
}

impl Collector {
    pub fn new(meta: ResponseMeta, echo: Option<&str>) -> Collector {
        let text = echo.unwrap_or_default().to_string();
        Collector { echo_len: text.len(), meta, text, logprobs: Vec::new(), finish: None }
    }

    /// Adds one event; an engine failure becomes the request's error.
    pub fn push(&mut self, event: StreamEvent) -> Result<(), ApiError> {
        match event {
            StreamEvent::Token { text, logprob, .. } => {
                self.text.push_str(&text);
                if let Some(lp) = logprob {
                    self.logprobs.push(lp);
                }
            }
            StreamEvent::Finished { text, reason, prompt_tokens, completion_tokens } => {
                self.text.push_str(&text);
                self.finish = Some((reason, prompt_tokens, completion_tokens));
            }
            StreamEvent::Error(message) => return Err(ApiError::engine_failure(message)),
        }
        Ok(())
    }

    /// The response; an error if the engine stopped without finishing.
    pub fn finish(self) -> Result<Value, ApiError> {
        let (reason, prompt_tokens, completion_tokens) =
            self.finish.ok_or_else(|| ApiError::engine_failure("the engine ended the request without finishing".into()))?;
        let logprobs = match (self.meta.logprobs, self.meta.endpoint) {
            (false, _) => Value::Null,
            (true, Endpoint::Chat) => json!({"content": self.logprobs.iter().map(chat_logprob).collect::<Vec<_>>()}),
            (true, Endpoint::Completion) => completion_logprobs(&self.logprobs, self.echo_len),
        };
        let choice = match self.meta.endpoint {
            Endpoint::Chat if let Some(ids) = &self.meta.tools => {
                let (message, finish) = tool_message(&self.text, reason, ids);
                json!({"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish})
            }
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": self.text, "refusal": null},
                "logprobs": logprobs,
                "finish_reason": reason.as_str(),
            }),
            Endpoint::Completion => json!({
                "index": 0, "text": self.text, "logprobs": logprobs, "finish_reason": reason.as_str(),
            }),
        };
        Ok(json!({
            "id": self.meta.id,
            "object": self.meta.object(false),
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [choice],
            "usage": usage_json(prompt_tokens, completion_tokens),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str) -> StreamEvent {
        StreamEvent::Token { id: 1, text: text.into(), logprob: None }
    }

    fn finished(text: &str) -> StreamEvent {
        StreamEvent::Finished { text: text.into(), reason: FinishReason::Stop, prompt_tokens: 3, completion_tokens: 2 }
    }

    fn parse(payloads: &[String]) -> Vec<Value> {
        payloads.iter().filter(|p| *p != "[DONE]").map(|p| serde_json::from_str(p).unwrap()).collect()
    }

    #[test]
    fn chat_stream_is_role_then_deltas_then_finish_then_done() {
        let mut f = StreamFramer::new(ResponseMeta::new(Endpoint::Chat, "m", false, false, None));
        let mut out = f.start(None);
        out.extend(f.push(token("Hel")));
        out.extend(f.push(token("")));
        out.extend(f.push(finished("lo")));
        assert_eq!(out.last().unwrap(), "[DONE]");
        let chunks = parse(&out);
        assert_eq!(chunks.len(), 4, "{chunks:?}");
        assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "Hel");
        assert_eq!(chunks[2]["choices"][0]["delta"]["content"], "lo");
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
        assert!(chunks.iter().all(|c| c.get("usage").is_none()));
        assert!(f.is_done());
    }

    #[test]
    fn include_usage_adds_a_final_usage_chunk_and_nulls_before() {
        let mut f = StreamFramer::new(ResponseMeta::new(Endpoint::Chat, "m", true, false, None));
        let mut out = f.start(None);
        out.extend(f.push(token("a")));
        out.extend(f.push(finished("")));
        let chunks = parse(&out);
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"], json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}));
        assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()));
    }

    #[test]
    fn an_engine_error_mid_stream_is_an_error_event_then_done() {
        let mut f = StreamFramer::new(ResponseMeta::new(Endpoint::Completion, "m", false, false, None));
        let out = f.push(StreamEvent::Error("boom".into()));
        assert_eq!(out[1], "[DONE]");
        let e: Value = serde_json::from_str(&out[0]).unwrap();
        assert!(e["error"]["message"].as_str().unwrap().contains("boom"));
        assert!(f.push(token("x")).is_empty());
    }

    #[test]
    fn collector_builds_a_chat_completion_with_exact_usage() {
        let mut c = Collector::new(ResponseMeta::new(Endpoint::Chat, "m", false, false, None), None);
        c.push(token("Hi")).unwrap();
        c.push(finished(" there")).unwrap();
        let r = c.finish().unwrap();
        assert_eq!(r["object"], "chat.completion");
        assert_eq!(r["choices"][0]["message"]["content"], "Hi there");
        assert_eq!(r["usage"]["total_tokens"], 5);
    }

    #[test]
    fn completion_logprobs_have_offsets_after_the_echo() {
        let lp = |t: &str| TokenLogprob { token: t.into(), logprob: -0.5, top: vec![(t.into(), -0.5)] };
        let mut c = Collector::new(ResponseMeta::new(Endpoint::Completion, "m", false, true, None), Some("ab"));
        c.push(StreamEvent::Token { id: 1, text: "x".into(), logprob: Some(lp("x")) }).unwrap();
        c.push(StreamEvent::Token { id: 2, text: "yz".into(), logprob: Some(lp("yz")) }).unwrap();
        c.push(finished("")).unwrap();
        let r = c.finish().unwrap();
        assert_eq!(r["choices"][0]["text"], "abxyz");
        assert_eq!(r["choices"][0]["logprobs"]["text_offset"], json!([2, 3]));
        assert_eq!(r["choices"][0]["logprobs"]["top_logprobs"][1], json!({"yz": -0.5}));
    }

    #[test]
    fn a_tool_reply_streams_as_tool_call_deltas_and_collects_as_tool_calls() {
        let reply = r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}"#;
        let mut f = StreamFramer::new(ResponseMeta::new(Endpoint::Chat, "m", false, false, Some(CallIds::new())));
        f.start(None);
        let parse = |payloads: Vec<String>| -> Vec<Value> {
            payloads.iter().filter(|p| *p != "[DONE]").map(|p| serde_json::from_str(p).unwrap()).collect()
        };
        assert!(f.push(StreamEvent::Token { id: 1, text: reply[..20].into(), logprob: None }).is_empty(), "no call known yet");
        // The head goes out once the name is known, the arguments as they grow.
        let mut chunks = parse(f.push(StreamEvent::Token { id: 2, text: reply[20..62].into(), logprob: None }));
        chunks.extend(parse(f.push(StreamEvent::Token { id: 3, text: reply[62..70].into(), logprob: None })));
        let end = StreamEvent::Finished { text: reply[70..].into(), reason: FinishReason::Stop, prompt_tokens: 3, completion_tokens: 2 };
        chunks.extend(parse(f.push(end)));
        let head = &chunks[0]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(
            (head["index"].clone(), head["type"].clone(), head["function"]["name"].clone(), head["function"]["arguments"].clone()),
            (json!(0), json!("function"), json!("get_weather"), json!(""))
        );
        assert!(head["id"].as_str().unwrap().starts_with("call_"));
        let arguments: Vec<&str> = chunks[1..chunks.len() - 1]
            .iter()
            .map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str().unwrap())
            .collect();
        assert!(arguments.len() >= 2, "{arguments:?}");
        assert_eq!(arguments.concat(), r#"{"city": "Paris"}"#);
        assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");

        let mut c = Collector::new(ResponseMeta::new(Endpoint::Chat, "m", false, false, Some(CallIds::new())), None);
        c.push(StreamEvent::Finished { text: reply.into(), reason: FinishReason::Stop, prompt_tokens: 3, completion_tokens: 2 }).unwrap();
        let r = c.finish().unwrap();
        assert_eq!(r["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(r["choices"][0]["message"]["content"], Value::Null);
        assert_eq!(r["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "get_weather");
    }

    #[test]
    fn a_tool_grammar_answer_is_plain_content_and_a_cut_reply_never_shows_the_wrapper() {
        let mut c = Collector::new(ResponseMeta::new(Endpoint::Chat, "m", false, false, Some(CallIds::new())), None);
        c.push(StreamEvent::Finished {
            text: r#"{"response": "Hi."}"#.into(),
            reason: FinishReason::Stop,
            prompt_tokens: 1,
            completion_tokens: 1,
        })
        .unwrap();
        let r = c.finish().unwrap();
        assert_eq!(
            (r["choices"][0]["message"]["content"].clone(), r["choices"][0]["finish_reason"].clone()),
            (json!("Hi."), json!("stop"))
        );
        let mut c = Collector::new(ResponseMeta::new(Endpoint::Chat, "m", false, false, Some(CallIds::new())), None);
        c.push(StreamEvent::Finished { text: r#"{"tool_ca"#.into(), reason: FinishReason::Length, prompt_tokens: 1, completion_tokens: 1 })
            .unwrap();
        let r = c.finish().unwrap();
        assert_eq!((r["choices"][0]["message"]["content"].clone(), r["choices"][0]["finish_reason"].clone()), (json!(""), json!("length")));
        let mut c = Collector::new(ResponseMeta::new(Endpoint::Chat, "m", false, false, Some(CallIds::new())), None);
        let cut = r#"{"response": "Hello th"#;
        c.push(StreamEvent::Finished { text: cut.into(), reason: FinishReason::Length, prompt_tokens: 1, completion_tokens: 1 }).unwrap();
        assert_eq!(c.finish().unwrap()["choices"][0]["message"]["content"], json!("Hello th"));
    }
}
