//! The `wisp` command: `serve`, `config check`, `bench`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use wisp::config::Config;

#[derive(Parser)]
#[command(name = "wisp", version, about = "LLM inference server with WebAssembly governance")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the configured models (the default when no command is given).
    Serve {
        /// Config file; default: ./wisp.toml if present, else built-in defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Listen address, overriding `server.listen` (port 0 picks a free port).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Measure prompt and decode speed of a model, without the server.
    Bench(wisp::bench::BenchArgs),
    /// Write and test governance plugins.
    Plugin {
        #[command(subcommand)]
        command: wisp::plugin_cli::PluginCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file (with WISP_ overrides applied) and print the result.
    Check { file: PathBuf },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve { config: None, listen: None }) {
        Command::Serve { config, listen } => {
            let mut config = Config::load(config.as_deref())?;
            if let Some(listen) = listen {
                config.server.listen = listen;
                config.validate()?;
            }
            wisp::telemetry::init_tracing(&config.telemetry);
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
            runtime.block_on(wisp::server::serve(config))
        }
        Command::Config { command: ConfigCommand::Check { file } } => match Config::load(Some(&file)) {
            Ok(config) => {
                println!("{}: ok", file.display());
                print!("{}", toml::to_string_pretty(&config).context("printing the config")?);
                Ok(())
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                std::process::exit(2);
            }
        },
        Command::Bench(args) => wisp::bench::run(args),
        Command::Plugin { command } => wisp::plugin_cli::run(command),
    }
}
