//! rate-limit: requests per minute and tokens per minute per principal (the client's IP
//! address for anonymous requests), in fixed one-minute windows kept in the host's kv so
//! they survive reloads and are shared by replicas on one store.
//!
//! Tokens are reserved when a request arrives (prompt tokens + its `max_tokens`, or
//! `default_reserve` when it gives none) and settled at the end with the real usage.
//!
//! ```toml
//! config = { requests_per_minute = 60, tokens_per_minute = 100000 }
//! ```

use serde::Deserialize;
use wisp_sdk::{Denial, Finish, Policy, Request, Verdict, clock, kv};

const WINDOW_MS: u64 = 60_000;
/// Keys outlive their window by one more, then expire.
const KEY_TTL_MS: u64 = 2 * WINDOW_MS;

#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    requests_per_minute: Option<i64>,
    #[serde(default)]
    tokens_per_minute: Option<i64>,
    #[serde(default = "default_reserve")]
    default_reserve: i64,
}

fn default_reserve() -> i64 {
    256
}

struct RateLimit {
    config: Config,
    /// Set when tokens were reserved: the kv key and how many.
    reserved: Option<(String, i64)>,
}

impl RateLimit {
    fn refuse(&self, what: &str, limit: i64, who: &str, now: u64) -> Verdict {
        let retry = (WINDOW_MS - now % WINDOW_MS).div_ceil(1000);
        Verdict::Deny(Denial {
            status: 429,
            code: "rate_limit_exceeded".into(),
            message: format!("Rate limit of {limit} {what} per minute reached for {who}; retry in {retry} s"),
        })
    }
}

impl Policy for RateLimit {
    fn init(config: &str) -> Result<Self, String> {
        let config: Config = serde_json::from_str(config).map_err(|e| format!("rate-limit config: {e}"))?;
        if config.requests_per_minute.is_some_and(|n| n <= 0) || config.tokens_per_minute.is_some_and(|n| n <= 0) {
            return Err("rate-limit: limits must be positive".into());
        }
        Ok(RateLimit { config, reserved: None })
    }

    fn on_request(&mut self, request: &Request) -> Verdict {
        let who = match &request.principal {
            Some(p) => format!("principal {p}"),
            None => format!("client {}", request.client_addr),
        };
        let now = clock::wall_ms();
        let window = now / WINDOW_MS;
        if let Some(limit) = self.config.requests_per_minute {
            let count = kv::incr(&format!("rpm:{who}:{window}"), 1, Some(KEY_TTL_MS));
            if count > limit {
                return self.refuse("requests", limit, &who, now);
            }
        }
        if let Some(limit) = self.config.tokens_per_minute {
            let want = request.prompt_tokens as i64 + request.sampling.max_tokens.map(i64::from).unwrap_or(self.config.default_reserve);
            let key = format!("tpm:{who}:{window}");
            let used = kv::incr(&key, want, Some(KEY_TTL_MS));
            if used > limit {
                kv::incr(&key, -want, Some(KEY_TTL_MS));
                return self.refuse("tokens", limit, &who, now);
            }
            self.reserved = Some((key, want));
        }
        Verdict::Allow
    }

    fn on_finish(&mut self, finish: &Finish) -> String {
        if let Some((key, reserved)) = self.reserved.take() {
            let used = i64::from(finish.usage.prompt_tokens) + i64::from(finish.usage.completion_tokens);
            kv::incr(&key, used - reserved, Some(KEY_TTL_MS));
        }
        String::new()
    }
}

wisp_sdk::export_policy!(RateLimit);
