//! The console, through real browsers: headless Chromium (Debian's `chromium`) and Firefox
//! (Debian's `firefox-esr`, over WebDriver BiDi) driven by `playwright-core`
//! (`tests/console/driver.mjs`, installed by `scripts/test.sh`), against meshes under load.
//! Screenshots of every view are kept in `target/tmp/console/` (Firefox's in
//! `target/tmp/console/firefox/`) as the run's artifacts.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::load::Load;
use support::mesh::{example, Up};
use support::*;

fn driver_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console")
}

/// A browser the console is tested in: its name for the driver, the variable naming its
/// executable, the Debian package's executable, and where its screenshots go under
/// `target/tmp/console/`.
#[derive(Clone, Copy)]
enum Browser {
    Chromium,
    Firefox,
}

impl Browser {
    fn driver_name(self) -> &'static str {
        match self {
            Browser::Chromium => "chromium",
            Browser::Firefox => "firefox",
        }
    }

    /// (the driver's variable, the executable): `CHROMIUM` / `FIREFOX` from the environment, or
    /// the Debian package's path.
    fn executable(self) -> (&'static str, String) {
        let (var, default) = match self {
            Browser::Chromium => ("CHROMIUM", "/usr/bin/chromium"),
            Browser::Firefox => ("FIREFOX", "/usr/bin/firefox-esr"),
        };
        (var, std::env::var(var).unwrap_or_else(|_| default.into()))
    }

    fn shots_dir(self) -> PathBuf {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console");
        let d = match self {
            Browser::Chromium => base,
            Browser::Firefox => base.join("firefox"),
        };
        std::fs::create_dir_all(&d).expect("screenshots dir");
        d
    }
}

/// Runs `node driver.mjs SCENARIO` in Chromium against the console at `console` and returns the
/// JSON it prints; a scenario that fails (its wait timed out, an assertion in the page failed)
/// fails the test with the driver's output.
async fn drive(console: SocketAddr, scenario: &str, env: &[(&str, String)]) -> serde_json::Value {
    drive_in(Browser::Chromium, console, scenario, env).await
}

/// [`drive`], in the browser given.
async fn drive_in(browser: Browser, console: SocketAddr, scenario: &str, env: &[(&str, String)]) -> serde_json::Value {
    assert!(
        driver_dir().join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed in {}: run scripts/test.sh (it runs `npm ci` there)",
        driver_dir().display()
    );
    let (var, exe) = browser.executable();
    assert!(
        Path::new(&exe).is_file(),
        "{exe} is missing: set {var}, or install the Debian package (scripts/test.sh does)"
    );
    let mut cmd = Command::new("node");
    cmd.arg(driver_dir().join("driver.mjs"))
        .arg(scenario)
        .env("CONSOLE_URL", format!("http://{console}"))
        .env("SHOTS_DIR", browser.shots_dir())
        .env("BROWSER", browser.driver_name())
        .env(var, exe);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run node")).await.expect("driver");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "driver {scenario} failed:\n{stdout}\n{stderr}");
    let last = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or("{}");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("driver {scenario} printed no JSON ({e}):\n{stdout}"))
}

async fn api(console: SocketAddr, path: &str) -> serde_json::Value {
    let r = get(&format!("http://{console}{path}"), &[]).await;
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    r.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_graph_shows_the_reference_platform_and_every_view_renders() {
    let port = free_port();
    let console: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let dir = example("reference-platform", port);
    let up = Up::start_with(dir.path(), port, &["--console", &console.to_string()]).await;
    let load = Load::open_loop(&up.url("/api/greeting"), 20, 2400);
    load.wait_received(40, Duration::from_secs(30)).await;

    let nodes = [
        "istio-ingressgateway",
        "service-a",
        "service-b",
        "service-c",
        "service-d",
        "service-e",
        "service-f",
        "service-g",
        "service-h",
    ];
    let graph = drive(console, "graph", &[("EXPECT_NODES", nodes.join(","))]).await;
    let edges = graph["edges"].as_array().cloned().unwrap_or_default();
    let has = |from: &str, to: &str| {
        edges.iter().any(|e| e["source"] == from && e["target"] == to && e["rps"].as_f64().unwrap_or(0.0) > 0.0)
    };
    for (from, to) in [("istio-ingressgateway", "service-a")].into_iter().chain(support::mesh::REFERENCE_CALLS) {
        assert!(has(from, to), "the graph shows {from} → {to} with a non-zero rate: {graph:#}");
    }
    // Service F only consumes from Redis: its edge is TCP, with bytes flowing.
    let api_graph = api(console, "/api/graph").await;
    let tcp = api_graph["edges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["protocol"] == "tcp" && e["bytes_per_second"].as_f64().unwrap_or(0.0) > 0.0)
        .count();
    assert!(tcp >= 1, "TCP edges to redis carry bytes: {api_graph:#}");
    assert!(
        api_graph["edges"].as_array().into_iter().flatten().any(|e| e["mtls"] == true),
        "mTLS is shown on the mesh's edges"
    );

    let views = drive(console, "views", &[]).await;
    println!("views: {views}");
    load.stop();
    let samples = load.finish().await;
    assert!(samples.iter().all(|s| s.status == 200), "every request under the console's watch succeeded");
    let status = api(console, "/api/status").await;
    for s in status["stores"].as_array().expect("stores") {
        assert!(s["bytes"].as_u64() <= s["limit_bytes"].as_u64(), "{s} within its bound");
    }
    drop(up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_canary_shows_as_edge_shares() {
    let port = free_port();
    let console: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let dir = example("color-canary", port);
    let route = dir.path().join("colorteller-route.yaml");
    let text = std::fs::read_to_string(&route).expect("route");
    std::fs::write(&route, text.replace("weight: 67", "weight: 90").replace("weight: 33", "weight: 10"))
        .expect("write");
    let up = Up::start_with(dir.path(), port, &["--console", &console.to_string()]).await;
    let load = Load::open_loop(&up.url("/color"), 50, 3000);
    // Enough requests that a ±5-point band is several standard deviations wide (n ≈ 800).
    load.wait_received(800, Duration::from_secs(60)).await;
    let graph = drive(
        console,
        "graph",
        &[
            ("EXPECT_NODES", "colorgateway,colorteller-blue,colorteller-green".into()),
            ("CANARY_SOURCE", "colorgateway".into()),
            ("CANARY_TARGET", "colorteller".into()),
            ("SHOT_NAME", "canary".into()),
        ],
    )
    .await;
    load.stop();
    let _ = load.finish().await;
    let canary = graph["canary"].as_array().cloned().unwrap_or_default();
    let share = |version: &str| {
        canary
            .iter()
            .find(|c| c["version"] == version)
            .and_then(|c| c["share"].as_f64())
            .unwrap_or_else(|| panic!("no {version} edge: {graph:#}"))
    };
    let (blue, green) = (share("blue"), share("green"));
    println!("canary edges as the console shows them: blue {blue:.3}, green {green:.3}");
    assert!((blue - 0.9).abs() <= 0.05, "blue's share {blue} is 90 ± 5 points");
    assert!((green - 0.1).abs() <= 0.05, "green's share {green} is 10 ± 5 points");
    drop(up);
}

/// `examples/slow-fast` with its console, under load: `/fast` at 20 requests a second and `/slow`
/// at 1, until three slow requests have come back.
struct SlowFast {
    console: SocketAddr,
    up: Up,
    fast: Load,
    slow: Load,
    _dir: ConfigDir,
}

async fn slow_fast() -> SlowFast {
    let port = free_port();
    let console: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let dir = example("slow-fast", port);
    let up = Up::start_with(dir.path(), port, &["--console", &console.to_string()]).await;
    let fast = Load::open_loop(&up.url("/fast"), 20, 1200);
    let slow = Load::open_loop(&up.url("/slow"), 1, 40);
    slow.wait_received(3, Duration::from_secs(30)).await;
    SlowFast { console, up, fast, slow, _dir: dir }
}

/// The `slow` scenario's variables: frontend → business-logic, down to `data_transformation`.
fn slow_walk() -> Vec<(&'static str, String)> {
    vec![
        ("EDGE_SOURCE", "frontend".into()),
        ("EDGE_TARGET", "business-logic".into()),
        ("SPAN_NAME", "data_transformation".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_the_slow_edge_to_the_slowest_trace_its_longest_span_and_its_log_line_in_three_clicks() {
    let SlowFast { console, up, fast, slow, _dir } = slow_fast().await;
    let r = drive(console, "slow", &slow_walk()).await;
    fast.stop();
    slow.stop();
    let _ = (fast.finish().await, slow.finish().await);
    println!("{r:#}");
    assert_eq!(r["clicks"], 3, "three clicks from the edge to the log line");
    assert!(r["trace_duration_ms"].as_f64().unwrap_or(0.0) >= 3000.0, "the slowest trace is a slow one");
    let span = &r["longest_span"];
    let lines = r["log_lines"].as_array().cloned().unwrap_or_default();
    assert!(!lines.is_empty(), "the longest span's access-log line is shown");
    assert!(
        lines.iter().all(|l| l["span_id"] == span["span_id"] || l["span_id"] == r["logged_span_id"]),
        "the lines shown are the span's own: {r:#}"
    );
    assert!(lines.iter().any(|l| l["path"] == "/slow"), "the line is the slow request's");
    // The trace holds the app's own `data_transformation` span, ~3 s long.
    let trace = api(console, &format!("/api/traces/{}", r["trace_id"].as_str().expect("trace id"))).await;
    let dt = trace["spans"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == "data_transformation")
        .unwrap_or_else(|| panic!("no data_transformation span in {trace:#}"));
    assert!(dt["duration_us"].as_u64().unwrap_or(0) >= 2_900_000, "{dt}");
    drop(up);
}

/// The same walk in Firefox (Debian's `firefox-esr`, the stock browser over WebDriver BiDi): the
/// slow edge to its log line in three clicks, then every view, each rendered and screenshotted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_view_and_the_three_clicks_work_in_firefox() {
    // Screenshots of an earlier run must not stand in for this one's.
    let _ = std::fs::remove_dir_all(Browser::Firefox.shots_dir());
    let SlowFast { console, up, fast, slow, _dir } = slow_fast().await;
    let r = drive_in(Browser::Firefox, console, "slow", &slow_walk()).await;
    println!("{r:#}");
    assert!(r["browser"].as_str().unwrap_or("").starts_with("firefox "), "driven in Firefox: {r}");
    assert_eq!(r["clicks"], 3, "three clicks from the edge to the log line");
    assert!(r["trace_duration_ms"].as_f64().unwrap_or(0.0) >= 3000.0, "the slowest trace is a slow one");
    let lines = r["log_lines"].as_array().cloned().unwrap_or_default();
    assert!(lines.iter().any(|l| l["path"] == "/slow"), "the slow request's line is shown: {r:#}");

    let views = drive_in(Browser::Firefox, console, "views", &[]).await;
    println!("views: {views}");
    for (what, n) in [("span attributes", "span_attributes"), ("rps points", "rps_points"), ("resources", "resources")]
    {
        assert!(views[n].as_u64().unwrap_or(0) > 0, "Firefox shows {what}: {views}");
    }
    fast.stop();
    slow.stop();
    let (fast, _) = (fast.finish().await, slow.finish().await);
    assert!(fast.iter().all(|s| s.status == 200), "every request under the console's watch succeeded");
    for shot in ["slow-1.png", "slow-2.png", "slow-3.png", "traces.png", "trace.png", "metrics.png", "config.png"] {
        let path = Browser::Firefox.shots_dir().join(shot);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        assert!(size > 10_000, "{} is a rendered page ({size} bytes)", path.display());
    }
    drop(up);
}

/// A control plane with the console, run alone (so a proxy killed stays down until the test
/// starts it again).
struct Control {
    child: std::process::Child,
    console: SocketAddr,
    cp: SocketAddr,
    _ca: tempfile::TempDir,
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn control(config: &Path) -> Control {
    let ca = tempfile::tempdir().expect("ca dir");
    let cp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let console: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let child = Command::new(trellis_bin())
        .args(["control", "--listen", &cp.to_string(), "--console", &console.to_string(), "-c"])
        .arg(config)
        .arg("--ca-dir")
        .arg(ca.path())
        .spawn()
        .expect("spawn trellis control");
    let c = Control { child, console, cp, _ca: ca };
    let deadline = Instant::now() + Duration::from_secs(20);
    while try_get(&format!("http://{console}/healthz")).await != Ok(200) {
        assert!(Instant::now() < deadline, "the console did not start");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on /healthz
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_edit_is_a_finding_until_fixed_and_a_killed_proxy_shows_disconnected_then_synced() {
    let dir = ConfigDir::new();
    let good = format!(
        "{}apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: web\nspec:\n  hosts: [web.example.com]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: web\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route:\n    - destination: {{host: web.example.com}}\n",
        gateway("gw", GW)
    );
    let vs = dir.write("route.yaml", &good);
    let c = control(dir.path()).await;
    let cp = c.cp.to_string();
    let mut proxy =
        support::ProxyProc::start(&["--role", "gateway", "--control-plane", &cp, "--workload", "edge-gw"]).await;
    let proxy_env = |state: &str| vec![("PROXY_NAME", "edge-gw".to_string()), ("EXPECT_STATE", state.to_string())];
    let synced = drive(c.console, "proxy", &proxy_env("synced")).await;
    println!("synced: {synced}");

    // An invalid edit (a negative weight), made by the driver once the page shows the config:
    // the finding, with its file and line, shows within 2 s; the fix clears it within 2 s.
    let scratch = tempfile::tempdir().expect("scratch");
    let bad = scratch.path().join("bad.yaml");
    std::fs::write(
        &bad,
        good.replace(
            "- destination: {host: web.example.com}",
            "- destination: {host: web.example.com}\n      weight: -5",
        ),
    )
    .expect("bad edit");
    let fixed = scratch.path().join("good.yaml");
    std::fs::write(&fixed, &good).expect("fix");
    let edit = |from: &Path, present: &str| {
        vec![
            ("EXPECT_FILE", "route.yaml".to_string()),
            ("EXPECT_PRESENT", present.to_string()),
            ("EDIT_FILE", vs.display().to_string()),
            ("EDIT_FROM", from.display().to_string()),
            ("TIMEOUT_MS", "2000".to_string()),
        ]
    };
    let found = drive(c.console, "finding", &edit(&bad, "1")).await;
    println!("finding shown {} ms after the edit: {found}", found["elapsed_ms"]);
    assert!(found["line"].as_u64().unwrap_or(0) > 0, "the finding has a line: {found}");
    let cleared = drive(c.console, "finding", &edit(&fixed, "0")).await;
    println!("finding gone {} ms after the fix: {cleared}", cleared["elapsed_ms"]);

    // A proxy killed: disconnected within 5 s (of the kill: the browser's start is counted);
    // started again: synced.
    let _ = proxy.child.kill();
    let _ = proxy.child.wait();
    let killed = Instant::now();
    let gone =
        drive(c.console, "proxy", &[proxy_env("disconnected"), vec![("TIMEOUT_MS", "5000".into())]].concat()).await;
    println!("shown disconnected {:?} after the kill: {gone}", killed.elapsed());
    proxy = support::ProxyProc::start(&["--role", "gateway", "--control-plane", &cp, "--workload", "edge-gw"]).await;
    let back = drive(c.console, "proxy", &proxy_env("synced")).await;
    println!("synced again: {back}");
    drop(proxy);
}
