//! `wisp:policy/kv`: the plugin's key-value space, namespaced by plugin name. Guest-chosen
//! sizes are checked before anything is stored; a violation traps the plugin.

use std::future::Future;
use std::time::Duration;

use crate::policy::PluginState;
use crate::policy::bindings::wisp::policy::kv::Host;
use crate::policy::limits::{KV_CALL_TIMEOUT, MAX_KV_KEY_BYTES, MAX_KV_VALUE_BYTES};

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

/// A backend call, bounded: a store that hangs traps the plugin instead of the request.
async fn bounded<T>(call: impl Future<Output = anyhow::Result<T>>) -> wasmtime::Result<T> {
    match tokio::time::timeout(KV_CALL_TIMEOUT, call).await {
        Ok(result) => result.map_err(|e| wasmtime::format_err!("kv: {e:#}")),
        Err(_) => wasmtime::bail!("kv: the backend did not answer within {KV_CALL_TIMEOUT:?}"),
    }
}

impl Host for PluginState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        bounded(self.kv.get(&self.kv_key(&key)?)).await
    }

    async fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> wasmtime::Result<()> {
        check_value(&value)?;
        bounded(self.kv.set(&self.kv_key(&key)?, value, ttl(ttl_ms))).await
    }

    async fn incr(&mut self, key: String, delta: i64, ttl_ms: Option<u64>) -> wasmtime::Result<i64> {
        bounded(self.kv.incr(&self.kv_key(&key)?, delta, ttl(ttl_ms))).await
    }

    async fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<bool> {
        check_value(&new)?;
        bounded(self.kv.compare_and_swap(&self.kv_key(&key)?, expected.as_deref(), new, ttl(ttl_ms))).await
    }
}
