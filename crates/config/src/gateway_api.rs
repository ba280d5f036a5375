//! The Kubernetes Gateway API (`gateway.networking.k8s.io`): `Gateway`, `HTTPRoute` and
//! `GRPCRoute`, read as the Istio kinds they mean, so one compiler serves both APIs (as Istio
//! translates them internally).
//!
//! - A `Gateway` is an Istio `Gateway` selecting the gateway proxies labelled
//!   `gateway.networking.k8s.io/gateway-name: <name>` (the label Istio gives the gateways it
//!   deploys), one server per listener.
//! - An `HTTPRoute` (or `GRPCRoute`) is a `VirtualService`: attached to a Gateway through a
//!   `parentRef` of kind Gateway, or to the mesh through a `parentRef` of kind Service (GAMMA),
//!   for calls to that Service. Backend weights are relative in the Gateway API and shares of 100
//!   in Istio: they are scaled, the rounding remainder going to the first backend.

use serde_json::{json, Map, Value};

/// The label that ties a gateway proxy to its Gateway API `Gateway`.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// `Gateway` → an Istio `Gateway` spec.
pub fn gateway(name: &str, spec: &Value) -> Value {
    let servers: Vec<Value> = spec
        .get("listeners")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|l| {
            let protocol = l.get("protocol").and_then(Value::as_str).unwrap_or("HTTP");
            let host = l.get("hostname").and_then(Value::as_str).unwrap_or("*");
            let mut server = json!({
                "port": {"number": l.get("port").cloned().unwrap_or(json!(80)),
                         "name": l.get("name").cloned().unwrap_or(json!("http")),
                         "protocol": protocol},
                "hosts": [host],
            });
            if let Some(tls) = l.get("tls") {
                let mode = tls.get("mode").and_then(Value::as_str).unwrap_or("Terminate");
                server["tls"] = json!({"mode": if mode == "Passthrough" { "PASSTHROUGH" } else { "SIMPLE" }});
            }
            server
        })
        .collect();
    json!({"selector": {GATEWAY_NAME_LABEL: name}, "servers": servers})
}

/// `HTTPRoute` or `GRPCRoute` in `namespace` → a `VirtualService` spec.
pub fn route(namespace: &str, spec: &Value, grpc: bool) -> Value {
    let mut gateways: Vec<String> = Vec::new();
    let mut mesh_hosts: Vec<String> = Vec::new();
    for p in spec.get("parentRefs").and_then(Value::as_array).into_iter().flatten() {
        let kind = p.get("kind").and_then(Value::as_str).unwrap_or("Gateway");
        let name = p.get("name").and_then(Value::as_str).unwrap_or_default();
        let ns = p.get("namespace").and_then(Value::as_str).unwrap_or(namespace);
        match kind {
            "Service" => {
                mesh_hosts.push(format!("{name}.{ns}.svc.cluster.local"));
                if !gateways.iter().any(|g| g == "mesh") {
                    gateways.push("mesh".into());
                }
            }
            _ => gateways.push(format!("{ns}/{name}")),
        }
    }
    let hostnames: Vec<String> = spec
        .get("hostnames")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|h| h.as_str().map(str::to_string))
        .collect();
    let mut hosts = mesh_hosts;
    if gateways.iter().any(|g| g != "mesh") {
        if hostnames.is_empty() {
            hosts.push("*".into());
        } else {
            hosts.extend(hostnames);
        }
    }
    let http: Vec<Value> = spec
        .get("rules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|rule| http_route(namespace, rule, grpc))
        .collect();
    json!({"hosts": hosts, "gateways": gateways, "http": http})
}

fn http_route(namespace: &str, rule: &Value, grpc: bool) -> Value {
    let mut out = Map::new();
    let matches: Vec<Value> = rule
        .get("matches")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|m| if grpc { grpc_match(m) } else { http_match(m) })
        .collect();
    if !matches.is_empty() {
        out.insert("match".into(), Value::Array(matches));
    }
    let backends: Vec<&Value> = rule.get("backendRefs").and_then(Value::as_array).into_iter().flatten().collect();
    let weights: Vec<u64> = backends.iter().map(|b| b.get("weight").and_then(Value::as_u64).unwrap_or(1)).collect();
    let total: u64 = weights.iter().sum();
    let mut shares: Vec<u64> = weights.iter().map(|w| (w * 100).checked_div(total).unwrap_or(0)).collect();
    if total > 0 {
        let rest = 100 - shares.iter().sum::<u64>();
        if let Some(first) = shares.iter_mut().zip(&weights).find(|(_, w)| **w > 0).map(|(s, _)| s) {
            *first += rest;
        }
    }
    let route: Vec<Value> = backends
        .iter()
        .zip(&shares)
        .map(|(b, share)| {
            let name = b.get("name").and_then(Value::as_str).unwrap_or_default();
            let ns = b.get("namespace").and_then(Value::as_str).unwrap_or(namespace);
            let mut dest = json!({"host": format!("{name}.{ns}.svc.cluster.local")});
            if let Some(port) = b.get("port") {
                dest["port"] = json!({"number": port});
            }
            let mut r = json!({"destination": dest});
            if backends.len() > 1 {
                r["weight"] = json!(share);
            }
            r
        })
        .collect();
    let mut request_headers = Map::new();
    let mut response_headers = Map::new();
    for f in rule.get("filters").and_then(Value::as_array).into_iter().flatten() {
        match f.get("type").and_then(Value::as_str).unwrap_or_default() {
            "RequestHeaderModifier" => request_headers = header_ops(f.get("requestHeaderModifier")),
            "ResponseHeaderModifier" => response_headers = header_ops(f.get("responseHeaderModifier")),
            "RequestRedirect" => {
                let r = f.get("requestRedirect").cloned().unwrap_or_default();
                let mut redirect = Map::new();
                if let Some(s) = r.get("scheme") {
                    redirect.insert("scheme".into(), s.clone());
                }
                if let Some(h) = r.get("hostname") {
                    redirect.insert("authority".into(), h.clone());
                }
                if let Some(p) = r.get("port") {
                    redirect.insert("port".into(), p.clone());
                }
                if let Some(p) = r.pointer("/path/replaceFullPath") {
                    redirect.insert("uri".into(), p.clone());
                }
                if let Some(c) = r.get("statusCode") {
                    redirect.insert("redirectCode".into(), c.clone());
                }
                out.insert("redirect".into(), Value::Object(redirect));
            }
            "URLRewrite" => {
                let r = f.get("urlRewrite").cloned().unwrap_or_default();
                let mut rewrite = Map::new();
                if let Some(h) = r.get("hostname") {
                    rewrite.insert("authority".into(), h.clone());
                }
                if let Some(p) = r.pointer("/path/replacePrefixMatch").or_else(|| r.pointer("/path/replaceFullPath")) {
                    rewrite.insert("uri".into(), p.clone());
                }
                out.insert("rewrite".into(), Value::Object(rewrite));
            }
            _ => {}
        }
    }
    if !out.contains_key("redirect") {
        out.insert("route".into(), Value::Array(route));
    }
    let mut headers = Map::new();
    if !request_headers.is_empty() {
        headers.insert("request".into(), Value::Object(request_headers));
    }
    if !response_headers.is_empty() {
        headers.insert("response".into(), Value::Object(response_headers));
    }
    if !headers.is_empty() {
        out.insert("headers".into(), Value::Object(headers));
    }
    if let Some(t) = rule.pointer("/timeouts/request") {
        out.insert("timeout".into(), t.clone());
    }
    Value::Object(out)
}

fn header_ops(m: Option<&Value>) -> Map<String, Value> {
    let mut out = Map::new();
    let Some(m) = m else { return out };
    let pairs = |key: &str| -> Map<String, Value> {
        m.get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|h| Some((h.get("name")?.as_str()?.to_string(), h.get("value")?.clone())))
            .collect()
    };
    let set = pairs("set");
    if !set.is_empty() {
        out.insert("set".into(), Value::Object(set));
    }
    let add = pairs("add");
    if !add.is_empty() {
        out.insert("add".into(), Value::Object(add));
    }
    if let Some(r) = m.get("remove") {
        out.insert("remove".into(), r.clone());
    }
    out
}

fn string_match(kind: Option<&str>, value: &Value, default: &str) -> Value {
    let key = match kind.unwrap_or(default) {
        "Exact" => "exact",
        "RegularExpression" => "regex",
        _ => "prefix",
    };
    json!({ key: value })
}

fn http_match(m: &Value) -> Value {
    let mut out = Map::new();
    if let Some(p) = m.get("path") {
        let value = p.get("value").cloned().unwrap_or(json!("/"));
        out.insert("uri".into(), string_match(p.get("type").and_then(Value::as_str), &value, "PathPrefix"));
    }
    let headers: Map<String, Value> = m
        .get("headers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|h| {
            let name = h.get("name")?.as_str()?.to_ascii_lowercase();
            Some((name, string_match(h.get("type").and_then(Value::as_str), h.get("value")?, "Exact")))
        })
        .collect();
    if !headers.is_empty() {
        out.insert("headers".into(), Value::Object(headers));
    }
    let params: Map<String, Value> = m
        .get("queryParams")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|q| {
            let name = q.get("name")?.as_str()?.to_string();
            Some((name, string_match(q.get("type").and_then(Value::as_str), q.get("value")?, "Exact")))
        })
        .collect();
    if !params.is_empty() {
        out.insert("queryParams".into(), Value::Object(params));
    }
    if let Some(method) = m.get("method") {
        out.insert("method".into(), json!({"exact": method}));
    }
    Value::Object(out)
}

fn grpc_match(m: &Value) -> Value {
    let mut out = Map::new();
    if let Some(method) = m.get("method") {
        let service = method.get("service").and_then(Value::as_str);
        let name = method.get("method").and_then(Value::as_str);
        let uri = match (service, name) {
            (Some(s), Some(n)) => json!({"exact": format!("/{s}/{n}")}),
            (Some(s), None) => json!({"prefix": format!("/{s}/")}),
            (None, Some(n)) => json!({"regex": format!("/[^/]+/{}", regex_escape(n))}),
            (None, None) => json!({"prefix": "/"}),
        };
        out.insert("uri".into(), uri);
    }
    if let Some(Value::Object(h)) = http_match(m).get("headers") {
        out.insert("headers".into(), Value::Object(h.clone()));
    }
    Value::Object(out)
}

fn regex_escape(s: &str) -> String {
    s.chars().flat_map(|c| if c.is_ascii_alphanumeric() || c == '_' { vec![c] } else { vec!['\\', c] }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_weights_become_shares_of_100() {
        let spec = json!({
            "parentRefs": [{"name": "web", "namespace": "infra"}],
            "hostnames": ["shop.example.com"],
            "rules": [{"backendRefs": [{"name": "a", "port": 80, "weight": 1}, {"name": "b", "port": 80, "weight": 2}]}],
        });
        let vs = route("shop", &spec, false);
        assert_eq!(vs["gateways"], json!(["infra/web"]));
        assert_eq!(vs["hosts"], json!(["shop.example.com"]));
        let r = &vs["http"][0]["route"];
        assert_eq!(r[0]["destination"]["host"], "a.shop.svc.cluster.local");
        assert_eq!((r[0]["weight"].as_u64(), r[1]["weight"].as_u64()), (Some(34), Some(66)));
    }

    #[test]
    fn a_service_parent_is_a_mesh_route_for_that_service() {
        let spec = json!({
            "parentRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
            "rules": [{"matches": [{"path": {"type": "Exact", "value": "/v2"}, "headers": [{"name": "X-User", "value": "jason"}]}],
                       "backendRefs": [{"name": "reviews-v2", "port": 9080}]}],
        });
        let vs = route("shop", &spec, false);
        assert_eq!(vs["gateways"], json!(["mesh"]));
        assert_eq!(vs["hosts"], json!(["reviews.shop.svc.cluster.local"]));
        assert_eq!(vs["http"][0]["match"][0]["uri"], json!({"exact": "/v2"}));
        assert_eq!(vs["http"][0]["match"][0]["headers"]["x-user"], json!({"exact": "jason"}));
        assert!(vs["http"][0]["route"][0].get("weight").is_none());
    }

    #[test]
    fn grpc_methods_become_paths_and_gateways_select_their_proxies() {
        let spec = json!({"parentRefs": [{"name": "gw"}], "rules": [{"matches": [{"method": {"service": "pkg.Echo", "method": "Say"}}],
                          "backendRefs": [{"name": "echo", "port": 50051}]}]});
        let vs = route("default", &spec, true);
        assert_eq!(vs["http"][0]["match"][0]["uri"], json!({"exact": "/pkg.Echo/Say"}));
        let gw = gateway("gw", &json!({"listeners": [{"name": "http", "port": 8080, "protocol": "HTTP"}]}));
        assert_eq!(gw["selector"][GATEWAY_NAME_LABEL], "gw");
        assert_eq!(gw["servers"][0]["port"]["number"], 8080);
        assert_eq!(gw["servers"][0]["hosts"], json!(["*"]));
    }
}
