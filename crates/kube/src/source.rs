//! The cluster as a config source: list+watch every kind Trellis reads and keep the control
//! plane's store in step.
//!
//! One kube-rs watcher per kind (Services, Pods, hand-made EndpointSlices, and each Istio or
//! Gateway API kind the cluster serves, looked for again every 30 s; list, then watch from the list's resourceVersion, with
//! bookmarks; a `410 Gone` relists; errors back off exponentially). Each watcher keeps its kind's
//! objects, converted ([`crate::convert`]); a change marks the set dirty and one publisher task
//! hands the whole set to the store, debounced, so a burst of Pod updates is one generation.
//! Nothing is published before every watcher has finished its first list, so proxies never see a
//! partial cluster (VirtualServices without their Pods).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DynamicObject};
use kube::discovery::{ApiResource, Discovery};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use tokio::sync::Notify;
use trellis_config::Resource;
use trellis_control::ConfigStore;

use crate::convert::{self, Converted};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the Kubernetes client configuration: {0}")]
    Config(String),
    #[error("cannot create a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("cannot discover the cluster's API groups: {0}")]
    Discovery(#[source] kube::Error),
    #[error("cannot list the cluster's resources: {0}")]
    List(#[source] kube::Error),
}

/// The Istio and Gateway API kinds Trellis reads, by API group.
pub const ISTIO_KINDS: &[(&str, &[&str])] = &[
    (
        "networking.istio.io",
        &["Gateway", "VirtualService", "DestinationRule", "ServiceEntry", "WorkloadEntry", "Sidecar"],
    ),
    ("security.istio.io", &["PeerAuthentication", "AuthorizationPolicy", "RequestAuthentication"]),
    ("telemetry.istio.io", &["Telemetry"]),
    ("gateway.networking.k8s.io", &["Gateway", "HTTPRoute", "GRPCRoute"]),
];

/// Coalesces a burst of changes (a rollout's Pods) into one generation.
const DEBOUNCE: Duration = Duration::from_millis(30);

/// Watches the cluster and keeps `store` in step with it until the task is dropped.
pub async fn run(client: Client, store: Arc<ConfigStore>) -> Result<(), Error> {
    let objects = Arc::new(Objects::default());

    // The Istio kinds the cluster serves, each at its preferred version (the API server converts
    // objects stored at other versions).
    let dynamic = discover(&client).await?;
    for (group, names) in ISTIO_KINDS {
        for kind in *names {
            if !dynamic.iter().any(|ar| ar.group == *group && ar.kind == *kind) {
                tracing::warn!(
                    group,
                    kind,
                    "the cluster does not serve this kind (CRD not installed yet); looked for again every 30 s"
                );
            }
        }
    }
    // Every watcher of the first set counts down once its first list is in; set before any starts.
    objects.pending.store(3 + dynamic.len(), Ordering::SeqCst);
    let mut watched: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    let services: Api<Service> = Api::all(client.clone());
    let _services = spawn_watch(services, objects.clone(), "Service", convert::service);
    let pods: Api<Pod> = Api::all(client.clone());
    let _pods = spawn_watch(pods, objects.clone(), "Pod", convert::pod);
    // EndpointSlices that Kubernetes' own controller did not make: those of Services without a
    // selector (the others say what the Pods say, which are watched already).
    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let _slices =
        spawn_watch_with(slices, objects.clone(), "EndpointSlice", convert::endpoint_slice, Some(MANUAL_SLICES));
    let mut tasks = Vec::new();
    for ar in dynamic {
        let key = format!("{}/{}", ar.group, ar.kind);
        watched.insert(key.clone());
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        tasks.push(spawn_dynamic(api, ar, objects.clone(), key, true));
    }
    tracing::info!(kinds = 3 + watched.len(), "watching the cluster");

    let mut rediscover = tokio::time::interval(REDISCOVER);
    rediscover.tick().await;
    // A kind that cannot be listed (RBAC, a broken CRD) must not keep the whole mesh waiting:
    // after this long, what has been listed is served, and the rest follows as it comes.
    let grace = tokio::time::Instant::now() + INITIAL_LIST_GRACE;
    let mut waited = false;
    loop {
        tokio::select! {
            _ = objects.changed.notified() => {
                tokio::time::sleep(DEBOUNCE).await;
                if objects.pending.load(Ordering::SeqCst) > 0 && !waited {
                    continue; // Some kind has not finished its first list yet.
                }
                let resources = objects.all();
                let store = store.clone();
                // Analysis and compilation are CPU work: off the runtime's async threads.
                let _ = tokio::task::spawn_blocking(move || store.set_cluster_resources(resources)).await;
            }
            _ = tokio::time::sleep_until(grace), if !waited => {
                waited = true;
                let left = objects.pending.load(Ordering::SeqCst);
                if left > 0 {
                    tracing::error!(kinds = left, "some kinds are still not listed (see the watch errors above); serving what is");
                    objects.changed.notify_one();
                }
            }
            // A CRD installed after the start (the Gateway API, Istio's CRDs) is watched from
            // the next look on.
            _ = rediscover.tick() => match discover(&client).await {
                Ok(found) => {
                    for ar in found {
                        let key = format!("{}/{}", ar.group, ar.kind);
                        if watched.insert(key.clone()) {
                            tracing::info!(kind = %key, "the cluster serves a new kind; watching it");
                            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
                            tasks.push(spawn_dynamic(api, ar, objects.clone(), key, false));
                        }
                    }
                }
                Err(e) => tracing::debug!("discovery failed, trying again later: {e}"),
            },
        }
    }
}

/// How long the first publication waits for every kind's first list.
const INITIAL_LIST_GRACE: Duration = Duration::from_secs(15);

/// How often the cluster is asked which of the kinds Trellis reads it serves.
const REDISCOVER: Duration = Duration::from_secs(30);

/// The Istio and Gateway API kinds the cluster serves, at their preferred versions.
async fn discover(client: &Client) -> Result<Vec<ApiResource>, Error> {
    let groups: Vec<&str> = ISTIO_KINDS.iter().map(|(g, _)| *g).collect();
    let discovery = Discovery::new(client.clone()).filter(&groups).run().await.map_err(Error::Discovery)?;
    let mut out = Vec::new();
    for (group, names) in ISTIO_KINDS {
        for kind in *names {
            if let Some((ar, _)) = discovery.get(group).and_then(|g| g.recommended_kind(kind)) {
                out.push(ar);
            }
        }
    }
    Ok(out)
}

/// Lists the cluster once (what `trellis analyze --cluster` reads): every resource Trellis
/// reads, converted, and what the conversion found wrong.
pub async fn list_once(client: Client) -> Result<(Vec<Resource>, Vec<trellis_config::Finding>), Error> {
    let mut resources = Vec::new();
    let mut findings = Vec::new();
    let mut take = |c: Converted| {
        findings.extend(c.findings);
        resources.extend(c.resource);
    };
    let lp = kube::api::ListParams::default();
    let services: Api<Service> = Api::all(client.clone());
    for s in services.list(&lp).await.map_err(Error::List)?.items {
        take(convert::service(&s));
    }
    let pods: Api<Pod> = Api::all(client.clone());
    for p in pods.list(&lp).await.map_err(Error::List)?.items {
        take(convert::pod(&p));
    }
    let slices: Api<EndpointSlice> = Api::all(client.clone());
    for s in slices.list(&kube::api::ListParams::default().labels(MANUAL_SLICES)).await.map_err(Error::List)?.items {
        take(convert::endpoint_slice(&s));
    }
    for ar in discover(&client).await? {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        for o in api.list(&lp).await.map_err(Error::List)?.items {
            let mut value = serde_json::to_value(&o).unwrap_or_default();
            value["apiVersion"] = serde_json::Value::String(ar.api_version.clone());
            value["kind"] = serde_json::Value::String(ar.kind.clone());
            take(convert::object(&value));
        }
    }
    Ok((resources, findings))
}

/// Every watched object, by kind, converted.
#[derive(Default)]
struct Objects {
    by_kind: Mutex<BTreeMap<String, BTreeMap<String, Resource>>>,
    /// Kinds whose first list has not completed.
    pending: AtomicUsize,
    changed: Notify,
}

impl Objects {
    fn all(&self) -> Vec<Resource> {
        let by_kind = self.by_kind.lock().unwrap_or_else(|p| p.into_inner());
        by_kind.values().flat_map(|m| m.values().cloned()).collect()
    }

    fn replace(&self, kind: &str, objects: BTreeMap<String, Resource>) {
        self.by_kind.lock().unwrap_or_else(|p| p.into_inner()).insert(kind.to_string(), objects);
        self.changed.notify_one();
    }

    fn set(&self, kind: &str, key: String, resource: Option<Resource>) {
        let mut by_kind = self.by_kind.lock().unwrap_or_else(|p| p.into_inner());
        let m = by_kind.entry(kind.to_string()).or_default();
        let changed = match resource {
            Some(r) => {
                m.insert(key, r);
                true
            }
            None => m.remove(&key).is_some(),
        };
        drop(by_kind);
        if changed {
            self.changed.notify_one();
        }
    }
}

fn key_of(ns: Option<&str>, name: &str) -> String {
    format!("{}/{name}", ns.unwrap_or(""))
}

fn log_findings(kind: &str, key: &str, c: &Converted) {
    for f in &c.findings {
        tracing::warn!(kind, object = key, "{f}");
    }
}

/// EndpointSlices not managed by the EndpointSlice controller.
const MANUAL_SLICES: &str = "endpointslice.kubernetes.io/managed-by!=endpointslice-controller.k8s.io";

fn spawn_watch<K>(
    api: Api<K>,
    objects: Arc<Objects>,
    kind: &'static str,
    conv: fn(&K) -> Converted,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    spawn_watch_with(api, objects, kind, conv, None)
}

fn spawn_watch_with<K>(
    api: Api<K>,
    objects: Arc<Objects>,
    kind: &'static str,
    conv: fn(&K) -> Converted,
    labels: Option<&'static str>,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let mut config = watcher::Config::default();
        if let Some(l) = labels {
            config = config.labels(l);
        }
        let stream = watcher::watcher(api, config).default_backoff();
        consume(stream, objects, kind.to_string(), true, move |o: &K| {
            let key = key_of(o.meta().namespace.as_deref(), o.meta().name.as_deref().unwrap_or_default());
            (key, conv(o))
        })
        .await
    })
}

fn spawn_dynamic(
    api: Api<DynamicObject>,
    ar: ApiResource,
    objects: Arc<Objects>,
    kind: String,
    counts: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
        consume(stream, objects, kind, counts, move |o: &DynamicObject| {
            let key = key_of(o.metadata.namespace.as_deref(), o.metadata.name.as_deref().unwrap_or_default());
            let mut value = serde_json::to_value(o).unwrap_or_default();
            // Watch events of a dynamic kind may omit apiVersion/kind; the resource says them.
            value["apiVersion"] = serde_json::Value::String(ar.api_version.clone());
            value["kind"] = serde_json::Value::String(ar.kind.clone());
            (key, convert::object(&value))
        })
        .await
    })
}

/// Applies a watcher's events to `objects`; `counts`: this kind's first list is part of the
/// initial set the publisher waits for.
async fn consume<K, S>(
    stream: S,
    objects: Arc<Objects>,
    kind: String,
    counts: bool,
    conv: impl Fn(&K) -> (String, Converted),
) where
    S: futures_util::Stream<Item = Result<Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    // Objects of a list (or relist) in progress: they replace the kind's set when it completes,
    // so an object deleted while the watch was broken disappears.
    let mut listing: Option<BTreeMap<String, Resource>> = None;
    let mut listed_once = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => listing = Some(BTreeMap::new()),
            Ok(Event::InitApply(o)) => {
                let (key, c) = conv(&o);
                log_findings(&kind, &key, &c);
                if let (Some(l), Some(r)) = (listing.as_mut(), c.resource) {
                    l.insert(key, r);
                }
            }
            Ok(Event::InitDone) => {
                let set = listing.take().unwrap_or_default();
                tracing::debug!(kind, objects = set.len(), "listed");
                objects.replace(&kind, set);
                if !listed_once {
                    listed_once = true;
                    if counts {
                        objects.pending.fetch_sub(1, Ordering::SeqCst);
                    }
                    objects.changed.notify_one();
                }
            }
            Ok(Event::Apply(o)) => {
                let (key, c) = conv(&o);
                log_findings(&kind, &key, &c);
                objects.set(&kind, key, c.resource);
            }
            Ok(Event::Delete(o)) => {
                let (key, _) = conv(&o);
                objects.set(&kind, key, None);
            }
            // The watcher retries with backoff; the last known objects keep serving meanwhile.
            Err(e) => tracing::warn!(kind, "watch failed, retrying: {e}"),
        }
    }
}
