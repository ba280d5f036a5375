//! The backends every scenario calls, in the harness process (pinned with the load generator):
//! an HTTP/1.1 + HTTP/2 server answering 1 KiB, a gRPC echo server, and a trace sink that
//! accepts span exports.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The response body of every HTTP request: 1 KiB.
pub const BODY_BYTES: usize = 1024;

async fn serve(listener: tokio::net::TcpListener, body: Bytes) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req| {
                let b = body.clone();
                async move { Ok::<_, Infallible>(http::Response::new(Full::new(b))) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A listener on loopback, and also on the pod address when the harness runs in its private
/// network namespace (linkerd2-proxy will not connect to loopback endpoints). Returns the
/// loopback address.
async fn bind() -> anyhow::Result<(tokio::net::TcpListener, SocketAddr)> {
    let ip = if crate::linkerd::in_private_netns() { "0.0.0.0" } else { "127.0.0.1" };
    let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
    let addr = SocketAddr::from(([127, 0, 0, 1], listener.local_addr()?.port()));
    Ok((listener, addr))
}

/// An HTTP server (both protocol versions) answering 1 KiB to everything.
pub async fn http() -> anyhow::Result<SocketAddr> {
    let (listener, addr) = bind().await?;
    tokio::spawn(serve(listener, Bytes::from(vec![b'x'; BODY_BYTES])));
    Ok(addr)
}

/// A sink for span exports (OTLP/HTTP): answers 200 to everything.
pub async fn sink() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve(listener, Bytes::new()));
    Ok(addr)
}

/// The gRPC echo service (`trellis.demo.v1.Echo`).
pub async fn grpc() -> anyhow::Result<SocketAddr> {
    let (listener, addr) = bind().await?;
    tokio::spawn(async move { trellis_demo::echo::serve(listener, "bench").await });
    Ok(addr)
}
