//! wisp: an LLM inference server with an OpenAI-compatible API whose governance is
//! pluggable WebAssembly.
//!
//! Modules, each with one job (see ARCHITECTURE.md): `config` (the TOML file), `api`
//! (HTTP routes and OpenAI shapes), `engine` (models, tokenizer, sampling, scheduler),
//! `store` (sessions and plugin kv in SQLite or Postgres), `telemetry` (logs and metrics), `shutdown` (drain and end, read by the api). `server` wires them
//! together.

pub mod api;
pub mod bench;
pub mod config;
pub mod engine;
pub mod plugin_cli;
pub mod policy;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;
