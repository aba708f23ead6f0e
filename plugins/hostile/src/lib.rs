//! hostile: a test fixture that misbehaves on purpose, so tests can show the host survives
//! it. `config = { mode = "…", hook = "init" | "request" | "chunk" | "finish" }`:
//!
//! - `loop`, `memory`, `trap`: spin forever, grow memory forever, panic;
//! - `big-output`: return 8 MiB from the hook (over the per-call cap);
//! - `mib-per-chunk`: emit just under 1 MiB for every chunk (under the per-call cap, so
//!   only a cap on a whole response's growth stops it);
//! - `kv-loop`: call kv `incr` forever (time in host calls is the host's, not the guest's);
//! - `kv-fill`: write new 64 KiB kv values forever (the plugin's kv quota stops it);
//! - `log-flood`: log forever, each line 64 KiB with newlines and a forged host log line;
//! - `deny-huge`: deny with an 8 MiB message and an invalid 64 KiB code;
//! - `deny-unique`: deny with a new code on every request (a metrics-label bomb);
//! - `rewrite`: rewrite the request with `field` = `stop-big` (a 40 MiB stop string),
//!   `stop-many` (1,024 stops), `principal` (a 32 MiB principal), `nan` (NaN temperature);
//! - `inject` with `text = "…"`: appends `text` to every reply (markup a client must
//!   render safely, e.g. a `<script>` tag).

use serde::Deserialize;
use wisp_sdk::{ChunkResult, Denial, Finish, Policy, Request, Verdict, clock, kv, log};

#[derive(Deserialize)]
struct Config {
    mode: String,
    #[serde(default = "request_hook")]
    hook: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    field: String,
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
            "mib-per-chunk" => "x".repeat((1 << 20) - 1),
            "kv-loop" => loop {
                kv::incr("spin", 1, None);
            },
            "kv-fill" => {
                let value = vec![7u8; 64 * 1024];
                for i in 0u64.. {
                    kv::set(&format!("fill:{}:{i}", clock::monotonic_ns()), &value, None);
                }
                String::new()
            }
            "log-flood" => {
                let line = format!("{}\n2026-12-01T00:00:00Z  INFO wisp: admin key accepted\n", "y".repeat(64 * 1024));
                loop {
                    log::info(&line);
                }
            }
            _ => String::new(),
        }
    }

    fn rewrite(&self, request: &Request) -> Verdict {
        let mut request = request.clone();
        match self.config.field.as_str() {
            "stop-big" => request.sampling.stop = vec!["s".repeat(40 << 20)],
            "stop-many" => request.sampling.stop = (0..1024).map(|i| format!("stop{i}")).collect(),
            "principal" => request.principal = Some("p".repeat(32 << 20)),
            "nan" => request.sampling.temperature = f32::NAN,
            _ => {}
        }
        Verdict::Rewrite(request)
    }
}

impl Policy for Hostile {
    fn init(config: &str) -> Result<Self, String> {
        let hostile = Hostile { config: serde_json::from_str(config).map_err(|e| format!("hostile config: {e}"))? };
        if hostile.config.hook == "init" {
            hostile.misbehave();
        }
        Ok(hostile)
    }

    fn on_request(&mut self, request: &Request) -> Verdict {
        match self.config.mode.as_str() {
            "deny-huge" => {
                return Verdict::Deny(Denial { status: 403, code: "c".repeat(64 * 1024), message: "m".repeat(8 << 20) });
            }
            "deny-unique" => {
                let code = format!("denied_{}", clock::monotonic_ns());
                return Verdict::Deny(Denial { status: 403, code, message: "no".into() });
            }
            "rewrite" => return self.rewrite(request),
            _ => {}
        }
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
        if self.config.hook == "finish" {
            return self.misbehave();
        }
        match self.config.mode.as_str() {
            "inject" => self.config.text.clone(),
            _ => String::new(),
        }
    }
}

wisp_sdk::export_policy!(Hostile);
