//! `trellis up PATH...`, and the commands that act on a mesh it runs: `trellis logs`,
//! `trellis apply`, and the internal `trellis exec-supervised` it starts children through.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use trellis_local::state;

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
    /// Where the console listens (graph, traces, metrics, config; `trellis dashboard`).
    /// Default: 127.0.0.1:15014 with the default control plane, else a free port.
    #[arg(long)]
    console: Option<SocketAddr>,
    /// Run without the console (proxies then export spans and access logs only where told).
    #[arg(long, conflicts_with = "console")]
    no_console: bool,
    /// Export every proxy's spans over OTLP/HTTP, e.g. http://127.0.0.1:4318/v1/traces.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Export every proxy's spans as Zipkin v2 JSON, e.g. http://127.0.0.1:9411/api/v2/spans.
    #[arg(long)]
    zipkin_endpoint: Option<String>,
    /// The mesh's state directory: its lock, tokens, applied changes and logs.
    /// Default: $XDG_STATE_HOME/trellis/meshes/<config dir>-<hash>.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Stream every process's output (access logs included) to the terminal; by default only
    /// warnings and errors are shown, and each process's full log is in <state dir>/logs.
    #[arg(long, short)]
    verbose: bool,
}

/// The console's port beside the default control plane's (15010).
const DEFAULT_CONSOLE_PORT: u16 = 15014;

fn default_ca_dir() -> PathBuf {
    state::state_base().join("ca")
}

pub fn run(args: Args) -> ExitCode {
    let trellis = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot find the trellis executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let console = match (args.no_console, args.console) {
        (true, _) => None,
        (false, Some(c)) => Some(c),
        (false, None) if args.control_plane == trellis_control::default_addr() => {
            Some(SocketAddr::from(([127, 0, 0, 1], DEFAULT_CONSOLE_PORT)))
        }
        // A free port of the mesh's own block, chosen with the others.
        (false, None) => Some(SocketAddr::from(([127, 0, 0, 1], 0))),
    };
    let opts = trellis_local::UpOptions {
        console,
        paths: args.paths,
        recursive: args.recursive,
        control_plane: args.control_plane,
        trellis,
        admin_port_base: args.admin_port_base,
        ca_dir: args.ca_dir.unwrap_or_else(default_ca_dir),
        cert_ttl: args.cert_ttl,
        otlp_endpoint: args.otlp_endpoint,
        zipkin_endpoint: args.zipkin_endpoint,
        state_dir: args.state_dir,
        verbose: args.verbose,
    };
    super::block_on(async move { trellis_local::up(opts).await.map_err(|e| anyhow::anyhow!(e)) })
}

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// The process: a workload (`service-a`), its sidecar (`service-a-proxy`), a gateway, or
    /// `control-plane`. Without it, lists the log files.
    name: Option<String>,
    /// Keep printing what is appended (as `tail -f`), until interrupted.
    #[arg(long, short)]
    follow: bool,
    /// Print only the last N lines first.
    #[arg(long)]
    tail: Option<usize>,
    /// The mesh: its state directory or its config directory. Default: the one running
    /// mesh, else the most recently run one.
    #[arg(long)]
    mesh: Option<PathBuf>,
}

/// `trellis logs NAME [-f]`.
pub fn logs(args: LogsArgs) -> ExitCode {
    let (dir, _) = match state::pick_mesh(args.mesh.as_deref(), true) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let logs = dir.join("logs");
    let mut names: Vec<String> = std::fs::read_dir(&logs)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log").map(String::from))
        .collect();
    names.sort();
    let Some(name) = args.name else {
        outln!("logs of {}:", dir.display());
        for n in &names {
            outln!("  {n}");
        }
        return ExitCode::SUCCESS;
    };
    let file = logs.join(format!("{name}.log"));
    if !file.is_file() {
        eprintln!("error: no log named {name} in {} (there are: {})", logs.display(), names.join(", "));
        return ExitCode::FAILURE;
    }
    match print_log(&file, args.tail, args.follow) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}: {e}", file.display());
            ExitCode::FAILURE
        }
    }
}

fn print_log(file: &Path, tail: Option<usize>, follow: bool) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let text = std::fs::read(file)?;
    let start = match tail {
        Some(n) => {
            // The offset after the (n+1)-th newline from the end (the last line may lack one).
            let body = text.strip_suffix(b"\n").unwrap_or(&text);
            body.iter()
                .enumerate()
                .rev()
                .filter(|(_, b)| **b == b'\n')
                .nth(n.saturating_sub(1))
                .map_or(0, |(i, _)| i + 1)
        }
        None => 0,
    };
    if tail != Some(0) {
        out!("{}", String::from_utf8_lossy(&text[start..]));
    }
    if !follow {
        return Ok(());
    }
    let mut pos = text.len() as u64;
    let mut f = std::fs::File::open(file)?;
    loop {
        let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        if len < pos {
            // Rotated or truncated by a new run: start again from the top of the new file.
            f = std::fs::File::open(file)?;
            pos = 0;
        }
        if len > pos {
            f.seek(SeekFrom::Start(pos))?;
            let mut buf = Vec::new();
            f.by_ref().take(len - pos).read_to_end(&mut buf)?;
            pos += buf.len() as u64;
            out!("{}", String::from_utf8_lossy(&buf));
        }
        // Polling keeps `-f` independent of inotify limits; a quarter second is what a
        // person reading a log notices least.
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

#[derive(clap::Args, Debug)]
pub struct ApplyArgs {
    /// Files to apply: their resources replace those with the same kind, namespace and name
    /// in the running mesh (or are added), as `kubectl apply -f` does.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// The mesh: its state directory or its config directory. Default: the one running mesh.
    #[arg(long)]
    mesh: Option<PathBuf>,
}

/// The running mesh (`--mesh`, else the one running) and what `up.json` says of it; `None`
/// when there is none, having said why.
fn running_mesh(mesh: Option<&Path>) -> Option<(PathBuf, state::UpInfo)> {
    match state::pick_mesh(mesh, false) {
        Ok((d, Some(i))) => Some((d, i)),
        Ok((d, None)) => {
            eprintln!("error: the mesh of {} is not running (start it with `trellis up`)", d.display());
            None
        }
        Err(e) => {
            eprintln!("error: {e}");
            None
        }
    }
}

/// `trellis apply -f FILE`: checks the mesh's config with the file applied (refusing on
/// errors, with file:line), then hands it to the running mesh's control plane and waits until
/// the control plane serves the new config. Nothing in the config directory is edited; the
/// change lasts until the mesh stops (apply the original file to undo it).
pub fn apply(args: ApplyArgs) -> ExitCode {
    let Some((dir, info)) = running_mesh(args.mesh.as_deref()) else { return ExitCode::FAILURE };
    let applied = state::applied_dir(&dir);
    let mut layers = trellis_config::load::list_files(std::slice::from_ref(&applied), false).unwrap_or_default();
    layers.extend(args.files.iter().cloned());
    let paths: Vec<PathBuf> = info.paths.iter().map(PathBuf::from).chain([dir.join("run/workloads.yaml")]).collect();
    let mut loaded = trellis_config::load::load_layered(&paths, false, &layers);
    loaded.findings.extend(trellis_config::analyze::analyze(&loaded.resources, &[]));
    trellis_config::finding::sort(&mut loaded.findings);
    let mine = |f: &&trellis_config::Finding| f.file.as_deref().is_some_and(|p| args.files.iter().any(|a| a == p));
    for f in loaded.findings.iter().filter(|f| f.severity != trellis_config::Severity::Info).filter(mine) {
        eprintln!("{f}");
    }
    let errors = loaded.findings.iter().filter(|f| f.is_error()).count();
    if errors > 0 {
        for f in loaded.findings.iter().filter(|f| f.is_error() && !mine(f)) {
            eprintln!("{f}");
        }
        eprintln!("error: the mesh's config with these files applied has {errors} error(s); nothing applied");
        return ExitCode::FAILURE;
    }
    super::block_on(async move {
        let before = super::status::fetch_status(&info.control_plane).await?;
        let seq = std::fs::read_dir(&applied).map(|d| d.count()).unwrap_or(0);
        for (i, f) in args.files.iter().enumerate() {
            let text = std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            let base = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "applied.yaml".into());
            let name = format!("{:04}-{base}", seq + i);
            // Written hidden, then renamed: the control plane never reads half a file.
            let tmp = applied.join(format!(".{name}"));
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, applied.join(&name))?;
        }
        for r in loaded.resources.iter().filter(|r| args.files.iter().any(|a| a == &*r.source.file)) {
            outln!("{} {}/{} applied", r.kind, r.namespace(), r.meta.name);
        }
        // Applied means served: wait until the control plane has a new generation and every
        // connected proxy has answered the push compiled from it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let now = super::status::fetch_status(&info.control_plane).await?;
            if !now.config_error.is_empty() && now.config_error != before.config_error {
                anyhow::bail!("the control plane rejected it: {} (see `trellis status`)", now.config_error);
            }
            let generation = now.config_generation;
            let connected: Vec<_> = now.proxies.iter().filter(|p| p.state == "CONNECTED").collect();
            let answered = |p: &&trellis_api::control::ProxyStatus| {
                p.config_generation >= generation
                    && (p.acked_version == p.sent_version || p.nacked_version == p.sent_version)
            };
            if generation > before.config_generation && connected.iter().all(answered) {
                let nacks: Vec<String> = connected
                    .iter()
                    .filter(|p| p.nacked_version == p.sent_version)
                    .map(|p| match p.nack_source.as_str() {
                        "" => format!("{}: {}", p.proxy_id, p.nack_reason),
                        source => format!("{}: {} (from {source})", p.proxy_id, p.nack_reason),
                    })
                    .collect();
                if !nacks.is_empty() {
                    anyhow::bail!("config generation {generation} was rejected by:\n  {}", nacks.join("\n  "));
                }
                outln!("config generation {generation} is served by all {} connected proxies", connected.len());
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!(
                    "config generation {generation} not yet served by every proxy after 10 s (see `trellis status`)"
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
}

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// The supervisor's pid: if it is already gone, do not start.
    #[arg(long)]
    parent: i32,
    /// The program and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<std::ffi::OsString>,
}

/// `trellis exec-supervised --parent PID -- PROGRAM ARGS...`: asks the kernel to kill this
/// process when its parent dies (`PR_SET_PDEATHSIG`, kept across `exec`), then becomes
/// PROGRAM. How `trellis up` makes sure no child outlives it, even when it is SIGKILLed.
pub fn exec_supervised(args: ExecArgs) -> ExitCode {
    use std::os::unix::process::CommandExt;
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        eprintln!("error: cannot set the parent-death signal: {e}");
        return ExitCode::FAILURE;
    }
    // The parent may have died before the line above: then nobody would kill us later.
    if nix::unistd::getppid().as_raw() != args.parent {
        return ExitCode::FAILURE;
    }
    let (program, rest) = args.command.split_first().expect("clap requires a command");
    let e = std::process::Command::new(program).args(rest).exec();
    eprintln!("error: cannot start {}: {e}", Path::new(program).display());
    ExitCode::from(127)
}

#[derive(clap::Args, Debug)]
pub struct DashboardArgs {
    /// The mesh: its config directory or state directory (default: the one running, if one is).
    #[arg(long, conflicts_with = "kubernetes")]
    mesh: Option<PathBuf>,
    /// Open it in the desktop's browser (xdg-open) as well as printing its address.
    #[arg(long)]
    open: bool,
    /// The console of the control plane in a Kubernetes cluster (the Helm chart's), served here
    /// through the API server's Service proxy with the kubeconfig's credentials (they need `get`
    /// on `services/proxy` in its namespace), until interrupted.
    #[arg(long, short = 'k')]
    kubernetes: bool,
    /// With --kubernetes: the kubeconfig context (default: the current one).
    #[arg(long, requires = "kubernetes")]
    context: Option<String>,
    /// With --kubernetes: the control plane's namespace.
    #[arg(long, short = 'n', default_value = "trellis-system")]
    namespace: String,
    /// With --kubernetes: the control plane's Service.
    #[arg(long, default_value = "trellis-control")]
    service: String,
    /// With --kubernetes: the console's port on that Service (the chart's `console.port`).
    #[arg(long, default_value_t = 15014)]
    service_port: u16,
    /// With --kubernetes: the address to serve it on here.
    #[arg(long, default_value = "127.0.0.1")]
    address: std::net::IpAddr,
    /// With --kubernetes: the port to serve it on here (0: any free port).
    #[arg(long, short = 'p', default_value_t = 15014)]
    port: u16,
}

/// `trellis dashboard`: the address of the console of the mesh `trellis up` runs, or, with
/// `--kubernetes`, the console of a cluster's control plane served here until interrupted.
pub fn dashboard(args: DashboardArgs) -> ExitCode {
    if args.kubernetes {
        return super::block_on(kubernetes_dashboard(args));
    }
    let Some((_, info)) = running_mesh(args.mesh.as_deref()) else { return ExitCode::FAILURE };
    let Some((port, _)) = info.ports.iter().find(|(_, what)| what == trellis_local::CONSOLE_PORT) else {
        eprintln!("error: the mesh in {} runs without the console (started with --no-console)", info.dir.display());
        return ExitCode::FAILURE;
    };
    let url = format!("http://127.0.0.1:{port}/");
    outln!("{url}");
    if args.open && !open_browser(&url) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn open_browser(url: &str) -> bool {
    match std::process::Command::new("xdg-open").arg(url).status() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("error: cannot open a browser (xdg-open: {e}); open {url} yourself");
            false
        }
    }
}

/// `trellis dashboard --kubernetes`: checks that the console answers through the API server
/// (naming what is missing when it does not), prints the local address, and serves it.
async fn kubernetes_dashboard(args: DashboardArgs) -> anyhow::Result<()> {
    use trellis_kube::dashboard::{bind, Console};
    let client = trellis_kube::proxy_client(args.context.as_deref()).await?;
    let console = Console { namespace: args.namespace, service: args.service, port: args.service_port };
    console.check(&client).await.map_err(anyhow::Error::msg)?;
    let listener = bind(SocketAddr::new(args.address, args.port)).await.map_err(anyhow::Error::msg)?;
    let here = listener.local_addr()?;
    let url = match here.ip() {
        ip if ip.is_unspecified() => format!("http://127.0.0.1:{}/", here.port()),
        _ => format!("http://{here}/"),
    };
    outln!("{url}");
    eprintln!(
        "the console of Service {}/{}, through the Kubernetes API server; Ctrl-C stops",
        console.namespace, console.service
    );
    if args.open {
        open_browser(&url);
    }
    tokio::select! {
        r = console.serve(client, listener) => r?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
