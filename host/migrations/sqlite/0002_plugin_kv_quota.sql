-- Per-plugin kv quotas: each row knows its plugin and its size (key plus value bytes), so
-- a plugin's live entries and bytes are one indexed aggregate. Rows written before this
-- migration count as plugin '' and size 0 until their next write.
ALTER TABLE plugin_kv ADD COLUMN plugin TEXT NOT NULL DEFAULT '';
ALTER TABLE plugin_kv ADD COLUMN size BIGINT NOT NULL DEFAULT 0;
CREATE INDEX plugin_kv_by_plugin ON plugin_kv (plugin);
