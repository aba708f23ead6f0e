//! tool-allowlist: which tools each caller may offer the model. Tools a caller may not use
//! are removed from the request before the model sees them (the grammar then cannot call
//! them); a request that names a removed tool, or requires a call when none is left, is
//! refused with 403 `tool_not_allowed`. Runs after auth, which sets the principal.
//!
//! ```toml
//! [[plugins]]
//! name = "tools"
//! wasm = "plugins/dist/tool_allowlist.wasm"
//! # Principal -> allowed tool names; `*` alone allows every tool, `get_*` a prefix.
//! # `default` applies to principals not listed (and to anonymous callers).
//! config = { principals = { demo = ["get_weather"], ops = ["*"] }, default = [] }
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;
use wisp_sdk::{Denial, Policy, Request, ToolChoice, Verdict};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    principals: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    default: Vec<String>,
}

struct ToolAllowlist {
    config: Config,
}

/// `pattern` is a name, `*`, or a prefix ending in `*`.
fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

fn deny(message: String) -> Verdict {
    Verdict::Deny(Denial { status: 403, code: "tool_not_allowed".into(), message })
}

impl Policy for ToolAllowlist {
    fn init(config: &str) -> Result<Self, String> {
        let config: Config = serde_json::from_str(config).map_err(|e| format!("tool-allowlist config: {e}"))?;
        if let Some(bad) = config
            .principals
            .values()
            .chain([&config.default])
            .flatten()
            .find(|p| p.is_empty() || p.strip_suffix('*').unwrap_or(p).contains('*'))
        {
            return Err(format!("tool-allowlist: `{bad}` is not a tool name, `*`, or a prefix ending in `*`"));
        }
        Ok(ToolAllowlist { config })
    }

    fn on_request(&mut self, request: &Request) -> Verdict {
        if request.tools.is_empty() {
            return Verdict::Allow;
        }
        let who = request.principal.as_deref().unwrap_or("anonymous");
        let allowed = self.config.principals.get(who).unwrap_or(&self.config.default);
        let permitted = |name: &str| allowed.iter().any(|p| matches(p, name));
        if request.tools.iter().all(|t| permitted(&t.name)) {
            return Verdict::Allow;
        }
        if let ToolChoice::Function(name) = &request.tool_choice
            && !permitted(name)
        {
            return deny(format!("`{who}` may not use the tool `{name}`"));
        }
        let mut request = request.clone();
        let removed: Vec<String> = request.tools.iter().filter(|t| !permitted(&t.name)).map(|t| t.name.clone()).collect();
        request.tools.retain(|t| permitted(&t.name));
        wisp_sdk::log::debug(&format!("removed tools {removed:?} for `{who}`"));
        if request.tools.is_empty() {
            if request.tool_choice == ToolChoice::Required {
                return deny(format!("`{who}` may not use any of the request's tools ({})", removed.join(", ")));
            }
            request.tool_choice = ToolChoice::None;
        }
        Verdict::Rewrite(request)
    }
}

wisp_sdk::export_policy!(ToolAllowlist);
