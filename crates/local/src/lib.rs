//! `trellis up`: a whole mesh on one machine.
//!
//! Validates the config (refusing to start on errors), plans ports ([`plan`]), claims the
//! mesh's state directory and checks every fixed port before starting anything ([`state`]),
//! then runs, each as a supervised child process ([`supervisor`]): the control plane, one
//! sidecar per workload, the gateways its Gateways select, and the workloads themselves — each
//! app only once its sidecar is ready. On Ctrl-C or SIGTERM, at any moment (start-up included),
//! it stops what runs in the order that loses no request: gateways drain, apps stop, sidecars
//! drain, the control plane goes last; then it removes the state directory's `run/`.
#![forbid(unsafe_code)]

pub mod plan;
pub mod state;
pub mod supervisor;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::plan::Plan;
use crate::state::{ClaimError, MeshDir, UpInfo};
use crate::supervisor::{Child, ChildSpec, Output};

pub struct UpOptions {
    pub paths: Vec<PathBuf>,
    pub recursive: bool,
    pub control_plane: SocketAddr,
    /// The `trellis` executable (children are started from it).
    pub trellis: PathBuf,
    /// First admin port (0: any free ports).
    pub admin_port_base: u16,
    /// Where the mesh's certificate authority lives (kept across runs).
    pub ca_dir: PathBuf,
    /// Lifetime of workload certificates.
    pub cert_ttl: Duration,
    /// The console (served by the control plane); every proxy sends it spans and access logs.
    /// Port 0: a free port of the mesh's block.
    pub console: Option<SocketAddr>,
    /// Span exporters for every proxy.
    pub otlp_endpoint: Option<String>,
    pub zipkin_endpoint: Option<String>,
    /// The mesh's state directory (default: [`state::default_mesh_dir`] of `paths`).
    pub state_dir: Option<PathBuf>,
    /// Stream every child's output to the terminal (else warnings and errors only).
    pub verbose: bool,
}

impl UpOptions {
    /// What every proxy of the demo mesh gets: tracing at 100%, access logs on stdout, and the
    /// exporters asked for.
    fn proxy_telemetry_args(&self) -> Vec<String> {
        let mut args = vec!["--trace-sampling".to_string(), "100".into(), "--access-log".into(), "stdout".into()];
        if let Some(c) = self.console {
            args.extend([
                "--otlp-endpoint".to_string(),
                format!("http://{c}/v1/traces"),
                "--access-log-otlp-endpoint".into(),
                format!("http://{c}/v1/logs"),
            ]);
        }
        if let Some(e) = &self.otlp_endpoint {
            args.extend(["--otlp-endpoint".to_string(), e.clone()]);
        }
        if let Some(e) = &self.zipkin_endpoint {
            args.extend(["--zipkin-endpoint".to_string(), e.clone()]);
        }
        args
    }
}

/// What has been started so far, for stopping it at any moment (also mid-start-up).
#[derive(Default)]
struct Started {
    control: Option<Arc<Child>>,
    sidecars: Vec<Arc<Child>>,
    gateways: Vec<Arc<Child>>,
    apps: Vec<Arc<Child>>,
}

type Shared = Arc<std::sync::Mutex<Started>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Started> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the mesh until Ctrl-C or SIGTERM.
pub async fn up(mut opts: UpOptions) -> Result<(), String> {
    let started = Instant::now();
    // Signals first: from here on, Ctrl-C or SIGTERM at any moment stops whatever has started
    // (tokio keeps a signal that arrives before it is awaited).
    let mut sigint = unix_signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = unix_signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = sigint.recv() => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
        }
    };
    tokio::pin!(shutdown);

    let loaded = trellis_config::check(&opts.paths, opts.recursive);
    let errors: Vec<_> = loaded.findings.iter().filter(|f| f.is_error()).collect();
    for f in loaded.findings.iter().filter(|f| f.severity != trellis_config::Severity::Info) {
        eprintln!("{f}");
    }
    if !errors.is_empty() {
        return Err(format!("config has {} error(s); not starting (see `trellis analyze`)", errors.len()));
    }
    let mut plan =
        Plan::build(&loaded.resources, opts.admin_port_base).map_err(|e| format!("cannot allocate ports: {e}"))?;
    // The console on port 0: one of the mesh's own block.
    if let Some(c) = opts.console.as_mut().filter(|c| c.port() == 0) {
        c.set_port(plan.spare_port().map_err(|e| format!("cannot allocate the console's port: {e}"))?);
    }
    // Optional workloads whose program is not installed are left out, saying so.
    let trellis_dir = opts.trellis.parent().map(PathBuf::from).unwrap_or_default();
    plan.workloads.retain(|w| {
        let installed = w.command(&trellis_dir).is_some_and(|(program, _)| installed(&program));
        if w.spec.optional && !installed {
            let program = w.spec.command.first().cloned().unwrap_or_default();
            eprintln!("trellis up: {program} is not installed: workload {} is optional and left out", w.name);
        }
        installed || !w.spec.optional
    });
    if plan.workloads.is_empty() && plan.gateways.is_empty() {
        return Err("nothing to run: the config declares no Workload and no Gateway".into());
    }

    // Fail fast, before anything starts: one mesh per state directory, every fixed port free.
    let root = opts.state_dir.clone().unwrap_or_else(|| state::default_mesh_dir(&opts.paths));
    let fixed = fixed_ports(&plan, &opts);
    let mut mesh = match MeshDir::claim(&root) {
        Ok(m) => m,
        Err(ClaimError::Busy(info)) => {
            let mut msg = match &info {
                Some(i) => format!(
                    "this mesh is already running: `trellis up` pid {} runs it from {}; to stop it, {}",
                    i.pid,
                    root.display(),
                    i.how_to_stop()
                ),
                None => format!("another `trellis up` holds {}", root.display()),
            };
            for line in port_conflicts(&fixed).iter().filter(|l| l.starts_with("port ")) {
                msg.push_str(&format!("\n  {line}"));
            }
            return Err(msg);
        }
        Err(ClaimError::Io(e)) => return Err(format!("cannot use state directory {}: {e}", root.display())),
    };
    let conflicts = port_conflicts(&fixed);
    if !conflicts.is_empty() {
        mesh.release();
        return Err(format!("cannot start, nothing was started:\n  {}", conflicts.join("\n  ")));
    }
    let info = UpInfo {
        pid: std::process::id(),
        dir: root.clone(),
        paths: opts.paths.iter().map(|p| p.display().to_string()).collect(),
        control_plane: opts.control_plane.to_string(),
        ports: fixed.iter().map(|(a, what)| (a.port(), what.clone())).collect(),
    };
    mesh.write_info(&info).map_err(|e| format!("cannot write {}: {e}", root.join("up.json").display()))?;
    eprintln!(
        "trellis up: state in {}; each process logs to {}/NAME.log (`trellis logs NAME`)",
        root.display(),
        mesh.logs_dir().display()
    );

    let all = Shared::default();
    let result = tokio::select! {
        biased;
        sig = &mut shutdown => Err(Stop::Signal(sig)),
        r = start(&opts, &plan, &loaded.resources, &mesh, &all, started) => r.map_err(Stop::Failed),
    };
    let outcome = match result {
        Ok(()) => {
            let sig = shutdown.await;
            eprintln!("trellis up: {sig}: stopping (gateways drain, then apps, then sidecars)");
            Ok(())
        }
        Err(Stop::Signal(sig)) => {
            eprintln!("trellis up: {sig} during start-up: stopping what has started");
            Err(format!("interrupted by {sig} during start-up"))
        }
        Err(Stop::Failed(e)) => Err(e),
    };
    let t = Instant::now();
    let (gateways, apps, sidecars, control) = {
        let s = lock(&all);
        (s.gateways.clone(), s.apps.clone(), s.sidecars.clone(), s.control.clone())
    };
    stop_all(&gateways, &apps, &sidecars, control.as_ref()).await;
    if outcome.is_ok() {
        eprintln!("trellis up: stopped in {} ms", t.elapsed().as_millis());
    }
    mesh.release();
    outcome
}

enum Stop {
    Signal(&'static str),
    Failed(String),
}

fn unix_signal(kind: tokio::signal::unix::SignalKind) -> Result<tokio::signal::unix::Signal, String> {
    tokio::signal::unix::signal(kind).map_err(|e| format!("cannot handle signals: {e}"))
}

/// `$(VAR)` in a command argument replaced by the workload's environment, as Kubernetes expands
/// a container's `command` and `args`; `$$(VAR)` stays literal `$(VAR)`, unknown names stay.
fn expand(arg: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(i) = rest.find("$(") {
        if rest[..i].ends_with('$') {
            out.push_str(&rest[..i - 1]);
            out.push_str("$(");
            rest = &rest[i + 2..];
            continue;
        }
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        match after.find(')') {
            Some(j) => {
                let name = &after[..j];
                match env.iter().rev().find(|(k, _)| k == name) {
                    Some((_, v)) => out.push_str(v),
                    None => out.push_str(&rest[i..i + 2 + j + 1]),
                }
                rest = &after[j + 1..];
            }
            None => {
                out.push_str(&rest[i..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Whether `program` can be run: a path that exists, or a name found on `$PATH`.
fn installed(program: &std::path::Path) -> bool {
    if program.components().count() > 1 {
        return program.is_file();
    }
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
}

/// What runs a proxy: `trellis-proxy` beside `trellis` (the data plane alone: fewer pages of
/// executable mapped and relocated per process), else `trellis proxy`.
fn proxy_program(trellis: &std::path::Path) -> (PathBuf, Vec<String>) {
    let alone = trellis.with_file_name("trellis-proxy");
    if alone.is_file() {
        (alone, Vec::new())
    } else {
        (trellis.to_path_buf(), vec!["proxy".to_string()])
    }
}

/// What `up.json` calls the console's port (`trellis dashboard` looks for it).
pub const CONSOLE_PORT: &str = "console, --console";

/// Ports the mesh needs exactly (the rest are picked free): the control plane's, the gateways'
/// server ports, and workloads' declared `appPort`s.
fn fixed_ports(plan: &Plan, opts: &UpOptions) -> Vec<(SocketAddr, String)> {
    let mut out = vec![(opts.control_plane, "control plane, --control-plane".to_string())];
    if let Some(c) = opts.console {
        out.push((c, CONSOLE_PORT.to_string()));
    }
    for g in &plan.gateways {
        for p in &g.ports {
            out.push((SocketAddr::from(([127, 0, 0, 1], *p)), format!("gateway {}", g.name)));
        }
    }
    for w in &plan.workloads {
        if w.spec.app_port.is_some() {
            out.push((w.app, format!("workload {}, appPort", w.name)));
        }
    }
    out
}

/// What is wrong with the fixed ports: one line per port taken, naming who holds it, then how
/// to stop each mesh that holds one. Empty when every port is free.
fn port_conflicts(fixed: &[(SocketAddr, String)]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut meshes = std::collections::BTreeSet::new();
    for (addr, what) in fixed.iter().filter(|(addr, _)| !state::port_free(*addr)) {
        let owner = match state::port_owner(addr.port()) {
            Some(o) => {
                if let Some((pid, _)) = &o.mesh {
                    meshes.insert(*pid);
                }
                format!(" by {o}")
            }
            None => String::new(),
        };
        lines.push(format!("port {} ({what}) is in use{owner}", addr.port()));
    }
    for pid in meshes {
        lines.push(format!(
            "to stop the mesh of `trellis up` pid {pid}: press Ctrl-C in its terminal, or run `kill -INT {pid}`"
        ));
    }
    lines
}

/// Starts the control plane, sidecars, gateways, then each app once its sidecar is ready, and
/// waits until everything is ready; each child is recorded in `all` as soon as it starts.
async fn start(
    opts: &UpOptions,
    plan: &Plan,
    resources: &[trellis_config::Resource],
    mesh: &MeshDir,
    all: &Shared,
    started: Instant,
) -> Result<(), String> {
    // The control plane reads the user's config plus where each local workload listens.
    let run = mesh.run_dir();
    let entries = run.join("workloads.yaml");
    std::fs::write(&entries, plan.workload_entries(resources))
        .map_err(|e| format!("cannot write {}: {e}", entries.display()))?;

    let trellis_dir = opts.trellis.parent().map(PathBuf::from).unwrap_or_default();
    let names =
        plan.workloads.iter().map(|w| w.name.len() + 6).chain(plan.gateways.iter().map(|g| g.name.len())).chain([13]);
    let out = Output {
        width: names.max().unwrap_or(12),
        color: std::io::IsTerminal::is_terminal(&std::io::stdout()),
        verbose: opts.verbose,
        logs: Some(mesh.logs_dir()),
        launcher: Some(opts.trellis.clone()),
    };
    let mut color = 0;
    let mut next_color = || {
        color += 1;
        color
    };
    let mesh_env = vec![
        (state::MESH_DIR_ENV.to_string(), mesh.root.display().to_string()),
        (state::UP_PID_ENV.to_string(), std::process::id().to_string()),
    ];
    let mut proxy_env = mesh_env.clone();
    proxy_env.push(("RUST_LOG".to_string(), std::env::var("TRELLIS_PROXY_LOG").unwrap_or_else(|_| "warn".into())));
    // One bootstrap token per proxy: the control plane signs a certificate only for the identity
    // its token names (the sidecar gets its token in its environment, never on a command line).
    let mut tokens = std::collections::BTreeMap::new();
    let mut token_for = |namespace: &str, service_account: &str| {
        let t = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        tokens.insert(t.clone(), serde_json::json!({"namespace": namespace, "serviceAccount": service_account}));
        t
    };
    let sidecar_tokens: Vec<String> =
        plan.workloads.iter().map(|w| token_for(&w.namespace, &w.service_account())).collect();
    let gateway_tokens: Vec<String> =
        plan.gateways.iter().map(|g| token_for(crate::plan::GATEWAY_NAMESPACE, &g.name)).collect();
    let tokens_file = run.join("tokens.json");
    write_private(&tokens_file, &serde_json::json!({ "tokens": tokens }).to_string())
        .map_err(|e| format!("cannot write {}: {e}", tokens_file.display()))?;

    let mut cp_args = vec![
        "control".to_string(),
        "--listen".into(),
        opts.control_plane.to_string(),
        "--ca-dir".into(),
        opts.ca_dir.display().to_string(),
        "--cert-ttl".into(),
        format!("{}s", opts.cert_ttl.as_secs()),
        "--tokens".into(),
        tokens_file.display().to_string(),
        "--overlay".into(),
        mesh.applied_dir().display().to_string(),
    ];
    if let Some(c) = opts.console {
        cp_args.extend(["--console".to_string(), c.to_string()]);
    }
    if opts.recursive {
        cp_args.push("-R".into());
    }
    for p in opts.paths.iter().chain([&entries]) {
        cp_args.push("-c".into());
        cp_args.push(p.display().to_string());
    }
    let mut cp_env = mesh_env.clone();
    cp_env.push(("RUST_LOG".into(), "info".into()));
    let control = Child::start(
        ChildSpec {
            name: "control-plane".into(),
            program: opts.trellis.clone(),
            args: cp_args,
            env: cp_env,
            cwd: None,
            restart_delay: Duration::from_millis(100),
        },
        out.clone(),
        0,
    )
    .map_err(|e| e.to_string())?;
    lock(all).control = Some(control);

    let (proxy_program, proxy_args) = proxy_program(&opts.trellis);
    for (w, token) in plan.workloads.iter().zip(&sidecar_tokens) {
        let mut env = proxy_env.clone();
        env.push(("TRELLIS_BOOTSTRAP_TOKEN".into(), token.clone()));
        let spec = ChildSpec {
            name: format!("{}-proxy", w.name),
            program: proxy_program.clone(),
            args: [proxy_args.clone(), w.sidecar_args(opts.control_plane), opts.proxy_telemetry_args()].concat(),
            env,
            cwd: None,
            restart_delay: Duration::from_millis(100),
        };
        let c = Child::start(spec, out.clone(), next_color()).map_err(|e| e.to_string())?;
        lock(all).sidecars.push(c);
    }
    for (g, token) in plan.gateways.iter().zip(&gateway_tokens) {
        let mut env = proxy_env.clone();
        env.push(("TRELLIS_BOOTSTRAP_TOKEN".into(), token.clone()));
        let spec = ChildSpec {
            name: g.name.clone(),
            program: proxy_program.clone(),
            args: [proxy_args.clone(), g.args(opts.control_plane), opts.proxy_telemetry_args()].concat(),
            env,
            cwd: None,
            restart_delay: Duration::from_millis(100),
        };
        let c = Child::start(spec, out.clone(), next_color()).map_err(|e| e.to_string())?;
        lock(all).gateways.push(c);
    }

    // Hold each app until its sidecar is ready (Istio's holdApplicationUntilProxyStarts).
    let waits = plan
        .workloads
        .iter()
        .map(|w| wait_http(w.admin, "/ready", Duration::from_secs(30), format!("sidecar of {}", w.name)));
    futures_join(waits).await?;
    for w in &plan.workloads {
        let (program, args) = w.command(&trellis_dir).ok_or_else(|| format!("workload {} has no command", w.name))?;
        let mut env = w.env();
        env.extend(mesh_env.iter().cloned());
        // The app's own spans and logs (OpenTelemetry SDKs read these variables; the console
        // takes OTLP over HTTP, as protobuf or JSON, and over gRPC, which reads only the
        // address) go to the console too, unless the workload names its own.
        if let Some(c) = opts.console {
            for (var, path) in [(OTEL_TRACES_ENDPOINT, "traces"), (OTEL_LOGS_ENDPOINT, "logs")] {
                if !env.iter().any(|(k, _)| k == var) {
                    env.push((var.into(), format!("http://{c}/v1/{path}")));
                }
            }
        }
        let args = args.iter().map(|a| expand(a, &env)).collect();
        let spec = ChildSpec {
            name: w.name.clone(),
            program,
            args,
            env,
            cwd: Some(w.working_dir()),
            restart_delay: Duration::from_secs(1),
        };
        let c = Child::start(spec, out.clone(), next_color()).map_err(|e| e.to_string())?;
        lock(all).apps.push(c);
    }
    let app_waits = plan.workloads.iter().map(|w| {
        let probe = w.spec.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).map(|g| g.path.clone());
        let what = format!("workload {}", w.name);
        async move {
            match probe {
                Some(path) => wait_http(w.app, &path, Duration::from_secs(30), what).await,
                None => wait_tcp(w.app, Duration::from_secs(30), what).await,
            }
        }
    });
    futures_join(app_waits).await?;
    let gw_waits = plan
        .gateways
        .iter()
        .map(|g| wait_http(g.admin, "/ready", Duration::from_secs(30), format!("gateway {}", g.name)));
    futures_join(gw_waits).await?;
    print_table(plan, opts.control_plane, opts.console, started.elapsed(), &mesh.logs_dir());
    Ok(())
}

/// Where OpenTelemetry SDKs send spans over OTLP/HTTP.
const OTEL_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const OTEL_LOGS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT";

/// Stops everything within ~5 s, in the order that completes in-flight requests: gateways
/// drain (no new requests enter), apps stop (finishing what they serve, calling out through
/// their sidecars), then sidecars drain, then the control plane.
async fn stop_all(gateways: &[Arc<Child>], apps: &[Arc<Child>], sidecars: &[Arc<Child>], control: Option<&Arc<Child>>) {
    for g in gateways {
        g.signal(Signal::SIGTERM);
    }
    join_all(gateways.iter().map(|g| g.wait_or_kill(Duration::from_millis(2000)))).await;
    for a in apps {
        a.signal(Signal::SIGTERM);
    }
    join_all(apps.iter().map(|a| a.wait_or_kill(Duration::from_millis(1500)))).await;
    for s in sidecars {
        s.signal(Signal::SIGTERM);
    }
    join_all(sidecars.iter().map(|s| s.wait_or_kill(Duration::from_millis(800)))).await;
    if let Some(control) = control {
        control.signal(Signal::SIGTERM);
        control.wait_or_kill(Duration::from_millis(300)).await;
    }
}

async fn join_all<F: std::future::Future<Output = ()>>(futs: impl Iterator<Item = F>) {
    let handles: Vec<_> = futs.collect();
    for f in handles {
        f.await;
    }
}

/// Awaits every future concurrently; the first error wins.
async fn futures_join<F>(futs: impl Iterator<Item = F>) -> Result<(), String>
where
    F: std::future::Future<Output = Result<(), String>>,
{
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let results = futures_util::future::join_all(set).await;
    results.into_iter().collect()
}

/// Waits until `GET path` on `addr` answers 2xx.
async fn wait_http(addr: SocketAddr, path: &str, within: Duration, what: String) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(code) = http_status(addr, path).await {
            if (200..300).contains(&code) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{what} was not ready after {} s ({addr}{path})", within.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_tcp(addr: SocketAddr, within: Duration, what: String) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            return Err(format!("{what} did not listen on {addr} within {} s", within.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A minimal HTTP/1.0 GET for readiness checks: the status code.
async fn http_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut s = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await??;
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| std::io::Error::other("bad status line"))
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())
}

fn print_table(plan: &Plan, cp: SocketAddr, console: Option<SocketAddr>, took: Duration, logs: &std::path::Path) {
    let mut rows = vec![vec![
        "WORKLOAD".to_string(),
        "SERVICES".into(),
        "VERSION".into(),
        "APP".into(),
        "SIDECAR".into(),
        "ADMIN".into(),
    ]];
    for w in &plan.workloads {
        rows.push(vec![
            format!("{}.{}", w.name, w.namespace),
            w.services.join(","),
            w.version(),
            w.app.to_string(),
            w.inbound.to_string(),
            format!("http://{}", w.admin),
        ]);
    }
    let mut out = String::new();
    push_table(&mut out, &rows);
    if !plan.gateways.is_empty() {
        out.push('\n');
        let mut rows = vec![vec!["GATEWAY".to_string(), "URLS".into(), "ADMIN".into()]];
        for g in &plan.gateways {
            let urls = g.schemes.iter().map(|(p, s)| format!("{s}://127.0.0.1:{p}")).collect::<Vec<_>>().join(" ");
            rows.push(vec![g.name.clone(), urls, format!("http://{}", g.admin)]);
        }
        push_table(&mut out, &rows);
    }
    out.push_str(&format!("\ncontrol plane {cp} (`trellis status`, `trellis proxy-config WORKLOAD`)\n"));
    if let Some(c) = console {
        out.push_str(&format!("console http://{c}/ (`trellis dashboard`): graph, traces, metrics, config\n"));
    }
    out.push_str(&format!("logs in {} (`trellis logs NAME -f`)\n", logs.display()));
    out.push_str(&format!("mesh ready in {} ms; Ctrl-C stops it\n", took.as_millis()));
    println!("\n{out}");
}

fn push_table(out: &mut String, rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r.get(c).map(|s| s.chars().count()).unwrap_or(0)).max().unwrap_or(0))
        .collect();
    for r in rows {
        let cells: Vec<String> = r.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn arguments_expand_the_environment_as_kubernetes_does() {
        let env = vec![("PORT".to_string(), "6380".to_string())];
        assert_eq!(expand("--port=$(PORT)", &env), "--port=6380");
        assert_eq!(expand("$(PORT)$(PORT)", &env), "63806380");
        assert_eq!(expand("$$(PORT)", &env), "$(PORT)");
        assert_eq!(expand("$(NOPE) $(", &env), "$(NOPE) $(");
    }
}
