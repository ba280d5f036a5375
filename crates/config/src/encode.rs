//! Snapshots as the control plane ships them: every resource (route-table virtual host, cluster)
//! encoded once with its hash. A snapshot's version is a hash of those hashes, so it is a content
//! hash without re-encoding anything; a push after a change carries only what changed since the
//! version the proxy holds ([`Delta`]), the way Istio's delta xDS does; and the outbound tables
//! all sidecars of a namespace share are encoded once per config generation
//! ([`crate::compile::Generation`]) and shared by reference.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::hash::fnv1a64;
use crate::model::security::JwtRule;
use crate::snapshot::{
    AuthzPolicy, Cluster, Listener, NodeInfo, RateLimitPolicy, RouteTable, Snapshot, TelemetryPolicy, VirtualHost,
};

pub type Result<T> = std::result::Result<T, serde_json::Error>;

/// One encoded resource.
#[derive(Debug)]
pub struct Entry {
    pub hash: u64,
    json: Box<RawValue>,
}

impl Entry {
    pub fn new<T: Serialize>(value: &T) -> Result<Entry> {
        let json = serde_json::to_string(value)?;
        Ok(Entry { hash: fnv1a64(json.as_bytes()), json: RawValue::from_string(json)? })
    }
}

/// A route table: its virtual hosts in order, each encoded on its own.
#[derive(Debug)]
pub struct Table {
    vhosts: Vec<(String, Arc<Entry>)>,
    /// [`table_digest`] of this table under its name.
    digest: u64,
}

/// A named route table's contribution to a snapshot's version.
fn table_digest(name: &str, vhosts: &[(String, Arc<Entry>)]) -> u64 {
    let mut buf = Vec::with_capacity(name.len() + 2 + vhosts.len() * 24);
    buf.push(b't');
    buf.extend_from_slice(name.as_bytes());
    buf.push(0);
    for (vh, e) in vhosts {
        buf.extend_from_slice(vh.as_bytes());
        buf.push(0);
        buf.extend_from_slice(&e.hash.to_le_bytes());
    }
    fnv1a64(&buf)
}

/// A named cluster's contribution to a snapshot's version.
fn cluster_digest(name: &str, e: &Entry) -> u64 {
    let mut buf = Vec::with_capacity(name.len() + 10);
    buf.push(b'c');
    buf.extend_from_slice(name.as_bytes());
    buf.push(0);
    buf.extend_from_slice(&e.hash.to_le_bytes());
    fnv1a64(&buf)
}

impl Table {
    fn names_unique(&self) -> bool {
        let mut names: Vec<&str> = self.vhosts.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        names.windows(2).all(|w| w[0] != w[1])
    }
}

/// Encoded route tables and clusters.
#[derive(Debug, Default)]
pub struct Parts {
    tables: BTreeMap<String, Arc<Table>>,
    clusters: BTreeMap<String, Arc<Entry>>,
    /// The wrapping sum of every table's and cluster's digest: a version that does not depend on
    /// how a snapshot's resources are split between its own parts and shared ones.
    digest: u64,
    /// The last [`Diff`] from another `Parts` (the previous generation's, which every proxy of
    /// the fleet holds), computed once for all of them.
    last_diff: Mutex<Option<(Weak<Parts>, Arc<Diff>)>>,
}

impl Parts {
    pub fn encode(tables: &BTreeMap<String, RouteTable>, clusters: &BTreeMap<String, Cluster>) -> Result<Parts> {
        let mut parts = Parts::default();
        for (name, t) in tables {
            let vhosts = t
                .virtual_hosts
                .iter()
                .map(|vh| Ok((vh.name.clone(), Arc::new(Entry::new(vh)?))))
                .collect::<Result<Vec<_>>>()?;
            let digest = table_digest(name, &vhosts);
            parts.digest = parts.digest.wrapping_add(digest);
            parts.tables.insert(name.clone(), Arc::new(Table { vhosts, digest }));
        }
        for (name, c) in clusters {
            let e = Entry::new(c)?;
            parts.digest = parts.digest.wrapping_add(cluster_digest(name, &e));
            parts.clusters.insert(name.clone(), Arc::new(e));
        }
        Ok(parts)
    }

    /// What changed from `base` to `self`, computed once per `base`.
    fn diff_from(self: &Arc<Parts>, base: &Arc<Parts>) -> Arc<Diff> {
        let mut last = self.last_diff.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((b, d)) = &*last {
            if Weak::ptr_eq(b, &Arc::downgrade(base)) {
                return d.clone();
            }
        }
        let mut diff = Diff::default();
        for (name, t) in &self.tables {
            if let Some(c) = table_change(t, base.tables.get(name)) {
                diff.tables.push((name.clone(), c));
            }
        }
        diff.removed_tables = base.tables.keys().filter(|n| !self.tables.contains_key(*n)).cloned().collect();
        diff.clusters = self
            .clusters
            .iter()
            .filter(|(n, e)| base.clusters.get(*n).is_none_or(|o| o.hash != e.hash))
            .map(|(n, _)| n.clone())
            .collect();
        diff.removed_clusters = base.clusters.keys().filter(|n| !self.clusters.contains_key(*n)).cloned().collect();
        let diff = Arc::new(diff);
        *last = Some((Arc::downgrade(base), diff.clone()));
        diff
    }
}

/// How a route table changed.
#[derive(Debug)]
enum TableChange {
    /// New, or its virtual hosts cannot be told apart by name: shipped whole.
    Whole,
    /// These virtual hosts (by index) changed; `reordered`: the order of names changed too.
    Vhosts { reordered: bool, changed: Vec<usize> },
}

/// `None` if `new` has the same content as `old`.
fn table_change(new: &Arc<Table>, old: Option<&Arc<Table>>) -> Option<TableChange> {
    let Some(old) = old else { return Some(TableChange::Whole) };
    if Arc::ptr_eq(old, new) || old.digest == new.digest {
        return None;
    }
    if !new.names_unique() {
        return Some(TableChange::Whole);
    }
    let same_order =
        old.vhosts.len() == new.vhosts.len() && old.vhosts.iter().zip(&new.vhosts).all(|((a, _), (b, _))| a == b);
    let old_by_name: HashMap<&str, u64> =
        if same_order { HashMap::new() } else { old.vhosts.iter().map(|(n, e)| (n.as_str(), e.hash)).collect() };
    let changed: Vec<usize> = new
        .vhosts
        .iter()
        .enumerate()
        .filter(|(i, (n, e))| {
            let before = if same_order { Some(old.vhosts[*i].1.hash) } else { old_by_name.get(n.as_str()).copied() };
            before != Some(e.hash)
        })
        .map(|(i, _)| i)
        .collect();
    Some(TableChange::Vhosts { reordered: !same_order, changed })
}

/// The changes between two [`Parts`], by name.
#[derive(Debug, Default)]
struct Diff {
    tables: Vec<(String, TableChange)>,
    removed_tables: Vec<String>,
    clusters: Vec<String>,
    removed_clusters: Vec<String>,
}

/// The small per-proxy fields, always shipped whole.
#[derive(Debug)]
struct Head {
    node: Box<RawValue>,
    listeners: Box<RawValue>,
    telemetry: Box<RawValue>,
    authorization: Box<RawValue>,
    jwt_rules: Box<RawValue>,
    rate_limits: Box<RawValue>,
}

fn raw<T: Serialize + ?Sized>(v: &T) -> Result<Box<RawValue>> {
    serde_json::value::to_raw_value(v)
}

/// A compiled snapshot, encoded: this proxy's own parts plus the parts it shares with others.
#[derive(Debug)]
pub struct Encoded {
    pub version: String,
    head: Head,
    own: Parts,
    shared: Arc<Parts>,
}

impl Encoded {
    /// Encodes `snap` (its `version` field is ignored) together with `shared` parts; where both
    /// name the same resource, `snap`'s wins.
    pub fn new(snap: &Snapshot, shared: Option<Arc<Parts>>) -> Result<Encoded> {
        let head = Head {
            node: raw(&snap.node)?,
            listeners: raw(&snap.listeners)?,
            telemetry: raw(&snap.telemetry)?,
            authorization: raw(&snap.authorization)?,
            jwt_rules: raw(&snap.jwt_rules)?,
            rate_limits: raw(&snap.rate_limits)?,
        };
        let mut e = Encoded {
            version: String::new(),
            head,
            own: Parts::encode(&snap.route_tables, &snap.clusters)?,
            shared: shared.unwrap_or_default(),
        };
        e.version = e.content_hash();
        Ok(e)
    }

    fn table(&self, name: &str) -> Option<&Arc<Table>> {
        self.own.tables.get(name).or_else(|| self.shared.tables.get(name))
    }

    fn cluster(&self, name: &str) -> Option<&Arc<Entry>> {
        self.own.clusters.get(name).or_else(|| self.shared.clusters.get(name))
    }

    /// Every route table, by name.
    fn tables(&self) -> BTreeMap<&str, &Arc<Table>> {
        let mut m: BTreeMap<&str, &Arc<Table>> = self.shared.tables.iter().map(|(k, v)| (k.as_str(), v)).collect();
        m.extend(self.own.tables.iter().map(|(k, v)| (k.as_str(), v)));
        m
    }

    fn clusters(&self) -> BTreeMap<&str, &Arc<Entry>> {
        let mut m: BTreeMap<&str, &Arc<Entry>> = self.shared.clusters.iter().map(|(k, v)| (k.as_str(), v)).collect();
        m.extend(self.own.clusters.iter().map(|(k, v)| (k.as_str(), v)));
        m
    }

    /// A hash of the head and of the sum of every resource's digest: content alone decides it,
    /// however the resources are split between own and shared parts, and computing it costs
    /// the own parts only.
    fn content_hash(&self) -> String {
        let mut sum = self.own.digest.wrapping_add(self.shared.digest);
        for name in self.own.tables.keys() {
            if let Some(s) = self.shared.tables.get(name) {
                sum = sum.wrapping_sub(s.digest);
            }
        }
        for name in self.own.clusters.keys() {
            if let Some(s) = self.shared.clusters.get(name) {
                sum = sum.wrapping_sub(cluster_digest(name, s));
            }
        }
        let mut buf = Vec::with_capacity(48);
        for r in [
            &self.head.node,
            &self.head.listeners,
            &self.head.telemetry,
            &self.head.authorization,
            &self.head.jwt_rules,
            &self.head.rate_limits,
        ] {
            buf.extend_from_slice(&fnv1a64(r.get().as_bytes()).to_le_bytes());
        }
        buf.extend_from_slice(&sum.to_le_bytes());
        format!("{:016x}", fnv1a64(&buf))
    }

    /// The whole snapshot: the JSON of [`Snapshot`].
    pub fn full(&self) -> Result<Vec<u8>> {
        #[derive(Serialize)]
        struct TableOut<'a> {
            virtual_hosts: Vec<&'a RawValue>,
        }
        #[derive(Serialize)]
        struct Out<'a> {
            version: &'a str,
            node: &'a RawValue,
            listeners: &'a RawValue,
            route_tables: BTreeMap<&'a str, TableOut<'a>>,
            clusters: BTreeMap<&'a str, &'a RawValue>,
            telemetry: &'a RawValue,
            authorization: &'a RawValue,
            jwt_rules: &'a RawValue,
            rate_limits: &'a RawValue,
        }
        serde_json::to_vec(&Out {
            version: &self.version,
            node: &self.head.node,
            listeners: &self.head.listeners,
            route_tables: self
                .tables()
                .into_iter()
                .map(|(k, t)| (k, TableOut { virtual_hosts: t.vhosts.iter().map(|(_, e)| &*e.json).collect() }))
                .collect(),
            clusters: self.clusters().into_iter().map(|(k, e)| (k, &*e.json)).collect(),
            telemetry: &self.head.telemetry,
            authorization: &self.head.authorization,
            jwt_rules: &self.head.jwt_rules,
            rate_limits: &self.head.rate_limits,
        })
    }

    /// What changed since `base`: the JSON of [`Delta`].
    pub fn delta<'a>(&'a self, base: &'a Encoded) -> Result<Vec<u8>> {
        #[derive(Serialize)]
        struct TableOut<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            order: Option<Vec<&'a str>>,
            changed: Vec<&'a RawValue>,
        }
        #[derive(Serialize)]
        struct Out<'a> {
            node: &'a RawValue,
            listeners: &'a RawValue,
            telemetry: &'a RawValue,
            authorization: &'a RawValue,
            jwt_rules: &'a RawValue,
            rate_limits: &'a RawValue,
            route_tables: BTreeMap<&'a str, TableOut<'a>>,
            removed_route_tables: Vec<&'a str>,
            clusters: BTreeMap<&'a str, &'a RawValue>,
            removed_clusters: Vec<&'a str>,
        }
        // Shared parts differ only between generations: their diff is computed once for the
        // fleet. Names in either side's own parts are compared one by one.
        let shared =
            if Arc::ptr_eq(&self.shared, &base.shared) { Arc::default() } else { self.shared.diff_from(&base.shared) };
        let own_tables: BTreeSet<&str> =
            self.own.tables.keys().chain(base.own.tables.keys()).map(String::as_str).collect();
        let own_clusters: BTreeSet<&str> =
            self.own.clusters.keys().chain(base.own.clusters.keys()).map(String::as_str).collect();

        let mut route_tables = BTreeMap::new();
        let mut removed_route_tables = Vec::new();
        let mut table_out = |name: &'a str, change: Option<&TableChange>, t: &'a Table| {
            let names = || t.vhosts.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>();
            match change {
                None => {}
                Some(TableChange::Whole) => {
                    let out =
                        TableOut { order: Some(names()), changed: t.vhosts.iter().map(|(_, e)| &*e.json).collect() };
                    route_tables.insert(name, out);
                }
                Some(TableChange::Vhosts { reordered, changed }) => {
                    if !*reordered && changed.is_empty() {
                        return;
                    }
                    let out = TableOut {
                        order: reordered.then(names),
                        changed: changed.iter().map(|i| &*t.vhosts[*i].1.json).collect(),
                    };
                    route_tables.insert(name, out);
                }
            }
        };
        for (name, change) in &shared.tables {
            if !own_tables.contains(name.as_str()) {
                if let Some((name, t)) = self.shared.tables.get_key_value(name) {
                    table_out(name, Some(change), t);
                }
            }
        }
        for name in &own_tables {
            match self.table(name) {
                Some(t) => table_out(name, table_change(t, base.table(name)).as_ref(), t),
                None if base.table(name).is_some() => removed_route_tables.push(*name),
                None => {}
            }
        }
        removed_route_tables.extend(
            shared
                .removed_tables
                .iter()
                .filter(|n| !own_tables.contains(n.as_str()) && self.table(n).is_none())
                .filter_map(|n| base.shared.tables.get_key_value(n).map(|(k, _)| k.as_str())),
        );
        removed_route_tables.sort_unstable();

        let mut clusters = BTreeMap::new();
        for name in shared.clusters.iter().filter(|n| !own_clusters.contains(n.as_str())) {
            if let Some((name, e)) = self.shared.clusters.get_key_value(name) {
                clusters.insert(name.as_str(), &*e.json);
            }
        }
        let mut removed_clusters: Vec<&str> = shared
            .removed_clusters
            .iter()
            .filter(|n| !own_clusters.contains(n.as_str()) && self.cluster(n).is_none())
            .filter_map(|n| base.shared.clusters.get_key_value(n).map(|(k, _)| k.as_str()))
            .collect();
        for name in &own_clusters {
            match (self.cluster(name), base.cluster(name)) {
                (Some(e), old) if old.is_none_or(|o| o.hash != e.hash) => {
                    clusters.insert(*name, &*e.json);
                }
                (None, Some(_)) => removed_clusters.push(*name),
                _ => {}
            }
        }
        removed_clusters.sort_unstable();
        serde_json::to_vec(&Out {
            node: &self.head.node,
            listeners: &self.head.listeners,
            telemetry: &self.head.telemetry,
            authorization: &self.head.authorization,
            jwt_rules: &self.head.jwt_rules,
            rate_limits: &self.head.rate_limits,
            route_tables,
            removed_route_tables,
            clusters,
            removed_clusters,
        })
    }
}

/// The changes from one snapshot version to the next, as a proxy receives them.
#[derive(Debug, Deserialize)]
pub struct Delta {
    pub node: NodeInfo,
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub telemetry: TelemetryPolicy,
    #[serde(default)]
    pub authorization: Vec<AuthzPolicy>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
    #[serde(default)]
    pub rate_limits: Vec<RateLimitPolicy>,
    /// Changed or new route tables.
    #[serde(default)]
    pub route_tables: BTreeMap<String, TableDelta>,
    #[serde(default)]
    pub removed_route_tables: Vec<String>,
    /// Changed or new clusters, whole.
    #[serde(default)]
    pub clusters: BTreeMap<String, Cluster>,
    #[serde(default)]
    pub removed_clusters: Vec<String>,
}

/// One route table's change.
#[derive(Debug, Deserialize)]
pub struct TableDelta {
    /// The virtual hosts' names in their new order, when it changed (or the table is new).
    #[serde(default)]
    pub order: Option<Vec<String>>,
    /// The virtual hosts whose content changed, in table order.
    pub changed: Vec<VirtualHost>,
}

impl Delta {
    /// `base` with this delta applied, versioned `version`. Fails (the proxy then asks for the
    /// whole snapshot) if the delta names a virtual host `base` does not have.
    pub fn apply(self, base: &Snapshot, version: String) -> std::result::Result<Snapshot, String> {
        let mut snap = Snapshot {
            version,
            node: self.node,
            listeners: self.listeners,
            route_tables: base.route_tables.clone(),
            clusters: base.clusters.clone(),
            telemetry: self.telemetry,
            authorization: self.authorization,
            jwt_rules: self.jwt_rules,
            rate_limits: self.rate_limits,
        };
        for name in &self.removed_route_tables {
            snap.route_tables.remove(name);
        }
        for (name, td) in self.route_tables {
            let old = base.route_tables.get(&name);
            let order: Vec<String> = match td.order {
                Some(o) => o,
                None => old
                    .ok_or_else(|| format!("delta changes route table {name} the proxy does not have"))?
                    .virtual_hosts
                    .iter()
                    .map(|v| v.name.clone())
                    .collect(),
            };
            let old_by_name: HashMap<&str, &VirtualHost> =
                old.map(|t| t.virtual_hosts.iter().map(|v| (v.name.as_str(), v)).collect()).unwrap_or_default();
            let mut changed = td.changed.into_iter().peekable();
            let mut vhosts = Vec::with_capacity(order.len());
            for n in &order {
                if changed.peek().is_some_and(|v| &v.name == n) {
                    vhosts.extend(changed.next());
                    continue;
                }
                let v = old_by_name.get(n.as_str()).ok_or_else(|| {
                    format!("delta keeps virtual host {n} of route table {name}, which the proxy does not have")
                })?;
                vhosts.push((*v).clone());
            }
            if changed.next().is_some() {
                return Err(format!("delta for route table {name} has virtual hosts out of order"));
            }
            snap.route_tables.insert(name, RouteTable { virtual_hosts: vhosts });
        }
        for name in &self.removed_clusters {
            snap.clusters.remove(name);
        }
        snap.clusters.extend(self.clusters);
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::Path;

    use super::*;
    use crate::compile::{compile, Generation, InboundSpec, ProxySpec, UpstreamSpec};

    fn mesh(weight: u32, extra_service: bool) -> Vec<crate::model::Resource> {
        let mut y = String::new();
        for i in 0..20 {
            y.push_str(&format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: svc-{i}}}\nspec:\n  hosts: [svc-{i}]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: STATIC\n  endpoints: [{{address: 127.0.0.1, ports: {{http: {}}}, labels: {{version: v1}}}}, {{address: 127.0.0.2, ports: {{http: {}}}, labels: {{version: v2}}}}]\n---\n",
                10_000 + i,
                10_000 + i
            ));
        }
        if extra_service {
            y.push_str("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: late}\nspec:\n  hosts: [late]\n  ports: [{number: 9090, name: http, protocol: HTTP}]\n  resolution: STATIC\n  endpoints: [{address: 127.0.0.3}]\n---\n");
        }
        y.push_str("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: svc-0}\nspec:\n  host: svc-0\n  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]\n---\n");
        y.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: svc-0}}\nspec:\n  hosts: [svc-0]\n  http:\n  - route:\n    - {{destination: {{host: svc-0, subset: v1}}, weight: {}}}\n    - {{destination: {{host: svc-0, subset: v2}}, weight: {weight}}}\n",
            100 - weight
        ));
        let loaded = crate::load::load_str(Path::new("mesh.yaml"), &y);
        assert!(loaded.findings.iter().all(|f| !f.is_error()), "{:?}", loaded.findings);
        loaded.resources
    }

    fn sidecar(name: &str) -> ProxySpec {
        let addr = |p: u16| -> SocketAddr { SocketAddr::from(([127, 0, 0, 1], p)) };
        ProxySpec {
            name: name.into(),
            labels: [("app".to_string(), name.to_string())].into(),
            inbound: vec![InboundSpec { listen: addr(15006), app: addr(8080), protocol: None }],
            outbound: Some(addr(15001)),
            upstreams: vec![UpstreamSpec { listen: addr(15002), host: "svc-1".into(), port: 80 }],
            ..ProxySpec::default()
        }
    }

    fn decode(json: &[u8]) -> Snapshot {
        serde_json::from_slice(json).expect("snapshot JSON")
    }

    #[test]
    fn shared_encoding_equals_compile_and_deltas_rebuild_the_next_snapshot() {
        let (a, b, c) = (mesh(10, false), mesh(50, false), mesh(50, true));
        let (ga, gb, gc) = (Generation::new(&a), Generation::new(&b), Generation::new(&c));
        for name in ["one", "two"] {
            let spec = sidecar(name);
            let ea = ga.compile(&a, &spec).expect("encode");
            let full = decode(&ea.full().expect("full"));
            let direct = compile(&a, &[], &spec);
            assert_eq!(full, direct, "shared encoding differs from compile()");
            assert_eq!(ea.version, direct.version);

            // A weight change: one virtual host of one table changes, nothing else.
            let eb = gb.compile(&b, &spec).expect("encode");
            assert_ne!(eb.version, ea.version);
            let dj = eb.delta(&ea).expect("delta");
            let raw: serde_json::Value = serde_json::from_slice(&dj).expect("json");
            let tables = raw["route_tables"].as_object().expect("tables");
            assert_eq!(tables.len(), 1, "{raw}");
            let (_, t) = tables.iter().next().expect("one table");
            assert!(t.get("order").is_none(), "{t}");
            assert_eq!(t["changed"].as_array().map(Vec::len), Some(1), "{t}");
            assert_eq!(raw["clusters"].as_object().map(|m| m.len()), Some(0), "{raw}");
            let delta: Delta = serde_json::from_slice(&dj).expect("delta");
            let applied = delta.apply(&full, eb.version.clone()).expect("apply");
            assert_eq!(applied, compile(&b, &[], &spec));

            // A new service on a new port: a new table and cluster; back again: both removed.
            let ec = gc.compile(&c, &spec).expect("encode");
            let delta: Delta = serde_json::from_slice(&ec.delta(&eb).expect("delta")).expect("delta");
            assert!(delta.route_tables.contains_key("outbound|9090"));
            let applied_c = delta.apply(&applied, ec.version.clone()).expect("apply");
            assert_eq!(applied_c, compile(&c, &[], &spec));
            let delta: Delta = serde_json::from_slice(&eb.delta(&ec).expect("delta")).expect("delta");
            assert!(delta.removed_route_tables.contains(&"outbound|9090".to_string()));
            assert!(!delta.removed_clusters.is_empty());
            assert_eq!(delta.apply(&applied_c, eb.version.clone()).expect("apply"), compile(&b, &[], &spec));
        }
    }

    #[test]
    fn a_delta_against_another_base_is_refused() {
        let a = mesh(10, false);
        let spec = sidecar("one");
        let g = Generation::new(&a);
        let e = g.compile(&a, &spec).expect("encode");
        let empty = Encoded::new(&Snapshot::default(), None).expect("encode");
        // A delta that only names changed virtual hosts, applied to a snapshot lacking the rest.
        let b = mesh(50, false);
        let eb = Generation::new(&b).compile(&b, &spec).expect("encode");
        let delta: Delta = serde_json::from_slice(&eb.delta(&e).expect("delta")).expect("delta");
        assert!(delta.apply(&Snapshot::default(), eb.version.clone()).is_err());
        // Against nothing, a delta is the whole snapshot.
        let delta: Delta = serde_json::from_slice(&e.delta(&empty).expect("delta")).expect("delta");
        assert_eq!(delta.apply(&Snapshot::default(), e.version.clone()).expect("apply"), compile(&a, &[], &spec));
    }
}
