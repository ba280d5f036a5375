//! A mesh's state directory, and finding out who holds a port.
//!
//! Each `trellis up` owns one directory, by default
//! `$XDG_STATE_HOME/trellis/meshes/<config dir>-<hash>` (so the same config always maps to the
//! same directory, and a second `trellis up` of it is refused):
//!
//! ```text
//! up.json      who runs the mesh (pid, config, control plane, ports); locked while it runs
//! run/         tokens, the generated WorkloadEntries, `trellis apply`'s files; removed on stop
//! logs/NAME.log  each process's full output; kept after stop, truncated by the next start
//! ```
//!
//! The lock is an advisory `flock` on `up.json`, held by the `trellis up` process itself: the
//! kernel releases it when that process dies, however it dies, so a SIGKILLed mesh never
//! leaves a directory that looks busy.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Environment variable every child of `trellis up` gets: the mesh directory it belongs to
/// (how a port's owner is traced back to its mesh).
pub const MESH_DIR_ENV: &str = "TRELLIS_MESH_DIR";
/// Environment variable every child gets: the pid of its `trellis up`.
pub const UP_PID_ENV: &str = "TRELLIS_UP_PID";

/// `$XDG_STATE_HOME/trellis` (`~/.local/state/trellis`).
pub fn state_base() -> PathBuf {
    std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from(".trellis-state"))
        .join("trellis")
}

/// Where the meshes' directories live.
pub fn meshes_dir() -> PathBuf {
    state_base().join("meshes")
}

/// The directory of the mesh run from `paths`: named after the first path, with a hash of
/// all of them (canonical) so two configs with the same folder name do not collide.
pub fn default_mesh_dir(paths: &[PathBuf]) -> PathBuf {
    let canonical: Vec<PathBuf> = paths.iter().map(|p| p.canonicalize().unwrap_or_else(|_| p.clone())).collect();
    let first = canonical
        .first()
        .and_then(|p| if p.is_dir() { p.file_name() } else { p.file_stem() })
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "mesh".into());
    let name: String =
        first.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect();
    let name = match name.trim_matches('-') {
        "" => "mesh",
        n => n,
    };
    // FNV-1a: stable across runs and builds (std's hasher is not).
    let mut h: u64 = 0xcbf29ce484222325;
    for p in &canonical {
        for b in p.as_os_str().as_encoded_bytes().iter().chain([&0u8]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    meshes_dir().join(format!("{name}-{:08x}", h as u32))
}

/// What `up.json` says about a running mesh.
#[derive(Clone, Debug, PartialEq)]
pub struct UpInfo {
    pub pid: u32,
    pub dir: PathBuf,
    pub paths: Vec<String>,
    pub control_plane: String,
    /// `(port, what binds it)`.
    pub ports: Vec<(u16, String)>,
}

impl UpInfo {
    fn to_json(&self) -> String {
        let ports: Vec<serde_json::Value> =
            self.ports.iter().map(|(p, what)| serde_json::json!({"port": p, "what": what})).collect();
        serde_json::json!({
            "pid": self.pid,
            "dir": self.dir,
            "paths": self.paths,
            "control_plane": self.control_plane,
            "ports": ports,
        })
        .to_string()
    }

    fn from_json(text: &str) -> Option<UpInfo> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        Some(UpInfo {
            pid: v["pid"].as_u64()? as u32,
            dir: PathBuf::from(v["dir"].as_str()?),
            paths: v["paths"].as_array()?.iter().filter_map(|p| p.as_str().map(String::from)).collect(),
            control_plane: v["control_plane"].as_str().unwrap_or_default().to_string(),
            ports: v["ports"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| Some((p["port"].as_u64()? as u16, p["what"].as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// How a person stops this mesh.
    pub fn how_to_stop(&self) -> String {
        format!("press Ctrl-C in its terminal, or run `kill -INT {}`", self.pid)
    }
}

/// A claimed mesh directory: `up.json` locked by this process until [`MeshDir::release`] (or
/// until the process dies).
pub struct MeshDir {
    pub root: PathBuf,
    lock: File,
}

/// Why a directory could not be claimed.
#[derive(Debug)]
pub enum ClaimError {
    /// Another live `trellis up` holds it.
    Busy(Option<UpInfo>),
    Io(std::io::Error),
}

impl MeshDir {
    /// Takes `root` for this process: fails with [`ClaimError::Busy`] when another `trellis up`
    /// holds it. Clears what a previous run left in `run/` and truncates nothing else yet.
    pub fn claim(root: &Path) -> Result<MeshDir, ClaimError> {
        std::fs::create_dir_all(root).map_err(ClaimError::Io)?;
        let info_path = root.join("up.json");
        let mut lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&info_path)
            .map_err(ClaimError::Io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = lock.read_to_string(&mut text);
                return Err(ClaimError::Busy(UpInfo::from_json(&text)));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(ClaimError::Io(e)),
        }
        let run = root.join("run");
        if run.exists() {
            std::fs::remove_dir_all(&run).map_err(ClaimError::Io)?;
        }
        std::fs::create_dir_all(run.join("applied")).map_err(ClaimError::Io)?;
        std::fs::create_dir_all(root.join("logs")).map_err(ClaimError::Io)?;
        set_private(&run);
        Ok(MeshDir { root: root.to_path_buf(), lock })
    }

    /// Records who runs the mesh (read by a second `trellis up`, `trellis logs`, `trellis apply`).
    pub fn write_info(&mut self, info: &UpInfo) -> std::io::Result<()> {
        self.lock.set_len(0)?;
        self.lock.rewind()?;
        self.lock.write_all(info.to_json().as_bytes())?;
        self.lock.flush()
    }

    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// Files `trellis apply` adds on top of the config (read in name order, later ones win).
    pub fn applied_dir(&self) -> PathBuf {
        applied_dir(&self.root)
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// Removes `run/` and `up.json` (the logs stay), then lets the lock go.
    pub fn release(self) {
        let _ = std::fs::remove_dir_all(self.run_dir());
        let _ = std::fs::remove_file(self.root.join("up.json"));
        drop(self.lock);
    }
}

pub fn applied_dir(root: &Path) -> PathBuf {
    root.join("run/applied")
}

fn set_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
}

/// The mesh running from `root`, if its `trellis up` is alive (holds the lock).
pub fn running(root: &Path) -> Option<UpInfo> {
    let mut f = File::open(root.join("up.json")).ok()?;
    match f.try_lock_shared() {
        Ok(()) => None,
        Err(_) => {
            let mut text = String::new();
            f.read_to_string(&mut text).ok()?;
            UpInfo::from_json(&text)
        }
    }
}

/// Every mesh directory under [`meshes_dir`], with its `trellis up` when running; most
/// recently used first.
pub fn meshes() -> Vec<(PathBuf, Option<UpInfo>)> {
    let mut out: Vec<(std::time::SystemTime, PathBuf, Option<UpInfo>)> = Vec::new();
    for e in std::fs::read_dir(meshes_dir()).into_iter().flatten().flatten() {
        let dir = e.path();
        if !dir.is_dir() {
            continue;
        }
        let used =
            std::fs::metadata(dir.join("logs")).and_then(|m| m.modified()).unwrap_or(std::time::SystemTime::UNIX_EPOCH);
        let info = running(&dir);
        out.push((used, dir, info));
    }
    out.sort_by_key(|m| std::cmp::Reverse(m.0));
    out.into_iter().map(|(_, d, i)| (d, i)).collect()
}

/// Picks the mesh a command means: `explicit` if given; else the one running mesh; else (when
/// none runs and `stopped_ok`) the most recently used one.
pub fn pick_mesh(explicit: Option<&Path>, stopped_ok: bool) -> Result<(PathBuf, Option<UpInfo>), String> {
    if let Some(d) = explicit {
        let d = if d.join("up.json").exists() || d.join("logs").is_dir() {
            d.to_path_buf()
        } else if d.exists() {
            // A config directory: the mesh it would run as.
            default_mesh_dir(&[d.to_path_buf()])
        } else {
            return Err(format!("{}: no such mesh or config directory", d.display()));
        };
        let info = running(&d);
        return Ok((d, info));
    }
    let all = meshes();
    let live: Vec<_> = all.iter().filter(|(_, i)| i.is_some()).cloned().collect();
    match live.len() {
        1 => return Ok(live[0].clone()),
        0 => {}
        _ => {
            let list: Vec<String> = live
                .iter()
                .map(|(d, i)| format!("  {} (trellis up pid {})", d.display(), i.as_ref().map(|i| i.pid).unwrap_or(0)))
                .collect();
            return Err(format!("{} meshes are running; say which with --mesh:\n{}", live.len(), list.join("\n")));
        }
    }
    if stopped_ok {
        if let Some(m) = all.into_iter().next() {
            return Ok(m);
        }
    }
    Err(format!("no mesh is running (mesh directories live in {})", meshes_dir().display()))
}

/// A process listening on a TCP port, and the mesh it belongs to.
#[derive(Clone, Debug)]
pub struct PortOwner {
    pub pid: u32,
    pub command: String,
    /// `(trellis up pid, mesh directory)` when the process is part of a `trellis up` mesh.
    pub mesh: Option<(u32, PathBuf)>,
}

impl std::fmt::Display for PortOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.command)?;
        if let Some((up, dir)) = &self.mesh {
            write!(f, ", part of the mesh of `trellis up` pid {up} ({})", dir.display())?;
        }
        Ok(())
    }
}

/// Whether `addr` can be bound now.
pub fn port_free(addr: SocketAddr) -> bool {
    std::net::TcpListener::bind(addr).is_ok()
}

/// Who listens on TCP `port` (any address), from /proc: the socket's inode in /proc/net/tcp*,
/// then the process holding it. `None` when it is not visible (another user's process).
pub fn port_owner(port: u16) -> Option<PortOwner> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... inode (column 9); st 0A = LISTEN.
            let (Some(local), Some(state), Some(inode)) = (cols.get(1), cols.get(3), cols.get(9)) else { continue };
            let lport = local.rsplit(':').next().and_then(|h| u16::from_str_radix(h, 16).ok());
            if lport == Some(port) && *state == "0A" {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                return Some(describe(pid));
            }
        }
    }
    None
}

fn describe(pid: u32) -> PortOwner {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let command: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .take(4)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let var = |name: &str| {
        env.split(|b| *b == 0).find_map(|kv| {
            let kv = std::str::from_utf8(kv).ok()?;
            kv.strip_prefix(name)?.strip_prefix('=').map(String::from)
        })
    };
    let mesh = match (var(UP_PID_ENV).and_then(|p| p.parse().ok()), var(MESH_DIR_ENV)) {
        (Some(up), Some(dir)) => Some((up, PathBuf::from(dir))),
        _ => None,
    };
    PortOwner { pid, command: command.join(" "), mesh }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_round_trips_and_lock_marks_a_mesh_running() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("m");
        let mut dir = MeshDir::claim(&root).expect("claim");
        let info = UpInfo {
            pid: std::process::id(),
            dir: root.clone(),
            paths: vec!["examples/x".into()],
            control_plane: "127.0.0.1:1".into(),
            ports: vec![(8080, "gateway".into())],
        };
        dir.write_info(&info).expect("write");
        assert_eq!(running(&root), Some(info.clone()));
        match MeshDir::claim(&root) {
            Err(ClaimError::Busy(Some(i))) => assert_eq!(i, info),
            other => panic!("second claim: {:?}", other.err()),
        }
        assert!(dir.run_dir().is_dir());
        let run = dir.run_dir();
        dir.release();
        assert!(!run.exists(), "run/ is removed on release");
        assert_eq!(running(&root), None);
        MeshDir::claim(&root).expect("free again after release");
    }

    #[test]
    fn same_paths_same_directory_other_paths_other() {
        let a = default_mesh_dir(&[PathBuf::from("/tmp/x/color-canary")]);
        assert_eq!(a, default_mesh_dir(&[PathBuf::from("/tmp/x/color-canary")]));
        assert_ne!(a, default_mesh_dir(&[PathBuf::from("/tmp/y/color-canary")]));
        assert!(a.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("color-canary-")));
    }

    #[test]
    fn finds_the_owner_of_a_listening_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let owner = port_owner(port).expect("owner visible");
        assert_eq!(owner.pid, std::process::id());
        assert!(!port_free(l.local_addr().expect("addr")));
    }
}
