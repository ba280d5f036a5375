//! The one Trellis kind, `trellis.dev/v1alpha1` `Workload`: a local process of the mesh, with
//! what no Istio or Kubernetes kind says for a process outside a cluster (command, environment,
//! the port the app listens on, its readiness probe, the services it calls). Labels come from
//! metadata, as for a pod; Services and ServiceEntries select workloads by those labels.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Workload {
    /// The program and its arguments. A bare program name is looked up next to the `trellis`
    /// executable first, then on `PATH`.
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Relative to the config file's directory.
    pub working_dir: Option<String>,
    /// The port the app listens on; by default one is chosen and passed as `PORT`.
    pub app_port: Option<u32>,
    /// The app's protocol: HTTP (default), HTTP2 or GRPC.
    pub protocol: Option<String>,
    pub readiness_probe: Option<Probe>,
    pub service_account: Option<String>,
    /// Services this workload calls: each gets `<NAME>_URL=http://<name>` and
    /// `<NAME>_ADDR=127.0.0.1:<port>` (a local port of the sidecar bound to that service).
    pub upstreams: Vec<String>,
    /// When the program is not installed, `trellis up` says so and runs the mesh without this
    /// workload (its callers find it unreachable) instead of failing.
    pub optional: bool,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Probe {
    pub http_get: Option<HttpGet>,
    pub initial_delay_seconds: Option<u32>,
    pub period_seconds: Option<u32>,
    pub timeout_seconds: Option<u32>,
    pub failure_threshold: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpGet {
    pub path: String,
}

/// `RateLimit` (trellis.dev/v1alpha1): at most `requests` per `interval` (a token bucket holding
/// `burst`) to the selected workloads' inbound side, or through the selected gateways; with
/// `routes`, a bucket for each named route (VirtualService `http[].name`) instead.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RateLimit {
    pub selector: Option<crate::model::security::WorkloadSelector>,
    pub requests: u32,
    pub interval: Option<crate::model::Duration>,
    pub burst: Option<u32>,
    pub routes: Vec<String>,
}
