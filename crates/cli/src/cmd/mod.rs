//! Subcommands.

mod analyze;
mod control;
mod proxy;
mod status;
mod up;

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
    /// Run a whole mesh on this machine: control plane, sidecars, gateways and workloads.
    Up(up::Args),
    /// Validate config files and directories, as `istioctl analyze` does.
    Analyze(analyze::Args),
    /// Run a proxy (gateway or sidecar).
    Proxy(proxy::Args),
    /// Run the control plane.
    Control(control::Args),
    /// List the proxies the control plane knows: workload, config version, last ACK/NACK, state.
    Status(status::StatusArgs),
    /// Show the listeners, routes and endpoints of one workload's proxy.
    ProxyConfig(status::ProxyConfigArgs),
    /// Print a Prometheus configuration that scrapes every proxy of a running mesh.
    PrometheusConfig(status::PrometheusArgs),
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Up(a) => up::run(a),
        Command::Analyze(a) => analyze::run(a),
        Command::Proxy(a) => proxy::run(a),
        Command::Control(a) => control::run(a),
        Command::Status(a) => status::status(a),
        Command::ProxyConfig(a) => status::proxy_config(a),
        Command::PrometheusConfig(a) => status::prometheus_config(a),
    }
}

/// Parses `10s`, `1h30m`, `250ms`.
pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    trellis_config::model::duration::parse_duration(s)
}

/// Runs `fut` on a multi-threaded runtime; errors are printed and become exit code 1.
pub(crate) fn block_on(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
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
