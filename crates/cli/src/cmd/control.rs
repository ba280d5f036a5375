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
    trellis_control::serve(store, listener, shutdown).await?;
    Ok(())
}
