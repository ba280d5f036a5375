//! The metrics buffer: every connected proxy's `istio_*` metrics, read from its admin port at a
//! fixed interval and reduced to one sample per *edge* (who called whom, over which protocol,
//! with or without mTLS: the labels Kiali's graph and Istio's dashboards group by), kept for a
//! bounded time. The graph and the golden-signal charts are computed from these samples as
//! Prometheus would compute `rate()` and `histogram_quantile()` over the same series.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::StoreUsage;

/// The labels an edge is grouped by (Kiali's versioned-app graph, Istio's dashboards).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdgeKey {
    /// `source` or `destination`: which side's proxy reported it.
    pub reporter: Arc<str>,
    pub source_workload: Arc<str>,
    pub source_namespace: Arc<str>,
    pub source_app: Arc<str>,
    pub source_version: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_namespace: Arc<str>,
    pub destination_app: Arc<str>,
    pub destination_version: Arc<str>,
    /// The destination service's host (`reviews.default.svc.cluster.local`).
    pub destination_service: Arc<str>,
    /// `http`, `grpc` or `tcp`.
    pub protocol: Arc<str>,
    pub mtls: bool,
}

/// Counters of one edge as one proxy reported them at one time (cumulative, as scraped).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    pub requests: f64,
    /// 5xx responses, and gRPC responses with a status other than OK.
    pub errors: f64,
    /// The duration histogram's cumulative buckets (`le` in ms, count).
    pub buckets: Vec<(f64, f64)>,
    pub request_bytes_sum: f64,
    pub request_bytes_count: f64,
    pub response_bytes_sum: f64,
    pub response_bytes_count: f64,
    pub tcp_sent: f64,
    pub tcp_received: f64,
}

impl Counters {
    /// `self - earlier`, each counter treated as reset (starting from zero) where it went down.
    fn increase(&self, earlier: &Counters) -> Counters {
        let d = |now: f64, then: f64| if now >= then { now - then } else { now };
        let buckets = if self.buckets.len() == earlier.buckets.len() {
            self.buckets.iter().zip(&earlier.buckets).map(|(a, b)| (a.0, d(a.1, b.1))).collect()
        } else {
            self.buckets.clone()
        };
        Counters {
            requests: d(self.requests, earlier.requests),
            errors: d(self.errors, earlier.errors),
            buckets,
            request_bytes_sum: d(self.request_bytes_sum, earlier.request_bytes_sum),
            request_bytes_count: d(self.request_bytes_count, earlier.request_bytes_count),
            response_bytes_sum: d(self.response_bytes_sum, earlier.response_bytes_sum),
            response_bytes_count: d(self.response_bytes_count, earlier.response_bytes_count),
            tcp_sent: d(self.tcp_sent, earlier.tcp_sent),
            tcp_received: d(self.tcp_received, earlier.tcp_received),
        }
    }

    fn add(&mut self, o: &Counters) {
        self.requests += o.requests;
        self.errors += o.errors;
        if self.buckets.is_empty() {
            self.buckets = o.buckets.clone();
        } else if self.buckets.len() == o.buckets.len() {
            for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
                a.1 += b.1;
            }
        }
        self.request_bytes_sum += o.request_bytes_sum;
        self.request_bytes_count += o.request_bytes_count;
        self.response_bytes_sum += o.response_bytes_sum;
        self.response_bytes_count += o.response_bytes_count;
        self.tcp_sent += o.tcp_sent;
        self.tcp_received += o.tcp_received;
    }

    fn scaled(mut self, by: f64) -> Counters {
        self.requests *= by;
        self.errors *= by;
        for b in &mut self.buckets {
            b.1 *= by;
        }
        self.request_bytes_sum *= by;
        self.request_bytes_count *= by;
        self.response_bytes_sum *= by;
        self.response_bytes_count *= by;
        self.tcp_sent *= by;
        self.tcp_received *= by;
        self
    }

    /// The `q` quantile of the duration histogram, interpolated within its bucket as
    /// Prometheus's `histogram_quantile` does; `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut prev = (0.0, 0.0);
        for &(le, count) in &self.buckets {
            if count >= rank {
                if le.is_infinite() {
                    return Some(prev.0);
                }
                let in_bucket = count - prev.1;
                let frac = if in_bucket > 0.0 { (rank - prev.1) / in_bucket } else { 1.0 };
                return Some(prev.0 + (le - prev.0) * frac);
            }
            prev = (le, count);
        }
        Some(prev.0)
    }
}

/// One proxy's edge over time.
struct Ring {
    samples: VecDeque<(f64, Counters)>,
}

#[derive(Default)]
struct Inner {
    rings: HashMap<(Arc<str>, EdgeKey), Ring>,
    bytes: usize,
    evicted: u64,
    targets: usize,
    failing: usize,
    /// Strings shared by every key that holds them.
    interned: std::collections::HashSet<Arc<str>>,
}

pub struct MetricsStore {
    limit: usize,
    pub interval: Duration,
    retention: Duration,
    inner: Mutex<Inner>,
}

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn sample_bytes(c: &Counters) -> usize {
    std::mem::size_of::<(f64, Counters)>() + c.buckets.capacity() * std::mem::size_of::<(f64, f64)>()
}

impl MetricsStore {
    pub fn new(limit_bytes: usize, interval: Duration, retention: Duration) -> MetricsStore {
        MetricsStore { limit: limit_bytes, interval, retention, inner: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn usage(&self) -> StoreUsage {
        let g = self.lock();
        let items = g.rings.values().map(|r| r.samples.len() as u64).sum();
        StoreUsage { name: "metrics", items, bytes: g.bytes as u64, limit_bytes: self.limit as u64, evicted: g.evicted }
    }

    pub fn scrape_status(&self) -> (usize, usize) {
        let g = self.lock();
        (g.targets, g.failing)
    }

    /// Records one scrape round taken at `t`: each proxy's edges (proxy id, its parsed text).
    pub fn record(&self, t: f64, scraped: Vec<(Arc<str>, Result<String, String>)>) {
        let mut g = self.lock();
        let inner = &mut *g;
        inner.targets = scraped.len();
        inner.failing = scraped.iter().filter(|(_, r)| r.is_err()).count();
        for (proxy, text) in scraped {
            let Ok(text) = text else { continue };
            for (key, counters) in parse_edges(&text, &mut inner.interned) {
                let ring = inner.rings.entry((proxy.clone(), key)).or_insert_with(|| Ring { samples: VecDeque::new() });
                inner.bytes += sample_bytes(&counters);
                ring.samples.push_back((t, counters));
            }
        }
        // Older than the retention: gone. Over the bound: the oldest sample of every edge goes
        // until it fits (the buffer then covers a shorter time, never more memory).
        let oldest = t - self.retention.as_secs_f64();
        loop {
            let over = inner.bytes > self.limit;
            for ring in inner.rings.values_mut() {
                while let Some((st, c)) = ring.samples.front() {
                    let drop_one = *st < oldest || (over && ring.samples.len() > 1);
                    if !drop_one {
                        break;
                    }
                    inner.bytes -= sample_bytes(c);
                    inner.evicted += 1;
                    ring.samples.pop_front();
                    if over {
                        break;
                    }
                }
            }
            inner.rings.retain(|_, r| !r.samples.is_empty());
            if !over || inner.bytes <= self.limit || inner.rings.values().all(|r| r.samples.len() <= 1) {
                break;
            }
        }
        let keep: std::collections::HashSet<*const str> = inner
            .rings
            .keys()
            .flat_map(|(p, k)| {
                [
                    p,
                    &k.reporter,
                    &k.source_workload,
                    &k.source_namespace,
                    &k.source_app,
                    &k.source_version,
                    &k.destination_workload,
                    &k.destination_namespace,
                    &k.destination_app,
                    &k.destination_version,
                    &k.destination_service,
                    &k.protocol,
                ]
            })
            .map(Arc::as_ptr)
            .collect();
        inner.interned.retain(|s| keep.contains(&Arc::as_ptr(s)));
    }

    /// Per edge, the increase of its counters over `[t0, t1]` (summed over the proxies that
    /// reported it), scaled to a per-second rate.
    fn rates(&self, t0: f64, t1: f64, filter: impl Fn(&EdgeKey) -> bool) -> BTreeMap<EdgeKey, Counters> {
        let g = self.lock();
        let mut out: BTreeMap<EdgeKey, Counters> = BTreeMap::new();
        for ((_, key), ring) in &g.rings {
            if !filter(key) {
                continue;
            }
            if let Some(r) = ring_rate(ring, t0, t1) {
                out.entry(key.clone()).or_default().add(&r);
            }
        }
        out
    }

    /// The service graph over the last `window` seconds (see the module's API docs in
    /// `docs/console.md`).
    pub fn graph(&self, window: f64) -> Value {
        let t1 = now_secs();
        // As Kiali: what the destination's proxy saw, and what a caller's proxy saw of
        // destinations that have no proxy (external services, unknown hosts).
        let edges =
            self.rates(t1 - window, t1, |k| &*k.reporter == "destination" || &*k.destination_workload == "unknown");
        #[derive(Default)]
        struct Agg {
            c: Counters,
            mtls_requests: f64,
            mtls_bytes: f64,
            service: String,
            protocol: String,
        }
        let mut nodes: BTreeMap<String, Value> = BTreeMap::new();
        let mut agg: BTreeMap<(String, String, String), Agg> = BTreeMap::new();
        for (k, c) in &edges {
            let source = if &*k.source_workload == "unknown" {
                nodes.entry("unknown".into()).or_insert_with(|| node("unknown", "unknown", "unknown", "", "", ""));
                "unknown".to_string()
            } else {
                let id = format!("workload:{}/{}", k.source_namespace, k.source_workload);
                nodes.entry(id.clone()).or_insert_with(|| {
                    node(&id, "workload", &k.source_workload, &k.source_namespace, &k.source_app, &k.source_version)
                });
                id
            };
            let target = if &*k.destination_workload == "unknown" {
                let id = format!("service:{}", k.destination_service);
                nodes.entry(id.clone()).or_insert_with(|| node(&id, "service", &k.destination_service, "", "", ""));
                id
            } else {
                let id = format!("workload:{}/{}", k.destination_namespace, k.destination_workload);
                nodes.entry(id.clone()).or_insert_with(|| {
                    node(
                        &id,
                        "workload",
                        &k.destination_workload,
                        &k.destination_namespace,
                        &k.destination_app,
                        &k.destination_version,
                    )
                });
                id
            };
            let a = agg.entry((source, target, k.protocol.to_string())).or_default();
            a.c.add(c);
            if k.mtls {
                a.mtls_requests += c.requests;
                a.mtls_bytes += c.tcp_sent + c.tcp_received;
            }
            a.service = k.destination_service.to_string();
            a.protocol = k.protocol.to_string();
        }
        // A canary's split: each edge's share of what its source sends to the same service.
        let mut per_service: HashMap<(String, String), f64> = HashMap::new();
        for ((source, _, _), a) in &agg {
            *per_service.entry((source.clone(), a.service.clone())).or_default() += a.c.requests;
        }
        let mut rps_in: HashMap<String, (f64, f64)> = HashMap::new();
        let edges: Vec<Value> = agg
            .iter()
            .filter(|(_, a)| a.c.requests > 0.0 || a.c.tcp_sent + a.c.tcp_received > 0.0)
            .map(|((source, target, proto), a)| {
                let total = per_service.get(&(source.clone(), a.service.clone())).copied().unwrap_or(0.0);
                let e = rps_in.entry(target.clone()).or_default();
                e.0 += a.c.requests;
                e.1 += a.c.errors;
                let tcp = proto == "tcp";
                json!({
                    "id": format!("{source}->{target}|{proto}"),
                    "source": source,
                    "target": target,
                    "service": a.service,
                    "protocol": a.protocol,
                    "rps": round(a.c.requests, 3),
                    "error_rate": if a.c.requests > 0.0 { round(a.c.errors / a.c.requests, 4) } else { 0.0 },
                    "share": if total > 0.0 { round(a.c.requests / total, 4) } else { 1.0 },
                    "p50_ms": a.c.quantile(0.5).map(|v| round(v, 3)),
                    "p99_ms": a.c.quantile(0.99).map(|v| round(v, 3)),
                    "mtls": if tcp { a.mtls_bytes * 2.0 >= a.c.tcp_sent + a.c.tcp_received } else { a.mtls_requests * 2.0 >= a.c.requests },
                    "bytes_per_second": tcp.then(|| round(a.c.tcp_sent + a.c.tcp_received, 1)),
                })
            })
            .collect();
        let nodes: Vec<Value> = nodes
            .into_iter()
            .map(|(id, mut n)| {
                let (rps, errors) = rps_in.get(&id).copied().unwrap_or_default();
                n["rps_in"] = json!(round(rps, 3));
                n["error_rate_in"] = json!(if rps > 0.0 { round(errors / rps, 4) } else { 0.0 });
                n
            })
            .collect();
        json!({ "window_seconds": window, "nodes": nodes, "edges": edges })
    }

    /// The services and workloads there are metrics for.
    pub fn targets(&self) -> Value {
        let g = self.lock();
        // Services busiest first (requests, then bytes), so the first one shown has data.
        let mut services: HashMap<String, (f64, f64)> = HashMap::new();
        let mut workloads = std::collections::BTreeSet::new();
        for ((_, k), ring) in &g.rings {
            if &*k.reporter == "destination" {
                let last = ring.samples.back().map(|(_, c)| (c.requests, c.tcp_sent + c.tcp_received));
                let e = services.entry(k.destination_service.to_string()).or_default();
                let (r, b) = last.unwrap_or_default();
                e.0 += r;
                e.1 += b;
            }
            for (ns, w) in
                [(&k.source_namespace, &k.source_workload), (&k.destination_namespace, &k.destination_workload)]
            {
                if &**w != "unknown" {
                    workloads.insert((ns.to_string(), w.to_string()));
                }
            }
        }
        let mut services: Vec<(String, (f64, f64))> = services.into_iter().collect();
        services.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0).then(b.1 .1.total_cmp(&a.1 .1)).then(a.0.cmp(&b.0)));
        json!({
            "services": services.into_iter().map(|(s, _)| json!({"name": s})).collect::<Vec<_>>(),
            "workloads": workloads.into_iter().map(|(ns, w)| json!({"namespace": ns, "name": w})).collect::<Vec<_>>(),
        })
    }

    /// Golden signals of a service (inbound) or a workload (inbound or outbound) over the last
    /// `window` seconds, one point per step.
    pub fn golden(&self, kind: &str, name: &str, namespace: &str, direction: &str, window: f64) -> Value {
        let filter = |k: &EdgeKey| match (kind, direction) {
            ("service", _) => &*k.reporter == "destination" && &*k.destination_service == name,
            (_, "outbound") => {
                &*k.reporter == "source"
                    && &*k.source_workload == name
                    && (namespace.is_empty() || &*k.source_namespace == namespace)
            }
            _ => {
                &*k.reporter == "destination"
                    && &*k.destination_workload == name
                    && (namespace.is_empty() || &*k.destination_namespace == namespace)
            }
        };
        let interval = self.interval.as_secs_f64();
        let step = (window / 120.0).max(interval).ceil();
        let t1 = (now_secs() / step).floor() * step;
        let points = (window / step) as usize;
        let mut out: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        let mut timestamps = Vec::with_capacity(points);
        for i in (0..points).rev() {
            let (a, b) = (t1 - (i as f64 + 1.0) * step, t1 - i as f64 * step);
            timestamps.push(json!(b));
            let rates = self.rates(a, b, filter);
            let mut c = Counters::default();
            for r in rates.values() {
                c.add(r);
            }
            let any = !rates.is_empty();
            let v = |x: Option<f64>| x.filter(|_| any).map(|x| json!(round(x, 4))).unwrap_or(Value::Null);
            out.entry("rps").or_default().push(v(Some(c.requests)));
            out.entry("error_rate").or_default().push(v((c.requests > 0.0).then(|| c.errors / c.requests)));
            out.entry("p50_ms").or_default().push(v(c.quantile(0.5)));
            out.entry("p90_ms").or_default().push(v(c.quantile(0.9)));
            out.entry("p99_ms").or_default().push(v(c.quantile(0.99)));
            out.entry("request_bytes_avg")
                .or_default()
                .push(v((c.request_bytes_count > 0.0).then(|| c.request_bytes_sum / c.request_bytes_count)));
            out.entry("response_bytes_avg")
                .or_default()
                .push(v((c.response_bytes_count > 0.0).then(|| c.response_bytes_sum / c.response_bytes_count)));
            // TCP: bytes per second each way, as Istio's dashboards' TCP panels show them.
            out.entry("tcp_sent_bps").or_default().push(v(Some(c.tcp_sent)));
            out.entry("tcp_received_bps").or_default().push(v(Some(c.tcp_received)));
        }
        let mut v = json!({ "step_seconds": step, "timestamps": timestamps });
        for (k, series) in out {
            v[k] = Value::Array(series);
        }
        v
    }
}

fn node(id: &str, kind: &str, name: &str, namespace: &str, app: &str, version: &str) -> Value {
    let unknown = |s: &str| if s == "unknown" { String::new() } else { s.to_string() };
    json!({
        "id": id, "kind": kind, "name": name, "namespace": namespace,
        "app": unknown(app), "version": unknown(version),
    })
}

fn round(v: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (v * m).round() / m
}

/// The per-second increase of a ring's counters over `[t0, t1]`: from the last sample at or
/// before `t0` (else the first after it) to the last at or before `t1`.
fn ring_rate(ring: &Ring, t0: f64, t1: f64) -> Option<Counters> {
    // Samples are in time order: binary searches (a chart asks for 120 windows of each edge).
    let s = &ring.samples;
    let end = s.partition_point(|(t, _)| *t <= t1).checked_sub(1)?;
    let start = s.partition_point(|(t, _)| *t <= t0).saturating_sub(1);
    if start >= end {
        return None;
    }
    let (ta, a) = &s[start];
    let (tb, b) = &s[end];
    let dt = tb - ta;
    (dt > 0.0).then(|| b.increase(a).scaled(1.0 / dt))
}

/// A sample's name, labels and value.
pub type SampleLine<'a> = (&'a str, Vec<(&'a str, String)>, f64);

/// One sample line of the Prometheus text format: its name, labels and value.
pub fn parse_line(line: &str) -> Option<SampleLine<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut r = r;
        loop {
            r = r.trim_start_matches([',', ' ']);
            if let Some(after) = r.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = r.find('=')?;
            let key = r[..eq].trim();
            let mut chars = r[eq + 1..].char_indices();
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            let mut end = None;
            let mut escaped = false;
            for (i, c) in chars {
                match (escaped, c) {
                    (true, 'n') => {
                        value.push('\n');
                        escaped = false;
                    }
                    (true, c) => {
                        value.push(c);
                        escaped = false;
                    }
                    (false, '\\') => escaped = true,
                    (false, '"') => {
                        end = Some(eq + 1 + i + 1);
                        break;
                    }
                    (false, c) => value.push(c),
                }
            }
            labels.push((key, value));
            r = &r[end?..];
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

fn intern(set: &mut std::collections::HashSet<Arc<str>>, s: &str) -> Arc<str> {
    match set.get(s) {
        Some(a) => a.clone(),
        None => {
            let a: Arc<str> = s.into();
            set.insert(a.clone());
            a
        }
    }
}

/// Reduces one proxy's `/metrics` text to its edges' counters.
pub fn parse_edges(text: &str, interned: &mut std::collections::HashSet<Arc<str>>) -> Vec<(EdgeKey, Counters)> {
    let mut edges: BTreeMap<EdgeKey, Counters> = BTreeMap::new();
    for line in text.lines() {
        if !line.starts_with("istio_") {
            continue;
        }
        let Some((name, labels, value)) = parse_line(line) else { continue };
        let get = |k: &str| labels.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str()).unwrap_or("");
        let tcp = name.starts_with("istio_tcp_");
        let protocol = if tcp { "tcp" } else { get("request_protocol") };
        let mut i = |s: &str| intern(interned, if s.is_empty() { "unknown" } else { s });
        let key = EdgeKey {
            reporter: i(get("reporter")),
            source_workload: i(get("source_workload")),
            source_namespace: i(get("source_workload_namespace")),
            source_app: i(get("source_app")),
            source_version: i(get("source_version")),
            destination_workload: i(get("destination_workload")),
            destination_namespace: i(get("destination_workload_namespace")),
            destination_app: i(get("destination_app")),
            destination_version: i(get("destination_version")),
            destination_service: i(get("destination_service")),
            protocol: i(protocol),
            mtls: get("connection_security_policy") == "mutual_tls",
        };
        let c = edges.entry(key).or_default();
        match name {
            "istio_requests_total" => {
                c.requests += value;
                let code: u32 = get("response_code").parse().unwrap_or(0);
                let grpc = get("grpc_response_status");
                if code >= 500 || (!grpc.is_empty() && grpc != "0") {
                    c.errors += value;
                }
            }
            "istio_request_duration_milliseconds_bucket" => {
                let le = match get("le") {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().unwrap_or(f64::INFINITY),
                };
                match c.buckets.iter_mut().find(|(l, _)| *l == le) {
                    Some(b) => b.1 += value,
                    None => {
                        c.buckets.push((le, value));
                        c.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                    }
                }
            }
            "istio_request_bytes_sum" => c.request_bytes_sum += value,
            "istio_request_bytes_count" => c.request_bytes_count += value,
            "istio_response_bytes_sum" => c.response_bytes_sum += value,
            "istio_response_bytes_count" => c.response_bytes_count += value,
            "istio_tcp_sent_bytes_total" => c.tcp_sent += value,
            "istio_tcp_received_bytes_total" => c.tcp_received += value,
            _ => {}
        }
    }
    edges.into_iter().filter(|(_, c)| *c != Counters::default()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = r#"# TYPE istio_requests_total counter
istio_requests_total{reporter="destination",source_workload="istio-ingressgateway",source_workload_namespace="istio-system",source_app="istio-ingressgateway",source_version="unknown",destination_workload="color-v1",destination_workload_namespace="default",destination_app="color",destination_version="v1",destination_service="color.default.svc.cluster.local",request_protocol="http",response_code="200",grpc_response_status="",connection_security_policy="mutual_tls"} N1
istio_requests_total{reporter="destination",source_workload="istio-ingressgateway",source_workload_namespace="istio-system",source_app="istio-ingressgateway",source_version="unknown",destination_workload="color-v2",destination_workload_namespace="default",destination_app="color",destination_version="v2",destination_service="color.default.svc.cluster.local",request_protocol="http",response_code="503",grpc_response_status="",connection_security_policy="mutual_tls"} N2
istio_request_duration_milliseconds_bucket{reporter="destination",source_workload="istio-ingressgateway",source_workload_namespace="istio-system",source_app="istio-ingressgateway",source_version="unknown",destination_workload="color-v1",destination_workload_namespace="default",destination_app="color",destination_version="v1",destination_service="color.default.svc.cluster.local",request_protocol="http",response_code="200",grpc_response_status="",connection_security_policy="mutual_tls",le="1.0"} B1
istio_request_duration_milliseconds_bucket{reporter="destination",source_workload="istio-ingressgateway",source_workload_namespace="istio-system",source_app="istio-ingressgateway",source_version="unknown",destination_workload="color-v1",destination_workload_namespace="default",destination_app="color",destination_version="v1",destination_service="color.default.svc.cluster.local",request_protocol="http",response_code="200",grpc_response_status="",connection_security_policy="mutual_tls",le="10.0"} N1
istio_request_duration_milliseconds_bucket{reporter="destination",source_workload="istio-ingressgateway",source_workload_namespace="istio-system",source_app="istio-ingressgateway",source_version="unknown",destination_workload="color-v1",destination_workload_namespace="default",destination_app="color",destination_version="v1",destination_service="color.default.svc.cluster.local",request_protocol="http",response_code="200",grpc_response_status="",connection_security_policy="mutual_tls",le="+Inf"} N1
"#;

    fn text(n1: u32, n2: u32, b1: u32) -> String {
        A.replace("N1", &n1.to_string()).replace("N2", &n2.to_string()).replace("B1", &b1.to_string())
    }

    #[test]
    fn a_canary_split_its_errors_and_latency_come_out_of_two_scrapes() {
        let store = MetricsStore::new(usize::MAX, Duration::from_secs(1), Duration::from_secs(600));
        let t = now_secs();
        store.record(t - 10.0, vec![("gw".into(), Ok(text(100, 10, 50)))]);
        store.record(t - 1.0, vec![("gw".into(), Ok(text(1000, 110, 500)))]);
        let g = store.graph(60.0);
        let edges = g["edges"].as_array().expect("test value");
        assert_eq!(edges.len(), 2, "{g:#}");
        let v1 = edges.iter().find(|e| e["target"] == "workload:default/color-v1").expect("test value");
        let v2 = edges.iter().find(|e| e["target"] == "workload:default/color-v2").expect("test value");
        assert_eq!(v1["rps"], 100.0);
        assert_eq!(v2["rps"].as_f64().expect("test value"), round(100.0 / 9.0, 3));
        assert_eq!(v1["share"], 0.9);
        assert_eq!(v2["share"], 0.1);
        assert_eq!(v2["error_rate"], 1.0);
        assert_eq!(v1["mtls"], true);
        // 450 of 900 new requests under 1 ms, all under 10: the median is 1 ms, p99 ~9.8.
        assert_eq!(v1["p50_ms"], 1.0);
        assert_eq!(v1["p99_ms"], 9.82);
        assert_eq!(v1["source"], "workload:istio-system/istio-ingressgateway");
        let nodes = g["nodes"].as_array().expect("test value");
        assert!(nodes.iter().any(|n| n["name"] == "color-v2" && n["version"] == "v2" && n["app"] == "color"));

        // A restarted proxy's counters start again from zero: an increase, not a negative rate.
        store.record(t - 0.5, vec![("gw".into(), Ok(text(5, 0, 2)))]);
        let g = store.graph(60.0);
        assert!(g["edges"]
            .as_array()
            .expect("test value")
            .iter()
            .all(|e| e["rps"].as_f64().expect("test value") >= 0.0));
    }

    #[test]
    fn the_buffer_stays_within_its_bound() {
        let one = {
            let s = MetricsStore::new(usize::MAX, Duration::from_secs(1), Duration::from_secs(600));
            s.record(0.0, vec![("gw".into(), Ok(text(1, 1, 1)))]);
            s.usage().bytes
        };
        let store = MetricsStore::new(one as usize * 5, Duration::from_secs(1), Duration::from_secs(600));
        let t = now_secs();
        for i in 0..50 {
            store.record(t - 50.0 + f64::from(i), vec![("gw".into(), Ok(text(i * 10, i, i)))]);
            let u = store.usage();
            assert!(u.bytes <= u.limit_bytes, "{} > {}", u.bytes, u.limit_bytes);
        }
        assert!(store.usage().evicted > 0);
        assert_eq!(store.graph(60.0)["edges"].as_array().expect("test value").len(), 2);
    }

    #[test]
    fn label_values_with_escapes_parse() {
        let (name, labels, v) = parse_line(r#"x_total{a="q\"uo\\te",b="2"} 3.5"#).expect("test value");
        assert_eq!((name, v), ("x_total", 3.5));
        assert_eq!(labels, vec![("a", "q\"uo\\te".to_string()), ("b", "2".to_string())]);
        assert_eq!(parse_line("up 1").expect("test value").2, 1.0);
        assert!(parse_line("# HELP x").is_none());
    }
}
