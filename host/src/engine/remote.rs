//! Proxy mode: a model served by OpenAI-compatible upstreams (llama-server, vLLM, SGLang,
//! another wisp) behind the same [`Backend`] seam as the local engine, so the whole plugin
//! chain runs on it: `on-request` before anything is sent, `on-chunk` on every streamed
//! chunk (a plugin's stop drops the upstream connection, which ends the upstream's
//! generation), `on-finish` with the upstream's own usage.
//!
//! Upstream always gets a streamed chat (or completions) request with
//! `stream_options.include_usage`; a client's non-streamed request is collected by the
//! pipeline as for the local engine. wisp renders nothing: the upstream applies its own chat
//! template. Tools and response formats travel as wisp's own tool prompt and a
//! `response_format: json_schema`, so the reply is read back into `tool_calls` exactly as
//! for the local engine.
//!
//! Balancing: the healthy upstream with the least load (requests this replica has in
//! flight there, or the upstream's own waiting + running gauges from its `/metrics` when it
//! exports them, whichever is larger). Failover: a connect error, a timeout, a 5xx or 429,
//! or a stream that ends before its first event is retried on the next upstream, once
//! each; nothing has reached the client yet. An upstream that fails is skipped for
//! `upstream_cooldown_secs` (passive health); a task checks each one every
//! `health_check_secs` (`GET {upstream}/models`: active health) and reads its load.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::grammar::Constraint;
use super::template::{TemplateError, TemplateMessage};
use super::{Backend, EngineError, FinishReason, GenerateRequest, Prompt, StreamEvent, TokenStream, now_ms};
use crate::config::ModelConfig;
use crate::telemetry::Metrics;

/// The longest SSE event (or error body) read from an upstream: the upstream is untrusted.
const MAX_EVENT_BYTES: usize = 1 << 20;
/// The longest upstream error message passed on to a client.
const MAX_ERROR_MESSAGE: usize = 1024;

/// Estimated tokens of text for a backend without a tokenizer: ~4 bytes a token (English
/// BPE), rounded up. Plugins see this as `prompt-tokens` in `on-request`; `on-finish` gets
/// the upstream's real counts.
pub fn estimate_tokens(text: &str) -> usize {
    text.len().div_ceil(4)
}

/// A model served by upstreams.
pub struct RemoteModel {
    id: String,
    context_length: Option<usize>,
    pool: Arc<Pool>,
}

impl RemoteModel {
    /// The model of a `[[models]]` entry with `upstreams`; starts its health checks.
    pub fn new(config: &ModelConfig, metrics: Arc<Metrics>) -> Result<RemoteModel, EngineError> {
        let fail = |message: String| EngineError::Load { id: config.id.clone(), message };
        let api_key = match &config.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| fail(format!("the environment variable `{var}` is not set")))?),
            None => None,
        };
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.upstream_connect_timeout_ms))
            .tcp_nodelay(true)
            // Below the keep-alive of common servers (llama-server and uvicorn close idle
            // connections after 5 s): a request on a connection the server has just closed
            // fails without reaching it.
            .pool_idle_timeout(Duration::from_secs(4))
            .build()
            .map_err(|e| fail(format!("building the HTTP client: {e}")))?;
        let upstreams: Vec<Upstream> = config
            .upstreams
            .iter()
            .map(|url| {
                let base = url.trim_end_matches('/').to_string();
                let labels = [config.id.as_str(), base.as_str()];
                let gauges = UpstreamGauges {
                    in_flight: metrics.upstream_in_flight.with_label_values(&labels),
                    healthy: metrics.upstream_healthy.with_label_values(&labels),
                };
                gauges.healthy.set(1);
                Upstream {
                    base,
                    in_flight: AtomicUsize::new(0),
                    down_until: AtomicU64::new(0),
                    reported_load: AtomicU64::new(UNKNOWN),
                    gauges,
                }
            })
            .collect();
        let pool = Arc::new(Pool {
            model: config.id.clone(),
            upstream_model: config.upstream_model.clone().unwrap_or_else(|| config.id.clone()),
            client,
            upstreams,
            api_key,
            chunk_timeout: Duration::from_secs(config.upstream_timeout_secs),
            cooldown: Duration::from_secs(config.upstream_cooldown_secs),
            next: AtomicUsize::new(0),
            metrics,
        });
        spawn_health_checks(Arc::downgrade(&pool), Duration::from_secs(config.health_check_secs));
        Ok(RemoteModel { id: config.id.clone(), context_length: (config.context_length > 0).then_some(config.context_length), pool })
    }

    /// At least one upstream is not cooling down after a failure.
    pub fn any_healthy(&self) -> bool {
        let now = now_ms();
        self.pool.upstreams.iter().any(|u| u.healthy(now))
    }
}

impl Backend for RemoteModel {
    fn id(&self) -> &str {
        &self.id
    }

    fn context_length(&self) -> Option<usize> {
        self.context_length
    }

    fn vocab_size(&self) -> Option<usize> {
        None
    }

    fn chat_prompt(&self, messages: Vec<TemplateMessage>) -> Result<Prompt, TemplateError> {
        // A few tokens per message for the upstream's role markers.
        let estimated_tokens = messages.iter().map(|m| estimate_tokens(&m.content) + 4).sum();
        Ok(Prompt::Messages { messages, estimated_tokens })
    }

    fn text_prompt(&self, text: String) -> Prompt {
        let estimated_tokens = estimate_tokens(&text);
        Prompt::Text { text, estimated_tokens }
    }

    fn decode(&self, _ids: &[u32]) -> Option<String> {
        None
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn generate(self: Arc<Self>, request: GenerateRequest) -> BoxFuture<'static, Result<TokenStream, EngineError>> {
        let pool = self.pool.clone();
        Box::pin(async move { pool.generate(request).await })
    }
}

/// `reported_load` when the upstream exports no load gauges.
const UNKNOWN: u64 = u64::MAX;
/// `down_until` after a failed health check: out until a check succeeds.
const UNTIL_CHECKED: u64 = u64::MAX;

struct UpstreamGauges {
    in_flight: prometheus::IntGauge,
    healthy: prometheus::IntGauge,
}

struct Upstream {
    /// `http://host:port/v1`, no trailing slash.
    base: String,
    /// Requests this replica has open there.
    in_flight: AtomicUsize,
    /// Unix ms until which it is skipped after a failed request (0: healthy;
    /// [`UNTIL_CHECKED`]: a health check failed, out until one succeeds).
    down_until: AtomicU64,
    /// Waiting + running requests from its own `/metrics` ([`UNKNOWN`] if it exports none).
    reported_load: AtomicU64,
    gauges: UpstreamGauges,
}

impl Upstream {
    fn healthy(&self, now: u64) -> bool {
        self.down_until.load(Ordering::Relaxed) <= now
    }

    fn load(&self) -> u64 {
        let own = self.in_flight.load(Ordering::Relaxed) as u64;
        match self.reported_load.load(Ordering::Relaxed) {
            UNKNOWN => own,
            reported => own.max(reported),
        }
    }

    /// A request failed on it: skipped for the cool-down (a health check that passes in
    /// the meantime does not bring it back early: it may answer `/models` and still fail
    /// requests).
    fn mark_down(&self, cooldown: Duration) {
        let until = now_ms().saturating_add(cooldown.as_millis() as u64).min(UNTIL_CHECKED - 1);
        // A failed health check's "until checked" stands.
        let _ = self.down_until.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| (d != UNTIL_CHECKED).then_some(until));
        self.gauges.healthy.set(0);
    }

    /// A health check failed: out until one passes.
    fn mark_unreachable(&self) {
        self.down_until.store(UNTIL_CHECKED, Ordering::Relaxed);
        self.gauges.healthy.set(0);
    }

    fn mark_up(&self) {
        self.down_until.store(0, Ordering::Relaxed);
        self.gauges.healthy.set(1);
    }

    /// The server's root (`/metrics` lives there, not under `/v1`).
    fn origin(&self) -> &str {
        let rest = self.base.strip_prefix("http://").unwrap_or(&self.base);
        match rest.find('/') {
            Some(i) => &self.base[..self.base.len() - rest.len() + i],
            None => &self.base,
        }
    }
}

/// One request's hold on an upstream; counted in its in-flight load until dropped.
struct InFlight(Arc<Pool>, usize);

impl InFlight {
    fn new(pool: &Arc<Pool>, index: usize) -> InFlight {
        let upstream = &pool.upstreams[index];
        upstream.in_flight.fetch_add(1, Ordering::Relaxed);
        upstream.gauges.in_flight.inc();
        InFlight(pool.clone(), index)
    }

    fn upstream(&self) -> &Upstream {
        &self.0.upstreams[self.1]
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let upstream = self.upstream();
        upstream.in_flight.fetch_sub(1, Ordering::Relaxed);
        upstream.gauges.in_flight.dec();
    }
}

struct Pool {
    model: String,
    upstream_model: String,
    client: reqwest::Client,
    upstreams: Vec<Upstream>,
    api_key: Option<String>,
    chunk_timeout: Duration,
    cooldown: Duration,
    /// Rotates the start among equally loaded upstreams.
    next: AtomicUsize,
    metrics: Arc<Metrics>,
}

/// Why one attempt on one upstream failed.
enum Failure {
    /// Nothing reached the client: the next upstream may take the request.
    Retry { kind: &'static str, message: String },
    /// The upstream refused the request itself (a 4xx about its content): every upstream
    /// would, so the client hears it.
    Refused(EngineError),
}

/// A stream that has produced its first event.
struct Started {
    events: Vec<Event>,
    reader: SseReader,
}

impl Pool {
    /// The upstreams to try, best first: the healthy ones by load (ties rotate); if none is
    /// healthy, all of them, the soonest back first.
    fn order(&self) -> Vec<usize> {
        let now = now_ms();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.upstreams.len();
        let rotated = (0..n).map(|i| (start + i) % n);
        let mut healthy: Vec<usize> = rotated.clone().filter(|&i| self.upstreams[i].healthy(now)).collect();
        if healthy.is_empty() {
            let mut all: Vec<usize> = rotated.collect();
            all.sort_by_key(|&i| self.upstreams[i].down_until.load(Ordering::Relaxed));
            return all;
        }
        // A stable sort keeps the rotation among equals.
        healthy.sort_by_key(|&i| self.upstreams[i].load());
        healthy
    }

    async fn generate(self: Arc<Self>, request: GenerateRequest) -> Result<TokenStream, EngineError> {
        let (path, body) = self.body(&request);
        let estimated_prompt = request.prompt.len();
        let mut last = String::new();
        for index in self.order() {
            let hold = InFlight::new(&self, index);
            let upstream = &self.upstreams[index];
            let labels = [self.model.as_str(), upstream.base.as_str()];
            let started = Instant::now();
            match self.start(upstream, path, &body).instrument(request.span.clone()).await {
                Ok(Started { events, reader }) => {
                    self.metrics.upstream_first_event_seconds.with_label_values(&labels).observe(started.elapsed().as_secs_f64());
                    let (tx, rx) = mpsc::unbounded_channel();
                    let relay = Relay { hold, reader, tx, estimated_prompt, generated: 0, started, finish: None, usage: None };
                    tokio::spawn(relay.run(events).instrument(request.span.clone()));
                    return Ok(rx);
                }
                Err(Failure::Retry { kind, message }) => {
                    tracing::warn!(model = %self.model, upstream = %upstream.base, kind, error = %message, "upstream failed; trying the next");
                    self.metrics.upstream_errors.with_label_values(&[labels[0], labels[1], kind]).inc();
                    // A reused connection the upstream had closed says nothing of its health.
                    if kind != "transport" {
                        upstream.mark_down(self.cooldown);
                    }
                    last = format!("{}: {message}", upstream.base);
                }
                Err(Failure::Refused(e)) => {
                    self.metrics.upstream_requests.with_label_values(&[labels[0], labels[1], "refused"]).inc();
                    return Err(e);
                }
            }
        }
        Err(EngineError::UpstreamUnavailable { id: self.model.clone(), message: last })
    }

    /// The upstream's endpoint and the streamed request wisp sends it.
    fn body(&self, request: &GenerateRequest) -> (&'static str, Value) {
        let s = &request.sampling;
        let mut body = json!({
            "model": self.upstream_model,
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": request.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
        });
        let fields = body.as_object_mut().expect("a json object literal");
        let path = match &request.prompt {
            Prompt::Messages { messages, .. } => {
                fields.insert(
                    "messages".into(),
                    json!(messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>()),
                );
                "/chat/completions"
            }
            Prompt::Text { text, .. } => {
                fields.insert("prompt".into(), json!(text));
                "/completions"
            }
            Prompt::Tokens(ids) => {
                fields.insert("prompt".into(), json!(ids));
                "/completions"
            }
        };
        if !request.stop.is_empty() {
            fields.insert("stop".into(), json!(request.stop));
        }
        if let Some(seed) = s.seed {
            fields.insert("seed".into(), json!(seed));
        }
        for (name, value, neutral) in [
            ("presence_penalty", s.presence_penalty, 0.0),
            ("frequency_penalty", s.frequency_penalty, 0.0),
            ("min_p", s.min_p, 0.0),
            ("repetition_penalty", s.repetition_penalty, 1.0),
        ] {
            if value != neutral {
                fields.insert(name.into(), json!(value));
            }
        }
        if s.top_k > 0 {
            fields.insert("top_k".into(), json!(s.top_k));
        }
        if !s.logit_bias.is_empty() {
            let bias: serde_json::Map<String, Value> = s.logit_bias.iter().map(|(id, bias)| (id.to_string(), json!(bias))).collect();
            fields.insert("logit_bias".into(), Value::Object(bias));
        }
        match &request.constraint {
            Some(Constraint::JsonObject) => {
                fields.insert("response_format".into(), json!({"type": "json_object"}));
            }
            Some(Constraint::JsonSchema(schema)) => {
                fields.insert(
                    "response_format".into(),
                    json!({"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": true}}),
                );
            }
            None => {}
        }
        (path, body)
    }

    /// Sends the request to one upstream and reads up to its first event.
    async fn start(&self, upstream: &Upstream, path: &str, body: &Value) -> Result<Started, Failure> {
        let mut post = self.client.post(format!("{}{path}", upstream.base)).json(body);
        if let Some(key) = &self.api_key {
            post = post.bearer_auth(key);
        }
        let response = match tokio::time::timeout(self.chunk_timeout, post.send()).await {
            Err(_) => return Err(Failure::Retry { kind: "timeout", message: "no response in time".into() }),
            Ok(Err(e)) if e.is_connect() => return Err(Failure::Retry { kind: "connect", message: with_causes(&e) }),
            Ok(Err(e)) => return Err(Failure::Retry { kind: "transport", message: with_causes(&e) }),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if !status.is_success() {
            let text = read_capped(response, MAX_EVENT_BYTES).await;
            let message = upstream_message(&text);
            return Err(match status.as_u16() {
                // The request's own fault: any upstream would refuse it.
                400 | 413 | 422 => Failure::Refused(EngineError::UpstreamRefused { status: status.as_u16(), message }),
                429 => Failure::Retry { kind: "overloaded", message: format!("{status}: {message}") },
                s if s >= 500 => Failure::Retry { kind: "status", message: format!("{status}: {message}") },
                // 401/403/404: wisp's credential or model name is wrong there, an operator's
                // fault; another upstream may be configured right.
                _ => Failure::Retry { kind: "rejected", message: format!("{status}: {message}") },
            });
        }
        let mut reader = SseReader::new(response);
        match tokio::time::timeout(self.chunk_timeout, reader.next_events()).await {
            Err(_) => Err(Failure::Retry { kind: "timeout", message: "no first event in time".into() }),
            Ok(Err(message)) => Err(Failure::Retry { kind: "stream", message }),
            Ok(Ok(None)) => Err(Failure::Retry { kind: "stream", message: "the stream ended before its first event".into() }),
            Ok(Ok(Some(events))) => Ok(Started { events, reader }),
        }
    }
}

/// An error and its causes (reqwest's own message names only the url).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        message.push_str(": ");
        message.push_str(&c.to_string());
        cause = c.source();
    }
    message
}

/// Reads at most `limit` bytes of a response body as text.
async fn read_capped(response: reqwest::Response, limit: usize) -> String {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk[..chunk.len().min(limit - body.len())]);
        if body.len() >= limit {
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// The message of an upstream's error body (OpenAI's shape or plain text), bounded and
/// without control characters.
fn upstream_message(body: &str) -> String {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| body.to_string());
    let clean: String = message.chars().filter(|c| !c.is_control()).take(MAX_ERROR_MESSAGE).collect();
    if clean.is_empty() { "no message".into() } else { clean }
}

/// One upstream `data:` event, as wisp reads it.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Text(String),
    Finish(FinishReason),
    Usage { prompt_tokens: usize, completion_tokens: usize },
    Failed(String),
    Done,
}

/// What one `data:` payload says: a chat chunk (`choices[0].delta.content`), a completions
/// chunk (`choices[0].text`), its `finish_reason`, the `usage` chunk, an `error`, or
/// `[DONE]`. Anything else is skipped (role-only and keep-alive chunks).
fn parse_event(data: &str) -> Vec<Event> {
    if data.trim() == "[DONE]" {
        return vec![Event::Done];
    }
    let Ok(value) = serde_json::from_str::<Value>(data) else {
        return vec![Event::Failed(format!("an event that is not JSON: {}", upstream_message(data)))];
    };
    if let Some(error) = value.get("error").filter(|e| !e.is_null()) {
        return vec![Event::Failed(upstream_message(&json!({ "error": error }).to_string()))];
    }
    let mut events = Vec::new();
    if let Some(choice) = value.pointer("/choices/0") {
        let text = choice.pointer("/delta/content").or_else(|| choice.get("text")).and_then(Value::as_str).unwrap_or_default();
        if !text.is_empty() {
            events.push(Event::Text(text.to_string()));
        }
        match choice.get("finish_reason").and_then(Value::as_str) {
            Some("length") => events.push(Event::Finish(FinishReason::Length)),
            Some(_) => events.push(Event::Finish(FinishReason::Stop)),
            None => {}
        }
    }
    if let Some(usage) = value.get("usage").filter(|u| u.is_object()) {
        let count = |name: &str| usage.get(name).and_then(Value::as_u64).map_or(0, |n| n.min(u32::MAX as u64) as usize);
        events.push(Event::Usage { prompt_tokens: count("prompt_tokens"), completion_tokens: count("completion_tokens") });
    }
    events
}

/// Reads an upstream's Server-Sent Events into [`Event`]s. Each event is bounded by
/// [`MAX_EVENT_BYTES`]; only `data:` lines count.
struct SseReader {
    body: futures_util::stream::BoxStream<'static, Result<bytes::Bytes, String>>,
    buffer: Vec<u8>,
    /// How much of `buffer` holds no event boundary (not scanned again).
    scanned: usize,
}

impl SseReader {
    fn new(response: reqwest::Response) -> SseReader {
        SseReader::of(response.bytes_stream().map(|chunk| chunk.map_err(|e| with_causes(&e))).boxed())
    }

    fn of(body: futures_util::stream::BoxStream<'static, Result<bytes::Bytes, String>>) -> SseReader {
        SseReader { body, buffer: Vec::new(), scanned: 0 }
    }

    /// The events completed by the next network chunk(s); `None` at the end of the body.
    async fn next_events(&mut self) -> Result<Option<Vec<Event>>, String> {
        loop {
            let mut events = Vec::new();
            while let Some(end) = self.buffer[self.scanned..].windows(2).position(|w| w == b"\n\n").map(|i| i + self.scanned) {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                events.extend(parse_block(&block));
                self.scanned = 0;
            }
            self.scanned = self.buffer.len().saturating_sub(1);
            if !events.is_empty() {
                return Ok(Some(events));
            }
            if self.buffer.len() > MAX_EVENT_BYTES {
                return Err(format!("an event longer than {MAX_EVENT_BYTES} bytes"));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.extend(chunk.iter().filter(|&&b| b != b'\r')),
                Some(Err(e)) => return Err(e),
                None => {
                    // A last event without its blank line.
                    self.scanned = 0;
                    let rest = parse_block(&std::mem::take(&mut self.buffer));
                    return Ok((!rest.is_empty()).then_some(rest));
                }
            }
        }
    }
}

/// The events of one SSE block (its `data:` lines joined).
fn parse_block(block: &[u8]) -> Vec<Event> {
    let text = String::from_utf8_lossy(block);
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| d.strip_prefix(' ').unwrap_or(d)).collect();
    if data.is_empty() { Vec::new() } else { parse_event(&data.join("\n")) }
}

/// The task that relays one upstream stream into a [`TokenStream`]: every text chunk is a
/// token event; the end carries the upstream's usage (or, if it sent none, the estimate and
/// the chunks counted). The client going away drops the upstream connection.
struct Relay {
    hold: InFlight,
    reader: SseReader,
    tx: mpsc::UnboundedSender<StreamEvent>,
    estimated_prompt: usize,
    generated: usize,
    started: Instant,
    finish: Option<FinishReason>,
    usage: Option<(usize, usize)>,
}

impl Relay {
    async fn run(mut self, first: Vec<Event>) {
        let outcome = self.relay(first).await;
        let pool = &self.hold.0;
        let upstream = self.hold.upstream();
        let labels = [pool.model.as_str(), upstream.base.as_str()];
        if let Err((kind, message)) = &outcome {
            tracing::warn!(model = %pool.model, upstream = %upstream.base, kind, error = %message, "upstream failed mid-stream");
            pool.metrics.upstream_errors.with_label_values(&[labels[0], labels[1], kind]).inc();
            if *kind != "upstream_error" {
                upstream.mark_down(pool.cooldown);
            }
            let _ = self.tx.send(StreamEvent::Error(format!("the upstream {} failed mid-stream: {message}", upstream.base)));
        }
        // Decided by how the relay ended, not by the channel afterwards: a consumer that got
        // the end may close it before this line.
        let outcome = match outcome {
            Ok(Ended::Finished) => "ok",
            Ok(Ended::ClientLeft) => "cancelled",
            Err(_) => "error",
        };
        pool.metrics.upstream_requests.with_label_values(&[labels[0], labels[1], outcome]).inc();
        pool.metrics.upstream_request_seconds.with_label_values(&labels).observe(self.started.elapsed().as_secs_f64());
    }

    /// How the stream ended; `Err((kind, message))` on a failure.
    async fn relay(&mut self, first: Vec<Event>) -> Result<Ended, (&'static str, String)> {
        let timeout = self.hold.0.chunk_timeout;
        let mut events = first;
        loop {
            for event in events {
                let sent = match event {
                    Event::Text(text) => {
                        self.generated += 1;
                        self.tx.send(StreamEvent::Token { id: 0, text, logprob: None })
                    }
                    Event::Finish(reason) => {
                        self.finish = Some(reason);
                        Ok(())
                    }
                    Event::Usage { prompt_tokens, completion_tokens } => {
                        self.usage = Some((prompt_tokens, completion_tokens));
                        Ok(())
                    }
                    Event::Failed(message) => return Err(("upstream_error", message)),
                    Event::Done => return self.end(),
                };
                if sent.is_err() {
                    return Ok(Ended::ClientLeft);
                }
            }
            events = tokio::select! {
                () = self.tx.closed() => return Ok(Ended::ClientLeft),
                next = tokio::time::timeout(timeout, self.reader.next_events()) => match next {
                    Err(_) => return Err(("timeout", format!("nothing for {} s", timeout.as_secs()))),
                    Ok(Err(message)) => return Err(("stream", message)),
                    // Servers that send no `[DONE]` end the body after the finish.
                    Ok(Ok(None)) if self.finish.is_some() => return self.end(),
                    Ok(Ok(None)) => return Err(("stream", "the connection closed before the reply finished".into())),
                    Ok(Ok(Some(events))) => events,
                },
            };
        }
    }

    fn end(&mut self) -> Result<Ended, (&'static str, String)> {
        let (prompt_tokens, completion_tokens) = self.usage.unwrap_or((self.estimated_prompt, self.generated));
        let reason = self.finish.unwrap_or(FinishReason::Stop);
        let _ = self.tx.send(StreamEvent::Finished { text: String::new(), reason, prompt_tokens, completion_tokens });
        Ok(Ended::Finished)
    }
}

/// How a relayed stream ended, short of a failure.
enum Ended {
    /// The upstream finished the reply and its end was passed on.
    Finished,
    /// The client went away first (the upstream request is dropped).
    ClientLeft,
}

/// The Prometheus gauges of waiting and running requests that wisp reads from an
/// upstream's `/metrics` (vLLM's, llama-server's with `--metrics`, SGLang's; wisp exports
/// vLLM's names too).
const LOAD_GAUGES: &[&str] = &[
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "llamacpp:requests_processing",
    "llamacpp:requests_deferred",
    "sglang:num_queue_reqs",
    "sglang:num_running_reqs",
];

/// The sum of [`LOAD_GAUGES`] in a Prometheus text exposition; `None` if it has none.
fn parse_load(text: &str) -> Option<u64> {
    let mut found = false;
    let mut total = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        if LOAD_GAUGES.contains(&&line[..name_end]) {
            let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).filter(|v| v.is_finite() && *v >= 0.0);
            if let Some(value) = value {
                found = true;
                total += value;
            }
        }
    }
    found.then(|| total.min(1e9) as u64)
}

/// Checks every upstream each `every`: `GET {upstream}/models` (a failure takes it out for
/// the cool-down; a success after one brings it back) and its `/metrics` for load. Ends
/// when the model is dropped.
fn spawn_health_checks(pool: Weak<Pool>, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(pool) = pool.upgrade() else { return };
            let checks = pool.upstreams.iter().map(|u| check(&pool, u, every));
            futures_util::future::join_all(checks).await;
        }
    });
}

async fn check(pool: &Pool, upstream: &Upstream, limit: Duration) {
    let mut get = pool.client.get(format!("{}/models", upstream.base)).timeout(limit);
    if let Some(key) = &pool.api_key {
        get = get.bearer_auth(key);
    }
    match get.send().await {
        Ok(r) if r.status().is_success() => {
            // Back at once after a failed check; after a failed request, once its cool-down
            // is over.
            let down = upstream.down_until.load(Ordering::Relaxed);
            if down == UNTIL_CHECKED || (down != 0 && upstream.healthy(now_ms())) {
                tracing::info!(model = %pool.model, upstream = %upstream.base, "upstream healthy again");
                upstream.mark_up();
            }
        }
        Ok(r) => {
            tracing::warn!(model = %pool.model, upstream = %upstream.base, status = %r.status(), "upstream health check failed");
            upstream.mark_unreachable();
        }
        Err(e) => {
            tracing::warn!(model = %pool.model, upstream = %upstream.base, error = %e, "upstream health check failed");
            upstream.mark_unreachable();
        }
    }
    let load = match pool.client.get(format!("{}/metrics", upstream.origin())).timeout(limit).send().await {
        Ok(r) if r.status().is_success() => parse_load(&read_capped(r, 4 << 20).await),
        _ => None,
    };
    upstream.reported_load.store(load.unwrap_or(UNKNOWN), Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_and_completion_chunks_are_read() {
        let chat = r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#;
        assert_eq!(parse_event(chat), vec![Event::Text("Hi".into())]);
        let end = r#"{"choices":[{"index":0,"text":" there","finish_reason":"length"}]}"#;
        assert_eq!(parse_event(end), vec![Event::Text(" there".into()), Event::Finish(FinishReason::Length)]);
        let usage = r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#;
        assert_eq!(parse_event(usage), vec![Event::Usage { prompt_tokens: 7, completion_tokens: 3 }]);
        assert_eq!(parse_event("[DONE]"), vec![Event::Done]);
        assert_eq!(parse_event(r#"{"choices":[{"delta":{"role":"assistant"}}]}"#), vec![]);
    }

    #[test]
    fn upstream_errors_are_bounded_and_clean() {
        let events = parse_event(r#"{"error":{"message":"boom\u0007\nnow","type":"server_error"}}"#);
        assert_eq!(events, vec![Event::Failed("boomnow".into())]);
        let long = "x".repeat(10_000);
        assert_eq!(upstream_message(&long).len(), MAX_ERROR_MESSAGE);
        assert!(matches!(&parse_event("not json")[..], [Event::Failed(m)] if m.contains("not JSON")));
    }

    #[tokio::test]
    async fn events_are_read_across_chunk_boundaries_and_bounded() {
        let chunks = [
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\n",
            "\r\ndata: {\"choices\":[{\"delta\":",
            "{\"content\":\"b\"}}]}\n\n: ping\n\ndata: [DONE]",
        ];
        let body = futures_util::stream::iter(chunks.map(|c| Ok(bytes::Bytes::from(c)))).boxed();
        let mut reader = SseReader::of(body);
        assert_eq!(reader.next_events().await.unwrap(), Some(vec![Event::Text("a".into())]));
        assert_eq!(reader.next_events().await.unwrap(), Some(vec![Event::Text("b".into())]));
        assert_eq!(reader.next_events().await.unwrap(), Some(vec![Event::Done]), "the last event needs no blank line");
        assert_eq!(reader.next_events().await.unwrap(), None);

        let endless = futures_util::stream::repeat_with(|| Ok(bytes::Bytes::from(vec![b'x'; 64 << 10]))).boxed();
        let error = SseReader::of(endless).next_events().await.unwrap_err();
        assert!(error.contains("longer than"), "{error}");
    }

    #[test]
    fn load_is_the_sum_of_the_known_gauges() {
        let text = "# HELP x\nvllm:num_requests_waiting{model_name=\"m\"} 2\nvllm:num_requests_running{model_name=\"m\"} 3.0\n\
                    vllm:num_requests_waiting_total 100\nllamacpp:requests_processing 1\nother 9\n";
        assert_eq!(parse_load(text), Some(6));
        assert_eq!(parse_load("wisp_requests_running{model=\"m\"} 4\n"), None);
        assert_eq!(parse_load("vllm:num_requests_running NaN\n"), None);
    }

    fn upstream(base: &str) -> Upstream {
        Upstream {
            base: base.into(),
            in_flight: AtomicUsize::new(0),
            down_until: AtomicU64::new(0),
            reported_load: AtomicU64::new(UNKNOWN),
            gauges: UpstreamGauges {
                in_flight: prometheus::IntGauge::new("a", "a").unwrap(),
                healthy: prometheus::IntGauge::new("b", "b").unwrap(),
            },
        }
    }

    fn pool(upstreams: Vec<Upstream>) -> Pool {
        Pool {
            model: "m".into(),
            upstream_model: "m".into(),
            client: reqwest::Client::new(),
            upstreams,
            api_key: None,
            chunk_timeout: Duration::from_secs(1),
            cooldown: Duration::from_secs(60),
            next: AtomicUsize::new(0),
            metrics: Arc::new(Metrics::new()),
        }
    }

    #[test]
    fn requests_go_to_the_least_loaded_healthy_upstream() {
        let pool = pool(vec![upstream("http://a/v1"), upstream("http://b/v1"), upstream("http://c/v1")]);
        // Equal loads rotate.
        assert_eq!(pool.order(), [0, 1, 2]);
        assert_eq!(pool.order(), [1, 2, 0]);
        // Own in-flight requests, or the upstream's reported queue, whichever is larger.
        pool.upstreams[0].in_flight.store(2, Ordering::Relaxed);
        pool.upstreams[1].reported_load.store(5, Ordering::Relaxed);
        assert_eq!(pool.order(), [2, 0, 1]);
        // A failed upstream is left out while others are healthy...
        pool.upstreams[2].mark_down(pool.cooldown);
        assert_eq!(pool.order(), [0, 1]);
        // ...and tried last-failed-last when none is.
        pool.upstreams[0].mark_unreachable();
        pool.upstreams[1].mark_down(pool.cooldown);
        assert_eq!(pool.order()[2], 0);
    }

    #[test]
    fn a_failed_check_keeps_an_upstream_out_until_one_passes() {
        let u = upstream("http://a/v1");
        u.mark_unreachable();
        assert!(!u.healthy(now_ms()));
        // A failed request meanwhile does not shorten "until a check passes".
        u.mark_down(Duration::from_secs(0));
        assert_eq!(u.down_until.load(Ordering::Relaxed), UNTIL_CHECKED);
        u.mark_up();
        assert!(u.healthy(now_ms()));
        u.mark_down(Duration::from_secs(0));
        assert!(u.healthy(now_ms() + 1), "a cool-down ends by itself");
    }

    #[test]
    fn an_upstream_origin_drops_the_api_path() {
        assert_eq!(upstream("http://10.0.0.1:8080/v1").origin(), "http://10.0.0.1:8080");
        assert_eq!(upstream("http://host:1").origin(), "http://host:1");
    }
}
