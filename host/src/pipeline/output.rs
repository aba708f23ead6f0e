//! The output side of a request, from the engine's token stream to the transport: every
//! event passes through the request's plugins (`on-chunk`, then `on-finish` at the end)
//! and into its session turn. A task of its own drives it, so no transport can drop that
//! work half-done: the transport only receives finished steps from a channel (which is
//! cancel-safe in a `select!`). Whatever ends the request — the end of generation, a
//! plugin's stop, a failure, the client's cancel, a hang-up (the [`Output`] dropped) —
//! the driver finishes the plugins exactly once and writes the turn exactly once.

use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use std::sync::Arc;

use super::turn::TurnRecord;
use crate::engine::Backend;
use crate::engine::{FinishReason, StreamEvent, TokenStream};
use crate::error::ApiError;
use crate::policy::{self, PolicySession};
use crate::shutdown::Shutdown;

/// Steps the driver may run ahead of a slow client.
const OUTPUT_BUFFER: usize = 64;

/// A request's plugins on the output side.
pub struct Governed {
    pub session: PolicySession,
    pub prompt_tokens: usize,
    generated: usize,
    /// `on-finish` ran (it runs once, however the output ends).
    finished: bool,
}

impl Governed {
    pub fn new(session: PolicySession, prompt_tokens: usize) -> Governed {
        Governed { session, prompt_tokens, generated: 0, finished: false }
    }

    /// One engine event in, the events to frame out; `true` once the output is over.
    async fn apply(&mut self, event: StreamEvent) -> Result<(Vec<StreamEvent>, bool), ApiError> {
        match event {
            StreamEvent::Token { id, text, logprob } => {
                self.generated += 1;
                self.session.record_usage(self.usage());
                let (text, stop) = self.session.on_chunk(text).await?;
                let mut out = vec![StreamEvent::Token { id, text, logprob }];
                if stop {
                    let rest = self.finish(FinishReason::Stop.as_str()).await?;
                    out.push(StreamEvent::Finished {
                        text: rest,
                        reason: FinishReason::Stop,
                        prompt_tokens: self.prompt_tokens,
                        completion_tokens: self.generated,
                    });
                }
                Ok((out, stop))
            }
            StreamEvent::Finished { text, reason, prompt_tokens, completion_tokens } => {
                // The backend's count wins over the pipeline's (an upstream's real usage
                // over wisp's estimate).
                self.prompt_tokens = prompt_tokens;
                self.generated = completion_tokens;
                let (mut text, _) = self.session.on_chunk(text).await?;
                text.push_str(&self.finish(reason.as_str()).await?);
                Ok((vec![StreamEvent::Finished { text, reason, prompt_tokens, completion_tokens }], true))
            }
            StreamEvent::Error(message) => {
                let _ = self.finish("error").await;
                Ok((vec![StreamEvent::Error(message)], true))
            }
        }
    }

    fn usage(&self) -> policy::Usage {
        policy::Usage {
            prompt_tokens: self.prompt_tokens.min(u32::MAX as usize) as u32,
            completion_tokens: self.generated.min(u32::MAX as usize) as u32,
        }
    }

    /// `on-finish` for every plugin, once; a second call returns nothing.
    async fn finish(&mut self, reason: &str) -> Result<String, ApiError> {
        if std::mem::replace(&mut self.finished, true) {
            return Ok(String::new());
        }
        Ok(self.session.finish(policy::Finish { reason: reason.to_string(), usage: self.usage() }).await?)
    }
}

/// What the driver sends the transport.
enum Step {
    /// Events to frame, and whether the output is over.
    Events(Vec<StreamEvent>, bool),
    Failed(ApiError),
    /// The answer to a cancel: text plugins released at the end, and the usage so far.
    Cancelled {
        tail: String,
        completion_tokens: usize,
    },
}

/// The transport's end of a request's output. Dropping it cancels the generation.
pub struct Output {
    steps: mpsc::Receiver<Step>,
    cancel: Option<oneshot::Sender<()>>,
    prompt_tokens: usize,
}

impl Output {
    /// Starts the driver task for a scheduled generation. `model` is held until the output
    /// ends, so an unloaded model serves its running requests to the end.
    pub fn new(
        stream: TokenStream,
        governed: Option<Governed>,
        turn: Option<TurnRecord>,
        prompt_tokens: usize,
        model: Option<Arc<dyn Backend>>,
    ) -> Output {
        let (tx, steps) = mpsc::channel(OUTPUT_BUFFER);
        let (cancel, cancelled) = oneshot::channel();
        let driver = Driver { stream, governed, turn, prompt_tokens, generated: 0, _model: model };
        tokio::spawn(driver.run(tx, cancelled).instrument(tracing::Span::current()));
        Output { steps, cancel: Some(cancel), prompt_tokens }
    }

    /// The prompt's length in tokens.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// The next events to frame and whether the output is over; `None` if the engine
    /// stopped without finishing. A session turn is stored before its last event arrives.
    pub async fn next(&mut self) -> Result<Option<(Vec<StreamEvent>, bool)>, ApiError> {
        match self.steps.recv().await {
            Some(Step::Events(events, done)) => Ok(Some((events, done))),
            Some(Step::Failed(e)) => Err(e),
            Some(Step::Cancelled { .. }) | None => Ok(None),
        }
    }

    /// [`Output::next`], or the `server_shutting_down` error once the shutdown grace
    /// period is over.
    pub async fn next_before(&mut self, shutdown: &Shutdown) -> Result<Option<(Vec<StreamEvent>, bool)>, ApiError> {
        tokio::select! {
            next = self.next() => next,
            () = shutdown.ended() => Err(ApiError::shutting_down()),
        }
    }

    /// Stops the generation at the client's request: plugins hear `on-finish` with reason
    /// `cancelled`, a session keeps the partial reply. Returns the text not yet delivered
    /// (the plugins' tail included) and the usage so far.
    pub async fn cancel(mut self) -> Result<(String, usize, usize), ApiError> {
        if let Some(cancel) = self.cancel.take() {
            let _ = cancel.send(());
        }
        let mut rest = String::new();
        while let Some(step) = self.steps.recv().await {
            match step {
                Step::Events(events, _) => {
                    for event in events {
                        match event {
                            StreamEvent::Token { text, .. } => rest.push_str(&text),
                            // It ended on its own before the cancel arrived.
                            StreamEvent::Finished { text, completion_tokens, .. } => {
                                rest.push_str(&text);
                                return Ok((rest, self.prompt_tokens, completion_tokens));
                            }
                            StreamEvent::Error(message) => return Err(ApiError::engine_failure(message)),
                        }
                    }
                }
                Step::Failed(e) => return Err(e),
                Step::Cancelled { tail, completion_tokens } => {
                    rest.push_str(&tail);
                    return Ok((rest, self.prompt_tokens, completion_tokens));
                }
            }
        }
        Err(ApiError::engine_failure("the engine ended the stream without finishing".into()))
    }
}

/// The task behind an [`Output`].
struct Driver {
    stream: TokenStream,
    governed: Option<Governed>,
    turn: Option<TurnRecord>,
    prompt_tokens: usize,
    generated: usize,
    _model: Option<Arc<dyn Backend>>,
}

impl Driver {
    async fn run(mut self, tx: mpsc::Sender<Step>, mut cancelled: oneshot::Receiver<()>) {
        loop {
            let event = tokio::select! {
                biased;
                asked = &mut cancelled => {
                    // `Ok`: the client's cancel; `Err`: the Output was dropped (hang-up).
                    let tail = self.cancel().await;
                    if asked.is_ok() {
                        let step = match tail {
                            Ok(tail) => Step::Cancelled { tail, completion_tokens: self.generated },
                            Err(e) => Step::Failed(e),
                        };
                        let _ = tx.send(step).await;
                    }
                    return;
                }
                event = self.stream.recv() => event,
            };
            let Some(event) = event else {
                // The engine dropped the request without an end (it stopped or failed).
                self.end("error").await;
                return;
            };
            let step = self.apply(event).await;
            let over = match &step {
                Step::Events(_, done) => *done,
                _ => true,
            };
            if over {
                // Whatever ended it, nothing is owed any more (a failure finishes the rest).
                self.end("error").await;
            }
            if tx.send(step).await.is_err() {
                let _ = self.cancel().await;
                return;
            }
            if over {
                return;
            }
        }
    }

    /// One engine event through the plugins and into the session turn.
    async fn apply(&mut self, event: StreamEvent) -> Step {
        match &event {
            StreamEvent::Token { .. } => self.generated += 1,
            StreamEvent::Finished { prompt_tokens, .. } => self.prompt_tokens = *prompt_tokens,
            StreamEvent::Error(_) => {}
        }
        let (events, done) = match &mut self.governed {
            Some(governed) => match governed.apply(event).await {
                Ok(applied) => applied,
                Err(e) => return Step::Failed(e),
            },
            None => {
                let done = !matches!(event, StreamEvent::Token { .. });
                (vec![event], done)
            }
        };
        if let Some(turn) = &mut self.turn {
            for event in &events {
                let written = match event {
                    StreamEvent::Token { text, .. } => {
                        turn.push(text);
                        Ok(())
                    }
                    StreamEvent::Finished { text, reason, completion_tokens, .. } => {
                        turn.push(text);
                        turn.write(reason.as_str(), self.prompt_tokens, *completion_tokens).await
                    }
                    StreamEvent::Error(_) => turn.write("error", self.prompt_tokens, self.generated).await,
                };
                if let Err(e) = written {
                    return Step::Failed(e);
                }
            }
        }
        Step::Events(events, done)
    }

    /// Stops the engine, finishes the plugins (`cancelled`) and keeps the partial reply.
    async fn cancel(&mut self) -> Result<String, ApiError> {
        self.stream.close();
        let tail = match &mut self.governed {
            Some(governed) => governed.finish("cancelled").await,
            None => Ok(String::new()),
        };
        if let Some(turn) = &mut self.turn {
            turn.push(tail.as_deref().unwrap_or_default());
            turn.write("cancelled", self.prompt_tokens, self.generated).await?;
        }
        tail
    }

    /// Settles whatever is still owed after the output ended or failed: `on-finish` for
    /// plugins that have not heard it, and the turn, marked `reason`.
    async fn end(&mut self, reason: &str) {
        if let Some(governed) = &mut self.governed
            && let Err(e) = governed.finish(reason).await
        {
            tracing::warn!(error = %e, "on-finish after a failed output failed");
        }
        if let Some(turn) = &mut self.turn
            && let Err(e) = turn.write(reason, self.prompt_tokens, self.generated).await
        {
            tracing::error!(error = %e, "storing the turn failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str) -> StreamEvent {
        StreamEvent::Token { id: 1, text: text.into(), logprob: None }
    }

    fn finished(text: &str, completion_tokens: usize) -> StreamEvent {
        StreamEvent::Finished { text: text.into(), reason: FinishReason::Length, prompt_tokens: 3, completion_tokens }
    }

    #[tokio::test]
    async fn events_pass_through_in_order_and_the_end_is_the_last() {
        let (engine, stream) = mpsc::unbounded_channel();
        let mut output = Output::new(stream, None, None, 3, None);
        engine.send(token("a")).unwrap();
        engine.send(token("b")).unwrap();
        engine.send(finished("c", 2)).unwrap();
        let mut seen = Vec::new();
        while let Some((events, done)) = output.next().await.unwrap() {
            seen.extend(events);
            if done {
                break;
            }
        }
        assert_eq!(seen, vec![token("a"), token("b"), finished("c", 2)]);
        assert!(output.next().await.unwrap().is_none(), "nothing after the end");
    }

    #[tokio::test]
    async fn an_engine_that_drops_the_request_ends_the_output() {
        let (engine, stream) = mpsc::unbounded_channel();
        let mut output = Output::new(stream, None, None, 3, None);
        engine.send(token("a")).unwrap();
        drop(engine);
        assert_eq!(output.next().await.unwrap(), Some((vec![token("a")], false)));
        assert_eq!(output.next().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_cancel_stops_the_engine_and_returns_what_was_not_delivered() {
        let (engine, stream) = mpsc::unbounded_channel();
        let output = Output::new(stream, None, None, 3, None);
        engine.send(token("x")).unwrap();
        tokio::task::yield_now().await;
        let (rest, prompt, _) = output.cancel().await.unwrap();
        assert_eq!((rest.as_str(), prompt), ("x", 3));
        // The driver dropped the engine's stream: the engine sees its client gone.
        tokio::time::timeout(std::time::Duration::from_secs(1), engine.closed()).await.expect("the engine was not told");
    }

    #[tokio::test]
    async fn a_hang_up_stops_the_engine() {
        let (engine, stream) = mpsc::unbounded_channel();
        let output = Output::new(stream, None, None, 3, None);
        engine.send(token("x")).unwrap();
        drop(output);
        tokio::time::timeout(std::time::Duration::from_secs(1), engine.closed()).await.expect("the engine was not told");
    }
}
