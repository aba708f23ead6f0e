//! The plugins' key-value space on the session store (Postgres: every replica on one
//! Postgres shares the counters; SQLite: in memory, written behind to the file its one
//! process owns) or on Redis. All keep [`KvBackend`]'s contract, including expiry; the
//! Postgres and Redis ones are atomic across processes.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use redis::AsyncCommands;
use sqlx::AnyPool;

use super::now_ms;
use crate::policy::kv::{Journal, KvBackend, KvQuota, MemoryKv, entry_size, parse_counter, plugin_of};

/// How often expired rows are swept from the SQL table.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// `incr` is a compare-and-swap loop on SQL; contention this deep means something is wrong.
const MAX_INCR_ATTEMPTS: usize = 64;

fn expiry(ttl: Option<Duration>) -> Option<i64> {
    ttl.map(|t| now_ms().saturating_add(t.as_millis().min(i64::MAX as u128) as i64))
}

/// Starts a task that deletes expired rows every [`SWEEP_EVERY`] (reads ignore them either
/// way).
fn spawn_sweeper(pool: AnyPool) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        loop {
            tick.tick().await;
            let swept =
                sqlx::query("DELETE FROM plugin_kv WHERE expires_at IS NOT NULL AND expires_at <= $1").bind(now_ms()).execute(&pool).await;
            if let Err(e) = swept {
                tracing::warn!(error = %e, "sweeping expired plugin kv rows failed");
            }
        }
    });
}

/// Writes `key`'s row, whatever was there.
fn upsert<'q>(key: &'q str, value: &'q [u8], expires_at: Option<i64>) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    sqlx::query(
        "INSERT INTO plugin_kv (key, value, expires_at, plugin, size) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at, \
         plugin = excluded.plugin, size = excluded.size",
    )
    .bind(key)
    .bind(value)
    .bind(expires_at)
    .bind(plugin_of(key))
    .bind(entry_size(key, value.len()))
}

/// The `plugin_kv` table. Every write is one conditional statement, so concurrent writers
/// (threads or replicas) never lose an update. Each row carries its plugin and size, so a
/// plugin's quota is one indexed aggregate, checked before a write that adds a row or
/// grows a value.
pub struct SqlKv {
    pool: AnyPool,
    quota: KvQuota,
}

impl SqlKv {
    /// Also starts the sweeper of expired rows.
    pub fn new(pool: AnyPool) -> SqlKv {
        SqlKv::with_quota(pool, KvQuota::default())
    }

    pub fn with_quota(pool: AnyPool, quota: KvQuota) -> SqlKv {
        spawn_sweeper(pool.clone());
        SqlKv { pool, quota }
    }

    /// Refuses a write of `new_len` value bytes at `key` over the plugin's quota; `old_len`
    /// is the live value's length, if the key exists.
    async fn admit(&self, key: &str, old_len: Option<usize>, new_len: usize) -> anyhow::Result<()> {
        let grow = entry_size(key, new_len) - old_len.map_or(0, |n| entry_size(key, n));
        if old_len.is_some() && grow <= 0 {
            return Ok(());
        }
        let (entries, bytes): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM plugin_kv \
             WHERE plugin = $1 AND (expires_at IS NULL OR expires_at > $2)",
        )
        .bind(plugin_of(key))
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        self.quota.admit(key, entries.max(0) as u64, bytes.max(0) as u64, old_len.is_none(), grow)
    }

    /// The live value and its expiry.
    async fn read(&self, key: &str) -> anyhow::Result<Option<(Vec<u8>, Option<i64>)>> {
        let row: Option<(Vec<u8>, Option<i64>)> =
            sqlx::query_as("SELECT value, expires_at FROM plugin_kv WHERE key = $1 AND (expires_at IS NULL OR expires_at > $2)")
                .bind(key)
                .bind(now_ms())
                .fetch_optional(&self.pool)
                .await?;
        Ok(row)
    }

    /// Writes `new` with `expires_at` if the live value is `expected`.
    async fn swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8], expires_at: Option<i64>) -> anyhow::Result<bool> {
        let now = now_ms();
        self.admit(key, expected.map(<[u8]>::len), new.len()).await?;
        let size = entry_size(key, new.len());
        let changed = match expected {
            // Absent, or present but expired.
            None => {
                sqlx::query(
                    "INSERT INTO plugin_kv (key, value, expires_at, plugin, size) VALUES ($1, $2, $3, $5, $6) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at, \
                 plugin = excluded.plugin, size = excluded.size \
                 WHERE plugin_kv.expires_at IS NOT NULL AND plugin_kv.expires_at <= $4",
                )
                .bind(key)
                .bind(new)
                .bind(expires_at)
                .bind(now)
                .bind(plugin_of(key))
                .bind(size)
                .execute(&self.pool)
                .await?
            }
            Some(expected) => {
                sqlx::query(
                    "UPDATE plugin_kv SET value = $1, expires_at = $2, plugin = $6, size = $7 \
                 WHERE key = $3 AND value = $4 AND (expires_at IS NULL OR expires_at > $5)",
                )
                .bind(new)
                .bind(expires_at)
                .bind(key)
                .bind(expected)
                .bind(now)
                .bind(plugin_of(key))
                .bind(size)
                .execute(&self.pool)
                .await?
            }
        };
        Ok(changed.rows_affected() == 1)
    }
}

#[async_trait::async_trait]
impl KvBackend for SqlKv {
    async fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.read(key).await?.map(|(value, _)| value))
    }

    async fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) -> anyhow::Result<()> {
        let old_len = self.read(key).await?.map(|(old, _)| old.len());
        self.admit(key, old_len, value.len()).await?;
        upsert(key, &value, expiry(ttl)).execute(&self.pool).await?;
        Ok(())
    }

    async fn incr(&self, key: &str, delta: i64, ttl: Option<Duration>) -> anyhow::Result<i64> {
        for _ in 0..MAX_INCR_ATTEMPTS {
            let (current, expires_at) = match self.read(key).await? {
                Some((value, expires_at)) => (Some(value), expires_at),
                None => (None, expiry(ttl)),
            };
            let next = match &current {
                Some(value) => parse_counter(key, value)?.saturating_add(delta),
                None => delta,
            };
            if self.swap(key, current.as_deref(), next.to_string().as_bytes(), expires_at).await? {
                return Ok(next);
            }
        }
        anyhow::bail!("kv incr on `{key}` lost {MAX_INCR_ATTEMPTS} races in a row")
    }

    async fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: Vec<u8>, ttl: Option<Duration>) -> anyhow::Result<bool> {
        self.swap(key, expected, &new, expiry(ttl)).await
    }
}

/// The kv on a SQLite store. One process owns a SQLite store (`SessionStore::connect` locks
/// it), so the space lives in memory, where a plugin's `get` and `compare-and-swap` cost no
/// thread hop (on SQLite each query is a round trip to sqlx's worker thread for the
/// connection: the rate limit's two were half of the default chain's own time in a proxied
/// request's TTFT). Every write is journaled and written behind to `plugin_kv`, in one
/// transaction per batch, as soon as the writer is free; at start the live rows are read
/// back. A crash loses the writes of the last moment (the batch in flight); a shutdown
/// writes everything first (`flush`). A batch that fails (full disk, read-only file) is
/// logged and retried every [`RETRY_EVERY`] (a key written again meanwhile keeps its newer
/// value); the plugins go on from memory.
pub struct SqliteKv {
    memory: Arc<MemoryKv>,
    journal: Arc<Journal>,
    pool: AnyPool,
    /// One writer at a time: the background one or a flush.
    writer: Arc<tokio::sync::Mutex<()>>,
}

/// How long a failed write-behind batch waits before it is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

impl SqliteKv {
    /// Reads the live rows back and starts the writer and the sweeper.
    pub async fn open(pool: AnyPool, quota: KvQuota) -> anyhow::Result<SqliteKv> {
        let journal = Arc::new(Journal::default());
        let memory = MemoryKv::journaled(quota, journal.clone());
        let rows: Vec<(String, Vec<u8>, Option<i64>)> =
            sqlx::query_as("SELECT key, value, expires_at FROM plugin_kv WHERE expires_at IS NULL OR expires_at > $1")
                .bind(now_ms())
                .fetch_all(&pool)
                .await
                .context("reading the plugins' kv back")?;
        let (count, mut left_out) = (rows.len(), 0);
        for (key, value, expires_at) in rows {
            left_out += usize::from(!memory.restore(key, value, expires_at));
        }
        if left_out > 0 {
            tracing::warn!(left_out, "the plugins' kv holds more rows than the space's bound; some were not read back");
        }
        tracing::debug!(entries = count - left_out, "plugin kv read back");
        let kv = SqliteKv { memory: Arc::new(memory), journal, pool, writer: Arc::default() };
        spawn_sweeper(kv.pool.clone());
        let (memory, journal, pool, writer) = (Arc::downgrade(&kv.memory), kv.journal.clone(), kv.pool.clone(), kv.writer.clone());
        tokio::spawn(async move {
            // Ends once the kv is gone and everything is written.
            while memory.strong_count() > 0 || !journal.is_empty() {
                if journal.is_empty() {
                    tokio::select! {
                        () = journal.written() => {}
                        () = tokio::time::sleep(SWEEP_EVERY) => {
                            if let Some(memory) = memory.upgrade() {
                                memory.sweep();
                            }
                            continue;
                        }
                    }
                }
                let written = {
                    let _writing = writer.lock().await;
                    write_behind(&pool, &journal).await
                };
                if let Err(e) = written {
                    tracing::warn!(error = %e, "writing the plugins' kv to the store failed; retrying");
                    tokio::time::sleep(RETRY_EVERY).await;
                }
            }
        });
        Ok(kv)
    }
}

/// Takes the journal's writes and upserts them in one transaction; on failure they go
/// back to the journal (behind any newer write of the same key).
async fn write_behind(pool: &AnyPool, journal: &Journal) -> anyhow::Result<()> {
    let writes = journal.take();
    if writes.is_empty() {
        return Ok(());
    }
    let result = async {
        let mut tx = pool.begin().await?;
        for (key, (value, expires_at)) in &writes {
            upsert(key, value, *expires_at).execute(&mut *tx).await?;
        }
        tx.commit().await
    };
    match result.await {
        Ok(()) => Ok(()),
        Err(e) => {
            journal.put_back(writes);
            Err(e.into())
        }
    }
}

#[async_trait::async_trait]
impl KvBackend for SqliteKv {
    async fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        self.memory.get(key).await
    }

    async fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) -> anyhow::Result<()> {
        self.memory.set(key, value, ttl).await
    }

    async fn incr(&self, key: &str, delta: i64, ttl: Option<Duration>) -> anyhow::Result<i64> {
        self.memory.incr(key, delta, ttl).await
    }

    async fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: Vec<u8>, ttl: Option<Duration>) -> anyhow::Result<bool> {
        self.memory.compare_and_swap(key, expected, new, ttl).await
    }

    /// Writes every journaled write now.
    async fn flush(&self) -> anyhow::Result<()> {
        let _writing = self.writer.lock().await;
        write_behind(&self.pool, &self.journal).await
    }
}

/// Redis, under a key prefix. Every write is one Lua script, so each is one atomic step
/// on the server, quota check included: per plugin, a sorted set indexes its keys by
/// expiry (`{prefix}{plugin}#index`) and a hash keeps their sizes and the total
/// (`{prefix}{plugin}#sizes`); expired keys leave both when the plugin next writes. Plugin
/// names have no `/`, so these never collide with a data key (`{prefix}{plugin}/{key}`).
pub struct RedisKv {
    conn: redis::aio::ConnectionManager,
    prefix: String,
    quota: KvQuota,
    incr: redis::Script,
    set: redis::Script,
    cas: redis::Script,
}

/// Shared by the write scripts. KEYS: data key, index, sizes. ARGV: now (ms), max entries,
/// max bytes, the entry's size for the quota, its expiry score (ms, or `+inf`), then the
/// script's own arguments. `admit()` returns an error reply when the quota refuses.
const QUOTA_LUA: &str = r"
local idx, sizes, now = KEYS[2], KEYS[3], ARGV[1]
local expired = redis.call('ZRANGEBYSCORE', idx, '-inf', now)
for _, k in ipairs(expired) do
  redis.call('HINCRBY', sizes, '#total', -tonumber(redis.call('HGET', sizes, k) or '0'))
  redis.call('HDEL', sizes, k)
end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', idx, '-inf', now) end
local function admit()
  local old = tonumber(redis.call('HGET', sizes, KEYS[1]) or '-1')
  local size = tonumber(ARGV[4])
  if old < 0 and redis.call('ZCARD', idx) >= tonumber(ARGV[2]) then
    return redis.error_reply('kv quota: the plugin keeps ' .. redis.call('ZCARD', idx) .. ' entries, the limit is ' .. ARGV[2])
  end
  local grow = size - math.max(old, 0)
  local total = tonumber(redis.call('HGET', sizes, '#total') or '0')
  if grow > 0 and total + grow > tonumber(ARGV[3]) then
    return redis.error_reply('kv quota: the plugin keeps ' .. total .. ' bytes, and ' .. grow .. ' more would pass the limit of ' .. ARGV[3])
  end
  redis.call('ZADD', idx, ARGV[5], KEYS[1])
  redis.call('HSET', sizes, KEYS[1], size)
  redis.call('HINCRBY', sizes, '#total', grow)
  return false
end
";

/// ARGV[6]: delta; ARGV[7]: ttl in ms or ''. A new key is admitted (and takes the ttl); an
/// existing one keeps its place and expiry.
const INCR_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  local refused = admit()
  if refused then return refused end
  local n = redis.call('INCRBY', KEYS[1], ARGV[6])
  if ARGV[7] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[7]) end
  return n
end
return redis.call('INCRBY', KEYS[1], ARGV[6])";

/// ARGV[6]: value; ARGV[7]: ttl in ms or ''.
const SET_LUA: &str = r"
local refused = admit()
if refused then return refused end
if ARGV[7] ~= '' then redis.call('SET', KEYS[1], ARGV[6], 'PX', ARGV[7]) else redis.call('SET', KEYS[1], ARGV[6]) end
return 1";

/// ARGV[6]: '1' if a value is expected, '0' for absent; ARGV[7]: expected; ARGV[8]: new;
/// ARGV[9]: ttl in ms or ''.
const CAS_LUA: &str = r"
local current = redis.call('GET', KEYS[1])
local matches = (ARGV[6] == '0' and current == false) or (ARGV[6] == '1' and current == ARGV[7])
if not matches then return 0 end
local refused = admit()
if refused then return refused end
if ARGV[9] ~= '' then redis.call('SET', KEYS[1], ARGV[8], 'PX', ARGV[9]) else redis.call('SET', KEYS[1], ARGV[8]) end
return 1";

fn ttl_arg(ttl: Option<Duration>) -> String {
    ttl.map(|t| t.as_millis().max(1).to_string()).unwrap_or_default()
}

impl RedisKv {
    pub async fn connect(url: &str, prefix: &str) -> anyhow::Result<RedisKv> {
        RedisKv::connect_with_quota(url, prefix, KvQuota::default()).await
    }

    pub async fn connect_with_quota(url: &str, prefix: &str, quota: KvQuota) -> anyhow::Result<RedisKv> {
        let client = redis::Client::open(url).with_context(|| format!("invalid Redis url `{url}`"))?;
        let conn = client.get_connection_manager().await.with_context(|| format!("cannot connect to Redis at `{url}`"))?;
        let script = |body: &str| redis::Script::new(&format!("{QUOTA_LUA}\n{body}"));
        Ok(RedisKv { conn, prefix: prefix.to_string(), quota, incr: script(INCR_LUA), set: script(SET_LUA), cas: script(CAS_LUA) })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// A write script over `key`, with the quota arguments in place; the caller adds its own.
    fn write<'a>(&self, script: &'a redis::Script, key: &str, value_len: usize, ttl: Option<Duration>) -> redis::ScriptInvocation<'a> {
        let plugin = plugin_of(key);
        let score = match ttl {
            Some(t) => now_ms().saturating_add(t.as_millis().min(i64::MAX as u128) as i64).to_string(),
            None => "+inf".to_string(),
        };
        let mut invocation = script.key(self.key(key));
        invocation
            .key(format!("{}{plugin}#index", self.prefix))
            .key(format!("{}{plugin}#sizes", self.prefix))
            .arg(now_ms())
            .arg(self.quota.entries)
            .arg(self.quota.bytes)
            .arg(entry_size(key, value_len))
            .arg(score);
        invocation
    }
}

#[async_trait::async_trait]
impl KvBackend for RedisKv {
    async fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.conn.clone().get(self.key(key)).await?)
    }

    async fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) -> anyhow::Result<()> {
        let mut invocation = self.write(&self.set, key, value.len(), ttl);
        invocation.arg(value).arg(ttl_arg(ttl));
        let _: i64 = invocation.invoke_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    async fn incr(&self, key: &str, delta: i64, ttl: Option<Duration>) -> anyhow::Result<i64> {
        // A counter's size for the quota: its key and at most 20 digits.
        let mut invocation = self.write(&self.incr, key, 20, ttl);
        invocation.arg(delta).arg(ttl_arg(ttl));
        let result: redis::RedisResult<i64> = invocation.invoke_async(&mut self.conn.clone()).await;
        result.with_context(|| format!("kv incr on `{key}`"))
    }

    async fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: Vec<u8>, ttl: Option<Duration>) -> anyhow::Result<bool> {
        let mut invocation = self.write(&self.cas, key, new.len(), ttl);
        invocation.arg(if expected.is_some() { "1" } else { "0" }).arg(expected.unwrap_or_default()).arg(new).arg(ttl_arg(ttl));
        let swapped: i64 = invocation.invoke_async(&mut self.conn.clone()).await?;
        Ok(swapped == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreConfig;
    use crate::policy::kv::tests::{TEST_QUOTA, check_contract, check_quota};
    use crate::store::SessionStore;

    async fn sqlite(dir: &tempfile::TempDir) -> SessionStore {
        let url = format!("sqlite://{}", dir.path().join("kv.db").display());
        SessionStore::connect(&StoreConfig { url, ..StoreConfig::default() }).await.unwrap()
    }

    #[tokio::test]
    async fn sqlite_kv_keeps_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite(&dir).await;
        check_contract(&SqliteKv::open(store.pool().clone(), KvQuota::default()).await.unwrap(), "t").await;
        check_quota(&SqliteKv::open(store.pool().clone(), TEST_QUOTA).await.unwrap(), "q").await;
        // The table's own path (a Postgres store's) on SQLite too.
        check_contract(&SqlKv::new(store.pool().clone()), "s").await;
    }

    /// What a SQLite store's kv holds comes back after a restart: written behind as it
    /// changes (no flush needed), expiry kept; and a second process cannot open the store.
    #[tokio::test]
    async fn a_sqlite_kv_survives_a_restart_and_has_one_owner() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite(&dir).await;
        let kv = SqliteKv::open(store.pool().clone(), KvQuota::default()).await.unwrap();
        assert_eq!(kv.incr("p/n", 41, None).await.unwrap(), 41);
        assert_eq!(kv.incr("p/n", 1, None).await.unwrap(), 42);
        kv.set("p/soon", b"gone".to_vec(), Some(Duration::from_millis(300))).await.unwrap();
        kv.set("p/later", b"kept".to_vec(), Some(Duration::from_secs(600))).await.unwrap();
        assert!(kv.compare_and_swap("p/c", None, b"1 2".to_vec(), None).await.unwrap());
        // The writer runs as soon as it is free: the rows are there without a flush.
        let count = || sqlx::query_as::<_, (i64,)>("SELECT COUNT(*) FROM plugin_kv").fetch_one(store.pool());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while count().await.unwrap().0 < 4 {
            assert!(std::time::Instant::now() < deadline, "the writes never reached the table");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let err = SessionStore::connect(&StoreConfig { url: store.config.url.clone(), ..StoreConfig::default() }).await.err().unwrap();
        assert!(err.to_string().contains("in use by another wisp process"), "{err}");
        drop((kv, store));

        tokio::time::sleep(Duration::from_millis(400)).await;
        let store = sqlite(&dir).await;
        let kv = SqliteKv::open(store.pool().clone(), KvQuota::default()).await.unwrap();
        assert_eq!(kv.get("p/n").await.unwrap(), Some(b"42".to_vec()));
        assert_eq!(kv.get("p/c").await.unwrap(), Some(b"1 2".to_vec()));
        assert_eq!(kv.get("p/later").await.unwrap(), Some(b"kept".to_vec()));
        assert_eq!(kv.get("p/soon").await.unwrap(), None, "an expired entry does not come back");
    }

    /// A write that cannot reach the table (the file turned read-only) is kept and written
    /// once it can; the plugins read on from memory meanwhile.
    #[tokio::test]
    async fn a_failed_write_behind_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite(&dir).await;
        let kv = SqliteKv::open(store.pool().clone(), KvQuota::default()).await.unwrap();
        kv.flush().await.unwrap();
        sqlx::query("CREATE TRIGGER refuse BEFORE INSERT ON plugin_kv BEGIN SELECT RAISE(ABORT, 'refused'); END")
            .execute(store.pool())
            .await
            .unwrap();
        kv.set("p/a", b"1".to_vec(), None).await.unwrap();
        assert!(kv.flush().await.is_err(), "the trigger refuses the write");
        kv.set("p/b", b"2".to_vec(), None).await.unwrap();
        assert_eq!(kv.get("p/a").await.unwrap(), Some(b"1".to_vec()));
        sqlx::query("DROP TRIGGER refuse").execute(store.pool()).await.unwrap();
        kv.flush().await.unwrap();
        let rows: Vec<(String,)> = sqlx::query_as("SELECT key FROM plugin_kv ORDER BY key").fetch_all(store.pool()).await.unwrap();
        assert_eq!(rows, [("p/a".to_string(),), ("p/b".to_string(),)]);
    }

    #[tokio::test]
    async fn concurrent_increments_on_sqlite_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite(&dir).await;
        let kv = std::sync::Arc::new(SqliteKv::open(store.pool().clone(), KvQuota::default()).await.unwrap());
        increment_from_8_tasks(kv.clone()).await;
        kv.flush().await.unwrap();
        let (value,): (Vec<u8>,) = sqlx::query_as("SELECT value FROM plugin_kv WHERE key = 'n'").fetch_one(store.pool()).await.unwrap();
        assert_eq!(value, b"200");
    }

    /// 8 tasks add 1 to `n` 25 times each; `n` ends at 200.
    async fn increment_from_8_tasks(kv: std::sync::Arc<dyn KvBackend>) {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let kv = kv.clone();
                tokio::spawn(async move {
                    for _ in 0..25 {
                        kv.incr("n", 1, None).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(kv.get("n").await.unwrap(), Some(b"200".to_vec()));
    }

    #[tokio::test]
    async fn postgres_kv_keeps_the_contract() {
        let db = crate::store::testing::TestDatabase::create().await;
        let store = SessionStore::connect(&StoreConfig { url: db.url.clone(), ..StoreConfig::default() }).await.unwrap();
        check_contract(&SqlKv::new(store.pool().clone()), "t").await;
        check_quota(&SqlKv::with_quota(store.pool().clone(), TEST_QUOTA), "").await;
        drop(store);
        db.remove().await;
    }

    #[tokio::test]
    async fn redis_kv_keeps_the_contract() {
        let url = std::env::var("WISPTEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let kv = RedisKv::connect(&url, &format!("wisp-test-{}:", uuid::Uuid::new_v4().simple())).await.unwrap();
        check_contract(&kv, "t").await;
        let kv = RedisKv::connect_with_quota(&url, &format!("wisp-test-{}:", uuid::Uuid::new_v4().simple()), TEST_QUOTA).await.unwrap();
        check_quota(&kv, "").await;
    }

    #[tokio::test]
    async fn concurrent_increments_on_sql_lose_nothing() {
        let db = crate::store::testing::TestDatabase::create().await;
        let store = SessionStore::connect(&StoreConfig { url: db.url.clone(), ..StoreConfig::default() }).await.unwrap();
        let kv = std::sync::Arc::new(SqlKv::new(store.pool().clone()));
        increment_from_8_tasks(kv.clone()).await;
        drop((kv, store));
        db.remove().await;
    }
}
