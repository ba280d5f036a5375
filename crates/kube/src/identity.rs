//! Workload identity on Kubernetes: a proxy proves who it is with its Pod's projected
//! service-account token; the control plane asks the API server (TokenReview) whose token it is
//! and signs a certificate for `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! The token must be meant for Trellis (its audience, [`AUDIENCE`] unless configured) and bound
//! to a Pod that still exists: the API server checks both, so a token copied out of a deleted Pod,
//! or one minted for another audience, proves nothing.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use trellis_control::ca::{Authenticator, TokenIdentity};

/// The audience the injected sidecar's projected token is minted for.
pub const AUDIENCE: &str = "trellis";

/// Checks tokens with the API server's TokenReview.
pub struct TokenReviewer {
    client: kube::Client,
    audiences: Vec<String>,
}

impl TokenReviewer {
    pub fn new(client: kube::Client, audiences: Vec<String>) -> TokenReviewer {
        TokenReviewer { client, audiences }
    }
}

#[tonic::async_trait]
impl Authenticator for TokenReviewer {
    async fn authenticate(&self, token: &str) -> Result<TokenIdentity, String> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(self.audiences.clone()) },
            ..Default::default()
        };
        let answer =
            api.create(&PostParams::default(), &review).await.map_err(|e| format!("TokenReview failed: {e}"))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(format!(
                "token not authenticated: {}",
                status.error.unwrap_or_else(|| "no reason given".into())
            ));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        service_account(&username).ok_or_else(|| format!("{username:?} is not a service account"))
    }
}

/// `system:serviceaccount:<namespace>:<name>` → its namespace and name.
pub fn service_account(username: &str) -> Option<TokenIdentity> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (namespace, name) = rest.split_once(':')?;
    if namespace.is_empty() || name.is_empty() || name.contains(':') {
        return None;
    }
    Some(TokenIdentity { namespace: namespace.to_string(), service_account: name.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_service_account_usernames_are_identities() {
        let id = service_account("system:serviceaccount:shop:reviews").expect("sa");
        assert_eq!((id.namespace.as_str(), id.service_account.as_str()), ("shop", "reviews"));
        assert!(service_account("admin").is_none());
        assert!(service_account("system:serviceaccount:shop").is_none());
        assert!(service_account("system:serviceaccount::x").is_none());
        assert!(service_account("system:serviceaccount:a:b:c").is_none());
    }
}
