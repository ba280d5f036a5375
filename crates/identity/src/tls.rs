//! Mutual TLS between proxies, and TLS origination to services outside the mesh.
//!
//! Mesh configurations read the current [`Credentials`] from a [`CredentialStore`] on every
//! handshake, so a rotated certificate (or trust bundle) takes effect for the next connection
//! with no restart and no dropped connection. Peers are verified against the trust bundle
//! without host names (mesh certificates carry only a SPIFFE URI); a client also checks that the
//! server's SPIFFE id is one it expects for the destination.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};

use crate::cert::{spiffe_ids, Credentials};
use crate::{provider, Error, SpiffeId};

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
/// Mesh mTLS carrying opaque TCP: the client sends its peer metadata first (see the proxy's
/// `tcp` module), then the connection's bytes.
pub const ALPN_TCP: &[u8] = b"trellis-tcp";

/// The credentials a proxy holds now; empty until its first certificate arrives.
#[derive(Default, Debug)]
pub struct CredentialStore {
    current: ArcSwapOption<Credentials>,
}

impl CredentialStore {
    pub fn load(&self) -> Option<Arc<Credentials>> {
        self.current.load_full()
    }

    pub fn store(&self, c: Credentials) {
        self.current.store(Some(Arc::new(c)));
    }

    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }
}

#[derive(Debug)]
struct StoreResolver(Arc<CredentialStore>);

impl rustls::server::ResolvesServerCert for StoreResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.load().map(|c| c.certified.clone())
    }
}

impl rustls::client::ResolvesClientCert for StoreResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.load().map(|c| c.certified.clone())
    }

    fn has_certs(&self) -> bool {
        self.0.is_ready()
    }
}

fn verify_chain(
    store: &CredentialStore,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<Vec<SpiffeId>, rustls::Error> {
    let creds = store.load().ok_or_else(|| rustls::Error::General("no trust bundle yet".into()))?;
    let cert = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|e| rustls::Error::General(format!("bad peer certificate: {e}")))?;
    cert.verify_for_usage(
        provider().signature_verification_algorithms.all,
        &creds.anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(|e| rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(e)))))?;
    let ids = spiffe_ids(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
    if ids.is_empty() {
        return Err(rustls::Error::General("peer certificate has no SPIFFE id".into()));
    }
    Ok(ids)
}

/// The handshake-signature methods every verifier here shares: checked with our crypto
/// provider's algorithms (only the certificate checks differ between verifiers).
macro_rules! handshake_signatures_by_provider {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            provider().signature_verification_algorithms.supported_schemes()
        }
    };
}

#[derive(Debug)]
struct SpiffeClientVerifier(Arc<CredentialStore>);

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_chain(&self.0, end_entity, intermediates, now, webpki::KeyUsage::client_auth())?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures_by_provider!();
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    store: Arc<CredentialStore>,
    /// Identities the server may have; empty means any identity the bundle vouches for.
    expected: Vec<SpiffeId>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ids = verify_chain(&self.store, end_entity, intermediates, now, webpki::KeyUsage::server_auth())?;
        if !self.expected.is_empty() && !ids.iter().any(|id| self.expected.contains(id)) {
            let want: Vec<String> = self.expected.iter().map(|i| i.to_string()).collect();
            return Err(rustls::Error::General(format!("server identity {} is not one of {want:?}", ids[0])));
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures_by_provider!();
}

/// The inbound (server) side of mesh mTLS: TLS 1.3, client certificate required.
pub fn mesh_server(store: Arc<CredentialStore>) -> Result<Arc<ServerConfig>, Error> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier(store.clone())))
        .with_cert_resolver(Arc::new(StoreResolver(store)));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec(), ALPN_TCP.to_vec()];
    Ok(Arc::new(cfg))
}

/// A plain TLS server (no client certificate) presenting `chain_pem` with `key_pem`: the control
/// plane's HTTPS endpoints that the Kubernetes API server calls (admission webhooks).
pub fn simple_server(chain_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, Error> {
    let chain = crate::cert::parse_pem_certs(chain_pem)?;
    let key = crate::cert::parse_pem_key(key_pem)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(cfg))
}

/// The outbound (client) side of mesh mTLS towards servers holding one of `expected`, with
/// ALPN carrying the application protocol.
pub fn mesh_client(
    store: Arc<CredentialStore>,
    expected: Vec<SpiffeId>,
    alpn: &[u8],
) -> Result<Arc<ClientConfig>, Error> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier { store: store.clone(), expected }))
        .with_client_cert_resolver(Arc::new(StoreResolver(store)));
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg.enable_sni = false;
    Ok(Arc::new(cfg))
}

/// The SPIFFE id of a connection's peer, from its certificate.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<SpiffeId> {
    let certs = conn.peer_certificates()?;
    spiffe_ids(certs.first()?).ok()?.into_iter().next()
}

/// TLS origination to a server outside the mesh (DestinationRule `SIMPLE` or `MUTUAL`): its
/// certificate verified against `ca_pem` (or the system roots) and its name (the SNI, or one of
/// `subject_alt_names`), optionally presenting a client certificate.
pub fn origination(
    ca_pem: Option<&str>,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    insecure_skip_verify: bool,
    alpn: &[u8],
) -> Result<Arc<ClientConfig>, Error> {
    let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = if insecure_skip_verify {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match ca_pem {
            Some(pem) => {
                for c in crate::cert::parse_pem_certs(pem)? {
                    roots.add(c).map_err(Error::Tls)?;
                }
            }
            None => {
                for c in rustls_native_roots() {
                    let _ = roots.add(c);
                }
            }
        }
        builder.with_root_certificates(roots)
    };
    let mut cfg = match client {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}

fn rustls_native_roots() -> Vec<CertificateDer<'static>> {
    // The system store, as Debian ships it.
    std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt")
        .ok()
        .and_then(|pem| crate::cert::parse_pem_certs(&pem).ok())
        .unwrap_or_default()
}

#[derive(Debug)]
struct NoVerify;

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures_by_provider!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CertificateAuthority;
    use crate::cert::{generate_csr, parse_pem_certs, TrustBundle, WorkloadCert};

    fn creds(ca: &CertificateAuthority, sa: &str) -> Arc<CredentialStore> {
        let id = SpiffeId::new("cluster.local", "default", sa);
        let kc = generate_csr(&id).expect("csr");
        let chain = parse_pem_certs(&ca.sign(&kc.csr_pem, &id).expect("sign").join("")).expect("pem");
        let store = Arc::new(CredentialStore::default());
        store.store(
            Credentials::new(
                WorkloadCert::new(kc.key, chain).expect("cert"),
                TrustBundle::from_pem(ca.bundle_pem()).expect("bundle"),
            )
            .expect("creds"),
        );
        store
    }

    fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> Result<(Option<SpiffeId>, Option<SpiffeId>), rustls::Error> {
        let mut c = rustls::ClientConnection::new(client, ServerName::try_from("127.0.0.1").expect("name"))?;
        let mut s = rustls::ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).expect("write");
            s.read_tls(&mut buf.as_slice()).expect("read");
            s.process_new_packets()?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).expect("write");
            c.read_tls(&mut buf.as_slice()).expect("read");
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
        }
        Ok((peer_identity(&s), peer_identity(&c)))
    }

    #[test]
    fn mutual_tls_checks_chain_and_identity() {
        let dir = std::env::temp_dir().join(format!("trellis-tls-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = CertificateAuthority::load_or_generate(&dir, "cluster.local", std::time::Duration::from_secs(600))
            .expect("ca");
        let (a, b) = (creds(&ca, "a"), creds(&ca, "b"));
        let b_id = SpiffeId::new("cluster.local", "default", "b");
        let (seen_by_server, seen_by_client) = handshake(
            mesh_client(a.clone(), vec![b_id.clone()], ALPN_H2).expect("client"),
            mesh_server(b.clone()).expect("server"),
        )
        .expect("handshake");
        assert_eq!(seen_by_server.map(|i| i.service_account), Some("a".to_string()));
        assert_eq!(seen_by_client, Some(b_id));
        // The client refuses a server that is not who it expects.
        let wrong = SpiffeId::new("cluster.local", "default", "c");
        assert!(handshake(
            mesh_client(a.clone(), vec![wrong], ALPN_H2).expect("client"),
            mesh_server(b.clone()).expect("server")
        )
        .is_err());
        // A certificate from another CA is refused.
        let other_dir = dir.join("other");
        let other =
            CertificateAuthority::load_or_generate(&other_dir, "cluster.local", std::time::Duration::from_secs(600))
                .expect("ca");
        let stranger = creds(&other, "a");
        assert!(handshake(mesh_client(stranger, vec![], ALPN_H2).expect("client"), mesh_server(b).expect("server"))
            .is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
