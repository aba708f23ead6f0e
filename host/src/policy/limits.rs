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

/// Text all of a plugin's hook calls may emit over one response, together: a plugin that
/// emits just under [`MAX_OUTPUT_BYTES`] for every token ends here, not at gigabytes.
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// A denial's message and code reach the client and the errors metric: bounded.
pub const MAX_DENIAL_MESSAGE_BYTES: usize = 4096;
pub const MAX_DENIAL_CODE_BYTES: usize = 64;

/// A principal is stored on every session and written into logs and kv keys.
pub const MAX_PRINCIPAL_BYTES: usize = 256;

/// One plugin log line, and all the log lines of one plugin instance (one request)
/// together; past that, lines are dropped (and the drop is logged once).
pub const MAX_LOG_LINE_BYTES: usize = 4096;
pub const MAX_LOG_BYTES_PER_REQUEST: usize = 64 * 1024;

/// kv keys and values are chosen by the guest; cap them before the host stores them.
pub const MAX_KV_KEY_BYTES: usize = 512;
pub const MAX_KV_VALUE_BYTES: usize = 64 * 1024;
/// Longest one kv call may wait on its backend (SQLite, Postgres, Redis) before the plugin
/// traps.
pub const KV_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Time one hook call may spend waiting in host calls (kv), all of them together. It does
/// not count against the hook's `timeout_ms`, which bounds the guest's own execution.
pub const HOST_TIME_PER_HOOK: Duration = Duration::from_secs(2);
/// Beyond guest time and host time, what a hook call may take in wall time while the
/// runtime is busy with others; the whole call is cut off past the sum.
pub const HOOK_SCHEDULING_SLACK: Duration = Duration::from_secs(2);
/// Entries and bytes (keys plus values) one plugin may keep in its kv space, on every
/// backend (a key-spraying plugin ends here).
pub const MAX_KV_ENTRIES_PER_PLUGIN: u64 = 10_000;
pub const MAX_KV_BYTES_PER_PLUGIN: u64 = 16 << 20;
/// Entries in the in-process kv across all plugins.
pub const MAX_KV_ENTRIES: usize = 100_000;

/// Tables and instances a plugin store may create (a plugin is one component).
pub const MAX_TABLES: usize = 10;
pub const MAX_INSTANCES: usize = 10;

/// Instance slots in the pooling allocator: plugin instances alive at once across all
/// requests (a 5-plugin chain and 64 queued requests need 320; reloads keep old chains
/// alive while their requests finish; on-finish after a hang-up runs detached). A
/// semaphore of as many permits stands in front of the pool: when it is full, a new
/// request waits for a slot instead of failing.
pub const POOL_INSTANCES: u32 = 2000;
/// Linear memories one plugin component may have (a Rust guest has one).
pub const MAX_MEMORIES: usize = 2;
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
    /// Guest execution time per hook call.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The wall time after which a hook call is cut off, whatever it is doing.
    pub fn wall_limit(&self) -> Duration {
        self.timeout() + HOST_TIME_PER_HOOK + HOOK_SCHEDULING_SLACK
    }

    pub fn memory_bytes(&self) -> usize {
        (self.memory_mb as usize) << 20
    }
}
