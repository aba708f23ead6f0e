//! The plugins' key-value space on the session store (SQLite or Postgres: every replica on
//! one Postgres shares the counters) or on Redis. Both keep [`KvBackend`]'s contract,
//! including expiry, and both are atomic across processes.

use std::time::Duration;

use anyhow::Context;
use redis::AsyncCommands;
use sqlx::AnyPool;

use super::now_ms;
use crate::policy::kv::{KvBackend, parse_counter};

/// How often expired rows are swept from the SQL table.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// `incr` is a compare-and-swap loop on SQL; contention this deep means something is wrong.
const MAX_INCR_ATTEMPTS: usize = 64;

fn expiry(ttl: Option<Duration>) -> Option<i64> {
    ttl.map(|t| now_ms().saturating_add(t.as_millis().min(i64::MAX as u128) as i64))
}

/// The `plugin_kv` table. Every write is one conditional statement, so concurrent writers
/// (threads or replicas) never lose an update.
pub struct SqlKv {
    pool: AnyPool,
}

impl SqlKv {
    /// Also starts a task that sweeps expired rows (reads ignore them either way).
    pub fn new(pool: AnyPool) -> SqlKv {
        let sweeper = pool.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tick.tick().await;
                let swept = sqlx::query("DELETE FROM plugin_kv WHERE expires_at IS NOT NULL AND expires_at <= $1")
                    .bind(now_ms())
                    .execute(&sweeper)
                    .await;
                if let Err(e) = swept {
                    tracing::warn!(error = %e, "sweeping expired plugin kv rows failed");
                }
            }
        });
        SqlKv { pool }
    }

    /// The live value and its expiry.
    async fn read(&self, key: &str) -> anyhow::Result<Option<(Vec<u8>, Option<i64>)>> {
        let row: Option<(Vec<u8>, Option<i64>)> = sqlx::query_as(
            "SELECT value, expires_at FROM plugin_kv WHERE key = $1 AND (expires_at IS NULL OR expires_at > $2)",
        )
        .bind(key)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    /// Writes `new` with `expires_at` if the live value is `expected`.
    async fn swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8], expires_at: Option<i64>) -> anyhow::Result<bool> {
        let now = now_ms();
        let changed = match expected {
            // Absent, or present but expired.
            None => sqlx::query(
                "INSERT INTO plugin_kv (key, value, expires_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at \
                 WHERE plugin_kv.expires_at IS NOT NULL AND plugin_kv.expires_at <= $4",
            )
            .bind(key)
            .bind(new)
            .bind(expires_at)
            .bind(now)
            .execute(&self.pool)
            .await?,
            Some(expected) => sqlx::query(
                "UPDATE plugin_kv SET value = $1, expires_at = $2 \
                 WHERE key = $3 AND value = $4 AND (expires_at IS NULL OR expires_at > $5)",
            )
            .bind(new)
            .bind(expires_at)
            .bind(key)
            .bind(expected)
            .bind(now)
            .execute(&self.pool)
            .await?,
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
        sqlx::query(
            "INSERT INTO plugin_kv (key, value, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
        )
        .bind(key)
        .bind(value)
        .bind(expiry(ttl))
        .execute(&self.pool)
        .await?;
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

/// Redis, under a key prefix. `incr` and `compare-and-swap` are Lua scripts, so each is
/// one atomic step on the server.
pub struct RedisKv {
    conn: redis::aio::ConnectionManager,
    prefix: String,
}

const INCR_SCRIPT: &str = r"
local existed = redis.call('EXISTS', KEYS[1])
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if existed == 0 and ARGV[2] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return n";

const CAS_SCRIPT: &str = r"
local current = redis.call('GET', KEYS[1])
local matches = (ARGV[1] == '0' and current == false) or (ARGV[1] == '1' and current == ARGV[2])
if not matches then return 0 end
if ARGV[4] ~= '' then redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4]) else redis.call('SET', KEYS[1], ARGV[3]) end
return 1";

fn ttl_arg(ttl: Option<Duration>) -> String {
    ttl.map(|t| t.as_millis().max(1).to_string()).unwrap_or_default()
}

impl RedisKv {
    pub async fn connect(url: &str, prefix: &str) -> anyhow::Result<RedisKv> {
        let client = redis::Client::open(url).with_context(|| format!("invalid Redis url `{url}`"))?;
        let conn = client.get_connection_manager().await.with_context(|| format!("cannot connect to Redis at `{url}`"))?;
        Ok(RedisKv { conn, prefix: prefix.to_string() })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

#[async_trait::async_trait]
impl KvBackend for RedisKv {
    async fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.conn.clone().get(self.key(key)).await?)
    }

    async fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        match ttl {
            Some(t) => conn.pset_ex::<_, _, ()>(self.key(key), value, t.as_millis().max(1) as u64).await?,
            None => conn.set::<_, _, ()>(self.key(key), value).await?,
        }
        Ok(())
    }

    async fn incr(&self, key: &str, delta: i64, ttl: Option<Duration>) -> anyhow::Result<i64> {
        let result: redis::RedisResult<i64> =
            redis::Script::new(INCR_SCRIPT).key(self.key(key)).arg(delta).arg(ttl_arg(ttl)).invoke_async(&mut self.conn.clone()).await;
        result.with_context(|| format!("kv incr on `{key}`: the value is not a decimal integer, or Redis failed"))
    }

    async fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: Vec<u8>, ttl: Option<Duration>) -> anyhow::Result<bool> {
        let swapped: i64 = redis::Script::new(CAS_SCRIPT)
            .key(self.key(key))
            .arg(if expected.is_some() { "1" } else { "0" })
            .arg(expected.unwrap_or_default())
            .arg(new)
            .arg(ttl_arg(ttl))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(swapped == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreConfig;
    use crate::policy::kv::tests::check_contract;
    use crate::store::SessionStore;

    #[tokio::test]
    async fn sqlite_kv_keeps_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("kv.db").display());
        let store = SessionStore::connect(&StoreConfig { url, ..StoreConfig::default() }).await.unwrap();
        check_contract(&SqlKv::new(store.pool().clone()), "t").await;
    }

    #[tokio::test]
    async fn postgres_kv_keeps_the_contract() {
        let db = crate::store::testing::TestDatabase::create().await;
        let store = SessionStore::connect(&StoreConfig { url: db.url.clone(), ..StoreConfig::default() }).await.unwrap();
        check_contract(&SqlKv::new(store.pool().clone()), "t").await;
        drop(store);
        db.remove().await;
    }

    #[tokio::test]
    async fn redis_kv_keeps_the_contract() {
        let url = std::env::var("WISPTEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let kv = RedisKv::connect(&url, &format!("wisp-test-{}:", uuid::Uuid::new_v4().simple())).await.unwrap();
        check_contract(&kv, "t").await;
    }

    #[tokio::test]
    async fn concurrent_increments_on_sql_lose_nothing() {
        let db = crate::store::testing::TestDatabase::create().await;
        let store = SessionStore::connect(&StoreConfig { url: db.url.clone(), ..StoreConfig::default() }).await.unwrap();
        let kv = std::sync::Arc::new(SqlKv::new(store.pool().clone()));
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
        drop((kv, store));
        db.remove().await;
    }
}
