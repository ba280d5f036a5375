//! Subcommands.

/// `println!` to stdout that ends the process quietly when the reader went away
/// (`trellis status | head -1`), instead of panicking.
macro_rules! outln {
    () => { $crate::cmd::print_or_quit("\n") };
    ($($arg:tt)*) => { $crate::cmd::print_or_quit(&format!("{}\n", format_args!($($arg)*))) };
}

/// `print!` with the same care as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => { $crate::cmd::print_or_quit(&format!($($arg)*)) };
}

mod analyze;
mod common;
mod control;
mod kube;
mod proxy;
mod status;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
pub(crate) use common::{init_logging, parse_duration};

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
    /// Show the log of one process of the mesh `trellis up` runs (or ran).
    Logs(up::LogsArgs),
    /// Apply config files to the mesh `trellis up` runs, as `kubectl apply -f` (until it stops).
    Apply(up::ApplyArgs),
    /// Print (or open) the address of the console of the mesh `trellis up` runs: service
    /// graph, traces, golden metrics and config findings.
    Dashboard(up::DashboardArgs),
    /// Add the Trellis sidecar to the Pod templates of Kubernetes manifests (as `istioctl
    /// kube-inject`); prints the result.
    Inject(kube::InjectArgs),
    /// Program a Pod's transparent capture with iptables (the injected init container).
    ProxyInit(kube::ProxyInitArgs),
    /// Internal: how `trellis up` starts each child so it dies with `trellis up`.
    #[command(hide = true)]
    ExecSupervised(up::ExecArgs),
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
        Command::Inject(a) => kube::inject(a),
        Command::ProxyInit(a) => kube::proxy_init(a),
        Command::Logs(a) => up::logs(a),
        Command::Apply(a) => up::apply(a),
        Command::Dashboard(a) => up::dashboard(a),
        Command::ExecSupervised(a) => up::exec_supervised(a),
    }
}

/// Writes `text` to stdout; a closed pipe (`trellis ... | head`) ends the process quietly with
/// success, as `ls | head` does.
pub(crate) fn print_or_quit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
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
