//! stop-sequences: operator stop strings, global and per model, applied to the output on
//! top of the request's own `stop` (which the engine already honours). Matches across
//! chunk boundaries and holds back only text that could still begin a stop string.
//!
//! ```toml
//! config = { stop = ["<|endoftext|>"], models = { "gemma-3-270m" = ["\n\nUser:"] } }
//! ```

use std::collections::HashMap;

use serde::Deserialize;
use wisp_sdk::{ChunkResult, Finish, Policy, Request, StopMatcher, Verdict};

#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    stop: Vec<String>,
    #[serde(default)]
    models: HashMap<String, Vec<String>>,
}

struct StopSequences {
    config: Config,
    matcher: StopMatcher,
}

impl Policy for StopSequences {
    fn init(config: &str) -> Result<Self, String> {
        let config: Config = serde_json::from_str(config).map_err(|e| format!("stop-sequences config: {e}"))?;
        if config.stop.iter().chain(config.models.values().flatten()).any(String::is_empty) {
            return Err("stop-sequences: stop strings must not be empty".into());
        }
        let matcher = StopMatcher::new(config.stop.clone());
        Ok(StopSequences { config, matcher })
    }

    fn on_request(&mut self, request: &Request) -> Verdict {
        let per_model = self.config.models.get(&request.model).into_iter().flatten();
        self.matcher = StopMatcher::new(self.config.stop.iter().chain(per_model).cloned());
        Verdict::Allow
    }

    fn on_chunk(&mut self, text: &str) -> ChunkResult {
        let step = self.matcher.push(text);
        ChunkResult { emit: step.text, stop: step.stopped.is_some() }
    }

    fn on_finish(&mut self, _finish: &Finish) -> String {
        self.matcher.finish()
    }
}

wisp_sdk::export_policy!(StopSequences);
