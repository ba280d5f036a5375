//! Cluster objects into Trellis resources.
//!
//! Each object goes through the same loader as a file (`trellis_config::load_str`), from a
//! document reduced to what Trellis reads (metadata: name, namespace, labels, annotations; the
//! spec), under the pseudo file name `k8s:Kind/namespace/name`, so a finding about it reads like
//! one about a file. Server-managed fields (status, managedFields, uid, ...) never reach the model.

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Map, Value};
use trellis_config::load::cluster_source;
use trellis_config::model::kube::PodTemplate;
use trellis_config::{Code, Finding, Resource, Spec};

/// A converted object, and what the loader said of it.
pub struct Converted {
    pub resource: Option<Resource>,
    pub findings: Vec<Finding>,
}

/// Converts an object of an Istio kind (or any kind the loader reads whole) from its JSON.
pub fn object(value: &Value) -> Converted {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default();
    let doc = json!({
        "apiVersion": value.get("apiVersion").cloned().unwrap_or(Value::Null),
        "kind": kind,
        "metadata": metadata(value),
        "spec": value.get("spec").cloned().unwrap_or_else(|| json!({})),
    });
    load(kind, &doc)
}

/// Converts a Service, keeping the fields the registry reads (the API server has validated the
/// rest).
pub fn service(svc: &Service) -> Converted {
    let value = serde_json::to_value(svc).unwrap_or(Value::Null);
    let spec = value.get("spec").cloned().unwrap_or_else(|| json!({}));
    let keep = ["selector", "type", "clusterIP", "clusterIPs"];
    let mut reduced: Map<String, Value> =
        keep.iter().filter_map(|k| Some((k.to_string(), spec.get(*k)?.clone()))).collect();
    let ports: Vec<Value> = spec
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            let keep = ["name", "port", "protocol", "appProtocol", "nodePort"];
            let mut port: Map<String, Value> =
                keep.iter().filter_map(|k| Some((k.to_string(), p.get(*k)?.clone()))).collect();
            // IntOrString: the model reads both forms as text.
            if let Some(t) = p.get("targetPort") {
                let text = t.as_str().map(str::to_string).unwrap_or_else(|| t.to_string());
                port.insert("targetPort".into(), Value::String(text));
            }
            Value::Object(port)
        })
        .collect();
    reduced.insert("ports".into(), Value::Array(ports));
    let doc = json!({"apiVersion": "v1", "kind": "Service", "metadata": metadata(&value), "spec": reduced});
    load("Service", &doc)
}

/// Converts a Pod: its labels, service account and named ports, and, when it is running and
/// ready (and not being deleted), its IP, which makes it an endpoint.
pub fn pod(p: &Pod) -> Converted {
    let value = serde_json::to_value(p).unwrap_or(Value::Null);
    let spec = value.get("spec").cloned().unwrap_or_else(|| json!({}));
    let containers: Vec<Value> = spec
        .get("containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| json!({"name": c.get("name"), "ports": c.get("ports").cloned().unwrap_or_else(|| json!([]))}))
        .collect();
    let mut reduced = json!({"containers": containers});
    if let Some(sa) = spec.get("serviceAccountName") {
        reduced["serviceAccountName"] = sa.clone();
    }
    let doc = json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata(&value), "spec": reduced});
    let mut converted = load("Pod", &doc);
    if let Some(r) = &mut converted.resource {
        if let Spec::PodTemplate(t) = &mut r.spec {
            *t = PodTemplate { address: ready_ip(p), ..t.clone() };
        }
    }
    converted
}

/// Converts an EndpointSlice (of a Service without a selector).
pub fn endpoint_slice(slice: &EndpointSlice) -> Converted {
    let value = serde_json::to_value(slice).unwrap_or(Value::Null);
    let endpoints: Vec<Value> = value
        .get("endpoints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| json!({"addresses": e.get("addresses"), "conditions": e.get("conditions").cloned().unwrap_or_else(|| json!({}))}))
        .collect();
    let doc = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": metadata(&value),
        "addressType": value.get("addressType"), "endpoints": endpoints,
        "ports": value.get("ports").cloned().unwrap_or_else(|| json!([])),
    });
    load("EndpointSlice", &doc)
}

/// A Pod's IP when it serves traffic: running, `Ready`, not terminating.
pub fn ready_ip(p: &Pod) -> Option<String> {
    if p.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = p.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
    ready.then(|| status.pod_ip.clone()).flatten().filter(|ip| !ip.is_empty())
}

fn metadata(value: &Value) -> Value {
    let meta = value.get("metadata").cloned().unwrap_or_else(|| json!({}));
    let mut out = Map::new();
    for k in ["name", "namespace", "labels", "annotations"] {
        if let Some(v) = meta.get(k) {
            out.insert(k.to_string(), v.clone());
        }
    }
    // Annotations kubectl writes hold a whole copy of the object; they mean nothing to the mesh.
    if let Some(Value::Object(a)) = out.get_mut("annotations") {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    Value::Object(out)
}

fn load(kind: &str, doc: &Value) -> Converted {
    let name = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    let ns = doc.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default");
    let text = serde_json::to_string_pretty(doc).unwrap_or_default();
    let mut loaded = trellis_config::load_str(&cluster_source(kind, ns, name), &text);
    // Core kinds are reduced above; anything still unknown there is ours to ignore.
    if matches!(kind, "Service" | "Pod" | "EndpointSlice") {
        loaded.findings.retain(|f| f.code != Code::UnknownField);
    }
    Converted { resource: loaded.resources.pop(), findings: loaded.findings }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_pod_is_an_endpoint_with_its_labels_account_and_ports() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "reviews-v2-abc", "namespace": "shop", "labels": {"app": "reviews", "version": "v2"},
                         "managedFields": [{"manager": "kubectl"}], "uid": "1"},
            "spec": {"serviceAccountName": "reviews", "containers": [{"name": "app", "image": "x",
                     "ports": [{"name": "http", "containerPort": 9080}]}]},
            "status": {"phase": "Running", "podIP": "10.1.2.3",
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("pod");
        let c = pod_converted(&pod);
        let r = c.resource.expect("resource");
        assert_eq!(r.id(), "Pod shop/reviews-v2-abc");
        let Spec::PodTemplate(t) = &r.spec else { panic!("{:?}", r.spec) };
        assert_eq!(t.address.as_deref(), Some("10.1.2.3"));
        assert_eq!(t.service_account.as_deref(), Some("reviews"));
        assert_eq!(t.ports.get("http"), Some(&9080));
        assert_eq!(t.labels.get("version").map(String::as_str), Some("v2"));
        assert!(c.findings.is_empty(), "{:?}", c.findings);
        assert_eq!(r.source.file.display().to_string(), "k8s:Pod/shop/reviews-v2-abc");
    }

    fn pod_converted(p: &Pod) -> Converted {
        pod(p)
    }

    #[test]
    fn a_pod_not_ready_or_terminating_has_no_address() {
        let mut v = json!({
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": []},
            "status": {"phase": "Running", "podIP": "10.1.2.3", "conditions": [{"type": "Ready", "status": "False"}]}
        });
        let p: Pod = serde_json::from_value(v.clone()).expect("pod");
        assert_eq!(ready_ip(&p), None);
        v["status"]["conditions"][0]["status"] = json!("True");
        v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        let p: Pod = serde_json::from_value(v).expect("pod");
        assert_eq!(ready_ip(&p), None);
    }

    #[test]
    fn a_service_keeps_ports_selector_and_numeric_target_ports() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"selector": {"app": "reviews"}, "clusterIP": "10.96.0.10", "sessionAffinity": "None",
                     "ports": [{"name": "http", "port": 9080, "targetPort": 9080, "protocol": "TCP"}]}
        }))
        .expect("service");
        let c = service(&svc);
        assert!(c.findings.is_empty(), "{:?}", c.findings);
        let r = c.resource.expect("resource");
        let Spec::Service(s) = &r.spec else { panic!() };
        assert_eq!(s.ports[0].target_port.as_deref(), Some("9080"));
        assert_eq!(s.cluster_ip.as_deref(), Some("10.96.0.10"));
    }

    #[test]
    fn an_istio_object_with_an_error_names_its_field_and_source() {
        let v = json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "bad", "namespace": "default", "resourceVersion": "7"},
            "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}, "weight": "x"}]}]},
            "status": {}
        });
        let c = object(&v);
        assert!(c.resource.is_none());
        let f = &c.findings[0];
        assert!(f.to_string().contains("k8s:VirtualService/default/bad:"), "{f}");
        assert!(f.to_string().contains("weight"), "{f}");
    }
}
