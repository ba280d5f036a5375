//! Why a snapshot could not be put in force: which of its resources, and what was wrong with it.
//!
//! A [`BuildError`] becomes the proxy's NACK: its text is the reason, its [`Resource`] says what
//! failed, and `config_source` names the user's resource the part came from (`VirtualService
//! ns/name http[0]`), which the control plane turns into a file and line.

use std::net::SocketAddr;

/// A part of a snapshot that failed to build, and the problem with it.
#[derive(Debug, thiserror::Error)]
#[error("{resource}: {problem}")]
pub struct BuildError {
    pub resource: Resource,
    pub problem: Problem,
}

/// The part of a snapshot that failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    Cluster {
        name: String,
        /// The DestinationRule whose policies it carries.
        source: Option<String>,
    },
    Route {
        table: String,
        route: String,
        /// The VirtualService rule it came from.
        source: Option<String>,
    },
    Listener(String),
    /// The TLS of a gateway listener.
    GatewayServer {
        listener: String,
        /// The Gateway server: `Gateway ns/name servers[i]`.
        source: Option<String>,
    },
    /// A RequestAuthentication rule, by issuer.
    JwtRule(String),
    /// A local rate limit, by the `Kind namespace/name` it came from.
    RateLimit(String),
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::Cluster { name, .. } => write!(f, "cluster {name}"),
            Resource::Route { table, route, .. } => write!(f, "route table {table}, route {route}"),
            Resource::Listener(l) => write!(f, "listener {l}"),
            Resource::GatewayServer { listener, .. } => write!(f, "TLS of listener {listener}"),
            Resource::JwtRule(issuer) => write!(f, "JWT rule for issuer {issuer}"),
            Resource::RateLimit(name) => write!(f, "rate limit of {name}"),
        }
    }
}

impl Resource {
    /// The user's resource this part came from, as findings name it (`Kind namespace/name`,
    /// with the rule's index when known).
    pub fn config_source(&self) -> Option<&str> {
        match self {
            Resource::Route { source, .. }
            | Resource::Cluster { source, .. }
            | Resource::GatewayServer { source, .. } => source.as_deref(),
            Resource::RateLimit(name) => Some(name),
            _ => None,
        }
    }
}

/// What was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("unknown cluster {0}")]
    UnknownCluster(String),
    #[error("unknown route table {0}")]
    UnknownRouteTable(String),
    #[error("a forward route without destinations")]
    NoDestinations,
    #[error("invalid regex {pattern:?}: {source}")]
    Regex { pattern: String, source: Box<regex::Error> },
    #[error("invalid header name {0:?}")]
    HeaderName(String),
    #[error("invalid value for header {0:?}")]
    HeaderValue(String),
    #[error("invalid status {0}")]
    Status(u16),
    #[error("invalid authority rewrite {0:?}")]
    Authority(String),
    #[error("corsPolicy: {0:?} is not a valid header value")]
    CorsValue(String),
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid PEM in {path}: {reason}")]
    Pem { path: String, reason: String },
    #[error("MUTUAL TLS needs both clientCertificate and privateKey")]
    IncompleteClientCertificate,
    #[error("invalid server name {0:?}")]
    ServerName(String),
    #[error("invalid SPIFFE identity {id:?}: {reason}")]
    Identity { id: String, reason: String },
    #[error("TLS settings: {0}")]
    Tls(String),
    #[error("invalid jwks: {0}")]
    Jwks(String),
    #[error("neither jwks nor jwksUri")]
    NoKeys,
    #[error("cannot bind {address}: {source}")]
    Bind { address: SocketAddr, source: std::io::Error },
}

impl Problem {
    /// This problem, in `resource`.
    pub fn at(self, resource: Resource) -> BuildError {
        BuildError { resource, problem: self }
    }

    pub fn regex(pattern: &str, e: regex::Error) -> Problem {
        Problem::Regex { pattern: pattern.to_string(), source: Box::new(e) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_names_the_part_and_the_problem_and_the_source_is_kept_apart() {
        let e = Problem::UnknownCluster("outbound|80||ghost".into()).at(Resource::Route {
            table: "outbound|80".into(),
            route: "reviews.default.0".into(),
            source: Some("VirtualService default/reviews http[0]".into()),
        });
        assert_eq!(
            e.to_string(),
            "route table outbound|80, route reviews.default.0: unknown cluster outbound|80||ghost"
        );
        assert_eq!(e.resource.config_source(), Some("VirtualService default/reviews http[0]"));
        assert_eq!(Problem::NoKeys.at(Resource::JwtRule("https://idp".into())).resource.config_source(), None);
    }
}
