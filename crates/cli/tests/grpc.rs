//! gRPC end to end: unary, client-, server- and bidirectional streaming with status trailers,
//! through a gateway and through an outbound → inbound sidecar pair; a tonic client and a Python
//! grpcio client against the Rust server.

mod support;

use std::net::SocketAddr;

use tokio_stream::StreamExt;
use trellis_demo::echo::{EchoClient, EchoRequest};

use support::*;

async fn echo_server(name: &str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let name = name.to_string();
    tokio::spawn(async move { trellis_demo::echo::serve(listener, &name).await });
    addr
}

fn echo_service(host: &str, endpoint: SocketAddr) -> String {
    service(host, "GRPC", &[(endpoint, &[])])
}

fn req(message: &str) -> EchoRequest {
    EchoRequest { message: message.into(), count: 0, fail_code: 0 }
}

/// Every call shape, checked against a channel to `target`.
async fn exercise(target: String, expect_server: &str) {
    let mut c = EchoClient::connect(target).await.expect("connect");
    let r = c.unary(req("hi")).await.expect("unary").into_inner();
    assert_eq!((r.message.as_str(), r.server.as_str()), ("hi", expect_server));

    let mut stream = c
        .server_stream(EchoRequest { message: "s".into(), count: 7, fail_code: 0 })
        .await
        .expect("server stream")
        .into_inner();
    let mut n = 0;
    while let Some(r) = stream.next().await {
        assert_eq!(r.expect("item").index, n);
        n += 1;
    }
    assert_eq!(n, 7);

    let r = c
        .client_stream(tokio_stream::iter((0..5).map(|i| req(&format!("c{i}")))))
        .await
        .expect("client stream")
        .into_inner();
    assert_eq!((r.message.as_str(), r.index), ("c0,c1,c2,c3,c4", 5));

    // Bidirectional: each reply comes back before the next request is sent.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = c.bidi(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("bidi").into_inner();
    for i in 0..20 {
        tx.send(req(&format!("b{i}"))).await.expect("send");
        let r = replies.next().await.expect("reply").expect("ok");
        assert_eq!((r.message, r.index), (format!("b{i}"), i));
    }
    drop(tx);
    assert!(replies.next().await.is_none(), "stream ends with OK trailers");

    // A failing call: status code and message travel in trailers.
    let err = c.unary(EchoRequest { message: "boom".into(), count: 0, fail_code: 5 }).await.expect_err("must fail");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(err.message(), "failed on request: boom");
}

async fn grpc_gateway(endpoint: SocketAddr) -> (ConfigDir, ProxyProc, u16) {
    let dir = ConfigDir::new();
    let mut y = gateway("gw", GW);
    y.push_str(&echo_service("echo.internal", endpoint));
    y.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: echo}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - match: [{uri: {prefix: /trellis.demo.v1.Echo/}}]\n    route: [{destination: {host: echo.internal}}]\n");
    let cfg = dir.write("mesh.yaml", &y);
    let proxy = ProxyProc::start(&["--role", "gateway", "-c", cfg.to_str().expect("path")]).await;
    let port = proxy.port(GW).await;
    (dir, proxy, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_through_a_gateway() {
    let server = echo_server("echo-1").await;
    let (_d, _p, port) = grpc_gateway(server).await;
    exercise(format!("http://127.0.0.1:{port}"), "echo-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_through_outbound_and_inbound_sidecars() {
    let app = echo_server("echo-app").await;
    let dir = ConfigDir::new();
    // The service's only endpoint is the server sidecar's inbound port: the app port is never
    // named in config, so a successful call crossed both proxies. The server's sidecar starts
    // first on a port of its choosing (its own config names no endpoint yet).
    let placeholder: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let server_cfg = dir.write("server.yaml", &echo_service("echo", placeholder));
    let server_side = ProxyProc::start(&[
        "--role",
        "sidecar",
        "--workload",
        "echo",
        "-c",
        server_cfg.to_str().expect("path"),
        "--inbound",
        &format!("127.0.0.1:0=127.0.0.1:{}", app.port()),
    ])
    .await;
    let in_addr = server_side.listener("inbound-0").await;
    let cfg = dir.write("mesh.yaml", &echo_service("echo", in_addr));
    let client_side = ProxyProc::start(&[
        "--role",
        "sidecar",
        "--workload",
        "client",
        "-c",
        cfg.to_str().expect("path"),
        "--upstream",
        "127.0.0.1:0=echo:80",
    ])
    .await;
    let upstream = client_side.listener("upstream-0").await;
    exercise(format!("http://{upstream}"), "echo-app").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_interoperates() {
    let server = echo_server("echo-py").await;
    let (_d, _p, port) = grpc_gateway(server).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/grpc/echo_client.py");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3").arg(script).arg(format!("127.0.0.1:{port}")).output().expect("python3")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "python grpcio client failed (install it with `pip install grpcio`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(j["unary"]["message"], "hello from python");
    assert_eq!(j["unary"]["server"], "echo-py");
    let bidi = j["bidi"].as_array().expect("bidi");
    assert_eq!(bidi.len(), 10);
    assert_eq!(bidi[9]["message"], "m9");
    assert_eq!(bidi[9]["index"], 9);
    assert_eq!(j["server_stream"].as_array().map(Vec::len), Some(5));
    assert_eq!(j["error"]["code"], "NOT_FOUND");
    assert_eq!(j["error"]["details"], "failed on request: fail please");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unavailable_is_retried_on_another_endpoint_for_a_grpcio_client() {
    let good = echo_server("echo-good").await;
    let bad = Backend::start("unavailable").await;
    bad.fail(1014); // every call: UNAVAILABLE
    let calls = |port: u16| {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/grpc/echo_client.py");
        let out = std::process::Command::new("python3")
            .arg(script)
            .args([format!("127.0.0.1:{port}"), "unary".into(), "100".into()])
            .output()
            .expect("python3");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        j["codes"].clone()
    };
    for (retries, expect_all_ok) in [("{attempts: 2, retryOn: unavailable}", true), ("{attempts: 0}", false)] {
        let dir = ConfigDir::new();
        let mut y = gateway("gw", GW);
        y.push_str(&service("echo.internal", "GRPC", &[(good, &[]), (bad.addr, &[])]));
        y.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: echo}}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route: [{{destination: {{host: echo.internal}}}}]\n    retries: {retries}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: echo}}\nspec:\n  host: echo.internal\n  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}\n"
        ));
        let cfg = dir.write("mesh.yaml", &y);
        let proxy = ProxyProc::start(&["--role", "gateway", "-c", cfg.to_str().expect("path")]).await;
        let port = proxy.port(GW).await;
        let before = bad.count();
        let codes = tokio::task::spawn_blocking(move || calls(port)).await.expect("client");
        let hit_bad = bad.count() - before;
        println!("retries {retries}: {codes}; the failing endpoint got {hit_bad} calls");
        assert!(hit_bad >= 30, "round robin sent calls to the failing endpoint: {hit_bad}");
        if expect_all_ok {
            assert_eq!(codes, serde_json::json!({"OK": 100}), "every UNAVAILABLE was retried on the other endpoint");
        } else {
            assert_eq!(
                codes["UNAVAILABLE"].as_u64(),
                Some(hit_bad as u64),
                "without retries the client sees them: {codes}"
            );
        }
    }
}
