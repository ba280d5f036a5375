//! Trellis on a real Kubernetes API server (etcd, kube-apiserver and kube-controller-manager
//! built from their Go modules; see `support/cluster.rs`): the control plane reads Services, Pods
//! and Istio resources applied with `kubectl`, and a gateway proxy follows them live.

#[path = "support/cluster.rs"]
mod cluster;
mod support;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::{Network, Node, TestCluster};
use support::{free_port, get, subscribe, trellis_bin, try_get, ProxyProc};

const CRDS: &str = include_str!("../../../deploy/helm/trellis/crds/istio.yaml");
const GATEWAY_API_CRDS: &str = include_str!("../../../deploy/helm/trellis/crds/gateway-api.yaml");

/// The same canary with the Gateway API: a Gateway, one Service per version, an HTTPRoute with
/// relative weights.
fn http_route(blue: u32, green: u32) -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: colors, namespace: colors}}
spec:
  parentRefs: [{{name: colors-gw}}]
  hostnames: [colors.example]
  rules:
  - backendRefs:
    - {{name: colorteller-blue, port: 80, weight: {blue}}}
    - {{name: colorteller-green, port: 80, weight: {green}}}
"#
    )
}

const GATEWAY_API: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: colors-gw, namespace: colors}
spec:
  gatewayClassName: trellis
  listeners:
  - {name: http, port: 80, protocol: HTTP, hostname: colors.example}
---
apiVersion: v1
kind: Service
metadata: {name: colorteller-blue, namespace: colors}
spec:
  selector: {app: colorteller, version: blue}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: colorteller-green, namespace: colors}
spec:
  selector: {app: colorteller, version: green}
  ports: [{name: http, port: 80, targetPort: http}]
"#;

fn teller(color: &str, replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: colorteller-{color}, namespace: colors}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: colorteller, version: {color}}}}}
  template:
    metadata: {{labels: {{app: colorteller, version: {color}}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: app
        image: trellis/demo:dev
        command: [trellis-demo, colorteller]
        env:
        - {{name: COLOR, value: {color}}}
        - {{name: PORT, value: "8080"}}
        - name: BIND
          valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe: {{httpGet: {{path: /, port: http}}}}
        lifecycle: {{preStop: {{sleep: {{seconds: 1}}}}}}
"#
    )
}

fn route(blue: u32, green: u32) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: colorteller, namespace: colors}}
spec:
  hosts: ["*"]
  gateways: [colors-gateway]
  http:
  - route:
    - destination: {{host: colorteller, subset: blue}}
      weight: {blue}
    - destination: {{host: colorteller, subset: green}}
      weight: {green}
"#
    )
}

const APP: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: colors}
---
apiVersion: v1
kind: Service
metadata: {name: colorteller, namespace: colors}
spec:
  selector: {app: colorteller}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: colors-gateway, namespace: colors}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: colorteller, namespace: colors}
spec:
  host: colorteller
  subsets:
  - {name: blue, labels: {version: blue}}
  - {name: green, labels: {version: green}}
"#;

/// `trellis control --kubernetes`, killed on drop.
struct ControlPlane {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl ControlPlane {
    fn start(cluster: &TestCluster) -> ControlPlane {
        ControlPlane::start_with(cluster, &format!("127.0.0.1:{}", free_port()), &[])
    }

    fn start_with(cluster: &TestCluster, addr: &str, extra: &[&str]) -> ControlPlane {
        ControlPlane::start_as(&cluster.kubeconfig, addr, extra)
    }

    fn start_as(kubeconfig: &std::path::Path, addr: &str, extra: &[&str]) -> ControlPlane {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = addr.to_string();
        let log = std::fs::File::create(dir.path().join("control.log")).expect("log");
        let child = Command::new(trellis_bin())
            .args(["control", "--kubernetes", "--listen", &addr, "--ca-dir"])
            .arg(dir.path().join("ca"))
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("trellis control");
        ControlPlane { child, addr, _dir: dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("control.log")).unwrap_or_default()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- control plane log (tail)\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn demo_dir() -> std::path::PathBuf {
    std::path::Path::new(trellis_bin()).parent().expect("target dir").to_path_buf()
}

/// One request through the gateway: (color, pod) or the failure.
async fn ask(url: &str, host: Option<&str>) -> Result<(String, String), String> {
    let headers: Vec<(&str, &str)> = host.map(|h| vec![("host", h)]).unwrap_or_default();
    let r =
        tokio::time::timeout(Duration::from_secs(5), get(url, &headers)).await.map_err(|_| "timed out".to_string())?;
    if r.status != 200 {
        return Err(format!("{} {:?} {}", r.status, r.flag(), r.body));
    }
    Ok((r.body.trim().to_string(), r.header("x-served-by").unwrap_or_default().to_string()))
}

/// Requests at ~50/s in the background until stopped: every answer (with the time its request
/// was sent) in order, and failures.
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(Instant, String, String)>>>,
    failures: Arc<Mutex<Vec<String>>>,
    sent: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(url: String) -> Load {
        Load::start_inner(url, None)
    }

    fn start_with_host(url: String, host: &'static str) -> Load {
        Load::start_inner(url, Some(host))
    }

    fn start_inner(url: String, host: Option<&'static str>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Vec<(Instant, String, String)>>> = Arc::default();
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let sent = Arc::new(AtomicUsize::new(0));
        let (s, se, f, n) = (stop.clone(), seen.clone(), failures.clone(), sent.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let begun = Instant::now();
            // Bounded: at most 60 s of load whatever the test does.
            for _ in 0..3000 {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                tick.tick().await; // rate pacing (50 req/s), not a readiness wait
                n.fetch_add(1, Ordering::SeqCst);
                let started = Instant::now();
                match ask(&url, host).await {
                    Ok((color, pod)) => se.lock().expect("seen").push((started, color, pod)),
                    Err(e) => f
                        .lock()
                        .expect("failures")
                        .push(format!("{e} (sent {:?} after the load started)", started - begun)),
                }
            }
        });
        Load { stop, seen, failures, sent, task }
    }

    async fn finish(self) -> (Vec<(Instant, String, String)>, Vec<String>, usize) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        let seen = std::mem::take(&mut *self.seen.lock().expect("seen"));
        let failures = std::mem::take(&mut *self.failures.lock().expect("failures"));
        (seen, failures, self.sent.load(Ordering::SeqCst))
    }

    /// Waits until `n` more requests have been sent.
    async fn more(&self, n: usize) {
        let start = self.sent.load(Ordering::SeqCst);
        until(&format!("{n} more requests"), Duration::from_secs(10), || async {
            self.sent.load(Ordering::SeqCst) >= start + n
        })
        .await;
    }

    /// Stops the load: every answer, once none failed.
    async fn finish_without_failures(self, during: &str) -> Vec<(Instant, String, String)> {
        let (seen, failures, sent) = self.finish().await;
        assert!(failures.is_empty(), "{} of {sent} requests failed {during}: {failures:?}", failures.len());
        seen
    }

    fn pods_seen(&self) -> BTreeMap<String, Instant> {
        let mut first = BTreeMap::new();
        for (t, _, pod) in self.seen.lock().expect("seen").iter() {
            first.entry(pod.clone()).or_insert(*t);
        }
        first
    }
}

/// Ready Pods of a Deployment's selector, from the API server.
async fn ready_pods(client: &kube::Client, selector: &str) -> Vec<String> {
    let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client.clone(), "colors");
    let list = api.list(&kube::api::ListParams::default().labels(selector)).await.expect("list pods");
    list.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter_map(|p| p.metadata.name)
        .collect()
}

async fn all_pods(client: &kube::Client, selector: &str) -> Vec<String> {
    let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client.clone(), "colors");
    let list = api.list(&kube::api::ListParams::default().labels(selector)).await.expect("list pods");
    list.items.into_iter().filter_map(|p| p.metadata.name).collect()
}

/// A token for the audience `trellis` of a service account (TokenRequest), as a Pod's projected
/// token would be.
async fn service_account_token(client: &kube::Client, ns: &str, sa: &str) -> String {
    service_account_token_for(client, ns, sa, &["trellis"]).await
}

/// A service account's token for `audiences` (none: the API server's own).
async fn service_account_token_for(client: &kube::Client, ns: &str, sa: &str, audiences: &[&str]) -> String {
    let api: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> = kube::Api::namespaced(client.clone(), ns);
    let body = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"audiences": audiences, "expirationSeconds": 3600}});
    let answer: serde_json::Value =
        api.create_subresource("token", sa, &Default::default(), &body).await.expect("TokenRequest");
    answer["status"]["token"].as_str().expect("token").to_string()
}

/// Opens a config stream as a proxy would (Hello with `spec` and `token`): the first answer.
async fn until<F: std::future::Future<Output = bool>>(what: &str, within: Duration, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval of a wait on a signal
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_mesh_follows_pods_and_istio_resources_applied_with_kubectl() {
    let cluster = TestCluster::start().await;
    cluster.apply_ok(CRDS);
    cluster.apply_ok(GATEWAY_API_CRDS);
    cluster.kubectl_ok(&["wait", "--for", "condition=Established", "crd", "--all", "--timeout", "60s"]);
    let client = cluster.client().await;
    let _node = Node::start(client.clone(), vec![demo_dir()]).await;

    cluster.apply_ok(APP);
    cluster.apply_ok(&format!("{}---\n{}---\n{}", teller("blue", 1), teller("green", 1), route(90, 10)));
    let cp = ControlPlane::start(&cluster);
    // The gateway proves it is colors/ingressgateway with that service account's token.
    cluster.apply_ok("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: ingressgateway, namespace: colors}\n");
    let token_file = cluster.dir.path().join("gateway-token");
    std::fs::write(&token_file, service_account_token(&client, "colors", "ingressgateway").await).expect("token");
    let gateway = ProxyProc::start(&[
        "--role",
        "gateway",
        "--control-plane",
        &cp.addr,
        "--token-file",
        &token_file.to_string_lossy(),
        "--service-account",
        "ingressgateway",
        "--workload",
        "ingressgateway",
        "--namespace",
        "colors",
        "--label",
        "istio=ingressgateway",
        "--label",
        "gateway.networking.k8s.io/gateway-name=colors-gw",
        "--port-map",
        "80=8080",
    ])
    .await;
    let url = format!("http://127.0.0.1:{}/", gateway.port(8080).await);

    // Both Pods ready, then the gateway serves both colors, split 90/10.
    until("both tellers ready", Duration::from_secs(60), || async {
        ready_pods(&client, "app=colorteller").await.len() == 2
    })
    .await;
    until("the gateway to reach a teller", Duration::from_secs(20), || async { ask(&url, None).await.is_ok() }).await;
    let mut colors: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..200 {
        let (color, _) = ask(&url, None).await.unwrap_or_else(|e| panic!("request failed: {e}\n{}", cp.log()));
        *colors.entry(color).or_default() += 1;
    }
    let green = colors.get("green").copied().unwrap_or(0);
    assert!((4..=45).contains(&green), "90/10 split gave {colors:?}");

    // Scale blue 1 → 3 under load: the new Pods get traffic soon after they are ready, nothing fails.
    let load = Load::start(url.clone());
    cluster.kubectl_ok(&["scale", "deployment", "colorteller-blue", "-n", "colors", "--replicas", "3"]);
    let mut ready_at: BTreeMap<String, Instant> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for p in ready_pods(&client, "version=blue").await {
            ready_at.entry(p).or_insert_with(Instant::now);
        }
        let seen = load.pods_seen();
        if ready_at.len() == 3 && ready_at.keys().all(|p| seen.contains_key(p)) {
            break;
        }
        assert!(Instant::now() < deadline, "three blue Pods serving: ready {ready_at:?}, seen {seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on a signal
    }
    let seen = load.pods_seen();
    for (pod, ready) in &ready_at {
        let first = seen[pod];
        let lag = first.saturating_duration_since(*ready);
        assert!(lag < Duration::from_secs(2), "{pod} got its first request {lag:?} after it was ready");
    }

    // Scale back to 1: deleted Pods get no request once they are gone, still nothing fails.
    cluster.kubectl_ok(&["scale", "deployment", "colorteller-blue", "-n", "colors", "--replicas", "1"]);
    let before: Vec<String> = ready_at.keys().cloned().collect();
    until("two blue Pods deleted", Duration::from_secs(60), || async {
        all_pods(&client, "version=blue").await.len() == 1
    })
    .await;
    let gone_at = Instant::now();
    let remaining = all_pods(&client, "version=blue").await;
    // Keep the load on a little longer: the removed Pods must see none of it.
    load.more(25).await;
    let seen = load.finish_without_failures("while scaling").await;
    let removed: Vec<&String> = before.iter().filter(|p| !remaining.contains(p)).collect();
    assert_eq!(removed.len(), 2, "{before:?} → {remaining:?}");
    let late: Vec<_> = seen.iter().filter(|(t, _, pod)| *t > gone_at && removed.contains(&pod)).collect();
    assert!(late.is_empty(), "deleted Pods still answered: {late:?}");

    // Canary by editing the VirtualService: 90/10 → 0/100. Once the gateway runs the new
    // version, no blue answer follows, and no request fails.
    let load = Load::start(url.clone());
    load.more(10).await;
    let old = gateway.version().await;
    let started = Instant::now();
    cluster.apply_ok(&route(0, 100));
    // From the API server's answer to kubectl (the edit is in force) to the gateway running it.
    let applied = Instant::now();
    let new = gateway.wait_version_change(&old, Duration::from_secs(10)).await;
    let switched = Instant::now();
    println!(
        "VirtualService edit: kubectl apply {:?}, then to the gateway {:?}",
        applied - started,
        switched - applied
    );
    assert!(
        switched - applied < Duration::from_secs(1),
        "the route change took {:?} to reach the gateway",
        switched - applied
    );
    load.more(25).await;
    let seen = load.finish_without_failures("during the canary").await;
    let blue_after: Vec<_> = seen.iter().filter(|(t, c, _)| *t > switched && c == "blue").collect();
    assert!(blue_after.is_empty(), "blue answers after version {new} was applied: {}", blue_after.len());
    assert!(seen.iter().any(|(t, c, _)| *t > switched && c == "green"));

    // The same with the Gateway API: an HTTPRoute with weights 9:1, then 0:1.
    cluster.apply_ok(&format!("{GATEWAY_API}---\n{}", http_route(9, 1)));
    let host = [("host", "colors.example")];
    // In force once a blue answer comes: the VirtualService above sends every request to green.
    until("the HTTPRoute to serve (a blue answer)", Duration::from_secs(10), || async {
        let r = get(&url, &host).await;
        r.status == 200 && r.body.trim() == "blue"
    })
    .await;
    let mut colors: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..200 {
        let r = get(&url, &host).await;
        assert_eq!(r.status, 200, "{}", r.body);
        *colors.entry(r.body.trim().to_string()).or_default() += 1;
    }
    let green = colors.get("green").copied().unwrap_or(0);
    assert!((4..=45).contains(&green), "9:1 HTTPRoute gave {colors:?}");
    let load = Load::start_with_host(url.clone(), "colors.example");
    load.more(10).await;
    let old = gateway.version().await;
    cluster.apply_ok(&http_route(0, 1));
    let applied = Instant::now();
    gateway.wait_version_change(&old, Duration::from_secs(10)).await;
    let switched = Instant::now();
    println!("HTTPRoute edit: to the gateway {:?}", switched - applied);
    assert!(switched - applied < Duration::from_secs(1), "the HTTPRoute change took {:?}", switched - applied);
    load.more(25).await;
    let seen = load.finish_without_failures("during the HTTPRoute canary").await;
    assert!(seen.iter().all(|(t, c, _)| *t < switched || c == "green"), "blue after the HTTPRoute switch");

    // `trellis analyze --cluster` reads what the cluster holds, with the same rules as files.
    cluster.apply_ok(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: purple, namespace: colors}\nspec:\n  host: colorteller\n  subsets: [{name: purple, labels: {version: purple}}]\n",
    );
    let out = Command::new(trellis_bin())
        .args(["analyze", "--cluster", "--output", "json"])
        .env("KUBECONFIG", &cluster.kubeconfig)
        .output()
        .expect("trellis analyze --cluster");
    let findings: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    assert!(
        findings.iter().any(|f| f["code"] == "TRL0109" && f["file"] == "k8s:DestinationRule/colors/purple"),
        "{findings:#?}"
    );
}

const REFERENCE: &str = include_str!("../../../examples/kubernetes/reference-platform.yaml");

/// Webhook configurations that call the control plane by URL: the test API server has no
/// Service network to reach it through (the chart's configurations name its Service).
fn webhooks(port: u16) -> String {
    format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {{name: trellis-sidecar-injector}}
webhooks:
- name: istio-injection.sidecar-injector.trellis.dev
  admissionReviewVersions: [v1]
  sideEffects: None
  failurePolicy: Fail
  clientConfig: {{url: "https://localhost:{port}/inject"}}
  rules: [{{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [pods]}}]
  namespaceSelector: {{matchLabels: {{istio-injection: enabled}}}}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {{name: trellis-validator}}
webhooks:
- name: validation.trellis.dev
  admissionReviewVersions: [v1]
  sideEffects: None
  failurePolicy: Fail
  clientConfig: {{url: "https://localhost:{port}/validate"}}
  rules: [{{operations: [CREATE, UPDATE], apiGroups: [networking.istio.io, security.istio.io, telemetry.istio.io], apiVersions: ["*"], resources: ["*"]}}]
"#
    )
}

fn openssl_peer_san(addr: &str) -> String {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", addr, "-showcerts"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl");
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("openssl output");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let start =
        text.find("-----BEGIN CERTIFICATE-----").unwrap_or_else(|| panic!("no certificate from {addr}: {text}"));
    let end = text[start..].find("-----END CERTIFICATE-----").expect("end") + start + 25;
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl x509");
    std::io::Write::write_all(x509.stdin.as_mut().expect("stdin"), &text.as_bytes()[start..end]).expect("write");
    String::from_utf8_lossy(&x509.wait_with_output().expect("x509").stdout).into_owned()
}

async fn pod_named(client: &kube::Client, ns: &str, app: &str) -> k8s_openapi::api::core::v1::Pod {
    let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client.clone(), ns);
    let list = api.list(&kube::api::ListParams::default().labels(&format!("app={app}"))).await.expect("pods");
    list.items
        .into_iter()
        .find(|p| p.metadata.deletion_timestamp.is_none())
        .unwrap_or_else(|| panic!("no pod of {app}"))
}

/// An unmodified `curl` in a Pod's network namespace (its /etc/hosts is the node's cluster DNS).
fn curl_in(netns: &str, url: &str, max_time: &str) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", netns, "curl", "-sS", "--max-time", max_time, url])
        .output()
        .expect("curl")
}

fn pod_ip(p: &k8s_openapi::api::core::v1::Pod) -> String {
    p.status.as_ref().and_then(|s| s.pod_ip.clone()).expect("pod IP")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn injected_sidecars_capture_traffic_and_prove_service_account_identities() {
    assert!(nix::unistd::Uid::effective().is_root(), "Pod network namespaces need root (CI runs as root)");
    let cluster = TestCluster::start().await;
    cluster.apply_ok(CRDS);
    cluster.kubectl_ok(&["wait", "--for", "condition=Established", "crd", "--all", "--timeout", "60s"]);
    let client = cluster.client().await;
    let network = Network::namespaces();
    let Network::Namespaces { gateway: bridge_ip, .. } = &network else { unreachable!() };
    let node = Node::start_with(client.clone(), vec![demo_dir()], network.clone()).await;

    let webhook_port = free_port();
    cluster.apply_ok(&webhooks(webhook_port));
    let cp_addr = format!("{bridge_ip}:{}", free_port());
    let console_addr = format!("{bridge_ip}:{}", free_port());
    let cp = ControlPlane::start_with(
        &cluster,
        &cp_addr,
        &[
            "--console",
            &console_addr,
            "--injected-console",
            &console_addr,
            "--webhook-listen",
            &format!("127.0.0.1:{webhook_port}"),
            "--webhook-name",
            "localhost",
            "--webhook-config",
            "trellis-sidecar-injector",
            "--webhook-config",
            "trellis-validator",
            "--injected-control-plane",
            &cp_addr,
            "--proxy-image",
            "trellis:test",
        ],
    );
    until("the webhooks to serve", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", webhook_port)).await.is_ok()
    })
    .await;
    // The caBundle is set by the control plane at start: wait for it before creating Pods.
    until("the caBundle", Duration::from_secs(30), || async {
        cluster
            .kubectl_ok(&[
                "get",
                "mutatingwebhookconfiguration",
                "trellis-sidecar-injector",
                "-o",
                "jsonpath={.webhooks[0].clientConfig.caBundle}",
            ])
            .len()
            > 100
    })
    .await;

    let manifests = REFERENCE
        .replace("trellis-control.trellis-system.svc:15010", &cp_addr)
        .replace("trellis-control.trellis-system.svc:15014", &console_addr);
    let applied = cluster.apply_ok(&manifests);
    until("every Pod ready", Duration::from_secs(120), || async {
        let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client.clone(), "default");
        let pods = api.list(&Default::default()).await.expect("pods").items;
        pods.len() == 9
            && pods.iter().all(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
    })
    .await;
    let _ = applied;
    // Every request traced (Istio's way: a Telemetry resource; the default is 1%), for the
    // console's traces below.
    cluster.apply_ok(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: trace-all}\nspec:\n  tracing:\n  - randomSamplingPercentage: 100\n",
    );

    // Validation at apply time: an error is refused with its field named; a warning is admitted
    // and kubectl prints it.
    let (ok, out) = cluster.apply(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad-weights}\nspec:\n  hosts: [service-b]\n  http:\n  - route:\n    - destination: {host: service-b}\n      weight: 50\n    - destination: {host: service-c}\n      weight: 40\n",
        &[],
    );
    assert!(!ok, "a VirtualService with weights summing to 90 was admitted: {out}");
    assert!(
        out.contains("denied the request") && out.contains("spec.http[0].route") && out.contains("not 100"),
        "{out}"
    );
    let (ok, out) = cluster.apply(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ghost}\nspec:\n  hosts: [service-b]\n  http:\n  - route:\n    - destination: {host: no-such-service}\n",
        &[],
    );
    assert!(ok, "a VirtualService with only a warning was refused: {out}");
    assert!(out.contains("Warning:") && out.contains("no-such-service"), "{out}");
    cluster.kubectl_ok(&["delete", "virtualservice", "ghost"]);

    // Every app Pod got its sidecar from the webhook the API server called; the gateway opted out.
    for x in "abcdefgh".chars() {
        let p = pod_named(&client, "default", &format!("service-{x}")).await;
        let inits: Vec<String> = p
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(inits, ["trellis-init", "trellis-proxy"], "service-{x}");
        assert_eq!(
            p.metadata.labels.as_ref().and_then(|l| l.get("security.istio.io/tlsMode")).map(String::as_str),
            Some("istio")
        );
    }
    let gw = pod_named(&client, "default", "ingressgateway").await;
    assert!(gw.spec.as_ref().and_then(|s| s.init_containers.clone()).unwrap_or_default().is_empty());

    // Through the gateway: seven greetings, every hop through two sidecars with STRICT mTLS.
    let url = format!("http://{}:8080/api/greeting", pod_ip(&gw));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = tokio::time::timeout(Duration::from_secs(5), get(&url, &[])).await;
        match r {
            Ok(r) if r.status == 200 => break,
            other => {
                let seen = other
                    .map(|r| format!("{} {:?} {}", r.status, r.flag(), r.body))
                    .unwrap_or_else(|_| "timed out".into());
                assert!(Instant::now() < deadline, "the gateway never answered 200; last: {seen}");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval of a wait on a signal
    }
    let r = get(&url, &[]).await;
    assert_eq!(r.status, 200, "{}\n{}", r.body, cp.log());
    let services: Vec<String> =
        r.json().as_array().expect("array").iter().map(|g| g["service"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(services, ["Service D", "Service G", "Service H", "Service E", "Service B", "Service C", "Service A"]);

    // A sidecar presents its Pod's service-account identity (openssl against the captured port).
    let b = pod_named(&client, "default", "service-b").await;
    let san = openssl_peer_san(&format!("{}:8080", pod_ip(&b)));
    assert!(san.contains("URI:spiffe://cluster.local/ns/default/sa/service-b"), "{san}");
    // Plaintext to a STRICT sidecar is refused.
    assert!(support::try_get(&format!("http://{}:8080/api/health", pod_ip(&b))).await.is_err());

    // A token of another service account gets no certificate for service-b.
    let token = service_account_token(&client, "default", "service-c").await;
    let mut c =
        trellis_api::control::control_client::ControlClient::connect(format!("http://{cp_addr}")).await.expect("cp");
    let forged =
        trellis_identity::cert::generate_csr(&trellis_identity::SpiffeId::new("cluster.local", "default", "service-b"))
            .expect("csr");
    let denied = c
        .create_certificate(trellis_api::control::CertificateRequest { csr_pem: forged.csr_pem, token: token.clone() })
        .await;
    assert_eq!(denied.expect_err("service-c's token for service-b").code(), tonic::Code::PermissionDenied);
    let own =
        trellis_identity::cert::generate_csr(&trellis_identity::SpiffeId::new("cluster.local", "default", "service-c"))
            .expect("csr");
    c.create_certificate(trellis_api::control::CertificateRequest { csr_pem: own.csr_pem, token: token.clone() })
        .await
        .expect("service-c's own certificate");
    let denied = c
        .create_certificate(trellis_api::control::CertificateRequest {
            csr_pem: trellis_identity::cert::generate_csr(&trellis_identity::SpiffeId::new(
                "cluster.local",
                "default",
                "service-c",
            ))
            .expect("csr")
            .csr_pem,
            token: "not-a-token".into(),
        })
        .await;
    assert_eq!(denied.expect_err("made-up token").code(), tonic::Code::Unauthenticated);

    // The config stream too: no token, a made-up token, or service-c's token claiming to be
    // service-b are refused, and leave no entry in the control plane's status.
    let claim = |sa: &str| serde_json::json!({"role": "sidecar", "name": "intruder", "namespace": "default", "service_account": sa, "labels": {}, "bind_address": "127.0.0.1", "port_map": {}, "inbound": [], "outbound": null, "upstreams": []});
    let no_token = subscribe(&cp_addr, claim("service-b"), "").await.expect_err("no token");
    assert_eq!(no_token.code(), tonic::Code::Unauthenticated, "{no_token:?}");
    let made_up = subscribe(&cp_addr, claim("service-b"), "not-a-token").await.expect_err("made-up token");
    assert_eq!(made_up.code(), tonic::Code::Unauthenticated, "{made_up:?}");
    let other = subscribe(&cp_addr, claim("service-b"), &token).await.expect_err("service-c's token as service-b");
    assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");
    assert!(other.message().contains("proves default/service-c"), "{other:?}");
    let status = c.status(trellis_api::control::StatusRequest {}).await.expect("status").into_inner();
    assert!(!status.proxies.iter().any(|p| p.workload == "intruder"), "a refused stream left an entry");
    subscribe(&cp_addr, claim("service-c"), &token).await.expect("service-c's own token admits it");
    // Every sidecar and the gateway are in the status, one entry per Pod.
    let status = c.status(trellis_api::control::StatusRequest {}).await.expect("status").into_inner();
    assert!(status.proxies.iter().filter(|p| p.state == "CONNECTED").count() >= 9, "{:?}", status.proxies);
    // Each injected sidecar reports an admin address others can scrape: its Pod's IP.
    let sidecars: Vec<_> = status.proxies.iter().filter(|p| p.role == "sidecar" && p.workload != "intruder").collect();
    assert_eq!(sidecars.len(), 8, "{sidecars:?}");
    assert!(
        sidecars.iter().all(|p| p.admin_address.starts_with("10.244.") && p.admin_address.ends_with(":15021")),
        "{sidecars:?}"
    );

    // Transparent capture: an unmodified curl in Service A's Pod calls Service B by its cluster
    // name. Nothing routes a ClusterIP here (no kube-proxy), so an answer means the sidecar
    // took the call; Service B's sidecar counts one more mTLS request from service-a.
    let a = pod_named(&client, "default", "service-a").await;
    let b_admin: std::net::SocketAddr = format!("{}:15021", pod_ip(&b)).parse().expect("addr");
    let from_a = |metrics: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains("reporter=\"destination\"")
                    && l.contains("source_workload=\"service-a\"")
                    && l.contains("connection_security_policy=\"mutual_tls\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let before = from_a(&support::admin_get(b_admin, "/metrics").await.expect("metrics").1);
    let netns = node.pod_netns("default", a.metadata.name.as_deref().unwrap_or_default()).expect("netns");
    let out = curl_in(&netns, "http://service-b.default.svc.cluster.local/api/greeting", "5");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("Service B"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let (_, a_metrics) =
        support::admin_get(format!("{}:15021", pod_ip(&a)).parse().expect("addr"), "/metrics").await.expect("metrics");
    assert!(
        a_metrics.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("reporter=\"source\"")
            && l.contains("destination_service=\"service-b.default.svc.cluster.local\"")),
        "service-a's sidecar did not see the call"
    );
    until("service-b's sidecar to count the call", Duration::from_secs(5), || async {
        from_a(&support::admin_get(b_admin, "/metrics").await.expect("metrics").1) > before
    })
    .await;

    // Service E scaled 1 → 3 → 1 while greetings go through the gateway at 50 req/s: each new
    // Pod's sidecar receives requests soon after the Pod is ready, a deleted Pod's none once it
    // is gone, and no request fails.
    let load = Load::start(url.clone());
    load.more(10).await;
    let load_begun = Instant::now();
    cluster.kubectl_ok(&["scale", "deployment", "service-e", "--replicas", "3"]);
    let served = |ip: String| async move {
        let metrics = support::admin_get(format!("{ip}:15021").parse().expect("addr"), "/metrics")
            .await
            .map(|m| m.1)
            .unwrap_or_default();
        metrics
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{") && l.contains("reporter=\"destination\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
            > 0.0
    };
    let mut ready_at: BTreeMap<String, Instant> = BTreeMap::new();
    let mut served_at: BTreeMap<String, Instant> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client.clone(), "default");
        let pods = api.list(&kube::api::ListParams::default().labels("app=service-e")).await.expect("pods").items;
        for p in pods.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let (Some(name), true) = (p.metadata.name.clone(), ready) else { continue };
            ready_at.entry(name.clone()).or_insert_with(Instant::now);
            if !served_at.contains_key(&name) && served(pod_ip(p)).await {
                served_at.insert(name, Instant::now());
            }
        }
        if ready_at.len() == 3 && served_at.len() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "three Service E Pods serving: ready {ready_at:?}, served {served_at:?}");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on a signal
    }
    for (pod, ready) in &ready_at {
        let lag = served_at[pod].saturating_duration_since(*ready);
        assert!(lag < Duration::from_secs(2), "{pod} got its first request {lag:?} after it was ready");
    }
    println!("Service E: three Pods serving {:?} after the load started", load_begun.elapsed());
    cluster.kubectl_ok(&["scale", "deployment", "service-e", "--replicas", "1"]);
    println!("Service E: scaled down {:?} after the load started", load_begun.elapsed());
    until("two Service E Pods deleted", Duration::from_secs(60), || async {
        let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client.clone(), "default");
        api.list(&kube::api::ListParams::default().labels("app=service-e")).await.expect("pods").items.len() == 1
    })
    .await;
    println!("Service E: two Pods gone {:?} after the load started", load_begun.elapsed());
    load.more(25).await;
    let seen = load.finish_without_failures("while Service E scaled").await;
    assert!(seen.iter().all(|(_, body, _)| body.contains("Service E")), "a greeting without Service E");

    // A Service without a selector: its endpoints are an EndpointSlice someone manages (here:
    // the gateway Pod's admin port). Called by name from Service A's Pod, through its sidecar.
    cluster.apply_ok(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: gateway-admin}}
spec:
  ports: [{{name: http, port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: gateway-admin-1
  labels: {{kubernetes.io/service-name: gateway-admin, endpointslice.kubernetes.io/managed-by: by-hand}}
addressType: IPv4
ports: [{{name: http, port: 15021}}]
endpoints: [{{addresses: ["{}"], conditions: {{ready: true}}}}]
"#,
        pod_ip(&gw)
    ));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = curl_in(&netns, "http://gateway-admin.default.svc.cluster.local/ready", "2");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.contains("LIVE") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hand-made endpoint never answered: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval of a wait on a signal
    }

    // The console, served by the control plane (as `kubectl port-forward svc/trellis-control
    // 15014` reaches it): the graph from the metrics it read at the sidecars' Pod IPs, and the
    // traces and access-log lines the injected sidecars sent it.
    let console = |path: &str| {
        let url = format!("http://{console_addr}{path}");
        async move {
            let r = get(&url, &[]).await;
            assert_eq!(r.status, 200, "{url}: {}", r.body);
            r.json()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        get(&url, &[]).await;
        let graph = console("/api/graph?window=300").await;
        let edges = graph["edges"].as_array().cloned().unwrap_or_default();
        let missing: Vec<_> = [("ingressgateway", "service-a")]
            .iter()
            .chain(&support::mesh::REFERENCE_CALLS)
            .filter(|(from, to)| {
                !edges.iter().any(|e| {
                    e["source"] == format!("workload:default/{from}")
                        && e["target"] == format!("workload:default/{to}")
                        && e["rps"].as_f64().unwrap_or(0.0) > 0.0
                })
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the console's graph lacks {missing:?}: {graph:#}\nscrape: {:#}\ntargets: {:#}",
            console("/api/status").await["scrape"],
            console("/api/metrics/targets").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // poll interval of a wait on a signal
    }
    let graph = console("/api/graph?window=300").await;
    assert!(
        graph["edges"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["source"] == "workload:default/service-a" && e["mtls"] == true),
        "the graph shows mTLS: {graph:#}"
    );
    // A greeting's trace, across the sidecars of A, B and E.
    let deadline = Instant::now() + Duration::from_secs(30);
    let trace_id = loop {
        get(&url, &[]).await;
        let found = console("/api/traces?limit=100").await;
        let across = found["traces"].as_array().into_iter().flatten().find_map(|t| {
            let services: Vec<&str> = t["services"].as_array()?.iter().filter_map(|s| s.as_str()).collect();
            ["ingressgateway.default", "service-a.default", "service-b.default", "service-e.default"]
                .iter()
                .all(|s| services.contains(s))
                .then(|| t["trace_id"].as_str().map(str::to_string))?
        });
        if let Some(t) = across {
            break t;
        }
        assert!(Instant::now() < deadline, "no trace across service-a, -b and -e in the console: {found:#}");
        tokio::time::sleep(Duration::from_millis(200)).await; // poll interval of a wait on a signal
    };
    let lines = console(&format!("/api/logs?trace_id={trace_id}")).await;
    let lines = lines["lines"].as_array().cloned().unwrap_or_default();
    assert!(
        lines.iter().any(|l| l["fields"]["path"] == "/api/greeting" && l["trace_id"] == trace_id.as_str()),
        "the trace's access-log lines reached the console: {lines:#?}"
    );
}

/// `helm` from the test cluster's directory (built by scripts/testcluster.sh).
fn helm(cluster: &TestCluster, args: &[&str]) -> std::process::Output {
    Command::new(cluster.bin.join("helm"))
        .args(args)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("HELM_CACHE_HOME", cluster.dir.path().join("helm-cache"))
        .env("HELM_CONFIG_HOME", cluster.dir.path().join("helm-config"))
        .env("HELM_DATA_HOME", cluster.dir.path().join("helm-data"))
        .output()
        .expect("run helm")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_helm_chart_and_offline_injection_apply_to_a_real_api_server() {
    let cluster = TestCluster::start().await;
    let client = cluster.client().await;
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/helm/trellis");
    let chart = chart.to_string_lossy().into_owned();

    let lint = helm(&cluster, &["lint", "--strict", &chart]);
    let text = String::from_utf8_lossy(&lint.stdout).into_owned() + &String::from_utf8_lossy(&lint.stderr);
    assert!(lint.status.success(), "helm lint: {text}");
    assert!(text.contains("0 chart(s) failed"), "{text}");

    // Rendered for the test API server's version (helm template alone assumes an old one).
    let version: serde_json::Value =
        serde_json::from_str(&cluster.kubectl_ok(&["version", "-o", "json"])).expect("kubectl version");
    let server_version = version["serverVersion"]["gitVersion"].as_str().expect("server version").to_string();
    let rendered = helm(
        &cluster,
        &[
            "--kube-version",
            &server_version,
            "template",
            "trellis",
            &chart,
            "--namespace",
            "trellis-system",
            "--include-crds",
            "--set",
            "meshDefaults.mtlsMode=STRICT",
        ],
    );
    assert!(rendered.status.success(), "helm template: {}", String::from_utf8_lossy(&rendered.stderr));
    let rendered = String::from_utf8_lossy(&rendered.stdout).into_owned();
    // The console on by default: served by the control plane on its Service, and injected
    // sidecars pointed at it.
    for wanted in [
        "--console=0.0.0.0:15014",
        "--injected-console=trellis-control.trellis-system.svc:15014",
        "{name: http-console, port: 15014, targetPort: 15014}",
    ] {
        assert!(rendered.contains(wanted), "the chart renders {wanted}");
    }
    cluster.kubectl_ok(&["create", "namespace", "trellis-system"]);
    // CRDs first (the mesh default PeerAuthentication needs its kind), as Helm installs them.
    let (crds, rest): (Vec<&str>, Vec<&str>) =
        rendered.split("\n---").partition(|d| d.contains("kind: CustomResourceDefinition"));
    let (ok, out) = cluster.apply(&crds.join("\n---\n"), &["--server-side"]);
    assert!(ok, "CRDs: {out}");
    cluster.kubectl_ok(&["wait", "--for", "condition=Established", "crd", "--all", "--timeout", "60s"]);
    let (ok, out) = cluster.apply(&rest.join("\n---\n"), &["--server-side"]);
    assert!(ok, "chart: {out}");
    for object in [
        "deployment/trellis-control",
        "service/trellis-control",
        "serviceaccount/trellis-control",
        "peerauthentication.security.istio.io/default",
    ] {
        cluster.kubectl_ok(&["get", "-n", "trellis-system", object]);
    }
    cluster.kubectl_ok(&[
        "get",
        "mutatingwebhookconfiguration/trellis-sidecar-injector",
        "validatingwebhookconfiguration/trellis-validator",
    ]);
    // The chart's RBAC is what the control plane needs: run it as the chart's service account
    // (its token, not the admin certificate) with the chart's flags; it lists and watches the
    // cluster, keeps its CA in a Secret and sets the webhooks' caBundle.
    let token = service_account_token_for(&client, "trellis-system", "trellis-control", &[]).await;
    let kubeconfig = cluster.kubeconfig_with_token("trellis-control", &token);
    let webhook_port = free_port();
    let cp = ControlPlane::start_as(
        &kubeconfig,
        &format!("127.0.0.1:{}", free_port()),
        &[
            "--ca-secret",
            "trellis-system/trellis-ca",
            "--webhook-listen",
            &format!("127.0.0.1:{webhook_port}"),
            "--webhook-name",
            "trellis-control.trellis-system.svc",
            "--webhook-config",
            "trellis-sidecar-injector",
            "--webhook-config",
            "trellis-validator",
        ],
    );
    until("the CA Secret and the caBundle", Duration::from_secs(30), || async {
        cluster.kubectl(&["get", "secret", "-n", "trellis-system", "trellis-ca"]).status.success()
            && cluster
                .kubectl_ok(&[
                    "get",
                    "validatingwebhookconfiguration",
                    "trellis-validator",
                    "-o",
                    "jsonpath={.webhooks[0].clientConfig.caBundle}",
                ])
                .len()
                > 100
    })
    .await;
    until("the control plane to watch the cluster", Duration::from_secs(30), || async {
        cp.log().contains("config loaded")
    })
    .await;
    assert!(!cp.log().contains("forbidden"), "the chart's RBAC is not enough:\n{}", cp.log());
    drop(cp);

    // No control plane runs here to answer them; the dry run below is the API server's own check.
    cluster.kubectl_ok(&[
        "delete",
        "mutatingwebhookconfiguration/trellis-sidecar-injector",
        "validatingwebhookconfiguration/trellis-validator",
    ]);

    // `trellis inject -f`: what it prints passes the API server's own validation.
    let injected = Command::new(trellis_bin())
        .args(["inject", "-f", "../../examples/kubernetes/reference-platform.yaml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("trellis inject");
    assert!(injected.status.success(), "{}", String::from_utf8_lossy(&injected.stderr));
    assert!(String::from_utf8_lossy(&injected.stderr).contains("8 pod template(s) injected"));
    let text = String::from_utf8_lossy(&injected.stdout).into_owned();
    assert_eq!(text.matches("\"name\": \"trellis-proxy\"").count(), 8, "the gateway opts out");
    // Eight sidecars, and the gateway's own arguments in the manifest.
    let traces = "\"http://trellis-control.trellis-system.svc:15014/v1/traces\"";
    assert_eq!(text.matches(traces).count(), 9, "{text}");
    assert_eq!(text.matches("\"http://trellis-control.trellis-system.svc:15014/v1/logs\"").count(), 9, "{text}");
    let without = Command::new(trellis_bin())
        .args(["inject", "--no-console", "-f", "../../examples/kubernetes/reference-platform.yaml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("trellis inject --no-console");
    assert!(without.status.success(), "{}", String::from_utf8_lossy(&without.stderr));
    assert_eq!(
        String::from_utf8_lossy(&without.stdout).matches(traces).count(),
        1,
        "--no-console: the gateway's alone"
    );
    // A server-side dry run does not create the namespaces it would create: make that one first.
    cluster.kubectl_ok(&["create", "namespace", "istio-system"]);
    let (ok, out) = cluster.apply(&text, &["--dry-run=server"]);
    assert!(ok, "kubectl apply --dry-run=server: {out}");
    assert!(out.contains("deployment.apps/service-a created (server dry run)"), "{out}");
}

/// `trellis dashboard --kubernetes` against the control plane's Service, as the chart makes it.
const CONTROL_SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: trellis-control, namespace: trellis-system}
spec:
  selector: {app: trellis-control}
  ports:
  - {name: grpc, port: 15010, targetPort: 15010}
  - {name: http-console, port: 15014, targetPort: 15014}
";

/// Runs `trellis dashboard --kubernetes ARGS` with the cluster's kubeconfig until it exits.
fn dashboard_fails(cluster: &TestCluster, args: &[&str]) -> String {
    let out = Command::new(trellis_bin())
        .args(["dashboard", "--kubernetes", "--port", "0"])
        .args(args)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .output()
        .expect("trellis dashboard");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "trellis dashboard {args:?} did not fail: {stderr}");
    assert!(out.stdout.is_empty(), "an address was printed though it cannot serve: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trellis_dashboard_serves_a_clusters_console_through_the_api_server() {
    // The API server proxies only to Pod IPs that Endpoints may hold (not loopback ones): Pods
    // get network namespaces of their own, on a bridge.
    assert!(nix::unistd::Uid::effective().is_root(), "Pod network namespaces need root (CI runs as root)");
    let cluster = TestCluster::start().await;
    let client = cluster.client().await;
    let _node = Node::start_with(client.clone(), vec![], Network::namespaces()).await;

    // What is missing is named, before anything is served.
    let err = dashboard_fails(&cluster, &[]);
    assert!(err.contains("no Service trellis-control in namespace trellis-system"), "{err}");
    cluster.kubectl_ok(&["create", "namespace", "trellis-system"]);
    cluster.apply_ok(CONTROL_SERVICE);
    let err = dashboard_fails(&cluster, &[]);
    assert!(err.contains("no ready Pod behind Service trellis-system/trellis-control"), "{err}");
    let err = dashboard_fails(&cluster, &["--service-port", "15999"]);
    assert!(err.contains("has no port 15999 (it has 15010 (grpc), 15014 (http-console))"), "{err}");

    // The control plane with its console in a Pod of the Service, ready when the console answers.
    let config = cluster.dir.path().join("control-config");
    std::fs::create_dir_all(&config).expect("config dir");
    let script = format!(
        "exec '{}' control --config '{}' --ca-dir '{}' --listen \"$POD_IP:15010\" --console \"$POD_IP:15014\"",
        trellis_bin(),
        config.display(),
        cluster.dir.path().join("control-ca").display()
    );
    let deployment = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "trellis-control", "namespace": "trellis-system"},
        "spec": {
            "selector": {"matchLabels": {"app": "trellis-control"}},
            "template": {
                "metadata": {"labels": {"app": "trellis-control"}},
                "spec": {"containers": [{
                    "name": "control", "image": "trellis:test", "command": ["sh", "-c", script],
                    "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                    "ports": [{"name": "http-console", "containerPort": 15014}],
                    "readinessProbe": {"httpGet": {"path": "/api/status", "port": 15014}}
                }]}
            }
        }
    });
    cluster.apply_ok(&deployment.to_string());
    until("the Service's endpoint", Duration::from_secs(60), || async {
        !cluster
            .kubectl_ok(&[
                "get",
                "endpoints",
                "-n",
                "trellis-system",
                "trellis-control",
                "-o",
                "jsonpath={.subsets[*].addresses[*].ip}",
            ])
            .trim()
            .is_empty()
    })
    .await;

    let mut child = Command::new(trellis_bin())
        .args(["dashboard", "--kubernetes", "--port", "0"])
        .env("KUBECONFIG", &cluster.kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("trellis dashboard");
    let stdout = child.stdout.take().expect("stdout");
    let first = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout).lines().next().and_then(Result::ok)
    });
    let url = match tokio::time::timeout(Duration::from_secs(30), first).await {
        Ok(Ok(Some(url))) => url,
        other => {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!("no address from trellis dashboard ({other:?}): {}", String::from_utf8_lossy(&out.stderr));
        }
    };
    assert!(url.starts_with("http://127.0.0.1:") && url.ends_with('/'), "{url}");

    // The console's API, its page and every file the page loads, through the API server.
    let status = get(&format!("{url}api/status"), &[]).await;
    assert_eq!(status.status, 200, "{}", status.body);
    let stores: Vec<String> = status.json()["stores"]
        .as_array()
        .expect("stores")
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(stores, ["spans", "logs", "metrics"]);
    let page = get(&url, &[]).await;
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").is_some_and(|c| c.starts_with("text/html")), "{:?}", page.headers);
    assert!(page.body.contains("<title>Trellis console</title>"), "{}", page.body);
    // The API server rewrote the page's links under its proxy path: the proof that the page came
    // through it, and what the dashboard must take back off.
    let prefix = "/api/v1/namespaces/trellis-system/services/http:trellis-control:15014/proxy";
    assert!(page.body.contains(&format!("{prefix}/assets/app.js")), "{}", page.body);
    let links: Vec<&str> =
        page.body.split(['"', '\'']).filter(|s| s.starts_with(prefix) && s.contains("/assets/")).collect();
    assert!(links.len() >= 3, "{links:?}");
    for link in links.iter().copied().chain(["/assets/app.js"]) {
        let r = get(&format!("{}{link}", url.trim_end_matches('/')), &[]).await;
        assert_eq!(r.status, 200, "{link}: {}", r.body);
        assert!(r.body.len() > 100, "{link}: {}", r.body);
    }
    let config = get(&format!("{url}api/config"), &[]).await;
    assert_eq!(config.status, 200, "{}", config.body);
    let _ = child.kill();
    let _ = child.wait();
}
