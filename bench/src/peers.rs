//! The proxies under test, started as real processes pinned to their own core: Trellis (one
//! gateway; two sidecars, plaintext or mutual TLS; with telemetry on), HAProxy and nginx (one
//! and two proxies). Each setup knows which processes to measure and how to reach it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::load::Target;

/// A port that was free when asked for (below the ephemeral range).
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let p = 21_000 + (uuid::Uuid::new_v4().as_u128() % 10_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// A process under test; killed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How processes are placed on cores.
#[derive(Clone, Debug)]
pub struct Pinning {
    /// `taskset -c <core>` prefix for proxies, if the machine has a second core.
    pub proxy_core: Option<usize>,
    pub harness_core: Option<usize>,
    /// Cores the machine has (read before the harness pins itself).
    pub cores: usize,
}

impl Pinning {
    pub fn detect() -> Pinning {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        if cores >= 2 && Path::new("/usr/bin/taskset").exists() {
            Pinning { proxy_core: Some(1), harness_core: Some(0), cores }
        } else {
            Pinning { proxy_core: None, harness_core: None, cores }
        }
    }

    pub fn describe(&self) -> String {
        match (self.harness_core, self.proxy_core) {
            (Some(h), Some(p)) => format!(
                "load generator and backends on CPU {h} (sched_setaffinity), proxies under test on CPU {p} (taskset)"
            ),
            _ => "not pinned (one core or no taskset)".into(),
        }
    }

    pub(crate) fn command(&self, program: &Path) -> Command {
        match self.proxy_core {
            Some(c) => {
                let mut cmd = Command::new("taskset");
                cmd.arg("-c").arg(c.to_string()).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }
}

/// A scenario's running processes and entry points.
pub struct Setup {
    pub h1: Target,
    pub h2: Option<Target>,
    pub grpc: Option<Target>,
    pub procs: Vec<Proc>,
    /// Milliseconds from spawn to ready, per proxy.
    pub ready_ms: Vec<f64>,
    pub tmp: tempfile::TempDir,
    /// What else lives as long as the setup (linkerd2-proxy's capture rules and control plane).
    pub _keep: Vec<Box<dyn Send>>,
}

impl Setup {
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().filter(|p| !p.name.starts_with("control")).map(|p| p.child.id()).collect()
    }
}

/// The backends scenarios forward to.
#[derive(Clone, Copy)]
pub struct Backends {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub sink: SocketAddr,
}

async fn wait_ready(check: impl Fn() -> bool, what: &str) -> anyhow::Result<()> {
    wait_ready_or(check, what, String::new).await
}

/// Waits for `check`; if it never holds, the error carries `diagnose()` (say, a log's tail).
pub(crate) async fn wait_ready_or(
    check: impl Fn() -> bool,
    what: &str,
    diagnose: impl Fn() -> String,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        anyhow::ensure!(Instant::now() < deadline, "{what} not ready in 20 s\n{}", diagnose());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// The body of a plain HTTP/1.0 GET, if it answered 200.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    (head.split(' ').nth(1) == Some("200")).then(|| body.to_string())
}

pub(crate) fn http_ok(addr: SocketAddr, path: &str) -> bool {
    http_get(addr, path).is_some()
}

fn tcp_ok(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

pub(crate) fn local(p: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], p))
}

fn service(host: &str, protocol: &str, endpoint: SocketAddr, mtls: bool) -> String {
    let extra =
        if mtls { "\n    labels: {\"security.istio.io/tlsMode\": istio}\n    serviceAccount: server" } else { "" };
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {host}}}\nspec:\n  hosts: [{host}]\n  ports: [{{number: 80, name: http, protocol: {protocol}}}]\n  resolution: STATIC\n  endpoints:\n  - address: 127.0.0.1\n    ports: {{http: {}}}{extra}\n---\n",
        endpoint.port()
    )
}

/// Starts a Trellis proxy and waits for `/ready`; returns it and its start-to-ready time.
async fn trellis(
    pin: &Pinning,
    bin: &Path,
    name: &str,
    args: &[String],
    env: &[(&str, String)],
) -> anyhow::Result<(Proc, f64, SocketAddr)> {
    let admin = local(free_port());
    let t = Instant::now();
    // What sidecars and gateways run: `trellis-proxy` beside `trellis` (else `trellis proxy`).
    let alone = bin.with_file_name("trellis-proxy");
    let mut cmd = if alone.is_file() {
        pin.command(&alone)
    } else {
        let mut c = pin.command(bin);
        c.arg("proxy");
        c
    };
    cmd.args(args)
        .args(["--admin", &admin.to_string(), "--concurrency", "1"])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn()?;
    let proc = Proc { name: name.into(), child };
    wait_ready(|| http_ok(admin, "/ready"), name).await?;
    Ok((proc, t.elapsed().as_secs_f64() * 1000.0, admin))
}

/// Trellis as one gateway: ports for HTTP/1.1, HTTP/2 and gRPC.
pub async fn trellis_gateway(pin: &Pinning, bin: &Path, be: Backends, telemetry: Option<f64>) -> anyhow::Result<Setup> {
    let tmp = tempfile::tempdir()?;
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let mut y = format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n  - {{port: {{number: {p1}, name: h1, protocol: HTTP}}, hosts: [\"*\"]}}\n  - {{port: {{number: {p2}, name: h2, protocol: HTTP2}}, hosts: [\"*\"]}}\n  - {{port: {{number: {p3}, name: grpc, protocol: GRPC}}, hosts: [\"*\"]}}\n---\n"
    );
    y.push_str(&service("be-h1", "HTTP", be.http, false));
    y.push_str(&service("be-h2", "HTTP2", be.http, false));
    y.push_str(&service("be-grpc", "GRPC", be.grpc, false));
    y.push_str(&format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs}}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - {{match: [{{port: {p2}}}], route: [{{destination: {{host: be-h2}}}}]}}\n  - {{match: [{{port: {p3}}}], route: [{{destination: {{host: be-grpc}}}}]}}\n  - route: [{{destination: {{host: be-h1}}}}]\n"
    ));
    let cfg = tmp.path().join("mesh.yaml");
    std::fs::write(&cfg, y)?;
    let mut args: Vec<String> = vec![
        "--role".into(),
        "gateway".into(),
        "--workload".into(),
        "gateway".into(),
        "-c".into(),
        cfg.display().to_string(),
    ];
    if let Some(pct) = telemetry {
        args.extend([
            "--trace-sampling".into(),
            pct.to_string(),
            "--otlp-endpoint".into(),
            format!("http://{}/v1/traces", be.sink),
        ]);
        args.extend(["--access-log".into(), tmp.path().join("access.log").display().to_string()]);
    } else {
        args.extend(["--trace-sampling".into(), "0".into()]);
    }
    let (proc, ready, _) = trellis(pin, bin, "trellis", &args, &[]).await?;
    Ok(Setup {
        h1: Target::Http1(format!("http://127.0.0.1:{p1}/")),
        h2: Some(Target::Http2(format!("http://127.0.0.1:{p2}/"))),
        grpc: Some(Target::Grpc(format!("http://127.0.0.1:{p3}"))),
        procs: vec![proc],
        ready_ms: vec![ready],
        tmp,
        _keep: Vec::new(),
    })
}

/// Trellis as two sidecars (client → server), plaintext or with mutual TLS (then with a
/// control plane issuing certificates and pushing config).
pub async fn trellis_sidecars(pin: &Pinning, bin: &Path, be: Backends, mtls: bool) -> anyhow::Result<Setup> {
    let tmp = tempfile::tempdir()?;
    let (i1, i2, i3) = (free_port(), free_port(), free_port());
    let (u1, u2, u3) = (free_port(), free_port(), free_port());
    let mut y = service("be-h1", "HTTP", local(i1), mtls);
    y.push_str(&service("be-h2", "HTTP2", local(i2), mtls));
    y.push_str(&service("be-grpc", "GRPC", local(i3), mtls));
    if mtls {
        y.push_str("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n");
    }
    let cfg = tmp.path().join("mesh.yaml");
    std::fs::write(&cfg, y)?;
    let server_args: Vec<String> = vec![
        "--workload".into(),
        "server".into(),
        "--inbound".into(),
        format!("{i1}={}", be.http.port()),
        "--inbound".into(),
        format!("{i2}={},http2", be.http.port()),
        "--inbound".into(),
        format!("{i3}={},http2", be.grpc.port()),
        "--trace-sampling".into(),
        "0".into(),
    ];
    let client_args: Vec<String> = vec![
        "--workload".into(),
        "client".into(),
        "--upstream".into(),
        format!("{u1}=be-h1:80"),
        "--upstream".into(),
        format!("{u2}=be-h2:80"),
        "--upstream".into(),
        format!("{u3}=be-grpc:80"),
        "--trace-sampling".into(),
        "0".into(),
    ];
    let mut procs = Vec::new();
    let mut ready = Vec::new();
    if mtls {
        let cp = local(free_port());
        let tokens = tmp.path().join("tokens.json");
        std::fs::write(
            &tokens,
            r#"{"tokens": {"server-token": {"namespace": "default", "serviceAccount": "server"}, "client-token": {"namespace": "default", "serviceAccount": "client"}}}"#,
        )?;
        let control = Command::new(bin)
            .args([
                "control",
                "--listen",
                &cp.to_string(),
                "-c",
                &cfg.display().to_string(),
                "--tokens",
                &tokens.display().to_string(),
            ])
            .arg("--ca-dir")
            .arg(tmp.path().join("ca"))
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        procs.push(Proc { name: "control-plane".into(), child: control });
        wait_ready(|| tcp_ok(cp), "control plane").await?;
        let cp_args = |mut a: Vec<String>, sa: &str| {
            a.extend(["--control-plane".into(), cp.to_string(), "--service-account".into(), sa.into()]);
            a
        };
        for (name, args) in [("server", server_args), ("client", client_args)] {
            let token = [("TRELLIS_BOOTSTRAP_TOKEN", format!("{name}-token"))];
            let (p, r, _) = trellis(pin, bin, name, &cp_args(args, name), &token).await?;
            procs.push(p);
            ready.push(r);
        }
    } else {
        let with_cfg = |mut a: Vec<String>| {
            a.extend(["-c".into(), cfg.display().to_string()]);
            a
        };
        for (name, args) in [("server", server_args), ("client", client_args)] {
            let (p, r, _) = trellis(pin, bin, name, &with_cfg(args), &[]).await?;
            procs.push(p);
            ready.push(r);
        }
    }
    Ok(Setup {
        h1: Target::Http1(format!("http://127.0.0.1:{u1}/")),
        h2: Some(Target::Http2(format!("http://127.0.0.1:{u2}/"))),
        grpc: Some(Target::Grpc(format!("http://127.0.0.1:{u3}"))),
        procs,
        ready_ms: ready,
        tmp,
        _keep: Vec::new(),
    })
}

fn find(names: &[&str]) -> Option<PathBuf> {
    names.iter().map(PathBuf::from).find(|p| p.is_file())
}

pub fn haproxy_bin() -> Option<PathBuf> {
    find(&["/usr/sbin/haproxy", "/usr/bin/haproxy", "/usr/local/sbin/haproxy"])
}

pub fn nginx_bin() -> Option<PathBuf> {
    find(&["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"])
}

/// A chain of `n` plain proxies in front of the HTTP backend, the last one first called.
/// `start(dir, port, next)` writes a proxy's config in its own `dir` and returns the
/// command that runs it listening on `port` and forwarding to `next`; a proxy is ready when its
/// port accepts.
async fn plain_chain(
    be: Backends,
    n: usize,
    name: &str,
    start: impl Fn(&Path, u16, SocketAddr) -> anyhow::Result<Command>,
) -> anyhow::Result<Setup> {
    let tmp = tempfile::tempdir()?;
    let mut next = be.http;
    let mut procs = Vec::new();
    let mut ready = Vec::new();
    for i in 0..n {
        let port = free_port();
        let dir = tmp.path().join(format!("{name}-{i}"));
        std::fs::create_dir_all(&dir)?;
        let mut cmd = start(&dir, port, next)?;
        let t = Instant::now();
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        procs.push(Proc { name: format!("{name}-{i}"), child });
        wait_ready(|| tcp_ok(local(port)), name).await?;
        ready.push(t.elapsed().as_secs_f64() * 1000.0);
        next = local(port);
    }
    Ok(Setup {
        h1: Target::Http1(format!("http://{next}/")),
        h2: None,
        grpc: None,
        procs,
        ready_ms: ready,
        tmp,
        _keep: Vec::new(),
    })
}

/// HAProxy, one or two in a chain, HTTP/1.1 keep-alive to the backend.
pub async fn haproxy(pin: &Pinning, bin: &Path, be: Backends, chain: usize) -> anyhow::Result<Setup> {
    plain_chain(be, chain, "haproxy", |dir, port, next| {
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  nbthread 1\n  maxconn 8000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  option http-keep-alive\n  http-reuse always\nfrontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\nbackend be\n  server s1 {next}\n"
            ),
        )?;
        let mut cmd = pin.command(bin);
        cmd.arg("-f").arg(&cfg).arg("-db");
        Ok(cmd)
    })
    .await
}

/// nginx, one or two in a chain, HTTP/1.1 keep-alive upstream connections.
pub async fn nginx(pin: &Pinning, bin: &Path, be: Backends, chain: usize) -> anyhow::Result<Setup> {
    plain_chain(be, chain, "nginx", |dir, port, next| {
        std::fs::create_dir_all(dir.join("logs"))?;
        let cfg = dir.join("nginx.conf");
        std::fs::write(
            &cfg,
            format!(
                "worker_processes 1;\ndaemon off;\nmaster_process off;\nerror_log {d}/logs/error.log error;\npid {d}/nginx.pid;\nevents {{ worker_connections 8000; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  upstream be {{ server {next}; keepalive 256; }}\n  server {{\n    listen 127.0.0.1:{port};\n    keepalive_requests 1000000;\n    location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
                d = dir.display()
            ),
        )?;
        let mut cmd = pin.command(bin);
        cmd.arg("-p").arg(dir).arg("-c").arg(&cfg);
        Ok(cmd)
    })
    .await
}

// --- resources ---

/// CPU time of processes (all threads), in nanoseconds, from /proc/<pid>/task/*/schedstat.
pub fn cpu_ns(pids: &[u32]) -> u64 {
    threads_cpu_ns(pids, |_| true)
}

/// CPU time (ns) of the processes' threads whose name (`comm`) `which` accepts, summed.
pub fn threads_cpu_ns(pids: &[u32], which: impl Fn(&str) -> bool) -> u64 {
    threads_schedstat(pids, which).0
}

/// Of the processes' threads whose name (`comm`) `which` accepts, summed, in nanoseconds: the
/// time they ran, and the time they were ready to run but waited for a CPU (the first two
/// fields of /proc/<pid>/task/<tid>/schedstat).
pub fn threads_schedstat(pids: &[u32], which: impl Fn(&str) -> bool) -> (u64, u64) {
    let (mut run, mut wait) = (0, 0);
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for t in tasks.flatten() {
            if !which(std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim_end()) {
                continue;
            }
            if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                let mut f = s.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
                run += f.next().unwrap_or(0);
                wait += f.next().unwrap_or(0);
            }
        }
    }
    (run, wait)
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Anonymous resident memory now (KiB: heap, stacks; not the executable's shared pages), summed.
pub fn anon_rss_kib(pids: &[u32]) -> u64 {
    pids.iter().map(|p| status_kib(*p, "RssAnon:")).sum()
}

/// Resident set size now (KiB), summed over processes.
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter().map(|p| status_kib(*p, "VmRSS:")).sum()
}

/// Peak resident set size (KiB), the largest of the processes.
pub fn peak_rss_kib(pids: &[u32]) -> u64 {
    pids.iter().map(|p| status_kib(*p, "VmHWM:")).max().unwrap_or(0)
}
