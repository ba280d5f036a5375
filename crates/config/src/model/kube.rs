//! The Kubernetes kinds Trellis reads: core `v1` `Service` (a name, a selector and ports), and
//! the kinds that run pods, reduced to what the mesh needs of their pod template.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Kind;

use super::networking::Labels;

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Service {
    pub selector: Labels,
    pub ports: Vec<KubeServicePort>,
    #[serde(rename = "type")]
    pub service_type: Option<String>,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    pub session_affinity: Option<String>,
    pub ip_families: Vec<String>,
    pub ip_family_policy: Option<String>,
    pub internal_traffic_policy: Option<String>,
    pub external_traffic_policy: Option<String>,
    /// `type: ExternalName`: the DNS name the Service stands for.
    pub external_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeServicePort {
    pub name: Option<String>,
    pub port: u32,
    /// A number or the name of a workload port (Kubernetes' IntOrString).
    pub target_port: Option<String>,
    pub protocol: Option<String>,
    pub app_protocol: Option<String>,
    pub node_port: Option<u32>,
}

/// What the mesh needs of a pod, or of the pod template of a kind that runs pods: the labels
/// selectors match, the service account (the workload's identity) and the named container ports
/// (a Service's named `targetPort`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct PodTemplate {
    pub labels: Labels,
    pub service_account: Option<String>,
    pub ports: BTreeMap<String, u16>,
    /// A running, ready Pod's IP (set by the cluster source, never read from a manifest): the
    /// pod is then an endpoint of the Services that select it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Names of the containers (init containers included: a native sidecar is one).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<String>,
    /// `runAsUser` of the pod's security context, and of each container that sets one.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub run_as_user: BTreeMap<String, i64>,
    /// The template's `sidecar.istio.io/inject` label or annotation (`"false"` opts out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inject: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub host_network: bool,
}

/// The key of the pod-level `runAsUser` in [`PodTemplate::run_as_user`].
pub const POD_SECURITY_CONTEXT: &str = "(pod)";

impl PodTemplate {
    /// Reads the pod template of a `kind` from its `spec` (a Pod's own labels are `pod_labels`).
    /// Nothing here is validated: the API server does that; a field that is absent or of another
    /// shape reads as empty.
    pub fn from_spec(kind: Kind, spec: &serde_json::Value, pod_labels: &Labels) -> PodTemplate {
        let (labels, pod_spec) = match kind {
            Kind::Pod => (pod_labels.clone(), Some(spec)),
            Kind::CronJob => {
                let t = spec.pointer("/jobTemplate/spec/template");
                (template_labels(t), t.and_then(|t| t.get("spec")))
            }
            _ => {
                let t = spec.get("template");
                (template_labels(t), t.and_then(|t| t.get("spec")))
            }
        };
        let service_account = pod_spec
            .and_then(|s| s.get("serviceAccountName").or_else(|| s.get("serviceAccount")))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let mut ports = BTreeMap::new();
        let mut containers = Vec::new();
        let mut run_as_user = BTreeMap::new();
        if let Some(uid) = pod_spec.and_then(|s| s.pointer("/securityContext/runAsUser")).and_then(|u| u.as_i64()) {
            run_as_user.insert(POD_SECURITY_CONTEXT.to_string(), uid);
        }
        for list in ["initContainers", "containers"] {
            for c in pod_spec.and_then(|s| s.get(list)).and_then(|c| c.as_array()).into_iter().flatten() {
                let name = c.get("name").and_then(|n| n.as_str()).unwrap_or_default().to_string();
                if let Some(uid) = c.pointer("/securityContext/runAsUser").and_then(|u| u.as_i64()) {
                    run_as_user.insert(name.clone(), uid);
                }
                containers.push(name);
            }
        }
        let meta = match kind {
            Kind::Pod => None,
            Kind::CronJob => spec.pointer("/jobTemplate/spec/template/metadata"),
            _ => spec.pointer("/template/metadata"),
        };
        let inject = match meta {
            None => pod_labels.get("sidecar.istio.io/inject").cloned(),
            Some(m) => m
                .pointer("/labels/sidecar.istio.io~1inject")
                .or_else(|| m.pointer("/annotations/sidecar.istio.io~1inject"))
                .and_then(|v| v.as_str())
                .map(str::to_string),
        };
        let host_network = pod_spec.and_then(|s| s.get("hostNetwork")).and_then(|h| h.as_bool()).unwrap_or(false);
        for c in pod_spec.and_then(|s| s.get("containers")).and_then(|c| c.as_array()).into_iter().flatten() {
            for p in c.get("ports").and_then(|p| p.as_array()).into_iter().flatten() {
                let name = p.get("name").and_then(|n| n.as_str());
                let number = p.get("containerPort").and_then(|n| n.as_u64()).and_then(|n| u16::try_from(n).ok());
                if let (Some(name), Some(number)) = (name, number) {
                    ports.insert(name.to_string(), number);
                }
            }
        }
        PodTemplate { labels, service_account, ports, address: None, containers, run_as_user, inject, host_network }
    }
}

fn template_labels(template: Option<&serde_json::Value>) -> Labels {
    template
        .and_then(|t| t.pointer("/metadata/labels"))
        .and_then(|l| l.as_object())
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default()
}

/// `discovery.k8s.io/v1` `EndpointSlice`: the endpoints of a Service without a selector (whose
/// endpoints someone manages by hand or with their own controller). Services with a selector take
/// their endpoints from the Pods they select. Unlike most kinds it has no `spec`.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct EndpointSlice {
    pub address_type: Option<String>,
    pub endpoints: Vec<SliceEndpoint>,
    pub ports: Vec<SlicePort>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct SliceEndpoint {
    pub addresses: Vec<String>,
    pub conditions: SliceConditions,
    pub hostname: Option<String>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub target_ref: Option<serde_json::Value>,
    pub hints: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct SliceConditions {
    /// Absent means ready (the API's rule).
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: Option<u32>,
    pub protocol: Option<String>,
    pub app_protocol: Option<String>,
}

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
