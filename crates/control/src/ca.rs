//! The certificate service: signs a workload's CSR for the identity its token proves.
//!
//! Who a caller is comes from an [`Authenticator`]. In local mode `trellis up` writes one random
//! token per workload into a tokens file (mode 0600) and hands each sidecar its own; the control
//! plane trusts a token for exactly the identity listed with it ([`TokensFile`]). On Kubernetes
//! the token is the Pod's projected service-account token, checked with a TokenReview
//! (`trellis_kube::identity`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use trellis_identity::ca::CertificateAuthority;
use trellis_identity::SpiffeId;

/// What a tokens file maps each token to.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenIdentity {
    pub namespace: String,
    pub service_account: String,
}

/// `{"tokens": {"<token>": {"namespace": "...", "serviceAccount": "..."}}}`
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct TokensFile {
    pub tokens: BTreeMap<String, TokenIdentity>,
}

/// Tells which workload identity a bearer token proves.
#[tonic::async_trait]
pub trait Authenticator: Send + Sync {
    /// The namespace and service account `token` proves, or why it proves none.
    async fn authenticate(&self, token: &str) -> Result<TokenIdentity, String>;
}

/// Tokens listed in a file (local mode), re-read at every request: tokens are rare, and
/// `trellis up` may rewrite the file.
pub struct TokensFileAuthenticator {
    pub path: PathBuf,
}

#[tonic::async_trait]
impl Authenticator for TokensFileAuthenticator {
    async fn authenticate(&self, token: &str) -> Result<TokenIdentity, String> {
        let path = &self.path;
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let file: TokensFile =
            serde_json::from_str(&text).map_err(|e| format!("bad tokens file {}: {e}", path.display()))?;
        file.tokens.get(token).cloned().ok_or_else(|| "unknown token".to_string())
    }
}

pub struct CertificateService {
    pub ca: CertificateAuthority,
    /// None: this control plane cannot tell who a caller is, and issues nothing.
    pub authenticator: Option<Box<dyn Authenticator>>,
}

impl CertificateService {
    /// The identity `token` proves.
    pub async fn identity(&self, token: &str) -> Result<SpiffeId, String> {
        let auth = self
            .authenticator
            .as_ref()
            .ok_or("this control plane has no way to check tokens (no tokens file, no cluster): it cannot tell who a caller is")?;
        let id = auth.authenticate(token).await?;
        Ok(SpiffeId::new(&self.ca.trust_domain, &id.namespace, &id.service_account))
    }

    /// Signs `csr_pem` if it asks for exactly the identity `token` proves.
    pub async fn sign(&self, token: &str, csr_pem: &str) -> Result<(Vec<String>, String), tonic::Status> {
        let id = self.identity(token).await.map_err(|e| {
            tracing::warn!("refused a certificate request: {e}");
            tonic::Status::unauthenticated(e)
        })?;
        let chain = self.ca.sign(csr_pem, &id).map_err(|e| {
            tracing::warn!(identity = %id, "refused a CSR: {e}");
            tonic::Status::permission_denied(e.to_string())
        })?;
        tracing::info!(identity = %id, ttl_seconds = self.ca.ttl.as_secs(), "issued a workload certificate");
        Ok((chain, self.ca.bundle_pem().to_string()))
    }
}
