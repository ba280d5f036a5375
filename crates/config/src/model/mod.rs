//! The typed config model: every resource Trellis reads, with where it came from.
//!
//! A [`Resource`] is one YAML document: its kind, metadata, typed spec and source (file and node
//! tree, so any field can be located for a finding). The model is plain data: it does not
//! validate (see `analyze`) and does not route (see `compile`).

pub mod duration;
pub mod kube;
pub mod networking;
pub mod security;
pub mod telemetry;
pub mod trellis;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

pub use duration::Duration;

use crate::yaml::{Node, Pos, Seg};

/// The kinds Trellis understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Kind {
    Gateway,
    VirtualService,
    DestinationRule,
    ServiceEntry,
    WorkloadEntry,
    Service,
    PeerAuthentication,
    AuthorizationPolicy,
    RequestAuthentication,
    Telemetry,
    /// `trellis.dev/v1alpha1`: a local process of the mesh.
    Workload,
    /// Kubernetes kinds that run pods (`Pod`, `Deployment`, `StatefulSet`, `DaemonSet`,
    /// `ReplicaSet`, `Job`, `CronJob`): read for their pods' labels and service account, so
    /// `analyze` knows which workloads selectors and subsets reach.
    Pod,
    Deployment,
    StatefulSet,
    DaemonSet,
    ReplicaSet,
    Job,
    CronJob,
    /// `Namespace` (its labels: sidecar injection) and `ServiceAccount` (an identity): read so a
    /// folder of application manifests loads without warnings; nothing is compiled from them.
    Namespace,
    ServiceAccount,
    /// The Gateway API (`gateway.networking.k8s.io`), read as the Istio kinds they mean (see
    /// `gateway_api`).
    GatewayApiGateway,
    HttpRoute,
    GrpcRoute,
    /// `discovery.k8s.io/v1`: endpoints of Services without a selector.
    EndpointSlice,
    /// `networking.istio.io` EnvoyFilter: only the documented local rate limit is read.
    EnvoyFilter,
    /// `networking.istio.io` Sidecar: its `outboundTrafficPolicy`.
    Sidecar,
    /// `trellis.dev` RateLimit: a local rate limit for selected workloads.
    RateLimit,
}

impl Kind {
    /// Resolves `apiVersion` + `kind`; `Err` carries why the pair is not accepted.
    pub fn resolve(api_version: &str, kind: &str) -> Result<Kind, String> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        type Group<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, Kind)]);
        let known: &[Group<'_>] = &[
            (
                "networking.istio.io",
                &["v1alpha3", "v1beta1", "v1"],
                &[
                    ("Gateway", Kind::Gateway),
                    ("VirtualService", Kind::VirtualService),
                    ("DestinationRule", Kind::DestinationRule),
                    ("ServiceEntry", Kind::ServiceEntry),
                    ("WorkloadEntry", Kind::WorkloadEntry),
                    ("EnvoyFilter", Kind::EnvoyFilter),
                    ("Sidecar", Kind::Sidecar),
                ],
            ),
            (
                "security.istio.io",
                &["v1beta1", "v1"],
                &[
                    ("PeerAuthentication", Kind::PeerAuthentication),
                    ("AuthorizationPolicy", Kind::AuthorizationPolicy),
                    ("RequestAuthentication", Kind::RequestAuthentication),
                ],
            ),
            ("telemetry.istio.io", &["v1alpha1", "v1"], &[("Telemetry", Kind::Telemetry)]),
            (
                "",
                &["v1"],
                &[
                    ("Service", Kind::Service),
                    ("Pod", Kind::Pod),
                    ("Namespace", Kind::Namespace),
                    ("ServiceAccount", Kind::ServiceAccount),
                ],
            ),
            (
                "apps",
                &["v1"],
                &[
                    ("Deployment", Kind::Deployment),
                    ("StatefulSet", Kind::StatefulSet),
                    ("DaemonSet", Kind::DaemonSet),
                    ("ReplicaSet", Kind::ReplicaSet),
                ],
            ),
            ("batch", &["v1"], &[("Job", Kind::Job), ("CronJob", Kind::CronJob)]),
            ("discovery.k8s.io", &["v1"], &[("EndpointSlice", Kind::EndpointSlice)]),
            (
                "gateway.networking.k8s.io",
                &["v1", "v1beta1"],
                &[("Gateway", Kind::GatewayApiGateway), ("HTTPRoute", Kind::HttpRoute), ("GRPCRoute", Kind::GrpcRoute)],
            ),
            ("trellis.dev", &["v1alpha1"], &[("Workload", Kind::Workload), ("RateLimit", Kind::RateLimit)]),
        ];
        for (g, versions, kinds) in known {
            if *g != group {
                continue;
            }
            let Some((_, k)) = kinds.iter().find(|(name, _)| *name == kind) else {
                return Err(format!(
                    "kind {kind:?} of {api_version:?} is not read by Trellis; the resource is ignored"
                ));
            };
            if !versions.contains(&version) {
                return Err(format!(
                    "apiVersion {api_version:?} is not supported for {kind}; use one of {}",
                    versions
                        .iter()
                        .map(|v| if g.is_empty() { v.to_string() } else { format!("{g}/{v}") })
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            return Ok(*k);
        }
        Err(format!("{kind} ({api_version}) is not read by Trellis; the resource is ignored"))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Gateway => "Gateway",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::Service => "Service",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::Telemetry => "Telemetry",
            Kind::Workload => "Workload",
            Kind::EnvoyFilter => "EnvoyFilter",
            Kind::Sidecar => "Sidecar",
            Kind::RateLimit => "RateLimit",
            Kind::Pod => "Pod",
            Kind::Deployment => "Deployment",
            Kind::StatefulSet => "StatefulSet",
            Kind::DaemonSet => "DaemonSet",
            Kind::ReplicaSet => "ReplicaSet",
            Kind::Job => "Job",
            Kind::CronJob => "CronJob",
            Kind::Namespace => "Namespace",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::GatewayApiGateway => "Gateway.gateway.networking.k8s.io",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }

    /// Whether resources of this kind run pods (their template is a workload).
    pub fn runs_pods(self) -> bool {
        matches!(
            self,
            Kind::Pod
                | Kind::Deployment
                | Kind::StatefulSet
                | Kind::DaemonSet
                | Kind::ReplicaSet
                | Kind::Job
                | Kind::CronJob
        )
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    // Set by Kubernetes on objects exported from a cluster; accepted and ignored.
    #[serde(skip_serializing)]
    pub generate_name: Option<serde_json::Value>,
    #[serde(skip_serializing)]
    pub uid: Option<serde_json::Value>,
    #[serde(skip_serializing)]
    pub resource_version: Option<serde_json::Value>,
    #[serde(skip_serializing)]
    pub generation: Option<serde_json::Value>,
    #[serde(skip_serializing)]
    pub creation_timestamp: Option<serde_json::Value>,
    #[serde(skip_serializing)]
    pub owner_references: Option<serde_json::Value>,
    #[serde(skip_serializing)]
    pub finalizers: Option<serde_json::Value>,
    #[serde(skip_serializing)]
    pub managed_fields: Option<serde_json::Value>,
}

/// The namespace a resource lives in when its metadata names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A resource's typed specification.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(untagged)]
pub enum Spec {
    Gateway(networking::Gateway),
    VirtualService(networking::VirtualService),
    DestinationRule(networking::DestinationRule),
    ServiceEntry(networking::ServiceEntry),
    WorkloadEntry(networking::WorkloadEntry),
    Service(kube::Service),
    Workload(trellis::Workload),
    /// A kind that runs pods, reduced to its pod template (see [`kube::PodTemplate`]).
    PodTemplate(kube::PodTemplate),
    /// `Namespace` and `ServiceAccount`: metadata only.
    Metadata,
    EndpointSlice(kube::EndpointSlice),
    Telemetry(telemetry::Telemetry),
    PeerAuthentication(security::PeerAuthentication),
    AuthorizationPolicy(security::AuthorizationPolicy),
    RequestAuthentication(security::RequestAuthentication),
    EnvoyFilter(networking::EnvoyFilter),
    Sidecar(networking::Sidecar),
    RateLimit(trellis::RateLimit),
}

/// Where a resource was read from.
#[derive(Clone, Debug)]
pub struct Source {
    pub file: Arc<PathBuf>,
    /// The whole document, to locate any field of the resource.
    pub doc: Arc<Node>,
}

/// One resource of the config.
#[derive(Clone, Debug)]
pub struct Resource {
    pub kind: Kind,
    pub api_version: String,
    pub meta: ObjectMeta,
    pub spec: Spec,
    pub source: Source,
}

impl Resource {
    pub fn name(&self) -> &str {
        &self.meta.name
    }

    pub fn namespace(&self) -> &str {
        self.meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }

    /// `Kind namespace/name`, as findings name a resource.
    pub fn id(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace(), self.meta.name)
    }

    /// The position of a field; falls back to the nearest enclosing node that exists.
    pub fn pos(&self, path: &[Seg]) -> Pos {
        self.source.doc.locate(path).0
    }
}

/// Builds a path from mixed keys and indices: `path!["spec", "http", 0, "route"]`.
#[macro_export]
macro_rules! path {
    ($($seg:expr),* $(,)?) => {
        vec![$($crate::yaml::Seg::from($seg)),*]
    };
}
