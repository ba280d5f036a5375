//! `trellis analyze PATH...`

use std::path::PathBuf;
use std::process::ExitCode;

use trellis_config::finding;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Files or directories of YAML resources.
    #[arg(required_unless_present = "cluster")]
    paths: Vec<PathBuf>,
    /// Analyze what is in the Kubernetes cluster (of `KUBECONFIG` or `~/.kube/config`), with
    /// any files given.
    #[arg(long)]
    cluster: bool,
    /// Also read subdirectories.
    #[arg(long, short = 'R')]
    recursive: bool,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// Exit 1 when a finding is at this level or above (as istioctl analyze).
    #[arg(long, value_enum, default_value_t = Level::Error, ignore_case = true)]
    failure_threshold: Level,
    /// Print only findings at this level or above (as istioctl analyze).
    #[arg(long, value_enum, default_value_t = Level::Info, ignore_case = true)]
    output_threshold: Level,
}

/// A finding level, lowest first.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Info,
    Warning,
    Error,
}

impl Level {
    fn of(s: trellis_config::Severity) -> Level {
        match s {
            trellis_config::Severity::Info => Level::Info,
            trellis_config::Severity::Warning => Level::Warning,
            trellis_config::Severity::Error => Level::Error,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Output {
    Human,
    Json,
}

pub fn run(args: Args) -> ExitCode {
    let mut loaded = if args.cluster {
        match cluster(&args) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(2);
            }
        }
    } else {
        trellis_config::check(&args.paths, args.recursive)
    };
    let failing = loaded.findings.iter().any(|f| Level::of(f.severity) >= args.failure_threshold);
    loaded.findings.retain(|f| Level::of(f.severity) >= args.output_threshold);
    match args.output {
        Output::Json => match serde_json::to_string_pretty(&loaded.findings) {
            Ok(s) => outln!("{s}"),
            Err(e) => {
                eprintln!("error: cannot encode findings: {e}");
                return ExitCode::from(2);
            }
        },
        Output::Human => {
            for f in &loaded.findings {
                outln!("{f}");
            }
            if loaded.findings.is_empty() {
                outln!(
                    "✔ No validation issues found when analyzing {} resources in {} files.",
                    loaded.resources.len(),
                    loaded.files.len()
                );
            } else {
                outln!(
                    "{} in {} resources, {} files.",
                    finding::summary(&loaded.findings),
                    loaded.resources.len(),
                    loaded.files.len()
                );
            }
        }
    }
    if failing {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The cluster's resources (and any files), analyzed together.
fn cluster(args: &Args) -> anyhow::Result<trellis_config::Loaded> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (resources, findings) = rt.block_on(async {
        let client = trellis_kube::client().await?;
        trellis_kube::source::list_once(client).await
    })?;
    let mut loaded = if args.paths.is_empty() {
        trellis_config::Loaded::default()
    } else {
        trellis_config::load_paths(&args.paths, args.recursive)
    };
    loaded.findings.extend(findings);
    loaded.resources.extend(resources);
    let more = trellis_config::analyze::analyze(&loaded.resources, &[]);
    loaded.findings.extend(more);
    finding::sort(&mut loaded.findings);
    Ok(loaded)
}
