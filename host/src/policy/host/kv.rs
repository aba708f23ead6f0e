//! `wisp:policy/kv`: the plugin's key-value space, namespaced by plugin name. Guest-chosen
//! sizes are checked before anything is stored; a violation traps the plugin.

use std::time::Duration;

use crate::policy::PluginState;
use crate::policy::bindings::wisp::policy::kv::Host;
use crate::policy::limits::{MAX_KV_KEY_BYTES, MAX_KV_VALUE_BYTES};

impl PluginState {
    fn kv_key(&self, key: &str) -> wasmtime::Result<String> {
        if key.len() > MAX_KV_KEY_BYTES {
            wasmtime::bail!("kv key of {} bytes exceeds the limit of {MAX_KV_KEY_BYTES}", key.len());
        }
        Ok(format!("{}/{key}", self.plugin))
    }
}

fn check_value(value: &[u8]) -> wasmtime::Result<()> {
    if value.len() > MAX_KV_VALUE_BYTES {
        wasmtime::bail!("kv value of {} bytes exceeds the limit of {MAX_KV_VALUE_BYTES}", value.len());
    }
    Ok(())
}

fn ttl(ms: Option<u64>) -> Option<Duration> {
    ms.map(Duration::from_millis)
}

impl Host for PluginState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        Ok(self.kv.get(&self.kv_key(&key)?))
    }

    async fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> wasmtime::Result<()> {
        check_value(&value)?;
        if !self.kv.set(&self.kv_key(&key)?, value, ttl(ttl_ms)) {
            wasmtime::bail!("the kv space is full");
        }
        Ok(())
    }

    async fn incr(&mut self, key: String, delta: i64, ttl_ms: Option<u64>) -> wasmtime::Result<i64> {
        match self.kv.incr(&self.kv_key(&key)?, delta, ttl(ttl_ms)) {
            Some(n) => Ok(n),
            None => wasmtime::bail!("kv incr on `{key}` failed: not an integer, or the kv space is full"),
        }
    }

    async fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<bool> {
        check_value(&new)?;
        Ok(self.kv.compare_and_swap(&self.kv_key(&key)?, expected.as_deref(), new, ttl(ttl_ms)))
    }
}
