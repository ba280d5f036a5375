//! `trellis`: the one binary. Each subcommand lives in `cmd/` and only parses flags and calls
//! into the library crates; no behaviour lives here.
#![forbid(unsafe_code)]

mod cmd;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cmd::Cli::parse();
    cmd::run(cli)
}
