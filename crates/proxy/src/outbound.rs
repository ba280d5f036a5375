//! Outbound direction: the workload's egress. Requests arrive as an HTTP proxy would receive
//! them (absolute-form URIs from `HTTP_PROXY` clients, or origin-form with a Host header), or on
//! a local port bound to one named upstream; they are routed by the mesh's VirtualServices.
//! Client-side telemetry and identity origination attach here.

use http::HeaderMap;

use crate::handler::ConnInfo;

pub(crate) fn on_request(_h: &mut HeaderMap, _conn: &ConnInfo) {}
