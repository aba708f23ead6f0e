//! The `wisp` command: `serve`, `config check`, `bench`, `plugin`, `probe`.

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
    /// Exit 0 if `GET URL` answers 2xx within 3 s (container health checks; no curl needed).
    Probe {
        #[arg(default_value = "http://127.0.0.1:8080/health")]
        url: String,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file (with WISP_ overrides applied) and print the result.
    Check { file: PathBuf },
}

fn main() -> anyhow::Result<()> {
    wisp::engine::fix_thread_count();
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
        Command::Probe { url } => match probe(&url) {
            Ok(()) => Ok(()),
            Err(e) => {
                eprintln!("{url}: {e:#}");
                std::process::exit(1);
            }
        },
    }
}

/// A plain HTTP/1.0 GET of an `http://host:port/path` URL.
fn probe(url: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    use std::time::Duration;
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    let (authority, path) = rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let addr = authority.to_socket_addrs()?.next().context("the host does not resolve")?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n")?;
    let mut head = [0u8; 16];
    let n = stream.read(&mut head)?;
    let status = std::str::from_utf8(&head[..n]).ok().and_then(|h| h.split(' ').nth(1)).unwrap_or("");
    anyhow::ensure!(status.starts_with('2'), "answered `{}`", String::from_utf8_lossy(&head[..n]).trim());
    Ok(())
}
