//! The scheduler: one OS thread owns a model and runs its sequences with continuous
//! batching.
//!
//! Requests arrive on a channel and leave as a [`TokenStream`]. Each step runs one batched
//! forward pass ([`Model::forward_batch`]) over every live sequence: one decode token per
//! running sequence, plus a chunk of a waiting prompt within the step's token budget
//! (`prefill_chunk`), so a long prompt never stalls the streams already running. New
//! requests join between steps (up to `max_batch` sequences; the rest wait in the queue,
//! up to `max_queue`, then `schedule` refuses with 503); a finished sequence, or one whose
//! client hung up (its receiver dropped), leaves at once. Each sequence owns its
//! [`SeqCache`], sampler, detokenizer and stop matcher, so its output is the same whatever
//! else shares its steps.
//!
//! A panic on the engine thread (a bug, a kernel assertion) fails the requests of that
//! step with an error event and the thread goes on with the queue: the model's weights
//! are read-only, and every per-request state the panic may have left half-written (KV
//! caches, kept prefixes) is dropped. Each accepted request holds an [`Admission`] that
//! returns its slot when dropped, so no panic can leak queue capacity.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use llguidance::toktrie::SimpleVob;
use tokio::sync::mpsc;
use wisp_holdback::StopMatcher;

use super::grammar::{self, Grammar};
use super::model::{Model, Segment, SeqCache};
use super::sampling::Sampler;
use super::tokenizer::{Detokenizer, GgufTokenizer};
use super::{EngineError, FinishReason, GenerateRequest, StreamEvent, TokenLogprob, TokenStream};
use crate::telemetry::Metrics;

pub struct SchedulerConfig {
    pub model_id: String,
    /// Requests waiting behind the running ones before `schedule` refuses.
    pub max_queue: usize,
    /// Sequences decoded together in one step.
    pub max_batch: usize,
    /// Prompt tokens per step (a longer prompt is prefilled over several steps).
    pub prefill_chunk: usize,
    /// Memory for the KV of finished sequences kept for prefix reuse, in bytes.
    pub prefix_cache_bytes: usize,
}

struct Job {
    request: GenerateRequest,
    grammar: Option<Grammar>,
    events: mpsc::UnboundedSender<StreamEvent>,
    /// Open while the job waits; closing it logs the queue time.
    queued: tracing::Span,
    admission: Admission,
}

/// One request's place among those the engine accepted (queued or running); dropping it,
/// however the request leaves (finished, failed, hung up, lost in a panic), frees it.
struct Admission(Arc<AtomicUsize>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The handle the rest of the host holds; the thread stops when it is dropped.
pub struct Scheduler {
    jobs: mpsc::UnboundedSender<Job>,
    thread: std::thread::JoinHandle<()>,
    /// Requests accepted and not finished (queued + running).
    in_flight: Arc<AtomicUsize>,
    /// Running plus waiting requests admitted at most.
    max_in_flight: usize,
    model_id: String,
}

impl Scheduler {
    pub fn start(config: SchedulerConfig, model: Model, tokenizer: Arc<GgufTokenizer>, metrics: Arc<Metrics>) -> Scheduler {
        let (jobs, rx) = mpsc::unbounded_channel();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            model,
            tokenizer,
            per_model: ModelMetrics::new(&metrics, &config.model_id),
            metrics,
            model_id: config.model_id.clone(),
            prefill_chunk: config.prefill_chunk,
            max_batch: config.max_batch,
            prefixes: std::cell::RefCell::new(PrefixCache::new(config.prefix_cache_bytes)),
            panic_on: std::env::var(PANIC_ON_VAR).ok().filter(|s| !s.is_empty()),
        };
        let thread = std::thread::Builder::new()
            .name(format!("wisp-engine-{}", config.model_id))
            .spawn(move || worker.supervise(rx))
            .expect("spawning the engine thread failed; this is a bug");
        Scheduler { jobs, thread, in_flight, max_in_flight: config.max_batch + config.max_queue, model_id: config.model_id }
    }

    /// Stops the engine thread and waits for it to exit (the model's memory is freed with
    /// it). For an unloaded model that no request holds any more.
    pub fn stop(self) {
        let Scheduler { jobs, thread, .. } = self;
        drop(jobs);
        if thread.join().is_err() {
            tracing::error!("the engine thread panicked while stopping");
        }
    }

    /// Whether the engine thread is running (what readiness reports).
    pub fn is_alive(&self) -> bool {
        !self.thread.is_finished()
    }

    /// Queues a request (with its compiled constraint, if any).
    pub fn schedule(&self, request: GenerateRequest, grammar: Option<Grammar>) -> Result<TokenStream, EngineError> {
        // `max_batch` running plus `max_queue` waiting.
        let admitted =
            self.in_flight.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < self.max_in_flight).then_some(n + 1)).is_ok();
        if !admitted {
            return Err(EngineError::Overloaded(self.model_id.clone()));
        }
        let admission = Admission(self.in_flight.clone());
        let (events, stream) = mpsc::unbounded_channel();
        let queued = tracing::info_span!(parent: &request.span, "queue", model = %self.model_id);
        if self.jobs.send(Job { request, grammar, events, queued, admission }).is_err() {
            return Err(EngineError::Stopped(self.model_id.clone()));
        }
        Ok(stream)
    }
}

/// The metric handles of one model, looked up once (not per token).
struct ModelMetrics {
    queue: prometheus::Histogram,
    ttft: prometheus::Histogram,
    itl: prometheus::Histogram,
    prompt_tokens: prometheus::IntCounter,
    generation_tokens: prometheus::IntCounter,
    prefix_hit_tokens: prometheus::IntCounter,
    batch_size: prometheus::Histogram,
    running: prometheus::IntGauge,
    waiting: prometheus::IntGauge,
    kv_usage: prometheus::Gauge,
    kv_bytes: prometheus::IntGauge,
    prefix_bytes: prometheus::IntGauge,
    grammar_mask: prometheus::Histogram,
}

impl ModelMetrics {
    fn new(metrics: &Metrics, model: &str) -> ModelMetrics {
        let label = [model];
        ModelMetrics {
            queue: metrics.queue_seconds.with_label_values(&label),
            ttft: metrics.ttft_seconds.with_label_values(&label),
            itl: metrics.itl_seconds.with_label_values(&label),
            prompt_tokens: metrics.prompt_tokens.with_label_values(&label),
            generation_tokens: metrics.generation_tokens.with_label_values(&label),
            batch_size: metrics.batch_size.with_label_values(&label),
            prefix_hit_tokens: metrics.prefix_hit_tokens.with_label_values(&label),
            running: metrics.requests_running.with_label_values(&label),
            waiting: metrics.requests_waiting.with_label_values(&label),
            kv_usage: metrics.kv_cache_usage.with_label_values(&label),
            kv_bytes: metrics.kv_cache_bytes.with_label_values(&label),
            prefix_bytes: metrics.prefix_cache_bytes.with_label_values(&label),
            grammar_mask: metrics.grammar_mask_seconds.with_label_values(&label),
        }
    }
}

struct Worker {
    model: Model,
    tokenizer: Arc<GgufTokenizer>,
    metrics: Arc<Metrics>,
    per_model: ModelMetrics,
    model_id: String,
    prefill_chunk: usize,
    max_batch: usize,
    prefixes: std::cell::RefCell<PrefixCache>,
    /// Fault injection for tests: a prompt whose text contains this panics the engine
    /// thread (set by [`PANIC_ON_VAR`]; never set in production).
    panic_on: Option<String>,
}

/// Tests set this to make the engine panic on a prompt containing its value.
pub const PANIC_ON_VAR: &str = "WISPTEST_ENGINE_PANIC_ON";

/// Prompts shorter than this are prefilled, not looked up.
const MIN_REUSE_TOKENS: usize = 16;

/// The KV caches of finished sequences with the tokens they hold, most recently used last,
/// within a memory budget (least recently used evicted first). A new prompt that starts
/// with one of them (a session's next turn starts with the previous turn's prompt and reply;
/// many requests share a system prompt) copies that prefix instead of prefilling it.
struct PrefixCache {
    entries: Vec<(Vec<u32>, SeqCache)>,
    bytes: usize,
    budget: usize,
}

impl PrefixCache {
    fn new(budget: usize) -> PrefixCache {
        PrefixCache { entries: Vec::new(), bytes: 0, budget }
    }

    /// The entry sharing the longest prefix with `prompt` (at most `prompt.len() - 1`
    /// tokens: the last one is fed to get logits; with recurrent layers, at a position whose
    /// state the entry kept), moved to the most recent place.
    fn lookup(&mut self, prompt: &[u32]) -> Option<(usize, &SeqCache)> {
        let limit = prompt.len().saturating_sub(1);
        let (idx, shared) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (tokens, cache))| (i, cache.reusable(tokens.iter().zip(prompt).take(limit).take_while(|(a, b)| a == b).count())))
            .max_by_key(|(_, shared)| *shared)?;
        if shared < MIN_REUSE_TOKENS {
            return None;
        }
        let entry = self.entries.remove(idx);
        self.entries.push(entry);
        self.entries.last().map(|(_, cache)| (shared, cache))
    }

    /// Forgets every entry.
    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Keeps `cache` (holding `tokens`), compacted to its length, evicting the least
    /// recently used entries to stay within the budget.
    fn insert(&mut self, model: &Model, tokens: Vec<u32>, cache: &SeqCache) -> candle_core::Result<()> {
        if tokens.len() < MIN_REUSE_TOKENS || self.budget == 0 {
            return Ok(());
        }
        let mut compact = model.new_cache(tokens.len())?;
        compact.copy_prefix(cache, tokens.len())?;
        // One entry per distinct history: a longer sequence replaces those it extends,
        // where it can continue from their end (with recurrent layers, only where it kept
        // their state).
        let before = self.entries.len();
        self.entries.retain(|(old, _)| !(tokens.starts_with(old) && compact.reusable(old.len()) == old.len()));
        if self.entries.len() != before {
            self.bytes = self.entries.iter().map(|(_, c)| c.bytes()).sum();
        }
        let size = compact.bytes();
        if size > self.budget {
            return Ok(());
        }
        while self.bytes + size > self.budget && !self.entries.is_empty() {
            let (_, evicted) = self.entries.remove(0);
            self.bytes -= evicted.bytes();
        }
        self.bytes += size;
        self.entries.push((tokens, compact));
        Ok(())
    }
}

/// A sequence being generated.
struct Sequence {
    request: GenerateRequest,
    events: mpsc::UnboundedSender<StreamEvent>,
    _admission: Admission,
    cache: SeqCache,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// Generated tokens already fed back (in the cache after the prompt).
    fed: Vec<u32>,
    /// The token to feed next, once the prompt is in.
    next: Option<u32>,
    sampler: Sampler,
    /// The response format's grammar: masks the logits before each sample.
    grammar: Option<Grammar>,
    detok: Detokenizer,
    stop: StopMatcher,
    generated: usize,
    last_token_at: Instant,
    /// Open while the prompt is prefilled, then while it decodes (their close logs the time).
    phase: tracing::Span,
    finished: bool,
}

impl Worker {
    /// Runs the engine until every [`Scheduler`] handle is gone, surviving panics: the
    /// sequences of the step that panicked fail with an error event, kept prefixes are
    /// dropped, and the queue is served on.
    fn supervise(self, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut queue: VecDeque<Job> = VecDeque::new();
        let mut live: Vec<Sequence> = Vec::new();
        loop {
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(&mut rx, &mut queue, &mut live)));
            let Err(panic) = run else { return };
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            tracing::error!(model = %self.model_id, error = %message, running = live.len(), "the engine panicked; failing the running requests and going on");
            self.metrics.errors.with_label_values(&["engine_panic"]).inc();
            for seq in live.drain(..) {
                let _ = seq.events.send(StreamEvent::Error(format!("the engine failed: {message}")));
            }
            self.prefixes.borrow_mut().clear();
            self.per_model.running.set(0);
            self.report_kv_usage(&live);
        }
    }

    fn run(&self, rx: &mut mpsc::UnboundedReceiver<Job>, queue: &mut VecDeque<Job>, live: &mut Vec<Sequence>) {
        loop {
            if live.is_empty() && queue.is_empty() {
                // Idle: the KV caches of the sequences that just finished go back to the OS.
                super::release_free_memory();
                match rx.blocking_recv() {
                    Some(job) => queue.push_back(job),
                    None => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                queue.push_back(job);
            }
            while live.len() < self.max_batch
                && let Some(job) = queue.pop_front()
            {
                match self.admit(job) {
                    Ok(Some(seq)) => live.push(seq),
                    Ok(None) => {}
                    Err((events, e)) => self.fail(&events, &e),
                }
            }
            self.per_model.waiting.set(queue.len() as i64);
            self.per_model.running.set(live.len() as i64);
            self.report_kv_usage(live);
            if live.is_empty() {
                continue;
            }
            if let Err(e) = self.step(live) {
                // A failed step fails every sequence in it; the engine goes on.
                for seq in live.drain(..) {
                    self.fail(&seq.events, &e);
                }
            }
            for seq in live.iter().filter(|s| s.is_over()) {
                let tokens: Vec<u32> = seq.request.prompt.tokens()[..seq.prefilled].iter().chain(&seq.fed).copied().collect();
                if tokens.len() == seq.cache.len()
                    && let Err(e) = self.prefixes.borrow_mut().insert(&self.model, tokens, &seq.cache)
                {
                    tracing::warn!(model = %self.model_id, error = %e, "keeping a prefix failed");
                }
            }
            live.retain(|seq| !seq.is_over());
            self.per_model.running.set(live.len() as i64);
            self.report_kv_usage(live);
        }
    }

    /// The KV positions the running sequences hold, as a fraction of `max_batch` whole
    /// contexts (what the inference gateway's endpoint picker reads as KV-cache usage), and
    /// the bytes of KV cache held by them and by the prefix cache.
    fn report_kv_usage(&self, live: &[Sequence]) {
        let held: usize = live.iter().map(|s| s.cache.capacity()).sum();
        let capacity = (self.max_batch * self.model.max_len()).max(1);
        self.per_model.kv_usage.set(held as f64 / capacity as f64);
        let bytes: usize = live.iter().map(|s| s.cache.bytes()).sum();
        self.per_model.kv_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        let kept = self.prefixes.borrow().bytes;
        self.per_model.prefix_bytes.set(i64::try_from(kept).unwrap_or(i64::MAX));
    }

    fn fail(&self, events: &mpsc::UnboundedSender<StreamEvent>, e: &candle_core::Error) {
        tracing::error!(model = %self.model_id, error = %e, "generation failed");
        self.metrics.errors.with_label_values(&["engine"]).inc();
        let _ = events.send(StreamEvent::Error(format!("the engine failed: {e}")));
    }

    /// Starts a sequence; `None` if its client is already gone.
    #[allow(clippy::result_large_err)]
    fn admit(&self, job: Job) -> Result<Option<Sequence>, (mpsc::UnboundedSender<StreamEvent>, candle_core::Error)> {
        let Job { request, grammar, events, queued, admission } = job;
        drop(queued);
        if events.is_closed() {
            return Ok(None);
        }
        if let Some(magic) = &self.panic_on
            && self.tokenizer.tokenizer.decode(request.prompt.tokens(), false).is_ok_and(|text| text.contains(magic.as_str()))
        {
            panic!("{PANIC_ON_VAR} matched the prompt (injected fault)");
        }
        self.per_model.queue.observe(request.received.elapsed().as_secs_f64());
        let mut cache = match self.model.new_cache(request.prompt.len() + request.max_tokens) {
            Ok(cache) => cache,
            Err(e) => return Err((events, e)),
        };
        let mut prefilled = 0;
        if let Some((shared, source)) = self.prefixes.borrow_mut().lookup(request.prompt.tokens()) {
            match cache.copy_prefix(source, shared) {
                Ok(()) => {
                    prefilled = shared;
                    self.per_model.prefix_hit_tokens.inc_by(shared as u64);
                }
                Err(e) => return Err((events, e)),
            }
        }
        let phase = tracing::info_span!(parent: &request.span, "prefill", model = %self.model_id, prompt_tokens = request.prompt.len());
        Ok(Some(Sequence {
            sampler: Sampler::new(request.sampling.clone(), request.prompt.tokens()),
            grammar,
            stop: StopMatcher::new(request.stop.iter().cloned()),
            request,
            events,
            _admission: admission,
            cache,
            prefilled,
            fed: Vec::new(),
            next: None,
            detok: Detokenizer::new(),
            generated: 0,
            last_token_at: Instant::now(),
            phase,
            finished: false,
        }))
    }

    /// One batched forward pass: a decode token for every sequence past its prompt, and
    /// prompt chunks within the step's token budget; then each sequence whose prompt is in
    /// samples from its logits.
    fn step(&self, live: &mut [Sequence]) -> candle_core::Result<()> {
        let decoding = live.iter().filter(|s| s.next.is_some()).count();
        let mut budget = self.prefill_chunk.saturating_sub(decoding).max(1);
        // What each sequence feeds this step (a range of its prompt, or its next token).
        let mut feeds: Vec<(usize, Vec<u32>)> = Vec::with_capacity(live.len());
        for (i, seq) in live.iter().enumerate() {
            if let Some(token) = seq.next {
                feeds.push((i, vec![token]));
            } else if budget > 0 {
                let end = (seq.prefilled + budget).min(seq.request.prompt.len());
                budget -= end - seq.prefilled;
                feeds.push((i, seq.request.prompt.tokens()[seq.prefilled..end].to_vec()));
            }
        }
        self.per_model.batch_size.observe(feeds.len() as f64);
        // The grammars of the sequences that sample after this pass compute their masks on
        // a thread of their own while the forward pass runs.
        let mut grammars: Vec<(usize, Grammar)> = Vec::new();
        for (i, tokens) in &feeds {
            let seq = &mut live[*i];
            if (seq.next.is_some() || seq.prefilled + tokens.len() >= seq.request.prompt.len())
                && let Some(grammar) = seq.grammar.take()
            {
                grammars.push((*i, grammar));
            }
        }
        let (logits, masks) = std::thread::scope(|scope| {
            let timer = &self.per_model.grammar_mask;
            let masking = (!grammars.is_empty()).then(|| {
                scope.spawn(|| {
                    let masks: Vec<_> = grammars
                        .iter_mut()
                        .map(|(_, g)| {
                            let started = Instant::now();
                            let mask = g.mask();
                            timer.observe(started.elapsed().as_secs_f64());
                            mask
                        })
                        .collect();
                    masks
                })
            });
            let mut caches: Vec<Option<&mut SeqCache>> = live.iter_mut().map(|s| Some(&mut s.cache)).collect();
            let mut segments: Vec<Segment<'_>> =
                feeds.iter().map(|(i, tokens)| Segment { tokens, cache: caches[*i].take().expect("one feed per sequence") }).collect();
            let logits = self.model.forward_batch(&mut segments);
            let masks = masking.map(|m| m.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).unwrap_or_default();
            (logits, masks)
        });
        let mut masks: Vec<Option<Result<SimpleVob, String>>> = {
            let mut by_seq: Vec<Option<Result<SimpleVob, String>>> = (0..live.len()).map(|_| None).collect();
            for ((i, grammar), mask) in grammars.into_iter().zip(masks) {
                live[i].grammar = Some(grammar);
                by_seq[i] = Some(mask);
            }
            by_seq
        };
        let logits = logits?;
        for (row, (i, tokens)) in feeds.iter().enumerate() {
            let seq = &mut live[*i];
            if seq.next.is_some() {
                seq.fed.push(tokens[0]);
            } else {
                seq.prefilled += tokens.len();
                if seq.prefilled < seq.request.prompt.len() {
                    continue;
                }
                self.per_model.prompt_tokens.inc_by(seq.request.prompt.len() as u64);
                // A recurrent model's state after the prompt: the next turn's prompt repeats
                // this one, but the reply it repeats may tokenize otherwise.
                seq.cache.checkpoint();
                seq.phase =
                    tracing::info_span!(parent: &seq.request.span, "decode", model = %self.model_id, tokens = tracing::field::Empty);
            }
            let mut row_logits = logits.get(row)?.to_vec1::<f32>()?;
            self.advance(seq, &mut row_logits, masks[*i].take());
        }
        Ok(())
    }

    /// Samples one token from `logits` (within the grammar's `mask`, if constrained) and
    /// sends what it releases; sets `next` to feed it, or closes the sequence.
    fn advance(&self, seq: &mut Sequence, logits: &mut [f32], mask: Option<Result<SimpleVob, String>>) {
        let m = &self.per_model;
        let tokenizer = &self.tokenizer.tokenizer;
        let prompt_tokens = seq.request.prompt.len();
        if let Some(mask) = mask {
            let eos = self.tokenizer.eos.unwrap_or(u32::MAX);
            match mask {
                Ok(mask) => grammar::apply_mask(logits, &mask, eos, &self.tokenizer.stop_ids),
                Err(e) => return self.end_constrained(seq, &e),
            }
            if logits.iter().all(|l| *l == f32::NEG_INFINITY) {
                return self.end_constrained(seq, "the grammar allows no token here");
            }
        }
        let sampled = seq.sampler.sample(logits);
        // Past a stop token nothing is consumed: the grammar allowed it only when complete.
        let grammar_done = match &mut seq.grammar {
            Some(g) if !self.tokenizer.stop_ids.contains(&sampled.token) => match g.consume(sampled.token) {
                Ok(()) => g.is_finished(),
                Err(e) => return self.end_constrained(seq, &e),
            },
            _ => false,
        };
        seq.generated += 1;
        let now = Instant::now();
        if seq.generated == 1 {
            m.ttft.observe(seq.request.received.elapsed().as_secs_f64());
        } else {
            m.itl.observe((now - seq.last_token_at).as_secs_f64());
        }
        seq.last_token_at = now;
        m.generation_tokens.inc();
        let generated = seq.generated;
        let finish =
            |reason: FinishReason, text: String| StreamEvent::Finished { text, reason, prompt_tokens, completion_tokens: generated };
        let done = if self.tokenizer.stop_ids.contains(&sampled.token) {
            let rest = seq.detok.finish(tokenizer);
            let mut text = seq.stop.push(&rest).text;
            text.push_str(&seq.stop.finish());
            let _ = seq.events.send(finish(FinishReason::Stop, text));
            true
        } else {
            let piece = seq.detok.push(tokenizer, sampled.token);
            let matched = seq.stop.push(&piece);
            let logprob = sampled.logprob.map(|logprob| TokenLogprob {
                token: self.tokenizer.token_text(sampled.token),
                logprob,
                top: sampled.top.iter().map(|(id, lp)| (self.tokenizer.token_text(*id), *lp)).collect(),
            });
            let stopped = matched.stopped.is_some();
            let _ = seq.events.send(StreamEvent::Token { id: sampled.token, text: matched.text, logprob });
            if stopped {
                let _ = seq.events.send(finish(FinishReason::Stop, String::new()));
                true
            } else if grammar_done || generated >= seq.request.max_tokens || seq.cache.len() + 1 > seq.cache.capacity() {
                let rest = seq.detok.finish(tokenizer);
                let mut text = seq.stop.push(&rest).text;
                let reason = if grammar_done || seq.stop.is_stopped() { FinishReason::Stop } else { FinishReason::Length };
                text.push_str(&seq.stop.finish());
                let _ = seq.events.send(finish(reason, text));
                true
            } else {
                false
            }
        };
        seq.next = Some(sampled.token);
        if done {
            seq.phase.record("tokens", generated);
            seq.finished = true;
        }
    }
}

impl Worker {
    /// Ends a constrained sequence whose grammar failed (a bug in it, or an internal limit
    /// reached): an error, never unconstrained output.
    fn end_constrained(&self, seq: &mut Sequence, error: &str) {
        tracing::error!(model = %self.model_id, error, "constrained decoding failed");
        self.metrics.errors.with_label_values(&["grammar"]).inc();
        let _ = seq.events.send(StreamEvent::Error(format!("constrained decoding failed: {error}")));
        seq.finished = true;
    }
}

impl Sequence {
    /// Finished, or its client is gone.
    fn is_over(&self) -> bool {
        self.finished || self.events.is_closed()
    }
}
