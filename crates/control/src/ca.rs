//! The certificate service: signs a workload's CSR for the identity its token proves.
//!
//! In local mode `trellis up` writes one random token per workload into a tokens file (mode
//! 0600) and hands each sidecar its own; the control plane trusts a token for exactly the
//! identity listed with it. (On Kubernetes the token will be the pod's service-account token,
//! checked with the API server, behind the same interface.)

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

pub struct CertificateService {
    pub ca: CertificateAuthority,
    pub tokens: Option<PathBuf>,
}

impl CertificateService {
    /// The identity `token` proves, read from the tokens file (re-read every time: tokens are
    /// rare, and `trellis up` may rewrite the file).
    pub fn identity(&self, token: &str) -> Result<SpiffeId, String> {
        let path =
            self.tokens.as_ref().ok_or("this control plane has no tokens file: it cannot tell who a caller is")?;
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let file: TokensFile =
            serde_json::from_str(&text).map_err(|e| format!("bad tokens file {}: {e}", path.display()))?;
        let id = file.tokens.get(token).ok_or("unknown token")?;
        Ok(SpiffeId::new(&self.ca.trust_domain, &id.namespace, &id.service_account))
    }

    /// Signs `csr_pem` if it asks for exactly the identity `token` proves.
    pub fn sign(&self, token: &str, csr_pem: &str) -> Result<(Vec<String>, String), tonic::Status> {
        let id = self.identity(token).map_err(tonic::Status::unauthenticated)?;
        let chain = self.ca.sign(csr_pem, &id).map_err(|e| {
            tracing::warn!(identity = %id, "refused a CSR: {e}");
            tonic::Status::permission_denied(e.to_string())
        })?;
        tracing::info!(identity = %id, ttl_seconds = self.ca.ttl.as_secs(), "issued a workload certificate");
        Ok((chain, self.ca.bundle_pem().to_string()))
    }
}
