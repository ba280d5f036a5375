//! Running `trellis up` from tests: the shipped examples, copied to a temporary directory
//! with the gateway on a free port, as real processes.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

/// The reference platform's HTTP calls, caller → callee (Service F only reads Redis).
pub const REFERENCE_CALLS: [(&str, &str); 6] = [
    ("service-a", "service-b"),
    ("service-a", "service-c"),
    ("service-b", "service-d"),
    ("service-b", "service-e"),
    ("service-e", "service-g"),
    ("service-e", "service-h"),
];

/// A copy of `examples/<name>` with the gateway on `port`.
pub fn example(name: &str, port: u16) -> ConfigDir {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(name);
    let dir = ConfigDir::new();
    copy_dir(&src, dir.path(), port);
    dir
}

fn copy_dir(src: &Path, dst: &Path, port: u16) {
    for e in std::fs::read_dir(src).expect("example dir") {
        let e = e.expect("entry");
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            std::fs::create_dir_all(&to).expect("mkdir");
            copy_dir(&e.path(), &to, port);
        } else {
            let text = std::fs::read_to_string(e.path()).expect("read");
            std::fs::write(&to, text.replace("number: 8080", &format!("number: {port}"))).expect("write");
        }
    }
}

pub fn demo_bin_present() {
    let demo = Path::new(trellis_bin()).with_file_name("trellis-demo");
    assert!(
        demo.is_file(),
        "{} is missing: build it first (`cargo build --workspace --bins`, as scripts/test.sh does)",
        demo.display()
    );
}

/// A running `trellis up`.
pub struct Up {
    pub child: Child,
    /// `XDG_STATE_HOME` of this mesh: its state directory and CA live under it.
    pub state_home: tempfile::TempDir,
    pub cp: SocketAddr,
    pub port: u16,
    lines: Arc<Mutex<Vec<String>>>,
    pub started: Instant,
    pub ready_after: Duration,
}

impl Up {
    pub async fn start(dir: &Path, port: u16) -> Up {
        Up::start_with(dir, port, &[]).await
    }

    /// Starts `trellis up DIR --verbose` (tests read access logs and the control plane's log
    /// from its output) with extra flags and waits until the mesh is ready.
    pub async fn start_with(dir: &Path, port: u16, extra: &[&str]) -> Up {
        let mut up = Up::spawn(dir, port, &[&["--verbose"], extra].concat());
        up.wait_ready().await;
        up
    }

    /// Starts `trellis up DIR` with `args` (a control plane on a free port, free admin ports,
    /// a fresh state home), without waiting.
    pub fn spawn(dir: &Path, port: u16, args: &[&str]) -> Up {
        let cp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        Up::spawn_in(tempfile::tempdir().expect("state home"), dir, port, cp, args)
    }

    /// Starts `trellis up DIR` in `state_home` with the control plane at `cp`, without waiting.
    pub fn spawn_in(state_home: tempfile::TempDir, dir: &Path, port: u16, cp: SocketAddr, args: &[&str]) -> Up {
        demo_bin_present();
        let started = Instant::now();
        let child = Command::new(trellis_bin())
            .arg("up")
            .arg(dir)
            .args(["--control-plane", &cp.to_string(), "--admin-port-base", "0"])
            .args(args)
            .env("XDG_STATE_HOME", state_home.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn trellis up");
        Up::collect(child, state_home, cp, port, started)
    }

    /// Starts `trellis up ARGS` exactly as typed (default control plane and admin ports), from
    /// `cwd`, in `state_home`, without waiting.
    pub fn spawn_readme(state_home: tempfile::TempDir, cwd: &Path, args: &str) -> Up {
        demo_bin_present();
        let child = Command::new(trellis_bin())
            .arg("up")
            .args(args.split_whitespace())
            .current_dir(cwd)
            .env("XDG_STATE_HOME", state_home.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn trellis up");
        Up::collect(child, state_home, SocketAddr::from(([127, 0, 0, 1], 15010)), 8080, Instant::now())
    }

    /// An `Up` for `child`, its stdout and stderr lines collected as they come.
    fn collect(mut child: Child, state_home: tempfile::TempDir, cp: SocketAddr, port: u16, started: Instant) -> Up {
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|s| Box::new(s) as _),
        ]
        .into_iter()
        .flatten()
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for l in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().expect("lock").push(l);
                }
            });
        }
        Up { child, state_home, cp, port, lines, started, ready_after: Duration::ZERO }
    }

    /// Waits for "mesh ready" in the output.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.output().contains("mesh ready in") {
                break;
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("trellis up exited with {s}:\n{}", self.output());
            }
            assert!(Instant::now() < deadline, "mesh not ready:\n{}", self.output());
            tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on the output
        }
        self.ready_after = self.started.elapsed();
    }

    /// The mesh's state directory, from the line `trellis up` prints before starting anything.
    pub fn mesh_dir(&self) -> Option<std::path::PathBuf> {
        let out = self.output();
        let line = out.lines().find(|l| l.starts_with("trellis up: state in "))?;
        let rest = line.strip_prefix("trellis up: state in ")?;
        Some(std::path::PathBuf::from(rest.split(';').next()?))
    }

    /// Runs `trellis ARGS` against this mesh (same state home); `(exit success, stdout, stderr)`.
    pub fn trellis(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(trellis_bin())
            .args(args)
            .env("XDG_STATE_HOME", self.state_home.path())
            .output()
            .expect("run trellis");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn output(&self) -> String {
        self.lines.lock().expect("lock").join("\n")
    }

    /// Whether `needle` shows up in the output within `within` (logs, access logs included, are
    /// written in batches).
    pub async fn output_shows(&self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.output().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on the output
        }
    }

    /// Admin address of each workload (and gateway), from the table `trellis up` prints.
    pub fn admins(&self) -> BTreeMap<String, SocketAddr> {
        let mut m = BTreeMap::new();
        for l in self.output().lines() {
            let cols: Vec<&str> = l.split_whitespace().collect();
            if let (Some(first), Some(last)) = (cols.first(), cols.last()) {
                if let Some(addr) = last.strip_prefix("http://").and_then(|a| a.parse().ok()) {
                    m.insert(first.split('.').next().unwrap_or(first).to_string(), addr);
                }
            }
        }
        m
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn status(&self) -> serde_json::Value {
        status_of(self.cp, self.state_home.path())
    }

    /// Waits until the control plane serves a config generation newer than `after` and every
    /// connected proxy has ACKed the push compiled from it (what `trellis apply` waits for);
    /// returns that generation and when it was seen.
    pub async fn wait_served(&self, after: u64, within: Duration) -> (u64, Instant) {
        let deadline = Instant::now() + within;
        loop {
            let (cp, home) = (self.cp, self.state_home.path().to_path_buf());
            let status = tokio::task::spawn_blocking(move || status_of(cp, &home)).await.expect("status");
            let generation = status["config_generation"].as_u64().unwrap_or(0);
            let proxies = status["proxies"].as_array().cloned().unwrap_or_default();
            let served = proxies
                .iter()
                .filter(|p| p["state"] == "CONNECTED")
                .all(|p| p["config_generation"].as_u64().unwrap_or(0) >= generation && p["acked"] == p["sent"]);
            if generation > after && served {
                return (generation, Instant::now());
            }
            assert!(Instant::now() < deadline, "generation {after}+1 not served within {within:?}: {status}");
            tokio::time::sleep(Duration::from_millis(10)).await; // poll interval of a wait on the status
        }
    }

    /// The control plane's config generation now.
    pub fn generation(&self) -> u64 {
        self.status()["config_generation"].as_u64().unwrap_or(0)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn interrupt(&self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), nix::sys::signal::Signal::SIGINT);
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.interrupt();
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20)); // Drop cannot await: poll interval of a wait on the exit
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `trellis status -o json` of the control plane at `cp`.
fn status_of(cp: SocketAddr, state_home: &Path) -> serde_json::Value {
    let out = Command::new(trellis_bin())
        .args(["status", "-o", "json", "--control-plane", &cp.to_string()])
        .env("XDG_STATE_HOME", state_home)
        .output()
        .expect("status");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status json ({e}): {}", String::from_utf8_lossy(&out.stderr)))
}

/// Child processes of `pid` (direct children), from /proc.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        if after.split_whitespace().nth(1).and_then(|v| v.parse::<i32>().ok()) == Some(pid) {
            out.push(p);
        }
    }
    out
}

pub fn environ(pid: i32) -> BTreeMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok()?.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

pub fn metric_sum(text: &str, name: &str, filters: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
        .filter(|l| filters.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn metrics(admin: SocketAddr) -> String {
    admin_get(admin, "/metrics").await.expect("metrics").1
}
