//! `bench console`: the console's stores against their bounds, and its cost to requests.
//!
//! `trellis up examples/slow-fast` (release binaries) takes `/fast` at a fixed rate through its
//! gateway for the run's length (5 minutes at 1000 requests per second in the full run), every
//! proxy tracing at 100% and sending its spans and access-log lines to the console, which reads
//! every proxy's metrics every 2 s. Every 30 s the harness reads the stores' sizes
//! (`/api/status`) and the control plane's resident memory. Then the same mesh runs without the
//! console (`--no-console`) for one more window at the same rate: the latency of the console's
//! last window beside it is what the console costs requests.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::load::{self, OpenLoop, Target};
use crate::peers::{free_port, http_get, local, rss_kib};

#[derive(Debug, serde::Serialize)]
pub struct Sample {
    pub at_s: f64,
    /// `(store, bytes, limit, items, evicted)`.
    pub stores: Vec<(String, u64, u64, u64, u64)>,
    pub control_plane_rss_mib: f64,
    pub window: OpenLoop,
}

#[derive(Debug, serde::Serialize)]
pub struct ConsoleRun {
    pub rate: u32,
    pub samples: Vec<Sample>,
    /// The same rate and window length, the mesh without the console.
    pub without_console: OpenLoop,
    pub without_console_rss_mib: f64,
}

struct Mesh {
    child: Child,
    _state: tempfile::TempDir,
    _config: tempfile::TempDir,
    gateway: u16,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
    }
}

/// `trellis up` of a copy of `examples/slow-fast` with its gateway on a free port.
fn up(trellis: &Path, console: Option<SocketAddr>) -> anyhow::Result<Mesh> {
    let config = tempfile::tempdir()?;
    let gateway = free_port();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/slow-fast");
    for e in std::fs::read_dir(&src)? {
        let e = e?;
        let text = std::fs::read_to_string(e.path())?;
        std::fs::write(config.path().join(e.file_name()), text.replace("number: 8080", &format!("number: {gateway}")))?;
    }
    let state = tempfile::tempdir()?;
    let cp = local(free_port());
    let mut cmd = Command::new(trellis);
    cmd.arg("up").arg(config.path()).args(["--control-plane", &cp.to_string(), "--admin-port-base", "0"]);
    match console {
        Some(c) => cmd.args(["--console", &c.to_string()]),
        None => cmd.arg("--no-console"),
    };
    let mut child = cmd.env("XDG_STATE_HOME", state.path()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let out = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if l.contains("mesh ready") {
                let _ = tx.send(());
            }
        }
    });
    let mesh = Mesh { child, _state: state, _config: config, gateway };
    rx.recv_timeout(Duration::from_secs(60)).map_err(|_| anyhow::anyhow!("trellis up: no `mesh ready` in 60 s"))?;
    Ok(mesh)
}

/// The control plane's pid: the child of `trellis up` running `control`.
fn control_plane_pid(up: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{up}/task/{up}/children")).ok()?;
    children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()).find(|p| {
        std::fs::read_to_string(format!("/proc/{p}/cmdline"))
            .map(|c| c.split('\0').any(|a| a == "control"))
            .unwrap_or(false)
    })
}

fn stores(console: SocketAddr) -> Vec<(String, u64, u64, u64, u64)> {
    let Some(body) = http_get(console, "/api/status") else { return Vec::new() };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["stores"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let n = |k: &str| s[k].as_u64().unwrap_or(0);
            (s["name"].as_str().unwrap_or("").to_string(), n("bytes"), n("limit_bytes"), n("items"), n("evicted"))
        })
        .collect()
}

pub async fn run(trellis: &Path, rate: u32, total: Duration, window: Duration) -> anyhow::Result<ConsoleRun> {
    let console = local(free_port());
    let mesh = up(trellis, Some(console))?;
    let target = Target::Http1(format!("http://127.0.0.1:{}/fast", mesh.gateway));
    let cp = control_plane_pid(mesh.child.id());
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < total {
        let w = load::open_loop(&target, rate, Duration::ZERO, window).await?;
        let s = Sample {
            at_s: started.elapsed().as_secs_f64(),
            stores: stores(console),
            control_plane_rss_mib: cp.map(|p| rss_kib(&[p]) as f64 / 1024.0).unwrap_or(0.0),
            window: w,
        };
        eprintln!(
            "console: {:>5.0} s  p50 {:.3} ms p99 {:.3} ms  errors {}  control plane {:.1} MiB  {}",
            s.at_s,
            s.window.p50_us as f64 / 1000.0,
            s.window.p99_us as f64 / 1000.0,
            s.window.errors,
            s.control_plane_rss_mib,
            s.stores
                .iter()
                .map(|(n, b, l, _, e)| format!(
                    "{n} {:.1}/{:.0} MiB ({e} evicted)",
                    *b as f64 / 1048576.0,
                    *l as f64 / 1048576.0
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        samples.push(s);
    }
    drop(mesh);
    let mesh = up(trellis, None)?;
    let target = Target::Http1(format!("http://127.0.0.1:{}/fast", mesh.gateway));
    let cp = control_plane_pid(mesh.child.id());
    let without_console = load::open_loop(&target, rate, Duration::ZERO, window).await?;
    let without_console_rss_mib = cp.map(|p| rss_kib(&[p]) as f64 / 1024.0).unwrap_or(0.0);
    eprintln!(
        "no console: p50 {:.3} ms p99 {:.3} ms  errors {}  control plane {:.1} MiB",
        without_console.p50_us as f64 / 1000.0,
        without_console.p99_us as f64 / 1000.0,
        without_console.errors,
        without_console_rss_mib
    );
    Ok(ConsoleRun { rate, samples, without_console, without_console_rss_mib })
}
