//! Listeners: binding the snapshot's sockets, accepting, and serving connections.
//!
//! A snapshot's listeners are reconciled in two steps so a request never meets a half-applied
//! config: [`Listeners::stage`] binds every new socket (any failure rejects the snapshot and
//! leaves everything as it was), then, after the runtime swap, [`Listeners::commit`] starts the
//! new accept loops and stops the removed ones. One task per connection; HTTP/1.1 and HTTP/2
//! (prior knowledge) are told apart by the connection preface.

pub mod tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use trellis_config::snapshot::{Direction, Listener as ListenerSpec, MtlsMode, Snapshot};

use crate::pipeline::{self, ConnInfo};
use crate::runtime::{BuildError, Captured, Problem, Resource};
use crate::state::Shared;
use crate::upstream::Io;

struct Active {
    /// The snapshot's address.
    address: SocketAddr,
    /// The socket's address: the same, unless ephemeral ports are on.
    bound: SocketAddr,
    direction: Direction,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Sockets bound for a snapshot, not yet accepting.
pub struct Staged {
    bound: Vec<(ListenerSpec, TcpListener)>,
    keep: Vec<String>,
}

fn bind_error(l: &ListenerSpec, e: std::io::Error) -> BuildError {
    Problem::Bind { address: l.address, source: e }.at(Resource::Listener(l.name.clone()))
}

#[derive(Default)]
pub struct Listeners {
    active: tokio::sync::Mutex<HashMap<String, Active>>,
    /// Gateway listeners bind port 0 instead of their configured port (tests that own the
    /// process read the real address from `/config_dump`); requests still see the configured
    /// port, as behind a Service's port mapping.
    ephemeral_gateway_ports: bool,
}

impl Listeners {
    /// Listeners that bind gateway ports as port 0 (see the field).
    pub fn with_ephemeral_gateway_ports() -> Listeners {
        Listeners { ephemeral_gateway_ports: true, ..Listeners::default() }
    }

    /// Binds the listeners of `snap` that are not already open.
    pub async fn stage(&self, snap: &Snapshot) -> Result<Staged, BuildError> {
        let mut active = self.active.lock().await;
        let mut staged = Staged { bound: Vec::new(), keep: Vec::new() };
        for l in &snap.listeners {
            if let Some(a) = active.get(&l.name) {
                if a.address == l.address && a.direction == l.direction {
                    staged.keep.push(l.name.clone());
                    continue;
                }
            }
            let at = if self.ephemeral_gateway_ports && l.direction == Direction::Gateway {
                SocketAddr::new(l.address.ip(), 0)
            } else {
                l.address
            };
            let listener = match bind(at) {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    // The address may belong to a listener this snapshot renames or replaces.
                    let wanted: Vec<&str> = snap.listeners.iter().map(|x| x.name.as_str()).collect();
                    let holder = active
                        .iter()
                        .find(|(name, a)| {
                            a.address == l.address && (!wanted.contains(&name.as_str()) || *name == &l.name)
                        })
                        .map(|(n, _)| n.clone());
                    match holder {
                        Some(name) => {
                            if let Some(a) = active.remove(&name) {
                                stop(a).await;
                            }
                            bind(at).map_err(|e| bind_error(l, e))?
                        }
                        None => return Err(bind_error(l, e)),
                    }
                }
                Err(e) => return Err(bind_error(l, e)),
            };
            staged.bound.push((l.clone(), listener));
        }
        Ok(staged)
    }

    /// Starts accepting on the staged sockets and stops listeners the snapshot dropped.
    pub async fn commit(&self, staged: Staged, shared: &Arc<Shared>) {
        let mut active = self.active.lock().await;
        let mut wanted: Vec<String> = staged.keep;
        for (spec, listener) in staged.bound {
            if let Some(old) = active.remove(&spec.name) {
                stop(old).await;
            }
            let (tx, rx) = watch::channel(false);
            let name: Arc<str> = Arc::from(spec.name.as_str());
            let bound = listener.local_addr().unwrap_or(spec.address);
            tracing::info!(listener = %name, address = %spec.address, %bound, direction = ?spec.direction, "listening");
            // Requests see the configured address (its port matters to authorization).
            let local = if spec.address.port() == 0 { bound } else { spec.address };
            let task = tokio::spawn(accept_loop(listener, name, spec.direction, local, shared.clone(), rx));
            wanted.push(spec.name.clone());
            active
                .insert(spec.name, Active { address: spec.address, bound, direction: spec.direction, stop: tx, task });
        }
        let removed: Vec<String> = active.keys().filter(|k| !wanted.contains(k)).cloned().collect();
        for name in removed {
            if let Some(a) = active.remove(&name) {
                tracing::info!(listener = %name, address = %a.address, "listener removed");
                stop(a).await;
            }
        }
    }

    /// The listeners currently accepting: name, configured address, bound address.
    pub async fn addresses(&self) -> Vec<(String, SocketAddr, SocketAddr)> {
        self.active.lock().await.iter().map(|(n, a)| (n.clone(), a.address, a.bound)).collect()
    }
}

async fn stop(a: Active) {
    a.stop.send_replace(true);
    let _ = a.task.await;
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(
    listener: TcpListener,
    name: Arc<str>,
    direction: Direction,
    local: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = shared.drain.started() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let original_dst = if shared.runtime().is_capturing(&name) { original_dst(&stream) } else { None };
                    let conn = ConnInfo {
                        listener: name.clone(),
                        direction,
                        peer,
                        local,
                        peer_identity: None,
                        mtls: false,
                        tls: false,
                        original_dst,
                        forwarded_for: Default::default(),
                    };
                    tokio::spawn(serve(stream, conn, shared.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        }
    }
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// How long a connection may take to say what it speaks, and to finish a TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves one connection: first PeerAuthentication decides between mutual TLS and plaintext
/// (PERMISSIVE tells them apart by the first byte: 0x16 opens a TLS handshake), then HTTP.
async fn serve(stream: TcpStream, mut conn: ConnInfo, shared: Arc<Shared>) {
    let _open = shared.drain.track();
    let _ = stream.set_nodelay(true);
    let rt = shared.runtime();
    let mut tcp = None;
    let mut detect = false;
    let mode = if rt.is_capturing(&conn.listener) {
        let Some(original) = conn.original_dst else {
            tracing::debug!(listener = %conn.listener, peer = %conn.peer, "captured connection without an original destination; closed");
            return;
        };
        // A client that connects to the capture port itself would loop back here forever.
        if original.port() == conn.local.port() && (original.ip() == conn.local.ip() || original.ip().is_loopback()) {
            tracing::debug!(listener = %conn.listener, peer = %conn.peer, "connection addressed to the capture port itself; closed");
            return;
        }
        match rt.captured(&conn.listener, original.port()) {
            Captured::Http(mode) => mode,
            Captured::Tcp(mode) => {
                tcp = rt.tcp(&conn.listener, Some(original.port())).cloned();
                mode
            }
            Captured::Detect(mode) => {
                tcp = rt.tcp(&conn.listener, Some(original.port())).cloned();
                detect = true;
                mode
            }
            // Outbound: counted as Istio's PassthroughCluster (or refused, REGISTRY_ONLY).
            Captured::Passthrough if conn.direction == Direction::Outbound => {
                let empty = Arc::new(crate::runtime::TcpProxy::empty());
                return crate::tcp::serve(Box::new(stream), conn, shared.clone(), rt, empty, false, None).await;
            }
            Captured::Passthrough => return passthrough(stream, original, &conn).await,
            Captured::Refuse => {
                tracing::debug!(listener = %conn.listener, %original, "plaintext to an undeclared port of a STRICT workload; refused");
                return;
            }
        }
    } else {
        tcp = rt.tcp(&conn.listener, None).cloned();
        detect = rt.detects(&conn.listener);
        rt.listener_mtls(&conn.listener)
    };
    let tls = match (mode, &shared.mesh_server) {
        (Some(MtlsMode::Strict), None) => {
            tracing::warn!(listener = %conn.listener, "STRICT mTLS but this proxy has no certificate; connection refused");
            return;
        }
        (Some(MtlsMode::Strict), Some(cfg)) => Some(cfg.clone()),
        (Some(MtlsMode::Permissive), Some(cfg)) => {
            // A TCP port's plaintext client may wait for the server to speak first: after the
            // detection window it is plaintext, never stalled.
            let window = if tcp.is_some() { DETECT_WINDOW } else { HANDSHAKE_TIMEOUT };
            let mut first = [0u8; 1];
            match tokio::time::timeout(window, stream.peek(&mut first)).await {
                Ok(Ok(1)) if first[0] == 0x16 => Some(cfg.clone()),
                Ok(Ok(_)) => None,
                Err(_) if tcp.is_some() => None,
                _ => return,
            }
        }
        _ => None,
    };
    let mut mesh_tcp = false;
    // An undeclared protocol over plaintext: HTTP only if the client's first bytes say so.
    if detect && tls.is_none() && sniff_http(&stream).await {
        tcp = None;
    }
    if let Some(gateway_tls) = rt.gateway_tls(&conn.listener) {
        let gateway_tls = gateway_tls.clone();
        drop(rt);
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, gateway_tls.accept(stream)).await {
            Ok(Ok(s)) => {
                conn.tls = true;
                return serve_http(Box::new(s), Arc::new(conn), shared.clone()).await;
            }
            Ok(Err(e)) => tracing::debug!(listener = %conn.listener, peer = %conn.peer, "{e}"),
            Err(_) => tracing::debug!(listener = %conn.listener, peer = %conn.peer, "TLS handshake timed out"),
        }
        shared.metrics.tls_handshake_failures.inc();
        return;
    }
    // TLS passthrough routes by the ClientHello's SNI, read without consuming it.
    let sni = match &tcp {
        Some(t) if t.sni => peek_sni(&stream).await,
        _ => None,
    };
    let io: Io = match tls {
        None => Box::new(stream),
        Some(cfg) => {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_rustls::TlsAcceptor::from(cfg).accept(stream)).await {
                Ok(Ok(tls)) => {
                    conn.peer_identity =
                        trellis_identity::tls::peer_identity(tls.get_ref().1).map(|id| Arc::from(id.to_string()));
                    conn.mtls = true;
                    mesh_tcp = tls.get_ref().1.alpn_protocol() == Some(trellis_identity::tls::ALPN_TCP);
                    Box::new(tls)
                }
                Ok(Err(e)) => {
                    tracing::debug!(listener = %conn.listener, peer = %conn.peer, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => return,
            }
        }
    };
    // Over mesh mTLS the client proxy said what it speaks (ALPN `trellis-tcp`, or HTTP).
    if detect && conn.mtls && !mesh_tcp {
        tcp = None;
    }
    match tcp {
        Some(tcp) => crate::tcp::serve(io, conn, shared.clone(), rt, tcp, mesh_tcp, sni).await,
        None => {
            drop(rt);
            serve_http(io, Arc::new(conn), shared.clone()).await
        }
    }
}

/// The SNI of a TLS ClientHello at the start of `stream`, parsed by rustls from peeked bytes
/// (the client's bytes stay unread for the upstream). `None`: not TLS, no SNI, or no
/// ClientHello within the handshake timeout.
async fn peek_sni(stream: &TcpStream) -> Option<String> {
    // A TLS client speaks first; one silent past the detection window is not TLS (a
    // server-first protocol sharing the port), and is not held up.
    let first = tokio::time::Instant::now() + DETECT_WINDOW;
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let mut buf = vec![0u8; 16 * 1024];
    let mut seen = 0;
    loop {
        let until = if seen == 0 { first } else { deadline };
        let n = tokio::time::timeout_at(until, stream.peek(&mut buf)).await.ok()?.ok()?;
        if n == 0 {
            return None;
        }
        if n > seen {
            seen = n;
            let mut acceptor = rustls::server::Acceptor::default();
            let _ = acceptor.read_tls(&mut &buf[..n]);
            match acceptor.accept() {
                Ok(Some(hello)) => return hello.client_hello().server_name().map(str::to_string),
                Ok(None) if n < buf.len() => {}
                _ => return None,
            }
        }
        // A ClientHello split across segments (rare): look again shortly, within the timeout.
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// How long a connection on a port whose protocol is not declared may stay silent before it is
/// taken for a server-first protocol (MySQL, SMTP, ...) and proxied as TCP: short enough that
/// the server's greeting is not noticeably delayed (Linkerd waits 10 s; Istio, without a
/// timeout, until the client speaks).
const DETECT_WINDOW: std::time::Duration = std::time::Duration::from_millis(20);

/// Whether a plaintext connection's first bytes are an HTTP/1 request line or the HTTP/2
/// preface (read without consuming them). `false` when the client stays silent for
/// [`DETECT_WINDOW`].
async fn sniff_http(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 16];
    let first = tokio::time::Instant::now() + DETECT_WINDOW;
    let done = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    loop {
        let deadline = if tokio::time::Instant::now() < first { first } else { done };
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return false,
        };
        if let Some(http) = looks_like_http(&buf[..n]) {
            return http;
        }
        // A method token cut short: wait for the rest (bounded by the handshake timeout).
        if tokio::time::Instant::now() >= done {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// `Some(true)`: an HTTP request starts here; `Some(false)`: it cannot; `None`: too few bytes.
fn looks_like_http(b: &[u8]) -> Option<bool> {
    const STARTS: [&[u8]; 10] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
        b"PRI * HTTP/2.0",
    ];
    if STARTS.iter().any(|s| b.starts_with(s)) {
        Some(true)
    } else if STARTS.iter().any(|s| s.starts_with(b)) {
        None
    } else {
        Some(false)
    }
}

/// `SO_ORIGINAL_DST`: where a connection redirected by iptables was going.
fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sin = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::OriginalDst).ok()?;
    let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
    Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
}

/// A captured connection Trellis does not serve as HTTP: bytes copied both ways to where the
/// client was going (Istio's PassthroughCluster). The proxy's own connections are not
/// captured (iptables skips its UID), so this does not loop.
async fn passthrough(mut client: TcpStream, original: SocketAddr, conn: &ConnInfo) {
    let connect = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(original)).await;
    let mut upstream = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(listener = %conn.listener, %original, "passthrough connect failed: {e}");
            return;
        }
        Err(_) => return,
    };
    let _ = upstream.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

async fn serve_http(io: Io, conn: Arc<ConnInfo>, shared: Arc<Shared>) {
    let svc_shared = shared.clone();
    let svc_conn = conn.clone();
    let svc = hyper::service::service_fn(move |req| {
        let (s, c) = (svc_shared.clone(), svc_conn.clone());
        async move { Ok::<_, Infallible>(pipeline::handle(s, c, req).await) }
    });
    let served = shared.server.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(served);
    let result = tokio::select! {
        r = served.as_mut() => r,
        _ = shared.drain.started() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = result {
        if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout) {
            shared.metrics.header_timeouts.inc();
        }
        tracing::debug!(listener = %conn.listener, peer = %conn.peer, error = %e, "connection ended with error");
    }
}

#[cfg(test)]
mod tests {
    use super::looks_like_http;

    #[test]
    fn http_is_told_from_other_protocols_by_its_first_bytes() {
        assert_eq!(looks_like_http(b"GET / HTTP/1.1\r\n"), Some(true));
        assert_eq!(looks_like_http(b"PRI * HTTP/2.0\r\n"), Some(true));
        assert_eq!(looks_like_http(b"GE"), None, "a method cut short waits for more");
        assert_eq!(looks_like_http(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"), Some(false), "a PostgreSQL SSLRequest");
        assert_eq!(looks_like_http(b"*1\r\n$4\r\nPING"), Some(false), "Redis");
        assert_eq!(looks_like_http(b"GETX"), Some(false));
    }
}
