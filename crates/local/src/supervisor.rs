//! Child processes: started with their output going to a log file per process (and, prefixed
//! by name, to the terminal: everything with `--verbose`, else warnings and errors), restarted
//! when they die, and stopped in order. Each child runs in its own process group, so a Ctrl-C
//! in the terminal reaches only `trellis up`, which then stops everything in the safe order
//! itself; and each is started through `trellis exec-supervised`, which sets
//! `PR_SET_PDEATHSIG` before it becomes the program, so children die with `trellis up` even
//! when it is SIGKILLed.

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
    log: Option<Arc<std::sync::Mutex<LogFile>>>,
}

/// Where children's output goes, and how they are launched.
#[derive(Clone)]
pub struct Output {
    pub width: usize,
    pub color: bool,
    /// Every line to the terminal (else only warnings and errors).
    pub verbose: bool,
    /// Directory of the per-process log files (`NAME.log`).
    pub logs: Option<PathBuf>,
    /// The `trellis` executable to launch children through (`exec-supervised`), so they die
    /// with this process; `None` starts them directly.
    pub launcher: Option<PathBuf>,
}

/// Log files rotate at this size (one previous file kept as `NAME.log.1`).
const LOG_ROTATE_BYTES: u64 = 64 * 1024 * 1024;

/// One child's log file, shared by its stdout and stderr readers and across restarts.
struct LogFile {
    path: PathBuf,
    file: Option<std::fs::File>,
    written: u64,
}

impl LogFile {
    fn create(path: PathBuf) -> LogFile {
        let file = std::fs::File::create(&path)
            .map_err(|e| eprintln!("trellis up: cannot write {}: {e}", path.display()))
            .ok();
        LogFile { path, file, written: 0 }
    }

    fn write_line(&mut self, line: &str) {
        use std::io::Write;
        if self.written > LOG_ROTATE_BYTES {
            let _ = std::fs::rename(&self.path, self.path.with_extension("log.1"));
            self.file = std::fs::File::create(&self.path).ok();
            self.written = 0;
        }
        if let Some(f) = &mut self.file {
            let mut buf = Vec::with_capacity(line.len() + 1);
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
            if f.write_all(&buf).is_ok() {
                self.written += buf.len() as u64;
            }
        }
    }
}

/// Whether a child's output line is worth the terminal when not verbose: a warning or error
/// of the `tracing` format (`2026-01-01T00:00:00.000000Z  WARN message`), an `error:` line,
/// or a panic.
pub fn is_notable(line: &str) -> bool {
    let head = &line[..line.len().min(48)];
    head.contains(" WARN ")
        || head.contains(" ERROR ")
        || line.starts_with("error")
        || line.starts_with("Error")
        || line.contains("panicked at")
}

const COLORS: [&str; 6] = ["36", "33", "35", "32", "34", "31"];

impl Child {
    /// Starts `spec` and keeps it running until [`Child::stop`].
    pub fn start(spec: ChildSpec, out: Output, color_index: usize) -> std::io::Result<Arc<Child>> {
        if which(&spec.program).is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("cannot start {}: {} not found", spec.name, spec.program.display()),
            ));
        }
        let log = out
            .logs
            .as_ref()
            .map(|d| Arc::new(std::sync::Mutex::new(LogFile::create(d.join(format!("{}.log", spec.name))))));
        let child = Arc::new(Child {
            spec,
            pid: AtomicU32::new(0),
            stopping: AtomicBool::new(false),
            task: std::sync::Mutex::new(None),
            starts: AtomicU32::new(0),
            log,
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
        let mut cmd = match &out.launcher {
            Some(trellis) => {
                let mut c = Command::new(trellis);
                c.arg("exec-supervised")
                    .arg("--parent")
                    .arg(std::process::id().to_string())
                    .arg("--")
                    .arg(&self.spec.program);
                c
            }
            None => Command::new(&self.spec.program),
        };
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
        let sink = Sink { prefix, verbose: out.verbose, log: self.log.clone() };
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(pipe(BufReader::new(stdout), sink.clone()));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(pipe(BufReader::new(stderr), sink));
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

#[derive(Clone)]
struct Sink {
    prefix: String,
    verbose: bool,
    log: Option<Arc<std::sync::Mutex<LogFile>>>,
}

async fn pipe<R: tokio::io::AsyncRead + Unpin>(reader: BufReader<R>, sink: Sink) {
    let mut lines = reader.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(log) = &sink.log {
            log.lock().unwrap_or_else(|p| p.into_inner()).write_line(&line);
        }
        if sink.verbose || is_notable(&line) {
            println!("{}{line}", sink.prefix);
        }
    }
}

/// `program` as the system would find it: a path that exists, or a name on `$PATH`.
fn which(program: &std::path::Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    #[test]
    fn notable_lines_are_warnings_errors_and_panics() {
        assert!(super::is_notable("2026-12-02T02:53:58.123456Z  WARN config has 1 error(s)"));
        assert!(super::is_notable("2026-12-02T02:53:58.123456Z ERROR cannot bind 127.0.0.1:8080"));
        assert!(super::is_notable("thread 'main' panicked at src/main.rs:1:1:"));
        assert!(super::is_notable("error: cannot start x"));
        assert!(!super::is_notable("2026-12-02T02:53:58.123456Z  INFO config loaded"));
        assert!(!super::is_notable(r#"{"method":"GET","path":"/WARN ","response_code":200}"#));
    }
}
