//! hostile: a test fixture that misbehaves on purpose, so tests can show the host survives
//! it. `config = { mode = "loop" | "memory" | "trap" | "big-output" | "kv-loop", hook = "request" | "chunk" }`,
//! or `config = { mode = "inject", text = "…" }`: appends `text` to every reply (markup a
//! client must render safely, e.g. a `<script>` tag).

use serde::Deserialize;
use wisp_sdk::{ChunkResult, Finish, Policy, Request, Verdict, kv};

#[derive(Deserialize)]
struct Config {
    mode: String,
    #[serde(default = "request_hook")]
    hook: String,
    #[serde(default)]
    text: String,
}

fn request_hook() -> String {
    "request".into()
}

struct Hostile {
    config: Config,
}

impl Hostile {
    fn misbehave(&self) -> String {
        match self.config.mode.as_str() {
            "loop" => {
                let mut x: u64 = 1;
                loop {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "trap" => panic!("hostile plugin traps on purpose"),
            "big-output" => "x".repeat(8 << 20),
            "kv-loop" => loop {
                kv::incr("spin", 1, None);
            },
            _ => String::new(),
        }
    }
}

impl Policy for Hostile {
    fn init(config: &str) -> Result<Self, String> {
        Ok(Hostile { config: serde_json::from_str(config).map_err(|e| format!("hostile config: {e}"))? })
    }

    fn on_request(&mut self, _request: &Request) -> Verdict {
        if self.config.hook == "request" {
            self.misbehave();
        }
        Verdict::Allow
    }

    fn on_chunk(&mut self, text: &str) -> ChunkResult {
        if self.config.hook == "chunk" {
            return ChunkResult { emit: self.misbehave(), stop: false };
        }
        ChunkResult { emit: text.to_string(), stop: false }
    }

    fn on_finish(&mut self, _finish: &Finish) -> String {
        match self.config.mode.as_str() {
            "inject" => self.config.text.clone(),
            _ => String::new(),
        }
    }
}

wisp_sdk::export_policy!(Hostile);
