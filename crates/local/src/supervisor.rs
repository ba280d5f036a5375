//! Child processes: started with their output prefixed by name, restarted when they die, and
//! stopped in order. Each child runs in its own process group, so a Ctrl-C in the terminal
//! reaches only `trellis up`, which then stops everything in the safe order itself.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// What to run.
#[derive(Clone, Debug)]
pub struct ChildSpec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    /// Pause before restarting after a crash (doubles up to 10 s for repeated crashes).
    pub restart_delay: Duration,
}

/// A supervised child.
pub struct Child {
    pub spec: ChildSpec,
    pid: AtomicU32,
    stopping: AtomicBool,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Starts so far (1 after the first start).
    pub starts: AtomicU32,
}

/// Where prefixed output goes (and its colours).
#[derive(Clone)]
pub struct Output {
    pub width: usize,
    pub color: bool,
}

const COLORS: [&str; 6] = ["36", "33", "35", "32", "34", "31"];

impl Child {
    /// Starts `spec` and keeps it running until [`Child::stop`].
    pub fn start(spec: ChildSpec, out: Output, color_index: usize) -> std::io::Result<Arc<Child>> {
        let child = Arc::new(Child {
            spec,
            pid: AtomicU32::new(0),
            stopping: AtomicBool::new(false),
            task: std::sync::Mutex::new(None),
            starts: AtomicU32::new(0),
        });
        let first = child.spawn_once(&out, color_index)?;
        let c = child.clone();
        let task = tokio::spawn(async move { c.supervise(first, out, color_index).await });
        *child.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(child)
    }

    pub fn pid(&self) -> Option<u32> {
        match self.pid.load(Ordering::SeqCst) {
            0 => None,
            p => Some(p),
        }
    }

    fn spawn_once(&self, out: &Output, color_index: usize) -> std::io::Result<tokio::process::Child> {
        let mut cmd = Command::new(&self.spec.program);
        cmd.args(&self.spec.args)
            .envs(self.spec.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(d) = &self.spec.cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd.spawn().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot start {} ({}): {e}", self.spec.name, self.spec.program.display()),
            )
        })?;
        self.pid.store(child.id().unwrap_or(0), Ordering::SeqCst);
        self.starts.fetch_add(1, Ordering::SeqCst);
        let prefix = if out.color {
            format!("\x1b[{}m{:<w$}\x1b[0m | ", COLORS[color_index % COLORS.len()], self.spec.name, w = out.width)
        } else {
            format!("{:<w$} | ", self.spec.name, w = out.width)
        };
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(pipe(BufReader::new(stdout), prefix.clone()));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(pipe(BufReader::new(stderr), prefix));
        }
        Ok(child)
    }

    async fn supervise(self: Arc<Self>, mut child: tokio::process::Child, out: Output, color_index: usize) {
        let mut delay = self.spec.restart_delay;
        loop {
            let status = child.wait().await;
            self.pid.store(0, Ordering::SeqCst);
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let how = match status {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            };
            eprintln!("trellis up: {} exited ({how}); restarting in {} ms", self.spec.name, delay.as_millis());
            tokio::time::sleep(delay).await;
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            delay = (delay * 2).clamp(Duration::from_millis(100), Duration::from_secs(10));
            match self.spawn_once(&out, color_index) {
                Ok(c) => child = c,
                Err(e) => {
                    eprintln!("trellis up: {e}");
                    tokio::time::sleep(delay).await;
                    match self.spawn_once(&out, color_index) {
                        Ok(c) => child = c,
                        Err(_) => return,
                    }
                }
            }
        }
    }

    /// Sends `signal` to the child's process group (no restart afterwards).
    pub fn signal(&self, signal: Signal) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(pid) = self.pid() {
            let _ = kill(Pid::from_raw(-(pid as i32)), signal);
        }
    }

    /// Marks the child as stopping and waits up to `grace` for it to exit, then kills its group.
    pub async fn wait_or_kill(&self, grace: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut task) = task else { return };
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            self.signal(Signal::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
    }
}

async fn pipe<R: tokio::io::AsyncRead + Unpin>(reader: BufReader<R>, prefix: String) {
    let mut lines = reader.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        println!("{prefix}{line}");
    }
}
