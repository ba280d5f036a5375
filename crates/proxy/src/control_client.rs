//! The proxy's side of the control-plane API: connect, say who we are, apply each snapshot
//! atomically and answer ACK or NACK; when the control plane is unreachable, keep serving the
//! last good snapshot and reconnect with jittered exponential backoff. Startup order does not
//! matter: a proxy that starts first waits (not ready) until its first snapshot arrives.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use trellis_api::control::{
    control_client::ControlClient, control_message, proxy_message, Ack, Hello, Nack, ProxyMessage,
};
use trellis_config::compile::ProxySpec;
use trellis_config::snapshot::Snapshot;

use crate::Proxy;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// A stable id for a proxy: `role~name.namespace` (a restarted proxy takes its place back).
pub fn proxy_id(spec: &ProxySpec) -> String {
    format!("{}~{}.{}", format!("{:?}", spec.role).to_lowercase(), spec.name, spec.namespace)
}

/// Runs until the proxy drains.
pub async fn run(proxy: Arc<Proxy>, addr: String, spec: ProxySpec) {
    let id = proxy_id(&spec);
    let spec_json = match serde_json::to_vec(&spec) {
        Ok(j) => j,
        Err(e) => {
            tracing::error!("cannot encode proxy spec: {e}");
            return;
        }
    };
    let mut backoff = MIN_BACKOFF;
    let shared = proxy.shared().clone();
    loop {
        set_state(&proxy, "connecting");
        let result = tokio::select! {
            r = session(&proxy, &addr, &id, &spec_json, &mut backoff) => r,
            _ = shared.drain.started() => return,
        };
        set_state(&proxy, "disconnected");
        match result {
            Ok(()) => tracing::info!(control_plane = %addr, "control plane closed the stream; reconnecting"),
            Err(e) => tracing::debug!(control_plane = %addr, "control plane unreachable: {e}"),
        }
        // Full jitter around the current backoff: 50%..150%.
        let wait = backoff.mul_f64(0.5 + fastrand::f64());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.drain.started() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn set_state(proxy: &Proxy, state: &str) {
    proxy.shared().update_status(|s| s.control_plane = Some(state.to_string()));
}

async fn session(proxy: &Proxy, addr: &str, id: &str, spec_json: &[u8], backoff: &mut Duration) -> Result<(), String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let mut client = ControlClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel(8);
    let hello =
        Hello { proxy_id: id.to_string(), spec_json: spec_json.to_vec(), current_version: current_version(proxy) };
    tx.send(ProxyMessage { kind: Some(proxy_message::Kind::Hello(hello)) }).await.map_err(|e| e.to_string())?;
    let mut inbound =
        client.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map_err(|e| e.to_string())?.into_inner();
    tracing::info!(control_plane = %addr, proxy = %id, "connected to control plane");
    set_state(proxy, "connected");
    *backoff = MIN_BACKOFF;
    while let Some(msg) = inbound.message().await.map_err(|e| e.to_string())? {
        let Some(control_message::Kind::Snapshot(s)) = msg.kind else { continue };
        let reply = match serde_json::from_slice::<Snapshot>(&s.snapshot_json) {
            Err(e) => Err(format!("cannot decode snapshot: {e}")),
            Ok(snap) if snap.version != s.version => {
                Err(format!("snapshot version {} does not match its envelope {}", snap.version, s.version))
            }
            Ok(snap) => proxy.apply(snap).await,
        };
        let kind = match reply {
            Ok(()) => proxy_message::Kind::Ack(Ack { version: s.version }),
            Err(reason) => {
                tracing::warn!(version = %s.version, "snapshot rejected (NACK): {reason}");
                proxy_message::Kind::Nack(Nack { version: s.version, reason })
            }
        };
        if tx.send(ProxyMessage { kind: Some(kind) }).await.is_err() {
            break;
        }
    }
    Ok(())
}

fn current_version(proxy: &Proxy) -> String {
    if proxy.shared().is_ready() {
        proxy.shared().runtime().version().to_string()
    } else {
        String::new()
    }
}
