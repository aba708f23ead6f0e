//! The plugins' key-value space. [`KvBackend`] is the seam: the in-process backend here
//! serves tests and `wisp plugin bench`; the server keeps the space in its store
//! (SQLite/Postgres, `store::kv`) or in Redis, so counters survive restarts and are shared
//! by replicas.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::limits::{MAX_KV_BYTES_PER_PLUGIN, MAX_KV_ENTRIES, MAX_KV_ENTRIES_PER_PLUGIN};

/// Storage for plugin state. Keys arrive already namespaced by plugin name
/// (`plugin/key`). Every backend holds each plugin to its [`KvQuota`]. An error (over the
/// quota, value not an integer, backend down) traps the calling plugin, whose fail mode
/// then decides the request.
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

/// What one plugin may keep in its kv space: live entries, and bytes of keys plus values.
/// Backends check it before a write that adds an entry or grows a value; concurrent
/// writers (threads, replicas) may overshoot it by what they write at the same moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvQuota {
    pub entries: u64,
    pub bytes: u64,
}

impl Default for KvQuota {
    fn default() -> Self {
        KvQuota { entries: MAX_KV_ENTRIES_PER_PLUGIN, bytes: MAX_KV_BYTES_PER_PLUGIN }
    }
}

impl KvQuota {
    /// Refuses a write that adds an entry (`new_entry`) or `grow` bytes to a plugin that
    /// holds `entries` and `bytes`.
    pub fn admit(&self, key: &str, entries: u64, bytes: u64, new_entry: bool, grow: i64) -> anyhow::Result<()> {
        let plugin = plugin_of(key);
        if new_entry && entries >= self.entries {
            anyhow::bail!("kv quota: `{plugin}` keeps {entries} entries, the limit is {}", self.entries);
        }
        if grow > 0 && bytes.saturating_add(grow as u64) > self.bytes {
            anyhow::bail!("kv quota: `{plugin}` keeps {bytes} bytes, and {grow} more would pass the limit of {}", self.bytes);
        }
        Ok(())
    }
}

/// The plugin a namespaced key belongs to.
pub fn plugin_of(key: &str) -> &str {
    key.split_once('/').map_or(key, |(plugin, _)| plugin)
}

/// What an entry counts against its plugin's byte quota.
pub fn entry_size(key: &str, value_len: usize) -> i64 {
    (key.len() + value_len) as i64
}

struct Entry {
    value: Vec<u8>,
    expires: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|e| e > now)
    }
}

/// A process-local kv with expiry, bounded to [`MAX_KV_ENTRIES`] and each plugin to its
/// quota.
#[derive(Default)]
pub struct MemoryKv {
    entries: Mutex<HashMap<String, Entry>>,
    quota: KvQuota,
}

impl MemoryKv {
    pub fn new() -> MemoryKv {
        MemoryKv::default()
    }

    pub fn with_quota(quota: KvQuota) -> MemoryKv {
        MemoryKv { quota, ..MemoryKv::default() }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Entries<'_>, Instant) -> R) -> R {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if entries.len() >= MAX_KV_ENTRIES {
            entries.retain(|_, e| e.live(now));
        }
        f(&mut Entries { map: &mut entries, quota: self.quota, now }, now)
    }
}

/// The map under its lock, with the quota to keep.
struct Entries<'a> {
    map: &'a mut HashMap<String, Entry>,
    quota: KvQuota,
    now: Instant,
}

impl Entries<'_> {
    fn get(&self, key: &str) -> Option<&Entry> {
        self.map.get(key).filter(|e| e.live(self.now))
    }

    fn insert(&mut self, key: &str, value: Vec<u8>, expires: Option<Instant>) -> anyhow::Result<()> {
        let old = self.get(key).map(|e| entry_size(key, e.value.len()));
        if !self.map.contains_key(key) && self.map.len() >= MAX_KV_ENTRIES {
            anyhow::bail!(FULL);
        }
        let grow = entry_size(key, value.len()) - old.unwrap_or(0);
        if old.is_none() || grow > 0 {
            let plugin = plugin_of(key);
            let (entries, bytes) = self
                .map
                .iter()
                .filter(|(k, e)| plugin_of(k) == plugin && e.live(self.now))
                .fold((0u64, 0u64), |(n, b), (k, e)| (n + 1, b + entry_size(k, e.value.len()) as u64));
            self.quota.admit(key, entries, bytes, old.is_none(), grow)?;
        }
        self.map.insert(key.to_string(), Entry { value, expires });
        Ok(())
    }
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
        Ok(self.with(|entries, _| entries.get(key).map(|e| e.value.clone())))
    }

    async fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) -> anyhow::Result<()> {
        self.with(|entries, now| entries.insert(key, value, ttl.map(|t| now + t)))
    }

    async fn incr(&self, key: &str, delta: i64, ttl: Option<Duration>) -> anyhow::Result<i64> {
        self.with(|entries, now| {
            let (current, expires) = match entries.get(key) {
                Some(e) => (parse_counter(key, &e.value)?, e.expires),
                None => (0, ttl.map(|t| now + t)),
            };
            let next = current.saturating_add(delta);
            entries.insert(key, next.to_string().into_bytes(), expires)?;
            Ok(next)
        })
    }

    async fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: Vec<u8>, ttl: Option<Duration>) -> anyhow::Result<bool> {
        self.with(|entries, now| {
            if entries.get(key).map(|e| e.value.as_slice()) != expected {
                return Ok(false);
            }
            entries.insert(key, new, ttl.map(|t| now + t))?;
            Ok(true)
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

        // Long enough that a slow round trip never reads it expired; short enough to wait out.
        kv.set(&k("short"), b"v".to_vec(), Some(Duration::from_millis(400))).await.unwrap();
        assert_eq!(kv.get(&k("short")).await.unwrap(), Some(b"v".to_vec()));
        tokio::time::sleep(Duration::from_millis(600)).await;
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

    /// The quota a backend under [`check_quota`] must be built with.
    pub const TEST_QUOTA: KvQuota = KvQuota { entries: 4, bytes: 200 };

    /// Every backend holds each plugin to its quota, by entries and by bytes, counts only
    /// live entries, lets existing entries change within it, and keeps plugins apart.
    pub async fn check_quota(kv: &dyn KvBackend, prefix: &str) {
        let (p, q) = (format!("{prefix}p"), format!("{prefix}q"));
        for i in 0..3 {
            kv.set(&format!("{p}/k{i}"), b"v".to_vec(), None).await.unwrap();
        }
        kv.set(&format!("{p}/short"), b"v".to_vec(), Some(Duration::from_millis(300))).await.unwrap();
        let err = kv.set(&format!("{p}/k4"), b"v".to_vec(), None).await.unwrap_err().to_string();
        assert!(err.contains("quota") && err.contains("entries"), "{err}");
        assert!(kv.incr(&format!("{p}/n"), 1, None).await.is_err(), "incr added a fifth entry");
        assert!(kv.compare_and_swap(&format!("{p}/c"), None, b"v".to_vec(), None).await.is_err());
        // Existing entries still change, within the bytes.
        kv.set(&format!("{p}/k0"), vec![b'x'; 50], None).await.unwrap();
        let err = kv.set(&format!("{p}/k1"), vec![b'x'; 150], None).await.unwrap_err().to_string();
        assert!(err.contains("quota") && err.contains("bytes"), "{err}");
        // Another plugin has its own quota.
        kv.set(&format!("{q}/k0"), b"v".to_vec(), None).await.unwrap();
        // An expired entry no longer counts.
        tokio::time::sleep(Duration::from_millis(500)).await;
        kv.set(&format!("{p}/k4"), b"v".to_vec(), None).await.unwrap();
    }

    #[tokio::test]
    async fn memory_kv_keeps_the_contract() {
        check_contract(&MemoryKv::new(), "t").await;
        check_quota(&MemoryKv::with_quota(TEST_QUOTA), "").await;
    }
}
