//! `trellis control`: run the control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use trellis_control::ConfigStore;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Config files or directories, watched for changes.
    #[arg(long = "config", short = 'c', required_unless_present = "kubernetes")]
    config: Vec<PathBuf>,
    /// Read Services, Pods and the Istio kinds from a Kubernetes API server (the cluster of
    /// `KUBECONFIG`, `~/.kube/config`, or the Pod's own when running in one), besides any
    /// `--config` files.
    #[arg(long)]
    kubernetes: bool,
    /// Also read subdirectories of config directories.
    #[arg(long, short = 'R')]
    recursive: bool,
    /// A directory whose files are put over the config, in name order: each resource there
    /// replaces the one with the same kind, namespace and name (where `trellis apply` writes).
    #[arg(long)]
    overlay: Option<PathBuf>,
    /// Address of the control-plane API.
    #[arg(long, default_value = trellis_control::DEFAULT_ADDR)]
    listen: SocketAddr,
    /// The certificate authority's directory: generated there on first start, or Istio-style
    /// plug-in CA files put there (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem).
    #[arg(long, default_value = ".trellis/ca")]
    ca_dir: PathBuf,
    /// Lifetime of workload certificates (rotated at ~80%).
    #[arg(long, default_value = "24h", value_parser = super::parse_duration)]
    cert_ttl: std::time::Duration,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Bootstrap tokens: which identity each workload's token proves (JSON). Without it (and
    /// without --kubernetes, where tokens are checked with a TokenReview), no certificate is issued.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// With --kubernetes: the audience a Pod's service-account token must be minted for.
    #[arg(long, default_value = trellis_kube::identity::AUDIENCE)]
    token_audience: String,
    /// Serve the admission webhooks (POST /validate, /inject) over HTTPS here, with a
    /// certificate from the mesh CA for --webhook-name (the CA's root is the webhooks' caBundle:
    /// <ca-dir>/root-cert.pem).
    #[arg(long)]
    webhook_listen: Option<SocketAddr>,
    /// DNS names of the webhook certificate (the control plane's Service).
    #[arg(long = "webhook-name", default_values_t = ["trellis-control.trellis-system.svc".to_string()])]
    webhook_names: Vec<String>,
    /// With --kubernetes: keep the CA in this Secret (`namespace/name`): restored into --ca-dir
    /// at start, created from it on first start.
    #[arg(long)]
    ca_secret: Option<String>,
    /// With --kubernetes: webhook configurations (mutating or validating) whose caBundle is set
    /// to the mesh CA's root at start.
    #[arg(long = "webhook-config")]
    webhook_configs: Vec<String>,
    /// The image injected sidecars run.
    #[arg(long, default_value = "ghcr.io/trellis-mesh/trellis:latest")]
    proxy_image: String,
    /// Where injected sidecars reach this control plane.
    #[arg(long, default_value = "trellis-control.trellis-system.svc:15010")]
    injected_control_plane: String,
    /// Where injected sidecars reach this control plane's console (`host:port`), to send it
    /// spans and access-log lines; without it they send none.
    #[arg(long)]
    injected_console: Option<String>,
    /// Outbound ports injected sidecars never capture (comma-separated).
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Outbound CIDRs injected sidecars never capture (comma-separated).
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_cidrs: Vec<String>,
    /// Serve the console (service graph, traces, golden metrics, config) here; proxies send
    /// it spans (`--otlp-endpoint http://ADDR/v1/traces`) and access logs
    /// (`--access-log-otlp-endpoint http://ADDR/v1/logs`), and it reads their metrics.
    #[arg(long)]
    console: Option<SocketAddr>,
    /// The console's bound on stored spans, in MiB.
    #[arg(long, default_value_t = 64)]
    console_spans_mib: usize,
    /// The console's bound on stored access-log lines, in MiB.
    #[arg(long, default_value_t = 32)]
    console_logs_mib: usize,
    /// The console's bound on stored metric samples, in MiB.
    #[arg(long, default_value_t = 16)]
    console_metrics_mib: usize,
    /// How often the console reads every connected proxy's metrics.
    #[arg(long, default_value = "2s", value_parser = super::parse_duration)]
    console_scrape_interval: std::time::Duration,
}

pub fn run(args: Args) -> ExitCode {
    super::init_logging("info");
    super::block_on(serve(args))
}

async fn serve(args: Args) -> Result<()> {
    let store = ConfigStore::layered(args.config.clone(), args.recursive, args.overlay.clone());
    // A config with errors is reported; the control plane still starts and pushes nothing until
    // a good config is on disk, so proxies keep serving what they have.
    if !args.config.is_empty() {
        let _ = store.reload();
    }
    let _watch = store.watch().context("cannot watch config files")?;
    let kube_client = if args.kubernetes { Some(trellis_kube::client().await?) } else { None };
    let _cluster = if let Some(client) = kube_client.clone() {
        let store = store.clone();
        Some(tokio::spawn(async move {
            if let Err(e) = trellis_kube::run(client, store).await {
                tracing::error!("the cluster source stopped: {e}");
            }
        }))
    } else {
        None
    };
    let ca_secret = match (&args.ca_secret, &kube_client) {
        (Some(s), Some(client)) => {
            let (ns, name) = s.split_once('/').context("--ca-secret is NAMESPACE/NAME")?;
            let restored = trellis_kube::bootstrap::restore_ca(client, ns, name, &args.ca_dir)
                .await
                .map_err(anyhow::Error::msg)?;
            Some((client.clone(), ns.to_string(), name.to_string(), restored))
        }
        (Some(_), None) => anyhow::bail!("--ca-secret needs --kubernetes"),
        _ => None,
    };
    let ca =
        trellis_identity::ca::CertificateAuthority::load_or_generate(&args.ca_dir, &args.trust_domain, args.cert_ttl)
            .with_context(|| format!("certificate authority in {}", args.ca_dir.display()))?;
    if let Some((client, ns, name, false)) = &ca_secret {
        trellis_kube::bootstrap::save_ca(client, ns, name, &args.ca_dir).await.map_err(anyhow::Error::msg)?;
    }
    if let (Some(client), false) = (&kube_client, args.webhook_configs.is_empty()) {
        trellis_kube::bootstrap::patch_ca_bundles(client, &args.webhook_configs, ca.bundle_pem())
            .await
            .map_err(anyhow::Error::msg)?;
    }
    // Who a caller is: the tokens file (local mode), else on a cluster the API server's
    // TokenReview of the Pod's projected service-account token.
    let authenticator: Option<Box<dyn trellis_control::ca::Authenticator>> = match (&args.tokens, &kube_client) {
        (Some(path), _) => Some(Box::new(trellis_control::ca::TokensFileAuthenticator { path: path.clone() })),
        (None, Some(client)) => Some(Box::new(trellis_kube::identity::TokenReviewer::new(
            client.clone(),
            vec![args.token_audience.clone()],
        ))),
        (None, None) => None,
    };
    let certificates = std::sync::Arc::new(trellis_control::ca::CertificateService { ca, authenticator });
    let _webhooks = match args.webhook_listen {
        Some(addr) => {
            let ips: Vec<std::net::IpAddr> = vec![addr.ip()].into_iter().filter(|ip| !ip.is_unspecified()).collect();
            let (chain, key) = certificates
                .ca
                .serving_certificate(&args.webhook_names, &ips)
                .context("cannot issue the webhook certificate")?;
            let tls = trellis_identity::tls::simple_server(&chain, &key).context("webhook TLS")?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (webhooks)"))?;
            let injector = trellis_kube::inject::Injector {
                image: args.proxy_image.clone(),
                control_plane: args.injected_control_plane.clone(),
                trust_domain: args.trust_domain.clone(),
                audience: args.token_audience.clone(),
                exclude_outbound_ports: args.exclude_outbound_ports.clone(),
                exclude_outbound_cidrs: args.exclude_outbound_cidrs.clone(),
                console: args.injected_console.clone(),
            };
            let hooks =
                std::sync::Arc::new(trellis_kube::webhook::Webhooks { store: store.clone(), injector: Some(injector) });
            tracing::info!(address = %addr, "admission webhooks serving (/validate, /inject)");
            Some(tokio::spawn(trellis_kube::webhook::serve(listener, tls, hooks)))
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(address = %args.listen, "control plane serving");
    let shutdown = async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => return,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let service = trellis_control::ControlService::new(store.clone(), Some(certificates));
    let _console = match args.console {
        Some(addr) => {
            let limits = trellis_console::Limits {
                spans_bytes: args.console_spans_mib << 20,
                logs_bytes: args.console_logs_mib << 20,
                metrics_bytes: args.console_metrics_mib << 20,
                scrape_interval: args.console_scrape_interval,
                ..Default::default()
            };
            let console = trellis_console::Console::new(store.clone(), service.proxies(), &limits)
                .context("cannot start the console's ingest thread")?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (console)"))?;
            tracing::info!(
                address = %addr,
                spans_mib = args.console_spans_mib,
                logs_mib = args.console_logs_mib,
                metrics_mib = args.console_metrics_mib,
                "console serving (http://{addr}/)"
            );
            let scraper = console.spawn_scraper();
            Some((scraper, tokio::spawn(trellis_console::api::serve(console, listener, std::future::pending()))))
        }
        None => None,
    };
    trellis_control::serve(service, listener, shutdown).await?;
    Ok(())
}
