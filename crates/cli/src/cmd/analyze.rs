//! `trellis analyze PATH...`

use std::path::PathBuf;
use std::process::ExitCode;

use trellis_config::finding;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Files or directories of YAML resources.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Also read subdirectories.
    #[arg(long, short = 'R')]
    recursive: bool,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Human)]
    output: Output,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Output {
    Human,
    Json,
}

pub fn run(args: Args) -> ExitCode {
    let loaded = trellis_config::check(&args.paths, args.recursive);
    let errors = loaded.findings.iter().any(|f| f.is_error());
    match args.output {
        Output::Json => match serde_json::to_string_pretty(&loaded.findings) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: cannot encode findings: {e}");
                return ExitCode::from(2);
            }
        },
        Output::Human => {
            for f in &loaded.findings {
                println!("{f}");
            }
            if loaded.findings.is_empty() {
                println!(
                    "✔ No validation issues found when analyzing {} resources in {} files.",
                    loaded.resources.len(),
                    loaded.files.len()
                );
            } else {
                println!(
                    "{} in {} resources, {} files.",
                    finding::summary(&loaded.findings),
                    loaded.resources.len(),
                    loaded.files.len()
                );
            }
        }
    }
    if errors {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
