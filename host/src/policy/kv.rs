//! The plugins' key-value space. [`KvBackend`] is the seam: the in-process backend here
//! serves a single replica (and tests); the store issue puts SQLite/Postgres or Redis
//! behind the same trait so counters survive restarts and are shared by replicas.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::limits::MAX_KV_ENTRIES;

/// Storage for plugin state. Keys arrive already namespaced by plugin name.
pub trait KvBackend: Send + Sync {
    fn get(&self, key: &str) -> Option<Vec<u8>>;
    /// Returns false when the space is full.
    fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) -> bool;
    /// Adds to the decimal integer at `key`; `None` when the space is full or the value is
    /// not an integer.
    fn incr(&self, key: &str, delta: i64, ttl: Option<Duration>) -> Option<i64>;
    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: Vec<u8>, ttl: Option<Duration>) -> bool;
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

impl KvBackend for MemoryKv {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.with(|entries, now| entries.get(key).filter(|e| e.live(now)).map(|e| e.value.clone()))
    }

    fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) -> bool {
        self.with(|entries, now| insert(entries, key, value, ttl.map(|t| now + t)))
    }

    fn incr(&self, key: &str, delta: i64, ttl: Option<Duration>) -> Option<i64> {
        self.with(|entries, now| {
            let (current, expires) = match entries.get(key).filter(|e| e.live(now)) {
                Some(e) => (std::str::from_utf8(&e.value).ok()?.parse::<i64>().ok()?, e.expires),
                None => (0, ttl.map(|t| now + t)),
            };
            let next = current.saturating_add(delta);
            insert(entries, key, next.to_string().into_bytes(), expires).then_some(next)
        })
    }

    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: Vec<u8>, ttl: Option<Duration>) -> bool {
        self.with(|entries, now| {
            let current = entries.get(key).filter(|e| e.live(now)).map(|e| e.value.as_slice());
            if current != expected {
                return false;
            }
            insert(entries, key, new, ttl.map(|t| now + t))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incr_counts_from_zero_and_keeps_its_expiry() {
        let kv = MemoryKv::new();
        assert_eq!(kv.incr("a", 2, Some(Duration::from_secs(60))), Some(2));
        assert_eq!(kv.incr("a", -1, None), Some(1));
        assert_eq!(kv.get("a"), Some(b"1".to_vec()));
    }

    #[test]
    fn expired_keys_are_gone() {
        let kv = MemoryKv::new();
        kv.set("k", b"v".to_vec(), Some(Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(kv.get("k"), None);
        assert_eq!(kv.incr("k", 1, None), Some(1));
    }

    #[test]
    fn compare_and_swap_checks_the_current_value() {
        let kv = MemoryKv::new();
        assert!(kv.compare_and_swap("k", None, b"1".to_vec(), None));
        assert!(!kv.compare_and_swap("k", None, b"2".to_vec(), None));
        assert!(kv.compare_and_swap("k", Some(b"1"), b"2".to_vec(), None));
        assert_eq!(kv.get("k"), Some(b"2".to_vec()));
    }

    #[test]
    fn incr_on_text_is_refused() {
        let kv = MemoryKv::new();
        kv.set("k", b"text".to_vec(), None);
        assert_eq!(kv.incr("k", 1, None), None);
    }
}
