//! The bodies of Trellis's fuzz targets. Each takes arbitrary bytes, must never panic, and
//! checks a property of what it exercised:
//!
//! - [`config_load`]: YAML → resources → analyze → compile, as `trellis analyze`, the control
//!   plane and the proxy's static mode run it; a config without errors compiles for a sidecar
//!   and a gateway, and the fleet encoding equals the direct compilation.
//! - [`request_head`]: the HTTP/1 head handling the proxy adds on top of hyper (authority,
//!   Host from the target, hop-by-hop stripping, header rewrites, forwarded headers).
//! - [`jwt`]: JWT parsing and verification against a JWKS; a tampered token never verifies.
//! - [`csr`]: CSR and PEM handling in the CA; a signed certificate names exactly the identity.
//! - [`delta`]: `encode::Delta::apply` never yields a snapshot the whole push would not.
//!
//! `fuzz/` runs them under libFuzzer (`scripts/fuzz.sh`); the tests of this crate replay every
//! seed and every crash kept in `fuzz/regressions/`, on stable Rust, in the ordinary suite.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::OnceLock;

use trellis_config::compile::{compile, Generation, InboundSpec, ProxySpec, UpstreamSpec};
use trellis_config::snapshot::Role;

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name (the names of `fuzz/fuzz_targets/*.rs` and their seed folders).
pub const TARGETS: [(&str, Target); 5] =
    [("config_load", config_load), ("request_head", request_head), ("jwt", jwt), ("csr", csr), ("delta", delta)];

/// Reads fuzz input as a sequence of small choices.
struct Choices<'a>(&'a [u8]);

impl Choices<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn below(&mut self, n: u8) -> u8 {
        self.byte() % n.max(1)
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The proxies every compiled config is compiled for: a sidecar and an ingress gateway.
fn specs() -> [ProxySpec; 2] {
    let sidecar = ProxySpec {
        name: "app".into(),
        labels: [("app".to_string(), "app".to_string())].into(),
        inbound: vec![InboundSpec { listen: addr(15006), app: addr(8080), protocol: None }],
        outbound: Some(addr(15001)),
        upstreams: vec![UpstreamSpec { listen: addr(15002), host: "svc-1".into(), port: 80 }],
        ..ProxySpec::default()
    };
    let gateway = ProxySpec {
        role: Role::Gateway,
        name: "istio-ingressgateway".into(),
        labels: [("istio".to_string(), "ingressgateway".to_string())].into(),
        ..ProxySpec::default()
    };
    [sidecar, gateway]
}

/// YAML → resources → analyze → compile.
pub fn config_load(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let loaded = trellis_config::load::load_str(Path::new("fuzz.yaml"), text);
    let mut findings = loaded.findings;
    findings.extend(trellis_config::analyze::analyze(&loaded.resources, &[]));
    for f in &findings {
        // Every finding renders (file:line:col and message) without panicking.
        let _ = f.to_string();
    }
    if findings.iter().any(|f| f.is_error()) {
        return;
    }
    let generation = Generation::new(&loaded.resources);
    for spec in specs() {
        let direct = compile(&loaded.resources, &[], &spec);
        let encoded = generation.compile(&loaded.resources, &spec).expect("a config without errors encodes");
        let full: trellis_config::snapshot::Snapshot =
            serde_json::from_slice(&encoded.full().expect("full snapshot")).expect("snapshot JSON reads back");
        assert_eq!(full, direct, "the fleet encoding differs from compile()");
    }
}

/// One HTTP/1 request head, parsed as hyper's server parses it, then Trellis's own handling.
pub fn request_head(data: &[u8]) {
    use http::header::{self, HeaderName, HeaderValue};
    use trellis_proxy::http::headers;

    let mut raw_headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut raw_headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else { return };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else { return };
    let mut builder = http::Request::builder().method(method).uri(path).version(if version == 0 {
        http::Version::HTTP_10
    } else {
        http::Version::HTTP_11
    });
    for h in req.headers.iter() {
        // hyper refuses a head with an invalid name or value before Trellis sees it.
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_bytes(h.value))
        else {
            return;
        };
        builder = builder.header(name, value);
    }
    let Ok(request) = builder.body(()) else { return };
    let (mut parts, ()) = request.into_parts();

    let authority = headers::request_authority(&parts.uri, parts.version, &parts.headers);
    if let Ok(Some(a)) = &authority {
        assert!(!a.host().is_empty(), "an accepted authority has a host: {a}");
        assert!(!a.as_str().contains('@'), "an accepted authority has no userinfo: {a}");
    }
    headers::host_from_target(&mut parts);
    if let Some(target) = parts.uri.authority() {
        let want = target.as_str().rsplit('@').next().unwrap_or_default();
        if let Some(host) = parts.headers.get(header::HOST) {
            if HeaderValue::from_str(want).is_ok() {
                assert_eq!(host.as_bytes(), want.as_bytes(), "Host is not the target's authority");
            }
        }
    }

    // What `Connection` names is hop-by-hop too (RFC 9110 §7.6.1), except `te`.
    let listed: Vec<HeaderName> = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(str::trim).map(str::to_string).collect::<Vec<_>>())
        .filter(|n| !n.eq_ignore_ascii_case("te"))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    headers::strip_hop_by_hop(&mut parts.headers);
    for h in [header::CONNECTION, header::TRANSFER_ENCODING, header::UPGRADE, header::TRAILER] {
        assert!(!parts.headers.contains_key(&h), "{h} survived hop-by-hop stripping");
    }
    for n in &listed {
        assert!(!parts.headers.contains_key(n), "{n}, listed in Connection, survived");
    }
    if let Some(te) = parts.headers.get(header::TE) {
        assert_eq!(te.as_bytes(), b"trailers", "TE other than trailers survived");
    }

    // Header rewrites built from the head's own names and values: set wins, remove removes.
    let pairs: Vec<(String, String)> = parts
        .headers
        .iter()
        .take(4)
        .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let ops = trellis_config::snapshot::HeaderOps {
        set: pairs.iter().take(2).cloned().collect(),
        add: pairs.iter().skip(2).cloned().collect(),
        remove: pairs.iter().skip(3).map(|(k, _)| k.clone()).collect(),
    };
    if let Ok(rw) = headers::HeaderRewrite::build(&ops) {
        rw.apply(&mut parts.headers);
        for k in &ops.remove {
            assert!(!parts.headers.contains_key(k.as_str()), "{k} survived its removal");
        }
    }
    headers::set_forwarded(&mut parts.headers, &headers::address_value(std::net::IpAddr::from([127, 0, 0, 1])), "http");
    headers::ensure_request_id(&mut parts.headers);
    assert!(parts.headers.contains_key(headers::X_REQUEST_ID));
}

/// An ES256 key and the JWKS that holds its public half.
struct JwtFixture {
    encoding: jsonwebtoken::EncodingKey,
    auth: trellis_proxy::security::jwt::JwtAuth,
    runtime: tokio::runtime::Runtime,
}

const ISSUER: &str = "https://issuer.test";

fn jwt_fixture() -> &'static JwtFixture {
    static F: OnceLock<JwtFixture> = OnceLock::new();
    F.get_or_init(|| {
        use base64::Engine;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let raw = key.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65])});
        let rule = trellis_config::model::security::JwtRule {
            issuer: ISSUER.into(),
            audiences: vec!["shop".into()],
            jwks: Some(serde_json::json!({"keys": [jwk]}).to_string()),
            output_payload_to_header: Some("x-jwt-payload".into()),
            ..Default::default()
        };
        let auth = trellis_proxy::security::jwt::JwtAuth::build(&[rule], &Default::default()).expect("rule");
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        JwtFixture {
            encoding: jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("pem"),
            auth,
            runtime,
        }
    })
}

fn authenticate(token: &str) -> trellis_proxy::security::jwt::Outcome {
    let f = jwt_fixture();
    let Ok(value) = http::HeaderValue::from_str(&format!("Bearer {token}")) else {
        return trellis_proxy::security::jwt::Outcome::NoToken;
    };
    let (mut parts, ()) = http::Request::builder()
        .uri("/")
        .header(http::header::AUTHORIZATION, value)
        .body(())
        .expect("request")
        .into_parts();
    f.runtime.block_on(f.auth.authenticate(&mut parts))
}

/// First byte even: the rest is a token as received. Odd: the rest is claims, signed with the
/// JWKS's key, then (if a further byte says so) tampered with.
pub fn jwt(data: &[u8]) {
    use trellis_proxy::security::jwt::Outcome;
    let Some((mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        let token = String::from_utf8_lossy(rest);
        let outcome = authenticate(&token);
        // Nobody but the fixture holds the key: a token from the fuzzer never verifies.
        assert!(!matches!(outcome, Outcome::Valid(_)), "an unsigned token verified: {token:?}");
        return;
    }
    let (tamper, claims) = rest.split_first().map(|(t, c)| (*t, c)).unwrap_or((0, &[]));
    let Ok(mut claims) = serde_json::from_slice::<serde_json::Value>(claims) else { return };
    let Some(obj) = claims.as_object_mut() else { return };
    obj.insert("iss".into(), ISSUER.into());
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    let Ok(token) = jsonwebtoken::encode(&header, &claims, &jwt_fixture().encoding) else { return };
    if let Outcome::Valid(v) = authenticate(&token) {
        let sub = claims.get("sub").and_then(|s| s.as_str()).unwrap_or("");
        assert_eq!(v.principal, format!("{ISSUER}/{sub}"));
    }
    if tamper % 4 == 0 {
        return;
    }
    // Change one character of the header or payload: the signature no longer matches.
    let signed_len = token.rfind('.').unwrap_or(0);
    if signed_len == 0 {
        return;
    }
    let i = usize::from(tamper) * 7 % signed_len;
    let bytes = token.as_bytes();
    if bytes[i] == b'.' {
        return;
    }
    let replacement = if bytes[i] == b'A' { 'B' } else { 'A' };
    let mut tampered = token.clone();
    tampered.replace_range(i..=i, &replacement.to_string());
    assert!(
        !matches!(authenticate(&tampered), Outcome::Valid(_)),
        "a tampered token verified: {tampered} (from {token})"
    );
}

fn ca() -> &'static trellis_identity::ca::CertificateAuthority {
    static CA: OnceLock<(trellis_identity::ca::CertificateAuthority, std::path::PathBuf)> = OnceLock::new();
    &CA.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("trellis-fuzz-ca-{}", std::process::id()));
        let ca = trellis_identity::ca::CertificateAuthority::load_or_generate(
            &dir,
            "cluster.local",
            std::time::Duration::from_secs(3600),
        )
        .expect("CA");
        // The CA keeps what it needs in memory; leave nothing behind.
        let _ = std::fs::remove_dir_all(&dir);
        (ca, dir)
    })
    .0
}

/// CSRs and PEM as the CA and the proxies read them: a CSR (as PEM text, or DER wrapped in
/// PEM) for the caller's identity, and the certificates and bundles in what comes back.
pub fn csr(data: &[u8]) {
    use base64::Engine;
    let Some((mode, rest)) = data.split_first() else { return };
    let id = trellis_identity::SpiffeId::new("cluster.local", "default", "fuzz");
    let pem = match mode % 3 {
        0 => String::from_utf8_lossy(rest).into_owned(),
        1 => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(rest);
            format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n")
        }
        _ => {
            // Certificates and bundles as a proxy reads them from the CA's answer.
            let text = String::from_utf8_lossy(rest);
            if let Ok(certs) = trellis_identity::cert::parse_pem_certs(&text) {
                for c in &certs {
                    let _ = trellis_identity::cert::spiffe_ids(c);
                    let _ = trellis_identity::cert::validity(c);
                }
            }
            let _ = trellis_identity::cert::TrustBundle::from_pem(&text);
            return;
        }
    };
    if let Ok(chain) = ca().sign(&pem, &id) {
        let leaf = trellis_identity::cert::parse_pem_certs(&chain[0]).expect("the CA's own PEM parses");
        let ids = trellis_identity::cert::spiffe_ids(&leaf[0]).expect("SPIFFE ids");
        assert_eq!(ids, vec![id], "a signed certificate names exactly the caller's identity");
    }
}

/// A small mesh chosen by the input: services, ports, subsets, weights, hosts.
fn mesh_yaml(c: &mut Choices<'_>) -> String {
    let mut y = String::new();
    let services = 1 + c.below(4);
    for i in 0..services {
        let port = [80u16, 8080, 9090][usize::from(c.below(3))];
        let proto = ["HTTP", "HTTP2", "GRPC", "TCP"][usize::from(c.below(4))];
        let endpoints = c.below(3);
        let eps: Vec<String> = (0..endpoints)
            .map(|e| format!("{{address: 127.0.0.{}, labels: {{version: v{}}}}}", e + 1, c.below(2) + 1))
            .collect();
        y.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: svc-{i}}}\nspec:\n  hosts: [svc-{i}]\n  ports: [{{number: {port}, name: p{port}, protocol: {proto}}}]\n  resolution: STATIC\n  endpoints: [{}]\n---\n",
            eps.join(", ")
        ));
        if c.below(2) == 1 {
            y.push_str(&format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: svc-{i}}}\nspec:\n  host: svc-{i}\n  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]\n---\n"
            ));
            let w = c.below(101);
            let prefix = ["/", "/api", "/v2"][usize::from(c.below(3))];
            y.push_str(&format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: svc-{i}}}\nspec:\n  hosts: [svc-{i}]\n  http:\n  - match: [{{uri: {{prefix: {prefix}}}}}]\n    route:\n    - {{destination: {{host: svc-{i}, subset: v1}}, weight: {}}}\n    - {{destination: {{host: svc-{i}, subset: v2}}, weight: {w}}}\n  - route: [{{destination: {{host: svc-{i}}}}}]\n---\n",
                100 - u16::from(w)
            ));
        }
    }
    if c.below(2) == 1 {
        y.push_str("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  selector: {istio: ingressgateway}\n  servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: [\"*\"]}]\n---\n");
        let target = c.below(services);
        y.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: edge}}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http: [{{route: [{{destination: {{host: svc-{target}}}}}]}}]\n"
        ));
    }
    y
}

/// Two meshes from the input; for each proxy, the delta from the first to the second applied
/// to the first's whole snapshot equals the second's whole snapshot.
pub fn delta(data: &[u8]) {
    use trellis_config::encode::Delta;
    let mut c = Choices(data);
    let (ya, yb) = (mesh_yaml(&mut c), mesh_yaml(&mut c));
    let load = |y: &str| {
        let l = trellis_config::load::load_str(Path::new("mesh.yaml"), y);
        let mut f = l.findings;
        f.extend(trellis_config::analyze::analyze(&l.resources, &[]));
        (!f.iter().any(|f| f.is_error())).then_some(l.resources)
    };
    let (Some(a), Some(b)) = (load(&ya), load(&yb)) else { return };
    let (ga, gb) = (Generation::new(&a), Generation::new(&b));
    for spec in specs() {
        let ea = ga.compile(&a, &spec).expect("encode a");
        let eb = gb.compile(&b, &spec).expect("encode b");
        let full_a: trellis_config::snapshot::Snapshot = serde_json::from_slice(&ea.full().expect("full")).expect("a");
        let delta: Delta = serde_json::from_slice(&eb.delta(&ea).expect("delta")).expect("delta JSON reads back");
        let applied = delta.apply(&full_a, eb.version.clone()).expect("a delta applies to its own base");
        assert_eq!(applied, compile(&b, &[], &spec), "delta from:\n{ya}\nto:\n{yb}");
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    fn inputs(target: &str) -> Vec<PathBuf> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
        let mut out = Vec::new();
        for kind in ["seeds", "regressions"] {
            let dir = root.join(kind).join(target);
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                out.push(e.path());
            }
        }
        out.sort();
        out
    }

    /// Every seed and every crash the fuzzers found, through its target.
    #[test]
    fn seeds_and_regressions_replay() {
        for (name, target) in super::TARGETS {
            let files = inputs(name);
            assert!(!files.is_empty(), "no seeds for {name}");
            for f in files {
                let data = std::fs::read(&f).expect("read input");
                let outcome = std::panic::catch_unwind(|| target(&data));
                assert!(outcome.is_ok(), "{name} panicked on {}", f.display());
            }
        }
    }
}
