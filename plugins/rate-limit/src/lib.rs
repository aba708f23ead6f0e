//! rate-limit: requests per minute and tokens per minute per principal (the client's IP
//! address for anonymous requests), in fixed one-minute windows kept in the host's kv so
//! they survive reloads and are shared by replicas on one store.
//!
//! Tokens are reserved when a request arrives (prompt tokens + its `max_tokens`, or
//! `default_reserve` when it gives none) and settled at the end with the real usage. Both
//! counts of a window live under one key, read and written once per request; a refused
//! request counts for neither.
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
        let key = format!("rate:{who}:{}", now / WINDOW_MS);
        let want = match self.config.tokens_per_minute {
            Some(_) => request.prompt_tokens as i64 + request.sampling.max_tokens.map(i64::from).unwrap_or(self.config.default_reserve),
            None => 0,
        };
        let verdict = update(&key, |(requests, tokens)| {
            if let Some(limit) = self.config.requests_per_minute
                && requests + 1 > limit
            {
                return Err(self.refuse("requests", limit, &who, now));
            }
            if let Some(limit) = self.config.tokens_per_minute
                && tokens.saturating_add(want) > limit
            {
                return Err(self.refuse("tokens", limit, &who, now));
            }
            Ok((requests + 1, tokens.saturating_add(want)))
        });
        match verdict {
            Err(refused) => return refused,
            // Lost every race for the counters: refused, never let through uncounted.
            Ok(false) => {
                return Verdict::Deny(Denial {
                    status: 429,
                    code: "rate_limit_exceeded".into(),
                    message: format!("Too many concurrent requests for {who}; retry"),
                });
            }
            Ok(true) => {}
        }
        if self.config.tokens_per_minute.is_some() {
            self.reserved = Some((key, want));
        }
        Verdict::Allow
    }

    fn on_finish(&mut self, finish: &Finish) -> String {
        if let Some((key, reserved)) = self.reserved.take() {
            let used = i64::from(finish.usage.prompt_tokens) + i64::from(finish.usage.completion_tokens);
            let _ = update(&key, |(requests, tokens)| Ok::<_, ()>((requests, tokens.saturating_add(used - reserved))));
        }
        String::new()
    }
}

/// How often a window's counters are re-read after another request changed them first.
const MAX_ATTEMPTS: usize = 32;

/// Applies `change` to a window's counters (requests, tokens), kept together under one key
/// and written with one compare-and-swap: a request reads and writes the store once each
/// (two counters with `incr` took twice that), and concurrent requests on other replicas
/// never lose an update. A refusal (`Err`) writes nothing; `Ok(false)`: every attempt lost
/// its race.
fn update<E>(key: &str, change: impl Fn((i64, i64)) -> Result<(i64, i64), E>) -> Result<bool, E> {
    for _ in 0..MAX_ATTEMPTS {
        let current = kv::get(key);
        let counters = current.as_deref().map(parse).unwrap_or((0, 0));
        let (requests, tokens) = change(counters)?;
        if kv::compare_and_swap(key, current.as_deref(), format!("{requests} {tokens}").as_bytes(), Some(KEY_TTL_MS)) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `"REQUESTS TOKENS"`; anything else (which only another writer could have left) counts as
/// zero.
fn parse(value: &[u8]) -> (i64, i64) {
    let text = std::str::from_utf8(value).unwrap_or_default();
    let mut parts = text.split(' ').map(|n| n.parse::<i64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

wisp_sdk::export_policy!(RateLimit);
