//! Correctness at the edge, with raw bytes on the wire (what a client library would normalise
//! away): the Host a request is forwarded with, peer metadata kept inside the mesh, redirect
//! authorities, and slow clients.

mod support;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::mesh::metric_sum;
use support::*;

struct Edge {
    _dir: ConfigDir,
    proxy: ProxyProc,
    port: u16,
    outside: Backend,
    inside: Backend,
}

/// A gateway with: `outside.test` → a plain ServiceEntry endpoint (no sidecar); `inside.test`
/// → an endpoint labelled as a mesh workload (Istio's `security.istio.io/tlsMode: istio`,
/// plaintext by DestinationRule);
/// `/old` on any host → a redirect to `/new` without authority; the rest to `outside.test`.
async fn edge(extra_args: &[&str]) -> Edge {
    let outside = Backend::start("outside").await;
    let inside = Backend::start("inside").await;
    let dir = ConfigDir::new();
    let mut y = gateway("gw", GW);
    y.push_str(&service("outside.test", "HTTP", &[(outside.addr, &[])]));
    y.push_str(&service("inside.test", "HTTP", &[(inside.addr, &[("security.istio.io/tlsMode", "istio")])]));
    // The test's backend has no sidecar to terminate mesh mTLS: plaintext to it, as a mesh
    // with mTLS disabled for that host would be.
    y.push_str("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: inside}\nspec:\n  host: inside.test\n  trafficPolicy: {tls: {mode: DISABLE}}\n---\n");
    y.push_str(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - match: [{uri: {exact: /old}}]\n    redirect: {uri: /new}\n  - match: [{uri: {exact: /to-https}}]\n    redirect: {uri: /secure, scheme: https}\n  - match: [{authority: {prefix: inside.test}}]\n    route: [{destination: {host: inside.test}}]\n  - route: [{destination: {host: outside.test}}]\n",
    );
    let cfg = dir.write("edge.yaml", &y);
    let mut args = vec!["--role", "gateway", "-c", cfg.to_str().expect("path")];
    args.extend_from_slice(extra_args);
    let proxy = ProxyProc::start(&args).await;
    let port = proxy.port(GW).await;
    Edge { _dir: dir, proxy, port, outside, inside }
}

/// The JSON body the echo backend returned in `reply`.
fn echoed(reply: &str) -> serde_json::Value {
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("echo JSON ({e}): {reply}"))
}

#[tokio::test]
async fn absolute_form_target_wins_over_a_conflicting_host() {
    let e = edge(&[]).await;
    // RFC 9112 §3.2.2: routed by the target's authority, forwarded with Host generated from it.
    let reply = raw_exchange(
        e.port,
        b"GET http://inside.test/path?q=1 HTTP/1.1\r\nHost: outside.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let j = echoed(&reply);
    assert_eq!(j["server"], "inside", "routed by the absolute-form authority: {j}");
    assert_eq!(j["headers"]["host"], "inside.test", "Host regenerated from the target: {j}");
    assert_eq!(j["path"], "/path");
    assert_eq!(j["query"], "q=1");
    // With a port in the target, Host carries it.
    let reply =
        raw_exchange(e.port, b"GET http://inside.test:80/x HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n")
            .await;
    assert_eq!(echoed(&reply)["headers"]["host"], "inside.test:80", "{reply}");
    // A target with userinfo or without a host is refused by the proxy itself (RFC 9110
    // §4.2.4), not forwarded (found by the request_head fuzz target).
    let reply = raw_exchange(
        e.port,
        b"GET http://user@inside.test/x HTTP/1.1\r\nHost: inside.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400") && reply.contains("x-trellis-response-flags: DPE"), "{reply}");
    assert_eq!((e.outside.count(), e.inside.count()), (0, 2), "nothing went by the received Host, nor with userinfo");
}

#[tokio::test]
async fn http10_without_host_is_forwarded_with_the_destination_host() {
    let e = edge(&[]).await;
    let reply = raw_exchange(e.port, b"GET /ten HTTP/1.0\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"), "{reply}");
    let j = echoed(&reply);
    assert_eq!(j["version"], "HTTP/1.1", "{j}");
    // An HTTP/1.1 request must carry Host (RFC 9112 §3.2): the destination service's.
    assert_eq!(j["headers"]["host"], "outside.test", "{j}");
}

#[tokio::test]
async fn peer_metadata_goes_only_to_mesh_peers() {
    let e = edge(&[]).await;
    let to_outside = raw_exchange(e.port, b"GET /a HTTP/1.1\r\nHost: outside.test\r\nConnection: close\r\n\r\n").await;
    let j = echoed(&to_outside);
    assert_eq!(j["server"], "outside");
    assert!(j["headers"].get("x-trellis-peer").is_none(), "an external service learned the caller: {j}");
    let to_inside = raw_exchange(e.port, b"GET /a HTTP/1.1\r\nHost: inside.test\r\nConnection: close\r\n\r\n").await;
    let j = echoed(&to_inside);
    assert_eq!(j["server"], "inside");
    assert!(j["headers"]["x-trellis-peer"].as_str().is_some_and(|p| !p.is_empty()), "a mesh peer gets it: {j}");
    assert_eq!(e.inside.count(), 1);
}

#[tokio::test]
async fn a_redirect_without_authority_keeps_the_port_unless_the_scheme_changes() {
    let e = edge(&[]).await;
    let host = format!("127.0.0.1:{}", e.port);
    let reply =
        raw_exchange(e.port, format!("GET /old?k=v HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
            .await;
    assert!(reply.starts_with("HTTP/1.1 301"), "{reply}");
    let location = reply
        .lines()
        .find_map(|l| l.strip_prefix("location: ").or_else(|| l.strip_prefix("Location: ")))
        .expect("Location");
    assert_eq!(location, format!("http://{host}/new?k=v"), "{reply}");
    // To another scheme the old port means nothing: https's default applies.
    let reply =
        raw_exchange(e.port, format!("GET /to-https HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
            .await;
    let location = reply.lines().find_map(|l| l.strip_prefix("location: ")).expect("Location");
    assert_eq!(location, "https://127.0.0.1/secure", "{reply}");
    assert_eq!(e.outside.count() + e.inside.count(), 0, "redirects never reach a backend");
}

#[tokio::test]
async fn a_slow_client_is_closed_at_the_header_read_timeout_and_counted() {
    let e = edge(&["--header-read-timeout", "300ms"]).await;
    let before = metric_sum(
        &admin_get(e.proxy.admin, "/metrics").await.expect("metrics").1,
        "trellis_proxy_downstream_header_timeouts_total",
        &[],
    );
    // Half a request head, then nothing: the gateway closes the connection.
    let mut s = TcpStream::connect(("127.0.0.1", e.port)).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: outside.test\r\nX-Slow: ").await.expect("write");
    let started = Instant::now();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the connection was still open after 10 s");
    println!("closed after {:?} (timeout 300 ms)", started.elapsed());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = admin_get(e.proxy.admin, "/metrics").await.expect("metrics").1;
        let now = metric_sum(&text, "trellis_proxy_downstream_header_timeouts_total", &[]);
        if now == before + 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "not counted: {now} (before {before})");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on a metric
    }
    // A client that sends its head in time is served as usual.
    let reply = raw_exchange(e.port, b"GET /ok HTTP/1.1\r\nHost: outside.test\r\nConnection: close\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(e.outside.count(), 1, "the slow request never reached the backend");
}
