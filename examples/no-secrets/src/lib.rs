//! no-secrets: a wisp governance plugin.
//!
//! Refuses prompts that contain a configured word and marks the end of every reply.
//! Edit the `Policy` impl; every hook you leave out passes through.

use serde::Deserialize;
use wisp_sdk::{ChunkResult, Denial, Finish, Policy, Request, Verdict};

/// This plugin's `config` table from wisp.toml (handed to `init` as JSON).
#[derive(Deserialize)]
struct NoSecrets {
    word: String,
}

impl Policy for NoSecrets {
    fn init(config: &str) -> Result<Self, String> {
        serde_json::from_str(config).map_err(|e| format!("no-secrets config: {e}"))
    }

    fn on_request(&mut self, request: &Request) -> Verdict {
        if request.messages.iter().any(|m| m.content.contains(&self.word)) {
            return Verdict::Deny(Denial {
                status: 400,
                code: "forbidden_word".into(),
                message: format!("`{}` is not allowed", self.word),
            });
        }
        Verdict::Allow
    }

    fn on_chunk(&mut self, text: &str) -> ChunkResult {
        ChunkResult { emit: text.to_string(), stop: false }
    }

    fn on_finish(&mut self, _finish: &Finish) -> String {
        " [checked by no-secrets]".to_string()
    }
}

wisp_sdk::export_policy!(NoSecrets);
