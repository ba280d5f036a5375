//! Opaque TCP: a connection on a port declared TCP (`tcp`, `mongo`, `mysql`, `redis`, `tls`,
//! ...) is proxied as bytes, with what the mesh gives HTTP where it applies to a connection:
//!
//! - **routes**: VirtualService `tcp` routes (compiled to [`TcpProxy`]: destination subnets,
//!   weighted clusters), then the cluster's balancer, skipping ejected endpoints;
//! - **mutual TLS** between sidecars as for HTTP; the client side announces itself with ALPN
//!   `trellis-tcp` and sends its peer metadata first (a 2-byte length, then the same
//!   `k=v;...` text the HTTP peer header carries), so the server side's metrics name the source
//!   workload as Istio's TCP metadata exchange does;
//! - **authorization** on the server side (and gateways) with Istio's TCP semantics
//!   ([`Authorizer::evaluate_tcp`](crate::security::authz::Authorizer::evaluate_tcp)): a denied
//!   connection is closed before a byte reaches the app;
//! - **telemetry**: `istio_tcp_connections_opened_total` / `_closed_total` and
//!   `istio_tcp_received_bytes_total` (client → server) / `istio_tcp_sent_bytes_total`
//!   (server → client), counted as bytes move, and one access-log line per connection.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use trellis_config::snapshot::Direction;
use trellis_telemetry::identity::{unknown_identity, unknown_service, ServiceLabels};
use trellis_telemetry::metrics::{AuthzLabels, Reporter, TcpHandles, TcpLabels};
use trellis_telemetry::Identity;

use crate::pipeline::ConnInfo;
use crate::runtime::{Runtime, TcpProxy};
use crate::security::authz::{Attrs, Decision};
use crate::state::Shared;
use crate::upstream::Io;

/// How long a mesh peer may take to send its metadata.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest peer metadata accepted.
const METADATA_MAX: usize = 4096;

/// What one connection is recorded as.
struct Conn {
    reporter: Reporter,
    source: Arc<Identity>,
    destination: Arc<Identity>,
    service: Arc<ServiceLabels>,
    source_principal: Arc<str>,
    destination_principal: Arc<str>,
    security: &'static str,
    flags: &'static str,
    route: Option<Arc<str>>,
    cluster: Option<Arc<str>>,
    upstream: Option<String>,
    authz_policy: Option<Arc<str>>,
    /// The ClientHello's SNI, when the route read it.
    sni: Option<String>,
}

/// Proxies one TCP connection (after any mesh mTLS handshake); `mesh_peer` when the client is
/// a Trellis proxy that negotiated `trellis-tcp`.
pub async fn serve(
    mut io: Io,
    conn: ConnInfo,
    shared: Arc<Shared>,
    rt: Arc<Runtime>,
    proxy: Arc<TcpProxy>,
    mesh_peer: bool,
    sni: Option<String>,
) {
    let start = Instant::now();
    let start_time = SystemTime::now();
    let empty = Arc::<str>::from("");
    let mut c = Conn {
        reporter: if conn.direction == Direction::Inbound { Reporter::Destination } else { Reporter::Source },
        source: rt.me.clone(),
        destination: unknown_identity(),
        service: unknown_service(),
        source_principal: empty.clone(),
        destination_principal: empty,
        security: "unknown",
        flags: "-",
        route: None,
        cluster: None,
        upstream: None,
        authz_policy: None,
        sni: None,
    };
    if conn.direction == Direction::Inbound {
        c.destination = rt.me.clone();
        c.source = unknown_identity();
        if conn.mtls {
            c.security = "mutual_tls";
            c.destination_principal = rt.me.principal.clone();
            if let Some(p) = &conn.peer_identity {
                c.source_principal = p.clone();
            }
        } else {
            c.security = "none";
        }
        if mesh_peer {
            match read_metadata(&mut io).await {
                Some((id, svc)) => {
                    c.source = id;
                    c.service = svc;
                }
                None => {
                    tracing::debug!(listener = %conn.listener, peer = %conn.peer, "mesh peer sent no metadata; closed");
                    return;
                }
            }
        }
    }
    // Where the client meant to go: the original destination when captured.
    let destination_ip = conn.original_dst.map(|a| a.ip()).unwrap_or(conn.local.ip());
    let destination_port = conn.original_dst.map(|a| a.port()).unwrap_or(conn.local.port());
    if conn.direction != Direction::Outbound && !rt.authz.is_empty() {
        if let Err(policy) = authorize(&shared, &rt, &conn, destination_ip, destination_port) {
            c.flags = "-";
            c.authz_policy = Some(policy);
            let h = handles(&shared, &c);
            h.opened.inc();
            h.closed.inc();
            log(&shared, &rt, &c, &conn, start_time, start.elapsed(), (0, 0), "rbac_access_denied_matched_policy");
            return;
        }
    }
    c.sni = sni;
    let Some((route, cluster)) = proxy.route(destination_ip, c.sni.as_deref()) else {
        if conn.original_dst.is_some() && conn.direction == Direction::Outbound && rt.registry_only(&conn.listener) {
            c.cluster = Some(Arc::from("BlackHoleCluster"));
            c.service = Arc::new(ServiceLabels::new("BlackHoleCluster", "BlackHoleCluster", ""));
            c.flags = "NR";
            let h = handles(&shared, &c);
            h.opened.inc();
            h.closed.inc();
            log(&shared, &rt, &c, &conn, start_time, start.elapsed(), (0, 0), "outboundTrafficPolicy REGISTRY_ONLY");
            return;
        }
        if let Some(original) = conn.original_dst.filter(|_| conn.direction == Direction::Outbound) {
            // A captured connection to an address no service of this port has: on to where it
            // was going, as Istio's PassthroughCluster.
            c.cluster = Some(Arc::from("PassthroughCluster"));
            c.service = Arc::new(ServiceLabels::new("PassthroughCluster", "PassthroughCluster", ""));
            let h = handles(&shared, &c);
            h.opened.inc();
            let totals =
                match tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(original)).await {
                    Ok(Ok(up)) => {
                        let _ = up.set_nodelay(true);
                        let mut client = Counted { inner: io, counter: h.received.clone(), total: 0 };
                        let mut server = Counted { inner: up, counter: h.sent.clone(), total: 0 };
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        (client.total, server.total)
                    }
                    _ => (0, 0),
                };
            h.closed.inc();
            log(&shared, &rt, &c, &conn, start_time, start.elapsed(), totals, "");
            return;
        }
        c.flags = "NR";
        let h = handles(&shared, &c);
        h.opened.inc();
        h.closed.inc();
        log(&shared, &rt, &c, &conn, start_time, start.elapsed(), (0, 0), "no route");
        return;
    };
    c.route = Some(route.name.clone());
    c.cluster = Some(cluster.name.clone());
    if conn.direction != Direction::Inbound {
        c.service = cluster.service.clone();
    }
    let ctx = crate::balance::PickCtx { headers: &http::HeaderMap::new(), query: None, source_ip: conn.peer.ip() };
    let healthy = |i: usize| cluster.outlier.as_ref().is_none_or(|o| o.usable(i));
    let Some((pick, _)) = cluster.balancer.pick(&cluster.endpoints, &ctx, &healthy) else {
        c.flags = "UH";
        let h = handles(&shared, &c);
        h.opened.inc();
        h.closed.inc();
        log(&shared, &rt, &c, &conn, start_time, start.elapsed(), (0, 0), "no healthy upstream");
        return;
    };
    let (endpoint, _) = &cluster.endpoints[pick];
    c.upstream = Some(endpoint.address.clone());
    if conn.direction != Direction::Inbound {
        if let Some(id) = cluster.identities.get(pick) {
            c.destination = id.clone();
            if cluster.mtls {
                c.destination_principal = id.principal.clone();
                c.source_principal = rt.me.principal.clone();
                c.security = "mutual_tls";
            }
        }
    }
    // `maxConnections`: a connection over the limit is closed (flag UO), and counted.
    let _slot = match endpoint.tcp_slot() {
        Ok(s) => s,
        Err(_) => {
            c.flags = "UO";
            let labels =
                trellis_telemetry::metrics::OverflowLabels { cluster_name: cluster.name.clone(), limit: "connections" };
            shared.metrics.overflows.get_or_create(&labels).inc();
            let h = handles(&shared, &c);
            h.opened.inc();
            h.closed.inc();
            log(&shared, &rt, &c, &conn, start_time, start.elapsed(), (0, 0), "maxConnections reached");
            return;
        }
    };
    let upstream = endpoint.connect_opaque(cluster.connect_timeout).await;
    let result = match &upstream {
        Ok(_) => crate::balance::outlier::Result::Status(200),
        Err(_) => crate::balance::outlier::Result::LocalFailure,
    };
    crate::pipeline::observe(&shared, cluster, pick, result);
    let (mut up, peer_is_mesh) = match upstream {
        Ok(u) => u,
        Err(e) => {
            c.flags = "UF";
            let h = handles(&shared, &c);
            h.opened.inc();
            h.closed.inc();
            log(&shared, &rt, &c, &conn, start_time, start.elapsed(), (0, 0), &e.to_string());
            return;
        }
    };
    if peer_is_mesh {
        let meta = cluster.peer_header.as_ref().map(|v| v.as_bytes().to_vec()).unwrap_or_default();
        let mut frame = Vec::with_capacity(meta.len() + 2);
        frame.extend_from_slice(&(meta.len() as u16).to_be_bytes());
        frame.extend_from_slice(&meta);
        if up.write_all(&frame).await.is_err() {
            c.flags = "UF";
            let h = handles(&shared, &c);
            h.opened.inc();
            h.closed.inc();
            log(&shared, &rt, &c, &conn, start_time, start.elapsed(), (0, 0), "peer closed before metadata");
            return;
        }
    }
    let h = handles(&shared, &c);
    h.opened.inc();
    let mut client = Counted { inner: io, counter: h.received.clone(), total: 0 };
    let mut server = Counted { inner: up, counter: h.sent.clone(), total: 0 };
    let result = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    h.closed.inc();
    let details = match &result {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    log(&shared, &rt, &c, &conn, start_time, start.elapsed(), (client.total, server.total), &details);
}

/// The peer metadata a mesh client sends first.
async fn read_metadata(io: &mut Io) -> Option<(Arc<Identity>, Arc<ServiceLabels>)> {
    let read = async {
        let len = io.read_u16().await.ok()? as usize;
        if len > METADATA_MAX {
            return None;
        }
        let mut buf = vec![0u8; len];
        io.read_exact(&mut buf).await.ok()?;
        let value = http::HeaderValue::from_bytes(&buf).ok()?;
        let mut one = http::HeaderMap::new();
        one.insert(trellis_telemetry::peer::PEER_HEADER, value);
        let (id, svc) =
            trellis_telemetry::peer::take(&mut one).unwrap_or_else(|| (Identity::unknown(), ServiceLabels::unknown()));
        Some((Arc::new(id), Arc::new(svc)))
    };
    tokio::time::timeout(METADATA_TIMEOUT, read).await.ok().flatten()
}

/// AuthorizationPolicy for a connection: `Err(policy)` when denied.
fn authorize(shared: &Shared, rt: &Runtime, conn: &ConnInfo, dest_ip: IpAddr, port: u16) -> Result<(), Arc<str>> {
    let headers = http::HeaderMap::new();
    let attrs = Attrs {
        principal: conn.peer_identity.as_deref().map(|p| p.trim_start_matches("spiffe://")),
        source_ip: conn.peer.ip(),
        remote_ip: conn.peer.ip(),
        request_principal: None,
        claims: None,
        host: "",
        method: "",
        path: "",
        port,
        dest_ip,
        headers: &headers,
    };
    let (decision, audit) = rt.authz.evaluate_tcp(&attrs);
    let metrics = &shared.metrics.authz_decisions;
    if let Some(a) = audit {
        metrics.get_or_create(&AuthzLabels { decision: "audit", policy: a }).inc();
    }
    match decision {
        Decision::Allow { policy } => {
            if let Some(p) = policy {
                metrics.get_or_create(&AuthzLabels { decision: "allow", policy: p }).inc();
            }
            Ok(())
        }
        Decision::Deny { policy } => {
            let p = policy.unwrap_or_else(|| Arc::from("(no ALLOW policy matched)"));
            metrics.get_or_create(&AuthzLabels { decision: "deny", policy: p.clone() }).inc();
            Err(p)
        }
    }
}

fn handles(shared: &Shared, c: &Conn) -> TcpHandles {
    let labels = TcpLabels::new(
        c.reporter,
        &c.source,
        &c.destination,
        (&c.source_principal, &c.destination_principal),
        &c.service,
        c.flags,
        c.security,
    );
    shared.metrics.tcp_handles(&labels)
}

#[allow(clippy::too_many_arguments)]
fn log(
    shared: &Shared,
    rt: &Runtime,
    c: &Conn,
    conn: &ConnInfo,
    start_time: SystemTime,
    elapsed: Duration,
    (received, sent): (u64, u64),
    details: &str,
) {
    if !rt.telemetry.access_log {
        return;
    }
    let Some(log) = &shared.access_log else { return };
    let line = serde_json::json!({
        "start_time": crate::telemetry::rfc3339(start_time),
        "protocol": "TCP",
        "response_flags": c.flags,
        "duration": elapsed.as_millis() as u64,
        "bytes_received": received,
        "bytes_sent": sent,
        "upstream_host": c.upstream,
        "upstream_cluster": c.cluster.as_deref(),
        "route_name": c.route.as_deref(),
        "authz_policy": c.authz_policy.as_deref(),
        "connection_termination_details": (!details.is_empty()).then_some(details),
        "source_principal": &*c.source_principal,
        "reporter": if c.reporter == Reporter::Source { "source" } else { "destination" },
        "source_workload": &*c.source.workload,
        "source_namespace": &*c.source.namespace,
        "destination_workload": &*c.destination.workload,
        "destination_namespace": &*c.destination.namespace,
        "destination_service": &*c.service.host,
        "downstream_remote_address": conn.peer.to_string(),
        "downstream_local_address": conn.original_dst.unwrap_or(conn.local).to_string(),
        "requested_server_name": c.sni.as_deref(),
    });
    log.write(line.to_string());
}

/// A stream whose reads are counted as they happen (long connections show in metrics before
/// they close).
struct Counted<S> {
    inner: S,
    counter: Counter,
    total: u64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.counter.inc_by(n);
            self.total += n;
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
