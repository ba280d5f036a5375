//! Sidecar injection: what Trellis adds to a Pod so that its traffic goes through the mesh,
//! used by the mutating webhook (`POST /inject`) and by `trellis inject -f`, offline, as
//! `istioctl kube-inject` is.
//!
//! A Pod is injected when its namespace has `istio-injection=enabled` or
//! `trellis.dev/inject=enabled` (the webhook configuration selects those), unless the Pod says
//! `sidecar.istio.io/inject: "false"` (or `trellis.dev/inject: "false"`). Injection adds:
//! - `trellis-init`, an init container that runs `trellis proxy-init`: iptables rules that send
//!   the Pod's inbound TCP to the proxy's inbound port and its outbound TCP to the outbound port,
//!   except the proxy's own traffic (its UID);
//! - `trellis-proxy`, a native sidecar (an init container with `restartPolicy: Always`): it
//!   starts before the app, is ready before the app starts, and stops after it, so Jobs finish;
//! - a projected service-account token for the audience `trellis`, the proxy's proof of identity;
//! - the label `security.istio.io/tlsMode: istio`, which tells other proxies to speak mTLS to it;
//! - the app's HTTP probes rewritten to the proxy's admin port (`/app-health/<container>/...`),
//!   which calls the app's own endpoint: the kubelet's plaintext probe never meets the mTLS-only
//!   inbound port.

use serde_json::{json, Value};

/// The ports of the injected proxy (Istio's numbers, so dashboards and habits carry over).
pub const INBOUND_PORT: u16 = 15006;
pub const OUTBOUND_PORT: u16 = 15001;
/// The admin port: readiness, app probes, metrics, config dump.
pub const ADMIN_PORT: u16 = 15021;
/// The proxy's UID, excluded from capture.
pub const PROXY_UID: i64 = 1337;
/// Where the projected token is mounted in the proxy container.
pub const TOKEN_DIR: &str = "/var/run/secrets/trellis/tokens";
pub const TOKEN_FILE: &str = "trellis-token";
/// The annotation that records an injection (and stops a second one).
pub const STATUS_ANNOTATION: &str = "sidecar.trellis.dev/status";

/// How sidecars are made.
#[derive(Clone, Debug)]
pub struct Injector {
    /// The image with the `trellis` binary.
    pub image: String,
    /// Where proxies reach the control plane (`host:port`).
    pub control_plane: String,
    pub trust_domain: String,
    /// The token audience the control plane's TokenReview expects.
    pub audience: String,
    /// Outbound ports never captured (e.g. a database reached directly).
    pub exclude_outbound_ports: Vec<u16>,
    /// Destination CIDRs never captured.
    pub exclude_outbound_cidrs: Vec<String>,
    /// Where sidecars send the console their spans and access-log lines (`host:port` of the
    /// control plane's console, OTLP/HTTP); `None`: nowhere.
    pub console: Option<String>,
}

/// The console of a control plane installed by the Helm chart with its defaults.
pub const DEFAULT_CONSOLE: &str = "trellis-control.trellis-system.svc:15014";

impl Default for Injector {
    fn default() -> Self {
        Injector {
            image: "ghcr.io/trellis-mesh/trellis:latest".into(),
            control_plane: "trellis-control.trellis-system.svc:15010".into(),
            trust_domain: "cluster.local".into(),
            audience: crate::identity::AUDIENCE.into(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            console: Some(DEFAULT_CONSOLE.into()),
        }
    }
}

/// Why a Pod was not injected.
#[derive(Debug, PartialEq)]
pub enum Skip {
    OptedOut,
    AlreadyInjected,
    HostNetwork,
}

impl Injector {
    /// The AdmissionResponse (without uid) for a Pod CREATE: a JSON patch adding the sidecar.
    pub fn admit(&self, request: &Value) -> Value {
        let Some(pod) = request.get("object") else { return json!({"allowed": true}) };
        let mut pod = pod.clone();
        // Pods created by a controller have no name yet; the namespace comes with the request.
        if pod.pointer("/metadata/namespace").is_none() {
            if let Some(ns) = request.get("namespace") {
                pod["metadata"]["namespace"] = ns.clone();
            }
        }
        match self.inject_pod(&mut pod) {
            Ok(()) => {
                use base64::Engine;
                // The injected metadata and spec as a whole: simpler to read back than a list of
                // additions, and the API server validates the result either way.
                let patch = json!([
                    {"op": "replace", "path": "/metadata", "value": pod["metadata"]},
                    {"op": "replace", "path": "/spec", "value": pod["spec"]},
                ]);
                json!({
                    "allowed": true,
                    "patchType": "JSONPatch",
                    "patch": base64::engine::general_purpose::STANDARD.encode(patch.to_string()),
                })
            }
            Err(skip) => {
                tracing::debug!(?skip, "not injected");
                json!({"allowed": true})
            }
        }
    }

    /// Injects every Pod template of a manifest (Pods, Deployments, StatefulSets, DaemonSets,
    /// ReplicaSets, Jobs, CronJobs); other objects pass unchanged. Returns how many were injected.
    pub fn inject_object(&self, obj: &mut Value) -> usize {
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
        let ns = obj.pointer("/metadata/namespace").cloned();
        let template = match kind.as_str() {
            "Pod" => Some(obj),
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => obj.pointer_mut("/spec/template"),
            "CronJob" => obj.pointer_mut("/spec/jobTemplate/spec/template"),
            "List" => {
                let mut n = 0;
                for item in obj.get_mut("items").and_then(Value::as_array_mut).into_iter().flatten() {
                    n += self.inject_object(item);
                }
                return n;
            }
            _ => None,
        };
        let Some(t) = template else { return 0 };
        if t.get("metadata").is_none() {
            t["metadata"] = json!({});
        }
        if let (Some(ns), None) = (ns, t.pointer("/metadata/namespace")) {
            t["metadata"]["namespace"] = ns;
        }
        usize::from(self.inject_pod(t).is_ok())
    }

    /// Adds the sidecar to one Pod (or Pod template): `metadata` and `spec`.
    pub fn inject_pod(&self, pod: &mut Value) -> Result<(), Skip> {
        let annotation = |k: &str| {
            pod.pointer(&format!("/metadata/annotations/{}", k.replace('/', "~1")))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let label = |k: &str| {
            pod.pointer(&format!("/metadata/labels/{}", k.replace('/', "~1")))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        for key in ["sidecar.istio.io/inject", "trellis.dev/inject"] {
            if annotation(key).or_else(|| label(key)).is_some_and(|v| v == "false") {
                return Err(Skip::OptedOut);
            }
        }
        if annotation(STATUS_ANNOTATION).is_some() {
            return Err(Skip::AlreadyInjected);
        }
        if pod.pointer("/spec/hostNetwork").and_then(Value::as_bool) == Some(true) {
            return Err(Skip::HostNetwork);
        }
        let labels = pod.pointer("/metadata/labels").cloned().unwrap_or_else(|| json!({}));
        let spec = pod.get_mut("spec").ok_or(Skip::OptedOut)?;

        // The app's HTTP probes, moved to the proxy's admin port.
        let mut probers = serde_json::Map::new();
        let mut app_ports: Vec<u16> = Vec::new();
        for c in spec.get_mut("containers").and_then(Value::as_array_mut).into_iter().flatten() {
            let name = c.get("name").and_then(Value::as_str).unwrap_or("app").to_string();
            let ports: Vec<(Option<String>, u16)> = c
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    let n = p.get("containerPort").and_then(Value::as_u64).and_then(|n| u16::try_from(n).ok())?;
                    Some((p.get("name").and_then(Value::as_str).map(str::to_string), n))
                })
                .collect();
            app_ports.extend(ports.iter().map(|(_, n)| *n));
            for (probe, kind) in
                [("readinessProbe", "readyz"), ("livenessProbe", "livez"), ("startupProbe", "startupz")]
            {
                let Some(get) = c.get(probe).and_then(|p| p.get("httpGet")).cloned() else { continue };
                let port = match get.get("port") {
                    Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                    Some(Value::String(s)) => {
                        s.parse().ok().or_else(|| ports.iter().find(|(n, _)| n.as_deref() == Some(s)).map(|(_, p)| *p))
                    }
                    _ => None,
                };
                let Some(port) = port else { continue };
                let path = format!("/app-health/{name}/{kind}");
                probers.insert(
                    path.clone(),
                    json!({"port": port, "path": get.get("path").cloned().unwrap_or(json!("/")), "scheme": get.get("scheme").cloned().unwrap_or(json!("HTTP"))}),
                );
                c[probe]["httpGet"] = json!({"path": path, "port": ADMIN_PORT, "scheme": "HTTP"});
            }
        }
        app_ports.sort_unstable();
        app_ports.dedup();

        let env = |name: &str, field: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": field}}});
        let mut args = vec![
            "--kubernetes".to_string(),
            "--control-plane".to_string(),
            self.control_plane.clone(),
            "--trust-domain".to_string(),
            self.trust_domain.clone(),
            "--token-file".to_string(),
            format!("{TOKEN_DIR}/{TOKEN_FILE}"),
            "--admin".to_string(),
            format!("0.0.0.0:{ADMIN_PORT}"),
        ];
        if let Some(c) = &self.console {
            // Spans (sampled as Telemetry resources say; 1% by default, as Istio) and access-log
            // lines go to the console, off the request path.
            args.extend([
                "--otlp-endpoint".to_string(),
                format!("http://{c}/v1/traces"),
                "--access-log-otlp-endpoint".to_string(),
                format!("http://{c}/v1/logs"),
            ]);
        }
        if !app_ports.is_empty() {
            args.push("--app-ports".to_string());
            args.push(app_ports.iter().map(u16::to_string).collect::<Vec<_>>().join(","));
        }
        let proxy = json!({
            "name": "trellis-proxy",
            "image": self.image,
            // The proxy alone (`trellis proxy` without the rest linked in): fewer pages per pod.
            "command": ["trellis-proxy"],
            "args": args,
            "restartPolicy": "Always",
            "env": [
                env("POD_NAME", "metadata.name"),
                env("POD_NAMESPACE", "metadata.namespace"),
                env("POD_IP", "status.podIP"),
                env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
                {"name": "TRELLIS_POD_LABELS", "value": labels.to_string()},
                {"name": "TRELLIS_APP_PROBERS", "value": Value::Object(probers).to_string()},
            ],
            "ports": [{"name": "trellis-admin", "containerPort": ADMIN_PORT}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": ADMIN_PORT}, "periodSeconds": 2},
            "startupProbe": {"httpGet": {"path": "/ready", "port": ADMIN_PORT}, "periodSeconds": 1, "failureThreshold": 600},
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "128Mi"}},
            "securityContext": {
                "runAsUser": PROXY_UID, "runAsGroup": PROXY_UID, "runAsNonRoot": true,
                "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [{"name": "trellis-token", "mountPath": TOKEN_DIR, "readOnly": true}],
        });
        let mut init_args = vec![
            "proxy-init".to_string(),
            "--proxy-uid".to_string(),
            PROXY_UID.to_string(),
            "--inbound-port".to_string(),
            INBOUND_PORT.to_string(),
            "--outbound-port".to_string(),
            OUTBOUND_PORT.to_string(),
            "--exclude-inbound-ports".to_string(),
            ADMIN_PORT.to_string(),
        ];
        if !self.exclude_outbound_ports.is_empty() {
            init_args.push("--exclude-outbound-ports".into());
            init_args.push(self.exclude_outbound_ports.iter().map(u16::to_string).collect::<Vec<_>>().join(","));
        }
        if !self.exclude_outbound_cidrs.is_empty() {
            init_args.push("--exclude-outbound-cidrs".into());
            init_args.push(self.exclude_outbound_cidrs.join(","));
        }
        let init = json!({
            "name": "trellis-init",
            "image": self.image,
            "command": ["trellis"],
            "args": init_args,
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
            "securityContext": {
                "runAsUser": 0, "runAsNonRoot": false, "allowPrivilegeEscalation": false,
                "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            },
        });
        let inits = spec.as_object_mut().ok_or(Skip::OptedOut)?.entry("initContainers").or_insert_with(|| json!([]));
        if let Some(list) = inits.as_array_mut() {
            list.insert(0, proxy);
            list.insert(0, init);
        }
        let volumes = spec.as_object_mut().ok_or(Skip::OptedOut)?.entry("volumes").or_insert_with(|| json!([]));
        if let Some(list) = volumes.as_array_mut() {
            list.push(json!({
                "name": "trellis-token",
                "projected": {"sources": [{"serviceAccountToken": {
                    "audience": self.audience, "expirationSeconds": 3600, "path": TOKEN_FILE,
                }}]},
            }));
        }

        let meta = pod.as_object_mut().ok_or(Skip::OptedOut)?.entry("metadata").or_insert_with(|| json!({}));
        let labels = meta.as_object_mut().ok_or(Skip::OptedOut)?.entry("labels").or_insert_with(|| json!({}));
        labels["security.istio.io/tlsMode"] = json!("istio");
        let annotations = meta.as_object_mut().ok_or(Skip::OptedOut)?.entry("annotations").or_insert_with(|| json!({}));
        annotations[STATUS_ANNOTATION] = json!(
            json!({"initContainers": ["trellis-init", "trellis-proxy"], "volumes": ["trellis-token"]}).to_string()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"template": {
                "metadata": {"labels": {"app": "reviews"}},
                "spec": {"containers": [{
                    "name": "app", "image": "reviews",
                    "ports": [{"name": "http", "containerPort": 9080}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                }]},
            }},
        })
    }

    #[test]
    fn a_template_gets_a_native_sidecar_an_init_container_and_its_probes_moved() {
        let mut d = deployment();
        assert_eq!(Injector::default().inject_object(&mut d), 1);
        let spec = &d["spec"]["template"]["spec"];
        let inits = spec["initContainers"].as_array().expect("inits");
        assert_eq!(inits[0]["name"], "trellis-init");
        assert_eq!(inits[1]["name"], "trellis-proxy");
        assert_eq!(inits[1]["restartPolicy"], "Always");
        assert_eq!(spec["containers"][0]["readinessProbe"]["httpGet"]["port"], ADMIN_PORT);
        assert_eq!(spec["containers"][0]["readinessProbe"]["httpGet"]["path"], "/app-health/app/readyz");
        let env = inits[1]["env"].as_array().expect("env");
        let probers = env.iter().find(|e| e["name"] == "TRELLIS_APP_PROBERS").expect("probers");
        let probers: Value = serde_json::from_str(probers["value"].as_str().expect("text")).expect("json");
        assert_eq!(probers["/app-health/app/readyz"]["port"], 9080);
        assert_eq!(probers["/app-health/app/readyz"]["path"], "/healthz");
        assert_eq!(d["spec"]["template"]["metadata"]["labels"]["security.istio.io/tlsMode"], "istio");
        // Idempotent: a second pass changes nothing.
        let once = d.clone();
        assert_eq!(Injector::default().inject_object(&mut d), 0);
        assert_eq!(d, once);
    }

    #[test]
    fn sidecars_send_the_console_spans_and_access_logs_unless_there_is_none() {
        let args = |injector: Injector| {
            let mut d = deployment();
            injector.inject_object(&mut d);
            d["spec"]["template"]["spec"]["initContainers"][1]["args"].clone()
        };
        let with = args(Injector::default());
        let with: Vec<&str> = with.as_array().expect("args").iter().filter_map(|a| a.as_str()).collect();
        let after = |flag: &str| with.iter().position(|a| *a == flag).and_then(|i| with.get(i + 1)).copied();
        assert_eq!(after("--otlp-endpoint"), Some("http://trellis-control.trellis-system.svc:15014/v1/traces"));
        assert_eq!(
            after("--access-log-otlp-endpoint"),
            Some("http://trellis-control.trellis-system.svc:15014/v1/logs")
        );
        let without = args(Injector { console: None, ..Injector::default() });
        assert!(!without.to_string().contains("otlp"), "{without}");
    }

    #[test]
    fn opted_out_and_host_network_pods_are_left_alone() {
        let mut d = deployment();
        d["spec"]["template"]["metadata"]["annotations"] = json!({"sidecar.istio.io/inject": "false"});
        assert_eq!(Injector::default().inject_object(&mut d), 0);
        let mut p = json!({"kind": "Pod", "metadata": {"name": "p"}, "spec": {"hostNetwork": true, "containers": []}});
        assert_eq!(Injector::default().inject_pod(&mut p), Err(Skip::HostNetwork));
    }
}
