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
    };
    super::block_on(async move { trellis_local::up(opts).await.map_err(|e| anyhow::anyhow!(e)) })
}
