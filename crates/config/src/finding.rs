//! Findings: what `trellis analyze`, the proxy's reload and the control plane report about
//! config. Codes are stable; docs/analyze.md lists each with an example and its Istio equivalent.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::model::Resource;
use crate::yaml::{path_string, Pos, Seg};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Severity {
    Error,
    Warning,
    Info,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "Error",
            Severity::Warning => "Warning",
            Severity::Info => "Info",
        })
    }
}

macro_rules! codes {
    ($($variant:ident = $code:literal, $sev:ident, $title:literal;)*) => {
        /// A stable finding code.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Code { $($variant),* }

        impl Code {
            pub const ALL: &'static [Code] = &[$(Code::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self { $(Code::$variant => $code),* }
            }

            pub fn severity(self) -> Severity {
                match self { $(Code::$variant => Severity::$sev),* }
            }

            /// A short name for the rule.
            pub fn title(self) -> &'static str {
                match self { $(Code::$variant => $title),* }
            }
        }
    };
}

codes! {
    YamlSyntax = "TRL0001", Error, "yaml-syntax";
    Schema = "TRL0002", Error, "schema";
    UnknownField = "TRL0003", Warning, "unknown-field";
    UnsupportedKind = "TRL0004", Warning, "unsupported-kind";
    NotEnforced = "TRL0005", Info, "not-enforced-yet";
    DuplicateResource = "TRL0006", Error, "duplicate-resource";
    Unreadable = "TRL0007", Error, "unreadable-file";
    InvalidRegex = "TRL0101", Error, "invalid-regex";
    WeightsNot100 = "TRL0102", Error, "weights-not-100";
    SubsetNotFound = "TRL0103", Error, "subset-not-found";
    GatewayNotFound = "TRL0104", Error, "gateway-not-found";
    HostNotFound = "TRL0105", Error, "host-not-found";
    ShadowedMatch = "TRL0106", Warning, "shadowed-match";
    DuplicateHost = "TRL0107", Error, "duplicate-host";
    HostNotInGateway = "TRL0108", Warning, "host-not-in-gateway";
    SubsetSelectsNothing = "TRL0109", Warning, "subset-selects-nothing";
    ForeignTrustDomain = "TRL0201", Warning, "principal-in-foreign-trust-domain";
    SelectsNothing = "TRL0202", Warning, "policy-selects-nothing";
    ConflictingPeerAuthentication = "TRL0203", Error, "conflicting-peer-authentication";
    InvalidJwks = "TRL0204", Error, "invalid-jwks";
    GatewaySelectsNothing = "TRL0110", Warning, "gateway-selects-nothing";
    ConflictingGateways = "TRL0111", Error, "conflicting-gateways";
    DestinationPortRequired = "TRL0112", Error, "destination-port-required";
    DestinationPortNotFound = "TRL0113", Error, "destination-port-not-found";
    TlsWithoutCa = "TRL0114", Warning, "tls-without-ca-certificates";
    TlsWithoutCaAtPort = "TRL0115", Warning, "tls-without-ca-certificates-at-port";
    ServiceEntryAddressesRequired = "TRL0116", Warning, "serviceentry-addresses-required";
    ConflictingServiceEntryProtocol = "TRL0117", Warning, "conflicting-serviceentry-protocol";
    UnknownDestinationRuleHost = "TRL0118", Warning, "unknown-destinationrule-host";
    IngressSubsetIgnored = "TRL0119", Warning, "subset-ignored-on-ingress";
    JwtClaimRoutingWithoutRequestAuthentication = "TRL0120", Error, "jwt-claim-routing-without-requestauthentication";
    PortNameConvention = "TRL0121", Info, "port-name-convention";
    Deprecated = "TRL0122", Warning, "deprecated-field";
    ReferencedInternalGateway = "TRL0123", Warning, "referenced-internal-gateway";
    ConflictingTelemetrySelectors = "TRL0301", Error, "conflicting-telemetry-selectors";
    TelemetriesWithoutSelector = "TRL0302", Error, "telemetries-without-selector";
    NamespaceNotInjected = "TRL0401", Info, "namespace-not-injected";
    NamespaceMultipleInjectionLabels = "TRL0402", Warning, "namespace-multiple-injection-labels";
    DeploymentAssociatedToMultipleServices = "TRL0403", Warning, "deployment-in-services-with-different-protocols";
    DeploymentConflictingPorts = "TRL0404", Warning, "deployment-conflicting-ports";
    PodMissingProxy = "TRL0405", Warning, "pod-missing-proxy";
    InvalidApplicationUid = "TRL0406", Warning, "application-uid-1337";
    GatewayPortNotDefinedOnService = "TRL0124", Warning, "gateway-port-not-on-service";
    GatewayDuplicateCertificate = "TRL0125", Warning, "gateway-duplicate-certificate";
    ExternalNamePortName = "TRL0126", Warning, "externalname-port-name";
    IneffectiveSelector = "TRL0205", Warning, "ineffective-selector";
    SchemaWarning = "TRL0008", Warning, "schema-warning";
    NegativeConditionStatus = "TRL0009", Warning, "negative-condition-status";
    MirrorHostNotFound = "TRL0127", Warning, "mirror-host-not-found";
    UnsupportedEnvoyFilter = "TRL0128", Warning, "unsupported-envoyfilter";
    NamespaceNotFound = "TRL0206", Warning, "namespace-not-found";
    UnknownAnnotation = "TRL0501", Warning, "unknown-annotation";
    MisplacedAnnotation = "TRL0502", Warning, "misplaced-annotation";
    InvalidAnnotation = "TRL0503", Warning, "invalid-annotation";
    DeprecatedAnnotation = "TRL0504", Info, "deprecated-annotation";
}

impl Code {
    /// The `istioctl analyze` message this finding corresponds to, when there is one.
    pub fn istio(self) -> Option<&'static str> {
        Some(match self {
            Code::Schema => "IST0106",
            Code::SubsetNotFound | Code::GatewayNotFound | Code::HostNotFound => "IST0101",
            Code::GatewaySelectsNothing | Code::DestinationPortNotFound => "IST0101",
            Code::ShadowedMatch => "IST0130",
            Code::DuplicateHost => "IST0109",
            Code::HostNotInGateway => "IST0132",
            Code::SubsetSelectsNothing => "IST0173",
            Code::SelectsNothing => "IST0127",
            Code::ConflictingGateways => "IST0145",
            Code::DestinationPortRequired => "IST0112",
            Code::TlsWithoutCa => "IST0128",
            Code::TlsWithoutCaAtPort => "IST0129",
            Code::ServiceEntryAddressesRequired => "IST0134",
            Code::ConflictingServiceEntryProtocol => "IST0177",
            Code::UnknownDestinationRuleHost => "IST0174",
            Code::IngressSubsetIgnored => "IST0140",
            Code::JwtClaimRoutingWithoutRequestAuthentication => "IST0149",
            Code::PortNameConvention => "IST0118",
            Code::Deprecated => "IST0002",
            Code::ReferencedInternalGateway => "IST0165",
            Code::ConflictingTelemetrySelectors => "IST0159",
            Code::TelemetriesWithoutSelector => "IST0160",
            Code::NamespaceNotInjected => "IST0102",
            Code::NamespaceMultipleInjectionLabels => "IST0123",
            Code::DeploymentAssociatedToMultipleServices => "IST0116",
            Code::DeploymentConflictingPorts => "IST0137",
            Code::PodMissingProxy => "IST0103",
            Code::InvalidApplicationUid => "IST0144",
            Code::GatewayPortNotDefinedOnService => "IST0162",
            Code::GatewayDuplicateCertificate => "IST0138",
            Code::ExternalNamePortName => "IST0150",
            Code::IneffectiveSelector => "IST0166",
            Code::SchemaWarning => "IST0133",
            Code::NegativeConditionStatus => "IST0171",
            Code::MirrorHostNotFound | Code::NamespaceNotFound => "IST0101",
            Code::UnknownAnnotation => "IST0108",
            Code::MisplacedAnnotation => "IST0107",
            Code::InvalidAnnotation => "IST0125",
            Code::DeprecatedAnnotation => "IST0135",
            _ => return None,
        })
    }
}

impl Code {
    /// Whether the finding is about how a resource relates to others (a host, subset or gateway
    /// it names that does not exist yet, a clash with another resource), rather than about the
    /// resource itself. Admission admits those with a warning: the other resource may be applied
    /// next, as `kubectl apply -f DIR` applies files in name order.
    pub fn refers_to_others(self) -> bool {
        matches!(
            self,
            Code::SubsetNotFound
                | Code::GatewayNotFound
                | Code::HostNotFound
                | Code::DuplicateHost
                | Code::DuplicateResource
                | Code::ConflictingPeerAuthentication
        )
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One finding, located as precisely as the source allows.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Finding {
    pub code: Code,
    pub severity: Severity,
    pub message: String,
    pub file: Option<Arc<PathBuf>>,
    pub line: Option<u32>,
    pub column: Option<u32>,
    /// `Kind namespace/name` of the resource, when the finding is about one.
    pub resource: Option<String>,
    /// The field, as `spec.http[0].route[1].weight`.
    pub path: Option<String>,
    /// The `istioctl analyze` code it corresponds to (`IST0101`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub istio_code: Option<&'static str>,
}

impl Finding {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Finding {
            code,
            severity: code.severity(),
            message: message.into(),
            file: None,
            line: None,
            column: None,
            resource: None,
            path: None,
            istio_code: code.istio(),
        }
    }

    /// A finding about a field of a resource.
    pub fn at(code: Code, res: &Resource, path: &[Seg], message: impl Into<String>) -> Self {
        let mut f = Finding::new(code, message).in_file(res.source.file.clone(), Some(res.pos(path)));
        f.resource = Some(res.id());
        f.path = Some(path_string(path));
        f
    }

    pub fn in_file(mut self, file: Arc<PathBuf>, pos: Option<Pos>) -> Self {
        self.file = Some(file);
        self.line = pos.map(|p| p.line);
        self.column = pos.map(|p| p.column);
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// `file:line:column`, or what of it is known.
    pub fn location(&self) -> String {
        match (&self.file, self.line, self.column) {
            (Some(f), Some(l), Some(c)) => format!("{}:{l}:{c}", f.display()),
            (Some(f), _, _) => f.display().to_string(),
            _ => "-".to_string(),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.istio_code {
            Some(ist) => write!(f, "{} [{} ({ist})] {}", self.severity, self.code, self.location())?,
            None => write!(f, "{} [{}] {}", self.severity, self.code, self.location())?,
        }
        if let Some(r) = &self.resource {
            write!(f, " {r}")?;
        }
        if let Some(p) = &self.path {
            write!(f, " ({p})")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Orders findings by file, line, column, then code, for stable output.
pub fn sort(findings: &mut [Finding]) {
    findings.sort_by(|a, b| {
        (a.file.as_deref(), a.line, a.column, a.code.as_str(), &a.message).cmp(&(
            b.file.as_deref(),
            b.line,
            b.column,
            b.code.as_str(),
            &b.message,
        ))
    });
}

/// `N errors, N warnings, N infos`.
pub fn summary(findings: &[Finding]) -> String {
    let count = |s| findings.iter().filter(|f| f.severity == s).count();
    let plural = |n: usize, w: &str| {
        if n == 1 {
            format!("{n} {w}")
        } else {
            format!("{n} {w}s")
        }
    };
    format!(
        "{}, {}, {}",
        plural(count(Severity::Error), "error"),
        plural(count(Severity::Warning), "warning"),
        plural(count(Severity::Info), "info")
    )
}
