//! prompt-guard: a maximum prompt length and regex deny / allow lists, globally or per
//! model. A refusal is a 400 whose code names the rule (`prompt_guard.<rule>`).
//!
//! ```toml
//! config = { max_prompt_chars = 20000, deny = [{ name = "injection", pattern = "(?i)ignore previous instructions" }] }
//! ```
//! A rule with `models = ["a", "b"]` applies only to those models. With any allow rule
//! present for a model, a prompt must match one of them.

use regex::Regex;
use serde::Deserialize;
use wisp_sdk::{Denial, Policy, Request, Verdict};

#[derive(Deserialize)]
struct RuleConfig {
    name: String,
    pattern: String,
    #[serde(default)]
    models: Vec<String>,
}

#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    max_prompt_chars: Option<usize>,
    #[serde(default)]
    deny: Vec<RuleConfig>,
    #[serde(default)]
    allow: Vec<RuleConfig>,
}

/// Prose with the usual letters, digits and punctuation, for warming regexes at init.
const WARM_UP: &str = "The quick brown fox jumps over the lazy dog. PACK MY BOX WITH FIVE DOZEN LIQUOR JUGS! \
    Write a short poem about the sea and the sky, please; what is 2 + 2 = 4? (0123456789) \"quoted\" 'text' \n\t-_/@#%&*";

struct Rule {
    name: String,
    regex: Regex,
    models: Vec<String>,
}

impl Rule {
    fn applies_to(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }
}

struct PromptGuard {
    max_prompt_chars: Option<usize>,
    deny: Vec<Rule>,
    allow: Vec<Rule>,
}

fn compile(rules: Vec<RuleConfig>) -> Result<Vec<Rule>, String> {
    rules
        .into_iter()
        .map(|r| {
            let regex = Regex::new(&r.pattern).map_err(|e| format!("prompt-guard rule `{}`: {e}", r.name))?;
            // Warm the lazy DFA on ordinary text so requests (which start from the snapshot
            // taken after init) find its states built.
            regex.is_match(WARM_UP);
            Ok(Rule { name: r.name, regex, models: r.models })
        })
        .collect()
}

fn deny(code: &str, message: String) -> Verdict {
    Verdict::Deny(Denial { status: 400, code: format!("prompt_guard.{code}"), message })
}

impl Policy for PromptGuard {
    fn init(config: &str) -> Result<Self, String> {
        let config: Config = serde_json::from_str(config).map_err(|e| format!("prompt-guard config: {e}"))?;
        Ok(PromptGuard { max_prompt_chars: config.max_prompt_chars, deny: compile(config.deny)?, allow: compile(config.allow)? })
    }

    fn on_request(&mut self, request: &Request) -> Verdict {
        let prompt: String = request.messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n");
        let chars = prompt.chars().count();
        if let Some(max) = self.max_prompt_chars
            && chars > max
        {
            return deny("max_prompt_chars", format!("The prompt is {chars} characters; the limit is {max}"));
        }
        if let Some(rule) = self.deny.iter().find(|r| r.applies_to(&request.model) && r.regex.is_match(&prompt)) {
            return deny(&rule.name, format!("The prompt was refused by the `{}` rule", rule.name));
        }
        let allow: Vec<&Rule> = self.allow.iter().filter(|r| r.applies_to(&request.model)).collect();
        if !allow.is_empty() && !allow.iter().any(|r| r.regex.is_match(&prompt)) {
            return deny("not_allowed", "The prompt matches none of the allowed patterns".to_string());
        }
        Verdict::Allow
    }
}

wisp_sdk::export_policy!(PromptGuard);
