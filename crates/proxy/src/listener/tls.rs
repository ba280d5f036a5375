//! TLS a gateway port terminates (Gateway `HTTPS` servers, `SIMPLE` or `MUTUAL`).
//!
//! The ClientHello is read first (rustls' lazy acceptor): its SNI picks the server — the first
//! whose hosts match, else the first — and that server's own config finishes the handshake, so
//! one port can serve several certificates, and mutual TLS for some names only. Each server's
//! files (or its `credentialName` in the proxy's credentials directory) are read when the
//! snapshot is built and again, at most every 500 ms, when a handshake finds them changed: a
//! renewed certificate is served to new connections while open ones continue.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use trellis_config::snapshot::{ListenerTls, TlsCredential, TlsServer};

use crate::runtime::Problem;

/// How often a handshake may look at the files again.
const RECHECK: Duration = Duration::from_millis(500);

pub struct GatewayTls {
    servers: Vec<Server>,
}

struct Server {
    hosts: Vec<String>,
    spec: TlsServer,
    files: Files,
    config: ArcSwap<ServerConfig>,
    /// When the files were last looked at, and their modification times then.
    checked: Mutex<(Instant, Vec<Option<SystemTime>>)>,
}

/// Where a server's PEM files are.
struct Files {
    certificate: PathBuf,
    private_key: PathBuf,
    ca: Option<PathBuf>,
}

impl Files {
    fn of(credential: &TlsCredential, dir: Option<&Path>) -> Result<Files, Problem> {
        Ok(match credential {
            TlsCredential::Files { certificate, private_key, ca_certificates } => Files {
                certificate: certificate.into(),
                private_key: private_key.into(),
                ca: ca_certificates.as_ref().map(PathBuf::from),
            },
            TlsCredential::Named(name) => {
                let dir = dir.ok_or_else(|| {
                    Problem::Tls(format!(
                        "credentialName {name}: this proxy has no credentials directory (--credentials-dir)"
                    ))
                })?;
                let secret = dir.join(name);
                // The CA: in the secret itself (`ca.crt`), or in `<name>-cacert`, as Istio reads them.
                let ca = [secret.join("ca.crt"), dir.join(format!("{name}-cacert")).join("ca.crt")]
                    .into_iter()
                    .find(|p| p.exists());
                Files { certificate: secret.join("tls.crt"), private_key: secret.join("tls.key"), ca }
            }
        })
    }

    fn stamps(&self) -> Vec<Option<SystemTime>> {
        [Some(&self.certificate), Some(&self.private_key), self.ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }
}

impl GatewayTls {
    pub fn build(spec: &ListenerTls, credentials_dir: Option<&Path>) -> Result<GatewayTls, Problem> {
        let servers = spec
            .servers
            .iter()
            .map(|s| {
                let files = Files::of(&s.credential, credentials_dir)?;
                let config = server_config(s, &files)?;
                let stamps = files.stamps();
                Ok(Server {
                    hosts: s.hosts.clone(),
                    spec: s.clone(),
                    files,
                    config: ArcSwap::from(config),
                    checked: Mutex::new((Instant::now(), stamps)),
                })
            })
            .collect::<Result<Vec<_>, Problem>>()?;
        Ok(GatewayTls { servers })
    }

    /// The server for a client's SNI.
    fn pick(&self, sni: Option<&str>) -> Option<&Server> {
        let by_name = sni.and_then(|name| {
            let name = name.to_ascii_lowercase();
            self.servers.iter().find(|s| s.hosts.iter().any(|h| host_matches(h, &name)))
        });
        by_name.or(self.servers.first())
    }

    /// Reads the ClientHello, then finishes the handshake with the server its SNI names.
    pub async fn accept(&self, stream: TcpStream) -> Result<TlsStream<TcpStream>, String> {
        let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
            .await
            .map_err(|e| format!("reading the ClientHello: {e}"))?;
        let sni = start.client_hello().server_name().map(str::to_string);
        let server = self.pick(sni.as_deref()).ok_or("no TLS server")?;
        server.refresh();
        let tls = start.into_stream(server.config.load_full()).await.map_err(|e| format!("TLS handshake: {e}"))?;
        // MUTUAL with `subjectAltNames`: the client certificate must carry one of them.
        if server.spec.mutual && !server.spec.subject_alt_names.is_empty() {
            let sans = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| trellis_identity::cert::subject_alt_names(c).ok())
                .unwrap_or_default();
            if !sans.iter().any(|s| server.spec.subject_alt_names.contains(s)) {
                return Err(format!(
                    "client certificate names {sans:?}, none of subjectAltNames {:?}",
                    server.spec.subject_alt_names
                ));
            }
        }
        Ok(tls)
    }
}

impl Server {
    /// Rebuilds the config when the files changed since the last look (at most every 500 ms).
    fn refresh(&self) {
        let Ok(mut checked) = self.checked.try_lock() else { return };
        if checked.0.elapsed() < RECHECK {
            return;
        }
        checked.0 = Instant::now();
        let now = self.files.stamps();
        if now == checked.1 {
            return;
        }
        match server_config(&self.spec, &self.files) {
            Ok(cfg) => {
                self.config.store(cfg);
                checked.1 = now;
                tracing::info!(server = %self.spec.source, "certificate files changed; serving the new certificate");
            }
            // Half-written files: keep serving the old certificate and look again later.
            Err(e) => {
                tracing::warn!(server = %self.spec.source, "certificate files changed but cannot be used yet: {e}")
            }
        }
    }
}

/// `*` matches any name, `*.example.com` any name under it, anything else itself.
fn host_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => name.ends_with(suffix) && name.len() > suffix.len(),
        None => pattern == name,
    }
}

fn server_config(s: &TlsServer, files: &Files) -> Result<Arc<ServerConfig>, Problem> {
    let read =
        |p: &Path| std::fs::read_to_string(p).map_err(|e| Problem::Read { path: p.display().to_string(), source: e });
    let pem = |p: &Path| {
        let path = p.display().to_string();
        move |e: trellis_identity::Error| Problem::Pem { path, reason: e.to_string() }
    };
    let chain = trellis_identity::cert::parse_pem_certs(&read(&files.certificate)?).map_err(pem(&files.certificate))?;
    let key = trellis_identity::cert::parse_pem_key(&read(&files.private_key)?).map_err(pem(&files.private_key))?;
    let base = rustls::crypto::ring::default_provider();
    let suites = if s.cipher_suites.is_empty() {
        base.cipher_suites.clone()
    } else {
        let wanted: Vec<String> = s.cipher_suites.iter().map(|c| normalize(c)).collect();
        let chosen: Vec<_> = base
            .cipher_suites
            .iter()
            .filter(|c| {
                // TLS 1.3 suites are not configurable (as in Envoy); TLS 1.2 ones by name.
                c.version() == &rustls::version::TLS13 || wanted.contains(&normalize(&format!("{:?}", c.suite())))
            })
            .copied()
            .collect();
        if !chosen.iter().any(|c| c.version() == &rustls::version::TLS12) && max_is_tls12(s) {
            return Err(Problem::Tls(format!("none of cipherSuites {:?} is supported", s.cipher_suites)));
        }
        chosen
    };
    let provider = Arc::new(rustls::crypto::CryptoProvider { cipher_suites: suites, ..base });
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = [&rustls::version::TLS12, &rustls::version::TLS13]
        .into_iter()
        .filter(|v| {
            let rank = |name: Option<&String>| match name.map(String::as_str) {
                Some("TLSV1_3") => 3,
                _ => 2,
            };
            let this = if **v == rustls::version::TLS13 { 3 } else { 2 };
            this >= rank(s.min_version.as_ref()) && (s.max_version.is_none() || this <= rank(s.max_version.as_ref()))
        })
        .collect();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| Problem::Tls(e.to_string()))?;
    let builder = if s.mutual {
        let ca_path = files.ca.as_ref().ok_or_else(|| {
            Problem::Tls("MUTUAL needs a CA (caCertificates, or ca.crt beside the credential)".into())
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for c in trellis_identity::cert::parse_pem_certs(&read(ca_path)?).map_err(pem(ca_path))? {
            roots.add(c).map_err(|e| Problem::Tls(format!("CA {}: {e}", ca_path.display())))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| Problem::Tls(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut cfg = builder.with_single_cert(chain, key).map_err(|e| Problem::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn max_is_tls12(s: &TlsServer) -> bool {
    s.max_version.as_deref() == Some("TLSV1_2")
}

/// Cipher-suite names compared without punctuation or case, and with OpenSSL's names mapped to
/// IANA's (`ECDHE-RSA-AES128-GCM-SHA256` is `TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256`).
fn normalize(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    let iana = match upper.as_str() {
        "ECDHE-ECDSA-AES128-GCM-SHA256" => "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384" => "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "ECDHE-RSA-AES128-GCM-SHA256" => "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384" => "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305" => "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        "ECDHE-RSA-CHACHA20-POLY1305" => "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        other => other,
    };
    iana.chars().filter(|c| c.is_ascii_alphanumeric()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_patterns_and_cipher_names() {
        assert!(host_matches("*", "a.example.com"));
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(host_matches("shop.example.com", "shop.example.com"));
        assert_eq!(normalize("ECDHE-RSA-AES128-GCM-SHA256"), normalize("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"));
    }
}
