//! EnvoyFilter, as far as Trellis reads it: Istio offers local rate limiting only through the
//! documented `envoy.filters.http.local_ratelimit` patch, so that shape is read unchanged (a
//! token bucket per workload side); every other patch is reported by `trellis analyze` as not
//! applied, never silently ignored.

use serde_json::Value as Json;

use crate::model::networking::EnvoyFilter;
use crate::model::Duration;
use crate::snapshot::{Direction, RateLimitPolicy};
use crate::yaml::Seg;

const LOCAL_RATELIMIT: &str = "envoy.filters.http.local_ratelimit";

/// What one config patch is to Trellis.
pub enum Patch {
    /// A local rate limit, for the listeners of `direction` (`None`: all).
    RateLimit(RateLimitPolicy),
    /// A per-route local rate limit (`HTTP_ROUTE` with `typed_per_filter_config`): read, not
    /// applied yet.
    PerRoute,
    /// Not applied: why.
    Unsupported(String),
    /// A local rate limit written wrong: the field and why.
    Invalid(Vec<Seg>, String),
}

/// Every patch of an EnvoyFilter, with its index.
pub fn patches(name: &str, ef: &EnvoyFilter) -> Vec<(usize, Patch)> {
    ef.config_patches.iter().enumerate().map(|(i, p)| (i, patch(name, p))).collect()
}

fn patch(name: &str, p: &Json) -> Patch {
    let apply_to = p["applyTo"].as_str().unwrap_or("");
    let value = &p["patch"]["value"];
    let filter = value["name"].as_str().unwrap_or("");
    if apply_to == "HTTP_ROUTE" && !value["typed_per_filter_config"][LOCAL_RATELIMIT].is_null() {
        return Patch::PerRoute;
    }
    if apply_to != "HTTP_FILTER" || filter != LOCAL_RATELIMIT {
        let what = if filter.is_empty() { apply_to.to_string() } else { format!("{apply_to} {filter}") };
        return Patch::Unsupported(format!(
            "this EnvoyFilter patch ({what}) is not applied: Trellis reads only the local rate limit ({LOCAL_RATELIMIT})"
        ));
    }
    let direction = match p["match"]["context"].as_str().unwrap_or("ANY") {
        "SIDECAR_INBOUND" => Some(Direction::Inbound),
        "SIDECAR_OUTBOUND" => Some(Direction::Outbound),
        "GATEWAY" => Some(Direction::Gateway),
        _ => None,
    };
    // `typed_config` is a TypedStruct (`value` holds the fields) or the message itself.
    let tc = &value["typed_config"];
    let cfg = if tc["value"].is_object() { &tc["value"] } else { tc };
    let at = |f: &[&str]| {
        let mut path: Vec<Seg> = vec!["patch".into(), "value".into(), "typed_config".into()];
        if tc["value"].is_object() {
            path.push("value".into());
        }
        path.extend(f.iter().map(|s| Seg::from(*s)));
        path
    };
    let bucket = &cfg["token_bucket"];
    let Some(max_tokens) = bucket["max_tokens"].as_u64().filter(|m| *m > 0) else {
        return Patch::Invalid(
            at(&["token_bucket", "max_tokens"]),
            "token_bucket.max_tokens (at least 1) is required".into(),
        );
    };
    let tokens_per_fill = bucket["tokens_per_fill"].as_u64().unwrap_or(1).max(1);
    let fill_interval = match bucket["fill_interval"].as_str().map(crate::model::duration::parse_duration) {
        Some(Ok(d)) if d >= std::time::Duration::from_millis(50) => d,
        Some(Ok(_)) => {
            return Patch::Invalid(
                at(&["token_bucket", "fill_interval"]),
                "fill_interval must be at least 50ms (Envoy's minimum)".into(),
            )
        }
        Some(Err(e)) => return Patch::Invalid(at(&["token_bucket", "fill_interval"]), e),
        None => {
            return Patch::Invalid(
                at(&["token_bucket", "fill_interval"]),
                "token_bucket.fill_interval is required".into(),
            )
        }
    };
    let percent = |f: &Json| {
        // Envoy's default for a missing filter_enabled / filter_enforced: 0%.
        let v = &f["default_value"];
        let num = v["numerator"].as_f64().unwrap_or(0.0);
        let den = match v["denominator"].as_str().unwrap_or("HUNDRED") {
            "TEN_THOUSAND" => 10_000.0,
            "MILLION" => 1_000_000.0,
            _ => 100.0,
        };
        (num / den * 100.0).clamp(0.0, 100.0)
    };
    let response_headers = cfg["response_headers_to_add"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| Some((h["header"]["key"].as_str()?.to_string(), h["header"]["value"].as_str()?.to_string())))
        .collect();
    Patch::RateLimit(RateLimitPolicy {
        name: name.to_string(),
        direction,
        max_tokens: max_tokens.min(u64::from(u32::MAX)) as u32,
        tokens_per_fill: tokens_per_fill.min(u64::from(u32::MAX)) as u32,
        fill_interval: Duration(fill_interval),
        enabled_percent: percent(&cfg["filter_enabled"]),
        enforced_percent: percent(&cfg["filter_enforced"]),
        response_headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ef(yaml_json: Json) -> EnvoyFilter {
        EnvoyFilter { config_patches: vec![yaml_json], ..Default::default() }
    }

    #[test]
    fn istios_documented_local_rate_limit_is_read() {
        let p = serde_json::json!({
            "applyTo": "HTTP_FILTER",
            "match": {"context": "SIDECAR_INBOUND", "listener": {"filterChain": {"filter": {"name": "envoy.filters.network.http_connection_manager"}}}},
            "patch": {"operation": "INSERT_BEFORE", "value": {
                "name": "envoy.filters.http.local_ratelimit",
                "typed_config": {
                    "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                    "type_url": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                    "value": {
                        "stat_prefix": "http_local_rate_limiter",
                        "token_bucket": {"max_tokens": 4, "tokens_per_fill": 4, "fill_interval": "60s"},
                        "filter_enabled": {"runtime_key": "local_rate_limit_enabled", "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                        "filter_enforced": {"runtime_key": "local_rate_limit_enforced", "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                        "response_headers_to_add": [{"append": false, "header": {"key": "x-local-rate-limit", "value": "true"}}]
                    }
                }
            }}
        });
        let got = patches("EnvoyFilter default/rl", &ef(p));
        let Patch::RateLimit(rl) = &got[0].1 else { panic!("not read as a rate limit") };
        assert_eq!((rl.direction, rl.max_tokens, rl.tokens_per_fill), (Some(Direction::Inbound), 4, 4));
        assert_eq!(rl.fill_interval.0, std::time::Duration::from_secs(60));
        assert_eq!((rl.enabled_percent, rl.enforced_percent), (100.0, 100.0));
        assert_eq!(rl.response_headers, vec![("x-local-rate-limit".into(), "true".into())]);
    }

    #[test]
    fn other_patches_are_reported() {
        let p = serde_json::json!({"applyTo": "CLUSTER", "patch": {"operation": "MERGE", "value": {}}});
        assert!(matches!(patches("x", &ef(p))[0].1, Patch::Unsupported(_)));
        let p = serde_json::json!({"applyTo": "HTTP_FILTER", "patch": {"value": {"name": "envoy.filters.http.lua"}}});
        assert!(matches!(patches("x", &ef(p))[0].1, Patch::Unsupported(_)));
        let p = serde_json::json!({"applyTo": "HTTP_FILTER", "patch": {"value": {"name": LOCAL_RATELIMIT, "typed_config": {"token_bucket": {"max_tokens": 1}}}}});
        assert!(matches!(patches("x", &ef(p))[0].1, Patch::Invalid(..)));
    }
}
