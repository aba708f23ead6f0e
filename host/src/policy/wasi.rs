//! The WASI a plugin gets: only the interfaces a Rust guest's standard library imports on
//! wasm32-wasip2 (io, the cli environment, exit, stdio and terminal queries, the insecure
//! random seed that seeds `HashMap`), all backed by an empty context: no arguments, no
//! environment, stdin empty, stdout and stderr discarded.
//!
//! Not linked: clocks (a guest could sleep or wait on a timer pollable), the filesystem,
//! sockets and the secure random source. A policy needs none of them: time comes from
//! `wisp:policy/clock`, state from `wisp:policy/kv`. A component importing any of them is
//! refused at load with the import named, so no WASI call can block a hook.

use wasmtime::component::{HasData, Linker, ResourceTable};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::cli::{WasiCli, WasiCliView};
use wasmtime_wasi::p2::bindings::{cli, random};
use wasmtime_wasi::random::WasiRandom;

use super::PluginState;

struct Table;

impl HasData for Table {
    type Data<'a> = &'a mut ResourceTable;
}

fn table(state: &mut PluginState) -> &mut ResourceTable {
    state.ctx().table
}

pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    use wasmtime_wasi_io::bindings::wasi::io;
    io::error::add_to_linker::<PluginState, Table>(linker, table)?;
    io::poll::add_to_linker::<PluginState, Table>(linker, table)?;
    io::streams::add_to_linker::<PluginState, Table>(linker, table)?;
    cli::exit::add_to_linker::<PluginState, WasiCli>(linker, PluginState::cli)?;
    cli::environment::add_to_linker::<PluginState, WasiCli>(linker, PluginState::cli)?;
    cli::stdin::add_to_linker::<PluginState, WasiCli>(linker, PluginState::cli)?;
    cli::stdout::add_to_linker::<PluginState, WasiCli>(linker, PluginState::cli)?;
    cli::stderr::add_to_linker::<PluginState, WasiCli>(linker, PluginState::cli)?;
    cli::terminal_input::add_to_linker::<PluginState, WasiCli>(linker, PluginState::cli)?;
    cli::terminal_output::add_to_linker::<PluginState, WasiCli>(linker, PluginState::cli)?;
    cli::terminal_stdin::add_to_linker::<PluginState, WasiCli>(linker, PluginState::cli)?;
    cli::terminal_stdout::add_to_linker::<PluginState, WasiCli>(linker, PluginState::cli)?;
    cli::terminal_stderr::add_to_linker::<PluginState, WasiCli>(linker, PluginState::cli)?;
    random::insecure_seed::add_to_linker::<PluginState, WasiRandom>(linker, |s| s.wasi.random())?;
    Ok(())
}
