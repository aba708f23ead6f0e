-- Chat sessions, their messages, and the plugins' key-value space (Postgres).
-- Times are unix milliseconds. The SQLite migration has the same tables and columns.
CREATE TABLE sessions (
    id            TEXT PRIMARY KEY,
    principal     TEXT NOT NULL,
    model         TEXT NOT NULL,
    title         TEXT NOT NULL DEFAULT '',
    system_prompt TEXT,
    metadata      TEXT NOT NULL DEFAULT '{}',
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX sessions_by_principal ON sessions (principal, updated_at DESC, id DESC);

-- seq counts from 1 without gaps: rollback removes only from the end.
CREATE TABLE messages (
    session_id        TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq               BIGINT NOT NULL,
    role              TEXT NOT NULL,
    content           TEXT NOT NULL,
    finish_reason     TEXT,
    prompt_tokens     BIGINT,
    completion_tokens BIGINT,
    created_at        BIGINT NOT NULL,
    PRIMARY KEY (session_id, seq)
);

CREATE TABLE plugin_kv (
    key        TEXT PRIMARY KEY,
    value      BYTEA NOT NULL,
    expires_at BIGINT
);
CREATE INDEX plugin_kv_expiry ON plugin_kv (expires_at) WHERE expires_at IS NOT NULL;
