//! Admission: RequestAuthentication (401 on a bad token), then AuthorizationPolicy (403 when
//! denied), with keys, matchers and CIDRs prepared when the snapshot was built
//! (`security::jwt`, `security::authz`).

use std::sync::Arc;

use http::uri::Authority;

use super::ConnInfo;
use crate::http::ProxyError;
use crate::runtime::Runtime;
use crate::security::authz::{Attrs, Decision};
use crate::security::jwt::Outcome;
use crate::state::Shared;
use crate::telemetry::RequestRecord;
use trellis_telemetry::metrics::AuthzLabels;

pub(super) async fn run(
    shared: &Shared,
    rt: &Runtime,
    conn: &ConnInfo,
    parts: &mut http::request::Parts,
    authority: Option<&Authority>,
    record: &mut RequestRecord,
) -> Result<(), ProxyError> {
    let verified = match rt.jwt.authenticate(parts).await {
        Outcome::NoToken => None,
        Outcome::Valid(v) => Some(v),
        Outcome::Invalid(msg) => return Err(ProxyError::jwt_denied(msg)),
    };
    record.request_principal = verified.as_ref().map(|v| v.principal.clone());
    if rt.authz.is_empty() {
        return Ok(());
    }
    let host = authority.map(|a| a.as_str()).unwrap_or("");
    let attrs = Attrs {
        principal: conn.peer_identity.as_deref().map(|p| p.trim_start_matches("spiffe://")),
        source_ip: conn.peer.ip(),
        remote_ip: conn.peer.ip(),
        request_principal: verified.as_ref().map(|v| v.principal.as_str()),
        claims: verified.as_ref().map(|v| &v.claims),
        host,
        method: parts.method.as_str(),
        path: parts.uri.path(),
        port: conn.local.port(),
        dest_ip: conn.local.ip(),
        headers: &parts.headers,
    };
    let (decision, audit) = rt.authz.evaluate(&attrs);
    let metrics = &shared.metrics.authz_decisions;
    if let Some(a) = &audit {
        metrics.get_or_create(&AuthzLabels { decision: "audit", policy: a.clone() }).inc();
    }
    record.authz_audit = audit;
    match decision {
        Decision::Allow { policy } => {
            if let Some(p) = &policy {
                metrics.get_or_create(&AuthzLabels { decision: "allow", policy: p.clone() }).inc();
            }
            record.authz_policy = policy;
            Ok(())
        }
        Decision::Deny { policy } => {
            let p = policy.unwrap_or_else(|| Arc::from("(no ALLOW policy matched)"));
            metrics.get_or_create(&AuthzLabels { decision: "deny", policy: p.clone() }).inc();
            record.authz_policy = Some(p);
            Err(ProxyError::rbac_denied())
        }
    }
}
