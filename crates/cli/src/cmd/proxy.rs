//! `trellis proxy`: run a gateway or sidecar proxy from config files (static mode).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use trellis_config::compile::{CaptureSpec, InboundSpec, ProxySpec, UpstreamSpec};
use trellis_config::snapshot::{Role, UpstreamProtocol};
use trellis_config::Spec;
use trellis_proxy::source::StaticSource;
use trellis_proxy::Proxy;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Config files or directories (Istio YAML), watched for changes (static mode).
    #[arg(long = "config", short = 'c', required_unless_present = "control_plane", conflicts_with = "control_plane")]
    config: Vec<PathBuf>,
    /// Get config from a control plane at this address instead of files.
    #[arg(long, env = "TRELLIS_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// Also read subdirectories of config directories.
    #[arg(long, short = 'R')]
    recursive: bool,
    /// What this proxy is.
    #[arg(long, value_enum, default_value_t = RoleArg::Sidecar)]
    role: RoleArg,
    /// The workload this sidecar serves (labels and namespace come from its WorkloadEntry when
    /// one has this name), or the gateway's deployment name.
    #[arg(long, visible_alias = "name", default_value = "")]
    workload: String,
    #[arg(long, default_value = "default")]
    namespace: String,
    /// The workload's service account: its identity is
    /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
    #[arg(long, default_value = "default")]
    service_account: String,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Labels of this proxy (`key=value`), matched by Gateway selectors, subsets and sourceLabels.
    /// A gateway without labels gets `istio=ingressgateway`.
    #[arg(long = "label", value_parser = parse_kv)]
    labels: Vec<(String, String)>,
    /// Admin address (/ready, /config_dump, /quitquitquit).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Address gateway listeners bind to.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Serve a Gateway port on another local port: `80=8080`.
    #[arg(long = "port-map", value_parser = parse_port_map)]
    port_map: Vec<(u16, u16)>,
    /// Inbound listener in front of the app: `LISTEN_ADDR=APP_ADDR` (or `PORT=APP_PORT`), with
    /// `,http2` when the app speaks HTTP/2 (gRPC) only.
    #[arg(long = "inbound", value_parser = parse_inbound)]
    inbound: Vec<InboundSpec>,
    /// Outbound HTTP proxy listener for the app's `HTTP_PROXY`.
    #[arg(long)]
    outbound: Option<SocketAddr>,
    /// A local port bound to a named upstream: `LISTEN_ADDR=HOST:PORT`.
    #[arg(long = "upstream", value_parser = parse_upstream)]
    upstreams: Vec<UpstreamSpec>,
    /// How long a client may take to send a request's head before the connection is closed
    /// (slow clients; counted in trellis_proxy_downstream_header_timeouts_total). Default: 10s
    /// for a gateway, which faces the internet, 30s for a sidecar.
    #[arg(long, value_parser = super::parse_duration)]
    header_read_timeout: Option<Duration>,
    /// Bind gateway listeners on port 0 instead of their configured ports; `/config_dump`'s
    /// `active_listeners` shows each bound address (for tests that own the process).
    #[arg(long, hide = true)]
    ephemeral_gateway_ports: bool,
    /// Where Gateway servers' `credentialName`s are: `DIR/<name>/tls.crt`, `tls.key` and, for
    /// MUTUAL, `ca.crt` (or `DIR/<name>-cacert/ca.crt`) — a Kubernetes TLS Secret's keys.
    #[arg(long, env = "TRELLIS_CREDENTIALS_DIR")]
    credentials_dir: Option<std::path::PathBuf>,
    /// How long a drain waits for in-flight requests.
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    drain_timeout: Duration,
    /// Worker threads (default: one per core).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Percentage of new traces to sample (Istio's default is 1); `Telemetry` resources override it.
    #[arg(long, default_value_t = 1.0)]
    trace_sampling: f64,
    /// Trace context formats to write: w3c, b3, b3-single, xray (all are read).
    #[arg(long, default_value = "w3c,b3", value_parser = trellis_telemetry::trace::Formats::parse)]
    trace_formats: trellis_telemetry::trace::Formats,
    /// Export spans over OTLP/HTTP, e.g. http://127.0.0.1:4318/v1/traces (repeatable).
    #[arg(long)]
    otlp_endpoint: Vec<http::Uri>,
    /// Export spans as Zipkin v2 JSON, e.g. http://127.0.0.1:9411/api/v2/spans.
    #[arg(long)]
    zipkin_endpoint: Option<http::Uri>,
    /// Write access logs (JSON lines) to `stdout` or a file; `Telemetry` resources can turn them
    /// on or off.
    #[arg(long)]
    access_log: Option<String>,
    /// Also export access-log lines as OTLP log records over OTLP/HTTP, e.g.
    /// http://127.0.0.1:4318/v1/logs (turns access logs on, as --access-log does).
    #[arg(long)]
    access_log_otlp_endpoint: Option<http::Uri>,
    /// File holding the bootstrap token that proves this workload's identity to the control
    /// plane (default: $TRELLIS_BOOTSTRAP_TOKEN). With one, the proxy gets a certificate and
    /// speaks mesh mTLS. Re-read at every certificate request (a projected token rotates).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Run as the injected sidecar of a Kubernetes Pod: who it is comes from the environment
    /// the injector sets (POD_NAME, POD_NAMESPACE, POD_IP, SERVICE_ACCOUNT, TRELLIS_POD_LABELS),
    /// traffic arrives by transparent capture (`trellis proxy-init`) on the inbound and
    /// outbound capture ports, and the app's probes are served on the admin port
    /// (TRELLIS_APP_PROBERS).
    #[arg(long, requires = "control_plane")]
    kubernetes: bool,
    /// With --kubernetes: the app's container ports (served inbound through the capture port).
    #[arg(long, value_delimiter = ',')]
    app_ports: Vec<u16>,
    /// With --kubernetes: where captured inbound and outbound traffic arrives.
    #[arg(long, default_value = "15006")]
    inbound_capture_port: u16,
    #[arg(long, default_value = "15001")]
    outbound_capture_port: u16,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum RoleArg {
    Sidecar,
    Gateway,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

fn parse_port_map(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('=').ok_or_else(|| format!("expected GATEWAY_PORT=LOCAL_PORT, got {s:?}"))?;
    Ok((a.parse().map_err(|_| format!("bad port {a:?}"))?, b.parse().map_err(|_| format!("bad port {b:?}"))?))
}

fn addr_or_port(s: &str) -> Result<SocketAddr, String> {
    if let Ok(p) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], p)));
    }
    s.parse().map_err(|_| format!("expected ADDRESS:PORT or PORT, got {s:?}"))
}

fn parse_inbound(s: &str) -> Result<InboundSpec, String> {
    let (l, a) = s.split_once('=').ok_or_else(|| format!("expected LISTEN=APP[,http1|http2|tcp], got {s:?}"))?;
    let (a, protocol) = match a.split_once(',') {
        Some((a, "http2")) => (a, Some(UpstreamProtocol::Http2)),
        Some((a, "http1")) => (a, Some(UpstreamProtocol::Http1)),
        Some((a, "tcp")) => (a, Some(UpstreamProtocol::Tcp)),
        Some((_, p)) => return Err(format!("unknown app protocol {p:?}: use http1, http2 or tcp")),
        None => (a, None),
    };
    Ok(InboundSpec { listen: addr_or_port(l)?, app: addr_or_port(a)?, protocol })
}

fn parse_upstream(s: &str) -> Result<UpstreamSpec, String> {
    let (l, target) = s.split_once('=').ok_or_else(|| format!("expected LISTEN=HOST:PORT, got {s:?}"))?;
    let (host, port) = target.rsplit_once(':').ok_or_else(|| format!("expected HOST:PORT, got {target:?}"))?;
    Ok(UpstreamSpec {
        listen: addr_or_port(l)?,
        host: host.to_string(),
        port: port.parse().map_err(|_| format!("bad port {port:?}"))?,
    })
}

pub fn run(args: Args) -> ExitCode {
    super::init_logging("info");
    // One worker (asked for, or all the CPU this process may use: its affinity mask and cgroup
    // quota, which `available_parallelism` reads): a current-thread runtime — no work stealing,
    // no cross-thread wake-ups, no idle worker parking; more: the multi-threaded one.
    let workers = args.concurrency.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut rt = match workers {
        0 | 1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    rt.enable_all();
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The sidecar of a Kubernetes Pod, from the environment the injector gives it.
fn pod_spec(args: &Args) -> Result<ProxySpec> {
    let env = |name: &str| std::env::var(name).map_err(|_| anyhow!("{name} is not set (the injector sets it)"));
    let pod = env("POD_NAME")?;
    let namespace = env("POD_NAMESPACE")?;
    let ip: IpAddr = env("POD_IP")?.parse().context("POD_IP")?;
    let labels: BTreeMap<String, String> = match std::env::var("TRELLIS_POD_LABELS") {
        Ok(text) if !text.is_empty() => serde_json::from_str(&text).context("TRELLIS_POD_LABELS")?,
        _ => BTreeMap::new(),
    };
    // Named from the Pod's own labels: a Pod whose labels the proxy is not told (a gateway
    // Deployment's, with only `--label`s) is named from its Pod name's shape.
    let name = workload_name(&pod, &labels);
    let mut labels = labels;
    labels.extend(args.labels.iter().cloned());
    let any = IpAddr::from([0, 0, 0, 0]);
    let inbound = SocketAddr::new(any, args.inbound_capture_port);
    let service_account =
        std::env::var("SERVICE_ACCOUNT").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into());
    // The admin address others can reach (status, Prometheus): the Pod's IP when it listens on
    // every address.
    let admin = if args.admin.ip().is_unspecified() { SocketAddr::new(ip, args.admin.port()) } else { args.admin };
    let mut spec = ProxySpec {
        admin: Some(admin),
        service_account,
        trust_domain: args.trust_domain.clone(),
        role: Role::Sidecar,
        name,
        namespace,
        labels,
        bind_address: ip,
        port_map: BTreeMap::new(),
        inbound: args
            .app_ports
            .iter()
            .map(|p| InboundSpec { listen: inbound, app: SocketAddr::new(ip, *p), protocol: None })
            .collect(),
        outbound: None,
        upstreams: Vec::new(),
        capture: Some(CaptureSpec { inbound, outbound: SocketAddr::new(any, args.outbound_capture_port) }),
        instance: Some(pod),
    };
    if matches!(args.role, RoleArg::Gateway) {
        // A gateway Pod: not captured; its Gateway servers listen on every address of the Pod.
        spec.role = Role::Gateway;
        spec.bind_address = any;
        spec.port_map = args.port_map.iter().copied().collect();
        spec.inbound.clear();
        spec.capture = None;
    }
    Ok(spec)
}

/// The workload a Pod belongs to, as Istio names it: a Deployment's Pod
/// `reviews-v1-5d8f7c9b4-x2x7q` (label `pod-template-hash: 5d8f7c9b4`) is `reviews-v1`; a Pod of
/// another controller loses its generated suffix; a bare Pod keeps its name.
fn workload_name(pod: &str, labels: &BTreeMap<String, String>) -> String {
    if let Some(hash) = labels.get("pod-template-hash") {
        if let Some((name, _)) = pod.split_once(&format!("-{hash}-")) {
            return name.to_string();
        }
    }
    // Without labels (a Pod not injected): a Deployment's Pod name ends in `-<hash>-<5 chars>`.
    if labels.is_empty() {
        let parts: Vec<&str> = pod.rsplitn(3, '-').collect();
        if let [last, hash, name] = parts.as_slice() {
            let alnum = |s: &str| s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
            if last.len() == 5 && (6..=10).contains(&hash.len()) && alnum(last) && alnum(hash) {
                return name.to_string();
            }
        }
    }
    for key in ["controller-revision-hash", "batch.kubernetes.io/controller-uid"] {
        if labels.contains_key(key) {
            if let Some((name, _)) = pod.rsplit_once('-') {
                return name.to_string();
            }
        }
    }
    pod.to_string()
}

fn proxy_spec(args: &Args) -> Result<ProxySpec> {
    if args.kubernetes {
        return pod_spec(args);
    }
    let role = match args.role {
        RoleArg::Sidecar => Role::Sidecar,
        RoleArg::Gateway => Role::Gateway,
    };
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    let mut namespace = args.namespace.clone();
    if role == Role::Sidecar && !args.workload.is_empty() && !args.config.is_empty() {
        // Labels and namespace of the workload's own WorkloadEntry, if the config has one.
        let loaded = trellis_config::load_paths(&args.config, args.recursive);
        if let Some(r) =
            loaded.resources.iter().find(|r| matches!(r.spec, Spec::WorkloadEntry(_)) && r.name() == args.workload)
        {
            if let Spec::WorkloadEntry(we) = &r.spec {
                labels.extend(we.labels.clone());
            }
            namespace = r.namespace().to_string();
        }
    }
    labels.extend(args.labels.iter().cloned());
    if role == Role::Gateway && labels.is_empty() {
        labels.insert("istio".into(), "ingressgateway".into());
    }
    if role == Role::Sidecar && args.inbound.is_empty() && args.outbound.is_none() && args.upstreams.is_empty() {
        bail!("a sidecar needs at least one of --inbound, --outbound or --upstream");
    }
    Ok(ProxySpec {
        admin: Some(args.admin),
        service_account: args.service_account.clone(),
        trust_domain: args.trust_domain.clone(),
        role,
        name: args.workload.clone(),
        namespace,
        labels,
        bind_address: args.bind,
        port_map: args.port_map.iter().copied().collect(),
        inbound: args.inbound.clone(),
        outbound: args.outbound,
        upstreams: args.upstreams.clone(),
        capture: None,
        instance: None,
    })
}

/// A gateway's header read timeout: what HAProxy's `timeout http-request` is usually set to.
const GATEWAY_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

async fn serve(args: Args) -> Result<()> {
    let spec = proxy_spec(&args)?;
    let telemetry = trellis_proxy::telemetry::TelemetryOptions {
        sampling_percent: args.trace_sampling.clamp(0.0, 100.0),
        formats: args.trace_formats,
        export: trellis_telemetry::export::ExportConfig {
            otlp: args.otlp_endpoint.clone(),
            zipkin: args.zipkin_endpoint.clone(),
        },
        access_log: args.access_log.is_some() || args.access_log_otlp_endpoint.is_some(),
        access_log_sink: match (&args.access_log, &args.access_log_otlp_endpoint) {
            (Some(s), _) => Some(trellis_telemetry::access_log::Sink::parse(s)),
            (None, Some(_)) => None,
            (None, None) => Some(trellis_telemetry::access_log::Sink::Stdout),
        },
        access_log_otlp: args.access_log_otlp_endpoint.clone(),
    };
    // An identity (mesh mTLS) when a bootstrap token proves one to the control plane.
    let token = match &args.token_file {
        Some(f) => {
            std::fs::metadata(f).with_context(|| format!("cannot read {}", f.display()))?;
            Some(trellis_proxy::identity::Token::File(f.clone()))
        }
        None => std::env::var("TRELLIS_BOOTSTRAP_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .map(trellis_proxy::identity::Token::Value),
    };
    let stream_token = token.clone();
    let identity = match (&args.control_plane, token) {
        (Some(cp), Some(token)) => {
            let store = std::sync::Arc::new(trellis_identity::tls::CredentialStore::default());
            let id = trellis_identity::SpiffeId::new(&spec.trust_domain, &spec.namespace, &spec.service_account);
            Some((store, cp.clone(), token, id))
        }
        _ => None,
    };
    let probers = match (args.kubernetes, std::env::var("TRELLIS_APP_PROBERS")) {
        (true, Ok(json)) if !json.trim().is_empty() => {
            trellis_proxy::admin::AppProbers::parse(&json, spec.bind_address).map_err(|e| anyhow!(e))?
        }
        _ => trellis_proxy::admin::AppProbers::default(),
    };
    let header_read_timeout = args.header_read_timeout.unwrap_or(match spec.role {
        Role::Gateway => GATEWAY_HEADER_READ_TIMEOUT,
        Role::Sidecar => trellis_proxy::state::DEFAULT_HEADER_READ_TIMEOUT,
    });
    let proxy = Proxy::with_options(trellis_proxy::ProxyOptions {
        telemetry,
        identity: identity.as_ref().map(|(s, ..)| s.clone()),
        header_read_timeout,
        ephemeral_gateway_ports: args.ephemeral_gateway_ports,
        credentials_dir: args.credentials_dir.clone(),
    })
    .map_err(|e| anyhow!(e))?;
    if let Some((store, cp, token, id)) = identity {
        tokio::spawn(trellis_proxy::identity::run(store, cp, token, id, proxy.shared().clone()));
    }
    if let Some(cp) = &args.control_plane {
        // Control-plane mode: admin first (so /ready can say "not yet"), then connect.
        let admin = trellis_proxy::admin::serve(proxy.clone(), args.admin, probers.clone())
            .await
            .with_context(|| format!("cannot bind admin address {}", args.admin))?;
        proxy.shared().update_status(|s| s.source = "control-plane".into());
        // An admin port the kernel chose (`--admin 127.0.0.1:0`): tell the control plane the
        // one bound, so `trellis status` and the console reach it.
        let mut spec = spec;
        if let Some(a) = spec.admin.as_mut().filter(|a| a.port() == 0) {
            a.set_port(admin.port());
        }
        tracing::info!(admin = %admin, control_plane = %cp, proxy = %trellis_proxy::control_client::proxy_id(&spec), "proxy started; waiting for config");
        tokio::spawn(trellis_proxy::control_client::run(proxy.clone(), cp.clone(), spec, stream_token));
    } else {
        let source = StaticSource { paths: args.config.clone(), recursive: args.recursive, spec };
        let (snap, _warnings) = source.load().map_err(|findings| {
            for f in findings.iter().filter(|f| f.is_error()) {
                eprintln!("{f}");
            }
            anyhow!("config has errors; not starting (run `trellis analyze` for details)")
        })?;
        let admin = trellis_proxy::admin::serve(proxy.clone(), args.admin, probers.clone())
            .await
            .with_context(|| format!("cannot bind admin address {}", args.admin))?;
        proxy.shared().update_status(|s| s.source = "file".into());
        proxy.apply(snap).await.map_err(|e| anyhow!(e))?;
        source.clone().watch(proxy.clone()).context("cannot watch config files")?;
        tracing::info!(admin = %admin, version = %proxy.shared().runtime().version(), "proxy ready");
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; draining"),
        _ = term.recv() => tracing::info!("terminated; draining"),
        _ = proxy.shared().drain.started() => tracing::info!("drain requested; draining"),
    }
    let left = proxy.drain(args.drain_timeout).await;
    tracing::info!(left, "drained; exiting");
    Ok(())
}
