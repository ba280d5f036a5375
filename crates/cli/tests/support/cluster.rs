//! A real Kubernetes control plane for tests, as controller-runtime's envtest runs one: etcd,
//! kube-apiserver and kube-controller-manager built from their Go modules
//! (`scripts/testcluster.sh`), started on 127.0.0.1 with certificates made here, plus `kubectl`.
//!
//! There is no kubelet and no container runtime on this machine, so [`Node`] plays the node: it
//! binds pending Pods to itself, runs each Pod's containers as local processes (the command,
//! args and env of the Pod spec *as the API server returned it*), gives each Pod its own loopback
//! address as its IP, waits for its readiness probe and reports the Pod's status; a deleted Pod's
//! processes get SIGTERM, then the Pod is removed, as a kubelet does.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Container, Node as KubeNode, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;

use super::free_port;

/// The directory of the test cluster's binaries: `$TRELLIS_TESTCLUSTER_BIN`, else what
/// `scripts/testcluster.sh` prints (it builds them the first time and caches them).
pub fn binaries() -> PathBuf {
    if let Ok(dir) = std::env::var("TRELLIS_TESTCLUSTER_BIN") {
        return PathBuf::from(dir);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/testcluster.sh");
    let out = Command::new("bash").arg(&script).stderr(Stdio::inherit()).output().expect("run testcluster.sh");
    assert!(out.status.success(), "scripts/testcluster.sh failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// etcd + kube-apiserver + kube-controller-manager, stopped on drop.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub kubeconfig: PathBuf,
    pub server: String,
    procs: Vec<(String, Child)>,
}

impl TestCluster {
    pub async fn start() -> TestCluster {
        let bin = binaries();
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let pki = Pki::new(d);

        let (etcd_client, etcd_peer, api_port) = (free_port(), free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let mut procs = Vec::new();
        procs.push((
            "etcd".to_string(),
            spawn(
                &bin.join("etcd"),
                &[
                    "--data-dir",
                    &d.join("etcd").to_string_lossy(),
                    "--listen-client-urls",
                    &etcd_url,
                    "--advertise-client-urls",
                    &etcd_url,
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{etcd_peer}"),
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{etcd_peer}"),
                    "--initial-cluster",
                    &format!("default=http://127.0.0.1:{etcd_peer}"),
                    "--unsafe-no-fsync",
                    "--log-level",
                    "warn",
                ],
                &d.join("etcd.log"),
            ),
        ));
        let server = format!("https://127.0.0.1:{api_port}");
        let p = |name: &str| d.join(name).to_string_lossy().into_owned();
        procs.push((
            "kube-apiserver".to_string(),
            spawn(
                &bin.join("kube-apiserver"),
                &[
                    "--etcd-servers",
                    &etcd_url,
                    "--bind-address",
                    "127.0.0.1",
                    "--advertise-address",
                    "127.0.0.1",
                    "--secure-port",
                    &api_port.to_string(),
                    "--tls-cert-file",
                    &p("apiserver.crt"),
                    "--tls-private-key-file",
                    &p("apiserver.key"),
                    "--client-ca-file",
                    &p("ca.crt"),
                    "--service-account-issuer",
                    "https://kubernetes.default.svc.cluster.local",
                    "--service-account-key-file",
                    &p("sa.pub"),
                    "--service-account-signing-key-file",
                    &p("sa.key"),
                    "--api-audiences",
                    "https://kubernetes.default.svc.cluster.local",
                    "--service-cluster-ip-range",
                    "10.96.0.0/16",
                    "--authorization-mode",
                    "RBAC",
                    "--allow-privileged",
                    "--endpoint-reconciler-type",
                    "none",
                    // Webhooks of a Service are called at one of its endpoints, never through DNS
                    // (a `*.svc` name means nothing on this machine).
                    "--enable-aggregator-routing=true",
                    "--v",
                    "0",
                ],
                &d.join("kube-apiserver.log"),
            ),
        ));
        let kubeconfig = d.join("kubeconfig");
        std::fs::write(&kubeconfig, pki.kubeconfig(&server)).expect("kubeconfig");
        let mut cluster = TestCluster { dir, bin, kubeconfig, server, procs };
        cluster.wait_apiserver().await;
        let kc = cluster.kubeconfig.to_string_lossy().into_owned();
        let d = cluster.dir.path().to_path_buf();
        cluster.procs.push((
            "kube-controller-manager".to_string(),
            spawn(
                &cluster.bin.join("kube-controller-manager"),
                &[
                    "--kubeconfig",
                    &kc,
                    "--authentication-kubeconfig",
                    &kc,
                    "--authorization-kubeconfig",
                    &kc,
                    "--leader-elect=false",
                    "--secure-port",
                    "0",
                    "--service-account-private-key-file",
                    &d.join("sa.key").to_string_lossy(),
                    "--root-ca-file",
                    &d.join("ca.crt").to_string_lossy(),
                    "--controllers",
                    "*,-node-lifecycle-controller,-node-ipam-controller,-cloud-node-lifecycle-controller,-service-lb-controller,-node-route-controller,-persistentvolume-binder-controller,-persistentvolume-attach-detach-controller",
                    "--concurrent-deployment-syncs",
                    "5",
                    "--v",
                    "0",
                ],
                &d.join("kube-controller-manager.log"),
            ),
        ));
        // The service-account controller creating `default` in `default` says the controllers run.
        cluster
            .wait_for(
                || cluster.kubectl(&["get", "serviceaccount", "default", "-n", "default"]).status.success(),
                "the controller manager to create the default service account",
            )
            .await;
        cluster
    }

    async fn wait_apiserver(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let out = self.kubectl(&["get", "--raw", "/readyz"]);
            if out.status.success() {
                return;
            }
            self.check_alive();
            assert!(Instant::now() < deadline, "kube-apiserver not ready in 90 s:\n{}", self.logs());
            // Poll interval: the API server has no readiness signal but its /readyz.
            tokio::time::sleep(Duration::from_millis(200)).await; // poll interval of a wait on /readyz
        }
    }

    async fn wait_for(&self, mut ok: impl FnMut() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(200)).await; // poll interval between kubectl checks
        }
    }

    fn check_alive(&mut self) {
        for (name, child) in &mut self.procs {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{name} exited with {status}:\n{}",
                    std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
                );
            }
        }
    }

    /// The tail of every component's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (name, _) in &self.procs {
            let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- {name}\n{}\n", tail.into_iter().rev().collect::<Vec<_>>().join("\n")));
        }
        out
    }

    /// Runs `kubectl ARGS` against this cluster.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(self.bin.join("kubectl"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl")
    }

    /// `kubectl ARGS`, which must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` with `yaml` on stdin: the whole output (stdout + stderr) and success.
    pub fn apply(&self, yaml: &str, extra: &[&str]) -> (bool, String) {
        use std::io::Write;
        let mut child = Command::new(self.bin.join("kubectl"))
            .args(["apply", "-f", "-"])
            .args(extra)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl apply");
        child.stdin.take().expect("stdin").write_all(yaml.as_bytes()).expect("write manifest");
        let out = child.wait_with_output().expect("kubectl apply");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    pub fn apply_ok(&self, yaml: &str) -> String {
        let (ok, text) = self.apply(yaml, &[]);
        assert!(ok, "kubectl apply failed: {text}");
        text
    }

    /// A kubeconfig that authenticates with `token` (a service account's) instead of the admin
    /// certificate, so what runs with it has exactly that account's RBAC.
    pub fn kubeconfig_with_token(&self, name: &str, token: &str) -> PathBuf {
        use base64::Engine;
        let ca = std::fs::read_to_string(self.dir.path().join("ca.crt")).expect("ca.crt");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: sa\ncurrent-context: test\n",
            self.server,
            base64::engine::general_purpose::STANDARD.encode(ca)
        );
        let path = self.dir.path().join(format!("kubeconfig-{name}"));
        std::fs::write(&path, text).expect("kubeconfig");
        path
    }

    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("config");
        kube::Client::try_from(config).expect("client")
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for (_, child) in self.procs.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A proxy address that refuses: whatever in the test cluster would dial out of this machine
/// through an HTTP client fails here instead (Go never proxies loopback, so calls to 127.0.0.1
/// and localhost go direct, as do calls into the Pod network, [`NO_PROXY`]).
const NOWHERE_PROXY: &str = "http://127.0.0.1:9";
/// What the cluster's processes reach directly: this machine, and the Pod network of
/// [`Network::namespaces`] (the API server's Service proxy dials Pod IPs, as on a node).
const NO_PROXY: &str = "127.0.0.1,localhost,10.244.0.0/16";

fn spawn(program: &Path, args: &[&str], log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    Command::new(program)
        .args(args)
        .env("HTTPS_PROXY", NOWHERE_PROXY)
        .env("HTTP_PROXY", NOWHERE_PROXY)
        .env("NO_PROXY", NO_PROXY)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()))
}

/// The cluster's certificates: a CA, the API server's serving certificate, an admin client
/// certificate (group `system:masters`), and the service-account signing key.
struct Pki {
    ca_pem: String,
    admin_cert: String,
    admin_key: String,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.distinguished_name.push(DnType::CommonName, "trellis-test-cluster-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().expect("key");
        let mut sp = CertificateParams::new(vec![
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default.svc".to_string(),
            "kubernetes.default.svc.cluster.local".to_string(),
        ])
        .expect("params");
        sp.subject_alt_names.push(rcgen::SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        sp.subject_alt_names.push(rcgen::SanType::IpAddress("10.96.0.1".parse().expect("ip")));
        sp.distinguished_name.push(DnType::CommonName, "kube-apiserver");
        let server = sp.signed_by(&server_key, &issuer).expect("server cert");

        let admin_key = KeyPair::generate().expect("key");
        let mut ap = CertificateParams::new(Vec::<String>::new()).expect("params");
        ap.distinguished_name.push(DnType::CommonName, "admin");
        ap.distinguished_name.push(DnType::OrganizationName, "system:masters");
        let admin = ap.signed_by(&admin_key, &issuer).expect("admin cert");

        let sa_key = KeyPair::generate().expect("key");
        let w = |name: &str, text: &str| std::fs::write(dir.join(name), text).expect("write pki");
        w("ca.crt", &ca.pem());
        w("apiserver.crt", &server.pem());
        w("apiserver.key", &server_key.serialize_pem());
        w("sa.key", &sa_key.serialize_pem());
        w("sa.pub", &sa_key.public_key_pem());
        Pki { ca_pem: ca.pem(), admin_cert: admin.pem(), admin_key: admin_key.serialize_pem() }
    }

    fn kubeconfig(&self, server: &str) -> String {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\ncurrent-context: test\n",
            b64(&self.ca_pem),
            b64(&self.admin_cert),
            b64(&self.admin_key)
        )
    }
}

// --- the node ---

/// The node's name in the cluster.
pub const NODE_NAME: &str = "trellis-test-node";

/// How Pods get their network.
#[derive(Clone, Debug)]
pub enum Network {
    /// Every Pod shares this machine's network, with a loopback address of its own as its IP
    /// (apps bind the Pod IP they get from the downward API). No capture is possible.
    Loopback,
    /// Every Pod gets a network namespace of its own (`ip netns`), with a veth on a bridge the
    /// node creates, as a CNI plugin does: `bridge` with `gateway` (the node's address on it,
    /// /16) and Pods from the next addresses. Pods' `/etc/hosts` resolve Services to their
    /// ClusterIPs, as cluster DNS would. Needs root.
    Namespaces { bridge: String, gateway: std::net::Ipv4Addr },
}

impl Network {
    /// A private Pod network for this test process (bridge named after the pid).
    pub fn namespaces() -> Network {
        Network::Namespaces {
            bridge: format!("trl{}", std::process::id() % 100_000),
            gateway: std::net::Ipv4Addr::new(10, 244, 0, 1),
        }
    }
}

/// Plays the kubelet (and the scheduler) for every Pod of the cluster; stops on drop.
pub struct Node {
    task: tokio::task::JoinHandle<()>,
    dns: Option<tokio::task::JoinHandle<()>>,
    pods: Arc<Mutex<BTreeMap<String, RunningPod>>>,
    network: Network,
}

#[derive(Default)]
struct RunningPod {
    ip: String,
    netns: Option<String>,
    dir: Option<PathBuf>,
    children: Arc<Mutex<Vec<Child>>>,
}

struct NodeCx {
    client: kube::Client,
    path_dirs: Vec<PathBuf>,
    network: Network,
    root: PathBuf,
}

impl Node {
    pub async fn start(client: kube::Client, path_dirs: Vec<PathBuf>) -> Node {
        Node::start_with(client, path_dirs, Network::Loopback).await
    }

    pub async fn start_with(client: kube::Client, path_dirs: Vec<PathBuf>, network: Network) -> Node {
        if let Network::Namespaces { bridge, gateway } = &network {
            let _ = run_ip(&["link", "del", bridge]);
            run_ip(&["link", "add", bridge, "type", "bridge"]).expect("create bridge");
            // A fixed address, as CNI bridge plugins set: a bridge otherwise takes the lowest MAC
            // of its ports, which changes when a Pod's veth goes, and every Pod's ARP entry for
            // the node goes stale for seconds.
            run_ip(&["link", "set", bridge, "address", "02:00:0a:f4:00:01"]).expect("bridge address");
            run_ip(&["addr", "add", &format!("{gateway}/16"), "dev", bridge]).expect("bridge address");
            run_ip(&["link", "set", bridge, "up"]).expect("bridge up");
            // Pods reach each other and this machine's address on the bridge, nothing beyond it
            // (even where this machine forwards packets).
            forward_guard(bridge, "-I").expect("iptables FORWARD guard for the pod bridge");
        }
        let nodes: Api<KubeNode> = Api::all(client.clone());
        let node: KubeNode = serde_json::from_value(serde_json::json!({
            "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME}},
        }))
        .expect("node");
        nodes.create(&PostParams::default(), &node).await.expect("create node");
        let pods: Arc<Mutex<BTreeMap<String, RunningPod>>> = Arc::default();
        let running = pods.clone();
        let cx_client = client.clone();
        let root = std::env::temp_dir().join(format!("trellis-node-{}", std::process::id()));
        std::fs::create_dir_all(&root).expect("node dir");
        let cx = Arc::new(NodeCx { client: client.clone(), path_dirs, network: network.clone(), root });
        let task = tokio::spawn(async move {
            let api: Api<Pod> = Api::all(client.clone());
            let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
            let mut stream = std::pin::pin!(stream);
            let mut next_ip = 1u32;
            let mut terminating = std::collections::BTreeSet::new();
            while let Some(ev) = stream.next().await {
                let pod = match ev {
                    Ok(Event::Apply(p) | Event::InitApply(p)) => p,
                    _ => continue,
                };
                let ns = pod.metadata.namespace.clone().unwrap_or_default();
                let name = pod.metadata.name.clone().unwrap_or_default();
                let key = format!("{ns}/{name}");
                let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
                let spec = pod.spec.clone().unwrap_or_default();
                if pod.metadata.deletion_timestamp.is_some() {
                    if !terminating.insert(key.clone()) {
                        continue;
                    }
                    let stopped = running.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                    // The containers' preStop sleep hooks run first, then SIGTERM, as a kubelet does.
                    let pre_stop = spec
                        .containers
                        .iter()
                        .filter_map(|c| c.lifecycle.as_ref()?.pre_stop.as_ref()?.sleep.as_ref().map(|s| s.seconds))
                        .max()
                        .unwrap_or(0);
                    tokio::spawn(async move {
                        if let Some(rp) = stopped {
                            // The preStop sleep hook itself (the Pod asked for it), not a wait.
                            tokio::time::sleep(Duration::from_secs(pre_stop.max(0) as u64)).await; // the Pod's preStop sleep itself
                            let _ = tokio::task::spawn_blocking(move || rp.stop()).await;
                        }
                        let _ = api
                            .delete(&name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
                            .await;
                    });
                    continue;
                }
                if spec.node_name.is_none() {
                    let binding = serde_json::json!({
                        "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                        "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME},
                    });
                    let _ = api
                        .create_subresource::<_, serde_json::Value>("binding", &name, &PostParams::default(), &binding)
                        .await;
                    continue;
                }
                if running.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&key) {
                    continue;
                }
                let n = next_ip;
                next_ip += 1;
                let mut rp = RunningPod::default();
                match &cx.network {
                    Network::Loopback => rp.ip = format!("127.0.{}.{}", 10 + n / 250, 1 + n % 250),
                    Network::Namespaces { bridge, gateway } => {
                        let o = gateway.octets();
                        rp.ip = format!("{}.{}.{}.{}", o[0], o[1], (1 + n) / 250, (1 + n) % 250 + 1);
                        let netns = format!("{bridge}-{n}");
                        setup_netns(&netns, bridge, &format!("{bridge}v{n}"), &rp.ip, &gateway.to_string())
                            .unwrap_or_else(|e| panic!("pod network for {key}: {e}"));
                        rp.netns = Some(netns);
                    }
                }
                let dir = cx.root.join(format!("pod-{n}"));
                std::fs::create_dir_all(&dir).expect("pod dir");
                rp.dir = Some(dir.clone());
                let children = rp.children.clone();
                let (ip, netns) = (rp.ip.clone(), rp.netns.clone());
                running.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), rp);
                let cx = cx.clone();
                tokio::spawn(async move {
                    if let Err(e) = start_pod(&cx, &pod, &ip, netns.as_deref(), &dir, &children).await {
                        eprintln!("node: pod {key} failed to start: {e}");
                        return;
                    }
                    let cond = |t: &str| serde_json::json!({"type": t, "status": "True"});
                    let status = serde_json::json!({"status": {
                        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1",
                        "conditions": [cond("PodScheduled"), cond("Initialized"), cond("ContainersReady"), cond("Ready")],
                    }});
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    if let Err(e) = api.patch_status(&name, &PatchParams::default(), &Patch::Merge(status)).await {
                        eprintln!("node: cannot report {name} ready: {e}");
                    }
                });
            }
        });
        // Cluster DNS: every Pod's /etc/hosts follows the Services (rewritten in place, so the
        // bind mount `ip netns exec` made of it sees the change).
        let dns = if matches!(network, Network::Namespaces { .. }) {
            let (client, pods) = (cx_client, pods.clone());
            Some(tokio::spawn(async move {
                let api: Api<k8s_openapi::api::core::v1::Service> = Api::all(client.clone());
                let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
                let mut stream = std::pin::pin!(stream);
                while let Some(ev) = stream.next().await {
                    if !matches!(ev, Ok(Event::Apply(_) | Event::Delete(_) | Event::InitDone)) {
                        continue;
                    }
                    let targets: Vec<(String, String, String, String)> = pods
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .filter_map(|(key, p)| {
                            let (ns, name) = key.split_once('/')?;
                            Some((p.netns.clone()?, ns.to_string(), name.to_string(), p.ip.clone()))
                        })
                        .collect();
                    for (netns, ns, name, ip) in targets {
                        let _ = write_hosts(&client, &netns, &ns, &name, &ip).await;
                    }
                }
            }))
        } else {
            None
        };
        Node { task, dns, pods, network }
    }

    /// The IP the node gave a running Pod.
    pub fn pod_ip(&self, namespace: &str, name: &str) -> Option<String> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner()).get(&format!("{namespace}/{name}")).map(|p| p.ip.clone())
    }

    /// The network namespace of a running Pod (`ip netns exec <it> ...`).
    pub fn pod_netns(&self, namespace: &str, name: &str) -> Option<String> {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&format!("{namespace}/{name}"))
            .and_then(|p| p.netns.clone())
    }
}

impl RunningPod {
    fn stop(self) {
        let mut children = std::mem::take(&mut *self.children.lock().unwrap_or_else(|p| p.into_inner()));
        stop_children(&mut children);
        if let Some(ns) = &self.netns {
            let _ = run_ip(&["netns", "del", ns]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(d) = &self.dns {
            d.abort();
        }
        for (_, p) in std::mem::take(&mut *self.pods.lock().unwrap_or_else(|p| p.into_inner())) {
            for c in p.children.lock().unwrap_or_else(|p| p.into_inner()).iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            if let Some(ns) = &p.netns {
                let _ = run_ip(&["netns", "del", ns]);
                let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
            }
        }
        if let Network::Namespaces { bridge, .. } = &self.network {
            let _ = run_ip(&["link", "del", bridge]);
            let _ = forward_guard(bridge, "-D");
        }
        let root = std::env::temp_dir().join(format!("trellis-node-{}", std::process::id()));
        if std::thread::panicking() {
            eprintln!("node: containers' logs kept in {}", root.display());
        } else {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

/// Adds (`-I`) or removes (`-D`) the root namespace's rules that drop anything forwarded from
/// or to the pod bridge, except between its own ports (Pod to Pod, which the kernel's bridge
/// netfilter hook may send through FORWARD).
fn forward_guard(bridge: &str, op: &str) -> Result<(), String> {
    let rules: [&[&str]; 3] =
        [&["-i", bridge, "-j", "DROP"], &["-o", bridge, "-j", "DROP"], &["-i", bridge, "-o", bridge, "-j", "ACCEPT"]];
    for rule in rules {
        let out =
            Command::new("iptables").args([op, "FORWARD"]).args(rule).output().map_err(|e| format!("iptables: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
    }
    Ok(())
}

fn run_ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn setup_netns(netns: &str, bridge: &str, veth: &str, ip: &str, gateway: &str) -> Result<(), String> {
    let _ = run_ip(&["netns", "del", netns]);
    run_ip(&["netns", "add", netns])?;
    run_ip(&["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])?;
    run_ip(&["link", "set", veth, "master", bridge, "up"])?;
    run_ip(&["-n", netns, "addr", "add", &format!("{ip}/16"), "dev", "eth0"])?;
    run_ip(&["-n", netns, "link", "set", "eth0", "up"])?;
    run_ip(&["-n", netns, "link", "set", "lo", "up"])?;
    run_ip(&["-n", netns, "route", "add", "default", "via", gateway])?;
    Ok(())
}

/// Starts a Pod as a kubelet would: its volumes (projected service-account tokens), its init
/// containers in order (each to completion; a native sidecar — `restartPolicy: Always` — until
/// its startup or readiness probe passes), then its containers; returns once every container's
/// readiness probe passes.
async fn start_pod(
    cx: &NodeCx,
    pod: &Pod,
    ip: &str,
    netns: Option<&str>,
    dir: &Path,
    children: &Mutex<Vec<Child>>,
) -> Result<(), String> {
    let spec = pod.spec.clone().unwrap_or_default();
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    // Volumes: projected service-account tokens, as the kubelet asks for them (TokenRequest,
    // bound to this Pod).
    let mut volumes: BTreeMap<String, PathBuf> = BTreeMap::new();
    for v in spec.volumes.iter().flatten() {
        let vdir = dir.join("volumes").join(&v.name);
        std::fs::create_dir_all(&vdir).map_err(|e| e.to_string())?;
        for source in v.projected.as_ref().and_then(|p| p.sources.as_ref()).into_iter().flatten() {
            let Some(t) = &source.service_account_token else { continue };
            let sa = spec.service_account_name.clone().unwrap_or_else(|| "default".into());
            let token = request_token(&cx.client, &ns, &sa, t.audience.as_deref(), pod).await?;
            let file = vdir.join(&t.path);
            std::fs::write(&file, token).map_err(|e| e.to_string())?;
            set_mode(&file, 0o644);
        }
        set_mode(&vdir, 0o755);
        volumes.insert(v.name.clone(), vdir);
    }
    set_mode(dir, 0o755);
    set_mode(&dir.join("volumes"), 0o755);
    if let Some(netns) = netns {
        write_hosts(&cx.client, netns, &ns, &name, ip).await?;
    }
    for c in spec.init_containers.iter().flatten() {
        let mut child = run_container(cx, pod, c, ip, netns, &volumes)?;
        if c.restart_policy.as_deref() == Some("Always") {
            children.lock().unwrap_or_else(|p| p.into_inner()).push(child);
            let probe = c.startup_probe.as_ref().or(c.readiness_probe.as_ref());
            wait_probe(c, probe, ip).await?;
        } else {
            let status = tokio::task::spawn_blocking(move || child.wait())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("init container {} exited with {status}", c.name));
            }
        }
    }
    for c in &spec.containers {
        let child = run_container(cx, pod, c, ip, netns, &volumes)?;
        children.lock().unwrap_or_else(|p| p.into_inner()).push(child);
    }
    for c in &spec.containers {
        wait_probe(c, c.readiness_probe.as_ref(), ip).await?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

async fn request_token(
    client: &kube::Client,
    ns: &str,
    sa: &str,
    audience: Option<&str>,
    pod: &Pod,
) -> Result<String, String> {
    let api: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), ns);
    let body = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {
            "audiences": audience.map(|a| vec![a.to_string()]).unwrap_or_default(),
            "expirationSeconds": 3600,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod.metadata.name, "uid": pod.metadata.uid},
        },
    });
    let answer: serde_json::Value = api
        .create_subresource("token", sa, &PostParams::default(), &body)
        .await
        .map_err(|e| format!("TokenRequest for {ns}/{sa}: {e}"))?;
    answer
        .pointer("/status/token")
        .and_then(|t| t.as_str())
        .map(str::to_string)
        .ok_or_else(|| "no token in answer".into())
}

/// `/etc/hosts` of a Pod: every Service's names (the short one in the Pod's namespace) → its
/// ClusterIP, as cluster DNS answers them.
async fn write_hosts(client: &kube::Client, netns: &str, pod_ns: &str, pod: &str, ip: &str) -> Result<(), String> {
    let api: Api<k8s_openapi::api::core::v1::Service> = Api::all(client.clone());
    let list = api.list(&Default::default()).await.map_err(|e| e.to_string())?;
    let mut hosts = format!("127.0.0.1 localhost\n{ip} {pod}\n");
    for s in list.items {
        let (Some(name), Some(ns)) = (s.metadata.name.clone(), s.metadata.namespace.clone()) else { continue };
        let Some(cip) = s.spec.as_ref().and_then(|s| s.cluster_ip.clone()).filter(|c| c != "None") else { continue };
        let short = if ns == pod_ns { name.clone() } else { String::new() };
        hosts.push_str(&format!("{cip} {short} {name}.{ns} {name}.{ns}.svc {name}.{ns}.svc.cluster.local\n"));
    }
    let dir = PathBuf::from(format!("/etc/netns/{netns}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("hosts"), hosts).map_err(|e| e.to_string())
}

/// Stops a Pod's processes in the reverse of their start: the app containers first, then the
/// native sidecars, as the kubelet stops a Pod (SIGTERM, then SIGKILL after 10 s).
fn stop_children(children: &mut [Child]) {
    for c in children.iter_mut().rev() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10)); // waiting for a child to exit
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Runs one container as a local process: its command and args (a program is looked up in the
/// node's program directories, then `PATH`), its env with the downward API's fieldRefs resolved,
/// `HOSTNAME` set to the Pod's name, as a kubelet does. In a Pod network namespace it runs there,
/// with its volume mounts bound in place and as its `runAsUser`.
fn run_container(
    cx: &NodeCx,
    pod: &Pod,
    c: &Container,
    ip: &str,
    netns: Option<&str>,
    volumes: &BTreeMap<String, PathBuf>,
) -> Result<Child, String> {
    let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    if argv.is_empty() {
        return Err(format!("container {} has no command: the test node runs commands, not images", c.name));
    }
    let program =
        cx.path_dirs.iter().map(|d| d.join(&argv[0])).find(|p| p.exists()).unwrap_or_else(|| PathBuf::from(&argv[0]));
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let mut cmd = match netns {
        None => {
            let mut cmd = Command::new(&program);
            cmd.args(&argv[1..]);
            cmd
        }
        Some(netns) => {
            let uid = c
                .security_context
                .as_ref()
                .and_then(|s| s.run_as_user)
                .or_else(|| spec.security_context.as_ref().and_then(|s| s.run_as_user))
                .unwrap_or(0);
            let gid = c.security_context.as_ref().and_then(|s| s.run_as_group).unwrap_or(uid);
            let mut script = String::from("set -e\n");
            for m in c.volume_mounts.iter().flatten() {
                if let Some(src) = volumes.get(&m.name) {
                    script.push_str(&format!(
                        "mkdir -p {dst}\nmount --bind {src} {dst}\n",
                        src = shell_quote(&src.to_string_lossy()),
                        dst = shell_quote(&m.mount_path)
                    ));
                }
            }
            let mut exec = vec![program.to_string_lossy().into_owned()];
            exec.extend(argv[1..].iter().cloned());
            let exec: Vec<String> = exec.iter().map(|a| shell_quote(a)).collect();
            if uid == 0 {
                script.push_str(&format!("exec {}\n", exec.join(" ")));
            } else {
                script.push_str(&format!(
                    "exec setpriv --reuid={uid} --regid={gid} --clear-groups -- {}\n",
                    exec.join(" ")
                ));
            }
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", netns, "sh", "-c", &script]);
            cmd
        }
    };
    let log = cx.root.join(format!("{}-{}.log", name, c.name));
    let logfile = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null()).stdout(logfile.try_clone().map_err(|e| e.to_string())?).stderr(logfile);
    cmd.env("HOSTNAME", &name);
    for e in c.env.clone().unwrap_or_default() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("status.podIP") => ip.to_string(),
                Some("metadata.name") => name.clone(),
                Some("metadata.namespace") => pod.metadata.namespace.clone().unwrap_or_default(),
                Some("spec.serviceAccountName") => spec.service_account_name.clone().unwrap_or_default(),
                _ => String::new(),
            },
            _ => String::new(),
        };
        cmd.env(&e.name, value);
    }
    cmd.spawn().map_err(|e| format!("cannot run container {} of {name}: {e}", c.name))
}

/// Waits for an HTTP probe of a container (if any) to answer 2xx or 3xx on the Pod's IP.
async fn wait_probe(c: &Container, probe: Option<&k8s_openapi::api::core::v1::Probe>, ip: &str) -> Result<(), String> {
    let Some(get) = probe.and_then(|p| p.http_get.as_ref()) else { return Ok(()) };
    let port = match &get.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => *n as u16,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port as u16)
            .unwrap_or(80),
    };
    let url = format!("http://{ip}:{port}{}", get.path.as_deref().unwrap_or("/"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(super::try_get(&url).await, Ok(s) if (200..400).contains(&s)) {
        if Instant::now() > deadline {
            return Err(format!("{url} ({}) never became ready", c.name));
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // probe period
    }
    Ok(())
}
