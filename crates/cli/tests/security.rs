//! Zero trust end to end: certificates and mutual TLS between real sidecars (checked with
//! openssl), STRICT and PERMISSIVE, identity theft refused, rotation under load,
//! AuthorizationPolicy and RequestAuthentication decisions, and TLS origination.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use support::load::*;
use support::mesh::*;
use support::*;

/// A mesh from YAML written into a temp dir (no example), started with `trellis up`.
async fn mesh(yaml: &str, extra: &[&str]) -> (ConfigDir, Up, tempfile::TempDir) {
    let dir = ConfigDir::new();
    dir.write("mesh.yaml", yaml);
    let ca = tempfile::tempdir().expect("ca dir");
    let mut args = vec!["--ca-dir", ca.path().to_str().expect("path")];
    args.extend_from_slice(extra);
    let port = free_port(); // unused when the config has no gateway on it
    let up = Up::start_with(dir.path(), port, &args).await;
    (dir, up, ca)
}

fn workload(name: &str, ns: &str, sa: &str, command: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  selector: {{app: {name}}}\n  ports: [{{name: http, port: 80}}]\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{app: {name}}}\nspec:\n  command: [trellis-demo, {command}]\n  serviceAccount: {sa}\n  env: {{SERVICE_NAME: {name}}}\n---\n"
    )
}

/// The address of a listener of a workload's proxy, from `trellis proxy-config`.
fn listener_addr(up: &Up, workload: &str, ns: &str, listener_prefix: &str) -> SocketAddr {
    let out = Command::new(trellis_bin())
        .args(["proxy-config", workload, "-n", ns, "-o", "json", "--control-plane", &up.cp.to_string()])
        .output()
        .expect("proxy-config");
    let snap: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    snap["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .find(|l| l["name"].as_str().is_some_and(|n| n.starts_with(listener_prefix)))
        .and_then(|l| l["address"].as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("no {listener_prefix} listener for {workload}: {snap}"))
}

async fn via_proxy(outbound: SocketAddr, url: &str, method: &str, headers: &[(&str, &str)]) -> Reply {
    // An absolute-form request to the outbound listener, as the workload's HTTP_PROXY client sends it.
    let stream = tokio::net::TcpStream::connect(outbound).await.expect("connect outbound");
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, TestBody>(hyper_util::rt::TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut b = http::Request::builder().method(method).uri(url);
    let host = url.trim_start_matches("http://").split('/').next().unwrap_or("");
    b = b.header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = sender.send_request(b.body(empty()).expect("req")).await.expect("response");
    let (parts, body) = resp.into_parts();
    let body = http_body_util::BodyExt::collect(body).await.expect("body").to_bytes();
    Reply { status: parts.status, headers: parts.headers, body: String::from_utf8_lossy(&body).into_owned() }
}

fn openssl_peer(addr: SocketAddr) -> String {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-showcerts"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("openssl output");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn cert_details(s_client: &str) -> String {
    let pem: String = {
        let start = s_client.find("-----BEGIN CERTIFICATE-----").expect("a certificate");
        let end = s_client[start..].find("-----END CERTIFICATE-----").expect("end") + start + 25;
        s_client[start..end].to_string()
    };
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-startdate", "-enddate"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl x509");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), pem.as_bytes()).expect("write");
    String::from_utf8_lossy(&child.wait_with_output().expect("x509").stdout).into_owned()
}

fn openssl_time(line: &str) -> i64 {
    // "notBefore=Nov 23 14:29:37 2026 GMT"
    let v = line.split_once('=').map(|(_, v)| v.trim()).unwrap_or("");
    let out = Command::new("date").args(["-u", "-d", v, "+%s"]).output().expect("date");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("epoch")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_speak_tls13_with_spiffe_certificates_and_strict_refuses_strangers() {
    let mut yaml = workload("server", "default", "server-sa", "reference");
    yaml.push_str(&workload("client", "default", "client-sa", "colorteller"));
    yaml.push_str("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec:\n  mtls: {mode: STRICT}\n");
    let (_d, up, ca) = mesh(&yaml, &["--cert-ttl", "1h"]).await;
    let inbound = listener_addr(&up, "server", "default", "inbound-");

    // openssl sees TLS 1.3 and the server's SPIFFE identity; the lifetime is the configured one.
    let s = openssl_peer(inbound);
    assert!(s.contains("TLSv1.3"), "{s}");
    let details = cert_details(&s);
    assert!(details.contains("URI:spiffe://cluster.local/ns/default/sa/server-sa"), "{details}");
    let lines: Vec<&str> = details.lines().collect();
    let nb = openssl_time(lines.iter().find(|l| l.starts_with("notBefore")).expect("notBefore"));
    let na = openssl_time(lines.iter().find(|l| l.starts_with("notAfter")).expect("notAfter"));
    assert_eq!(na - nb, 3600, "certificate lifetime equals --cert-ttl");

    // A request from the client's sidecar crosses mTLS and names its principal.
    let outbound = listener_addr(&up, "client", "default", "outbound");
    let r = via_proxy(outbound, "http://server/api/request-echo", "GET", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let admins = up.admins();
    let m = metrics(admins["server"]).await;
    let line = m
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains("reporter=\"destination\""))
        .expect("inbound metric");
    assert!(line.contains("connection_security_policy=\"mutual_tls\""), "{line}");
    assert!(line.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/client-sa\""), "{line}");
    assert!(line.contains("destination_principal=\"spiffe://cluster.local/ns/default/sa/server-sa\""), "{line}");

    // HTTP/1.1 between the sidecars rides one multiplexed HTTP/2 mTLS connection, and the
    // application still receives HTTP/1.1: twenty concurrent client connections, one peer link.
    assert!(r.body.lines().next().unwrap_or("").ends_with("HTTP/1.1"), "app saw {}", r.body);
    let many = (0..20).map(|_| via_proxy(outbound, "http://server/api/request-echo", "GET", &[]));
    for r in futures_util::future::join_all(many).await {
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.lines().next().unwrap_or("").ends_with("HTTP/1.1"), "app saw {}", r.body);
    }
    assert_eq!(established_to(inbound), 1, "sidecar-to-sidecar connections");

    // Plaintext to a STRICT port is refused.
    let plain = try_get(&format!("http://{inbound}/api/health")).await;
    assert!(plain.is_err(), "plaintext must be refused, got {plain:?}");

    // A certificate from another CA is refused: a client with a self-made CA's cert.
    let other = tempfile::tempdir().expect("dir");
    let (cert, key) = foreign_client_cert(other.path());
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &inbound.to_string(), "-cert", &cert, "-key", &key, "-quiet"])
        .stdin(std::process::Stdio::piped())
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("alert") || !out.status.success(), "foreign CA accepted: {text}");

    // The control plane refuses a CSR for an identity the caller's token does not hold.
    let tokens: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tokens_file(&up)).expect("tokens")).expect("json");
    let client_token = tokens["tokens"]
        .as_object()
        .expect("map")
        .iter()
        .find(|(_, v)| v["serviceAccount"] == "client-sa")
        .map(|(k, _)| k.clone())
        .expect("client token");
    let forged =
        trellis_identity::cert::generate_csr(&trellis_identity::SpiffeId::new("cluster.local", "default", "server-sa"))
            .expect("csr");
    let mut c =
        trellis_api::control::control_client::ControlClient::connect(format!("http://{}", up.cp)).await.expect("cp");
    let denied = c
        .create_certificate(trellis_api::control::CertificateRequest {
            csr_pem: forged.csr_pem,
            token: client_token.clone(),
        })
        .await;
    assert_eq!(denied.expect_err("forged CSR").code(), tonic::Code::PermissionDenied);
    let own =
        trellis_identity::cert::generate_csr(&trellis_identity::SpiffeId::new("cluster.local", "default", "client-sa"))
            .expect("csr");
    let ok = c
        .create_certificate(trellis_api::control::CertificateRequest { csr_pem: own.csr_pem, token: client_token })
        .await
        .expect("own CSR signed");
    assert!(!ok.into_inner().cert_chain_pem.is_empty());
    let unknown =
        trellis_identity::cert::generate_csr(&trellis_identity::SpiffeId::new("cluster.local", "default", "x"))
            .expect("csr");
    let denied = c
        .create_certificate(trellis_api::control::CertificateRequest {
            csr_pem: unknown.csr_pem,
            token: "made-up".into(),
        })
        .await;
    assert_eq!(denied.expect_err("unknown token").code(), tonic::Code::Unauthenticated);
    drop(ca);
}

/// Established TCP connections whose remote end is `addr` (from /proc/net/tcp).
fn established_to(addr: SocketAddr) -> usize {
    let SocketAddr::V4(v4) = addr else { panic!("IPv4 expected") };
    let want = format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), v4.port());
    std::fs::read_to_string("/proc/net/tcp")
        .expect("/proc/net/tcp")
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2] == want && f[3] == "01"
        })
        .count()
}

/// The tokens file `trellis up` wrote (in its state directory, named on the control plane's command line).
fn tokens_file(up: &Up) -> String {
    let cp = children_of(up.pid())
        .into_iter()
        .map(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default())
        .find(|c| c.contains("\0control\0"))
        .expect("control plane");
    let args: Vec<&str> = cp.split('\0').collect();
    let i = args.iter().position(|a| *a == "--tokens").expect("--tokens");
    args[i + 1].to_string()
}

fn foreign_client_cert(dir: &Path) -> (String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names =
        vec![rcgen::SanType::URI("spiffe://cluster.local/ns/default/sa/client-sa".try_into().expect("uri"))];
    let cert = params.signed_by(&key, &issuer).expect("sign");
    let _ = ca_cert;
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.pem()).expect("write");
    std::fs::write(&k, key.serialize_pem()).expect("write");
    (c.display().to_string(), k.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_serves_plaintext_and_mtls_on_one_port() {
    let mut yaml = workload("server", "default", "server-sa", "reference");
    yaml.push_str(&workload("client", "default", "client-sa", "colorteller"));
    // No PeerAuthentication: Istio's default, PERMISSIVE.
    let (_d, up, _ca) = mesh(&yaml, &[]).await;
    let inbound = listener_addr(&up, "server", "default", "inbound-");
    assert_eq!(try_get(&format!("http://{inbound}/api/health")).await, Ok(200), "plaintext served");
    let outbound = listener_addr(&up, "client", "default", "outbound");
    let r = via_proxy(outbound, "http://server/api/health", "GET", &[]).await;
    assert_eq!(r.status, 200);
    let m = metrics(up.admins()["server"]).await;
    let policies: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("reporter=\"destination\""))
        .filter_map(|l| l.split("connection_security_policy=\"").nth(1)?.split('"').next())
        .collect();
    assert!(policies.contains(&"mutual_tls") && policies.contains(&"none"), "both kinds served: {policies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    let port = free_port();
    let dir = example("color-canary", port);
    let ca = tempfile::tempdir().expect("ca");
    let up =
        Up::start_with(dir.path(), port, &["--ca-dir", ca.path().to_str().expect("path"), "--cert-ttl", "12s"]).await;
    // 200 req/s through the gateway and two sidecars (gateway → colorgateway → colorteller),
    // every hop mutual TLS with 12 s certificates renewed at 80%, until every proxy has
    // presented at least three certificates (two rotations each), as `/certs` shows.
    let admins: Vec<(String, std::net::SocketAddr)> = up.admins().into_iter().collect();
    assert_eq!(admins.len(), 4, "{admins:?}");
    let load = Load::open_loop(&up.url("/color"), 200, 6_000);
    let mut serials: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for (name, admin) in &admins {
            let (code, body) = admin_get(*admin, "/certs").await.expect("/certs");
            assert_eq!(code, 200);
            let j: serde_json::Value = serde_json::from_str(&body).expect("json");
            let cert = &j["certificates"][0];
            assert!(
                // Workloads in `default`; the gateway in `istio-system`, as Istio installs it.
                cert["identity"].as_str().is_some_and(|i| {
                    let ns = if name.starts_with("istio-") { "istio-system" } else { "default" };
                    i.starts_with(&format!("spiffe://cluster.local/ns/{ns}/sa/"))
                }),
                "{j}"
            );
            assert!(cert["seconds_until_expiration"].as_u64().unwrap_or(0) <= 12, "{j}");
            serials.entry(name.clone()).or_default().insert(cert["serial_number"].as_str().unwrap_or("").to_string());
        }
        if serials.values().all(|s| s.len() >= 3) {
            break;
        }
        assert!(Instant::now() < deadline, "not every proxy rotated twice in 60 s: {serials:?}");
        tokio::time::sleep(Duration::from_millis(250)).await; // poll interval of a wait on /certs
    }
    let rotated_at = Instant::now();
    let samples = load.finish().await;
    let failed: Vec<_> = samples.iter().filter(|s| s.status != 200).collect();
    let during = samples.iter().filter(|s| s.sent <= rotated_at).count();
    println!(
        "{} requests ({during} while certificates rotated), {} failed; serials per proxy: {:?}",
        samples.len(),
        failed.len(),
        serials.iter().map(|(k, v)| (k.as_str(), v.len())).collect::<Vec<_>>()
    );
    assert!(failed.is_empty(), "failed requests: {:?}", &failed[..failed.len().min(3)]);
    assert!(during >= 2000, "the load ran through the rotations: {during}");
}

/// An ES256 key pair for signing test JWTs, with its public JWK.
struct JwtKey {
    kid: String,
    encoding: jsonwebtoken::EncodingKey,
    jwk: serde_json::Value,
}

impl JwtKey {
    fn new(kid: &str) -> JwtKey {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let raw = key.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig", "x": b64(&raw[1..33]), "y": b64(&raw[33..65])});
        JwtKey {
            kid: kid.into(),
            encoding: jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("pem"),
            jwk,
        }
    }

    fn sign(&self, claims: serde_json::Value) -> String {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, &claims, &self.encoding).expect("sign")
    }
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_validation_and_jwks_rotation_at_its_uri() {
    // A JWKS server whose keys the test rotates.
    let k1 = JwtKey::new("k1");
    let k2 = JwtKey::new("k2");
    let jwks = std::sync::Arc::new(std::sync::Mutex::new(serde_json::json!({"keys": [k1.jwk.clone()]}).to_string()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let jwks_addr = listener.local_addr().expect("addr");
    let served = jwks.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else { continue };
            let served = served.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    let body = served.lock().expect("lock").clone();
                    async move { Ok::<_, std::convert::Infallible>(http::Response::new(full(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let b = Backend::start("app").await;
    let dir = ConfigDir::new();
    let mut y = gateway("gw", GW);
    y.push_str(&service("app.internal", "HTTP", &[(b.addr, &[])]));
    y.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route: [{destination: {host: app.internal}}]\n---\n");
    y.push_str(&format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: istio-system}}\nspec:\n  selector:\n    matchLabels: {{istio: ingressgateway}}\n  jwtRules:\n  - issuer: https://issuer.test\n    audiences: [shop]\n    jwksUri: http://{jwks_addr}/jwks.json\n    outputPayloadToHeader: x-jwt-payload\n  - issuer: https://cookie.test\n    jwks: '{}'\n    fromCookies: [id_token]\n",
        serde_json::json!({"keys": [k2.jwk.clone()]})
    ));
    let cfg = dir.write("mesh.yaml", &y);
    let p = ProxyProc::start(&["--role", "gateway", "-c", cfg.to_str().expect("path")]).await;
    let url = format!("http://127.0.0.1:{}/", p.port(GW).await);
    let bearer = |t: &str| format!("Bearer {t}");
    let claims = |iss: &str, aud: &str, exp: i64, nbf: i64| serde_json::json!({"iss": iss, "sub": "alice", "aud": aud, "exp": exp, "nbf": nbf, "group": "admins"});
    let good = k1.sign(claims("https://issuer.test", "shop", now() + 600, now() - 10));
    let cases: Vec<(&str, Option<String>, u16, &str)> = vec![
        ("no token: allowed, unauthenticated", None, 200, ""),
        ("valid", Some(good.clone()), 200, ""),
        (
            "expired",
            Some(k1.sign(claims("https://issuer.test", "shop", now() - 600, now() - 1200))),
            401,
            "Jwt is expired",
        ),
        (
            "not yet valid",
            Some(k1.sign(claims("https://issuer.test", "shop", now() + 1200, now() + 600))),
            401,
            "Jwt not yet valid",
        ),
        (
            "wrong issuer",
            Some(k1.sign(claims("https://evil.test", "shop", now() + 600, now() - 10))),
            401,
            "Jwt issuer is not configured",
        ),
        (
            "wrong audience",
            Some(k1.sign(claims("https://issuer.test", "other", now() + 600, now() - 10))),
            401,
            "Audiences in Jwt are not allowed",
        ),
        (
            "bad signature",
            Some({
                let mut parts: Vec<String> = good.split('.').map(String::from).collect();
                parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::json!({"iss": "https://issuer.test", "sub": "mallory", "aud": "shop", "exp": now() + 600}).to_string());
                parts.join(".")
            }),
            401,
            "Jwt verification fails",
        ),
        (
            "unknown kid",
            Some(JwtKey::new("k9").sign(claims("https://issuer.test", "shop", now() + 600, now() - 10))),
            401,
            "Jwks doesn't have key to match kid",
        ),
    ];
    for (what, token, status, body) in cases {
        let headers: Vec<(&str, String)> = token.iter().map(|t| ("authorization", bearer(t))).collect();
        let hdrs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = get(&url, &hdrs).await;
        assert_eq!(r.status, status, "{what}: {}", r.body);
        assert!(r.body.contains(body), "{what}: {}", r.body);
        if status == 200 && token.is_some() {
            let h = &r.json()["headers"];
            assert!(h.get("authorization").is_none(), "the token is not forwarded by default");
            let payload = h["x-jwt-payload"].as_str().expect("payload header");
            assert!(String::from_utf8(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("b64"))
                .expect("utf8")
                .contains("alice"));
        }
    }
    // The issuer rotates its keys at the JWKS URI: a token signed with the new key is accepted
    // at once (the unknown key id triggers a refetch), the old key's tokens no longer are.
    *jwks.lock().expect("lock") = serde_json::json!({"keys": [k2.jwk.clone()]}).to_string();
    // Refetches are at most one per 500 ms (a stream of made-up key ids must not become a stream
    // of fetches), and the unknown-kid case above just used that allowance: the new key is
    // accepted on the first request after it.
    let rotated = k2.sign(claims("https://issuer.test", "shop", now() + 600, now() - 10));
    let deadline = Instant::now() + Duration::from_secs(5);
    let r = loop {
        let r = get(&url, &[("authorization", &bearer(&rotated))]).await;
        if r.status == 200 || Instant::now() >= deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval of a wait on the JWKS refresh
    };
    assert_eq!(r.status, 200, "rotated key: {}", r.body);
    // The refetch replaced the key set: the old key is gone.
    let r = get(
        &url,
        &[("authorization", &bearer(&k1.sign(claims("https://issuer.test", "shop", now() + 600, now() - 10))))],
    )
    .await;
    assert_eq!(r.status, 401, "old key after rotation: {}", r.body);

    // A rule with `fromCookies` reads its token from that cookie (among others) and verifies it.
    let cookie = |t: &str| format!("theme=dark; id_token={t}; lang=en");
    let valid = k2.sign(claims("https://cookie.test", "any", now() + 600, now() - 10));
    let r = get(&url, &[("cookie", &cookie(&valid))]).await;
    assert_eq!(r.status, 200, "token in a cookie: {}", r.body);
    let forged = k1.sign(claims("https://cookie.test", "any", now() + 600, now() - 10));
    let r = get(&url, &[("cookie", &cookie(&forged))]).await;
    assert_eq!(r.status, 401, "a cookie token signed by another key: {}", r.body);
    let r = get(&url, &[("cookie", &format!("other={forged}"))]).await;
    assert_eq!(r.status, 200, "a cookie of another name is not a token: {}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_policy_decisions() {
    let key = JwtKey::new("k1");
    let jwks = serde_json::json!({"keys": [key.jwk.clone()]}).to_string();
    let gw_port = free_port();
    let mut yaml = workload("server", "default", "server-sa", "reference");
    yaml.push_str(&workload("client-a", "default", "client-a", "colorteller"));
    yaml.push_str(&workload("client-b", "other", "client-b", "colorteller"));
    yaml.push_str(&format!(
        r#"apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw}}
spec:
  selector: {{istio: ingressgateway}}
  servers: [{{port: {{number: {gw_port}, name: http, protocol: HTTP}}, hosts: ["*"]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: server}}
spec:
  hosts: ["*"]
  gateways: [gw]
  http: [{{route: [{{destination: {{host: server}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  jwtRules:
  - issuer: https://issuer.test
    jwks: '{jwks}'
    forwardOriginalToken: true
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-rules}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/default/sa/client-a]}}}}]
    to: [{{operation: {{methods: [GET], paths: ["/api/*"]}}}}]
  - from: [{{source: {{namespaces: [other]}}}}]
    to: [{{operation: {{paths: ["*/health"]}}}}]
  - when: [{{key: "request.headers[x-allow]", values: ["yes"]}}]
  - when: [{{key: "request.auth.claims[group]", values: [admins]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-status}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: DENY
  rules:
  - to: [{{operation: {{paths: ["/api/status/*"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: audit-health}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: AUDIT
  rules:
  - to: [{{operation: {{paths: ["/api/health"]}}}}]
"#
    ));
    let (_d, up, _ca) = mesh(&yaml, &[]).await;
    let a = listener_addr(&up, "client-a", "default", "outbound");
    let b = listener_addr(&up, "client-b", "other", "outbound");
    let admin_tok = key
        .sign(serde_json::json!({"iss": "https://issuer.test", "sub": "root", "group": "admins", "exp": now() + 600}));
    let user_tok =
        key.sign(serde_json::json!({"iss": "https://issuer.test", "sub": "joe", "group": "users", "exp": now() + 600}));
    let gw = |path: &str| format!("http://127.0.0.1:{gw_port}{path}");
    // (case, caller's outbound listener or the gateway, method, URL, headers, expected status)
    type Case<'a> = (&'a str, Option<SocketAddr>, &'a str, &'a str, Vec<(&'a str, String)>, u16);
    let table: Vec<Case<'_>> = vec![
        ("principal + method + path prefix", Some(a), "GET", "http://server.default/api/request-echo", vec![], 200),
        ("principal, wrong method", Some(a), "POST", "http://server.default/api/request-echo", vec![], 403),
        (
            "header condition",
            Some(a),
            "POST",
            "http://server.default/api/request-echo",
            vec![("x-allow", "yes".into())],
            200,
        ),
        ("namespace + path suffix", Some(b), "GET", "http://server.default.svc.cluster.local/api/health", vec![], 200),
        (
            "namespace, other path",
            Some(b),
            "GET",
            "http://server.default.svc.cluster.local/api/request-echo",
            vec![],
            403,
        ),
        ("DENY beats ALLOW", Some(a), "GET", "http://server.default/api/status/200", vec![], 403),
        ("JWT claim", None, "GET", "/api/request-echo", vec![("authorization", format!("Bearer {admin_tok}"))], 200),
        (
            "JWT claim not matching",
            None,
            "GET",
            "/api/request-echo",
            vec![("authorization", format!("Bearer {user_tok}"))],
            403,
        ),
        ("no identity matches nothing", None, "GET", "/api/request-echo", vec![], 403),
    ];
    for (what, via, method, url, headers, status) in table {
        let hdrs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = match via {
            Some(p) => via_proxy(p, url, method, &hdrs).await,
            None => {
                let mut rb = http::Request::builder().method(method).uri(gw(url));
                for (k, v) in &hdrs {
                    rb = rb.header(*k, *v);
                }
                send(&h1_client(), rb.body(empty()).expect("req")).await
            }
        };
        assert_eq!(r.status, status, "{what}: {}", r.body);
        if status == 403 {
            assert_eq!(r.body, "RBAC: access denied", "{what}");
        }
    }
    // AUDIT does not block, and decisions are counted per policy.
    assert_eq!(via_proxy(b, "http://server.default/api/health", "GET", &[]).await.status, 200);
    let m = metrics(up.admins()["server"]).await;
    for needle in [
        "trellis_proxy_authz_decisions_total{decision=\"audit\",policy=\"default/audit-health\"}",
        "trellis_proxy_authz_decisions_total{decision=\"deny\",policy=\"default/deny-status\"}",
        "trellis_proxy_authz_decisions_total{decision=\"allow\",policy=\"default/allow-rules\"}",
    ] {
        assert!(
            m.contains(needle),
            "{needle} in\n{}",
            m.lines().filter(|l| l.contains("authz")).collect::<Vec<_>>().join("\n")
        );
    }
    assert!(
        up.output_shows("\"authz_policy\":\"default/deny-status\"", Duration::from_secs(5)).await,
        "the denying policy is in the access log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_origination_to_an_external_https_server() {
    // An HTTPS server with a certificate for external.test from a test CA.
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["external.test".to_string()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("cert");
    let dir = ConfigDir::new();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).expect("write ca");
    let server_cfg =
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server_cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let https = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else { continue };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else { return };
                let sni = tls.get_ref().1.server_name().unwrap_or("").to_string();
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let body = format!("secure hello for {} over TLS (sni {sni})", req.uri().path());
                    async move { Ok::<_, std::convert::Infallible>(http::Response::new(full(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    dir.write(
        "mesh.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: external}}\nspec:\n  hosts: [external.test]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: STATIC\n  endpoints: [{{address: 127.0.0.1, ports: {{http: {}}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: external}}\nspec:\n  host: external.test\n  trafficPolicy:\n    tls: {{mode: SIMPLE, sni: external.test, caCertificates: {}}}\n",
            https.port(),
            ca_file.display()
        ),
    );
    let cfg = dir.path().join("mesh.yaml");
    let p =
        ProxyProc::start(&["--workload", "app", "-c", cfg.to_str().expect("path"), "--outbound", "127.0.0.1:0"]).await;
    // The app speaks plain HTTP to its sidecar; the sidecar originates TLS and verifies the server.
    let r = via_proxy(p.listener("outbound").await, "http://external.test/orders", "GET", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "secure hello for /orders over TLS (sni external.test)");
}
