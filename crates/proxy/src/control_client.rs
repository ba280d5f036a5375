//! The proxy's side of the control-plane API: connect, say who we are, apply each snapshot
//! (whole, or a delta against the one it serves) atomically and answer ACK or NACK; when the control plane is unreachable, keep serving the
//! last good snapshot and reconnect with jittered exponential backoff. Startup order does not
//! matter: a proxy that starts first waits (not ready) until its first snapshot arrives.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use trellis_api::control::{
    control_client::ControlClient, control_message, proxy_message, Ack, Hello, Nack, ProxyMessage, SnapshotDelta,
};
use trellis_config::compile::ProxySpec;
use trellis_config::encode::Delta;
use trellis_config::snapshot::Snapshot;

use crate::Proxy;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// A stable id for a proxy: `role~name.namespace` (a restarted proxy takes its place back).
pub fn proxy_id(spec: &ProxySpec) -> String {
    // One entry per instance: a Pod's name when there are replicas.
    let name = spec.instance.as_deref().unwrap_or(&spec.name);
    format!("{}~{}.{}", format!("{:?}", spec.role).to_lowercase(), name, spec.namespace)
}

/// Runs until the proxy drains. `token` proves who the proxy is (read again at every connect:
/// a Pod's projected token rotates).
pub async fn run(proxy: Arc<Proxy>, addr: String, spec: ProxySpec, token: Option<crate::identity::Token>) {
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
            r = session(&proxy, &addr, &id, &spec_json, token.as_ref(), &mut backoff) => r,
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

async fn session(
    proxy: &Proxy,
    addr: &str,
    id: &str,
    spec_json: &[u8],
    token: Option<&crate::identity::Token>,
    backoff: &mut Duration,
) -> Result<(), String> {
    let token = match token {
        Some(t) => t.read()?,
        None => String::new(),
    };
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
    let hello = Hello {
        proxy_id: id.to_string(),
        spec_json: spec_json.to_vec(),
        current_version: current_version(proxy),
        token,
    };
    tx.send(ProxyMessage { kind: Some(proxy_message::Kind::Hello(hello)) }).await.map_err(|e| e.to_string())?;
    let mut inbound = match client.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) if matches!(s.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) => {
            // Not a network blip: say so at every attempt, loudly.
            tracing::error!(control_plane = %addr, proxy = %id, "the control plane refused this proxy: {}", s.message());
            return Err(s.message().to_string());
        }
        Err(s) => return Err(s.to_string()),
    };
    tracing::info!(control_plane = %addr, proxy = %id, "connected to control plane");
    set_state(proxy, "connected");
    *backoff = MIN_BACKOFF;
    // A push in chunks, joined so far.
    let mut partial: Option<control_message::Kind> = None;
    while let Some(msg) = inbound.message().await.map_err(|e| e.to_string())? {
        let Some(kind) = join(&mut partial, msg.kind) else { continue };
        let (version, reply) = match Some(kind) {
            Some(control_message::Kind::Snapshot(s)) => {
                let reply = match serde_json::from_slice::<Snapshot>(&s.snapshot_json) {
                    Err(e) => Err(Refusal::new(format!("cannot decode snapshot: {e}"))),
                    Ok(snap) if snap.version != s.version => Err(Refusal::new(format!(
                        "snapshot version {} does not match its envelope {}",
                        snap.version, s.version
                    ))),
                    Ok(snap) => proxy.apply(snap).await.map_err(Refusal::from),
                };
                (s.version, reply)
            }
            Some(control_message::Kind::Delta(d)) => {
                let reply = apply_delta(proxy, &d).await;
                if let Err(r) = &reply {
                    if r.resync {
                        tracing::info!(version = %d.version, "{}; asking for the whole snapshot", r.reason);
                    }
                }
                (d.version, reply)
            }
            None => continue,
        };
        let kind = match reply {
            Ok(()) => proxy_message::Kind::Ack(Ack { version }),
            Err(r) => {
                if !r.resync {
                    tracing::warn!(version = %version, "snapshot rejected (NACK): {}", r.reason);
                }
                proxy_message::Kind::Nack(Nack {
                    version,
                    reason: r.reason,
                    resync: r.resync,
                    resource: r.resource,
                    config_source: r.config_source,
                })
            }
        };
        if tx.send(ProxyMessage { kind: Some(kind) }).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Why a push was not applied: what the NACK says.
struct Refusal {
    reason: String,
    /// The proxy lacks the delta's base: the control plane should send the whole snapshot.
    resync: bool,
    resource: String,
    config_source: String,
}

impl Refusal {
    fn new(reason: String) -> Refusal {
        Refusal { reason, resync: false, resource: String::new(), config_source: String::new() }
    }

    fn resync(reason: String) -> Refusal {
        Refusal { resync: true, ..Refusal::new(reason) }
    }
}

impl From<crate::runtime::BuildError> for Refusal {
    fn from(e: crate::runtime::BuildError) -> Refusal {
        Refusal {
            reason: e.to_string(),
            resync: false,
            resource: e.resource.to_string(),
            config_source: e.resource.config_source().unwrap_or_default().to_string(),
        }
    }
}

/// Joins chunked pushes: `Some` when `next` completes one. A chunk of another version than the
/// one being joined starts over (the control plane abandoned the earlier push).
fn join(
    partial: &mut Option<control_message::Kind>,
    next: Option<control_message::Kind>,
) -> Option<control_message::Kind> {
    use control_message::Kind;
    let next = next?;
    let joined = match (partial.take(), next) {
        (Some(Kind::Snapshot(mut a)), Kind::Snapshot(b)) if a.version == b.version => {
            a.snapshot_json.extend_from_slice(&b.snapshot_json);
            a.more = b.more;
            Kind::Snapshot(a)
        }
        (Some(Kind::Delta(mut a)), Kind::Delta(b)) if a.version == b.version && a.base_version == b.base_version => {
            a.delta_json.extend_from_slice(&b.delta_json);
            a.more = b.more;
            Kind::Delta(a)
        }
        (_, next) => next,
    };
    let more = match &joined {
        Kind::Snapshot(s) => s.more,
        Kind::Delta(d) => d.more,
    };
    if more {
        *partial = Some(joined);
        None
    } else {
        Some(joined)
    }
}

/// Applies a delta to the snapshot the proxy serves. `Err((_, true))` when the proxy does not
/// hold the delta's base (the control plane then sends the whole snapshot).
async fn apply_delta(proxy: &Proxy, d: &SnapshotDelta) -> Result<(), Refusal> {
    let rt = proxy.shared().runtime();
    if !proxy.shared().is_ready() || rt.version() != d.base_version {
        return Err(Refusal::resync(format!(
            "delta is based on {}, the proxy serves {:?}",
            d.base_version,
            current_version(proxy)
        )));
    }
    let delta: Delta = serde_json::from_slice(&d.delta_json)
        .map_err(|e| Refusal::new(format!("cannot decode snapshot delta: {e}")))?;
    let snap = delta.apply(&rt.snapshot, d.version.clone()).map_err(Refusal::resync)?;
    drop(rt);
    proxy.apply(snap).await.map_err(Refusal::from)
}

fn current_version(proxy: &Proxy) -> String {
    if proxy.shared().is_ready() {
        proxy.shared().runtime().version().to_string()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_api::control::{control_message::Kind, Snapshot as Msg, SnapshotDelta};

    fn chunk(version: &str, bytes: &[u8], more: bool) -> Option<Kind> {
        Some(Kind::Snapshot(Msg { version: version.into(), snapshot_json: bytes.to_vec(), more }))
    }

    #[test]
    fn chunks_are_joined_and_an_abandoned_push_is_dropped() {
        let mut partial = None;
        assert!(join(&mut partial, chunk("v1", b"{\"a\":", true)).is_none());
        assert!(join(&mut partial, chunk("v1", b"1", true)).is_none());
        match join(&mut partial, chunk("v1", b"}", false)) {
            Some(Kind::Snapshot(s)) => {
                assert_eq!((s.version.as_str(), &s.snapshot_json[..], s.more), ("v1", &b"{\"a\":1}"[..], false))
            }
            other => panic!("{other:?}"),
        }
        // A push abandoned half-way (a newer version starts) is replaced, not mixed in.
        assert!(join(&mut partial, chunk("v2", b"half", true)).is_none());
        let delta = Kind::Delta(SnapshotDelta {
            version: "v3".into(),
            base_version: "v1".into(),
            delta_json: b"{}".to_vec(),
            more: false,
        });
        match join(&mut partial, Some(delta)) {
            Some(Kind::Delta(d)) => assert_eq!(d.delta_json, b"{}"),
            other => panic!("{other:?}"),
        }
        assert!(partial.is_none());
    }
}
