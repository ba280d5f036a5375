//! What the control plane knows of each proxy: who it is, whether it is connected, which
//! version it was sent, acknowledged or rejected. Touched on connect, push, ACK and NACK only.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use trellis_config::compile::ProxySpec;

#[derive(Clone, Debug)]
pub struct ProxyEntry {
    pub spec: ProxySpec,
    pub connected: bool,
    pub since: Instant,
    pub sent: String,
    /// The config generation `sent` was compiled from.
    pub generation: u64,
    pub acked: String,
    pub nacked: String,
    pub nack_reason: String,
    /// Where the NACKed part came from in the config (file and line when known).
    pub nack_source: String,
}

#[derive(Default)]
pub struct Proxies {
    map: Mutex<BTreeMap<String, ProxyEntry>>,
}

impl Proxies {
    pub fn connected(&self, id: &str, spec: ProxySpec) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(id.to_string()).or_insert_with(|| ProxyEntry {
            spec: spec.clone(),
            connected: true,
            since: Instant::now(),
            sent: String::new(),
            generation: 0,
            acked: String::new(),
            nacked: String::new(),
            nack_reason: String::new(),
            nack_source: String::new(),
        });
        e.spec = spec;
        e.connected = true;
        e.since = Instant::now();
    }

    pub fn update(&self, id: &str, f: impl FnOnce(&mut ProxyEntry)) {
        if let Some(e) = self.map.lock().unwrap_or_else(|p| p.into_inner()).get_mut(id) {
            f(e);
        }
    }

    pub fn disconnected(&self, id: &str) {
        self.update(id, |e| {
            e.connected = false;
            e.since = Instant::now();
        });
    }

    pub fn list(&self) -> Vec<(String, ProxyEntry)> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The spec of a connected proxy serving `workload` in `namespace` (any role).
    pub fn find(&self, workload: &str, namespace: &str) -> Option<(String, ProxySpec)> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .filter(|(_, e)| e.spec.name == workload && (namespace.is_empty() || e.spec.namespace == namespace))
            .max_by_key(|(_, e)| e.connected)
            .map(|(k, e)| (k.clone(), e.spec.clone()))
    }
}
