//! Negative status conditions (Istio's IST0171): a resource exported from a cluster with its
//! `status` may carry a condition that says it is not in force. As `istioctl analyze` does,
//! the condition types that matter are checked per kind, and a `False` one is reported.

use crate::finding::{Code, Finding};
use crate::model::{Kind, Resource};
use crate::path;
use crate::yaml::{Node, Seg};

pub(crate) fn run(resources: &[Resource]) -> Vec<Finding> {
    let mut out = Vec::new();
    for r in resources {
        let types: &[&str] = match r.kind {
            Kind::Service | Kind::ServiceEntry | Kind::WorkloadEntry => &["istio.io/WaypointBound"],
            Kind::AuthorizationPolicy => &["ZtunnelAccepted", "WaypointAccepted"],
            Kind::GatewayApiGateway | Kind::HttpRoute | Kind::GrpcRoute => &["Accepted", "Programmed", "ResolvedRefs"],
            _ => continue,
        };
        let Some(status) = r.source.doc.get("status") else { continue };
        // Routes keep their conditions per parent; the rest at the top of `status`.
        let mut lists: Vec<(Vec<Seg>, &Node)> = Vec::new();
        if matches!(r.kind, Kind::HttpRoute | Kind::GrpcRoute) {
            for (i, parent) in status.get("parents").map_or(&[][..], Node::items).iter().enumerate() {
                if let Some(c) = parent.get("conditions") {
                    lists.push((path!["status", "parents", i, "conditions"], c));
                }
            }
        } else if let Some(c) = status.get("conditions") {
            lists.push((path!["status", "conditions"], c));
        }
        for (at, conditions) in lists {
            for (i, c) in conditions.items().iter().enumerate() {
                let field = |k: &str| c.get(k).and_then(Node::as_str).unwrap_or("");
                let ty = field("type");
                let negative = types.contains(&ty) && field("status") == "False";
                // A waypoint that accepted only part of a policy says so in the reason.
                let partial = r.kind == Kind::AuthorizationPolicy
                    && ty == "WaypointAccepted"
                    && field("reason") == "PartiallyInvalid";
                if negative || partial {
                    out.push(Finding::at(
                        Code::NegativeConditionStatus,
                        r,
                        &[at.clone(), path![i]].concat(),
                        format!(
                            "a condition with a negative status is present: type={ty}, reason={}, message={}",
                            field("reason"),
                            field("message")
                        ),
                    ));
                }
            }
        }
    }
    out
}
