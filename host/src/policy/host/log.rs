//! `wisp:policy/log`: plugin log lines into the host's tracing, tagged with the plugin.
//! A line is the plugin's text, never the host's: control characters are escaped (a
//! newline cannot start a line that looks like wisp's own), each line is cut at
//! [`MAX_LOG_LINE_BYTES`], and one instance (one request) writes at most
//! [`MAX_LOG_BYTES_PER_REQUEST`]; past that its lines are dropped, which is logged once.

use crate::policy::PluginState;
use crate::policy::bindings::wisp::policy::log::{Host, Level};
use crate::policy::checks::truncated;
use crate::policy::limits::{MAX_LOG_BYTES_PER_REQUEST, MAX_LOG_LINE_BYTES};

/// `text` with control characters escaped (`\n`, `\u{1b}`, …).
pub fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c.is_control() {
            true => out.extend(c.escape_default()),
            false => out.push(c),
        }
    }
    out
}

impl Host for PluginState {
    async fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        if self.log_budget == 0 {
            return Ok(());
        }
        let mut line = escape_controls(truncated(&message, MAX_LOG_LINE_BYTES));
        if line.len() >= self.log_budget {
            line = format!(
                "{}… (log budget of {MAX_LOG_BYTES_PER_REQUEST} bytes per request used up; dropping the rest)",
                truncated(&line, self.log_budget)
            );
            self.log_budget = 0;
        } else {
            self.log_budget -= line.len();
        }
        let plugin = &*self.plugin;
        match level {
            Level::Debug => tracing::debug!(target: "wisp.plugin", plugin, "{line}"),
            Level::Info => tracing::info!(target: "wisp.plugin", plugin, "{line}"),
            Level::Warn => tracing::warn!(target: "wisp.plugin", plugin, "{line}"),
            Level::Error => tracing::error!(target: "wisp.plugin", plugin, "{line}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_start_a_new_log_line() {
        assert_eq!(escape_controls("a\nINFO wisp: forged\r\u{1b}[2J"), "a\\nINFO wisp: forged\\r\\u{1b}[2J");
        assert_eq!(escape_controls("héllo 🙂"), "héllo 🙂");
    }
}
