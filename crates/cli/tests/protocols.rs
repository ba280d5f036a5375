//! Protocol behaviour through the proxy: HTTP/1.1 keep-alive and chunked bodies, HTTP/2
//! multiplexing, streamed 100 MB transfers in bounded memory, parity with curl, and malformed
//! requests answered with 4xx while the proxy keeps serving.

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

async fn simple_gateway(protocol: &str) -> (ConfigDir, ProxyProc, u16, Backend) {
    let b = Backend::start("app").await;
    let dir = ConfigDir::new();
    let mut y = gateway("gw", GW);
    y.push_str(&service("app.internal", protocol, &[(b.addr, &[])]));
    y.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - match: [{uri: {prefix: /missing}}]\n    directResponse: {status: 404, body: {string: gone}}\n  - route: [{destination: {host: app.internal}}]\n");
    let cfg = dir.write("mesh.yaml", &y);
    let proxy = ProxyProc::start(&["--role", "gateway", "-c", cfg.to_str().expect("path")]).await;
    let port = proxy.port(GW).await;
    (dir, proxy, port, b)
}

/// Reads one HTTP/1.1 response (head + content-length or chunked body) from a raw stream.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> (u16, String, Vec<u8>) {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 8192];
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "connection closed before a response: {:?}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    buf.drain(..head_end);
    let status: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status");
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if let Some(len) =
        lower.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok())
    {
        while buf.len() < len {
            let mut chunk = [0u8; 8192];
            let n = s.read(&mut chunk).await.expect("read");
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        body = buf.drain(..len).collect();
    } else if lower.contains("transfer-encoding: chunked") {
        loop {
            while !buf.windows(2).any(|w| w == b"\r\n") {
                let mut chunk = [0u8; 8192];
                let n = s.read(&mut chunk).await.expect("read");
                assert!(n > 0);
                buf.extend_from_slice(&chunk[..n]);
            }
            let i = buf.windows(2).position(|w| w == b"\r\n").expect("line");
            let size = usize::from_str_radix(String::from_utf8_lossy(&buf[..i]).trim(), 16).expect("chunk size");
            buf.drain(..i + 2);
            while buf.len() < size + 2 {
                let mut chunk = [0u8; 8192];
                let n = s.read(&mut chunk).await.expect("read");
                assert!(n > 0);
                buf.extend_from_slice(&chunk[..n]);
            }
            body.extend(buf.drain(..size));
            buf.drain(..2);
            if size == 0 {
                break;
            }
        }
    }
    (status, head, body)
}

#[tokio::test]
async fn http1_keep_alive_and_chunked_bodies() {
    let (_d, _p, port, b) = simple_gateway("HTTP").await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let mut buf = Vec::new();
    for i in 0..5 {
        s.write_all(format!("GET /req/{i} HTTP/1.1\r\nHost: app.test\r\n\r\n").as_bytes()).await.expect("write");
        let (status, _, body) = read_response(&mut s, &mut buf).await;
        assert_eq!(status, 200);
        let j: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(j["path"], format!("/req/{i}"));
    }
    // A chunked upload on the same connection, streamed to the backend.
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").await.expect("write");
    let (status, _, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 200);
    let j: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(j["received"], 11);
    // A streamed response without a length arrives chunked.
    s.write_all(b"GET /bytes?n=200000 HTTP/1.1\r\nHost: app.test\r\n\r\n").await.expect("write");
    let (status, head, body) = read_response(&mut s, &mut buf).await;
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    assert_eq!(body.len(), 200_000);
    assert_eq!(
        b.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "upstream connection reused for all 7 requests"
    );
}

#[tokio::test]
async fn http2_carries_100_concurrent_streams_on_one_connection() {
    let (_d, _p, port, b) = simple_gateway("HTTP").await;
    let stream = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, TestBody>(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut s = sender.clone();
        tasks.push(tokio::spawn(async move {
            s.ready().await.expect("ready");
            let req = http::Request::get(format!("http://app.test/slow?ms=1000&i={i}")).body(empty()).expect("req");
            let resp = s.send_request(req).await.expect("response");
            let status = resp.status();
            let _ = resp.into_body().collect().await;
            status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("join"), 200);
    }
    assert_eq!(b.count(), 100);
    assert_eq!(b.peak.load(std::sync::atomic::Ordering::SeqCst), 100, "all 100 streams were in flight at once");
}

#[tokio::test]
async fn streams_100_mb_each_way_in_bounded_memory() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let (_d, proxy, port, _b) = simple_gateway("HTTP").await;
    // Upload: 100 MB generated as it is sent.
    let chunk = Bytes::from(vec![b'u'; 256 * 1024]);
    let frames = futures_util::stream::iter(
        (0..SIZE / chunk.len() as u64)
            .map(move |_| Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(chunk.clone()))),
    );
    let req = http::Request::post(format!("http://127.0.0.1:{port}/upload"))
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .expect("req");
    let r = send(&h1_client(), req).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["received"], SIZE);
    // Download: 100 MB counted as it arrives.
    let resp = h1_client()
        .request(http::Request::get(format!("http://127.0.0.1:{port}/bytes?n={SIZE}")).body(empty()).expect("req"))
        .await
        .expect("resp");
    let mut body = resp.into_body();
    let mut total = 0u64;
    while let Some(f) = body.frame().await {
        if let Some(d) = f.expect("frame").data_ref() {
            total += d.len() as u64;
        }
    }
    assert_eq!(total, SIZE);
    let rss = proxy.peak_rss_kib();
    println!("proxy peak RSS after 2 x 100 MB: {rss} KiB");
    assert!(rss > 0 && rss < 64 * 1024, "peak RSS {rss} KiB must stay under 64 MiB");
}

/// Runs curl off the test's runtime (the backends run on it and must keep serving).
async fn curl(args: &[&str]) -> (u16, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || curl_blocking(&args)).await.expect("curl task")
}

fn curl_blocking(args: &[String]) -> (u16, String, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "-S", "-D", "-", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl must be installed");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

#[tokio::test]
async fn curl_gets_the_same_answers_as_rust_clients() {
    let (_d, _p, port, _b) = simple_gateway("HTTP").await;
    for path in ["/echo?x=1", "/missing/thing", "/status/503"] {
        let url = format!("http://127.0.0.1:{port}{path}");
        let rust_h1 = get(&url, &[]).await;
        let rust_h2 = send(&h2_client(), http::Request::get(&url).body(empty()).expect("req")).await;
        for mode in ["--http1.1", "--http2-prior-knowledge"] {
            let (status, head, body) = curl(&[mode, &url]).await;
            assert_eq!(status, rust_h1.status.as_u16(), "{mode} {path}");
            assert_eq!(status, rust_h2.status.as_u16(), "{mode} {path}");
            if mode == "--http2-prior-knowledge" {
                assert!(head.starts_with("http/2 "), "{head}");
            }
            if path.starts_with("/echo") {
                let j: serde_json::Value = serde_json::from_str(&body).expect("json");
                assert_eq!(j["path"], "/echo");
                assert_eq!(j["query"], "x=1");
                assert_eq!(j["server"], rust_h1.server());
            } else {
                assert_eq!(body, rust_h1.body, "{mode} {path}");
            }
        }
    }
}

#[tokio::test]
async fn malformed_requests_get_4xx_and_the_proxy_keeps_serving() {
    let (_d, _p, port, b) = simple_gateway("HTTP").await;
    let reply = raw_exchange(port, b"THIS IS NOT HTTP\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");

    let big = "a".repeat(70 * 1024);
    let reply =
        raw_exchange(port, format!("GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: {big}\r\n\r\n").as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{}", &reply[..reply.len().min(200)]);

    let reply = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: bad host name\r\nConnection: close\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("x-trellis-response-flags: DPE"), "{reply}");
    assert!(reply.contains("invalid Host header"), "{reply}");

    let reply =
        raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");

    let reply = raw_exchange(port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "missing Host: {reply}");

    // Headers just under the limit are accepted.
    let ok = "a".repeat(60 * 1024);
    let r = get(&format!("http://127.0.0.1:{port}/after"), &[("x-big", &ok)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(b.count(), 1, "none of the bad requests reached the backend");
}

#[tokio::test]
async fn http2_upstreams_are_multiplexed_and_trailers_pass() {
    // A service port declared HTTP2 is spoken to over HTTP/2 whatever the client speaks.
    let (_d, _p, port, b) = simple_gateway("HTTP2").await;
    let c = h1_client();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let c = c.clone();
        let url = format!("http://127.0.0.1:{port}/slow?ms=300");
        tasks.push(tokio::spawn(
            async move { send(&c, http::Request::get(url).body(empty()).expect("req")).await.status },
        ));
    }
    for t in tasks {
        assert_eq!(t.await.expect("join"), 200);
    }
    assert_eq!(b.connections.load(std::sync::atomic::Ordering::SeqCst), 1, "one multiplexed upstream connection");
    let j = get(&format!("http://127.0.0.1:{port}/echo"), &[]).await.json();
    assert_eq!(j["version"], "HTTP/2.0");

    let resp = h2_client()
        .request(http::Request::get(format!("http://127.0.0.1:{port}/trailers")).body(empty()).expect("req"))
        .await
        .expect("resp");
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers.get("x-checksum").map(|v| v.as_bytes()), Some(&b"abc123"[..]));
    assert_eq!(collected.to_bytes(), Bytes::from_static(b"payload"));
}
