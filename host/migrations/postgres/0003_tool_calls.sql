-- Tool calling in sessions: an assistant message's calls (OpenAI's `tool_calls` array, as
-- JSON text) and a tool result's call id. Both NULL on other messages.
ALTER TABLE messages ADD COLUMN tool_calls TEXT;
ALTER TABLE messages ADD COLUMN tool_call_id TEXT;
