//! Inbound direction: in front of the local workload. Requests from other proxies (or, in
//! PERMISSIVE mode, from anyone) are forwarded to the application's port unchanged. Peer
//! identity, authorization and server-side telemetry attach here.

use http::HeaderMap;

use crate::handler::ConnInfo;

pub(crate) fn on_request(_h: &mut HeaderMap, _conn: &ConnInfo) {}
