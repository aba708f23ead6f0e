//! The plugins' key-value space. [`KvBackend`] is the seam: the in-process backend here
//! serves tests and `wisp plugin bench`; the server keeps the space in its store
//! (SQLite/Postgres, `store::kv`) or in Redis, so counters survive restarts and are shared
//! by replicas.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::limits::MAX_KV_ENTRIES;

/// Storage for plugin state. Keys arrive already namespaced by plugin name. An error
/// (space full, value not an integer, backend down) traps the calling plugin, whose fail
/// mode then decides the request.
#[async_trait::async_trait]
pub trait KvBackend: Send + Sync {
    async fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>>;
    async fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) -> anyhow::Result<()>;
    /// Adds to the decimal integer at `key` (absent or expired counts as 0); a new key
    /// takes `ttl`, an existing one keeps its expiry.
    async fn incr(&self, key: &str, delta: i64, ttl: Option<Duration>) -> anyhow::Result<i64>;
    /// Writes `new` if the live value is `expected` (`None`: absent or expired).
    async fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: Vec<u8>, ttl: Option<Duration>) -> anyhow::Result<bool>;
}

const FULL: &str = "the kv space is full";

struct Entry {
    value: Vec<u8>,
    expires: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|e| e > now)
    }
}

/// A process-local kv with expiry, bounded to [`MAX_KV_ENTRIES`].
#[derive(Default)]
pub struct MemoryKv {
    entries: Mutex<HashMap<String, Entry>>,
}

impl MemoryKv {
    pub fn new() -> MemoryKv {
        MemoryKv::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, Entry>, Instant) -> R) -> R {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if entries.len() >= MAX_KV_ENTRIES {
            entries.retain(|_, e| e.live(now));
        }
        f(&mut entries, now)
    }
}

fn insert(entries: &mut HashMap<String, Entry>, key: &str, value: Vec<u8>, expires: Option<Instant>) -> bool {
    if !entries.contains_key(key) && entries.len() >= MAX_KV_ENTRIES {
        return false;
    }
    entries.insert(key.to_string(), Entry { value, expires });
    true
}

/// The decimal integer a kv value holds.
pub fn parse_counter(key: &str, value: &[u8]) -> anyhow::Result<i64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| anyhow::anyhow!("kv incr on `{key}`: the value is not a decimal integer"))
}

#[async_trait::async_trait]
impl KvBackend for MemoryKv {
    async fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.with(|entries, now| entries.get(key).filter(|e| e.live(now)).map(|e| e.value.clone())))
    }

    async fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) -> anyhow::Result<()> {
        self.with(|entries, now| insert(entries, key, value, ttl.map(|t| now + t))).then_some(()).ok_or_else(|| anyhow::anyhow!(FULL))
    }

    async fn incr(&self, key: &str, delta: i64, ttl: Option<Duration>) -> anyhow::Result<i64> {
        self.with(|entries, now| {
            let (current, expires) = match entries.get(key).filter(|e| e.live(now)) {
                Some(e) => (parse_counter(key, &e.value)?, e.expires),
                None => (0, ttl.map(|t| now + t)),
            };
            let next = current.saturating_add(delta);
            insert(entries, key, next.to_string().into_bytes(), expires).then_some(next).ok_or_else(|| anyhow::anyhow!(FULL))
        })
    }

    async fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: Vec<u8>, ttl: Option<Duration>) -> anyhow::Result<bool> {
        self.with(|entries, now| {
            let current = entries.get(key).filter(|e| e.live(now)).map(|e| e.value.as_slice());
            if current != expected {
                return Ok(false);
            }
            insert(entries, key, new, ttl.map(|t| now + t)).then_some(true).ok_or_else(|| anyhow::anyhow!(FULL))
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The contract every backend keeps; `store::kv` runs it on SQLite, Postgres and Redis.
    pub async fn check_contract(kv: &dyn KvBackend, prefix: &str) {
        let k = |name: &str| format!("{prefix}/{name}");
        assert_eq!(kv.incr(&k("a"), 2, Some(Duration::from_secs(60))).await.unwrap(), 2);
        assert_eq!(kv.incr(&k("a"), -1, None).await.unwrap(), 1);
        assert_eq!(kv.get(&k("a")).await.unwrap(), Some(b"1".to_vec()));

        kv.set(&k("short"), b"v".to_vec(), Some(Duration::from_millis(20))).await.unwrap();
        assert_eq!(kv.get(&k("short")).await.unwrap(), Some(b"v".to_vec()));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(kv.get(&k("short")).await.unwrap(), None);
        assert_eq!(kv.incr(&k("short"), 1, None).await.unwrap(), 1, "an expired key counts from zero");

        assert!(kv.compare_and_swap(&k("c"), None, b"1".to_vec(), None).await.unwrap());
        assert!(!kv.compare_and_swap(&k("c"), None, b"2".to_vec(), None).await.unwrap());
        assert!(!kv.compare_and_swap(&k("c"), Some(b"9"), b"2".to_vec(), None).await.unwrap());
        assert!(kv.compare_and_swap(&k("c"), Some(b"1"), b"2".to_vec(), None).await.unwrap());
        assert_eq!(kv.get(&k("c")).await.unwrap(), Some(b"2".to_vec()));

        kv.set(&k("text"), b"text".to_vec(), None).await.unwrap();
        assert!(kv.incr(&k("text"), 1, None).await.is_err(), "incr on text is refused");
        assert_eq!(kv.get(&k("missing")).await.unwrap(), None);
    }

    #[tokio::test]
    async fn memory_kv_keeps_the_contract() {
        check_contract(&MemoryKv::new(), "t").await;
    }
}
