//! The gRPC service: one stream per proxy (Hello → Snapshots ⇄ ACK/NACK), plus the status and
//! proxy-config queries the CLI uses.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use trellis_api::control::{
    control_message, control_server, proxy_message, CertificateReply, CertificateRequest, ControlMessage, Hello,
    ProxyConfigReply, ProxyConfigRequest, ProxyMessage, ProxyStatus, Snapshot, StatusReply, StatusRequest,
};
use trellis_config::compile::{compile, ProxySpec};

use crate::ca::CertificateService;
use crate::proxies::Proxies;
use crate::store::ConfigStore;

/// Changes that arrive within this window are pushed as one snapshot.
const PUSH_DEBOUNCE: Duration = Duration::from_millis(20);

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
                state_age_seconds: e.since.elapsed().as_secs(),
                admin_address: e.spec.admin.map(|a| a.to_string()).unwrap_or_default(),
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
        let (chain, bundle) = svc.sign(&req.token, &req.csr_pem)?;
        Ok(Response::new(CertificateReply { cert_chain_pem: chain, trust_bundle_pem: bundle }))
    }

    async fn proxy_config(&self, req: Request<ProxyConfigRequest>) -> Result<Response<ProxyConfigReply>, Status> {
        let req = req.into_inner();
        let (id, spec) = self
            .proxies
            .find(&req.workload, &req.namespace)
            .ok_or_else(|| Status::not_found(format!("no proxy for workload {:?} has connected", req.workload)))?;
        let state = self.store.current();
        let snap = compile(&state.resources, &[], &spec);
        let json = serde_json::to_vec(&snap).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ProxyConfigReply { proxy_id: id, snapshot_json: json }))
    }
}

/// One proxy's stream: push its snapshot whenever it changes; record ACKs and NACKs.
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
    tracing::info!(proxy = %id, version = %hello.current_version, "proxy connected");
    let mut config = store.subscribe();
    let mut last_sent = hello.current_version.clone();
    let mut dirty = true;
    loop {
        if dirty {
            dirty = false;
            let state = config.borrow_and_update().clone();
            if state.generation > 0 {
                let snap = compile(&state.resources, &[], &spec);
                if snap.version != last_sent {
                    let json = match serde_json::to_vec(&snap) {
                        Ok(j) => j,
                        Err(e) => {
                            tracing::error!(proxy = %id, "cannot encode snapshot: {e}");
                            break;
                        }
                    };
                    let msg = ControlMessage {
                        kind: Some(control_message::Kind::Snapshot(Snapshot {
                            version: snap.version.clone(),
                            snapshot_json: json,
                        })),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        break;
                    }
                    tracing::debug!(proxy = %id, version = %snap.version, "snapshot pushed");
                    proxies.update(&id, |e| e.sent = snap.version.clone());
                    last_sent = snap.version;
                } else if !last_sent.is_empty() {
                    // The proxy already serves this version (e.g. after a control-plane restart).
                    let v = last_sent.clone();
                    proxies.update(&id, |e| {
                        e.sent = v.clone();
                        if e.acked.is_empty() {
                            e.acked = v;
                        }
                    });
                }
            }
        }
        tokio::select! {
            changed = config.changed() => {
                if changed.is_err() {
                    break;
                }
                tokio::time::sleep(PUSH_DEBOUNCE).await;
                dirty = true;
            }
            msg = inbound.message() => match msg {
                Ok(Some(ProxyMessage { kind: Some(proxy_message::Kind::Ack(a)) })) => {
                    tracing::debug!(proxy = %id, version = %a.version, "ACK");
                    proxies.update(&id, |e| e.acked = a.version);
                }
                Ok(Some(ProxyMessage { kind: Some(proxy_message::Kind::Nack(n)) })) => {
                    tracing::warn!(proxy = %id, version = %n.version, reason = %n.reason, "proxy rejected snapshot (NACK)");
                    proxies.update(&id, |e| {
                        e.nacked = n.version;
                        e.nack_reason = n.reason;
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
