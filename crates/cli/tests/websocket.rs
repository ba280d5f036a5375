//! WebSocket (HTTP/1.1 Upgrade) through gateways and sidecars, with a real client and server
//! (Python's `websockets`): the 101 turns both connections into one tunnel. And CONNECT: a
//! tunnel to a TCP server, ended by the gateway when no sidecar is ahead, or forwarded over mTLS
//! and ended by the destination's sidecar.

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use support::mesh::Up;
use support::*;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/ws/ws.py")
}

/// Sends `n` messages over one WebSocket at `url`, checking each echo.
fn echo_through(url: &str, n: usize) {
    let out = Command::new("python3")
        .arg(script())
        .args(["client", url, &n.to_string()])
        .output()
        .expect("python3 (install the websockets package)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("echoed {n}")),
        "{url}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The echo server, on a port of its choosing (killed on drop).
struct Server {
    child: std::process::Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server() -> Server {
    server_in("serve")
}

/// `ws.py <mode>` as a server.
fn server_in(mode: &str) -> Server {
    let mut child = Command::new("python3")
        .arg(script())
        .arg(mode)
        .env_remove("PORT")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().expect("stdout")), &mut line)
        .expect("read port");
    let port = line.trim().strip_prefix("port ").and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{line:?}"));
    Server { child, port }
}

/// Opens a CONNECT tunnel to `target` through the proxy at `proxy` and echoes `n` messages
/// through it (the destination echoes); returns the proxy's answer head.
async fn connect_and_echo(proxy: std::net::SocketAddr, target: &str, n: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await.expect("connect to the proxy");
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.expect("read the head"), 1, "closed before the head ended: {head:?}");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    for i in 0..n {
        let msg = format!("message {i} {}\n", "y".repeat(i % 300));
        s.write_all(msg.as_bytes()).await.expect("write through the tunnel");
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(std::time::Duration::from_secs(10), s.read_exact(&mut back))
            .await
            .expect("echo within 10 s")
            .expect("read through the tunnel");
        assert_eq!(back, msg.as_bytes(), "message {i}");
    }
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_to_a_tcp_server_through_a_gateway() {
    let s = server_in("tcpecho");
    let dir = ConfigDir::new();
    let mut y = gateway("gw", GW);
    y.push_str(&service("tcp.internal", "HTTP", &[(format!("127.0.0.1:{}", s.port).parse().expect("addr"), &[])]));
    y.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - match: [{authority: {prefix: tcp.internal}}]\n    route: [{destination: {host: tcp.internal}}]\n");
    let cfg = dir.write("mesh.yaml", &y);
    let proxy = ProxyProc::start(&["--role", "gateway", "-c", cfg.to_str().expect("path")]).await;
    let port = proxy.port(GW).await;
    let at: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    connect_and_echo(at, "tcp.internal:80", 500).await;
    // A CONNECT to a host no route serves gets 404, and the listener keeps serving.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(at).await.expect("connect");
    c.write_all(b"CONNECT elsewhere.example:443 HTTP/1.1\r\nHost: elsewhere.example:443\r\n\r\n").await.expect("write");
    let mut buf = vec![0u8; 512];
    let n = c.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 404"), "{}", String::from_utf8_lossy(&buf[..n]));
    connect_and_echo(at, "tcp.internal:80", 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_echoes_1000_messages_through_a_gateway() {
    let s = server();
    let dir = ConfigDir::new();
    let mut y = gateway("gw", GW);
    y.push_str(&service("ws.internal", "HTTP", &[(format!("127.0.0.1:{}", s.port).parse().expect("addr"), &[])]));
    y.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route: [{destination: {host: ws.internal}}]\n");
    let cfg = dir.write("mesh.yaml", &y);
    let proxy = ProxyProc::start(&["--role", "gateway", "-c", cfg.to_str().expect("path")]).await;
    let port = proxy.port(GW).await;
    let url = format!("ws://127.0.0.1:{port}/echo");
    tokio::task::spawn_blocking(move || echo_through(&url, 1000)).await.expect("client");
    // The proxy still serves plain requests on the same listener afterwards.
    let r = get(&format!("http://127.0.0.1:{port}/"), &[]).await;
    assert!(r.status.as_u16() < 500, "{}", r.status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_crosses_the_mesh_over_mtls_through_a_gateway_and_two_sidecars() {
    let gw_port = free_port();
    let dir = ConfigDir::new();
    let ws = script();
    dir.write(
        "mesh.yaml",
        &format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: echo}}
spec:
  selector: {{app: echo}}
  ports: [{{name: http, port: 80}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {{name: echo, labels: {{app: echo}}}}
spec:
  command: [python3, {ws}, serve]
---
apiVersion: v1
kind: Service
metadata: {{name: relay}}
spec:
  selector: {{app: relay}}
  ports: [{{name: http, port: 80}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {{name: relay, labels: {{app: relay}}}}
spec:
  command: [python3, {ws}, relay]
  upstreams: [echo]
---
apiVersion: v1
kind: Service
metadata: {{name: caller}}
spec:
  selector: {{app: caller}}
  ports: [{{name: http, port: 80}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {{name: caller, labels: {{app: caller}}}}
spec:
  command: [trellis-demo, colorteller]
  env: {{COLOR: blue}}
  upstreams: [echo]
---
apiVersion: v1
kind: Service
metadata: {{name: tcpecho}}
spec:
  selector: {{app: tcpecho}}
  ports: [{{name: http, port: 80}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {{name: tcpecho, labels: {{app: tcpecho}}}}
spec:
  command: [python3, {ws}, tcpecho]
---
{gateway}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: edge}}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - match: [{{authority: {{prefix: tcpecho}}}}]
    route: [{{destination: {{host: tcpecho}}}}]
  - match: [{{uri: {{prefix: /relay}}}}]
    route: [{{destination: {{host: relay}}}}]
  - route: [{{destination: {{host: echo}}}}]
"#,
            ws = ws.display(),
            gateway = gateway("gw", gw_port),
        ),
    );
    let ca = tempfile::tempdir().expect("ca dir");
    let up = Up::start_with(dir.path(), gw_port, &["--ca-dir", ca.path().to_str().expect("path")]).await;

    // client → gateway → (mTLS) → echo's sidecar → echo
    let url = up.url("/echo").replace("http://", "ws://");
    tokio::task::spawn_blocking(move || echo_through(&url, 1000)).await.expect("client");

    // client → gateway → (mTLS) → relay's sidecar → relay → relay's sidecar → (mTLS) → echo's
    // sidecar → echo: two sidecars in a row, as between any two apps of a mesh
    let url = up.url("/relay").replace("http://", "ws://");
    tokio::task::spawn_blocking(move || echo_through(&url, 1000)).await.expect("client");

    // the caller app's place: its sidecar's port for `echo` → (mTLS) → echo's sidecar → echo
    let out = Command::new(trellis_bin())
        .args(["proxy-config", "caller", "-o", "json", "--control-plane", &up.cp.to_string()])
        .output()
        .expect("proxy-config");
    let snap: serde_json::Value = serde_json::from_slice(&out.stdout).expect("proxy-config json");
    let upstream = snap["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .find(|l| l["name"].as_str().is_some_and(|n| n.starts_with("upstream")))
        .and_then(|l| l["address"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no upstream listener: {snap}"));
    let clusters = snap["clusters"].as_object().cloned().unwrap_or_default();
    assert!(
        clusters
            .values()
            .any(|c| c["service"] == "echo.default.svc.cluster.local" && c["tls"].to_string().contains("istio_mutual")),
        "the caller reaches echo over mesh mTLS: {clusters:?}"
    );
    let url = format!("ws://{upstream}/echo");
    tokio::task::spawn_blocking(move || echo_through(&url, 1000)).await.expect("client");

    // CONNECT: client → gateway → (the CONNECT over mTLS) → tcpecho's sidecar, which ends the
    // tunnel at the app's TCP port.
    let gw: std::net::SocketAddr = format!("127.0.0.1:{gw_port}").parse().expect("addr");
    connect_and_echo(gw, "tcpecho:80", 500).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, log, _) = up.trellis(&["logs", "tcpecho-proxy"]);
        if log.lines().any(|l| l.contains("\"method\":\"CONNECT\"") && l.contains("\"response_code\":200")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the sidecar never logged the CONNECT it ended:\n{log}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await; // access logs are written in batches
    }
    drop(up);
}
