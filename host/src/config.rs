//! wisp's configuration: one TOML file, every field defaulted, `WISP_` environment
//! overrides, validated once at start with errors that name the field.
//!
//! Environment overrides use `__` between levels: `WISP_SERVER__LISTEN=0.0.0.0:8080`,
//! `WISP_LIMITS__MAX_QUEUE=8`. Relative paths are resolved from the working directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

pub use crate::policy::PluginConfig;

/// Where the default model lands (scripts/fetch-model.sh).
pub const DEFAULT_MODEL_PATH: &str = "models/gemma-3-270m-q4_k_m.gguf";
/// The id the default model is served under.
pub const DEFAULT_MODEL_ID: &str = "gemma-3-270m";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Parse(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), message: message.into() }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub models: Vec<ModelConfig>,
    pub limits: Limits,
    pub telemetry: TelemetryConfig,
    /// The governance chain, in order.
    pub plugins: Vec<PluginConfig>,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    /// The file this config was read from (hot reload re-reads it).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// The `/admin` routes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer key for `/admin/*`; unset disables those routes (403). Prefer setting it
    /// through `WISP_ADMIN__KEY` rather than in the file.
    pub key: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            models: vec![ModelConfig::default_model()],
            limits: Limits::default(),
            telemetry: TelemetryConfig::default(),
            plugins: Vec::new(),
            admin: AdminConfig::default(),
            store: StoreConfig::default(),
            source: None,
        }
    }
}

/// Where sessions and the plugins' key-value space live.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://FILE` (created if missing; WAL) or `postgres://USER@HOST/DB` (replicas
    /// share sessions and plugin counters).
    pub url: String,
    /// Connections in the pool.
    pub max_connections: u32,
    /// Sessions one principal may keep.
    pub max_sessions_per_principal: u64,
    /// Largest message stored in a session (and a session's system prompt), in bytes.
    pub max_message_bytes: usize,
    /// Stored responses (Responses API) one principal keeps; past it the oldest go.
    pub max_responses_per_principal: u64,
    /// Days a stored response is kept (0: no expiry).
    pub response_ttl_days: u64,
    /// `redis://HOST:PORT` keeps the plugins' key-value space in Redis instead of the store.
    pub kv_url: Option<String>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "sqlite://wisp.db".into(),
            max_connections: 8,
            max_sessions_per_principal: 1000,
            max_message_bytes: 256 * 1024,
            max_responses_per_principal: 10_000,
            response_ttl_days: 30,
            kv_url: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port (printed at start).
    pub listen: String,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: u64,
    /// Origins allowed by CORS; empty disables CORS headers, `["*"]` allows any.
    pub cors_origins: Vec<String>,
    /// After SIGTERM: in-flight requests and streams may run this long, then streams end
    /// with a `server_shutting_down` error.
    pub shutdown_grace_seconds: u64,
    /// Longest a non-generating request (models, sessions, admin) may take.
    pub timeout_seconds: u64,
    /// Longest a generation may take until its response starts (a whole non-streamed
    /// reply; a stream's first byte).
    pub generation_timeout_seconds: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 4 * 1024 * 1024,
            cors_origins: Vec::new(),
            shutdown_grace_seconds: 30,
            timeout_seconds: 30,
            generation_timeout_seconds: 600,
        }
    }
}

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA if compiled in and present, then Metal, else CPU.
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "metal" => Ok(DeviceSpec::Metal),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("unknown device `{s}`, expected auto, cpu, cuda:N or metal")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Metal => f.write_str("metal"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients send as `model`.
    pub id: String,
    /// Path of a GGUF file. Exactly one of `path` and `hf` is set.
    pub path: Option<PathBuf>,
    /// `owner/repo:file.gguf`, resolved from the local Hugging Face cache (never downloaded
    /// at request time; fetch it first with `huggingface-cli download owner/repo file.gguf`).
    pub hf: Option<String>,
    /// `auto`, `cpu`, `cuda:N` or `metal`.
    pub device: String,
    /// Context length in tokens; 0 uses the GGUF's `context_length`.
    pub context_length: usize,
    /// The model used when a request names none; the first model if none is marked.
    pub default: bool,
    /// Load at start instead of on first use (the default model always loads at start).
    pub preload: bool,
    /// Chat template (Jinja) overriding the GGUF's and the built-in one.
    pub chat_template: Option<String>,
    /// Tokens prefilled per forward pass; long prompts are split into chunks of this size.
    pub prefill_chunk: usize,
    /// Seconds without a request before the model is unloaded (it reloads on the next
    /// request, which waits for it); -1 (the default) keeps it loaded.
    pub keep_alive: i64,
    /// Proxy mode: serve this id by forwarding to these OpenAI-compatible backends
    /// (`http://host:port/v1`), with the whole plugin chain, instead of a local GGUF.
    pub upstreams: Vec<String>,
    /// The model name sent upstream (default: `id`).
    pub upstream_model: Option<String>,
    /// An environment variable holding the upstreams' API key (sent as a bearer token).
    pub api_key_env: Option<String>,
    /// Proxy mode: milliseconds to connect to an upstream before trying the next.
    pub upstream_connect_timeout_ms: u64,
    /// Proxy mode: seconds an upstream may take to its first chunk, and between chunks.
    pub upstream_timeout_secs: u64,
    /// Proxy mode: seconds a failed upstream is skipped before it is tried again.
    pub upstream_cooldown_secs: u64,
    /// Proxy mode: seconds between health checks (`GET /models`, and `/metrics` for load).
    pub health_check_secs: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            id: String::new(),
            path: None,
            hf: None,
            device: "auto".into(),
            context_length: 0,
            default: false,
            preload: false,
            chat_template: None,
            prefill_chunk: 512,
            keep_alive: -1,
            upstreams: Vec::new(),
            upstream_model: None,
            api_key_env: None,
            upstream_connect_timeout_ms: 2000,
            upstream_timeout_secs: 120,
            upstream_cooldown_secs: 10,
            health_check_secs: 2,
        }
    }
}

impl ModelConfig {
    fn default_model() -> Self {
        ModelConfig { id: DEFAULT_MODEL_ID.into(), path: Some(DEFAULT_MODEL_PATH.into()), default: true, ..ModelConfig::default() }
    }

    pub fn device_spec(&self) -> DeviceSpec {
        self.device.parse().unwrap_or(DeviceSpec::Auto)
    }

    /// Served by forwarding to upstreams (proxy mode), not by the local engine.
    pub fn is_proxy(&self) -> bool {
        !self.upstreams.is_empty()
    }
}

/// Serving limits; every request is validated against these before it is queued.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Requests waiting for the engine (per model) before new ones get 503.
    pub max_queue: usize,
    /// Sequences a model generates together (continuous batching); more wait in the queue.
    pub max_batch: usize,
    /// Memory per model for the KV of finished sequences, reused by prompts that start with
    /// them (a session's next turn, a shared system prompt); 0 turns reuse off. Unset: sized
    /// against the model, the KV of `max_batch` sequences of [`PREFIX_CACHE_TOKENS`] each
    /// (and their recurrent states, for a model with recurrent layers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_cache_mb: Option<usize>,
    /// `max_tokens` used when a request gives none: the rest of the context, capped here.
    pub default_max_tokens: usize,
    /// At most this many `stop` strings per request (OpenAI: 4).
    pub max_stop_sequences: usize,
    /// Longest accepted `stop` string, in bytes.
    pub max_stop_bytes: usize,
    /// Messages per chat request.
    pub max_messages: usize,
}

/// Tokens per batch slot that the default prefix cache holds (see [`Limits::prefix_cache_mb`]).
pub const PREFIX_CACHE_TOKENS: usize = 2048;

impl Limits {
    /// The prefix cache's budget in bytes for a model whose KV takes `kv_bytes_per_token`
    /// and whose recurrent state (with its checkpoints) takes up to `state_bytes` a sequence.
    pub fn prefix_cache_bytes(&self, kv_bytes_per_token: usize, state_bytes: usize) -> usize {
        match self.prefix_cache_mb {
            Some(mb) => mb << 20,
            None => self.max_batch * (PREFIX_CACHE_TOKENS * kv_bytes_per_token + state_bytes),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_queue: 64,
            max_batch: 8,
            prefix_cache_mb: None,
            default_max_tokens: 4096,
            max_stop_sequences: 4,
            max_stop_bytes: 256,
            max_messages: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `text` (human-readable) or `json`.
    pub log_format: LogFormat,
    /// A tracing filter (`info`, `wisp=debug,salvo=warn`); `RUST_LOG` wins when set.
    pub log_level: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig { log_format: LogFormat::Text, log_level: "info".into() }
    }
}

impl Config {
    /// Loads `file` (or `wisp.toml` in the working directory if it exists, else the
    /// built-in defaults), applies `WISP_` overrides and validates.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let file = match file {
            Some(path) if !path.exists() => {
                return Err(ConfigError::Parse(format!("config file {} does not exist", path.display())));
            }
            Some(path) => Some(path),
            None => Some(Path::new("wisp.toml")).filter(|p| p.exists()),
        };
        let figment = match file {
            Some(path) => Self::defaults().merge(Toml::file_exact(path)),
            None => Self::defaults(),
        };
        let mut config = Self::extract(figment.merge(Env::prefixed("WISP_").split("__")))?;
        config.source = file.map(Path::to_path_buf);
        Ok(config)
    }

    /// Parses TOML text (no file, no environment): for tests and `config check`.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::extract(Self::defaults().merge(Toml::string(text)))
    }

    /// Defaults without models: a file that lists models replaces the default model rather
    /// than adding to it; `extract` puts it back when none is listed.
    fn defaults() -> Figment {
        Figment::from(Serialized::defaults(Config { models: Vec::new(), ..Config::default() }))
    }

    fn extract(figment: Figment) -> Result<Config, ConfigError> {
        let mut config: Config = figment.extract().map_err(|e| ConfigError::Parse(figment_message(e)))?;
        if config.models.is_empty() {
            config.models.push(ModelConfig::default_model());
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot; every error names its field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        if self.server.max_body_bytes < 1024 {
            return Err(invalid("server.max_body_bytes", "must be at least 1024"));
        }
        for (name, value) in
            [("timeout_seconds", self.server.timeout_seconds), ("generation_timeout_seconds", self.server.generation_timeout_seconds)]
        {
            if value == 0 {
                return Err(invalid(format!("server.{name}"), "must be at least 1"));
            }
        }
        for origin in &self.server.cors_origins {
            if origin != "*" && !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return Err(invalid("server.cors_origins", format!("`{origin}` is neither `*` nor an http(s) origin")));
            }
        }
        let mut ids = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let field = |name: &str| format!("models[{i}].{name}");
            if m.id.trim().is_empty() {
                return Err(invalid(field("id"), "must not be empty"));
            }
            if m.id.contains('/') {
                return Err(invalid(field("id"), format!("`{}` must not contain `/` (it is a path segment of /v1/models/ID)", m.id)));
            }
            if !ids.insert(m.id.as_str()) {
                return Err(invalid(field("id"), format!("`{}` is listed twice", m.id)));
            }
            match (&m.path, &m.hf, m.is_proxy()) {
                (None, None, true) => validate_proxy(m, &field)?,
                (Some(_), _, true) | (_, Some(_), true) => {
                    return Err(invalid(
                        field("upstreams"),
                        "a proxied model has no `path` or `hf`: set `upstreams` or a model file, not both",
                    ));
                }
                (Some(_), Some(_), _) => return Err(invalid(field("path"), "set either `path` or `hf`, not both")),
                (None, None, false) => return Err(invalid(field("path"), "one of `path`, `hf` or `upstreams` is required")),
                (None, Some(hf), false) => {
                    parse_hf(hf).map_err(|e| invalid(field("hf"), e))?;
                }
                (Some(_), None, false) => {}
            }
            m.device.parse::<DeviceSpec>().map_err(|e| invalid(field("device"), e))?;
            if m.prefill_chunk == 0 {
                return Err(invalid(field("prefill_chunk"), "must be at least 1"));
            }
            if m.keep_alive < -1 {
                return Err(invalid(field("keep_alive"), "idle seconds before unloading, or -1 for never"));
            }
        }
        if self.models.iter().filter(|m| m.default).count() > 1 {
            return Err(invalid("models", "more than one model has `default = true`"));
        }
        let st = &self.store;
        if !["sqlite:", "postgres:", "postgresql:"].iter().any(|p| st.url.starts_with(p)) {
            return Err(invalid("store.url", format!("`{}` is neither `sqlite://FILE` nor `postgres://…`", st.url)));
        }
        if st.max_connections == 0 {
            return Err(invalid("store.max_connections", "must be at least 1"));
        }
        if let Some(kv) = &st.kv_url
            && !kv.starts_with("redis://")
            && !kv.starts_with("rediss://")
        {
            return Err(invalid("store.kv_url", format!("`{kv}` is not a `redis://` url")));
        }
        let l = &self.limits;
        for (name, value) in [
            ("max_queue", l.max_queue),
            ("max_batch", l.max_batch),
            ("default_max_tokens", l.default_max_tokens),
            ("max_stop_bytes", l.max_stop_bytes),
            ("max_messages", l.max_messages),
        ] {
            if value == 0 {
                return Err(invalid(format!("limits.{name}"), "must be at least 1"));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.plugins.iter().enumerate() {
            if p.name.trim().is_empty() || p.name.contains('/') {
                return Err(invalid(format!("plugins[{i}].name"), "must be a non-empty name without `/`"));
            }
            if !names.insert(p.name.as_str()) {
                return Err(invalid(format!("plugins[{i}].name"), format!("`{}` is listed twice", p.name)));
            }
            if p.limits.timeout_ms == 0 || p.limits.memory_mb == 0 {
                return Err(invalid(format!("plugins[{i}].limits"), "timeout_ms and memory_mb must be at least 1"));
            }
            if p.limits.memory_bytes() > crate::policy::limits::POOL_MAX_MEMORY_BYTES {
                return Err(invalid(
                    format!("plugins[{i}].limits.memory_mb"),
                    format!("at most {} MiB", crate::policy::limits::POOL_MAX_MEMORY_BYTES >> 20),
                ));
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.telemetry.log_level).map_err(|e| invalid("telemetry.log_level", e.to_string()))?;
        Ok(())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server
            .listen
            .parse()
            .map_err(|_| invalid("server.listen", format!("`{}` is not an address like 127.0.0.1:8080", self.server.listen)))
    }

    /// The model used when a request does not name one.
    pub fn default_model(&self) -> &ModelConfig {
        self.models.iter().find(|m| m.default).unwrap_or(&self.models[0])
    }
}

/// A proxied model's settings: `http://` upstream urls, each once, and timeouts of at least 1.
fn validate_proxy(m: &ModelConfig, field: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for url in &m.upstreams {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            invalid(
                field("upstreams"),
                format!("`{url}` is not an `http://host:port/v1` url (https upstreams: terminate TLS in a sidecar; wisp's client speaks plain HTTP)"),
            )
        })?;
        if rest.is_empty() || rest.starts_with('/') {
            return Err(invalid(field("upstreams"), format!("`{url}` has no host")));
        }
        if !seen.insert(url.trim_end_matches('/')) {
            return Err(invalid(field("upstreams"), format!("`{url}` is listed twice")));
        }
    }
    if m.upstream_model.as_deref().is_some_and(|u| u.trim().is_empty()) {
        return Err(invalid(field("upstream_model"), "must not be empty"));
    }
    if let Some(var) = &m.api_key_env
        && std::env::var(var).map_or(true, |v| v.is_empty())
    {
        return Err(invalid(field("api_key_env"), format!("the environment variable `{var}` is not set")));
    }
    for (name, value) in [
        ("upstream_connect_timeout_ms", m.upstream_connect_timeout_ms),
        ("upstream_timeout_secs", m.upstream_timeout_secs),
        ("health_check_secs", m.health_check_secs),
    ] {
        if value == 0 {
            return Err(invalid(field(name), "must be at least 1"));
        }
    }
    Ok(())
}

/// Splits `owner/repo:file.gguf`.
pub fn parse_hf(spec: &str) -> Result<(&str, &str), String> {
    match spec.split_once(':') {
        Some((repo, file)) if repo.contains('/') && !file.is_empty() => Ok((repo, file)),
        _ => Err(format!("`{spec}` is not of the form owner/repo:file.gguf")),
    }
}

/// figment's messages name the key path (`for key "default.server.listen"`); keep them but
/// drop its profile prefix.
fn figment_message(e: figment::Error) -> String {
    e.into_iter()
        .map(|e| {
            let path = e.path.join(".");
            let what = e.kind.to_string();
            let source = e.metadata.as_ref().map(|m| format!(" (from {})", m.name)).unwrap_or_default();
            if path.is_empty() { format!("{what}{source}") } else { format!("{path}: {what}{source}") }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_default_model() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.models.len(), 1);
        assert_eq!(c.default_model().id, DEFAULT_MODEL_ID);
        assert_eq!(c.server.listen, "127.0.0.1:8080");
    }

    #[test]
    fn errors_name_the_field() {
        let e = Config::from_toml("[server]\nlisten = 5").unwrap_err().to_string();
        assert!(e.contains("server.listen"), "{e}");
        let e = Config::from_toml("[[models]]\nid = \"a\"\npath = \"x\"\ndevice = \"gpu\"").unwrap_err().to_string();
        assert!(e.contains("models[0].device") && e.contains("gpu"), "{e}");
        let e = Config::from_toml("[limits]\nmax_queue = 0").unwrap_err().to_string();
        assert!(e.contains("limits.max_queue"), "{e}");
        let e = Config::from_toml("[server]\nlisten = \"nowhere\"").unwrap_err().to_string();
        assert!(e.contains("server.listen"), "{e}");
    }

    #[test]
    fn the_prefix_cache_is_sized_against_the_model_unless_set() {
        let limits = Config::from_toml("[limits]\nmax_batch = 4").unwrap().limits;
        assert_eq!(limits.prefix_cache_bytes(1000, 0), 4 * PREFIX_CACHE_TOKENS * 1000);
        assert_eq!(limits.prefix_cache_bytes(1000, 7), 4 * (PREFIX_CACHE_TOKENS * 1000 + 7));
        let limits = Config::from_toml("[limits]\nprefix_cache_mb = 3").unwrap().limits;
        assert_eq!(limits.prefix_cache_bytes(1000, 7), 3 << 20);
        let limits = Config::from_toml("[limits]\nprefix_cache_mb = 0").unwrap().limits;
        assert_eq!(limits.prefix_cache_bytes(1000, 7), 0);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = Config::from_toml("[server]\nlisen = \"1.2.3.4:1\"").unwrap_err().to_string();
        assert!(e.contains("lisen"), "{e}");
    }

    #[test]
    fn a_model_needs_exactly_one_source() {
        let e = Config::from_toml("[[models]]\nid = \"a\"").unwrap_err().to_string();
        assert!(e.contains("models[0].path"), "{e}");
        let e = Config::from_toml("[[models]]\nid = \"a\"\nhf = \"nope\"").unwrap_err().to_string();
        assert!(e.contains("models[0].hf"), "{e}");
        assert!(Config::from_toml("[[models]]\nid = \"a\"\nhf = \"o/r:f.gguf\"").is_ok());
    }

    #[test]
    fn plugins_parse_with_their_config_table() {
        let c = Config::from_toml(
            "[[plugins]]\nname = \"guard\"\nwasm = \"g.wasm\"\nfail = \"open\"\nconfig = { deny = [{ name = \"x\", pattern = \"y\" }] }\n[plugins.limits]\ntimeout_ms = 20\n",
        )
        .unwrap();
        assert_eq!(c.plugins[0].name, "guard");
        assert_eq!(c.plugins[0].fail, crate::policy::FailMode::Open);
        assert_eq!(c.plugins[0].limits.timeout_ms, 20);
        assert_eq!(c.plugins[0].limits.memory_mb, crate::policy::limits::DEFAULT_MEMORY_MB);
        assert!(c.plugins[0].config.contains_key("deny"));
        let e =
            Config::from_toml("[[plugins]]\nname = \"a\"\nwasm = \"a.wasm\"\n[[plugins]]\nname = \"a\"\nwasm = \"b.wasm\"").unwrap_err();
        assert!(e.to_string().contains("plugins[1].name"), "{e}");
    }

    #[test]
    fn devices_parse() {
        assert_eq!("cuda:1".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(1)));
        assert_eq!("auto".parse::<DeviceSpec>(), Ok(DeviceSpec::Auto));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }
}
