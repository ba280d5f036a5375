//! `bench console`: the console's stores against their bounds, and its cost to requests.
//!
//! `trellis up examples/slow-fast` (release binaries) takes `/fast` at a fixed rate through its
//! gateway for the run's length (5 minutes at 1000 requests per second in the full run), every
//! proxy tracing at 100% and sending its spans and access-log lines to the console, which reads
//! every proxy's metrics every 2 s. Every 30 s the harness reads the stores' sizes
//! (`/api/status`) and the control plane's resident memory.
//!
//! Then what the console costs requests, as paired windows: the same mesh with the console and
//! without it (`--no-console`) run side by side, idle but for the window being measured, which
//! alternates between them (with, without; without, with; ...) so drift in the machine falls on
//! both alike. Each window records the latency and the CPU of every process of its mesh by role
//! (gateway, sidecars, apps, control plane). Each pair gives one difference (with − without)
//! at p50, p90 and p99; [`Paired`] sums them up: the median difference, its distribution-free
//! interval (order statistics of the differences, as the sign test gives them) and the sign
//! test's p-value. The console adds measurable latency when that interval lies above zero at a
//! percentile ([`verdict`]; an interval below zero says requests were faster with it). With `--mesh-per-pair` every pair has new instances of both meshes, so that what
//! one instance happens to be does not repeat in every pair (pairs sharing two instances are not
//! independent, and their interval is too narrow).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::load::{self, OpenLoop, Target};
use crate::peers::{cpu_ns, free_port, http_get, local, rss_kib, threads_cpu_ns, threads_schedstat};

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
    /// The paired windows, in the order they ran.
    pub windows: Vec<Window>,
    /// The pairs' differences at p50, p90 and p99, summed up.
    pub paired: Vec<Paired>,
    pub without_console_rss_mib: f64,
}

/// One percentile's differences over the pairs (with the console − without), in microseconds.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Paired {
    pub percentile: &'static str,
    /// Each pair's difference, in the order the pairs ran.
    pub differences_us: Vec<i64>,
    pub median_us: f64,
    /// The distribution-free interval for the median difference: the k-th smallest and k-th
    /// largest difference, with k the largest for which the interval's coverage (by the
    /// binomial distribution, as the sign test) is at least 95%; `None` with fewer than 6 pairs.
    pub interval_us: Option<(i64, i64)>,
    pub coverage: Option<f64>,
    /// Pairs where the console's window was slower / faster (ties left out).
    pub slower: usize,
    pub faster: usize,
    /// The two-sided sign test's p-value for "the console changes this percentile".
    pub sign_test_p: f64,
}

/// `C(n, k) / 2^n` summed over k ≤ `upto`: the binomial(n, ½) distribution function.
fn binomial_cdf(n: usize, upto: usize) -> f64 {
    let mut term = 0.5f64.powi(n as i32); // C(n, 0) / 2^n
    let mut sum = 0.0;
    for k in 0..=upto.min(n) {
        sum += term;
        term = term * (n - k) as f64 / (k + 1) as f64;
    }
    sum
}

impl Paired {
    pub fn new(percentile: &'static str, differences_us: Vec<i64>) -> Paired {
        let mut d = differences_us.clone();
        d.sort_unstable();
        let n = d.len();
        let median_us = match n {
            0 => 0.0,
            _ if n % 2 == 1 => d[n / 2] as f64,
            _ => (d[n / 2 - 1] + d[n / 2]) as f64 / 2.0,
        };
        // [d(k), d(n+1-k)] covers the median with probability 1 − 2·P(B ≤ k−1), B ~ Bin(n, ½).
        let mut interval = None;
        for k in (1..=n / 2).rev() {
            let coverage = 1.0 - 2.0 * binomial_cdf(n, k - 1);
            if coverage >= 0.95 {
                interval = Some(((d[k - 1], d[n - k]), coverage));
                break;
            }
        }
        let slower = d.iter().filter(|x| **x > 0).count();
        let faster = d.iter().filter(|x| **x < 0).count();
        let m = slower + faster;
        let sign_test_p = (2.0 * binomial_cdf(m, slower.min(faster))).min(1.0);
        Paired {
            percentile,
            differences_us,
            median_us,
            interval_us: interval.map(|i| i.0),
            coverage: interval.map(|i| i.1),
            slower,
            faster,
            sign_test_p,
        }
    }

    /// Whether the interval holds zero (no difference the pairs can tell from none).
    pub fn holds_zero(&self) -> bool {
        self.interval_us.is_some_and(|(lo, hi)| lo <= 0 && hi >= 0)
    }

    /// Whether the whole interval lies above zero: requests measurably slower with the console.
    pub fn slower(&self) -> bool {
        self.interval_us.is_some_and(|(lo, _)| lo > 0)
    }
}

/// The pairs of earlier runs (`bench console` JSON files) as one set, percentile by percentile.
pub fn pool(files: &[std::path::PathBuf]) -> anyhow::Result<Vec<Paired>> {
    let mut by: Vec<(&'static str, Vec<i64>)> = vec![("p50", Vec::new()), ("p90", Vec::new()), ("p99", Vec::new())];
    for f in files {
        let run: serde_json::Value = serde_json::from_slice(&std::fs::read(f)?)?;
        for p in run["paired"].as_array().into_iter().flatten() {
            let Some(slot) = by.iter_mut().find(|(n, _)| Some(*n) == p["percentile"].as_str()) else { continue };
            slot.1.extend(p["differences_us"].as_array().into_iter().flatten().filter_map(|d| d.as_i64()));
        }
    }
    Ok(by.into_iter().map(|(n, d)| Paired::new(n, d)).collect())
}

/// What a run's pairs say of the console's cost to requests.
pub fn verdict(paired: &[Paired]) -> String {
    let names =
        |f: fn(&Paired) -> bool| -> Vec<&str> { paired.iter().filter(|p| f(p)).map(|p| p.percentile).collect() };
    if paired.iter().any(|p| p.interval_us.is_none()) {
        return "too few pairs to tell (6 or more give a 95% interval)".into();
    }
    let slower = names(Paired::slower);
    if !slower.is_empty() {
        return format!("measurable: requests slower with it at {}", slower.join(", "));
    }
    let faster = names(|p| !p.holds_zero());
    if faster.is_empty() {
        "not measurable (every interval holds zero)".into()
    } else {
        format!("none added (no interval lies above zero; requests faster with it at {})", faster.join(", "))
    }
}

/// The pairs' differences at p50, p90 and p99 (windows in the order they ran, two a pair).
fn paired(windows: &[Window]) -> Vec<Paired> {
    type Percentile = fn(&OpenLoop) -> u64;
    let pick: [(&'static str, Percentile); 3] = [("p50", |l| l.p50_us), ("p90", |l| l.p90_us), ("p99", |l| l.p99_us)];
    pick.iter()
        .map(|(name, f)| {
            let diffs = windows
                .chunks_exact(2)
                .filter_map(|pair| {
                    let on = pair.iter().find(|w| w.console)?;
                    let off = pair.iter().find(|w| !w.console)?;
                    Some(f(&on.load) as i64 - f(&off.load) as i64)
                })
                .collect();
            Paired::new(name, diffs)
        })
        .collect()
}

/// One window of the paired comparison.
#[derive(Debug, serde::Serialize)]
pub struct Window {
    pub console: bool,
    pub load: OpenLoop,
    /// CPU of the mesh's processes by role over the window, in milliseconds a second.
    pub cpu_ms_per_s: Vec<(String, f64)>,
    /// Of the gateway's and sidecars' CPU, what their telemetry threads took (writing and
    /// sending exports, at idle priority): the rest is their request threads'.
    pub proxies_telemetry_threads_ms_per_s: f64,
    /// The threads that serve requests (the gateway's, the sidecars' and the apps', but for
    /// the telemetry threads), per request: the CPU they ran (µs)...
    pub request_threads_cpu_us: f64,
    /// ...and the time they were ready to run but waited for a CPU (µs): where a request's
    /// latency grows when something else holds the CPU it was woken on.
    pub request_threads_waiting_us: f64,
    /// With the console: spans and access-log lines it took in over the window (that every
    /// request's spans and lines arrived, not only that requests stayed fast)...
    pub received: Option<(u64, u64)>,
    /// ...and spans and lines the proxies dropped over the window.
    pub dropped: Option<u64>,
}

/// Spans and lines the console has taken in since it started (stored and evicted).
fn received(console: SocketAddr) -> (u64, u64) {
    let s = stores(console);
    let n = |name: &str| s.iter().find(|x| x.0 == name).map(|x| x.3 + x.4).unwrap_or(0);
    (n("spans"), n("logs"))
}

/// Spans and access-log lines the mesh's proxies have dropped since they started.
fn dropped(up: u32) -> u64 {
    let mut total = 0;
    for pid in roles(up).into_iter().take(2).flat_map(|(_, p)| p) {
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&str> = cmdline.split('\0').collect();
        let Some(admin) = args.windows(2).find(|w| w[0] == "--admin").and_then(|w| w[1].parse::<SocketAddr>().ok())
        else {
            continue;
        };
        let text = http_get(admin, "/metrics").unwrap_or_default();
        total += text
            .lines()
            .filter(|l| {
                l.starts_with("trellis_proxy_spans_dropped_total")
                    || l.starts_with("trellis_proxy_access_log_dropped_total")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64;
    }
    total
}

/// The processes of a running `trellis up` by role (`gateway`, `sidecars`, `apps`,
/// `control plane`), from its process tree.
fn roles(up: u32) -> Vec<(String, Vec<u32>)> {
    let mut out: Vec<(String, Vec<u32>)> =
        ["gateway", "sidecars", "apps", "control plane"].iter().map(|r| (r.to_string(), Vec::new())).collect();
    let mut stack = vec![up];
    while let Some(p) = stack.pop() {
        let tasks = std::fs::read_dir(format!("/proc/{p}/task")).into_iter().flatten().flatten();
        for t in tasks {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            stack.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
        if p == up {
            continue;
        }
        let cmdline = std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default();
        let args: Vec<&str> = cmdline.split('\0').collect();
        let exe = args.first().and_then(|a| a.rsplit('/').next()).unwrap_or_default();
        let role = match exe {
            "trellis-proxy" if args.windows(2).any(|w| w == ["--role", "gateway"]) => 0,
            "trellis-proxy" => 1,
            "trellis-demo" => 2,
            "trellis" if args.get(1) == Some(&"control") => 3,
            _ => continue,
        };
        out[role].1.push(p);
    }
    out
}

/// One measured window against one mesh: its latency and its processes' CPU by role.
async fn window(mesh: &Mesh, console: bool, rate: u32, length: Duration) -> anyhow::Result<Window> {
    let target = Target::Http1(format!("http://127.0.0.1:{}/fast", mesh.gateway));
    let roles = roles(mesh.child.id());
    // The first second warms the connections and is not counted, in latency or in CPU.
    let warmup = Duration::from_secs(1);
    let roles2 = roles.clone();
    let (up, console_addr) = (mesh.child.id(), mesh.console);
    let cpu_at = tokio::spawn(async move {
        tokio::time::sleep(warmup).await;
        let counts = console_addr.map(|c| (received(c), dropped(up)));
        let telemetry = threads_cpu_ns(&proxies(&roles2), is_telemetry_thread);
        let serving = threads_schedstat(&serving(&roles2), |t| !is_telemetry_thread(t));
        (Instant::now(), roles2.iter().map(|(_, p)| cpu_ns(p)).collect::<Vec<_>>(), counts, telemetry, serving)
    });
    let load = load::open_loop(&target, rate, warmup, length).await?;
    let (t0, cpu0, counts0, telemetry0, serving0) = cpu_at.await?;
    let secs = t0.elapsed().as_secs_f64();
    let proxies_telemetry_threads_ms_per_s =
        threads_cpu_ns(&proxies(&roles), is_telemetry_thread).saturating_sub(telemetry0) as f64 / 1e6 / secs;
    let serving1 = threads_schedstat(&serving(&roles), |t| !is_telemetry_thread(t));
    let per_request = |ns: u64| ns as f64 / 1e3 / load.requests.max(1) as f64;
    let request_threads_cpu_us = per_request(serving1.0.saturating_sub(serving0.0));
    let request_threads_waiting_us = per_request(serving1.1.saturating_sub(serving0.1));
    let cpu_ms_per_s = roles
        .iter()
        .zip(cpu0)
        .map(|((r, p), c0)| (r.clone(), cpu_ns(p).saturating_sub(c0) as f64 / 1e6 / secs))
        .collect();
    // What the last requests sent is still on its way (proxies send every 200 ms): read the
    // counts once the console's totals have not moved for over a second.
    let (mut received_, mut dropped_) = (None, None);
    if let (Some(c), Some(((s0, l0), d0))) = (mesh.console, counts0) {
        let (mut last, mut still) = (received(c), 0);
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(250)).await; // poll interval of a wait on the console's totals
            let now = received(c);
            still = if now == last { still + 1 } else { 0 };
            if still == 6 {
                break;
            }
            last = now;
        }
        received_ = Some((last.0 - s0, last.1 - l0));
        dropped_ = Some(dropped(up) - d0);
    }
    Ok(Window {
        console,
        load,
        cpu_ms_per_s,
        proxies_telemetry_threads_ms_per_s,
        request_threads_cpu_us,
        request_threads_waiting_us,
        received: received_,
        dropped: dropped_,
    })
}

/// The gateway's and the sidecars' processes.
fn proxies(roles: &[(String, Vec<u32>)]) -> Vec<u32> {
    roles.iter().filter(|(r, _)| r == "gateway" || r == "sidecars").flat_map(|(_, p)| p.iter().copied()).collect()
}

/// The processes that serve requests: the gateway's, the sidecars' and the apps'.
fn serving(roles: &[(String, Vec<u32>)]) -> Vec<u32> {
    roles.iter().filter(|(r, _)| r != "control plane").flat_map(|(_, p)| p.iter().copied()).collect()
}

/// The threads a proxy runs its exporters on (`trellis_telemetry::idle`).
fn is_telemetry_thread(comm: &str) -> bool {
    comm == "span-export" || comm == "access-log-expo"
}

struct Mesh {
    child: Child,
    _state: tempfile::TempDir,
    _config: tempfile::TempDir,
    gateway: u16,
    console: Option<SocketAddr>,
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
/// `trellis up examples/slow-fast` with the console at `console`, or without it and with
/// `extra` arguments (`--without-console-args`: e.g. span export to a closed port, to tell the
/// proxies' share of the cost from the console's).
fn up(trellis: &Path, console: Option<SocketAddr>, extra: &[String]) -> anyhow::Result<Mesh> {
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
    if console.is_none() {
        cmd.args(extra);
    }
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
    let mesh = Mesh { child, _state: state, _config: config, gateway, console };
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

/// How long a new mesh takes requests at the run's rate before its first window (connections,
/// pools, caches and the console's stores filled as in use).
const MESH_WARMUP: Duration = Duration::from_secs(5);

/// How the console's cost is measured: `pairs` pairs of `window`s, the mesh without the console
/// run with `without_args`, and new meshes for every pair with `mesh_per_pair`.
pub struct Cost<'a> {
    pub pairs: usize,
    pub window: Duration,
    pub without_args: &'a [String],
    pub mesh_per_pair: bool,
}

pub async fn run(
    trellis: &Path,
    rate: u32,
    total: Duration,
    sample_every: Duration,
    cost: Cost<'_>,
) -> anyhow::Result<ConsoleRun> {
    let Cost { pairs, window: window_len, without_args, mesh_per_pair } = cost;
    let console = local(free_port());
    let mesh = up(trellis, Some(console), &[])?;
    let target = Target::Http1(format!("http://127.0.0.1:{}/fast", mesh.gateway));
    let cp = control_plane_pid(mesh.child.id());
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < total {
        let w = load::open_loop(&target, rate, Duration::ZERO, sample_every).await?;
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
    // The paired windows: the mesh without the console beside it, each idle but for the window
    // being measured, alternating which goes first. With `mesh_per_pair`, every pair has new
    // instances of both meshes (started, warmed and measured in the pair's order): what one
    // instance happens to be (its ports, where its processes' memory and threads land) then
    // varies from pair to pair instead of weighing on every pair alike.
    let (mut with, mut without) = (Some(mesh), None);
    let mut windows = Vec::new();
    for pair in 0..pairs {
        let order = if pair % 2 == 0 { [true, false] } else { [false, true] };
        if mesh_per_pair {
            (with, without) = (None, None); // stopped before the new ones start
            for console in order {
                let m = if console {
                    up(trellis, Some(local(free_port())), &[])?
                } else {
                    up(trellis, None, without_args)?
                };
                if console {
                    with = Some(m);
                } else {
                    without = Some(m);
                }
            }
            for m in order.iter().filter_map(|c| if *c { with.as_ref() } else { without.as_ref() }) {
                let target = Target::Http1(format!("http://127.0.0.1:{}/fast", m.gateway));
                load::open_loop(&target, rate, Duration::ZERO, MESH_WARMUP).await?;
            }
        } else if without.is_none() {
            without = Some(up(trellis, None, without_args)?);
        }
        let (Some(with), Some(without)) = (&with, &without) else { anyhow::bail!("no mesh to measure") };
        for console in order {
            let w = window(if console { with } else { without }, console, rate, window_len).await?;
            eprintln!(
                "{:<10} p50 {:.3} ms p99 {:.3} ms  errors {}  CPU ms/s: {} (proxies' telemetry threads {:.1})  request threads µs/request: CPU {:.1}, waiting {:.1}  received {:?} dropped {:?}",
                if console { "console" } else { "no console" },
                w.load.p50_us as f64 / 1000.0,
                w.load.p99_us as f64 / 1000.0,
                w.load.errors,
                w.cpu_ms_per_s.iter().map(|(r, c)| format!("{r} {c:.0}")).collect::<Vec<_>>().join(", "),
                w.proxies_telemetry_threads_ms_per_s,
                w.request_threads_cpu_us,
                w.request_threads_waiting_us,
                w.received,
                w.dropped
            );
            windows.push(w);
        }
    }
    let without_console_rss_mib = without
        .as_ref()
        .and_then(|m| control_plane_pid(m.child.id()))
        .map(|p| rss_kib(&[p]) as f64 / 1024.0)
        .unwrap_or(0.0);
    let paired = paired(&windows);
    Ok(ConsoleRun { rate, samples, windows, paired, without_console_rss_mib })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sign_test_and_its_interval() {
        // 8 pairs: the 96.1% interval is the smallest to the largest difference.
        let p = Paired::new("p99", vec![-8, -9, 173, 190, 176, 161, -175, 306]);
        assert_eq!(p.interval_us, Some((-175, 306)));
        assert!((p.coverage.unwrap_or(0.0) - 0.9922).abs() < 0.001, "{p:?}");
        assert_eq!((p.slower, p.faster), (5, 3));
        assert!((p.sign_test_p - 0.7266).abs() < 0.001, "{p:?}");
        assert!(p.holds_zero());
        // All 8 one way: p = 2/256.
        let q = Paired::new("p90", vec![93, 1, 112, 123, 89, 138, 10, 150]);
        assert!((q.sign_test_p - 0.0078).abs() < 0.0001, "{q:?}");
        assert!(!q.holds_zero() && q.slower());
        assert_eq!(verdict(&[p.clone(), q.clone()]), "measurable: requests slower with it at p90");
        let faster = Paired::new("p99", vec![-93, -1, -112, -123, -89, -138, -10, -150]);
        assert!(!faster.holds_zero() && !faster.slower());
        assert_eq!(
            verdict(&[p.clone(), faster]),
            "none added (no interval lies above zero; requests faster with it at p99)"
        );
        assert_eq!(verdict(std::slice::from_ref(&p)), "not measurable (every interval holds zero)");
        assert_eq!(q.median_us, 102.5);
        // 16 pairs: k = 4, [d(4), d(13)], coverage 97.9%.
        let r = Paired::new("p50", (1..=16).collect());
        assert_eq!(r.interval_us, Some((4, 13)));
        assert!(Paired::new("p50", vec![1, 2, 3]).interval_us.is_none());
    }

    #[test]
    fn runs_pool_into_one_set_of_pairs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = |name: &str, p50: Vec<i64>| {
            let path = dir.path().join(name);
            let paired = vec![Paired::new("p50", p50), Paired::new("p99", vec![-1, -2, -3])];
            std::fs::write(&path, serde_json::to_vec(&serde_json::json!({ "paired": paired })).expect("json"))
                .expect("write");
            path
        };
        let pooled = pool(&[run("a.json", vec![1, 2, 3, 4]), run("b.json", vec![-5, 6, 7, 8])]).expect("pool");
        assert_eq!(pooled[0].differences_us, [1, 2, 3, 4, -5, 6, 7, 8]);
        assert_eq!((pooled[0].slower, pooled[0].faster), (7, 1));
        assert!(pooled[1].differences_us.is_empty(), "p90 was in neither run");
        assert_eq!(pooled[2].differences_us.len(), 6);
    }
}
