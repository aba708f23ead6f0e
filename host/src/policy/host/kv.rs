//! `wisp:policy/kv`: the plugin's key-value space, namespaced by plugin name. Guest-chosen
//! sizes are checked before anything is stored; a violation traps the plugin.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::policy::PluginState;
use crate::policy::bindings::wisp::policy::kv::Host;
use crate::policy::limits::{HOST_TIME_PER_HOOK, KV_CALL_TIMEOUT, MAX_KV_KEY_BYTES, MAX_KV_VALUE_BYTES};
use crate::policy::meter::Meter;

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

/// A backend call, bounded: it waits at most [`KV_CALL_TIMEOUT`] and at most what is left
/// of the hook's host time, then traps the plugin (a store that hangs fails the plugin,
/// not the request's thread). The wait is host time, not the guest's.
async fn bounded<T>(meter: Arc<Meter>, call: impl Future<Output = anyhow::Result<T>>) -> wasmtime::Result<T> {
    let (_host_call, left) = meter.host_call();
    let limit = left.min(KV_CALL_TIMEOUT);
    if limit.is_zero() {
        wasmtime::bail!("kv: the hook used up its host time");
    }
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result.map_err(|e| wasmtime::format_err!("kv: {e:#}")),
        Err(_) if limit < KV_CALL_TIMEOUT => {
            wasmtime::bail!("kv: the hook used up its host time ({HOST_TIME_PER_HOOK:?} per hook call)")
        }
        Err(_) => wasmtime::bail!("kv: the backend did not answer within {limit:?}"),
    }
}

impl Host for PluginState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        let (key, kv) = (self.kv_key(&key)?, self.kv.clone());
        bounded(self.meter.clone(), kv.get(&key)).await
    }

    async fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> wasmtime::Result<()> {
        check_value(&value)?;
        let (key, kv) = (self.kv_key(&key)?, self.kv.clone());
        bounded(self.meter.clone(), kv.set(&key, value, ttl(ttl_ms))).await
    }

    async fn incr(&mut self, key: String, delta: i64, ttl_ms: Option<u64>) -> wasmtime::Result<i64> {
        let (key, kv) = (self.kv_key(&key)?, self.kv.clone());
        bounded(self.meter.clone(), kv.incr(&key, delta, ttl(ttl_ms))).await
    }

    async fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<bool> {
        check_value(&new)?;
        let (key, kv) = (self.kv_key(&key)?, self.kv.clone());
        bounded(self.meter.clone(), kv.compare_and_swap(&key, expected.as_deref(), new, ttl(ttl_ms))).await
    }
}
