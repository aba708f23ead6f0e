//! Every resource limit of the plugin sandbox, in one place. Each number is a named
//! constant whose comment says what it protects against; per-plugin values come from
//! `[plugins.limits]` in the config and default to these.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How often the epoch ticker advances the engine's epoch. A running guest is checked at
/// every tick: this bounds how late a timeout can fire and how long a guest holds a
/// tokio worker before yielding.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Wall time one hook call may take before it is stopped (an infinite loop ends here).
pub const DEFAULT_TIMEOUT_MS: u64 = 50;

/// Linear memory one plugin instance may grow to (a memory bomb ends here).
pub const DEFAULT_MEMORY_MB: u64 = 64;

/// Text one hook may return (`emit`, rewritten messages, held-back text): a plugin must
/// not turn a token into megabytes for the client.
pub const MAX_OUTPUT_BYTES: usize = 1 << 20;

/// kv keys and values are chosen by the guest; cap them before the host stores them.
pub const MAX_KV_KEY_BYTES: usize = 512;
pub const MAX_KV_VALUE_BYTES: usize = 64 * 1024;
/// Longest a kv call may wait on its backend (SQLite, Postgres, Redis) before the plugin
/// traps; a plugin's own deadline does not tick while the host is waiting.
pub const KV_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Entries in the in-process kv across all plugins (a key-spraying plugin ends here).
pub const MAX_KV_ENTRIES: usize = 100_000;

/// Tables and instances a plugin store may create (a plugin is one component).
pub const MAX_TABLES: usize = 10;
pub const MAX_INSTANCES: usize = 10;

/// Instance slots in the pooling allocator: plugin instances alive at once across all
/// requests (a 5-plugin chain and 64 queued requests need 320; reloads keep old chains
/// alive while their requests finish). Past it, instantiation fails (a plugin failure).
pub const POOL_INSTANCES: u32 = 2000;
/// The largest linear memory a pool slot holds; per-plugin `memory_mb` must fit in it.
pub const POOL_MAX_MEMORY_BYTES: usize = 256 << 20;

/// Per-plugin limits from the config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PluginLimits {
    /// Wall time per hook call, in milliseconds.
    pub timeout_ms: u64,
    /// Linear memory cap, in MiB.
    pub memory_mb: u64,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits { timeout_ms: DEFAULT_TIMEOUT_MS, memory_mb: DEFAULT_MEMORY_MB }
    }
}

impl PluginLimits {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn memory_bytes(&self) -> usize {
        (self.memory_mb as usize) << 20
    }
}
