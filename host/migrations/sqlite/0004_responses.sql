-- Stored responses of the Responses API (`store: true`), owned by a principal like
-- sessions. A chain is followed through previous_response_id. JSON columns are text:
-- `input` and `output` are this response's part of the conversation as chat messages,
-- `input_items` the input as the client sent it (with ids), `body` the response object.
CREATE TABLE responses (
    id                   TEXT PRIMARY KEY,
    principal            TEXT NOT NULL,
    previous_response_id TEXT,
    input                TEXT NOT NULL,
    input_items          TEXT NOT NULL,
    output               TEXT NOT NULL,
    body                 TEXT NOT NULL,
    created_at           BIGINT NOT NULL
);
CREATE INDEX responses_by_principal ON responses (principal, created_at);
-- Expiry (`store.response_ttl_days`) deletes by age.
CREATE INDEX responses_by_age ON responses (created_at);
