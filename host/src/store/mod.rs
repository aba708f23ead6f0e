//! Chat sessions and the plugins' key-value space, in SQLite (the embedded default) or
//! Postgres, through sqlx's `Any` driver: one set of queries (placeholders `$N`, which
//! both backends accept), one migration directory per backend, applied at start.
//!
//! A turn (the new user messages and the assistant's reply with its usage) is written in
//! one transaction when the reply ends, however it ends: a crash mid-reply leaves the
//! history as it was before the turn, never half of it.

pub mod kv;
pub mod responses;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::config::StoreConfig;

/// The principal of requests that no auth plugin identified.
pub const ANONYMOUS: &str = "anonymous";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such session for this principal (another principal's session is "not found" too).
    #[error("no session `{0}`")]
    NotFound(String),
    /// A configured limit or a request value refused.
    #[error("{message}")]
    Invalid { param: &'static str, code: &'static str, message: String },
    #[error("the session store failed: {0}")]
    Db(#[from] sqlx::Error),
    #[error("the session store could not be migrated: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    InUse(String),
}

impl StoreError {
    /// The database is out of disk space (SQLite's `SQLITE_FULL`, Postgres's `disk_full`):
    /// waiting does not help, an operator must.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            StoreError::Db(sqlx::Error::Database(e)) => matches!(e.code().as_deref(), Some("13" | "53100")),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A session as clients see it (`principal` stays on the server).
#[derive(Debug, Clone, Serialize, salvo::oapi::ToSchema)]
pub struct Session {
    pub id: String,
    pub object: &'static str,
    #[serde(skip)]
    pub principal: String,
    pub model: String,
    pub title: String,
    pub system_prompt: Option<String>,
    pub metadata: serde_json::Value,
    /// Unix seconds.
    pub created_at: i64,
    pub updated_at: i64,
    pub message_count: i64,
    /// The paging cursor's precision.
    #[serde(skip)]
    updated_at_ms: i64,
}

/// One stored message; `index` counts from 0 (roll back `message_count - index` messages
/// to edit it).
#[derive(Debug, Clone, Serialize, PartialEq, salvo::oapi::ToSchema)]
pub struct StoredMessage {
    pub index: i64,
    pub role: String,
    pub content: String,
    pub created_at: i64,
    /// An assistant's calls, in OpenAI's `tool_calls` shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// The call a `tool` message answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<TurnUsage>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, salvo::oapi::ToSchema)]
pub struct TurnUsage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// What a client may set on a session.
#[derive(Debug, Clone, Default)]
pub struct SessionFields {
    pub model: Option<String>,
    pub title: Option<String>,
    /// `Some(None)` clears it.
    pub system_prompt: Option<Option<String>>,
    pub metadata: Option<serde_json::Value>,
}

/// A message as a client sends it (OpenAI's roles: `tool` results, assistant calls).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TurnMessage {
    pub role: String,
    pub content: String,
    /// An assistant's calls: OpenAI's `tool_calls` array.
    pub tool_calls: Option<serde_json::Value>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
}

impl TurnMessage {
    pub fn text(role: &str, content: &str) -> TurnMessage {
        TurnMessage { role: role.into(), content: content.into(), ..Default::default() }
    }
}

impl From<StoredMessage> for TurnMessage {
    fn from(m: StoredMessage) -> TurnMessage {
        TurnMessage { role: m.role, content: m.content, tool_calls: m.tool_calls, tool_call_id: m.tool_call_id }
    }
}

/// One finished exchange, written whole.
#[derive(Debug, Clone)]
pub struct Turn {
    /// The messages the client sent with this turn (none when regenerating).
    pub new_messages: Vec<TurnMessage>,
    /// The reply's text (empty for calls only).
    pub reply: String,
    /// The reply's calls, in OpenAI's `tool_calls` shape.
    pub reply_tool_calls: Option<serde_json::Value>,
    pub finish_reason: String,
    pub usage: TurnUsage,
}

/// `SELECT <this> FROM sessions s …`: a session row with its message count.
macro_rules! select_sessions {
    ($($rest:literal),*) => {
        concat!(
            "SELECT s.id, s.principal, s.model, s.title, s.system_prompt, s.metadata, s.created_at, s.updated_at, \
             (SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id) AS message_count FROM sessions s ",
            $($rest),*
        )
    };
}

/// Longest auto-title taken from the first user message, in characters.
const AUTO_TITLE_CHARS: usize = 60;
/// Largest session `metadata`, serialized.
const MAX_METADATA_BYTES: usize = 16 * 1024;

/// Sessions and plugin kv on one connection pool.
pub struct SessionStore {
    pool: AnyPool,
    backend: Backend,
    config: StoreConfig,
    /// On a SQLite file: the lock that makes this process its only server (see
    /// [`lock_sqlite`]).
    _owner: Option<std::fs::File>,
}

/// A pooled connection for one write transaction. The transaction begins with the write
/// lock on SQLite (`BEGIN IMMEDIATE`): a deferred one that reads first and writes later fails
/// with SQLITE_BUSY_SNAPSHOT when another writer commits in between (seen under 32
/// concurrent clients), which `busy_timeout` cannot wait out. Unless it committed, the
/// connection is closed instead of returned to the pool: sqlx leaves a connection whose
/// COMMIT failed (a disk I/O error, a read-only file) mid-transaction, and every later
/// transaction on it would fail.
struct WriteConn {
    conn: sqlx::pool::PoolConnection<sqlx::Any>,
    backend: Backend,
    committed: bool,
}

impl WriteConn {
    async fn begin(&mut self) -> Result<sqlx::Transaction<'_, sqlx::Any>, StoreError> {
        Ok(match self.backend {
            Backend::Sqlite => sqlx::Connection::begin_with(&mut *self.conn, "BEGIN IMMEDIATE").await?,
            Backend::Postgres => sqlx::Connection::begin(&mut *self.conn).await?,
        })
    }
}

impl Drop for WriteConn {
    fn drop(&mut self) {
        if !self.committed {
            self.conn.close_on_drop();
        }
    }
}

/// One wisp process serves a SQLite store: it keeps the plugins' kv in memory and writes it
/// behind (`kv::SqliteKv`), which a second process on the same file would silently
/// overwrite. An exclusive lock on `FILE.lock` beside the database (not on the database
/// itself: closing any descriptor of a file drops the process's POSIX locks on it, SQLite's
/// included), held while the store lives; the kernel lets it go when the process dies, so
/// a restart after `kill -9` takes it again. `None` for an in-memory database.
fn lock_sqlite(url: &str) -> Result<Option<std::fs::File>, StoreError> {
    let path = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Ok(None);
    }
    let lock_path = format!("{path}.lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(|e| {
        StoreError::InUse(format!("cannot create `{lock_path}`, the lock that makes this process the SQLite store's only server: {e}"))
    })?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse(format!(
            "the SQLite store `{path}` is in use by another wisp process (it holds `{lock_path}`): one process serves a SQLite \
             store; replicas share a Postgres store"
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::InUse(format!("cannot lock `{lock_path}`: {e}"))),
    }
}

/// Wall-clock unix milliseconds: shared by replicas, so expiry and ordering agree across them.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl SessionStore {
    /// Connects, creates a SQLite file if missing (WAL journal), and applies migrations.
    pub async fn connect(config: &StoreConfig) -> Result<SessionStore, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = match config.url.split(':').next() {
            Some("postgres" | "postgresql") => Backend::Postgres,
            _ => Backend::Sqlite,
        };
        let url = match backend {
            // Create the file on first start.
            Backend::Sqlite if !config.url.contains("mode=") => {
                format!("{}{}mode=rwc", config.url, if config.url.contains('?') { '&' } else { '?' })
            }
            _ => config.url.clone(),
        };
        let mut options = AnyPoolOptions::new().max_connections(config.max_connections).acquire_timeout(Duration::from_secs(10));
        if backend == Backend::Sqlite {
            // A SQLite connection is a handle in this process: nothing can hang up on it, so
            // sqlx's ping before each checkout (a round trip to the connection's worker
            // thread, on every query: the rate limit's hook paid it twice) tests nothing.
            options = options.test_before_acquire(false).after_connect(|conn, _| {
                Box::pin(async move {
                    // WAL lets readers run beside the writer; NORMAL sync loses nothing on a
                    // process crash. busy_timeout queues writers instead of failing them.
                    sqlx::raw_sql("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;")
                        .execute(conn)
                        .await?;
                    Ok(())
                })
            });
        }
        let owner = match backend {
            Backend::Sqlite => lock_sqlite(&config.url)?,
            Backend::Postgres => None,
        };
        let pool = options.connect(&url).await?;
        match backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite").run(&pool).await?,
            Backend::Postgres => sqlx::migrate!("./migrations/postgres").run(&pool).await?,
        }
        Ok(SessionStore { pool, backend, config: config.clone(), _owner: owner })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Readiness: the store answers a query.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// A connection for one write transaction (see [`WriteConn`]).
    async fn write_conn(&self) -> Result<WriteConn, StoreError> {
        Ok(WriteConn { conn: self.pool.acquire().await?, backend: self.backend, committed: false })
    }

    pub async fn create(&self, principal: &str, model: &str, fields: SessionFields) -> Result<Session, StoreError> {
        let metadata = metadata_text(fields.metadata.as_ref())?;
        let system_prompt = fields.system_prompt.flatten();
        self.check_message(system_prompt.as_deref().unwrap_or(""), "system_prompt")?;
        let mut conn = self.write_conn().await?;
        let mut tx = conn.begin().await?;
        let owned: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM sessions WHERE principal = $1").bind(principal).fetch_one(&mut *tx).await?;
        if owned as u64 >= self.config.max_sessions_per_principal {
            return Err(StoreError::Invalid {
                param: "session",
                code: "session_limit_reached",
                message: format!("you have {owned} sessions, the limit is {}; delete some first", self.config.max_sessions_per_principal),
            });
        }
        let id = format!("sess_{}", uuid::Uuid::new_v4().simple());
        let now = now_ms();
        sqlx::query(
            "INSERT INTO sessions (id, principal, model, title, system_prompt, metadata, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
        )
        .bind(&id)
        .bind(principal)
        .bind(fields.model.as_deref().unwrap_or(model))
        .bind(fields.title.unwrap_or_default())
        .bind(system_prompt)
        .bind(metadata.unwrap_or_else(|| "{}".into()))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        conn.committed = true;
        self.get(principal, &id).await
    }

    /// The principal's sessions, most recently active first; `after` is the last id of the
    /// previous page. Returns the page and whether more follow.
    pub async fn list(&self, principal: &str, limit: usize, after: Option<&str>) -> Result<(Vec<Session>, bool), StoreError> {
        let limit = limit.clamp(1, 100);
        let rows = match after {
            None => {
                sqlx::query(select_sessions!("WHERE s.principal = $1 ORDER BY s.updated_at DESC, s.id DESC LIMIT $2"))
                    .bind(principal)
                    .bind(limit as i64 + 1)
                    .fetch_all(&self.pool)
                    .await?
            }
            Some(after) => {
                let cursor = self.get(principal, after).await?;
                sqlx::query(select_sessions!(
                    "WHERE s.principal = $1 AND (s.updated_at < $2 OR (s.updated_at = $2 AND s.id < $3)) ",
                    "ORDER BY s.updated_at DESC, s.id DESC LIMIT $4"
                ))
                .bind(principal)
                .bind(cursor.updated_at_ms)
                .bind(&cursor.id)
                .bind(limit as i64 + 1)
                .fetch_all(&self.pool)
                .await?
            }
        };
        let mut sessions = rows.iter().map(session_from_row).collect::<Result<Vec<_>, _>>()?;
        let more = sessions.len() > limit;
        sessions.truncate(limit);
        Ok((sessions, more))
    }

    /// One of the principal's sessions.
    pub async fn get(&self, principal: &str, id: &str) -> Result<Session, StoreError> {
        let row = sqlx::query(select_sessions!("WHERE s.id = $1 AND s.principal = $2"))
            .bind(id)
            .bind(principal)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(session_from_row).transpose()?.ok_or_else(|| StoreError::NotFound(id.to_string()))
    }

    /// A session whoever owns it: the chat path learns the caller's principal only from
    /// the plugin chain, which must see the history first; it checks the owner after.
    pub async fn find(&self, id: &str) -> Result<Session, StoreError> {
        let row = sqlx::query(select_sessions!("WHERE s.id = $1")).bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(session_from_row).transpose()?.ok_or_else(|| StoreError::NotFound(id.to_string()))
    }

    /// A session's messages in order.
    pub async fn messages(&self, session: &Session) -> Result<Vec<StoredMessage>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, role, content, created_at, finish_reason, prompt_tokens, completion_tokens, tool_calls, tool_call_id \
             FROM messages WHERE session_id = $1 ORDER BY seq",
        )
        .bind(&session.id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let usage = match (r.try_get::<Option<i64>, _>(5)?, r.try_get::<Option<i64>, _>(6)?) {
                    (Some(prompt_tokens), Some(completion_tokens)) => Some(TurnUsage { prompt_tokens, completion_tokens }),
                    _ => None,
                };
                Ok(StoredMessage {
                    index: r.try_get::<i64, _>(0)? - 1,
                    role: r.try_get(1)?,
                    content: r.try_get(2)?,
                    created_at: r.try_get::<i64, _>(3)? / 1000,
                    // Written by append_turn from a Value: it parses (a hand-edited row
                    // that does not reads as no calls).
                    tool_calls: r.try_get::<Option<String>, _>(7)?.and_then(|t| serde_json::from_str(&t).ok()),
                    tool_call_id: r.try_get(8)?,
                    finish_reason: r.try_get(4)?,
                    usage,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    pub async fn update(&self, principal: &str, id: &str, fields: SessionFields) -> Result<Session, StoreError> {
        let current = self.get(principal, id).await?;
        let metadata = metadata_text(fields.metadata.as_ref())?;
        let system_prompt = fields.system_prompt.unwrap_or(current.system_prompt);
        self.check_message(system_prompt.as_deref().unwrap_or(""), "system_prompt")?;
        sqlx::query(
            "UPDATE sessions SET model = $1, title = $2, system_prompt = $3, metadata = $4, updated_at = $5 \
             WHERE id = $6 AND principal = $7",
        )
        .bind(fields.model.unwrap_or(current.model))
        .bind(fields.title.unwrap_or(current.title))
        .bind(system_prompt)
        .bind(metadata.unwrap_or_else(|| current.metadata.to_string()))
        .bind(now_ms())
        .bind(id)
        .bind(principal)
        .execute(&self.pool)
        .await?;
        self.get(principal, id).await
    }

    pub async fn delete(&self, principal: &str, id: &str) -> Result<(), StoreError> {
        let mut conn = self.write_conn().await?;
        let mut tx = conn.begin().await?;
        let deleted = sqlx::query("DELETE FROM sessions WHERE id = $1 AND principal = $2")
            .bind(id)
            .bind(principal)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted == 0 {
            return Err(StoreError::NotFound(id.to_string()));
        }
        // Explicit rather than ON DELETE CASCADE, which SQLite applies only with a pragma.
        sqlx::query("DELETE FROM messages WHERE session_id = $1").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        conn.committed = true;
        Ok(())
    }

    /// Removes the last `n` messages.
    pub async fn rollback(&self, principal: &str, id: &str, n: i64) -> Result<Session, StoreError> {
        let session = self.get(principal, id).await?;
        if n < 1 || n > session.message_count {
            return Err(StoreError::Invalid {
                param: "messages",
                code: "invalid_rollback",
                message: format!("`messages` must be between 1 and {} (the session's message count), got {n}", session.message_count),
            });
        }
        let mut conn = self.write_conn().await?;
        let mut tx = conn.begin().await?;
        sqlx::query(
            "DELETE FROM messages WHERE session_id = $1 AND seq > (SELECT COALESCE(MAX(seq), 0) FROM messages WHERE session_id = $1) - $2",
        )
        .bind(id)
        .bind(n)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE sessions SET updated_at = $1 WHERE id = $2").bind(now_ms()).bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        conn.committed = true;
        self.get(principal, id).await
    }

    /// Appends a finished turn in one transaction. A session deleted meanwhile takes
    /// nothing (returns `false`).
    pub async fn append_turn(&self, session_id: &str, turn: &Turn) -> Result<bool, StoreError> {
        let mut conn = self.write_conn().await?;
        let mut tx = conn.begin().await?;
        let now = now_ms();
        // Touching the session first takes its row lock (Postgres) or the write lock
        // (SQLite), so two turns of one session append one after the other.
        let touched = sqlx::query("UPDATE sessions SET updated_at = $1 WHERE id = $2")
            .bind(now)
            .bind(session_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if touched == 0 {
            return Ok(false);
        }
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM messages WHERE session_id = $1")
            .bind(session_id)
            .fetch_one(&mut *tx)
            .await?;
        let insert = "INSERT INTO messages (session_id, seq, role, content, finish_reason, prompt_tokens, completion_tokens, created_at, \
                      tool_calls, tool_call_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
        let calls_text = |calls: &Option<serde_json::Value>| calls.as_ref().map(serde_json::Value::to_string);
        let mut seq = last;
        for m in &turn.new_messages {
            seq += 1;
            sqlx::query(insert)
                .bind(session_id)
                .bind(seq)
                .bind(&m.role)
                .bind(&m.content)
                .bind(None::<String>)
                .bind(None::<i64>)
                .bind(None::<i64>)
                .bind(now)
                .bind(calls_text(&m.tool_calls))
                .bind(&m.tool_call_id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(insert)
            .bind(session_id)
            .bind(seq + 1)
            .bind("assistant")
            .bind(&turn.reply)
            .bind(&turn.finish_reason)
            .bind(turn.usage.prompt_tokens)
            .bind(turn.usage.completion_tokens)
            .bind(now)
            .bind(calls_text(&turn.reply_tool_calls))
            .bind(None::<String>)
            .execute(&mut *tx)
            .await?;
        // A new session takes its title from its first user message.
        if let Some(first) = turn.new_messages.iter().find(|m| m.role == "user") {
            let title: String = first.content.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(AUTO_TITLE_CHARS).collect();
            sqlx::query("UPDATE sessions SET title = $1 WHERE id = $2 AND title = ''")
                .bind(title)
                .bind(session_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        conn.committed = true;
        Ok(true)
    }

    /// Refuses a message over the configured size.
    /// The most a stored message (or system prompt) may hold, in bytes.
    pub fn max_message_bytes(&self) -> usize {
        self.config.max_message_bytes
    }

    pub fn check_message(&self, content: &str, param: &'static str) -> Result<(), StoreError> {
        if content.len() > self.config.max_message_bytes {
            return Err(StoreError::Invalid {
                param,
                code: "message_too_large",
                message: format!(
                    "a session message may be at most {} bytes, this one has {}",
                    self.config.max_message_bytes,
                    content.len()
                ),
            });
        }
        Ok(())
    }
}

fn metadata_text(metadata: Option<&serde_json::Value>) -> Result<Option<String>, StoreError> {
    let Some(metadata) = metadata else { return Ok(None) };
    let invalid = |message: String| StoreError::Invalid { param: "metadata", code: "invalid_metadata", message };
    if !metadata.is_object() {
        return Err(invalid("`metadata` must be a JSON object".into()));
    }
    let text = metadata.to_string();
    if text.len() > MAX_METADATA_BYTES {
        return Err(invalid(format!("`metadata` may be at most {MAX_METADATA_BYTES} bytes, got {}", text.len())));
    }
    Ok(Some(text))
}

fn session_from_row(row: &AnyRow) -> Result<Session, StoreError> {
    let metadata: String = row.try_get("metadata")?;
    let updated_at_ms: i64 = row.try_get("updated_at")?;
    Ok(Session {
        id: row.try_get("id")?,
        object: "session",
        principal: row.try_get("principal")?,
        model: row.try_get("model")?,
        title: row.try_get("title")?,
        system_prompt: row.try_get("system_prompt")?,
        metadata: serde_json::from_str(&metadata).unwrap_or_else(|_| serde_json::json!({})),
        created_at: row.try_get::<i64, _>("created_at")? / 1000,
        updated_at: updated_at_ms / 1000,
        message_count: row.try_get("message_count")?,
        updated_at_ms,
    })
}

/// Throwaway databases for tests (unit and end-to-end): a fresh Postgres database per test,
/// dropped at the end, so test runs never see each other's rows.
#[doc(hidden)]
pub mod testing {
    /// The server tests use; CI runs Postgres on 127.0.0.1:5432 with trust auth.
    pub fn postgres_admin_url() -> String {
        std::env::var("WISPTEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    }

    pub struct TestDatabase {
        pub url: String,
        name: String,
    }

    impl TestDatabase {
        pub async fn create() -> TestDatabase {
            use sqlx::Connection;
            let admin = postgres_admin_url();
            let name = format!("wisp_test_{}", uuid::Uuid::new_v4().simple());
            let mut conn = sqlx::PgConnection::connect(&admin).await.expect("Postgres for tests (WISPTEST_POSTGRES_URL)");
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.expect("create test database");
            let base = admin.rsplit_once('/').map(|(base, _)| base).unwrap_or(&admin);
            TestDatabase { url: format!("{base}/{name}"), name }
        }

        pub async fn remove(&self) {
            use sqlx::Connection;
            if let Ok(mut conn) = sqlx::PgConnection::connect(&postgres_admin_url()).await {
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
                    .execute(&mut conn)
                    .await;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    pub use testing::TestDatabase;

    /// Runs `check` on a fresh SQLite file and on a fresh Postgres database.
    async fn on_both<F, Fut>(config: StoreConfig, check: F)
    where
        F: Fn(SessionStore) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("wisp.db").display());
        check(SessionStore::connect(&StoreConfig { url, ..config.clone() }).await.unwrap()).await;
        let db = TestDatabase::create().await;
        check(SessionStore::connect(&StoreConfig { url: db.url.clone(), ..config }).await.unwrap()).await;
        db.remove().await;
    }

    fn turn(user: &str, reply: &str) -> Turn {
        Turn {
            new_messages: vec![TurnMessage::text("user", user)],
            reply: reply.into(),
            reply_tool_calls: None,
            finish_reason: "stop".into(),
            usage: TurnUsage { prompt_tokens: 5, completion_tokens: 2 },
        }
    }

    #[tokio::test]
    async fn sessions_crud_rollback_and_turns() {
        on_both(StoreConfig::default(), |store| async move {
            let s = store
                .create("alice", "m", SessionFields { system_prompt: Some(Some("be brief".into())), ..Default::default() })
                .await
                .unwrap();
            assert_eq!((s.model.as_str(), s.title.as_str(), s.message_count), ("m", "", 0));
            assert!(store.append_turn(&s.id, &turn("hello   there\nfriend", "hi")).await.unwrap());
            assert!(store.append_turn(&s.id, &turn("second", "two")).await.unwrap());
            let s = store.get("alice", &s.id).await.unwrap();
            assert_eq!(s.message_count, 4);
            assert_eq!(s.title, "hello there friend", "the first user message names the session");
            let messages = store.messages(&s).await.unwrap();
            let roles: Vec<_> = messages.iter().map(|m| (m.index, m.role.as_str(), m.content.as_str())).collect();
            assert_eq!(
                roles,
                [(0, "user", "hello   there\nfriend"), (1, "assistant", "hi"), (2, "user", "second"), (3, "assistant", "two")]
            );
            assert_eq!(messages[3].finish_reason.as_deref(), Some("stop"));
            assert_eq!(messages[3].usage, Some(TurnUsage { prompt_tokens: 5, completion_tokens: 2 }));

            let s = store.rollback("alice", &s.id, 1).await.unwrap();
            assert_eq!(s.message_count, 3);
            assert!(matches!(store.rollback("alice", &s.id, 4).await, Err(StoreError::Invalid { .. })));
            let s = store.rollback("alice", &s.id, 3).await.unwrap();
            assert_eq!(s.message_count, 0);

            let s = store
                .update("alice", &s.id, SessionFields { title: Some("renamed".into()), system_prompt: Some(None), ..Default::default() })
                .await
                .unwrap();
            assert_eq!((s.title.as_str(), s.system_prompt.as_deref()), ("renamed", None));
            store.delete("alice", &s.id).await.unwrap();
            assert!(matches!(store.get("alice", &s.id).await, Err(StoreError::NotFound(_))));
            assert!(!store.append_turn(&s.id, &turn("late", "reply")).await.unwrap(), "a deleted session takes no turn");
        })
        .await;
    }

    #[tokio::test]
    async fn tool_calls_and_results_are_stored_with_their_ids() {
        on_both(StoreConfig::default(), |store| async move {
            let s = store.create("alice", "m", SessionFields::default()).await.unwrap();
            let calls = serde_json::json!([{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]);
            let asked = Turn {
                reply: String::new(),
                reply_tool_calls: Some(calls.clone()),
                finish_reason: "tool_calls".into(),
                ..turn("use f", "")
            };
            store.append_turn(&s.id, &asked).await.unwrap();
            let result = TurnMessage { tool_call_id: Some("call_1".into()), ..TurnMessage::text("tool", "42") };
            store.append_turn(&s.id, &Turn { new_messages: vec![result.clone()], ..turn("", "It is 42.") }).await.unwrap();
            let messages: Vec<TurnMessage> = store.messages(&s).await.unwrap().into_iter().map(TurnMessage::from).collect();
            assert_eq!(messages[1], TurnMessage { tool_calls: Some(calls), ..TurnMessage::text("assistant", "") });
            assert_eq!(messages[2], result);
            assert_eq!(messages[3], TurnMessage::text("assistant", "It is 42."));
        })
        .await;
    }

    #[tokio::test]
    async fn another_principal_sees_nothing() {
        on_both(StoreConfig::default(), |store| async move {
            let s = store.create("alice", "m", SessionFields::default()).await.unwrap();
            assert!(matches!(store.get("mallory", &s.id).await, Err(StoreError::NotFound(_))));
            assert!(matches!(store.rollback("mallory", &s.id, 1).await, Err(StoreError::NotFound(_))));
            assert!(matches!(store.delete("mallory", &s.id).await, Err(StoreError::NotFound(_))));
            assert!(matches!(store.update("mallory", &s.id, SessionFields::default()).await, Err(StoreError::NotFound(_))));
            assert!(store.list("mallory", 10, None).await.unwrap().0.is_empty());
            assert_eq!(store.list("alice", 10, None).await.unwrap().0.len(), 1);
        })
        .await;
    }

    #[tokio::test]
    async fn lists_newest_first_in_pages_and_caps_sessions_per_principal() {
        let config = StoreConfig { max_sessions_per_principal: 5, ..StoreConfig::default() };
        on_both(config, |store| async move {
            let mut ids = Vec::new();
            for _ in 0..5 {
                ids.push(store.create("p", "m", SessionFields::default()).await.unwrap().id);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            let err = store.create("p", "m", SessionFields::default()).await.unwrap_err();
            assert!(matches!(err, StoreError::Invalid { code: "session_limit_reached", .. }), "{err}");
            // Activity moves a session to the front.
            store.append_turn(&ids[0], &turn("bump", "ok")).await.unwrap();
            let (page, more) = store.list("p", 2, None).await.unwrap();
            assert!(more);
            let (rest, more_after) = store.list("p", 10, Some(&page[1].id)).await.unwrap();
            assert!(!more_after);
            let order: Vec<_> = page.iter().chain(&rest).map(|s| s.id.clone()).collect();
            assert_eq!(order, [ids[0].clone(), ids[4].clone(), ids[3].clone(), ids[2].clone(), ids[1].clone()]);
        })
        .await;
    }

    #[tokio::test]
    async fn metadata_must_be_an_object_and_messages_have_a_size_limit() {
        let config = StoreConfig { max_message_bytes: 10, ..StoreConfig::default() };
        on_both(config, |store| async move {
            let bad = SessionFields { metadata: Some(serde_json::json!([1])), ..Default::default() };
            assert!(matches!(store.create("p", "m", bad).await, Err(StoreError::Invalid { param: "metadata", .. })));
            let long = SessionFields { system_prompt: Some(Some("x".repeat(11))), ..Default::default() };
            assert!(matches!(store.create("p", "m", long).await, Err(StoreError::Invalid { code: "message_too_large", .. })));
        })
        .await;
    }
}
