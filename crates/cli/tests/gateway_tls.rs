//! TLS at the gateway, with real clients (curl, openssl s_client): Gateway `HTTPS` servers with
//! two hostnames and two certificates on one port (SNI), MUTUAL refusing a client without a
//! certificate, a certificate replaced on disk served to new connections while an open one
//! continues, TLS 1.3 with ALPN, `credentialName` from a credentials directory, and
//! `httpsRedirect`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

const HTTPS: u16 = 8443;

struct Ca {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pem: String,
}

impl Ca {
    fn new() -> Ca {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "trellis test CA");
        let pem = params.self_signed(&key).expect("ca").pem();
        Ca { params, key, pem }
    }

    /// A certificate for `names` (server) or a client certificate, as (cert PEM, key PEM, DER).
    fn issue(&self, names: &[&str], client: bool) -> (String, String, Vec<u8>) {
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &issuer).expect("sign");
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    // Written aside and renamed: a reader never sees half a file.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, &p).expect("rename");
    p
}

fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl").args(["-sS", "--max-time", "10"]).args(args).output().expect("curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The DER of the certificate a TLS server presents for `sni`, over a fresh connection.
async fn presented(
    port: u16,
    sni: &str,
    ca_pem: &str,
) -> (Vec<u8>, tokio_rustls::client::TlsStream<tokio::net::TcpStream>) {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile_certs(ca_pem) {
        roots.add(c).expect("root");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.expect("handshake");
    let der = tls.get_ref().1.peer_certificates().expect("certs")[0].to_vec();
    (der, tls)
}

fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).map(|c| c.expect("pem")).collect()
}

/// One HTTP/1.1 request on an open TLS connection: the status line.
async fn request_on(tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>, host: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(format!("GET /still-open HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tls.read(&mut buf).await.expect("read");
    String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_servers_by_sni_mutual_tls_certificate_reload_and_https_redirect() {
    let backend = Backend::start("app").await;
    let dir = ConfigDir::new();
    let ca = Ca::new();
    let (a_cert, a_key, a_der) = ca.issue(&["a.example.test"], false);
    let (b_cert, b_key, _) = ca.issue(&["b.example.test"], false);
    let (c_cert, c_key, c_der) = ca.issue(&["c.example.test"], false);
    let (client_cert, client_key, _) = ca.issue(&["client.example.test"], true);
    let (other_cert, other_key, _) = ca.issue(&["intruder.example.test"], true);
    let d = dir.path();
    let ca_file = write(d, "ca.pem", &ca.pem);
    let a_files = (write(d, "a.crt", &a_cert), write(d, "a.key", &a_key));
    let b_files = (write(d, "b.crt", &b_cert), write(d, "b.key", &b_key));
    let client = (write(d, "client.crt", &client_cert), write(d, "client.key", &client_key));
    let other = (write(d, "other.crt", &other_cert), write(d, "other.key", &other_key));
    // c.example.test's certificate is a `credentialName`, in the credentials directory.
    let creds = tempfile::tempdir().expect("credentials dir");
    std::fs::create_dir(creds.path().join("c-cert")).expect("mkdir");
    write(&creds.path().join("c-cert"), "tls.crt", &c_cert);
    write(&creds.path().join("c-cert"), "tls.key", &c_key);

    let p = |f: &PathBuf| f.display().to_string();
    let mut y = service("app.internal", "HTTP", &[(backend.addr, &[])]);
    y.push_str(&format!(
        r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {GW}, name: http, protocol: HTTP}}
    hosts: [a.example.test]
    tls: {{httpsRedirect: true}}
  - port: {{number: {HTTPS}, name: https-a, protocol: HTTPS}}
    hosts: [a.example.test]
    tls: {{mode: SIMPLE, serverCertificate: {a_cert}, privateKey: {a_key}, minProtocolVersion: TLSV1_2}}
  - port: {{number: {HTTPS}, name: https-b, protocol: HTTPS}}
    hosts: [b.example.test]
    tls: {{mode: MUTUAL, serverCertificate: {b_cert}, privateKey: {b_key}, caCertificates: {ca}, subjectAltNames: [client.example.test]}}
  - port: {{number: {HTTPS}, name: https-c, protocol: HTTPS}}
    hosts: [c.example.test]
    tls: {{mode: SIMPLE, credentialName: c-cert}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: vs}}
spec:
  hosts: [a.example.test, b.example.test, c.example.test]
  gateways: [gw]
  http:
  - route: [{{destination: {{host: app.internal}}}}]
"#,
        a_cert = p(&a_files.0),
        a_key = p(&a_files.1),
        b_cert = p(&b_files.0),
        b_key = p(&b_files.1),
        ca = p(&ca_file),
    ));
    let cfg = dir.write("mesh.yaml", &y);
    let analyzed = Command::new(trellis_bin()).arg("analyze").arg(&cfg).output().expect("analyze");
    let text = String::from_utf8_lossy(&analyzed.stdout);
    assert!(analyzed.status.success() && !text.contains("TRL0005"), "HTTPS servers are enforced: {text}");
    let proxy = ProxyProc::start(&[
        "--role",
        "gateway",
        "-c",
        cfg.to_str().expect("path"),
        "--credentials-dir",
        creds.path().to_str().expect("path"),
    ])
    .await;
    let port = proxy.port(HTTPS).await;
    let url = |host: &str| format!("https://{host}:{port}/hello");
    let resolve = |host: &str| format!("{host}:{port}:127.0.0.1");
    let cacert = p(&ca_file);

    // SIMPLE, two names and two certificates on one port: curl verifies each against its name.
    for host in ["a.example.test", "c.example.test"] {
        let (ok, body, err) = curl(&["--cacert", &cacert, "--resolve", &resolve(host), &url(host)]);
        assert!(ok, "{host}: {err}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("backend json");
        assert_eq!(v["headers"]["x-forwarded-proto"], "https", "{body}");
    }
    assert_eq!(presented(port, "c.example.test", &ca.pem).await.0, c_der, "credentialName's certificate for its name");

    // MUTUAL: no client certificate, no connection; with one signed by the CA, served.
    let (ok, _, err) = curl(&["--cacert", &cacert, "--resolve", &resolve("b.example.test"), &url("b.example.test")]);
    assert!(!ok, "MUTUAL without a client certificate must fail: {err}");
    let (ok, _, err) = curl(&[
        "--cacert",
        &cacert,
        "--cert",
        &p(&client.0),
        "--key",
        &p(&client.1),
        "--resolve",
        &resolve("b.example.test"),
        &url("b.example.test"),
    ]);
    assert!(ok, "MUTUAL with a client certificate: {err}");
    // Signed by the CA but not one of subjectAltNames: refused.
    let (ok, _, _) = curl(&[
        "--cacert",
        &cacert,
        "--cert",
        &p(&other.0),
        "--key",
        &p(&other.1),
        "--resolve",
        &resolve("b.example.test"),
        &url("b.example.test"),
    ]);
    assert!(!ok, "a client certificate outside subjectAltNames must be refused");

    // TLS 1.3 and ALPN, as openssl s_client sees them.
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", "a.example.test"])
        .args(["-alpn", "h2,http/1.1", "-CAfile", &cacert])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("TLSv1.3"), "{text}");
    assert!(text.contains("ALPN protocol: h2") || text.contains("ALPN protocol:h2"), "{text}");

    // The certificate renewed on disk: an open connection continues, new ones get it within 2 s.
    let (first, mut open) = presented(port, "a.example.test", &ca.pem).await;
    assert_eq!(first, a_der);
    let (a2_cert, a2_key, a2_der) = ca.issue(&["a.example.test"], false);
    write(d, "a.key", &a2_key);
    write(d, "a.crt", &a2_cert);
    let changed = Instant::now();
    loop {
        let (now, _) = presented(port, "a.example.test", &ca.pem).await;
        if now == a2_der {
            break;
        }
        assert!(changed.elapsed() < Duration::from_secs(2), "the renewed certificate not served within 2 s");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval of a wait on the served certificate
    }
    assert_eq!(request_on(&mut open, "a.example.test").await, "HTTP/1.1 200 OK", "the open connection continues");

    // httpsRedirect on the plain HTTP server.
    let http_port = proxy.port(GW).await;
    let (ok, out, err) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        "-H",
        "Host: a.example.test",
        &format!("http://127.0.0.1:{http_port}/path?q=1"),
    ]);
    assert!(ok, "{err}");
    assert_eq!(out, "301 https://a.example.test/path?q=1");
}

/// An HTTPS server (its own certificate) answering every request with `name`.
async fn tls_backend(name: &'static str, cert_pem: &str, key_pem: &str) -> std::net::SocketAddr {
    tls_server(cert_pem, key_pem, move |_, _| name.to_string()).await
}

/// An HTTPS server (HTTP/1.1 over TLS with its own certificate) answering every request with
/// `respond(the SNI the client sent, the request)`.
async fn tls_server(
    cert_pem: &str,
    key_pem: &str,
    respond: impl Fn(&str, &http::Request<hyper::body::Incoming>) -> String + Send + Sync + Copy + 'static,
) -> std::net::SocketAddr {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls_pemfile_certs(cert_pem);
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else { continue };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else { return };
                let sni = tls.get_ref().1.server_name().unwrap_or("-").to_string();
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let body = respond(&sni, &req);
                    async move { Ok::<_, std::convert::Infallible>(http::Response::new(full(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passthrough_routes_by_sni_and_tcp_servers_route_by_port() {
    const TLS: u16 = 9443;
    const TCP: u16 = 9000;
    let ca = Ca::new();
    let dir = ConfigDir::new();
    let cacert = write(dir.path(), "ca.pem", &ca.pem);
    let (a_cert, a_key, _) = ca.issue(&["a.passthrough.test"], false);
    let (b_cert, b_key, _) = ca.issue(&["b.passthrough.test"], false);
    let a = tls_backend("backend-a", &a_cert, &a_key).await;
    let b = tls_backend("backend-b", &b_cert, &b_key).await;
    // A TCP echo server for the TCP port.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let echo_addr = echo.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = echo.accept().await else { continue };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let mut y = service("a.passthrough.test", "HTTPS", &[(a, &[])]);
    y.push_str(&service("b.passthrough.test", "HTTPS", &[(b, &[])]));
    y.push_str(&service("echo.internal", "TCP", &[(echo_addr, &[])]));
    // One connection at a time to the echo server.
    y.push_str("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo}\nspec:\n  host: echo.internal\n  trafficPolicy:\n    connectionPool: {tcp: {maxConnections: 1}}\n---\n");
    y.push_str(&format!(
        r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {TLS}, name: tls, protocol: TLS}}
    hosts: [a.passthrough.test, b.passthrough.test]
    tls: {{mode: PASSTHROUGH}}
  - port: {{number: {TCP}, name: tcp, protocol: TCP}}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: passthrough}}
spec:
  hosts: [a.passthrough.test, b.passthrough.test]
  gateways: [gw]
  tls:
  - match: [{{sniHosts: [a.passthrough.test]}}]
    route: [{{destination: {{host: a.passthrough.test}}}}]
  - match: [{{sniHosts: [b.passthrough.test]}}]
    route: [{{destination: {{host: b.passthrough.test}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: tcp}}
spec:
  hosts: ["*"]
  gateways: [gw]
  tcp:
  - match: [{{port: {TCP}}}]
    route: [{{destination: {{host: echo.internal}}}}]
"#
    ));
    let cfg = dir.write("mesh.yaml", &y);
    assert!(!y.contains("BEGIN"), "the gateway's config holds no certificate or key");
    let analyzed = Command::new(trellis_bin()).arg("analyze").arg(&cfg).output().expect("analyze");
    let text = String::from_utf8_lossy(&analyzed.stdout);
    assert!(analyzed.status.success() && !text.contains("TRL0005"), "TLS and TCP servers are enforced: {text}");
    let proxy = ProxyProc::start(&["--role", "gateway", "-c", cfg.to_str().expect("path")]).await;
    let port = proxy.port(TLS).await;
    // Each name reaches its own backend, whose certificate curl verifies end to end.
    for (host, want) in [("a.passthrough.test", "backend-a"), ("b.passthrough.test", "backend-b")] {
        let (ok, body, err) = curl(&[
            "--cacert",
            &cacert.display().to_string(),
            "--resolve",
            &format!("{host}:{port}:127.0.0.1"),
            &format!("https://{host}:{port}/"),
        ]);
        assert!(ok && body == want, "{host}: {body} {err}");
    }
    // A name no route serves: the connection is closed.
    let (ok, _, _) = curl(&[
        "-k",
        "--resolve",
        &format!("c.passthrough.test:{port}:127.0.0.1"),
        &format!("https://c.passthrough.test:{port}/"),
    ]);
    assert!(!ok, "an unrouted SNI is refused");

    // The TCP server: bytes echoed through the gateway, and counted.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp_port = proxy.port(TCP).await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", tcp_port)).await.expect("connect");
    let msg = vec![b'z'; 50_000];
    s.write_all(&msg).await.expect("write");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.expect("echo");
    assert_eq!(back, msg);
    // maxConnections 1: while this connection is open, a second one is closed (UO), counted.
    let mut second = tokio::net::TcpStream::connect(("127.0.0.1", tcp_port)).await.expect("connect");
    let _ = second.write_all(b"over the limit").await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), second.read(&mut buf)).await.expect("closed within 10 s");
    assert!(matches!(n, Ok(0) | Err(_)), "the second connection is closed, not echoed: {n:?}");
    let m = support::mesh::metrics(proxy.admin).await;
    assert_eq!(
        support::mesh::metric_sum(&m, "trellis_proxy_upstream_overflows_total", &[("limit", "connections")]),
        1.0,
        "{m}"
    );
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = support::mesh::metrics(proxy.admin).await;
        let f = [("destination_service_name", "echo.internal")];
        let closed = support::mesh::metric_sum(&m, "istio_tcp_connections_closed_total", &f);
        if closed >= 2.0 {
            assert_eq!(support::mesh::metric_sum(&m, "istio_tcp_received_bytes_total", &f), 50_000.0, "{m}");
            assert_eq!(support::mesh::metric_sum(&m, "istio_tcp_sent_bytes_total", &f), 50_000.0, "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "the TCP connection was never counted as closed:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on /metrics
    }
}

/// An HTTPS server standing in for an external API: it answers with the SNI the client sent,
/// the Host it asked for, and whether a mesh-internal header reached it.
async fn external_api(cert_pem: &str, key_pem: &str) -> std::net::SocketAddr {
    tls_server(cert_pem, key_pem, |sni, req| {
        let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("-");
        let peer = req.headers().contains_key("x-trellis-peer");
        format!("external sni={sni} host={host} mesh-header={peer}")
    })
    .await
}

/// Istio's "TLS origination at an egress gateway", with Istio's own manifests: the app calls
/// `http://api.external.test/`; its sidecar sends the call over mesh mTLS (DestinationRule
/// ISTIO_MUTUAL) to the egress gateway's ISTIO_MUTUAL server, which originates TLS
/// (DestinationRule SIMPLE) to the external host, found by DNS (ServiceEntry `resolution: DNS`).
/// Under REGISTRY_ONLY an undeclared host is refused, and the gateway's port admits only mesh
/// peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_gateway_originates_tls_to_a_declared_host_and_registry_only_refuses_the_rest() {
    let ca = Ca::new();
    let dir = ConfigDir::new();
    let ca_file = write(dir.path(), "external-ca.pem", &ca.pem);
    let (cert, key, _) = ca.issue(&["api.external.test", "tls.external.test"], false);
    let external = external_api(&cert, &key).await;
    // A host the mesh does not declare, at 127.0.0.2.
    let undeclared_addr = fixed_http_server("127.0.0.2:0", "undeclared").await;
    let egress = free_port();
    let ext_port = external.port();
    let ca_path = ca_file.display();
    dir.write(
        "mesh.yaml",
        &format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: app}}
spec:
  selector: {{app: app}}
  ports: [{{name: http, port: 80}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {{name: app, labels: {{app: app}}}}
spec:
  command: [trellis-demo, colorteller]
  env: {{COLOR: blue}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default, namespace: istio-system}}
spec:
  outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}
---
# The external API, resolved by DNS (here the name `localhost` stands in for its address).
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external-api}}
spec:
  hosts: [api.external.test]
  ports:
  - {{number: 80, name: http-port, protocol: HTTP}}
  - {{number: 443, name: https, protocol: HTTPS}}
  resolution: DNS
  endpoints: [{{address: localhost, ports: {{https: {ext_port}}}}}]
---
# Another, which the app speaks TLS to itself.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external-tls}}
spec:
  hosts: [tls.external.test]
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  resolution: DNS
  endpoints: [{{address: localhost, ports: {{tls: {ext_port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: istio-egressgateway}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: {egress}, name: https-port-for-tls-origination, protocol: HTTPS}}
    hosts: [api.external.test]
    tls: {{mode: ISTIO_MUTUAL}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: egressgateway-for-api}}
spec:
  host: istio-egressgateway.istio-system.svc.cluster.local
  subsets:
  - name: api
    trafficPolicy:
      portLevelSettings:
      - port: {{number: {egress}}}
        tls: {{mode: ISTIO_MUTUAL, sni: api.external.test}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: direct-api-through-egress-gateway}}
spec:
  hosts: [api.external.test]
  gateways: [istio-egressgateway, mesh]
  http:
  - match: [{{gateways: [mesh], port: 80}}]
    route:
    - destination: {{host: istio-egressgateway.istio-system.svc.cluster.local, subset: api, port: {{number: {egress}}}}}
  - match: [{{gateways: [istio-egressgateway], port: {egress}}}]
    route:
    - destination: {{host: api.external.test, port: {{number: 443}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: originate-tls-for-api}}
spec:
  host: api.external.test
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 443}}
      tls: {{mode: SIMPLE, caCertificates: {ca_path}}}
"#
        ),
    );
    let analyzed = Command::new(trellis_bin()).arg("analyze").arg(dir.path()).output().expect("analyze");
    let text = String::from_utf8_lossy(&analyzed.stdout);
    assert!(!text.contains("TRL0005"), "an ISTIO_MUTUAL server is enforced: {text}");
    let up = support::mesh::Up::start_with(dir.path(), free_port(), &[]).await;
    let admins = up.admins();
    let (app, gateway) = (admins["app"], admins["istio-egressgateway"]);
    let (_, dump) = admin_get(app, "/config_dump").await.expect("config dump");
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("json");
    let outbound: std::net::SocketAddr = dump["active_listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == "outbound"))
        .and_then(|l| l["bound"].as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("no outbound listener: {dump}"));
    let via_sidecar = |url: &str| {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "10", "-D", "-", url])
            .env("http_proxy", format!("http://{outbound}"))
            .env("https_proxy", format!("http://{outbound}"))
            .env_remove("no_proxy")
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // Through the egress gateway: TLS originated there, verified against the external CA, with
    // the external name as SNI; the mesh's own header stays inside the mesh.
    let reply = via_sidecar("http://api.external.test/");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.ends_with("external sni=api.external.test host=api.external.test mesh-header=false"), "{reply}");
    let m = support::mesh::metrics(gateway).await;
    let at_gateway = support::mesh::metric_sum(
        &m,
        "istio_requests_total",
        &[
            ("destination_service_name", "api.external.test"),
            ("response_code", "200"),
            ("source_workload", "istio-egressgateway"),
        ],
    );
    assert_eq!(at_gateway, 1.0, "the gateway forwarded the call:\n{m}");
    let m = support::mesh::metrics(app).await;
    let from_app = support::mesh::metric_sum(
        &m,
        "istio_requests_total",
        &[
            ("destination_workload", "istio-egressgateway"),
            // Set only when the peer proved this identity in the mTLS handshake.
            ("destination_principal", "spiffe://cluster.local/ns/istio-system/sa/istio-egressgateway"),
        ],
    );
    assert_eq!(from_app, 1.0, "the app's sidecar reached the gateway over mTLS:\n{m}");

    // The app's own TLS to a declared TLS host (CONNECT through its sidecar), the name resolved
    // by DNS from the ServiceEntry, the certificate verified by the app end to end.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert", &ca_file.display().to_string(), "https://tls.external.test/"])
        .env("https_proxy", format!("http://{outbound}"))
        .env_remove("no_proxy")
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "external sni=tls.external.test host=tls.external.test mesh-header=false",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // REGISTRY_ONLY: an undeclared host is refused with 502 NR.
    let reply = via_sidecar(&format!("http://{undeclared_addr}/"));
    assert!(reply.starts_with("HTTP/1.1 502"), "{reply}");
    assert!(reply.to_ascii_lowercase().contains("x-trellis-response-flags: nr"), "{reply}");

    // The gateway's port speaks only mesh mTLS: a plaintext client gets nothing.
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{egress}/"))
        .arg("-H")
        .arg("Host: api.external.test")
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "000", "a client without a mesh certificate is refused");
}
