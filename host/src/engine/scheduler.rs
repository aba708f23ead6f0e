//! The scheduler: one OS thread owns a model and runs its queue.
//!
//! Requests arrive on a channel and leave as a [`TokenStream`]. This scheduler runs one
//! sequence at a time: prefill in chunks, then decode step by step. Between steps it takes
//! new arrivals into its queue and checks whether the current request's receiver was
//! dropped (the client hung up), which cancels it at once. Each sequence owns its
//! [`SeqCache`](super::model::SeqCache) and sampler, so a batching scheduler can step
//! several of them together without changing this seam.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::mpsc;
use wisp_holdback::StopMatcher;

use super::model::Model;
use super::sampling::Sampler;
use super::tokenizer::{Detokenizer, GgufTokenizer};
use super::{EngineError, FinishReason, GenerateRequest, StreamEvent, TokenLogprob, TokenStream};
use crate::telemetry::Metrics;

pub struct SchedulerConfig {
    pub model_id: String,
    /// Requests waiting behind the running one before `schedule` refuses.
    pub max_queue: usize,
    pub prefill_chunk: usize,
}

struct Job {
    request: GenerateRequest,
    events: mpsc::UnboundedSender<StreamEvent>,
    /// Open while the job waits; closing it logs the queue time.
    queued: tracing::Span,
}

/// The handle the rest of the host holds; the thread stops when it is dropped.
pub struct Scheduler {
    jobs: mpsc::UnboundedSender<Job>,
    /// Requests accepted and not finished (queued + running).
    in_flight: Arc<AtomicUsize>,
    max_queue: usize,
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
            in_flight: in_flight.clone(),
            model_id: config.model_id.clone(),
            prefill_chunk: config.prefill_chunk,
        };
        std::thread::Builder::new()
            .name(format!("wisp-engine-{}", config.model_id))
            .spawn(move || worker.run(rx))
            .expect("spawning the engine thread failed; this is a bug");
        Scheduler { jobs, in_flight, max_queue: config.max_queue, model_id: config.model_id }
    }

    pub fn schedule(&self, request: GenerateRequest) -> Result<TokenStream, EngineError> {
        // One running plus `max_queue` waiting.
        let admitted = self
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n <= self.max_queue).then_some(n + 1))
            .is_ok();
        if !admitted {
            return Err(EngineError::Overloaded(self.model_id.clone()));
        }
        let (events, stream) = mpsc::unbounded_channel();
        let queued = tracing::info_span!(parent: &request.span, "queue", model = %self.model_id);
        if self.jobs.send(Job { request, events, queued }).is_err() {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
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
    running: prometheus::IntGauge,
    waiting: prometheus::IntGauge,
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
            running: metrics.requests_running.with_label_values(&label),
            waiting: metrics.requests_waiting.with_label_values(&label),
        }
    }
}

struct Worker {
    model: Model,
    tokenizer: Arc<GgufTokenizer>,
    metrics: Arc<Metrics>,
    per_model: ModelMetrics,
    in_flight: Arc<AtomicUsize>,
    model_id: String,
    prefill_chunk: usize,
}

/// Whether the sequence goes on after a step.
enum Step {
    Continue,
    Done,
}

impl Worker {
    fn run(self, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut queue: VecDeque<Job> = VecDeque::new();
        loop {
            let job = match queue.pop_front() {
                Some(job) => job,
                None => match rx.blocking_recv() {
                    Some(job) => job,
                    None => return,
                },
            };
            self.set_waiting(queue.len());
            let events = job.events.clone();
            if let Err(e) = self.generate(job, &mut rx, &mut queue) {
                tracing::error!(model = %self.model_id, error = %e, "generation failed");
                self.metrics.errors.with_label_values(&["engine"]).inc();
                let _ = events.send(StreamEvent::Error(format!("the engine failed: {e}")));
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn set_waiting(&self, waiting: usize) {
        self.per_model.waiting.set(waiting as i64);
    }

    /// Moves newly arrived jobs into the local queue (between steps).
    fn drain_arrivals(&self, rx: &mut mpsc::UnboundedReceiver<Job>, queue: &mut VecDeque<Job>) {
        while let Ok(job) = rx.try_recv() {
            queue.push_back(job);
        }
        self.set_waiting(queue.len());
    }

    fn generate(
        &self,
        job: Job,
        rx: &mut mpsc::UnboundedReceiver<Job>,
        queue: &mut VecDeque<Job>,
    ) -> candle_core::Result<()> {
        let Job { request, events, queued } = job;
        drop(queued);
        if events.is_closed() {
            return Ok(());
        }
        let m = &self.per_model;
        m.queue.observe(request.received.elapsed().as_secs_f64());
        m.running.inc();
        let _running = scopeguard(|| m.running.dec());
        let prompt_tokens = request.prompt.len();
        let prefill = tracing::info_span!(parent: &request.span, "prefill", model = %self.model_id, prompt_tokens);
        let prefill_guard = prefill.enter();
        let mut cache = self.model.new_cache(prompt_tokens + request.max_tokens)?;
        let mut logits = None;
        for chunk in request.prompt.chunks(self.prefill_chunk) {
            if events.is_closed() {
                return Ok(());
            }
            logits = Some(self.model.forward(chunk, &mut cache)?);
            self.drain_arrivals(rx, queue);
        }
        drop(prefill_guard);
        drop(prefill);
        m.prompt_tokens.inc_by(prompt_tokens as u64);
        let decode = tracing::info_span!(parent: &request.span, "decode", model = %self.model_id, tokens = tracing::field::Empty);
        let _decode = decode.enter();
        let mut logits = logits.expect("the api never schedules an empty prompt; this is a bug").to_vec1::<f32>()?;

        let tokenizer = &self.tokenizer.tokenizer;
        let mut sampler = Sampler::new(request.sampling.clone(), &request.prompt);
        let mut detok = Detokenizer::new();
        let mut stop = StopMatcher::new(request.stop.iter().cloned());
        let mut generated = 0usize;
        let mut last_token_at = Instant::now();
        let mut first = true;
        let finish = |reason: FinishReason, text: String, generated: usize| StreamEvent::Finished {
            text,
            reason,
            prompt_tokens,
            completion_tokens: generated,
        };
        loop {
            let sampled = sampler.sample(&mut logits);
            generated += 1;
            let now = Instant::now();
            if first {
                m.ttft.observe(request.received.elapsed().as_secs_f64());
                first = false;
            } else {
                m.itl.observe((now - last_token_at).as_secs_f64());
            }
            last_token_at = now;
            m.generation_tokens.inc();

            let step = if self.tokenizer.stop_ids.contains(&sampled.token) {
                let rest = detok.finish(tokenizer);
                let mut text = stop.push(&rest).text;
                text.push_str(&stop.finish());
                let _ = events.send(finish(FinishReason::Stop, text, generated));
                Step::Done
            } else {
                let piece = detok.push(tokenizer, sampled.token);
                let matched = stop.push(&piece);
                let logprob = sampled.logprob.map(|logprob| TokenLogprob {
                    token: self.tokenizer.token_text(sampled.token),
                    logprob,
                    top: sampled.top.iter().map(|(id, lp)| (self.tokenizer.token_text(*id), *lp)).collect(),
                });
                let stopped = matched.stopped.is_some();
                let _ = events.send(StreamEvent::Token { id: sampled.token, text: matched.text, logprob });
                if stopped {
                    let _ = events.send(finish(FinishReason::Stop, String::new(), generated));
                    Step::Done
                } else if generated >= request.max_tokens || cache.len() + 1 > cache.capacity() {
                    let rest = detok.finish(tokenizer);
                    let mut text = stop.push(&rest).text;
                    let reason = if stop.is_stopped() { FinishReason::Stop } else { FinishReason::Length };
                    text.push_str(&stop.finish());
                    let _ = events.send(finish(reason, text, generated));
                    Step::Done
                } else {
                    Step::Continue
                }
            };
            if matches!(step, Step::Done) || events.is_closed() {
                decode.record("tokens", generated);
                return Ok(());
            }
            logits = self.model.forward(&[sampled.token], &mut cache)?.to_vec1::<f32>()?;
            self.drain_arrivals(rx, queue);
        }
    }
}

/// Runs `f` when dropped (so gauges are restored on every exit path, `?` included).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
