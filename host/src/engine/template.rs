//! Chat templates rendered with minijinja, as Hugging Face's `apply_chat_template` does.
//!
//! The template comes from, in order: the model's config (`chat_template`), the GGUF's
//! `tokenizer.chat_template`, or the built-in template of the model's family (the default
//! Gemma 3 GGUF has none). HF templates call Python string methods (`.strip()`,
//! `dict.get`), `raise_exception`, `strftime_now` and the `tojson` filter; minijinja-contrib's
//! pycompat and the functions below cover them.

use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde::Serialize;

use super::model::Family;

/// Gemma's turn format: system text folded into the first user turn, `model` for the
/// assistant role (Google's gemma-3 tokenizer_config.json, text-only).
const GEMMA_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
  {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set first_user_prefix = "" -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
  {%- endif -%}
  {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
  {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
  {{- message['content'] | trim }}
  {{- '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{ '<start_of_turn>model\n' }}
{%- endif -%}"#;

/// ChatML, as Qwen 2 uses it.
const CHATML_TEMPLATE: &str = r#"{%- for message in messages -%}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"#;

/// Llama 3's header format.
const LLAMA3_TEMPLATE: &str = r#"{{ bos_token }}
{%- for message in messages -%}
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"#;

/// Phi 3's turn tags (microsoft/Phi-3.5-mini-instruct).
const PHI3_TEMPLATE: &str = r#"{%- for message in messages -%}
{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- else -%}{{ eos_token }}{%- endif -%}"#;

/// Mistral's instruction brackets, system text in the first user turn.
const MISTRAL_TEMPLATE: &str = r#"{{ bos_token }}
{%- set system = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' -%}
{%- for message in messages if message['role'] != 'system' -%}
  {%- if message['role'] == 'user' -%}{{ '[INST]' + (system if loop.first else '') + message['content'] + '[/INST]' }}
  {%- else -%}{{ message['content'] + eos_token }}{%- endif -%}
{%- endfor -%}"#;

/// gpt-oss's harmony turns (openai/harmony), without its tools and channels: a released
/// gpt-oss GGUF carries its full template.
const HARMONY_TEMPLATE: &str = r#"{%- for message in messages -%}
{{ '<|start|>' + message['role'] + '<|message|>' + message['content'] + '<|end|>' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|start|>assistant<|channel|>final<|message|>' }}{%- endif -%}"#;

/// Gemma 4's turns (google/gemma-4 without tools, images or thinking): a system turn of its
/// own, `model` for the assistant, an empty thought channel opening the reply.
const GEMMA4_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] in ['system', 'developer'] -%}
  {{ '<|turn>system\n' + messages[0]['content'] | trim + '<turn|>\n' }}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
  {{ '<|turn>' + role + '\n' + message['content'] | trim + '<turn|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|turn>model\n<|channel>thought\n<channel|>' }}{%- endif -%}"#;

/// The built-in template for a family, used when neither config nor GGUF gives one.
pub fn builtin_template(family: Family) -> &'static str {
    match family {
        Family::Gemma3 => GEMMA_TEMPLATE,
        Family::Gemma4 => GEMMA4_TEMPLATE,
        Family::GptOss => HARMONY_TEMPLATE,
        Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe | Family::Qwen35 | Family::Qwen35Moe => CHATML_TEMPLATE,
        Family::Llama => LLAMA3_TEMPLATE,
        Family::Phi3 => PHI3_TEMPLATE,
        Family::Mistral3 => MISTRAL_TEMPLATE,
    }
}

/// One message as templates see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template does not parse, or fails while rendering for a reason other than its
    /// own `raise_exception` (an unknown filter, an undefined value): a server-side
    /// configuration error, never the client's.
    #[error("chat template does not compile: {0}")]
    Compile(String),
    /// The template refused the conversation (e.g. roles do not alternate): a client error.
    #[error("{0}")]
    Rejected(String),
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<ChatTemplate, TemplateError> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> { Err(Error::new(ErrorKind::InvalidOperation, msg)) });
        env.add_function("strftime_now", |format: String| strftime(&format, unix_now()));
        env.add_template_owned("chat", source).map_err(|e| TemplateError::Compile(e.to_string()))?;
        Ok(ChatTemplate { env, bos_token, eos_token })
    }

    /// Renders a conversation, ending with the assistant's turn opener when asked.
    pub fn render(&self, messages: &[TemplateMessage], add_generation_prompt: bool) -> Result<String, TemplateError> {
        let template = self.env.get_template("chat").expect("the chat template was added at construction; this is a bug");
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| match e.kind() {
                // The template's own `raise_exception`: it refuses these messages.
                ErrorKind::InvalidOperation => {
                    TemplateError::Rejected(e.detail().unwrap_or("the chat template rejected the messages").to_string())
                }
                _ => TemplateError::Compile(format!("rendering failed: {e}")),
            })
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Python's `strftime` for the directives chat templates use (UTC): %Y %y %m %d %e %H %M
/// %S %b %B %a %A %j %%. Unknown directives are kept verbatim.
fn strftime(format: &str, unix: i64) -> String {
    const MONTHS: [&str; 12] =
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant, "chrono-Compatible Low-Level
    // Date Algorithms", days_from_civil inverse).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out += &year.to_string(),
            Some('y') => out += &format!("{:02}", year.rem_euclid(100)),
            Some('m') => out += &format!("{month:02}"),
            Some('d') => out += &format!("{day:02}"),
            Some('e') => out += &format!("{day:>2}"),
            Some('H') => out += &format!("{:02}", secs / 3600),
            Some('M') => out += &format!("{:02}", secs / 60 % 60),
            Some('S') => out += &format!("{:02}", secs % 60),
            Some('b') => out += &month_name[..3],
            Some('B') => out += month_name,
            Some('a') => out += &DAYS[weekday][..3],
            Some('A') => out += DAYS[weekday],
            Some('j') => out += &format!("{yday:03}"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> TemplateMessage {
        TemplateMessage { role: role.into(), content: content.into() }
    }

    fn gemma() -> ChatTemplate {
        ChatTemplate::new(GEMMA_TEMPLATE.into(), "<bos>".into(), "<eos>".into()).unwrap()
    }

    #[test]
    fn gemma_folds_the_system_prompt_into_the_first_user_turn() {
        let out =
            gemma().render(&[msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Bye")], true).unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn gemma_rejects_roles_that_do_not_alternate() {
        let err = gemma().render(&[msg("user", "a"), msg("user", "b")], true).unwrap_err();
        assert!(err.to_string().contains("alternate"), "{err}");
    }

    #[test]
    fn hf_helpers_are_available() {
        let t = ChatTemplate::new(
            "{{ messages[0].content.strip() }}|{{ messages[0].get('role') }}|{{ messages | tojson }}|{{ strftime_now('%Y') | length }}"
                .into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let out = t.render(&[msg("user", "  x  ")], false).unwrap();
        assert!(out.starts_with("x|user|[{"), "{out}");
        assert!(out.ends_with("|4"), "{out}");
    }

    #[test]
    fn strftime_formats_like_python() {
        // 2024-02-29 13:05:09 UTC, a Thursday, day 60 of a leap year.
        let t = 1_709_211_909;
        assert_eq!(strftime("%d %b %Y|%B %e|%A %a|%H:%M:%S|%y %m %j|%%", t), "29 Feb 2024|February 29|Thursday Thu|13:05:09|24 02 060|%");
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
    }

    #[test]
    fn a_broken_template_is_a_compile_error() {
        assert!(matches!(ChatTemplate::new("{% for %}".into(), String::new(), String::new()), Err(TemplateError::Compile(_))));
    }

    #[test]
    fn a_template_that_fails_while_rendering_is_the_servers_error_and_its_own_refusal_the_clients() {
        let broken = ChatTemplate::new("{{ messages | no_such_filter }}".into(), String::new(), String::new()).unwrap();
        assert!(matches!(broken.render(&[msg("user", "hi")], true), Err(TemplateError::Compile(_))));
        assert!(matches!(gemma().render(&[msg("user", "a"), msg("user", "b")], true), Err(TemplateError::Rejected(_))));
    }
}
