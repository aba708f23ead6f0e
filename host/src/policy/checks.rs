//! What a plugin returns is untrusted input. A rewritten request is held to the rules a
//! client's request is held to (the same limits from the config, the same checks of
//! tools and response formats), plus bounds on the fields only plugins set (the
//! principal); a denial is made safe to send and to count.

use super::limits::{MAX_DENIAL_CODE_BYTES, MAX_DENIAL_MESSAGE_BYTES, MAX_OUTPUT_BYTES, MAX_PRINCIPAL_BYTES};
use super::{Denial, Request, ResponseFormat};
use crate::config::Config;
use crate::pipeline::shape::Shape;

/// The limits a rewritten request must keep: those of `[limits]` and `[store]` that a
/// client's request keeps.
#[derive(Debug, Clone)]
pub struct RequestRules {
    pub max_messages: usize,
    pub max_stop_sequences: usize,
    pub max_stop_bytes: usize,
}

impl Default for RequestRules {
    fn default() -> Self {
        RequestRules::from_config(&Config::default())
    }
}

impl RequestRules {
    pub fn from_config(config: &Config) -> RequestRules {
        RequestRules {
            max_messages: config.limits.max_messages,
            max_stop_sequences: config.limits.max_stop_sequences,
            max_stop_bytes: config.limits.max_stop_bytes,
        }
    }
}

/// Roles a message may have.
const ROLES: &[&str] = &["system", "user", "assistant"];

/// The request a plugin rewrote, checked; the fields only the host sets (route, model,
/// headers, client address, prompt tokens) are taken from `before`, whatever the plugin
/// returned. An `Err` names the field and the rule it broke.
pub fn rewrite(before: &Request, mut after: Request, rules: &RequestRules) -> Result<Request, String> {
    after.route = before.route.clone();
    after.model = before.model.clone();
    after.headers = before.headers.clone();
    after.client_addr = before.client_addr.clone();
    after.prompt_tokens = before.prompt_tokens;

    // What a plugin passed on unchanged was the client's and kept the client's rules (a
    // client may send more than a plugin may write); only what it changed is checked here.
    let messages_changed = after.messages != before.messages;
    if after.messages.len() > rules.max_messages {
        return Err(format!("rewrote {} messages, over the limit of {}", after.messages.len(), rules.max_messages));
    }
    let bytes: usize = after.messages.iter().map(|m| m.content.len() + m.role.len()).sum();
    if messages_changed && bytes > MAX_OUTPUT_BYTES {
        return Err(format!("rewrote messages of {bytes} bytes, over the limit of {MAX_OUTPUT_BYTES}"));
    }
    if let Some((i, m)) = after.messages.iter().enumerate().find(|(_, m)| !ROLES.contains(&m.role.as_str())) {
        return Err(format!("rewrote messages[{i}].role to {:?}; a role is one of {ROLES:?}", truncated(&m.role, 64)));
    }
    let s = &after.sampling;
    if !(s.temperature.is_finite() && (0.0..=2.0).contains(&s.temperature)) {
        return Err(format!("rewrote temperature to {}; it must be between 0 and 2", s.temperature));
    }
    if !(s.top_p.is_finite() && s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(format!("rewrote top_p to {}; it must be in (0, 1]", s.top_p));
    }
    if s.max_tokens == Some(0) {
        return Err("rewrote max_tokens to 0; it must be at least 1".into());
    }
    if s.stop.len() > rules.max_stop_sequences {
        return Err(format!("rewrote {} stop strings, over the limit of {}", s.stop.len(), rules.max_stop_sequences));
    }
    if let Some((i, stop)) = s.stop.iter().enumerate().find(|(_, s)| s.is_empty() || s.len() > rules.max_stop_bytes) {
        return Err(format!("rewrote stop[{i}] to {} bytes; a stop string has 1 to {} bytes", stop.len(), rules.max_stop_bytes));
    }
    if let Some(principal) = &after.principal {
        check_principal(principal)?;
    }
    let shape_changed = after.tools != before.tools
        || after.tool_choice != before.tool_choice
        || after.parallel_tool_calls != before.parallel_tool_calls
        || after.response_format != before.response_format;
    if shape_changed {
        let tool_bytes: usize = after.tools.iter().map(|t| t.name.len() + t.description.len() + t.parameters.len()).sum();
        let format_bytes = match &after.response_format {
            ResponseFormat::JsonSchema(s) => s.name.len() + s.schema.len(),
            _ => 0,
        };
        if tool_bytes + format_bytes > MAX_OUTPUT_BYTES {
            return Err(format!(
                "rewrote tools and response format of {} bytes, over the limit of {MAX_OUTPUT_BYTES}",
                tool_bytes + format_bytes
            ));
        }
        Shape::from_policy(&after)?;
    }
    Ok(after)
}

/// A principal names a caller in logs, in the store (it owns sessions) and in plugins'
/// kv keys: short, printable, one line.
fn check_principal(principal: &str) -> Result<(), String> {
    if principal.is_empty() || principal.len() > MAX_PRINCIPAL_BYTES {
        return Err(format!("set a principal of {} bytes; a principal has 1 to {MAX_PRINCIPAL_BYTES} bytes", principal.len()));
    }
    if principal.chars().any(|c| c.is_control()) {
        return Err("set a principal with control characters".into());
    }
    Ok(())
}

/// A denial made safe: an HTTP error status (else 403), a code of `[a-z0-9_.-]` within
/// [`MAX_DENIAL_CODE_BYTES`] (else `policy_denied`), a message within
/// [`MAX_DENIAL_MESSAGE_BYTES`] (cut, marked with `…`).
pub fn denial(mut d: Denial) -> Denial {
    if !(400..=599).contains(&d.status) {
        d.status = 403;
    }
    let valid_code = !d.code.is_empty()
        && d.code.len() <= MAX_DENIAL_CODE_BYTES
        && d.code.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if !valid_code {
        d.code = "policy_denied".into();
    }
    if d.message.len() > MAX_DENIAL_MESSAGE_BYTES {
        d.message = format!("{}…", truncated(&d.message, MAX_DENIAL_MESSAGE_BYTES));
    }
    d
}

/// The longest prefix of `text` within `max` bytes, on a character boundary.
pub fn truncated(text: &str, max: usize) -> &str {
    &text[..text.floor_char_boundary(max.min(text.len()))]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Header, Message, Sampling, Tool, ToolChoice};

    fn request() -> Request {
        Request {
            tools: vec![Tool { name: "get_time".into(), description: String::new(), parameters: "{}".into() }],
            tool_choice: ToolChoice::Auto,
            parallel_tool_calls: true,
            response_format: ResponseFormat::Text,
            route: "chat".into(),
            model: "m".into(),
            messages: vec![Message { role: "user".into(), content: "hi".into() }],
            sampling: Sampling { temperature: 1.0, top_p: 1.0, max_tokens: Some(10), stop: vec![] },
            principal: None,
            headers: vec![Header { name: "authorization".into(), value: "Bearer k".into() }],
            client_addr: "10.0.0.1".into(),
            prompt_tokens: 3,
        }
    }

    fn check(edit: impl FnOnce(&mut Request)) -> Result<Request, String> {
        let mut after = request();
        edit(&mut after);
        rewrite(&request(), after, &RequestRules::default())
    }

    #[test]
    fn a_rewrite_keeps_the_client_limits() {
        assert!(check(|_| {}).is_ok());
        assert!(check(|r| r.sampling.stop = vec!["s".repeat(257)]).unwrap_err().contains("stop[0]"));
        assert!(check(|r| r.sampling.stop = (0..5).map(|i| i.to_string()).collect()).unwrap_err().contains("5 stop strings"));
        assert!(check(|r| r.sampling.stop = vec![String::new()]).is_err());
        assert!(check(|r| r.sampling.temperature = f32::NAN).unwrap_err().contains("temperature"));
        assert!(check(|r| r.sampling.temperature = 2.5).is_err());
        assert!(check(|r| r.sampling.top_p = 0.0).unwrap_err().contains("top_p"));
        assert!(check(|r| r.sampling.max_tokens = Some(0)).is_err());
        assert!(check(|r| r.principal = Some("p".repeat(MAX_PRINCIPAL_BYTES + 1))).unwrap_err().contains("principal"));
        assert!(check(|r| r.principal = Some("eve\nINFO wisp: forged".into())).is_err());
        assert!(check(|r| r.principal = Some("alice@example.com".into())).is_ok());
        assert!(check(|r| r.messages[0].role = "tool\u{0}".into()).unwrap_err().contains("role"));
        assert!(check(|r| r.messages = vec![r.messages[0].clone(); 1025]).is_err());
        assert!(check(|r| r.tools[0].name = "rm -rf".into()).unwrap_err().contains("tools[0].function.name"));
        assert!(check(|r| r.tools[0].parameters = "x".repeat(MAX_OUTPUT_BYTES)).unwrap_err().contains("bytes"));
        assert!(check(|r| r.tool_choice = ToolChoice::Function("nope".into())).is_err());
        assert!(check(|r| r.tool_choice = ToolChoice::Required).is_ok());
    }

    #[test]
    fn what_a_plugin_passes_on_unchanged_is_not_held_to_the_plugin_limits() {
        // A client may send more than a plugin may write: an auth plugin that only sets
        // the principal must not fail a large request.
        let mut big = request();
        big.messages[0].content = "m".repeat(MAX_OUTPUT_BYTES + 1);
        big.tools[0].description = "d".repeat(MAX_OUTPUT_BYTES + 1);
        let mut after = big.clone();
        after.principal = Some("alice".into());
        assert!(rewrite(&big, after, &RequestRules::default()).is_ok());
        let mut grown = big.clone();
        grown.tools[0].name = "other".into();
        assert!(rewrite(&big, grown, &RequestRules::default()).unwrap_err().contains("bytes"));
    }

    #[test]
    fn a_rewrite_cannot_change_what_only_the_host_knows() {
        let after = check(|r| {
            r.headers.push(Header { name: "x".into(), value: "y".repeat(1 << 20) });
            r.client_addr = "1.2.3.4".into();
            r.prompt_tokens = 0;
            r.route = "admin".into();
        })
        .unwrap();
        assert_eq!(after.headers.len(), 1);
        assert_eq!((after.client_addr.as_str(), after.prompt_tokens, after.route.as_str()), ("10.0.0.1", 3, "chat"));
    }

    #[test]
    fn a_denial_is_bounded_and_its_code_is_a_label() {
        let d = denial(Denial { status: 200, code: "Bad Code\n".into(), message: "m".repeat(1 << 20) });
        assert_eq!((d.status, d.code.as_str()), (403, "policy_denied"));
        assert!(d.message.len() <= MAX_DENIAL_MESSAGE_BYTES + '…'.len_utf8());
        let d = denial(Denial { status: 429, code: "rate_limit_exceeded".into(), message: "slow down".into() });
        assert_eq!((d.status, d.code.as_str(), d.message.as_str()), (429, "rate_limit_exceeded", "slow down"));
        assert_eq!(denial(Denial { status: 400, code: "c".repeat(65), message: String::new() }).code, "policy_denied");
    }
}
