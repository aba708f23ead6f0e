//! redact: masks patterns in the output (emails, phone numbers, configured regexes),
//! streamed or not, across chunk boundaries, never emitting a fragment of a match.
//!
//! Hold-back is exact: text is released only from where no pattern can still start a
//! match, decided by running each candidate start through the patterns' lazy DFA
//! (anchored) to the end of the held text; a start whose DFA has not died is held.
//!
//! ```toml
//! config = { emails = true, phones = true, patterns = ["sk-[A-Za-z0-9]{8,}"], replacement = "[REDACTED]" }
//! ```

use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::meta::Regex;
use regex_automata::{Anchored, Input, util::start};
use serde::Deserialize;
use wisp_sdk::{ChunkResult, Finish, Policy};

const EMAIL: &str = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}";
const PHONE: &str = r"\+?[0-9](?:[ .()-]{0,2}[0-9]){6,14}";

#[derive(Deserialize)]
struct Config {
    #[serde(default = "yes")]
    emails: bool,
    #[serde(default = "yes")]
    phones: bool,
    #[serde(default)]
    patterns: Vec<String>,
    #[serde(default = "default_replacement")]
    replacement: String,
}

fn yes() -> bool {
    true
}

fn default_replacement() -> String {
    "[REDACTED]".into()
}

struct Redact {
    regex: Regex,
    dfa: DFA,
    cache: Cache,
    replacement: String,
    held: String,
}

impl Redact {
    /// Byte offset from which text must be held: the first char boundary where an anchored
    /// match could still be in progress at the end of `held`.
    fn hold_from(&mut self) -> usize {
        let bytes = self.held.as_bytes();
        let config = start::Config::new().anchored(Anchored::Yes);
        'start: for (i, _) in self.held.char_indices() {
            let Ok(mut state) = self.dfa.start_state(&mut self.cache, &config) else { return i };
            for &b in &bytes[i..] {
                match self.dfa.next_state(&mut self.cache, state, b) {
                    Ok(next) if next.is_dead() => continue 'start,
                    Ok(next) => state = next,
                    Err(_) => return i, // cache gave up: hold conservatively
                }
            }
            return i;
        }
        bytes.len()
    }

    /// Replaces every match in `text`.
    fn mask(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut last = 0;
        for m in self.regex.find_iter(text) {
            out.push_str(&text[last..m.start()]);
            out.push_str(&self.replacement);
            last = m.end();
        }
        out.push_str(&text[last..]);
        out
    }
}

impl Policy for Redact {
    fn init(config: &str) -> Result<Self, String> {
        let config: Config = serde_json::from_str(config).map_err(|e| format!("redact config: {e}"))?;
        let mut patterns: Vec<String> = config.patterns;
        if config.emails {
            patterns.push(EMAIL.into());
        }
        if config.phones {
            patterns.push(PHONE.into());
        }
        if patterns.is_empty() {
            return Err("redact: nothing to redact (enable emails or phones, or give patterns)".into());
        }
        let regex = Regex::new_many(&patterns).map_err(|e| format!("redact pattern: {e}"))?;
        let dfa = DFA::new_many(&patterns).map_err(|e| format!("redact pattern: {e}"))?;
        let cache = dfa.create_cache();
        Ok(Redact { regex, dfa, cache, replacement: config.replacement, held: String::new() })
    }

    fn on_chunk(&mut self, text: &str) -> ChunkResult {
        self.held.push_str(text);
        let mut cut = self.hold_from();
        // A complete match straddling the cut is final (its DFA died before the end):
        // release it whole so it is masked whole.
        if let Some(m) = self.regex.find_iter(Input::new(&self.held)).find(|m| m.start() < cut && m.end() > cut) {
            cut = m.end();
        }
        let rest = self.held.split_off(cut);
        let ready = std::mem::replace(&mut self.held, rest);
        ChunkResult { emit: self.mask(&ready), stop: false }
    }

    fn on_finish(&mut self, _finish: &Finish) -> String {
        let held = std::mem::take(&mut self.held);
        self.mask(&held)
    }
}

wisp_sdk::export_policy!(Redact);
