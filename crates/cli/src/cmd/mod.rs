//! Subcommands.

mod analyze;
mod proxy;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Trellis: a light service mesh that reads Istio config.
#[derive(Parser, Debug)]
#[command(name = "trellis", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate config files and directories, as `istioctl analyze` does.
    Analyze(analyze::Args),
    /// Run a proxy (gateway or sidecar).
    Proxy(proxy::Args),
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Analyze(a) => analyze::run(a),
        Command::Proxy(a) => proxy::run(a),
    }
}

/// Logs to stderr; `RUST_LOG` overrides `default`.
pub(crate) fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}
