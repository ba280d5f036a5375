//! The proxy's side of identity: it makes its own key pair (the private key never leaves the
//! process), sends a CSR with its bootstrap token to the control plane, and keeps the signed
//! certificate in the [`CredentialStore`] its TLS configurations read on every handshake.
//! It renews at 80% of the lifetime, with a fresh key, so rotation drops no connection:
//! established connections keep their session, new ones use the new certificate.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use trellis_api::control::{control_client::ControlClient, CertificateRequest};
use trellis_identity::cert::{generate_csr, parse_pem_certs, Credentials, TrustBundle, WorkloadCert};
use trellis_identity::tls::CredentialStore;
use trellis_identity::SpiffeId;

use crate::state::Shared;

/// Where the proof of identity comes from.
#[derive(Clone, Debug)]
pub enum Token {
    /// A bootstrap token handed over once (`trellis up`).
    Value(String),
    /// A file re-read at every request: a Pod's projected service-account token, which the
    /// kubelet rotates.
    File(std::path::PathBuf),
}

impl Token {
    pub fn read(&self) -> Result<String, String> {
        match self {
            Token::Value(v) => Ok(v.clone()),
            Token::File(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("cannot read token file {}: {e}", path.display())),
        }
    }
}

/// Keeps `store` filled with a valid certificate for `id` until the proxy drains.
pub async fn run(store: Arc<CredentialStore>, control_plane: String, token: Token, id: SpiffeId, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    let mut failures = 0u32;
    loop {
        let fetched = match token.read() {
            Ok(t) => fetch(&control_plane, &t, &id).await,
            Err(e) => Err(e),
        };
        let next = match fetched {
            Ok(creds) => {
                let refresh = creds.cert.refresh_at(0.8);
                tracing::info!(identity = %id, expires_in_s = creds.cert.not_after.duration_since(SystemTime::now()).unwrap_or_default().as_secs(), "certificate installed");
                store.store(creds);
                backoff = Duration::from_millis(100);
                failures = 0;
                refresh.duration_since(SystemTime::now()).unwrap_or(Duration::from_secs(1))
            }
            Err(e) => {
                // The control plane may still be starting: only a persistent failure is news.
                failures += 1;
                if failures > 5 {
                    tracing::warn!(identity = %id, "cannot get a certificate: {e}");
                } else {
                    tracing::debug!(identity = %id, "cannot get a certificate yet: {e}");
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                backoff
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = shared.drain.started() => return,
        }
    }
}

async fn fetch(control_plane: &str, token: &str, id: &SpiffeId) -> Result<Credentials, String> {
    let kc = generate_csr(id).map_err(|e| e.to_string())?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{control_plane}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let reply = ControlClient::new(channel)
        .create_certificate(CertificateRequest { csr_pem: kc.csr_pem, token: token.to_string() })
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let chain = parse_pem_certs(&reply.cert_chain_pem.join("\n")).map_err(|e| e.to_string())?;
    let cert = WorkloadCert::new(kc.key, chain).map_err(|e| e.to_string())?;
    if &cert.id != id {
        return Err(format!("the control plane issued {} instead of {id}", cert.id));
    }
    let bundle = TrustBundle::from_pem(&reply.trust_bundle_pem).map_err(|e| e.to_string())?;
    Credentials::new(cert, bundle).map_err(|e| e.to_string())
}
