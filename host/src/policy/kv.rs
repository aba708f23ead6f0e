//! The plugins' key-value space. [`KvBackend`] is the seam: the in-process backend here
//! serves tests and `wisp plugin bench`; the server keeps the space in its store
//! (SQLite/Postgres, `store::kv`) or in Redis, so counters survive restarts and are shared
//! by replicas.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::limits::{MAX_KV_BYTES_PER_PLUGIN, MAX_KV_ENTRIES, MAX_KV_ENTRIES_PER_PLUGIN};
use crate::store::now_ms;

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
    /// Stores what the backend holds back (a shutdown's last step); most write at once.
    async fn flush(&self) -> anyhow::Result<()> {
        Ok(())
    }
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
/// quota. With a [`Journal`] it also records every write, for a copy kept elsewhere (the
/// SQLite store's, `store::kv::SqliteKv`).
#[derive(Default)]
pub struct MemoryKv {
    space: Mutex<Space>,
    quota: KvQuota,
    journal: Option<Arc<Journal>>,
}

/// The entries, and what each plugin holds of them (expired entries count until swept).
#[derive(Default)]
struct Space {
    map: HashMap<String, Entry>,
    /// Per plugin: entries and bytes.
    usage: HashMap<String, (u64, u64)>,
}

impl Space {
    fn account(&mut self, key: &str, value_len: usize, sign: i64) {
        let plugin = plugin_of(key);
        let usage = match self.usage.get_mut(plugin) {
            Some(usage) => usage,
            None => self.usage.entry(plugin.to_string()).or_default(),
        };
        usage.0 = usage.0.saturating_add_signed(sign);
        usage.1 = usage.1.saturating_add_signed(sign * entry_size(key, value_len));
        if usage.0 == 0 {
            self.usage.remove(plugin);
        }
    }

    /// Drops the expired entries (of one plugin, or all).
    fn sweep(&mut self, now: Instant, plugin: Option<&str>) {
        let expired: Vec<String> =
            self.map.iter().filter(|(k, e)| !e.live(now) && plugin.is_none_or(|p| plugin_of(k) == p)).map(|(k, _)| k.clone()).collect();
        for key in expired {
            if let Some(e) = self.map.remove(&key) {
                self.account(&key, e.value.len(), -1);
            }
        }
    }
}

impl MemoryKv {
    pub fn new() -> MemoryKv {
        MemoryKv::default()
    }

    pub fn with_quota(quota: KvQuota) -> MemoryKv {
        MemoryKv { quota, ..MemoryKv::default() }
    }

    /// Records every write in `journal`.
    pub fn journaled(quota: KvQuota, journal: Arc<Journal>) -> MemoryKv {
        MemoryKv { quota, journal: Some(journal), ..MemoryKv::default() }
    }

    /// Puts back an entry kept elsewhere (its expiry in unix ms), unrecorded and outside the
    /// quota (it was admitted when written); false when the space is full.
    pub fn restore(&self, key: String, value: Vec<u8>, expires_at_ms: Option<i64>) -> bool {
        let mut space = self.space.lock().unwrap_or_else(|e| e.into_inner());
        if space.map.len() >= MAX_KV_ENTRIES {
            return false;
        }
        let now = Instant::now();
        let expires = expires_at_ms.map(|at| now + Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64));
        space.account(&key, value.len(), 1);
        if let Some(old) = space.map.insert(key.clone(), Entry { value, expires }) {
            space.account(&key, old.value.len(), -1);
        }
        true
    }

    /// Drops every expired entry (they are dropped anyway when the space or a plugin's
    /// quota is full).
    pub fn sweep(&self) {
        self.space.lock().unwrap_or_else(|e| e.into_inner()).sweep(Instant::now(), None);
    }

    fn with<R>(&self, f: impl FnOnce(&mut Entries<'_>, Instant) -> R) -> R {
        let mut space = self.space.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if space.map.len() >= MAX_KV_ENTRIES {
            space.sweep(now, None);
        }
        f(&mut Entries { space: &mut space, quota: self.quota, journal: self.journal.as_deref(), now }, now)
    }
}

/// The space under its lock, with the quota to keep.
struct Entries<'a> {
    space: &'a mut Space,
    quota: KvQuota,
    journal: Option<&'a Journal>,
    now: Instant,
}

impl Entries<'_> {
    fn get(&self, key: &str) -> Option<&Entry> {
        self.space.map.get(key).filter(|e| e.live(self.now))
    }

    fn insert(&mut self, key: &str, value: Vec<u8>, expires: Option<Instant>) -> anyhow::Result<()> {
        let old = self.get(key).map(|e| entry_size(key, e.value.len()));
        if !self.space.map.contains_key(key) && self.space.map.len() >= MAX_KV_ENTRIES {
            anyhow::bail!(FULL);
        }
        let grow = entry_size(key, value.len()) - old.unwrap_or(0);
        if old.is_none() || grow > 0 {
            let plugin = plugin_of(key);
            let admit = |space: &Space| {
                let (entries, bytes) = space.usage.get(plugin).copied().unwrap_or_default();
                // An expired entry at `key` is replaced: it counts for neither.
                let (entries, bytes) = match space.map.get(key) {
                    Some(e) if old.is_none() => (entries.saturating_sub(1), bytes.saturating_sub(entry_size(key, e.value.len()) as u64)),
                    _ => (entries, bytes),
                };
                self.quota.admit(key, entries, bytes, old.is_none(), grow)
            };
            if admit(self.space).is_err() {
                // Expired entries count until swept: sweep the plugin's, then decide.
                self.space.sweep(self.now, Some(plugin));
                admit(self.space)?;
            }
        }
        if let Some(journal) = self.journal {
            journal.record(key, &value, expires.map(|e| now_ms().saturating_add(e.saturating_duration_since(self.now).as_millis() as i64)));
        }
        self.space.account(key, value.len(), 1);
        if let Some(old) = self.space.map.insert(key.to_string(), Entry { value, expires }) {
            self.space.account(key, old.value.len(), -1);
        }
        Ok(())
    }
}

/// The writes a journaled [`MemoryKv`] took since they were last taken: per key the last
/// value and its expiry (unix ms), so it never holds more entries than the space.
#[derive(Default)]
pub struct Journal {
    writes: Mutex<Writes>,
    written: tokio::sync::Notify,
}

/// Taken from a [`Journal`]: key, value, expiry (unix ms).
pub type Writes = HashMap<String, (Vec<u8>, Option<i64>)>;

impl Journal {
    fn record(&self, key: &str, value: &[u8], expires_at_ms: Option<i64>) {
        self.writes.lock().unwrap_or_else(|e| e.into_inner()).insert(key.to_string(), (value.to_vec(), expires_at_ms));
        self.written.notify_one();
    }

    /// Until there is a write to take.
    pub async fn written(&self) {
        self.written.notified().await
    }

    pub fn take(&self) -> Writes {
        std::mem::take(&mut *self.writes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts back writes that could not be kept, where no later write replaced them.
    pub fn put_back(&self, writes: Writes) {
        let mut pending = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        for (key, write) in writes {
            pending.entry(key).or_insert(write);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.writes.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
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
