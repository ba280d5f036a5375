//! The first five minutes with `trellis up`: a second mesh fails fast and names the first, a
//! Ctrl-C at any moment of start-up (or a SIGKILL) leaves no process and no state behind, the
//! terminal stays quiet while `trellis logs` has everything, `trellis apply` changes a running
//! mesh without touching its files, the control plane admits only proxies with a token it
//! issued, and `| head` never panics.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::mesh::*;
use support::*;

/// Every live (not zombie) process that belongs to the mesh of `trellis up` pid `up`: its
/// children carry `TRELLIS_UP_PID` in their environment.
fn mesh_processes(up: i32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if environ(pid).get("TRELLIS_UP_PID").map(String::as_str) != Some(&up.to_string()) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()).unwrap_or("");
        if !state.is_empty() && state != "Z" && state != "X" {
            let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default().replace('\0', " ");
            out.push((pid, cmd));
        }
    }
    out
}

/// Waits (bounded) until no process of the mesh is alive; returns those still alive.
async fn wait_no_mesh_process(up: i32, within: Duration) -> Vec<(i32, String)> {
    let deadline = Instant::now() + within;
    loop {
        let left = mesh_processes(up);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on /proc
    }
}

fn proxies(status: &serde_json::Value) -> Vec<(String, String, String, String)> {
    let mut v: Vec<_> = status["proxies"]
        .as_array()
        .expect("proxies")
        .iter()
        .map(|p| {
            (
                p["proxy"].as_str().unwrap_or_default().to_string(),
                p["state"].as_str().unwrap_or_default().to_string(),
                p["acked"].as_str().unwrap_or_default().to_string(),
                p["nacked"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Runs `trellis up` to its exit; fails the test if it takes more than `within`.
async fn run_to_exit(mut cmd: Command, within: Duration) -> (std::process::ExitStatus, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            return (status, text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "still running after {within:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await; // poll interval of a wait on the exit
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_mesh_fails_fast_naming_the_port_and_the_running_mesh() {
    let port = free_port();
    let dir = example("color-canary", port);
    let up = Up::start(dir.path(), port).await;
    let before = up.status();
    let first = proxies(&before);
    assert_eq!(first.len(), 4, "{before}");
    assert!(first.iter().all(|p| p.1 == "CONNECTED" && !p.2.is_empty() && p.3.is_empty()), "{first:?}");
    let mesh_dir = up.mesh_dir().expect("state dir printed");

    // The same config, the same state home: refused, naming the running mesh and the ports.
    let mut same = Command::new(trellis_bin());
    same.arg("up").arg(dir.path()).args(["--control-plane", &up.cp.to_string(), "--admin-port-base", "0"]);
    same.env("XDG_STATE_HOME", up.state_home.path());
    let (status, out) = run_to_exit(same, Duration::from_secs(2)).await;
    assert!(!status.success(), "{out}");
    assert!(out.contains("already running"), "{out}");
    assert!(out.contains(&format!("pid {}", up.pid())), "names the running trellis up: {out}");
    assert!(out.contains(&mesh_dir.display().to_string()), "names its state directory: {out}");
    assert!(out.contains(&format!("port {port} ")), "names the gateway port: {out}");
    assert!(out.contains(&format!("kill -INT {}", up.pid())), "says how to stop it: {out}");

    // Another config whose gateway and control plane clash: refused before starting anything.
    let other = example("dj-canary", port);
    let other_home = tempfile::tempdir().expect("home");
    let mut clash = Command::new(trellis_bin());
    clash.arg("up").arg(other.path()).args(["--control-plane", &up.cp.to_string(), "--admin-port-base", "0"]);
    clash.env("XDG_STATE_HOME", other_home.path());
    let (status, out) = run_to_exit(clash, Duration::from_secs(2)).await;
    assert!(!status.success(), "{out}");
    assert!(out.contains(&format!("port {port} (gateway istio-ingressgateway) is in use")), "{out}");
    assert!(out.contains(&format!("port {} (control plane", up.cp.port())), "{out}");
    assert!(out.contains(&format!("part of the mesh of `trellis up` pid {}", up.pid())), "{out}");
    assert!(!out.contains("mesh ready"), "{out}");

    // The first mesh did not notice: same proxies, all connected, same versions, no NACK.
    let after = up.status();
    assert_eq!(proxies(&after), first, "{after}");
    assert_eq!(get(&up.url("/color"), &[]).await.status, 200);
}

/// Start-up moments, each observable: the line printed before any child starts, then the log
/// file each child gets when it is started (control plane, a sidecar, the gateway, the first
/// app, the last app).
const MOMENTS: [&str; 5] = ["state line", "control-plane.log", "service-a-proxy.log", "service-a.log", "service-h.log"];

fn reached(up: &Up, moment: &str) -> bool {
    match moment {
        "state line" => up.mesh_dir().is_some(),
        file => up.mesh_dir().is_some_and(|d| d.join("logs").join(file).exists()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_at_any_moment_of_start_up_stops_everything_and_removes_the_state() {
    let port = free_port();
    let dir = example("reference-platform", port);
    let mut during_start_up = 0;
    for moment in MOMENTS {
        let mut up = Up::spawn(dir.path(), port, &[]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reached(&up, moment) {
            assert!(Instant::now() < deadline, "never reached {moment}:\n{}", up.output());
            assert!(up.child.try_wait().expect("wait").is_none(), "exited early:\n{}", up.output());
            tokio::time::sleep(Duration::from_millis(1)).await; // poll interval of a wait on a file
        }
        up.interrupt();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = up.child.try_wait().expect("wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "trellis up did not stop after SIGINT at {moment}:\n{}", up.output());
            tokio::time::sleep(Duration::from_millis(10)).await; // poll interval of a wait on the exit
        };
        let out = up.output();
        let left = wait_no_mesh_process(up.pid(), Duration::from_secs(1)).await;
        assert!(left.is_empty(), "SIGINT at {moment} left {left:?}\n{out}");
        let mesh = up.mesh_dir().expect("state dir");
        assert!(!mesh.join("run").exists(), "SIGINT at {moment} left {}/run (tokens)", mesh.display());
        assert!(!mesh.join("up.json").exists(), "SIGINT at {moment} left the lock");
        if out.contains("during start-up") {
            during_start_up += 1;
            assert!(!status.success(), "an interrupted start-up exits non-zero:\n{out}");
            assert!(!out.contains("mesh ready"), "{out}");
        }
        println!("SIGINT at {moment}: stopped ({status}); during start-up: {}", out.contains("during start-up"));
    }
    // Every moment but perhaps the last comes before the mesh is ready.
    assert!(during_start_up >= 4, "only {during_start_up} of 5 interrupts came during start-up");

    // SIGKILL, which trellis up cannot catch: its children die with it (PR_SET_PDEATHSIG).
    let up = Up::spawn(dir.path(), port, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reached(&up, "service-d.log") {
        assert!(Instant::now() < deadline, "never started service-d:\n{}", up.output());
        tokio::time::sleep(Duration::from_millis(1)).await; // poll interval of a wait on a file
    }
    let alive = mesh_processes(up.pid()).len();
    assert!(alive >= 10, "control plane, 8 sidecars, gateway and apps expected, saw {alive}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(up.pid()), nix::sys::signal::Signal::SIGKILL).expect("kill");
    let left = wait_no_mesh_process(up.pid(), Duration::from_secs(5)).await;
    assert!(left.is_empty(), "SIGKILL left {left:?}");
    println!("SIGKILL with {alive} processes running: none left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_terminal_full_logs_per_process_and_apply_without_editing_files() {
    let port = free_port();
    let dir = example("color-canary", port);
    let mut up = Up::spawn(dir.path(), port, &[]);
    up.wait_ready().await;
    let r = get(&up.url("/color"), &[("x-test", "quiet")]).await;
    assert_eq!(r.status, 200);
    let access =
        |text: &str| text.lines().any(|l| l.contains("\"path\":\"/color\"") && l.contains("\"response_code\":200"));
    // The gateway's access log line is in its log file, not on the terminal.
    let deadline = Instant::now() + Duration::from_secs(10);
    let logged = loop {
        let (ok, text, err) = up.trellis(&["logs", "istio-ingressgateway"]);
        assert!(ok, "{err}");
        if access(&text) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // access logs are written in batches
    };
    assert!(access(&logged), "no access log line in the gateway's log:\n{logged}");
    assert!(!access(&up.output()), "access logs reached the terminal:\n{}", up.output());
    assert!(!up.output().contains("config loaded"), "info logs reached the terminal:\n{}", up.output());
    assert!(up.output().contains("mesh ready"));
    let (ok, list, _) = up.trellis(&["logs"]);
    assert!(ok && list.contains("control-plane") && list.contains("colorteller-blue-proxy"), "{list}");
    let (ok, cp, _) = up.trellis(&["logs", "control-plane", "--tail", "50"]);
    assert!(ok && cp.contains("config loaded"), "{cp}");
    let (ok, _, err) = up.trellis(&["logs", "no-such-process"]);
    assert!(!ok && err.contains("colorteller-green"), "names what exists: {err}");

    // `trellis apply` shifts the canary to green without editing the config directory.
    let files_before = snapshot_files(dir.path());
    let step = dir.path().join("steps/all-green.yaml");
    let (ok, out, err) = up.trellis(&["apply", "-f", step.to_str().expect("utf-8")]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("VirtualService default/colorteller applied"), "{out}");
    // Applied means served: from the first answer on, every answer is green.
    for _ in 0..30 {
        let r = get(&up.url("/color"), &[]).await;
        assert_eq!(r.json()["color"], "green", "{}", r.body);
    }
    // An applied file with an error is refused with its file:line, and nothing changes. (Files
    // to apply are written outside the mesh's config directory, which the control plane
    // watches: there, they would be config of their own.)
    let scratch = ConfigDir::new();
    let bad = scratch
        .write("bad-step.yaml", &std::fs::read_to_string(&step).expect("step").replace("weight: 100", "weight: 150"));
    let (ok, _, err) = up.trellis(&["apply", "-f", bad.to_str().expect("utf-8")]);
    assert!(!ok && err.contains("bad-step.yaml:") && err.contains("nothing applied"), "{err}");
    std::fs::remove_file(&bad).expect("rm");
    // Undo: apply the original route again.
    let original = dir.path().join("colorteller-route.yaml");
    let (ok, out, err) = up.trellis(&["apply", "-f", original.to_str().expect("utf-8")]);
    assert!(ok, "{out}{err}");
    let mut saw_blue = false;
    for _ in 0..60 {
        saw_blue |= get(&up.url("/color"), &[]).await.json()["color"] == "blue";
    }
    assert!(saw_blue, "the original 2:1 split is back");
    assert_eq!(snapshot_files(dir.path()), files_before, "the config directory is untouched");

    // A change the control plane accepts but proxies cannot build (a CA file that is not on
    // their machine) is NACKed: `apply` names the proxies, what failed, and the file and line of
    // the DestinationRule it came from; the last good config keeps serving.
    let tls = scratch.write(
        "needs-ca.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: colorteller\nspec:\n  host: colorteller\n  trafficPolicy:\n    tls: {mode: SIMPLE, caCertificates: /nonexistent/trellis-ca.pem}\n  subsets:\n  - {name: blue, labels: {version: blue}}\n  - {name: green, labels: {version: green}}\n",
    );
    let (ok, out, err) = up.trellis(&["apply", "-f", tls.to_str().expect("utf-8")]);
    assert!(!ok, "{out}{err}");
    let gateway_nack = err
        .lines()
        .find(|l| l.contains("colorgateway"))
        .unwrap_or_else(|| panic!("the gateway's NACK is named: {err}"));
    assert!(gateway_nack.contains("cluster outbound|"), "{gateway_nack}");
    assert!(gateway_nack.contains("cannot read /nonexistent/trellis-ca.pem"), "{gateway_nack}");
    assert!(gateway_nack.contains("(from DestinationRule default/colorteller at "), "{gateway_nack}");
    assert!(gateway_nack.contains("needs-ca.yaml:5)"), "the line of the rule's spec: {gateway_nack}");
    let status = up.status();
    let gw = status["proxies"]
        .as_array()
        .expect("proxies")
        .iter()
        .find(|p| p["proxy"].as_str().unwrap_or_default().contains("colorgateway"))
        .expect("gateway in status");
    assert!(
        gw["nack_source"].as_str().unwrap_or_default().starts_with("DestinationRule default/colorteller at "),
        "{gw}"
    );
    assert_eq!(get(&up.url("/color"), &[]).await.status, 200, "the last good config serves");
}

fn snapshot_files(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in walk(dir) {
        out.push((e.display().to_string(), std::fs::read_to_string(&e).unwrap_or_default()));
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_admits_only_proxies_with_a_token_it_issued() {
    let port = free_port();
    let dir = example("color-canary", port);
    let up = Up::start(dir.path(), port).await;
    let cp = up.cp.to_string();
    let claim = serde_json::json!({"role": "sidecar", "name": "colorteller-blue", "namespace": "default", "service_account": "colorteller-blue", "labels": {}, "bind_address": "127.0.0.1", "port_map": {}, "inbound": [], "outbound": null, "upstreams": []});
    let no_token = subscribe(&cp, claim.clone(), "").await.expect_err("no token");
    assert_eq!(no_token.code(), tonic::Code::Unauthenticated, "{no_token:?}");
    let wrong = subscribe(&cp, claim.clone(), "0123456789abcdef").await.expect_err("made-up token");
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated, "{wrong:?}");
    // Refused streams neither add nor overwrite an entry: the real colorteller-blue sidecar is
    // still the one connected, with its ACKed version.
    let status = up.status();
    let list = proxies(&status);
    assert_eq!(list.len(), 4, "{status}");
    assert!(list.iter().all(|p| p.1 == "CONNECTED" && p.3.is_empty()), "{list:?}");
    // A proxy with a valid token (the one `trellis up` gave the blue sidecar) is admitted.
    let blue = up
        .admins()
        .get("colorteller-blue")
        .copied()
        .and_then(|admin: SocketAddr| {
            children_of(up.pid()).into_iter().find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .unwrap_or_default()
                    .contains(&format!("\0{admin}\0"))
            })
        })
        .expect("blue sidecar process");
    let token = environ(blue).get("TRELLIS_BOOTSTRAP_TOKEN").cloned().expect("token in its environment");
    subscribe(&cp, claim, &token).await.expect("a valid token is admitted");

    // `trellis status | head -1` and friends end quietly when the reader goes away.
    closed_pipe_exit(&["status", "--control-plane", &cp]);
    closed_pipe_exit(&["proxy-config", "colorteller-blue", "--control-plane", &cp]);
    closed_pipe_exit(&["analyze", dir.path().to_str().expect("utf-8")]);
    closed_pipe_exit(&["--help"]);
}

/// Runs `trellis ARGS` with its stdout's reader gone before it writes (as `| head -1` once
/// head has its line): it must end quietly with 0, as `ls | head` does.
fn closed_pipe_exit(args: &[&str]) {
    let mut child =
        Command::new(trellis_bin()).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{args:?}: {err}");
    assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optional_workload_whose_program_is_not_installed_is_left_out_saying_so() {
    let dir = ConfigDir::new();
    dir.write(
        "mesh.yaml",
        "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {name: app, labels: {app: app}}\nspec:\n  command: [trellis-demo, colorteller]\n  env: {COLOR: blue}\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {name: extra, labels: {app: extra}}\nspec:\n  command: [trellis-no-such-program, --port, \"$(PORT)\"]\n  optional: true\n",
    );
    let up = Up::start_with(dir.path(), free_port(), &[]).await;
    assert!(
        up.output().contains("trellis-no-such-program is not installed: workload extra is optional and left out"),
        "{}",
        up.output()
    );
    let status = up.status();
    let names: Vec<&str> =
        status["proxies"].as_array().expect("proxies").iter().filter_map(|p| p["workload"].as_str()).collect();
    assert_eq!(names, ["app"], "{status}");
}
