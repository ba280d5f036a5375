//! Gateway direction: the mesh's edge. Requests come from outside, so the gateway records who
//! sent them (`x-forwarded-for`, `x-forwarded-proto`) before routing by its Gateway servers.

use http::HeaderMap;

use crate::handler::ConnInfo;
use crate::http::headers;

pub(crate) fn on_request(h: &mut HeaderMap, conn: &ConnInfo) {
    headers::set_forwarded(h, conn.peer.ip(), "http");
}
