//! A session turn: the new messages and the reply, written to the store whole, once.

use std::sync::Arc;

use super::tools::{self, CallIds, ToolCall};
use crate::error::ApiError;
use crate::store::{SessionStore, Turn, TurnMessage, TurnUsage};

/// How long a turn's write keeps retrying while the store is unreachable (a Postgres
/// restart, a locked SQLite file) before the client is told it failed.
const TURN_WRITE_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(15);

/// The reply of a session turn as it streams; written to the store, whole, when the reply
/// ends (finished, stopped, failed or cancelled). The reply kept is capped at the store's
/// `max_message_bytes`, whatever plugins emitted.
pub struct TurnRecord {
    store: Arc<SessionStore>,
    session_id: String,
    new_messages: Vec<TurnMessage>,
    /// A reply with tools: read back into calls with these ids (the ones the client got).
    tools: Option<CallIds>,
    reply: String,
    /// The reply outgrew the cap and was cut.
    cut: bool,
    written: bool,
}

impl TurnRecord {
    pub fn new(store: Arc<SessionStore>, session_id: String, new_messages: Vec<TurnMessage>, tools: Option<CallIds>) -> TurnRecord {
        TurnRecord { store, session_id, new_messages, tools, reply: String::new(), cut: false, written: false }
    }

    pub fn push(&mut self, text: &str) {
        let room = self.store.max_message_bytes().saturating_sub(self.reply.len());
        if text.len() > room && !self.cut {
            self.cut = true;
            tracing::warn!(session = %self.session_id, limit = self.store.max_message_bytes(), "the reply outgrew the session's message limit; the stored reply is cut");
        }
        self.reply.push_str(crate::policy::checks::truncated(text, room));
    }

    /// Writes the turn, once: a second call does nothing. The write runs in a task of its
    /// own, so it commits (or fails) whole even if the caller is dropped; it retries while
    /// the store is unreachable, for up to [`TURN_WRITE_RETRY_FOR`]. The client hears the
    /// end only after it is stored.
    pub async fn write(&mut self, finish_reason: &str, prompt_tokens: usize, completion_tokens: usize) -> Result<(), ApiError> {
        if std::mem::replace(&mut self.written, true) {
            return Ok(());
        }
        let reply = std::mem::take(&mut self.reply);
        let (reply, reply_tool_calls, finish_reason) = match &self.tools {
            // Stored as the client got it: calls as `tool_calls`, an answer as its text.
            Some(ids) if !self.cut => {
                let answer = tools::answer(&reply, finish_reason == "stop", ids);
                let calls = (!answer.calls.is_empty()).then(|| answer.calls.iter().map(ToolCall::to_openai).collect());
                let finish_reason = answer.finish_reason(finish_reason);
                (answer.content.unwrap_or_default(), calls, finish_reason)
            }
            _ => (reply, None, finish_reason),
        };
        let turn = Turn {
            new_messages: std::mem::take(&mut self.new_messages),
            reply,
            reply_tool_calls,
            finish_reason: finish_reason.to_string(),
            usage: TurnUsage { prompt_tokens: prompt_tokens as i64, completion_tokens: completion_tokens as i64 },
        };
        let (store, id) = (self.store.clone(), self.session_id.clone());
        let write = tokio::spawn(async move {
            let started = std::time::Instant::now();
            loop {
                match store.append_turn(&id, &turn).await {
                    Err(e @ crate::store::StoreError::Db(_)) if !e.is_out_of_space() && started.elapsed() < TURN_WRITE_RETRY_FOR => {
                        tracing::warn!(session = %id, error = %e, "storing the turn failed; retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                    }
                    result => return result,
                }
            }
        });
        match write.await {
            Ok(result) => result.map(|_| ()).map_err(ApiError::from),
            Err(e) => Err(ApiError::engine_failure(format!("storing the turn failed: {e}"))),
        }
    }
}
