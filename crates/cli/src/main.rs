//! `trellis`: the one binary. Each subcommand lives in `cmd/` and only parses flags and calls
//! into the library crates; no behaviour lives here.
#![forbid(unsafe_code)]

/// mimalloc, not glibc's malloc: telemetry's idle-priority threads free what request threads
/// allocated (spans, log lines, received bodies), and a glibc `free` of another thread's block
/// takes that thread's arena lock: an idle thread preempted while holding it stalls the requests
/// behind it. mimalloc frees across threads without a lock (docs/ARCHITECTURE.md, "Memory").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cmd;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cmd::Cli::parse();
    cmd::run(cli)
}
