//! Control-plane scale: one process plays a fleet of proxies over the real control-plane API
//! (each stream says Hello as a sidecar, ACKs every snapshot), against a real `trellis control`
//! serving `services` ServiceEntries. Measured: the time from a config file change to each
//! proxy's receipt of the new snapshot (the last of which is the last ACK), and the control
//! plane's memory.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use trellis_api::control::{control_client::ControlClient, control_message, proxy_message, Ack, Hello, ProxyMessage};

use crate::peers::{free_port, peak_rss_kib, rss_kib, Pinning, Proc};

#[derive(Clone, Debug, serde::Serialize)]
pub struct CpScale {
    pub proxies: usize,
    pub services: usize,
    /// From the fleet's first Hello to every proxy holding its first snapshot.
    pub initial_sync_ms: f64,
    pub change_p50_ms: f64,
    pub change_p99_ms: f64,
    pub change_max_ms: f64,
    /// The largest whole snapshot (first push) and the largest delta (the change) one proxy got.
    pub snapshot_bytes: usize,
    pub delta_bytes: usize,
    pub cp_rss_kib: u64,
    pub cp_peak_rss_kib: u64,
}

fn config(services: usize, weight: u32) -> String {
    let mut y = String::new();
    for i in 0..services {
        y.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: svc-{i}}}\nspec:\n  hosts: [svc-{i}]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: STATIC\n  endpoints: [{{address: 127.0.0.1, ports: {{http: {}}}, labels: {{version: v1}}}}, {{address: 127.0.0.2, ports: {{http: {}}}, labels: {{version: v2}}}}]\n---\n",
            10_000 + i,
            10_000 + i
        ));
    }
    y.push_str("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: svc-0}\nspec:\n  host: svc-0\n  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]\n---\n");
    y.push_str(&format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: svc-0}}\nspec:\n  hosts: [svc-0]\n  http:\n  - route:\n    - {{destination: {{host: svc-0, subset: v1}}, weight: {}}}\n    - {{destination: {{host: svc-0, subset: v2}}, weight: {weight}}}\n",
        100 - weight
    ));
    y
}

type Seen = Arc<Mutex<HashMap<usize, (String, Instant)>>>;

pub async fn run(pin: &Pinning, bin: &Path, proxies: usize, services: usize) -> anyhow::Result<CpScale> {
    let tmp = tempfile::tempdir()?;
    let cfg = tmp.path().join("mesh.yaml");
    std::fs::write(&cfg, config(services, 10))?;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = match pin.proxy_core {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(bin);
            cmd
        }
        None => Command::new(bin),
    };
    let child = cmd
        .args(["control", "--listen", &addr, "-c", &cfg.display().to_string()])
        .arg("--ca-dir")
        .arg(tmp.path().join("ca"))
        .env("RUST_LOG", std::env::var("BENCH_CP_LOG").unwrap_or_else(|_| "error".into()))
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("BENCH_CP_LOG").is_some() { Stdio::inherit() } else { Stdio::null() })
        .spawn()?;
    let cp = Proc { name: "control-plane".into(), child };
    let pid = cp.child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "control plane did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A handful of HTTP/2 connections carry the whole fleet's streams.
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?);
    }
    let seen: Seen = Arc::default();
    let bytes = Arc::new(Mutex::new((0usize, 0usize)));
    let started = Instant::now();
    for i in 0..proxies {
        let channel = channels[i % channels.len()].clone();
        let (seen, bytes) = (seen.clone(), bytes.clone());
        tokio::spawn(async move {
            let spec = serde_json::json!({
                "role": "sidecar", "name": format!("sim-{i}"), "namespace": "default", "labels": {"app": format!("sim-{i}")},
                "bind_address": "127.0.0.1", "port_map": {}, "inbound": [], "outbound": "127.0.0.1:15001", "upstreams": [],
                "service_account": format!("sim-{i}"), "trust_domain": "cluster.local",
            });
            let (tx, rx) = mpsc::channel(4);
            let hello = Hello {
                proxy_id: format!("sidecar~sim-{i}.default"),
                spec_json: spec.to_string().into_bytes(),
                current_version: String::new(),
                // This control plane has no tokens file: it does not check identities.
                token: String::new(),
            };
            if tx.send(ProxyMessage { kind: Some(proxy_message::Kind::Hello(hello)) }).await.is_err() {
                return;
            }
            let mut client = ControlClient::new(channel).max_decoding_message_size(256 * 1024 * 1024);
            let Ok(resp) = client.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await else { return };
            let mut inbound = resp.into_inner();
            // Bytes of the push being received in chunks, as a proxy joins them.
            let mut joined = 0usize;
            while let Ok(Some(msg)) = inbound.message().await {
                let at = Instant::now();
                let (version, more, len, whole) = match msg.kind {
                    Some(control_message::Kind::Snapshot(s)) => (s.version, s.more, s.snapshot_json.len(), true),
                    Some(control_message::Kind::Delta(d)) => (d.version, d.more, d.delta_json.len(), false),
                    None => continue,
                };
                joined += len;
                if more {
                    continue;
                }
                let (full, delta) = if whole { (joined, 0) } else { (0, joined) };
                joined = 0;
                if let Ok(mut b) = bytes.lock() {
                    b.0 = b.0.max(full);
                    b.1 = b.1.max(delta);
                }
                if let Ok(mut m) = seen.lock() {
                    m.insert(i, (version.clone(), at));
                }
                let _ = tx.send(ProxyMessage { kind: Some(proxy_message::Kind::Ack(Ack { version })) }).await;
            }
        });
    }
    let all = |seen: &Seen, pred: &dyn Fn(usize, &str) -> bool| {
        seen.lock().map(|m| m.len() == proxies && m.iter().all(|(i, (v, _))| pred(*i, v))).unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while !all(&seen, &|_, _| true) {
        anyhow::ensure!(Instant::now() < deadline, "fleet did not sync");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let initial_sync_ms = started.elapsed().as_secs_f64() * 1000.0;
    // Each proxy's snapshot differs (its own listeners), so each has its own version to leave.
    let before: HashMap<usize, String> =
        seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.iter().map(|(i, (v, _))| (*i, v.clone())).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The change: shift svc-0's weights.
    let changed_at = Instant::now();
    std::fs::write(&cfg, config(services, 50))?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !all(&seen, &|i, v: &str| before.get(&i).is_some_and(|b| b != v)) {
        anyhow::ensure!(Instant::now() < deadline, "fleet did not receive the change");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut lat: Vec<f64> = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .values()
        .map(|(_, t)| t.duration_since(changed_at).as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).saturating_sub(1).min(lat.len() - 1)];
    let (snapshot_bytes, delta_bytes) = *bytes.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let result = CpScale {
        proxies,
        services,
        initial_sync_ms,
        change_p50_ms: q(0.50),
        change_p99_ms: q(0.99),
        change_max_ms: q(1.0),
        snapshot_bytes,
        delta_bytes,
        cp_rss_kib: rss_kib(&[pid]),
        cp_peak_rss_kib: peak_rss_kib(&[pid]),
    };
    drop(cp);
    Ok(result)
}
