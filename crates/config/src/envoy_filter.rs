//! EnvoyFilter, as far as Trellis reads it: Istio offers local rate limiting only through the
//! documented `envoy.filters.http.local_ratelimit` patches, so those shapes are read unchanged —
//! an `HTTP_FILTER` patch with a token bucket (one bucket per workload side), and `HTTP_ROUTE`
//! patches with `typed_per_filter_config` (a bucket per matching route); every other patch is
//! reported by `trellis analyze` as not applied, never silently ignored.

use serde_json::Value as Json;

use crate::model::networking::EnvoyFilter;
use crate::model::Duration;
use crate::snapshot::{Direction, RateLimitPolicy, RouteScope};
use crate::yaml::Seg;

const LOCAL_RATELIMIT: &str = "envoy.filters.http.local_ratelimit";

/// What one config patch is to Trellis.
pub enum Patch {
    /// A local rate limit: for the listeners of `direction` (`None`: all), or per route.
    RateLimit(RateLimitPolicy),
    /// The rate-limit filter inserted without a bucket of its own (its limits are per route).
    FilterOnly,
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
    let direction = match p["match"]["context"].as_str().unwrap_or("ANY") {
        "SIDECAR_INBOUND" => Some(Direction::Inbound),
        "SIDECAR_OUTBOUND" => Some(Direction::Outbound),
        "GATEWAY" => Some(Direction::Gateway),
        _ => None,
    };
    if apply_to == "HTTP_ROUTE" && !value["typed_per_filter_config"][LOCAL_RATELIMIT].is_null() {
        let rc = &p["match"]["routeConfiguration"];
        let known = ["portNumber", "vhost"];
        if let Some(other) = rc.as_object().and_then(|o| o.keys().find(|k| !known.contains(&k.as_str()))) {
            return Patch::Unsupported(format!(
                "this per-route rate limit is not applied: Trellis matches routes by routeConfiguration.portNumber, vhost.name and vhost.route (name, action), not by {other}"
            ));
        }
        let scope = RouteScope {
            port: rc["portNumber"].as_u64().and_then(|p| u16::try_from(p).ok()),
            vhost: rc["vhost"]["name"].as_str().map(str::to_string),
            route: rc["vhost"]["route"]["name"].as_str().map(str::to_string),
            action: rc["vhost"]["route"]["action"].as_str().filter(|a| *a != "ANY").map(str::to_string),
        };
        let base: Vec<Seg> =
            vec!["patch".into(), "value".into(), "typed_per_filter_config".into(), LOCAL_RATELIMIT.into()];
        return match bucket(name, direction, &value["typed_per_filter_config"][LOCAL_RATELIMIT], base) {
            Ok(Some(rl)) => Patch::RateLimit(RateLimitPolicy { routes: Some(scope), ..rl }),
            Ok(None) => Patch::Invalid(
                vec!["patch".into(), "value".into(), "typed_per_filter_config".into()],
                "a per-route local rate limit needs token_bucket".into(),
            ),
            Err(e) => e,
        };
    }
    if apply_to != "HTTP_FILTER" || filter != LOCAL_RATELIMIT {
        let what = if filter.is_empty() { apply_to.to_string() } else { format!("{apply_to} {filter}") };
        return Patch::Unsupported(format!(
            "this EnvoyFilter patch ({what}) is not applied: Trellis reads only the local rate limit ({LOCAL_RATELIMIT})"
        ));
    }
    let base: Vec<Seg> = vec!["patch".into(), "value".into(), "typed_config".into()];
    match bucket(name, direction, &value["typed_config"], base) {
        Ok(Some(rl)) => Patch::RateLimit(rl),
        Ok(None) => Patch::FilterOnly,
        Err(e) => e,
    }
}

/// Reads a LocalRateLimit message (a TypedStruct whose `value` holds the fields, or the message
/// itself); `None` when it has no `token_bucket` (a filter whose limits are per route).
fn bucket(
    name: &str,
    direction: Option<Direction>,
    tc: &Json,
    base: Vec<Seg>,
) -> Result<Option<RateLimitPolicy>, Patch> {
    let cfg = if tc["value"].is_object() { &tc["value"] } else { tc };
    let at = |f: &[&str]| {
        let mut path = base.clone();
        if tc["value"].is_object() {
            path.push("value".into());
        }
        path.extend(f.iter().map(|s| Seg::from(*s)));
        path
    };
    let bucket = &cfg["token_bucket"];
    if bucket.is_null() {
        return Ok(None);
    }
    let Some(max_tokens) = bucket["max_tokens"].as_u64().filter(|m| *m > 0) else {
        return Err(Patch::Invalid(
            at(&["token_bucket", "max_tokens"]),
            "token_bucket.max_tokens (at least 1) is required".into(),
        ));
    };
    let tokens_per_fill = bucket["tokens_per_fill"].as_u64().unwrap_or(1).max(1);
    let fill_interval = match bucket["fill_interval"].as_str().map(crate::model::duration::parse_duration) {
        Some(Ok(d)) if d >= std::time::Duration::from_millis(50) => d,
        Some(Ok(_)) => {
            return Err(Patch::Invalid(
                at(&["token_bucket", "fill_interval"]),
                "fill_interval must be at least 50ms (Envoy's minimum)".into(),
            ))
        }
        Some(Err(e)) => return Err(Patch::Invalid(at(&["token_bucket", "fill_interval"]), e)),
        None => {
            return Err(Patch::Invalid(
                at(&["token_bucket", "fill_interval"]),
                "token_bucket.fill_interval is required".into(),
            ))
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
    Ok(Some(RateLimitPolicy {
        name: name.to_string(),
        direction,
        routes: None,
        max_tokens: max_tokens.min(u64::from(u32::MAX)) as u32,
        tokens_per_fill: tokens_per_fill.min(u64::from(u32::MAX)) as u32,
        fill_interval: Duration(fill_interval),
        enabled_percent: percent(&cfg["filter_enabled"]),
        enforced_percent: percent(&cfg["filter_enforced"]),
        response_headers,
    }))
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
        let p = serde_json::json!({"applyTo": "HTTP_ROUTE", "match": {"routeConfiguration": {"name": "http.80"}}, "patch": {"value": {"typed_per_filter_config": {LOCAL_RATELIMIT: {"token_bucket": {"max_tokens": 1, "fill_interval": "1s"}}}}}});
        assert!(matches!(patches("x", &ef(p))[0].1, Patch::Unsupported(_)), "a route match Trellis cannot read");
    }

    #[test]
    fn istios_documented_per_route_local_rate_limit_is_read() {
        // The filter, inserted with no bucket, then a bucket per route of one virtual host.
        let filter = serde_json::json!({
            "applyTo": "HTTP_FILTER",
            "match": {"context": "SIDECAR_INBOUND", "listener": {"filterChain": {"filter": {"name": "envoy.filters.network.http_connection_manager"}}}},
            "patch": {"operation": "INSERT_BEFORE", "value": {"name": LOCAL_RATELIMIT, "typed_config": {
                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                "type_url": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                "value": {"stat_prefix": "http_local_rate_limiter"}
            }}}
        });
        let route = serde_json::json!({
            "applyTo": "HTTP_ROUTE",
            "match": {"context": "SIDECAR_INBOUND", "routeConfiguration": {"vhost": {"name": "inbound|http|9080", "route": {"action": "ANY"}}}},
            "patch": {"operation": "MERGE", "value": {"typed_per_filter_config": {LOCAL_RATELIMIT: {
                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                "type_url": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                "value": {
                    "stat_prefix": "http_local_rate_limiter",
                    "token_bucket": {"max_tokens": 4, "tokens_per_fill": 4, "fill_interval": "60s"},
                    "filter_enabled": {"runtime_key": "e", "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                    "filter_enforced": {"runtime_key": "f", "default_value": {"numerator": 100, "denominator": "HUNDRED"}}
                }
            }}}}
        });
        let got = patches(
            "EnvoyFilter default/rl",
            &EnvoyFilter { config_patches: vec![filter, route], ..Default::default() },
        );
        assert!(matches!(got[0].1, Patch::FilterOnly));
        let Patch::RateLimit(rl) = &got[1].1 else { panic!("not read as a per-route rate limit") };
        assert_eq!((rl.direction, rl.max_tokens, rl.enforced_percent), (Some(Direction::Inbound), 4, 100.0));
        let scope = rl.routes.as_ref().expect("per route");
        assert_eq!(
            (scope.vhost.as_deref(), scope.route.as_deref(), scope.action.as_deref()),
            (Some("inbound|http|9080"), None, None)
        );
    }
}
