//! Stored responses of the Responses API: one row per response, owned by a principal (any
//! other principal gets "not found", as for sessions), chained by `previous_response_id`.
//! A chain continued on another replica on the same Postgres, or after a restart, reads
//! the same rows.

use serde_json::Value;
use sqlx::Row;

use super::{SessionStore, StoreError, now_ms};

/// A chain longer than this is refused: each link is at least two messages, and a request
/// has at most `limits.max_messages` (1,024 by default).
pub const MAX_CHAIN: usize = 512;

/// One stored response.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub id: String,
    pub principal: String,
    pub previous_response_id: Option<String>,
    /// This response's input as chat messages (a JSON array).
    pub input: Value,
    /// The input as the client sent it, with ids (a JSON array).
    pub input_items: Value,
    /// The reply as chat messages (a JSON array).
    pub output: Value,
    /// The response object.
    pub body: Value,
}

fn from_row(r: &sqlx::any::AnyRow) -> Result<StoredResponse, StoreError> {
    let json = |i: usize| -> Result<Value, StoreError> {
        let text: String = r.try_get(i)?;
        serde_json::from_str(&text).map_err(|e| StoreError::Db(sqlx::Error::Decode(Box::new(e))))
    };
    Ok(StoredResponse {
        id: r.try_get(0)?,
        principal: r.try_get(1)?,
        previous_response_id: r.try_get(2)?,
        input: json(3)?,
        input_items: json(4)?,
        output: json(5)?,
        body: json(6)?,
    })
}

impl SessionStore {
    /// Stores a response. Within the same transaction, responses past
    /// `store.response_ttl_days` go, and the principal's oldest beyond
    /// `store.max_responses_per_principal`: what one caller (anonymous callers are one) can
    /// keep is bounded.
    pub async fn put_response(&self, response: &StoredResponse) -> Result<(), StoreError> {
        let now = now_ms();
        let mut conn = self.write_conn().await?;
        let mut tx = conn.begin().await?;
        if self.config.response_ttl_days > 0 {
            let cutoff = now.saturating_sub(i64::try_from(self.config.response_ttl_days.saturating_mul(86_400_000)).unwrap_or(i64::MAX));
            sqlx::query("DELETE FROM responses WHERE created_at < $1").bind(cutoff).execute(&mut *tx).await?;
        }
        let owned: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM responses WHERE principal = $1").bind(&response.principal).fetch_one(&mut *tx).await?;
        let cap = i64::try_from(self.config.max_responses_per_principal.max(1)).unwrap_or(i64::MAX);
        if owned >= cap {
            sqlx::query(
                "DELETE FROM responses WHERE id IN \
                 (SELECT id FROM responses WHERE principal = $1 ORDER BY created_at, id LIMIT $2)",
            )
            .bind(&response.principal)
            .bind(owned - cap + 1)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO responses (id, principal, previous_response_id, input, input_items, output, body, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&response.id)
        .bind(&response.principal)
        .bind(&response.previous_response_id)
        .bind(response.input.to_string())
        .bind(response.input_items.to_string())
        .bind(response.output.to_string())
        .bind(response.body.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        conn.committed = true;
        Ok(())
    }

    /// The caller's response `id`.
    pub async fn get_response(&self, principal: &str, id: &str) -> Result<StoredResponse, StoreError> {
        self.fetch_response(id).await?.filter(|r| r.principal == principal).ok_or_else(|| StoreError::NotFound(id.to_string()))
    }

    async fn fetch_response(&self, id: &str) -> Result<Option<StoredResponse>, StoreError> {
        let row = sqlx::query("SELECT id, principal, previous_response_id, input, input_items, output, body FROM responses WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    pub async fn delete_response(&self, principal: &str, id: &str) -> Result<(), StoreError> {
        let deleted = sqlx::query("DELETE FROM responses WHERE id = $1 AND principal = $2")
            .bind(id)
            .bind(principal)
            .execute(&self.pool)
            .await?
            .rows_affected();
        match deleted {
            0 => Err(StoreError::NotFound(id.to_string())),
            _ => Ok(()),
        }
    }

    /// The chain ending at `id`, oldest first, whoever owns it (the caller checks the
    /// owner, the head's principal, once the plugins have named the caller). Every link
    /// has the head's owner; a link deleted meanwhile ends the chain there (the
    /// conversation starts after it).
    pub async fn response_chain(&self, id: &str) -> Result<Vec<StoredResponse>, StoreError> {
        let head = self.fetch_response(id).await?.ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        let mut chain = vec![head];
        while let Some(previous) = chain.last().and_then(|r| r.previous_response_id.clone()) {
            if chain.len() >= MAX_CHAIN {
                return Err(StoreError::Invalid {
                    param: "previous_response_id",
                    code: "chain_too_long",
                    message: format!("the response chain is longer than {MAX_CHAIN} responses"),
                });
            }
            match self.fetch_response(&previous).await? {
                Some(link) if link.principal == chain[0].principal => chain.push(link),
                _ => break,
            }
        }
        chain.reverse();
        Ok(chain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreConfig;
    use serde_json::json;

    fn response(id: &str, previous: Option<&str>) -> StoredResponse {
        StoredResponse {
            id: id.into(),
            principal: "alice".into(),
            previous_response_id: previous.map(str::to_string),
            input: json!([{"role": "user", "content": id}]),
            input_items: json!([]),
            output: json!([{"role": "assistant", "content": "ok"}]),
            body: json!({"id": id}),
        }
    }

    #[tokio::test]
    async fn what_one_principal_keeps_is_bounded_and_old_responses_expire() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("wisp.db").display());
        let config = StoreConfig { url, max_responses_per_principal: 3, ..StoreConfig::default() };
        let store = SessionStore::connect(&config).await.unwrap();
        // A response from long ago (another principal's): expired at the next write.
        store.put_response(&StoredResponse { principal: "bob".into(), ..response("old", None) }).await.unwrap();
        sqlx::query("UPDATE responses SET created_at = 0 WHERE id = 'old'").execute(&store.pool).await.unwrap();
        for n in 1..=5 {
            store.put_response(&response(&format!("r{n}"), None)).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let kept: Vec<String> = sqlx::query_scalar("SELECT id FROM responses ORDER BY created_at").fetch_all(&store.pool).await.unwrap();
        assert_eq!(kept, ["r3", "r4", "r5"], "the 3 newest of alice's, and bob's expired one gone");
    }

    #[tokio::test]
    async fn a_chain_is_read_oldest_first_and_a_response_only_by_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("wisp.db").display());
        let store = SessionStore::connect(&StoreConfig { url, ..StoreConfig::default() }).await.unwrap();
        store.put_response(&response("r1", None)).await.unwrap();
        store.put_response(&response("r2", Some("r1"))).await.unwrap();
        store.put_response(&response("r3", Some("r2"))).await.unwrap();
        let ids: Vec<String> = store.response_chain("r3").await.unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["r1", "r2", "r3"]);
        assert!(matches!(store.get_response("bob", "r3").await, Err(StoreError::NotFound(_))));
        assert_eq!(store.get_response("alice", "r3").await.unwrap(), response("r3", Some("r2")));
        store.delete_response("alice", "r2").await.unwrap();
        let ids: Vec<String> = store.response_chain("r3").await.unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["r3"], "a deleted link ends the chain");
        assert!(matches!(store.delete_response("bob", "r1").await, Err(StoreError::NotFound(_))));
    }
}
