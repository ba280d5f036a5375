//! Workload identity as telemetry labels see it. Built once per snapshot (for the proxy itself
//! and every endpoint), then shared by `Arc` on the request path.

use std::collections::BTreeMap;
use std::sync::Arc;

/// The label values describing one workload.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
    pub principal: Arc<str>,
    pub app: Arc<str>,
    pub version: Arc<str>,
    pub canonical_service: Arc<str>,
    pub canonical_revision: Arc<str>,
}

/// The value Istio reports for anything it cannot know.
pub const UNKNOWN: &str = "unknown";

static UNKNOWN_PRINCIPAL: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(UNKNOWN));
static UNKNOWN_IDENTITY: std::sync::LazyLock<Arc<Identity>> =
    std::sync::LazyLock::new(|| Arc::new(Identity::unknown()));
static UNKNOWN_SERVICE: std::sync::LazyLock<Arc<ServiceLabels>> =
    std::sync::LazyLock::new(|| Arc::new(ServiceLabels::unknown()));

/// One shared `unknown` principal (shared so per-request records allocate nothing for it, and
/// caches keyed by identity see one value).
pub fn unknown_principal() -> Arc<str> {
    UNKNOWN_PRINCIPAL.clone()
}

/// One shared unknown identity.
pub fn unknown_identity() -> Arc<Identity> {
    UNKNOWN_IDENTITY.clone()
}

/// One shared unknown service.
pub fn unknown_service() -> Arc<ServiceLabels> {
    UNKNOWN_SERVICE.clone()
}

impl Identity {
    /// Derives labels as Istio does: `app`/`version` labels (or their `app.kubernetes.io`
    /// forms), canonical names from `service.istio.io/canonical-*`, falling back to the app and
    /// version.
    pub fn new(
        workload: &str,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        principal: Option<&str>,
    ) -> Identity {
        let get = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).cloned();
        let app = get(&["app", "app.kubernetes.io/name"]).unwrap_or_else(|| {
            if workload.is_empty() {
                UNKNOWN.into()
            } else {
                workload.to_string()
            }
        });
        let version = get(&["version", "app.kubernetes.io/version"]).unwrap_or_else(|| UNKNOWN.into());
        let canonical_service = get(&["service.istio.io/canonical-name"]).unwrap_or_else(|| app.clone());
        let canonical_revision = get(&["service.istio.io/canonical-revision"]).unwrap_or_else(|| {
            if version == UNKNOWN {
                "latest".into()
            } else {
                version.clone()
            }
        });
        Identity {
            workload: Arc::from(if workload.is_empty() { UNKNOWN } else { workload }),
            namespace: Arc::from(if namespace.is_empty() { UNKNOWN } else { namespace }),
            principal: Arc::from(principal.unwrap_or(UNKNOWN)),
            app: Arc::from(app),
            version: Arc::from(version),
            canonical_service: Arc::from(canonical_service),
            canonical_revision: Arc::from(canonical_revision),
        }
    }

    pub fn unknown() -> Identity {
        let u: Arc<str> = Arc::from(UNKNOWN);
        Identity {
            workload: u.clone(),
            namespace: u.clone(),
            principal: u.clone(),
            app: u.clone(),
            version: u.clone(),
            canonical_service: u.clone(),
            canonical_revision: Arc::from("latest"),
        }
    }
}

/// The destination service of a request, as labels see it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceLabels {
    /// The FQDN (`reviews.default.svc.cluster.local`, or a ServiceEntry host).
    pub host: Arc<str>,
    pub name: Arc<str>,
    pub namespace: Arc<str>,
}

impl ServiceLabels {
    pub fn new(host: &str, name: &str, namespace: &str) -> ServiceLabels {
        ServiceLabels { host: Arc::from(host), name: Arc::from(name), namespace: Arc::from(namespace) }
    }

    pub fn unknown() -> ServiceLabels {
        ServiceLabels::new(UNKNOWN, UNKNOWN, UNKNOWN)
    }
}
