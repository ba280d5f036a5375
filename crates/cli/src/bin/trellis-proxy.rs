//! `trellis-proxy`: the data plane alone — `trellis proxy` (same flags, same code) without the
//! control plane, the Kubernetes client, `trellis up` and the analyzer's commands linked in. A
//! sidecar runs next to every pod, so the pages of its executable it maps and relocates are
//! paid per pod; this binary is what `trellis up` starts for sidecars and gateways when it
//! sits next to `trellis`.
#![forbid(unsafe_code)]

/// mimalloc, not glibc's malloc: telemetry's idle-priority threads free what request threads
/// allocated (spans, log lines, received bodies), and a glibc `free` of another thread's block
/// takes that thread's arena lock: an idle thread preempted while holding it stalls the requests
/// behind it. mimalloc frees across threads without a lock (docs/ARCHITECTURE.md, "Memory").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../cmd/common.rs"]
mod common;
#[path = "../cmd/proxy.rs"]
mod proxy;

use clap::Parser;
use common::{init_logging, parse_duration};

#[derive(Parser, Debug)]
#[command(name = "trellis-proxy", version, about = "The Trellis proxy: a sidecar or gateway (`trellis proxy` alone)")]
struct Cli {
    #[command(flatten)]
    args: proxy::Args,
}

fn main() -> std::process::ExitCode {
    proxy::run(Cli::parse().args)
}
