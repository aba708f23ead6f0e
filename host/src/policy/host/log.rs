//! `wisp:policy/log`: plugin log lines into the host's tracing, tagged with the plugin.

use crate::policy::PluginState;
use crate::policy::bindings::wisp::policy::log::{Host, Level};
use crate::policy::limits::MAX_OUTPUT_BYTES;

impl Host for PluginState {
    async fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let message = &message[..message.floor_char_boundary(MAX_OUTPUT_BYTES.min(message.len()))];
        let plugin = &*self.plugin;
        match level {
            Level::Debug => tracing::debug!(target: "wisp.plugin", plugin, "{message}"),
            Level::Info => tracing::info!(target: "wisp.plugin", plugin, "{message}"),
            Level::Warn => tracing::warn!(target: "wisp.plugin", plugin, "{message}"),
            Level::Error => tracing::error!(target: "wisp.plugin", plugin, "{message}"),
        }
        Ok(())
    }
}
