//! Live reload and drain: a valid change applies under load with no failed request, an invalid
//! one is rejected with its finding while the last good config keeps serving, and
//! `/quitquitquit` lets in-flight requests finish.

mod support;

use std::time::{Duration, Instant};

use support::load::*;
use support::*;

fn split_config(port: u16, v1: &Backend, v2: &Backend, w1: u32, w2: u32) -> String {
    let mut y = gateway("gw", port);
    y.push_str(&service(
        "color.internal",
        "HTTP",
        &[(v1.addr, &[("version", "blue")]), (v2.addr, &[("version", "green")])],
    ));
    y.push_str(&format!(
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: color}}
spec:
  host: color.internal
  subsets:
  - {{name: blue, labels: {{version: blue}}}}
  - {{name: green, labels: {{version: green}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: color}}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - route:
    - destination: {{host: color.internal, subset: blue}}
      weight: {w1}
    - destination: {{host: color.internal, subset: green}}
      weight: {w2}
"#
    ));
    y
}

fn server_is(name: &'static str) -> impl Fn(&str) -> bool {
    move |body: &str| body.contains(&format!("\"server\":\"{name}\""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_change_applies_under_load_with_zero_failures() {
    let (blue, green) = (Backend::start("blue").await, Backend::start("green").await);
    let dir = ConfigDir::new();
    let cfg = dir.write("mesh.yaml", &split_config(GW, &blue, &green, 100, 0));
    let proxy = ProxyProc::start(&["--role", "gateway", "-c", cfg.to_str().expect("path")]).await;
    let port = proxy.port(GW).await;
    let v0 = proxy.version().await;

    // 200 requests/s from a client population, plus 4 keep-alive connections in sequence.
    let url = format!("http://127.0.0.1:{port}/color");
    let open = Load::open_loop(&url, 200, 1000);
    let conns = Load::per_connection(&url, 4, 300, Duration::from_millis(10));
    open.wait_received(200, Duration::from_secs(20)).await;
    conns.wait_received(40, Duration::from_secs(20)).await;
    let changed_at = Instant::now();
    dir.write("mesh.yaml", &split_config(GW, &blue, &green, 0, 100));
    let v1 = proxy.wait_version_change(&v0, Duration::from_secs(5)).await;
    let applied = Instant::now();
    println!("config {v0} -> {v1} reported {:?} after the write", changed_at.elapsed());
    let mut samples = open.finish().await;
    samples.extend(conns.finish().await);
    samples.sort_by_key(|s| s.sent);

    let after = assert_new_after(&samples, applied, server_is("green"));
    let (old, new) = assert_atomic_switch(&samples, server_is("blue"), server_is("green"));
    println!(
        "{} requests: {old} blue then {new} green; {after} sent after the new version was reported",
        samples.len()
    );
    assert!(old >= 200 && after > 0, "the change happened under load: {old} before, {after} after");
    assert!(samples.len() >= 1000, "only {} requests completed", samples.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_change_is_rejected_and_traffic_keeps_flowing() {
    let (blue, green) = (Backend::start("blue").await, Backend::start("green").await);
    let dir = ConfigDir::new();
    let cfg = dir.write("mesh.yaml", &split_config(GW, &blue, &green, 100, 0));
    let proxy = ProxyProc::start(&["--role", "gateway", "-c", cfg.to_str().expect("path")]).await;
    let port = proxy.port(GW).await;
    let v0 = proxy.version().await;

    let url = format!("http://127.0.0.1:{port}/color");
    let loader = Load::open_loop(&url, 200, 600);
    loader.wait_received(100, Duration::from_secs(20)).await;
    // Weights summing to 90: rejected with TRL0102 at the `route` line.
    dir.write("mesh.yaml", &split_config(GW, &blue, &green, 50, 40));
    let deadline = Instant::now() + Duration::from_secs(5);
    let rejection = loop {
        let dump = proxy.config_dump().await;
        if dump["status"]["rejected"].as_u64().unwrap_or(0) > 0 {
            break dump["status"]["last_rejection"].clone();
        }
        assert!(Instant::now() < deadline, "rejection not reported; log:\n{}", proxy.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on /config_dump
    };
    let samples = loader.finish().await;
    assert!(samples.iter().all(|s| s.status == 200 && server_is("blue")(&s.body)), "last good config keeps serving");
    assert_eq!(proxy.version().await, v0);

    let finding = &rejection["findings"][0];
    assert_eq!(finding["code"], "TRL0102");
    assert!(finding["file"].as_str().unwrap_or_default().ends_with("mesh.yaml"));
    let text = std::fs::read_to_string(&cfg).expect("read");
    let route_line = text.lines().position(|l| l.trim() == "- route:").expect("route line") as u64 + 1;
    assert_eq!(finding["line"], route_line);
    let log = proxy.log_text();
    assert!(log.contains("TRL0102") && log.contains("mesh.yaml"), "the rejection is logged with its finding:\n{log}");

    // Fixing the file applies again.
    dir.write("mesh.yaml", &split_config(GW, &blue, &green, 0, 100));
    proxy.wait_version_change(&v0, Duration::from_secs(5)).await;
    assert_eq!(get(&format!("http://127.0.0.1:{port}/"), &[]).await.server(), "green");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_cannot_bind_is_rejected_whole() {
    let (blue, green) = (Backend::start("blue").await, Backend::start("green").await);
    let dir = ConfigDir::new();
    // This test is about binding configured ports, so the proxy binds them as configured.
    let port = free_port();
    let cfg = dir.write("mesh.yaml", &split_config(port, &blue, &green, 100, 0));
    let proxy =
        ProxyProc::start_binding_configured_ports(&["--role", "gateway", "-c", cfg.to_str().expect("path")]).await;
    let v0 = proxy.version().await;
    // Move the gateway to a port another process holds: the new listener cannot bind, so the
    // whole snapshot is rejected and the old listener and weights keep serving.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = holder.local_addr().expect("addr").port();
    let moved = split_config(taken, &blue, &green, 0, 100);
    dir.write("mesh.yaml", &moved);
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.config_dump().await["status"]["rejected"].as_u64().unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "no rejection; log:\n{}", proxy.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on /config_dump
    }
    let dump = proxy.config_dump().await;
    assert!(dump["status"]["last_rejection"]["reason"].as_str().unwrap_or_default().contains("cannot bind"), "{dump}");
    assert_eq!(proxy.version().await, v0);
    assert_eq!(get(&format!("http://127.0.0.1:{port}/"), &[]).await.server(), "blue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quitquitquit_drains_in_flight_requests() {
    let (blue, green) = (Backend::start("blue").await, Backend::start("green").await);
    let dir = ConfigDir::new();
    let cfg = dir.write("mesh.yaml", &split_config(GW, &blue, &green, 100, 0));
    let mut proxy = ProxyProc::start(&["--role", "gateway", "-c", cfg.to_str().expect("path")]).await;
    let port = proxy.port(GW).await;

    let mut slow = Vec::new();
    for i in 0..20 {
        let url = format!("http://127.0.0.1:{port}/slow?ms=1500&i={i}");
        let client = if i % 2 == 0 { h1_client() } else { h2_client() };
        slow.push(tokio::spawn(
            async move { send(&client, http::Request::get(url).body(empty()).expect("req")).await },
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while blue.in_flight.load(std::sync::atomic::Ordering::SeqCst) < 20 {
        assert!(Instant::now() < deadline, "slow requests did not arrive");
        tokio::time::sleep(Duration::from_millis(10)).await; // poll interval of a wait on a counter
    }
    let (code, _) = admin_get(proxy.admin, "/quitquitquit").await.expect("quit");
    assert_eq!(code, 200);
    // Draining: not ready, and new connections are refused.
    let (code, body) = admin_get(proxy.admin, "/ready").await.expect("ready");
    assert_eq!((code, body.trim()), (503, "DRAINING"));
    let refused = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    assert!(refused.is_err(), "listener closed while draining");

    for s in slow {
        let r = s.await.expect("join");
        assert_eq!(r.status, 200, "in-flight request completed: {}", r.body);
        assert_eq!(r.server(), "blue");
    }
    let status = proxy.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "proxy exits 0 after draining; log:\n{}", proxy.log_text());
}
