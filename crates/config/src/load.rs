//! Reading config: files and directories of multi-document YAML into [`Resource`]s.
//!
//! Loading never stops at the first problem: every document that can be read is kept, and every
//! one that cannot becomes a positioned finding, so one run shows everything wrong.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::finding::{Code, Finding};
use crate::model::{kube, networking, security, Kind, ObjectMeta, Resource, Source, Spec};
use crate::yaml::{self, Node, Seg};

/// Resources read from a cluster carry a pseudo file name, `k8s:Kind/namespace/name`, so their
/// findings say where they came from as file findings do.
pub const CLUSTER_SOURCE_PREFIX: &str = "k8s:";

/// The pseudo file name of a cluster resource.
pub fn cluster_source(kind: &str, namespace: &str, name: &str) -> PathBuf {
    PathBuf::from(format!("{CLUSTER_SOURCE_PREFIX}{kind}/{namespace}/{name}"))
}

/// Whether `file` names a cluster resource (see [`cluster_source`]).
pub fn is_cluster_source(file: &Path) -> bool {
    file.to_str().is_some_and(|f| f.starts_with(CLUSTER_SOURCE_PREFIX))
}

/// Resources read, and what was wrong with the rest.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub resources: Vec<Resource>,
    pub findings: Vec<Finding>,
    /// Every file read, in order (for watchers).
    pub files: Vec<PathBuf>,
}

/// Lists the YAML files under `paths`: files as given; a directory's `*.yaml`, `*.yml` and
/// `*.json` files in name order, skipping hidden entries, and its subdirectories only when
/// `recursive` (as `kubectl apply -f DIR` and `-R`).
pub fn list_files(paths: &[PathBuf], recursive: bool) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, recursive, &mut out)?;
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let path = e.path();
        if path.is_dir() {
            if recursive {
                walk(&path, recursive, out)?;
            }
        } else if name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json") {
            out.push(path);
        }
    }
    Ok(())
}

/// Loads every file under `paths` (see [`list_files`]).
pub fn load_paths(paths: &[PathBuf], recursive: bool) -> Loaded {
    let mut loaded = Loaded::default();
    let files = match list_files(paths, recursive) {
        Ok(f) => f,
        Err(e) => {
            let shown = paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
            loaded.findings.push(Finding::new(Code::Unreadable, format!("cannot read {shown}: {e}")));
            return loaded;
        }
    };
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => load_str_into(&mut loaded, &file, &text),
            Err(e) => loaded.findings.push(
                Finding::new(Code::Unreadable, format!("cannot read file: {e}")).in_file(Arc::new(file.clone()), None),
            ),
        }
        loaded.files.push(file);
    }
    loaded
}

/// Loads `paths`, then the files of `overlays` in order, each resource of a later file
/// replacing the one with the same kind, namespace and name before it (what `trellis apply`
/// does to a running mesh, as `kubectl apply` does to a cluster).
pub fn load_layered(paths: &[PathBuf], recursive: bool, overlays: &[PathBuf]) -> Loaded {
    let mut loaded = load_paths(paths, recursive);
    for file in overlays {
        let top = load_paths(std::slice::from_ref(file), false);
        overlay(&mut loaded, top);
    }
    loaded
}

/// Puts `top` over `base`: `top`'s resources replace `base`'s with the same id.
pub fn overlay(base: &mut Loaded, top: Loaded) {
    let ids: std::collections::HashSet<String> = top.resources.iter().map(Resource::id).collect();
    base.resources.retain(|r| !ids.contains(&r.id()));
    base.resources.extend(top.resources);
    base.findings.extend(top.findings);
    base.files.extend(top.files);
}

/// Loads one file's text, as if read from `file`.
pub fn load_str(file: &Path, text: &str) -> Loaded {
    let mut loaded = Loaded::default();
    load_str_into(&mut loaded, file, text);
    loaded.files.push(file.to_path_buf());
    loaded
}

fn load_str_into(loaded: &mut Loaded, file: &Path, text: &str) {
    let file = Arc::new(file.to_path_buf());
    let docs = match yaml::parse_documents(text) {
        Ok(d) => d,
        Err(e) => {
            loaded.findings.push(
                Finding::new(Code::YamlSyntax, format!("invalid YAML: {}", e.message)).in_file(file, Some(e.pos)),
            );
            return;
        }
    };
    for doc in docs {
        match decode_resource(file.clone(), Arc::new(doc), &mut loaded.findings) {
            Some(r) => loaded.resources.push(r),
            None => continue,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<S> {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default = "Option::default")]
    spec: Option<S>,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SliceDoc {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(flatten)]
    slice: kube::EndpointSlice,
}

fn decode_resource(file: Arc<PathBuf>, doc: Arc<Node>, findings: &mut Vec<Finding>) -> Option<Resource> {
    let schema = |pos, msg: String| Finding::new(Code::Schema, msg).in_file(file.clone(), Some(pos));
    if !matches!(doc.value, yaml::Value::Map(_)) {
        findings.push(schema(
            doc.pos,
            format!("expected a resource (a map with apiVersion and kind), found {}", doc.describe()),
        ));
        return None;
    }
    let field = |name: &str| doc.get(name).and_then(|n| n.as_str()).map(str::to_string);
    let (Some(api_version), Some(kind_name)) = (field("apiVersion"), field("kind")) else {
        let missing = if field("apiVersion").is_none() { "apiVersion" } else { "kind" };
        findings.push(schema(doc.pos, format!("missing required field `{missing}`")));
        return None;
    };
    let kind = match Kind::resolve(&api_version, &kind_name) {
        Ok(k) => k,
        Err(msg) => {
            let pos = doc.get("kind").map(|n| n.pos).unwrap_or(doc.pos);
            findings.push(Finding::new(Code::UnsupportedKind, msg).in_file(file.clone(), Some(pos)));
            return None;
        }
    };

    let mut unknown: Vec<Vec<Seg>> = Vec::new();
    let decoded: Result<(ObjectMeta, Option<Spec>), yaml::DeError> = match kind {
        Kind::Gateway => decode_as::<networking::Gateway>(&doc, &mut unknown, Spec::Gateway),
        Kind::VirtualService => decode_as::<networking::VirtualService>(&doc, &mut unknown, Spec::VirtualService),
        Kind::DestinationRule => decode_as::<networking::DestinationRule>(&doc, &mut unknown, Spec::DestinationRule),
        Kind::ServiceEntry => decode_as::<networking::ServiceEntry>(&doc, &mut unknown, Spec::ServiceEntry),
        Kind::WorkloadEntry => decode_as::<networking::WorkloadEntry>(&doc, &mut unknown, Spec::WorkloadEntry),
        Kind::Service => decode_as::<kube::Service>(&doc, &mut unknown, Spec::Service),
        Kind::Workload => decode_as::<crate::model::trellis::Workload>(&doc, &mut unknown, Spec::Workload),
        Kind::RateLimit => decode_as::<crate::model::trellis::RateLimit>(&doc, &mut unknown, Spec::RateLimit),
        Kind::EnvoyFilter => decode_as::<networking::EnvoyFilter>(&doc, &mut unknown, Spec::EnvoyFilter),
        Kind::Sidecar => decode_as::<networking::Sidecar>(&doc, &mut unknown, Spec::Sidecar),
        Kind::Telemetry => decode_as::<crate::model::telemetry::Telemetry>(&doc, &mut unknown, Spec::Telemetry),
        Kind::PeerAuthentication => {
            decode_as::<security::PeerAuthentication>(&doc, &mut unknown, Spec::PeerAuthentication)
        }
        Kind::AuthorizationPolicy => {
            decode_as::<security::AuthorizationPolicy>(&doc, &mut unknown, Spec::AuthorizationPolicy)
        }
        Kind::RequestAuthentication => {
            decode_as::<security::RequestAuthentication>(&doc, &mut unknown, Spec::RequestAuthentication)
        }
        // Kinds that run pods: only their pod template is read, and nothing else is reported as
        // unknown (the API server owns their schema).
        k if k.runs_pods() => yaml::decode::<Envelope<serde_json::Value>>(&doc, |p| unknown.push(p)).map(|env| {
            let spec = env.spec.unwrap_or_default();
            let template = kube::PodTemplate::from_spec(k, &spec, &env.metadata.labels);
            (env.metadata, Some(Spec::PodTemplate(template)))
        }),
        k @ (Kind::GatewayApiGateway | Kind::HttpRoute | Kind::GrpcRoute) => {
            yaml::decode::<Envelope<serde_json::Value>>(&doc, |p| unknown.push(p)).and_then(|env| {
                let spec = env.spec.unwrap_or_default();
                let ns = env.metadata.namespace.as_deref().unwrap_or(crate::model::DEFAULT_NAMESPACE);
                let istio = match k {
                    Kind::GatewayApiGateway => crate::gateway_api::gateway(&env.metadata.name, &spec),
                    _ => crate::gateway_api::route(ns, &spec, k == Kind::GrpcRoute),
                };
                let translated = match k {
                    Kind::GatewayApiGateway => serde_json::from_value(istio).map(Spec::Gateway),
                    _ => serde_json::from_value(istio).map(Spec::VirtualService),
                };
                let spec = translated.map_err(|e| yaml::DeError { message: e.to_string(), pos: None })?;
                Ok((env.metadata, Some(spec)))
            })
        }
        // No `spec`: its fields are at the top level.
        Kind::EndpointSlice => yaml::decode::<SliceDoc>(&doc, |p| unknown.push(p))
            .map(|d| (d.metadata, Some(Spec::EndpointSlice(d.slice)))),
        _ => decode_as::<serde_json::Value>(&doc, &mut unknown, |_| Spec::Metadata),
    };
    let (meta, spec) = match decoded {
        Ok(v) => v,
        Err(e) => {
            let pos = e.pos.unwrap_or(doc.pos);
            findings.push(Finding {
                resource: Some(format!("{kind} {}", resource_label(&doc))),
                path: doc.path_to(pos).filter(|p| !p.is_empty()).map(|p| yaml::path_string(&p)),
                ..schema(pos, format!("invalid {kind}: {}", e.message))
            });
            return None;
        }
    };
    let spec = spec.unwrap_or_else(|| empty_spec(kind));
    let res = Resource { kind, api_version, meta, spec, source: Source { file: file.clone(), doc: doc.clone() } };
    for path in unknown {
        findings.push(Finding::at(
            Code::UnknownField,
            &res,
            &path,
            format!("unknown field `{}` is ignored", yaml::path_string(&path)),
        ));
    }
    if res.meta.name.is_empty() {
        findings.push(Finding::at(
            Code::Schema,
            &res,
            &[Seg::from("metadata")],
            "missing required field `metadata.name`",
        ));
        return None;
    }
    Some(res)
}

fn resource_label(doc: &Node) -> String {
    let meta = doc.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(|n| n.as_str()).unwrap_or("?");
    let ns = meta.and_then(|m| m.get("namespace")).and_then(|n| n.as_str()).unwrap_or(crate::model::DEFAULT_NAMESPACE);
    format!("{ns}/{name}")
}

fn decode_as<'de, S: Deserialize<'de>>(
    doc: &'de Node,
    unknown: &mut Vec<Vec<Seg>>,
    wrap: fn(S) -> Spec,
) -> Result<(ObjectMeta, Option<Spec>), yaml::DeError> {
    let env: Envelope<S> = yaml::decode(doc, |p| unknown.push(p))?;
    Ok((env.metadata, env.spec.map(wrap)))
}

fn empty_spec(kind: Kind) -> Spec {
    match kind {
        Kind::Gateway => Spec::Gateway(Default::default()),
        Kind::VirtualService => Spec::VirtualService(Default::default()),
        Kind::DestinationRule => Spec::DestinationRule(Default::default()),
        Kind::ServiceEntry => Spec::ServiceEntry(Default::default()),
        Kind::WorkloadEntry => Spec::WorkloadEntry(Default::default()),
        Kind::Service => Spec::Service(Default::default()),
        Kind::Workload => Spec::Workload(Default::default()),
        Kind::RateLimit => Spec::RateLimit(Default::default()),
        Kind::EnvoyFilter => Spec::EnvoyFilter(Default::default()),
        Kind::Sidecar => Spec::Sidecar(Default::default()),
        Kind::Telemetry => Spec::Telemetry(Default::default()),
        Kind::PeerAuthentication => Spec::PeerAuthentication(Default::default()),
        Kind::AuthorizationPolicy => Spec::AuthorizationPolicy(Default::default()),
        Kind::RequestAuthentication => Spec::RequestAuthentication(Default::default()),
        k if k.runs_pods() => Spec::PodTemplate(Default::default()),
        Kind::GatewayApiGateway => Spec::Gateway(Default::default()),
        Kind::HttpRoute | Kind::GrpcRoute => Spec::VirtualService(Default::default()),
        Kind::EndpointSlice => Spec::EndpointSlice(Default::default()),
        _ => Spec::Metadata,
    }
}
