//! wisp: an LLM inference server with an OpenAI-compatible API whose governance is
//! pluggable WebAssembly.
//!
//! Modules, each with one job (see ARCHITECTURE.md): `config` (the TOML file), `api`
//! (HTTP routes: parse and frame), `request` (OpenAI request shapes and their
//! validation), `error` (the one client-facing error), `pipeline` (a request's flow:
//! model, session history, plugin chain, generation, output, turn), `engine` (the
//! `Backend` seam and the local candle backend: models, tokenizer, sampling, scheduler),
//! `policy` (the WebAssembly plugin chain), `store` (sessions and plugin kv in SQLite,
//! Postgres or Redis), `telemetry` (logs and metrics), `state` (what requests share),
//! `shutdown` (drain and end). `server` wires them together. Dependencies point one way:
//! api → pipeline → engine, policy, store.

pub mod api;
pub mod bench;
pub mod config;
pub mod engine;
pub mod error;
pub mod pipeline;
pub mod plugin_cli;
pub mod policy;
pub mod request;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod store;
pub mod telemetry;
