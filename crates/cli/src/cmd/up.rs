//! `trellis up PATH...`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Config files or directories: Workloads, Services, Gateways, VirtualServices, ...
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Also read subdirectories.
    #[arg(long, short = 'R')]
    recursive: bool,
    /// Address of the control plane.
    #[arg(long, default_value = trellis_control::DEFAULT_ADDR)]
    control_plane: SocketAddr,
    /// Admin ports are numbered from here (gateways first, then workloads), so the scrape
    /// config of `trellis prometheus-config` stays valid across runs; 0 picks free ports.
    #[arg(long, default_value_t = 15100)]
    admin_port_base: u16,
    /// The mesh's certificate authority (generated there on first run, or plug-in CA files).
    /// Default: $XDG_STATE_HOME/trellis/ca (~/.local/state/trellis/ca).
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Lifetime of workload certificates (rotated at ~80%).
    #[arg(long, default_value = "24h", value_parser = super::parse_duration)]
    cert_ttl: std::time::Duration,
    /// Export every proxy's spans over OTLP/HTTP, e.g. http://127.0.0.1:4318/v1/traces.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Export every proxy's spans as Zipkin v2 JSON, e.g. http://127.0.0.1:9411/api/v2/spans.
    #[arg(long)]
    zipkin_endpoint: Option<String>,
}

fn default_ca_dir() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from(".trellis"));
    base.join("trellis/ca")
}

pub fn run(args: Args) -> ExitCode {
    let trellis = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot find the trellis executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = trellis_local::UpOptions {
        paths: args.paths,
        recursive: args.recursive,
        control_plane: args.control_plane,
        trellis,
        admin_port_base: args.admin_port_base,
        ca_dir: args.ca_dir.unwrap_or_else(default_ca_dir),
        cert_ttl: args.cert_ttl,
        otlp_endpoint: args.otlp_endpoint,
        zipkin_endpoint: args.zipkin_endpoint,
    };
    super::block_on(async move { trellis_local::up(opts).await.map_err(|e| anyhow::anyhow!(e)) })
}
