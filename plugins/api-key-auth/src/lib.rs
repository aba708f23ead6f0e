//! api-key-auth: requests must carry a known API key (`Authorization: Bearer KEY` or
//! `x-api-key: KEY`). Keys are configured as sha256 hashes, each with a name and the
//! models it may use; the key's name becomes the request's principal.
//!
//! ```toml
//! [[plugins]]
//! name = "auth"
//! wasm = "plugins/api_key_auth.wasm"
//! config = { keys = [{ name = "demo", sha256 = "<hex of sha256(key)>", models = ["*"] }] }
//! ```

use serde::Deserialize;
use sha2::{Digest, Sha256};
use wisp_sdk::{Denial, Policy, Request, Verdict};

#[derive(Deserialize)]
struct Key {
    name: String,
    sha256: String,
    #[serde(default = "all_models")]
    models: Vec<String>,
}

fn all_models() -> Vec<String> {
    vec!["*".into()]
}

#[derive(Deserialize)]
struct Config {
    keys: Vec<Key>,
}

struct ApiKeyAuth {
    keys: Vec<([u8; 32], Key)>,
}

fn deny(status: u16, code: &str, message: &str) -> Verdict {
    Verdict::Deny(Denial { status, code: code.into(), message: message.into() })
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Compares in time independent of where the first difference is.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Policy for ApiKeyAuth {
    fn init(config: &str) -> Result<Self, String> {
        let config: Config = serde_json::from_str(config).map_err(|e| format!("api-key-auth config: {e}"))?;
        let keys = config
            .keys
            .into_iter()
            .map(|k| match hex32(&k.sha256) {
                Some(h) => Ok((h, k)),
                None => Err(format!("api-key-auth: key `{}` needs `sha256` as 64 hex digits", k.name)),
            })
            .collect::<Result<_, _>>()?;
        Ok(ApiKeyAuth { keys })
    }

    fn on_request(&mut self, request: &Request) -> Verdict {
        let header = |name: &str| request.headers.iter().find(|h| h.name == name).map(|h| h.value.trim());
        let presented = match (header("authorization"), header("x-api-key")) {
            (Some(auth), _) if auth.len() > 7 && auth[..7].eq_ignore_ascii_case("bearer ") => auth[7..].trim(),
            (_, Some(key)) if !key.is_empty() => key,
            _ => return deny(401, "missing_api_key", "An API key is required: send `Authorization: Bearer YOUR_KEY`"),
        };
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let Some((_, key)) = self.keys.iter().find(|(h, _)| same(h, &hash)) else {
            return deny(401, "invalid_api_key", "Incorrect API key provided");
        };
        // Routes that name no model (models, sessions) only need a valid key.
        if !request.model.is_empty() && !key.models.iter().any(|m| m == "*" || *m == request.model) {
            return deny(403, "model_not_allowed", &format!("The API key `{}` may not use the model `{}`", key.name, request.model));
        }
        let mut request = request.clone();
        request.principal = Some(key.name.clone());
        Verdict::Rewrite(request)
    }
}

wisp_sdk::export_policy!(ApiKeyAuth);
