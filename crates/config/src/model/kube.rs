//! The Kubernetes kinds Trellis reads: core `v1` `Service` (a name, a selector and ports).

use serde::Deserialize;

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
