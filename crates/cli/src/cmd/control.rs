//! `trellis control`: run the control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use trellis_control::ConfigStore;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Config files or directories, watched for changes.
    #[arg(long = "config", short = 'c', required = true)]
    config: Vec<PathBuf>,
    /// Also read subdirectories of config directories.
    #[arg(long, short = 'R')]
    recursive: bool,
    /// Address of the control-plane API.
    #[arg(long, default_value = trellis_control::DEFAULT_ADDR)]
    listen: SocketAddr,
    /// The certificate authority's directory: generated there on first start, or Istio-style
    /// plug-in CA files put there (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem).
    #[arg(long, default_value = ".trellis/ca")]
    ca_dir: PathBuf,
    /// Lifetime of workload certificates (rotated at ~80%).
    #[arg(long, default_value = "24h", value_parser = super::parse_duration)]
    cert_ttl: std::time::Duration,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Bootstrap tokens: which identity each workload's token proves (JSON). Without it, no
    /// certificate is issued.
    #[arg(long)]
    tokens: Option<PathBuf>,
}

pub fn run(args: Args) -> ExitCode {
    super::init_logging("info");
    super::block_on(serve(args))
}

async fn serve(args: Args) -> Result<()> {
    let store = ConfigStore::new(args.config.clone(), args.recursive);
    // A config with errors is reported; the control plane still starts and pushes nothing until
    // a good config is on disk, so proxies keep serving what they have.
    let _ = store.reload();
    let _watch = store.watch().context("cannot watch config files")?;
    let ca =
        trellis_identity::ca::CertificateAuthority::load_or_generate(&args.ca_dir, &args.trust_domain, args.cert_ttl)
            .with_context(|| format!("certificate authority in {}", args.ca_dir.display()))?;
    let certificates = std::sync::Arc::new(trellis_control::ca::CertificateService { ca, tokens: args.tokens.clone() });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(address = %args.listen, "control plane serving");
    let shutdown = async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => return,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    trellis_control::serve(store, Some(certificates), listener, shutdown).await?;
    Ok(())
}
