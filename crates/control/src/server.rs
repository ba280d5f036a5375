//! The gRPC service: one stream per proxy (Hello → Snapshots ⇄ ACK/NACK), plus the status and
//! proxy-config queries the CLI uses.

use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use trellis_api::control::{
    control_message, control_server, proxy_message, CertificateReply, CertificateRequest, ControlMessage, Hello,
    ProxyConfigReply, ProxyConfigRequest, ProxyMessage, ProxyStatus, Snapshot, SnapshotDelta, StatusReply,
    StatusRequest,
};
use trellis_config::compile::ProxySpec;
use trellis_config::encode::Encoded;

use crate::ca::CertificateService;
use crate::proxies::Proxies;
use crate::store::{ConfigState, ConfigStore};

/// Snapshots can be large for big meshes.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

#[derive(Clone)]
pub struct ControlService {
    store: Arc<ConfigStore>,
    proxies: Arc<Proxies>,
    certificates: Option<Arc<CertificateService>>,
}

impl ControlService {
    pub fn new(store: Arc<ConfigStore>, certificates: Option<Arc<CertificateService>>) -> ControlService {
        ControlService { store, proxies: Arc::new(Proxies::default()), certificates }
    }

    /// What this service knows of its proxies (the console reads it).
    pub fn proxies(&self) -> Arc<Proxies> {
        self.proxies.clone()
    }

    /// A proxy stream is admitted only with a token that proves the namespace and service
    /// account the proxy claims (when this control plane can check tokens at all: with a tokens
    /// file, or on Kubernetes). Without, a stranger could register as any workload, overwrite
    /// another proxy's status and read every workload's routes.
    async fn authenticate(&self, hello: &Hello, spec: &ProxySpec) -> Result<(), Status> {
        let Some(auth) = self.certificates.as_ref().and_then(|c| c.authenticator.as_ref()) else {
            return Ok(());
        };
        let claimed = format!("{}/{}", spec.namespace, spec.service_account);
        if hello.token.is_empty() {
            tracing::warn!(proxy = %hello.proxy_id, claims = %claimed, "refused a proxy stream without a token");
            return Err(Status::unauthenticated(format!(
                "this control plane admits only proxies that prove their identity; {} sent no token (bootstrap token, or the Pod's service-account token)",
                hello.proxy_id
            )));
        }
        let id = auth.authenticate(&hello.token).await.map_err(|e| {
            tracing::warn!(proxy = %hello.proxy_id, claims = %claimed, "refused a proxy stream: {e}");
            Status::unauthenticated(format!("the token of {} proves nothing: {e}", hello.proxy_id))
        })?;
        if id.namespace != spec.namespace || id.service_account != spec.service_account {
            tracing::warn!(proxy = %hello.proxy_id, claims = %claimed, proves = %format!("{}/{}", id.namespace, id.service_account), "refused a proxy stream");
            return Err(Status::permission_denied(format!(
                "the token proves {}/{}, but {} claims {claimed}",
                id.namespace, id.service_account, hello.proxy_id
            )));
        }
        Ok(())
    }

    pub fn into_server(self) -> control_server::ControlServer<ControlService> {
        control_server::ControlServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

type ControlStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl control_server::Control for ControlService {
    type StreamStream = ControlStream;

    async fn stream(&self, req: Request<Streaming<ProxyMessage>>) -> Result<Response<ControlStream>, Status> {
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await? {
            Some(ProxyMessage { kind: Some(proxy_message::Kind::Hello(h)) }) => h,
            _ => return Err(Status::invalid_argument("the first message of a stream must be Hello")),
        };
        let spec: ProxySpec = serde_json::from_slice(&hello.spec_json)
            .map_err(|e| Status::invalid_argument(format!("bad proxy spec: {e}")))?;
        self.authenticate(&hello, &spec).await?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(session(self.store.clone(), self.proxies.clone(), hello, spec, inbound, tx));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let proxies = self
            .proxies
            .list()
            .into_iter()
            .map(|(id, e)| ProxyStatus {
                proxy_id: id,
                role: format!("{:?}", e.spec.role).to_lowercase(),
                workload: e.spec.name,
                namespace: e.spec.namespace,
                state: if e.connected { "CONNECTED".into() } else { "DISCONNECTED".into() },
                sent_version: e.sent,
                acked_version: e.acked,
                nacked_version: e.nacked,
                nack_reason: e.nack_reason,
                nack_source: e.nack_source,
                state_age_seconds: e.since.elapsed().as_secs(),
                admin_address: e.spec.admin.map(|a| a.to_string()).unwrap_or_default(),
                config_generation: e.generation,
            })
            .collect();
        let rejection = self.store.rejection();
        Ok(Response::new(StatusReply {
            proxies,
            config_generation: self.store.current().generation,
            config_error: rejection.as_ref().map(|r| r.reason.clone()).unwrap_or_default(),
            config_findings: rejection.map(|r| r.findings.iter().map(|f| f.to_string()).collect()).unwrap_or_default(),
        }))
    }

    async fn create_certificate(&self, req: Request<CertificateRequest>) -> Result<Response<CertificateReply>, Status> {
        let svc = self
            .certificates
            .as_ref()
            .ok_or_else(|| Status::unimplemented("this control plane runs no certificate authority"))?;
        let req = req.into_inner();
        let (chain, bundle) = svc.sign(&req.token, &req.csr_pem).await?;
        Ok(Response::new(CertificateReply { cert_chain_pem: chain, trust_bundle_pem: bundle }))
    }

    async fn proxy_config(&self, req: Request<ProxyConfigRequest>) -> Result<Response<ProxyConfigReply>, Status> {
        let req = req.into_inner();
        let (id, spec) = self
            .proxies
            .find(&req.workload, &req.namespace)
            .ok_or_else(|| Status::not_found(format!("no proxy for workload {:?} has connected", req.workload)))?;
        let (enc, _) = encode(self.store.current(), spec, None).await.map_err(Status::internal)?;
        let json = enc.full().map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ProxyConfigReply { proxy_id: id, snapshot_json: json }))
    }
}

/// Compilations running at once: one per core. A config change reaches every session at once;
/// this bounds the CPU and memory they take to the machine's, and the rest queue.
static COMPILE_SLOTS: LazyLock<Semaphore> =
    LazyLock::new(|| Semaphore::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)));

/// Whole snapshots in flight (pushed, not yet ACKed or NACKed), as Istio's push throttle: when a
/// fleet connects at once, each holds its encoded snapshot until the proxy has read it, and
/// without a bound the control plane would hold the whole fleet's at once.
static WHOLE_PUSHES: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(64)));

/// How long a whole push may hold its slot without an answer.
const WHOLE_PUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Compiles and encodes `spec`'s snapshot, and the message that brings a proxy holding `base`
/// (or nothing) to it. Once the parts sidecars share are compiled for this generation, what is
/// left is small and runs right here; the first compilation runs off the async threads.
async fn encode(
    state: Arc<ConfigState>,
    spec: ProxySpec,
    base: Option<Arc<Encoded>>,
) -> Result<(Arc<Encoded>, control_message::Kind), String> {
    // A delta from a warm generation is a few KiB of work; a whole snapshot is not.
    let inline = base.is_some() && state.compiled.is_warm(&spec);
    let work = move || {
        let enc = state.compiled.compile(&state.resources, &spec)?;
        let kind = match &base {
            Some(b) => control_message::Kind::Delta(SnapshotDelta {
                version: enc.version.clone(),
                base_version: b.version.clone(),
                delta_json: enc.delta(b).map_err(|e| e.to_string())?,
                more: false,
            }),
            None => control_message::Kind::Snapshot(Snapshot {
                version: enc.version.clone(),
                snapshot_json: enc.full().map_err(|e| e.to_string())?,
                more: false,
            }),
        };
        Ok((Arc::new(enc), kind))
    };
    if inline {
        return work();
    }
    let _slot = COMPILE_SLOTS.acquire().await.map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(work).await.map_err(|e| e.to_string())?
}

/// The largest message a push is split into.
const CHUNK_BYTES: usize = 64 * 1024;

/// `kind` as messages of at most [`CHUNK_BYTES`] of JSON each, all but the last marked `more`.
fn chunks(kind: control_message::Kind) -> impl Iterator<Item = ControlMessage> {
    type Make = Box<dyn Fn(Vec<u8>, bool) -> control_message::Kind + Send>;
    let (json, make): (Vec<u8>, Make) = match kind {
        control_message::Kind::Snapshot(s) => {
            let version = s.version;
            (
                s.snapshot_json,
                Box::new(move |snapshot_json, more| {
                    control_message::Kind::Snapshot(Snapshot { version: version.clone(), snapshot_json, more })
                }),
            )
        }
        control_message::Kind::Delta(d) => {
            let (version, base_version) = (d.version, d.base_version);
            (
                d.delta_json,
                Box::new(move |delta_json, more| {
                    control_message::Kind::Delta(SnapshotDelta {
                        version: version.clone(),
                        base_version: base_version.clone(),
                        delta_json,
                        more,
                    })
                }),
            )
        }
    };
    let n = json.len().div_ceil(CHUNK_BYTES).max(1);
    (0..n).map(move |i| {
        let part = json[i * CHUNK_BYTES..((i + 1) * CHUNK_BYTES).min(json.len())].to_vec();
        ControlMessage { kind: Some(make(part, i + 1 < n)) }
    })
}

/// One proxy's stream: push its snapshot whenever it changes (whole first, then deltas against
/// what it holds); record ACKs and NACKs.
async fn session(
    store: Arc<ConfigStore>,
    proxies: Arc<Proxies>,
    hello: Hello,
    spec: ProxySpec,
    mut inbound: Streaming<ProxyMessage>,
    tx: mpsc::Sender<Result<ControlMessage, Status>>,
) {
    let id = hello.proxy_id.clone();
    proxies.connected(&id, spec.clone());
    let has = if hello.current_version.is_empty() { "none" } else { hello.current_version.as_str() };
    tracing::info!(proxy = %id, has_version = %has, "proxy connected");
    let mut config = store.subscribe();
    let mut last_sent = hello.current_version.clone();
    // What the proxy holds, as far as this stream knows: the base of the next delta.
    let mut holds: Option<Arc<Encoded>> = None;
    // A whole snapshot's slot, held until the proxy answers (or the timeout).
    let mut in_flight: Option<(tokio::sync::OwnedSemaphorePermit, tokio::time::Instant)> = None;
    let mut dirty = true;
    loop {
        if dirty {
            dirty = false;
            let state = config.borrow_and_update().clone();
            let generation = state.generation;
            if generation > 0 {
                if holds.is_none() && in_flight.is_none() {
                    let Ok(permit) = WHOLE_PUSHES.clone().acquire_owned().await else { break };
                    in_flight = Some((permit, tokio::time::Instant::now() + WHOLE_PUSH_TIMEOUT));
                }
                let (enc, kind) = match encode(state, spec.clone(), holds.clone()).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(proxy = %id, "cannot compile snapshot: {e}");
                        break;
                    }
                };
                if enc.version != last_sent {
                    let mut closed = false;
                    for msg in chunks(kind) {
                        if tx.send(Ok(msg)).await.is_err() {
                            closed = true;
                            break;
                        }
                    }
                    if closed {
                        break;
                    }
                    tracing::debug!(proxy = %id, version = %enc.version, "snapshot pushed");
                    proxies.update(&id, |e| {
                        e.sent = enc.version.clone();
                        e.generation = generation;
                    });
                    last_sent = enc.version.clone();
                } else if !last_sent.is_empty() {
                    // The proxy already serves this version (e.g. after a control-plane restart).
                    in_flight = None;
                    let v = last_sent.clone();
                    proxies.update(&id, |e| {
                        e.sent = v.clone();
                        e.generation = generation;
                        if e.acked.is_empty() {
                            e.acked = v;
                        }
                    });
                }
                holds = Some(enc);
            }
        }
        tokio::select! {
            // The store debounces file changes; a generation is pushed as soon as it is published.
            changed = config.changed() => {
                if changed.is_err() {
                    break;
                }
                dirty = true;
            }
            _ = async { tokio::time::sleep_until(in_flight.as_ref().map(|f| f.1).unwrap_or_else(tokio::time::Instant::now)).await }, if in_flight.is_some() => {
                tracing::debug!(proxy = %id, "no answer to the whole snapshot yet; releasing its push slot");
                in_flight = None;
            }
            msg = inbound.message() => match msg {
                Ok(Some(ProxyMessage { kind: Some(proxy_message::Kind::Ack(a)) })) => {
                    in_flight = None;
                    tracing::debug!(proxy = %id, version = %a.version, "ACK");
                    proxies.update(&id, |e| e.acked = a.version);
                }
                Ok(Some(ProxyMessage { kind: Some(proxy_message::Kind::Nack(n)) })) => {
                    // The proxy kept what it had: the next push is whole (at once, if it asked).
                    in_flight = None;
                    holds = None;
                    if n.resync {
                        tracing::info!(proxy = %id, version = %n.version, "proxy asked for the whole snapshot");
                        last_sent.clear();
                        dirty = true;
                        continue;
                    }
                    let source = if n.config_source.is_empty() {
                        n.resource.clone()
                    } else {
                        store.current().locate(&n.config_source)
                    };
                    tracing::warn!(proxy = %id, version = %n.version, reason = %n.reason, %source, "proxy rejected snapshot (NACK)");
                    proxies.update(&id, |e| {
                        e.nacked = n.version;
                        e.nack_reason = n.reason;
                        e.nack_source = source;
                    });
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
    proxies.disconnected(&id);
    tracing::info!(proxy = %id, "proxy disconnected");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_pushes_are_split_into_bounded_chunks() {
        let json: Vec<u8> = (0..CHUNK_BYTES * 2 + 10).map(|i| (i % 251) as u8).collect();
        let msgs: Vec<ControlMessage> = chunks(control_message::Kind::Snapshot(Snapshot {
            version: "v".into(),
            snapshot_json: json.clone(),
            more: false,
        }))
        .collect();
        assert_eq!(msgs.len(), 3);
        let mut joined = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            let Some(control_message::Kind::Snapshot(s)) = &m.kind else { panic!("{m:?}") };
            assert!(s.snapshot_json.len() <= CHUNK_BYTES);
            assert_eq!(s.more, i < 2);
            assert_eq!(s.version, "v");
            joined.extend_from_slice(&s.snapshot_json);
        }
        assert_eq!(joined, json);
        // A small push (and an empty one) is one message.
        let one: Vec<_> = chunks(control_message::Kind::Snapshot(Snapshot {
            version: "v".into(),
            snapshot_json: vec![],
            more: false,
        }))
        .collect();
        assert_eq!(one.len(), 1);
    }
}
