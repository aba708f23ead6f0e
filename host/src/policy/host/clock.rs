//! `wisp:policy/clock`: monotonic and wall time.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::policy::PluginState;
use crate::policy::bindings::wisp::policy::clock::Host;

impl Host for PluginState {
    async fn monotonic_ns(&mut self) -> wasmtime::Result<u64> {
        Ok(self.started.elapsed().as_nanos() as u64)
    }

    async fn wall_ms(&mut self) -> wasmtime::Result<u64> {
        Ok(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0))
    }
}
