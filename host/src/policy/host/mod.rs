//! The host side of the WIT imports, one file per interface (Spin's `host.rs` role).
//! The outer `wasmtime::Result` is a trap (a host-side refusal that ends the plugin call),
//! the inner value is what the guest sees.

mod clock;
mod kv;
mod log;

impl super::bindings::wisp::policy::types::Host for super::PluginState {}
