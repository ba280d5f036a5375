//! `trellis up` end to end: the shipped examples run as real processes (control plane,
//! sidecars, gateway, demo apps) on 127.0.0.1, each copied to a temporary directory with its
//! gateway moved to a free port so tests can run side by side.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::load::*;
use support::mesh::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_platform_greets_through_every_sidecar() {
    let port = free_port();
    let dir = example("reference-platform", port);
    let up = Up::start(dir.path(), port).await;
    let first = Instant::now();
    let r = get(&up.url("/api/greeting"), &[]).await;
    println!(
        "trellis up → mesh ready after {:?}; first greeting after {:?}",
        up.ready_after,
        up.ready_after + first.elapsed()
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let calls = 5;
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..calls - 1 {
        let r = get(&up.url("/api/greeting"), &[]).await;
        assert_eq!(r.status, 200);
        let list = r.json();
        let services: Vec<&str> =
            list.as_array().expect("array").iter().map(|g| g["service"].as_str().unwrap_or("")).collect();
        assert_eq!(
            services,
            ["Service D", "Service G", "Service H", "Service E", "Service B", "Service C", "Service A"]
        );
        for g in list.as_array().expect("array") {
            assert!(ids.insert(g["id"].as_str().unwrap_or("").to_string()), "fresh uuid per greeting");
            assert_eq!(g["id"].as_str().map(str::len), Some(36));
            assert!(g["created"].as_str().unwrap_or("").ends_with('Z'));
            assert!(g["message"].as_str().unwrap_or("").contains(&g["service"].as_str().unwrap_or("?")[8..]));
        }
    }
    // Every hop crossed the caller's outbound and the callee's inbound proxy: each sidecar
    // counted one inbound request per call, and each caller one outbound request per callee.
    let admins = up.admins();
    let callees = [
        ("service-a", "istio-ingressgateway"),
        ("service-b", "service-a"),
        ("service-c", "service-a"),
        ("service-d", "service-b"),
        ("service-e", "service-b"),
        ("service-g", "service-e"),
        ("service-h", "service-e"),
    ];
    for (callee, caller) in callees {
        let text = metrics(admins[callee]).await;
        let inbound = metric_sum(
            &text,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("destination_workload", callee),
                ("source_workload", caller),
                ("response_code", "200"),
            ],
        );
        assert_eq!(inbound, calls as f64, "{callee} inbound from {caller}:\n{text}");
        let text = metrics(admins[caller]).await;
        let outbound = metric_sum(
            &text,
            "istio_requests_total",
            &[("reporter", "source"), ("source_workload", caller), ("destination_workload", callee)],
        );
        assert_eq!(outbound, calls as f64, "{caller} outbound to {callee}");
    }
    let f = metrics(admins["service-f"]).await;
    assert_eq!(
        metric_sum(&f, "istio_requests_total", &[("reporter", "destination")]),
        0.0,
        "F is not on the HTTP chain"
    );

    // Services reach each other by name: no app is given another workload's port.
    let table = up.output();
    let ports: Vec<String> = table
        .lines()
        .filter(|l| l.starts_with("service-"))
        .flat_map(|l| {
            l.split_whitespace().filter_map(|c| c.rsplit_once(':').map(|(_, p)| p.to_string())).collect::<Vec<_>>()
        })
        .filter(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        .collect();
    let apps: Vec<i32> =
        children_of(up.pid()).into_iter().filter(|p| environ(*p).contains_key("SERVICE_NAME")).collect();
    assert_eq!(apps.len(), 8, "eight app processes");
    for pid in apps {
        let env = environ(pid);
        let me = env.get("PORT").cloned().unwrap_or_default();
        if env["SERVICE_NAME"] == "Service A" {
            assert_eq!(env.get("SERVICE_B_URL").map(String::as_str), Some("http://service-b"));
            assert_eq!(env.get("SERVICE_C_URL").map(String::as_str), Some("http://service-c"));
            assert!(env.get("HTTP_PROXY").is_some_and(|p| p.starts_with("http://127.0.0.1:")));
        }
        for (k, v) in &env {
            if k == "PORT" || k == "HTTP_PROXY" || k == "http_proxy" || k.ends_with("_ADDR") {
                continue;
            }
            for p in &ports {
                if p != &me {
                    assert!(
                        !v.contains(&format!(":{p}")),
                        "{} has another workload's port in {k}={v}",
                        env["SERVICE_NAME"]
                    );
                }
            }
        }
    }
    let status = up.status();
    let proxies = status["proxies"].as_array().expect("proxies");
    assert_eq!(proxies.len(), 10, "8 sidecars, Redis's sidecar and a gateway: {status}");
    assert!(
        proxies.iter().all(|p| p["state"] == "CONNECTED"
            && p["acked"] == p["sent"]
            && !p["acked"].as_str().unwrap_or("").is_empty()),
        "{status}"
    );
}

fn color_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|j| j["color"].as_str().map(String::from))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn color_canary_splits_two_to_one_then_shifts_to_green_without_failures() {
    let port = free_port();
    let dir = example("color-canary", port);
    let up = Up::start(dir.path(), port).await;
    let client = h1_client();
    let mut colors = Vec::new();
    let mut last = serde_json::Value::Null;
    for _ in 0..3000 {
        let r = send(&client, http::Request::get(up.url("/color")).body(empty()).expect("req")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        colors.push(color_of(&r.body));
        last = r.json();
    }
    let share = colors.iter().filter(|c| *c == "green").count() as f64 / 3000.0;
    println!("green share over 3000 requests: {share:.3}");
    assert!((share - 0.33).abs() <= 0.03, "green share {share:.3}");
    // The app's stats are the shares of exactly the last 100 answers this test received.
    let window = trellis_demo::color::STATS_WINDOW;
    let recent_green = colors[colors.len() - window..].iter().filter(|c| *c == "green").count() as f64;
    let expected = (recent_green / window as f64 * 100.0).round() / 100.0;
    assert_eq!(last["of_last"], window, "{last}");
    assert_eq!(last["stats"]["green"].as_f64().unwrap_or(0.0), expected, "{last}");

    // Shift to 100% green under 200 req/s and on two keep-alive connections.
    let g0 = up.generation();
    let open = Load::open_loop(&up.url("/color"), 200, 800);
    let conns = Load::per_connection(&up.url("/color"), 2, 300, Duration::from_millis(10));
    open.wait_received(100, Duration::from_secs(20)).await;
    conns.wait_received(20, Duration::from_secs(20)).await;
    let shifted = std::fs::read_to_string(dir.path().join("steps/all-green.yaml")).expect("step");
    let edited = Instant::now();
    dir.write("colorteller-route.yaml", &shifted);
    let (g1, applied) = up.wait_served(g0, Duration::from_secs(10)).await;
    println!("generation {g0} -> {g1} served by every proxy {:?} after the edit", edited.elapsed());
    let mut samples = open.finish().await;
    samples.extend(conns.finish().await);
    samples.sort_by_key(|s| s.sent);
    let failed: Vec<_> = samples.iter().filter(|s| s.status != 200).collect();
    assert!(failed.is_empty(), "failed requests: {:?}", &failed[..failed.len().min(5)]);
    let is_green = |b: &str| color_of(b) == "green";
    let after = assert_new_after(&samples, applied, is_green);
    assert!(after > 0, "no request was sent after the shift was served");
    let before = samples.iter().filter(|s| s.sent < edited && color_of(&s.body) == "blue").count();
    assert!(before > 0, "the 2:1 split served blue before the edit");
    println!("{} requests: {before} blue before the edit, all {after} sent after it was served green", samples.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dj_canary_rolls_out_in_three_steps_without_failures() {
    let port = free_port();
    let dir = example("dj-canary", port);
    let up = Up::start(dir.path(), port).await;
    let step = |name: &str| std::fs::read_to_string(dir.path().join("steps").join(name)).expect("step");
    let load = Load::open_loop(&up.url("/metal"), 100, 900);
    // Each phase lasts until 150 more answers came back, counted from the moment its config
    // was served by every proxy.
    load.wait_received(150, Duration::from_secs(30)).await;
    let g0 = up.generation();
    let write50 = Instant::now();
    dir.write("metal-route.yaml", &step("metal-50.yaml"));
    let (g1, served50) = up.wait_served(g0, Duration::from_secs(10)).await;
    load.wait_received(load.received() + 150, Duration::from_secs(30)).await;
    let write100 = Instant::now();
    dir.write("metal-route.yaml", &step("metal-100.yaml"));
    let (_, served100) = up.wait_served(g1, Duration::from_secs(10)).await;
    load.wait_received(load.received() + 150, Duration::from_secs(30)).await;
    let samples = load.finish().await;
    let failed: Vec<_> = samples.iter().filter(|s| s.status != 200).collect();
    assert!(failed.is_empty(), "failed requests: {:?}", &failed[..failed.len().min(5)]);
    let v2 = |s: &&Sample| s.body.contains("Los Angeles");
    let share = |from: Instant, to: Instant| {
        let in_phase: Vec<_> = samples.iter().filter(|s| s.sent >= from && s.sent < to).collect();
        (in_phase.iter().filter(|s| v2(s)).count() as f64 / in_phase.len().max(1) as f64, in_phase.len())
    };
    let start = samples.first().map(|s| s.sent).expect("samples");
    let end = Instant::now();
    let ((p10, n10), (p50, n50), (p100, n100)) =
        (share(start, write50), share(served50, write100), share(served100, end));
    println!("metal v2 share: {p10:.2} of {n10} → {p50:.2} of {n50} → {p100:.2} of {n100}");
    assert!(n10 >= 100 && n50 >= 100 && n100 >= 100, "each phase saw traffic");
    assert!(p10 < 0.3 && p10 > 0.0, "10% step: {p10}");
    assert!((0.3..0.7).contains(&p50), "50% step: {p50}");
    assert_eq!(p100, 1.0, "100% step: every request sent after it was served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_edit_is_reported_and_traffic_keeps_flowing() {
    let port = free_port();
    let dir = example("color-canary", port);
    let up = Up::start(dir.path(), port).await;
    let loader = Load::open_loop(&up.url("/color"), 100, 300);
    loader.wait_received(50, Duration::from_secs(20)).await;
    let bad = std::fs::read_to_string(dir.path().join("colorteller-route.yaml"))
        .expect("read")
        .replace("weight: 33", "weight: 3");
    let file = dir.write("colorteller-route.yaml", &bad);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let s = up.status();
        if !s["config_error"].as_str().unwrap_or("").is_empty() {
            break s;
        }
        assert!(Instant::now() < deadline, "no config error reported:\n{}", up.output());
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval of a wait on the status
    };
    let reported = Instant::now();
    let finding = status["config_findings"][0].as_str().unwrap_or("").to_string();
    let line = bad.lines().position(|l| l.trim() == "- route:").expect("route line") + 1;
    assert!(finding.contains("TRL0102") && finding.contains(&format!("{}:{line}:", file.display())), "{finding}");
    let samples = loader.finish().await;
    assert!(samples.iter().all(|s| s.status == 200), "traffic kept flowing");
    assert!(samples.iter().any(|s| s.sent > reported), "traffic continued after the rejection");
    assert!(up.output().contains("TRL0102"), "the control plane logs the finding");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_and_sidecar_deaths_are_survived() {
    let port = free_port();
    let dir = example("reference-platform", port);
    let up = Up::start(dir.path(), port).await;
    let versions = |s: &serde_json::Value| -> BTreeMap<String, String> {
        s["proxies"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| (p["proxy"].as_str().unwrap_or("").to_string(), p["acked"].as_str().unwrap_or("").to_string()))
            .collect()
    };
    let before = versions(&up.status());

    // Kill the control plane while traffic flows: no request fails; it is restarted and every
    // proxy re-syncs at the same version.
    let cp_pid = children_of(up.pid())
        .into_iter()
        .find(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default().contains("control"))
        .expect("control plane process");
    let loader = Load::open_loop(&up.url("/api/greeting"), 50, 200);
    loader.wait_received(20, Duration::from_secs(20)).await;
    let killed_at = Instant::now();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(cp_pid), nix::sys::signal::Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new(trellis_bin())
            .args(["status", "-o", "json", "--control-plane", &up.cp.to_string()])
            .output()
            .expect("status");
        if let Ok(s) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            let all = s["proxies"]
                .as_array()
                .map(|a| a.len() == before.len() && a.iter().all(|p| p["state"] == "CONNECTED"))
                .unwrap_or(false);
            if all && versions(&s) == before {
                break;
            }
        }
        assert!(Instant::now() < deadline, "proxies did not re-sync:\n{}", up.output());
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval of a wait on the status
    }
    println!("all proxies re-synced {:?} after the control plane was killed", killed_at.elapsed());
    let samples = loader.finish().await;
    assert!(samples.iter().all(|s| s.status == 200), "no failed request while the control plane was down");

    // Kill one sidecar: `trellis up` restarts it and its workload's traffic resumes.
    let sidecar = children_of(up.pid())
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .replace('\0', " ")
                .contains("--workload service-c ")
        })
        .expect("service-c sidecar");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(sidecar), nix::sys::signal::Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if get(&up.url("/api/greeting"), &[]).await.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "traffic did not resume:\n{}", up.output());
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval of a wait on an answer
    }
    assert!(up.output().contains("service-c-proxy exited"), "the restart is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_completes_in_flight_requests_and_leaves_no_process() {
    let port = free_port();
    let dir = example("reference-platform", port);
    // A workload that ignores SIGTERM must not outlive `trellis up` either.
    dir.write(
        "stubborn.yaml",
        "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: stubborn\n  labels: {app: stubborn}\nspec:\n  command: [python3, -c, \"import os,signal,socket,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); s=socket.socket(); s.bind(('127.0.0.1', int(os.environ['PORT']))); s.listen(); time.sleep(600)\"]\n", // the app idles, deaf to SIGTERM
    );
    let mut up = Up::start(dir.path(), port).await;
    let children = children_of(up.pid());
    assert!(children.len() >= 19, "control plane, 9 sidecars, gateway, 9 apps: {children:?}");
    let gateway_admin = up.admins()["istio-ingressgateway"];
    let slow: Vec<_> = (0..10)
        .map(|_| {
            let url = up.url("/api/greeting?sleep_ms=1500");
            tokio::spawn(async move { get(&url, &[]).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric_sum(&metrics(gateway_admin).await, "trellis_proxy_connections_open", &[]) < 10.0 {
        assert!(Instant::now() < deadline, "requests did not reach the gateway");
        tokio::time::sleep(Duration::from_millis(10)).await; // poll interval of a wait on a metric
    }
    let t = Instant::now();
    up.interrupt();
    for s in slow {
        let r = s.await.expect("join");
        assert_eq!(r.status, 200, "in-flight request completed: {}", r.body);
        assert_eq!(r.json().as_array().map(Vec::len), Some(7));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(Some(status)) = up.child.try_wait() {
            assert!(status.success(), "{}", up.output());
            break;
        }
        assert!(Instant::now() < deadline, "trellis up did not stop within 5 s:\n{}", up.output());
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on the exit
    }
    println!("stopped {:?} after Ctrl-C", t.elapsed());
    let alive: Vec<i32> = children
        .iter()
        .copied()
        .filter(|p| {
            Path::new(&format!("/proc/{p}")).exists()
                && !std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default().contains(") Z ")
        })
        .collect();
    assert!(alive.is_empty(), "processes left behind: {alive:?}");
}

/// Chaos in the reference platform: one of Service E's two replicas is killed (and restarted by
/// `trellis up`) every 5 s for 60 s under 100 requests a second; retries (on another endpoint)
/// and outlier detection keep the platform answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platform_keeps_answering_while_service_e_is_killed_every_5_seconds() {
    let port = free_port();
    let dir = example("reference-platform", port);
    dir.write(
        "chaos.yaml",
        r#"apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata:
  name: service-e-2
  labels: {app: service-e, version: v1}
spec:
  command: [trellis-demo, reference]
  env: {SERVICE_NAME: Service E, REPLICA: "2"}
  upstreams: [service-g, service-h]
  readinessProbe:
    httpGet: {path: /api/health}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: service-e}
spec:
  hosts: [service-e]
  http:
  - route: [{destination: {host: service-e}}]
    retries: {attempts: 3, retryOn: "5xx,connect-failure,reset"}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: service-e}
spec:
  host: service-e
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 2s, maxEjectionPercent: 50}
"#,
    );
    let up = Up::start(dir.path(), port).await;
    let replica_one = || {
        children_of(up.pid()).into_iter().find(|p| {
            let env = environ(*p);
            let cmd = std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default();
            cmd.contains("trellis-demo")
                && env.get("SERVICE_NAME").map(String::as_str) == Some("Service E")
                && !env.contains_key("REPLICA")
        })
    };
    // 100 requests a second for as long as the chaos runs (12 kills, 5 s apart, each after
    // the restart of the one before; `trellis up` backs off restarting a crashing process).
    let loader = Load::open_loop(&up.url("/api/greeting"), 100, 30_000);
    let started = Instant::now();
    loader.wait_received(100, Duration::from_secs(20)).await;
    let (mut kills, mut last) = (0, None);
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_secs(5)).await; // the chaos schedule: a kill every 5 s
                                                          // The replica `trellis up` restarted since the last kill (waited for, if not yet back).
        let deadline = Instant::now() + Duration::from_secs(20);
        let pid = loop {
            match replica_one() {
                Some(p) if Some(p) != last => break p,
                _ => {
                    assert!(Instant::now() < deadline, "Service E was not restarted:\n{}", up.output());
                    tokio::time::sleep(Duration::from_millis(50)).await; // poll interval of a wait on the restart
                }
            }
        };
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        (kills, last) = (kills + 1, Some(pid));
    }
    tokio::time::sleep(Duration::from_secs(5)).await; // the chaos schedule: 5 s after the last kill
    loader.stop();
    let chaos = started.elapsed();
    let samples = loader.finish().await;
    let ok = samples.iter().filter(|s| s.status == 200).count();
    let share = ok as f64 / samples.len() as f64 * 100.0;
    let m = metrics(up.admins()["service-b"]).await;
    let retries = metric_sum(&m, "trellis_proxy_upstream_retries_total", &[("outcome", "sent")]);
    let ejections = metric_sum(&m, "trellis_proxy_outlier_ejections_total", &[]);
    println!(
        "{ok}/{} answered ({share:.2}%) over {chaos:?} while Service E was killed {kills} times; service-b's sidecar retried {retries} times and ejected {ejections} times",
        samples.len()
    );
    assert!(chaos >= Duration::from_secs(60), "the chaos lasted {chaos:?}");
    assert_eq!(kills, 12, "the chaos ran");
    assert!(share >= 99.0, "{share:.2}% answered, under 99%");
    assert!(retries > 0.0, "the retries did the work");
}
