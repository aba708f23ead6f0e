//! sleeper: a test fixture that blocks inside WASI (`std::thread::sleep`, which waits on a
//! clock pollable) in every hook. wisp links only the WASI interfaces a policy needs, and
//! clocks are not among them, so this component must be refused at load, naming the import.

use std::time::Duration;

use wisp_sdk::{ChunkResult, Policy, Request, Verdict};

struct Sleeper;

impl Policy for Sleeper {
    fn init(_config: &str) -> Result<Self, String> {
        std::thread::sleep(Duration::from_secs(3600));
        Ok(Sleeper)
    }

    fn on_request(&mut self, _request: &Request) -> Verdict {
        std::thread::sleep(Duration::from_secs(3600));
        Verdict::Allow
    }

    fn on_chunk(&mut self, text: &str) -> ChunkResult {
        std::thread::sleep(Duration::from_secs(3600));
        ChunkResult { emit: text.to_string(), stop: false }
    }
}

wisp_sdk::export_policy!(Sleeper);
