//! `telemetry.istio.io` `Telemetry`: tracing sampling and access logging per mesh, namespace or
//! workload. (Metric overrides are parsed and kept, not enforced yet.)

use serde::Deserialize;
use serde_json::Value as Json;

use super::networking::Labels;

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Telemetry {
    pub selector: Option<Selector>,
    pub target_ref: Option<Json>,
    pub target_refs: Option<Json>,
    pub tracing: Vec<Tracing>,
    pub access_logging: Vec<AccessLogging>,
    pub metrics: Option<Json>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Selector {
    pub match_labels: Labels,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ProviderRef {
    pub name: String,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Tracing {
    pub providers: Vec<ProviderRef>,
    pub random_sampling_percentage: Option<f64>,
    pub disable_span_reporting: Option<bool>,
    #[serde(rename = "match")]
    pub match_: Option<Json>,
    pub custom_tags: Option<Json>,
    pub use_request_id_for_trace_sampling: Option<Json>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct AccessLogging {
    pub providers: Vec<ProviderRef>,
    pub disabled: Option<bool>,
    pub filter: Option<Filter>,
    #[serde(rename = "match")]
    pub match_: Option<Json>,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Filter {
    pub expression: String,
}
