//! `trellis status` and `trellis proxy-config WORKLOAD`: what the control plane knows.

use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use trellis_api::control::{control_client::ControlClient, ProxyConfigRequest, StatusRequest};
use trellis_config::snapshot::{Action, ListenerRouting, Snapshot};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Control-plane address.
    #[arg(long, default_value = trellis_control::DEFAULT_ADDR)]
    control_plane: String,
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Args, Debug)]
pub struct ProxyConfigArgs {
    /// The workload (or gateway) whose proxy to show.
    workload: String,
    #[arg(long, short, default_value = "")]
    namespace: String,
    #[arg(long, default_value = trellis_control::DEFAULT_ADDR)]
    control_plane: String,
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
enum Output {
    Table,
    Json,
}

async fn client(addr: &str) -> Result<ControlClient<tonic::transport::Channel>> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(std::time::Duration::from_secs(2));
    let ch = ep
        .connect()
        .await
        .with_context(|| format!("cannot reach the control plane at {addr} (is `trellis up` running?)"))?;
    Ok(ControlClient::new(ch).max_decoding_message_size(256 * 1024 * 1024))
}

/// Where a proxy's metrics are scraped (its admin address), or "-" when it did not say.
fn metrics_url(admin: &str) -> String {
    if admin.is_empty() {
        "-".into()
    } else {
        format!("http://{admin}/metrics")
    }
}

/// What the control plane at `addr` reports: its config generation and error, every proxy's state.
pub(crate) async fn fetch_status(addr: &str) -> Result<trellis_api::control::StatusReply> {
    let reply = client(addr).await?.status(StatusRequest {}).await.map_err(|s| anyhow!(s.message().to_string()))?;
    Ok(reply.into_inner())
}

pub fn status(args: StatusArgs) -> ExitCode {
    super::block_on(async move {
        let reply = client(&args.control_plane)
            .await?
            .status(StatusRequest {})
            .await
            .map_err(|s| anyhow!(s.message().to_string()))?
            .into_inner();
        if args.output == Output::Json {
            let proxies: Vec<serde_json::Value> = reply
                .proxies
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "proxy": p.proxy_id, "role": p.role, "workload": p.workload, "namespace": p.namespace,
                        "state": p.state, "sent": p.sent_version, "acked": p.acked_version,
                        "nacked": p.nacked_version, "nack_reason": p.nack_reason, "nack_source": p.nack_source, "state_age_seconds": p.state_age_seconds,
                        "admin": p.admin_address, "metrics": metrics_url(&p.admin_address),
                        "config_generation": p.config_generation,
                    })
                })
                .collect();
            let out = serde_json::json!({
                "config_generation": reply.config_generation,
                "config_error": reply.config_error,
                "config_findings": reply.config_findings,
                "proxies": proxies,
            });
            outln!("{}", serde_json::to_string_pretty(&out)?);
            return Ok(());
        }
        let mut rows = vec![vec![
            "PROXY".to_string(),
            "WORKLOAD".into(),
            "STATE".into(),
            "VERSION".into(),
            "LAST ACK/NACK".into(),
            "SINCE".into(),
            "METRICS".into(),
        ]];
        for p in &reply.proxies {
            let last = if !p.nacked_version.is_empty() && p.nacked_version == p.sent_version {
                match p.nack_source.as_str() {
                    "" => format!("NACK {}: {}", p.nacked_version, p.nack_reason),
                    source => format!("NACK {}: {} (from {source})", p.nacked_version, p.nack_reason),
                }
            } else if p.acked_version == p.sent_version && !p.acked_version.is_empty() {
                "ACK".to_string()
            } else {
                "pending".to_string()
            };
            rows.push(vec![
                p.proxy_id.clone(),
                format!("{}.{}", p.workload, p.namespace),
                p.state.clone(),
                p.acked_version.clone(),
                last,
                format!("{}s", p.state_age_seconds),
                metrics_url(&p.admin_address),
            ]);
        }
        print_table(&rows);
        if !reply.config_error.is_empty() {
            outln!("\nconfig: {}", reply.config_error);
            for f in &reply.config_findings {
                outln!("  {f}");
            }
        }
        Ok(())
    })
}

pub fn proxy_config(args: ProxyConfigArgs) -> ExitCode {
    super::block_on(async move {
        let reply = client(&args.control_plane)
            .await?
            .proxy_config(ProxyConfigRequest { workload: args.workload.clone(), namespace: args.namespace.clone() })
            .await
            .map_err(|s| anyhow!(s.message().to_string()))?
            .into_inner();
        let snap: Snapshot = serde_json::from_slice(&reply.snapshot_json)?;
        if args.output == Output::Json {
            outln!("{}", serde_json::to_string_pretty(&snap)?);
            return Ok(());
        }
        outln!("proxy {} (version {})\n", reply.proxy_id, snap.version);
        let mut rows = vec![vec!["LISTENER".to_string(), "ADDRESS".into(), "DIRECTION".into(), "ROUTES".into()]];
        for l in &snap.listeners {
            let routing = match &l.routing {
                ListenerRouting::Table(t) => t.clone(),
                ListenerRouting::ByRequestPort => "outbound|<request port>".into(),
                ListenerRouting::Fixed { host, port } => format!("as {host}:{port}"),
                ListenerRouting::OriginalDst { ports, .. } => format!(
                    "by original destination: {}",
                    ports
                        .iter()
                        .map(|(p, c)| match &c.tcp {
                            Some(t) => format!("{p}→tcp {}", tcp_routes(t)),
                            None => format!("{p}→{}", c.table),
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                ListenerRouting::Tcp(t) => format!("tcp {}", tcp_routes(t)),
                ListenerRouting::Detect { http, tcp } => format!(
                    "detect: HTTP {}, else tcp {}",
                    match &**http {
                        ListenerRouting::Table(t) => t.clone(),
                        ListenerRouting::Fixed { host, port } => format!("as {host}:{port}"),
                        other => format!("{other:?}"),
                    },
                    tcp_routes(tcp)
                ),
            };
            rows.push(vec![
                l.name.clone(),
                l.address.to_string(),
                format!("{:?}", l.direction).to_lowercase(),
                routing,
            ]);
        }
        print_table(&rows);
        outln!();
        let mut rows =
            vec![vec!["ROUTE TABLE".to_string(), "DOMAINS".into(), "MATCH".into(), "ACTION".into(), "POLICIES".into()]];
        for (name, t) in &snap.route_tables {
            for vh in &t.virtual_hosts {
                for r in &vh.routes {
                    let m = if r.matches.is_empty() {
                        "/*".to_string()
                    } else {
                        serde_json::to_string(&r.matches).unwrap_or_default()
                    };
                    let action = match &r.action {
                        Action::Forward(f) => f
                            .destinations
                            .iter()
                            .map(|d| format!("{} ({})", d.cluster, d.weight))
                            .collect::<Vec<_>>()
                            .join(", "),
                        Action::Redirect(rd) => format!("redirect {}", rd.code),
                        Action::Direct { status, .. } => format!("direct {status}"),
                    };
                    let mut policies = route_policies(r);
                    if let Some(rl) = snap.rate_limits.iter().rev().find(|p| p.selects_route(name, &vh.name, r)) {
                        use trellis_config::model::duration::format_duration as d;
                        policies.push_str(&format!(
                            "; rate limit {}/{} burst {} ({})",
                            rl.tokens_per_fill,
                            d(rl.fill_interval.0),
                            rl.max_tokens,
                            rl.name
                        ));
                    }
                    rows.push(vec![name.clone(), vh.domains.join(","), m, action, policies]);
                }
            }
        }
        print_table(&rows);
        outln!();
        let mut rows =
            vec![vec!["CLUSTER".to_string(), "ENDPOINT".into(), "WORKLOAD".into(), "LB".into(), "POLICIES".into()]];
        for c in snap.clusters.values() {
            let lb = serde_json::to_string(&c.lb).unwrap_or_default().trim_matches('"').to_string();
            let policies = cluster_policies(c);
            if c.endpoints.is_empty() {
                rows.push(vec![c.name.clone(), "(none)".into(), String::new(), lb.clone(), policies.clone()]);
            }
            for e in &c.endpoints {
                rows.push(vec![
                    c.name.clone(),
                    e.address.clone(),
                    e.workload.clone().unwrap_or_default(),
                    lb.clone(),
                    policies.clone(),
                ]);
            }
        }
        print_table(&rows);
        Ok(())
    })
}

/// TCP routes in one cell: `cluster (weight), ...` per route, routes separated by `|`.
fn tcp_routes(t: &trellis_config::snapshot::TcpProxy) -> String {
    t.routes
        .iter()
        .map(|r| {
            let dests: Vec<String> = r.destinations.iter().map(|(c, w)| format!("{c} ({w})")).collect();
            let subnets = if r.destination_subnets.is_empty() {
                String::new()
            } else {
                format!(" to {}", r.destination_subnets.join(","))
            };
            format!("{}{subnets}", dests.join(", "))
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// A route's timeout, retries and faults, in one cell.
fn route_policies(r: &trellis_config::snapshot::Route) -> String {
    use trellis_config::model::duration::format_duration as d;
    let mut out = Vec::new();
    if let Some(t) = r.timeout {
        out.push(format!("timeout {}", d(t.0)));
    }
    match &r.retry {
        None => out.push("no retries".into()),
        Some(p) => {
            let on: Vec<String> = p
                .retry_on
                .iter()
                .map(|c| serde_json::to_string(c).unwrap_or_default().trim_matches('"').to_string())
                .collect();
            let codes: Vec<String> = p.status_codes.iter().map(u16::to_string).collect();
            let per_try = p.per_try_timeout.map(|t| format!(", {} per try", d(t.0))).unwrap_or_default();
            let methods = if p.any_method { "" } else { ", idempotent only" };
            out.push(format!("retries {} on {}{per_try}{methods}", p.attempts, [on, codes].concat().join(",")));
        }
    }
    if let Some(f) = &r.fault {
        if let Some(dl) = &f.delay {
            out.push(format!("delay {} {}%", d(dl.delay.0), dl.percent));
        }
        if let Some(a) = &f.abort {
            let what = match a.status {
                trellis_config::snapshot::AbortStatus::Http(c) => c.to_string(),
                trellis_config::snapshot::AbortStatus::Grpc(c) => format!("grpc {c}"),
            };
            out.push(format!("abort {what} {}%", a.percent));
        }
    }
    out.join("; ")
}

/// A cluster's outlier detection, connection-pool limits and retry budget, in one cell.
fn cluster_policies(c: &trellis_config::snapshot::Cluster) -> String {
    use trellis_config::model::duration::format_duration as d;
    let mut out = Vec::new();
    if let Some(o) = &c.outlier {
        out.push(format!(
            "outlier {}x5xx {}xgateway, eject {} max {}%",
            o.consecutive_5xx,
            o.consecutive_gateway,
            d(o.base_ejection.0),
            o.max_ejection_percent
        ));
    }
    let p = &c.pool;
    for (name, v) in [
        ("connections", p.max_connections),
        ("pending", p.max_pending),
        ("requests", p.max_requests),
        ("per-connection", p.max_requests_per_connection),
        ("retries", p.max_retries),
    ] {
        if let Some(v) = v {
            out.push(format!("max {name} {v}"));
        }
    }
    out.push(format!("idle {}", d(p.idle_timeout.0)));
    out.push(format!("retry budget {}%/{}", c.retry_budget.percent, c.retry_budget.min_concurrency));
    out.join("; ")
}

#[derive(clap::Args, Debug)]
pub struct PrometheusArgs {
    #[arg(long, default_value = trellis_control::DEFAULT_ADDR)]
    control_plane: String,
    /// How often Prometheus scrapes.
    #[arg(long, default_value = "5s")]
    scrape_interval: String,
}

/// `trellis prometheus-config`: a Prometheus configuration scraping every proxy of a running
/// mesh, with each target labelled by workload, namespace and role.
pub fn prometheus_config(args: PrometheusArgs) -> ExitCode {
    super::block_on(async move {
        let reply = client(&args.control_plane)
            .await?
            .status(StatusRequest {})
            .await
            .map_err(|s| anyhow!(s.message().to_string()))?
            .into_inner();
        let mut out = format!(
            "# Generated by `trellis prometheus-config` for the mesh whose control plane is {}.\n# Regenerate when workloads change.\nglobal:\n  scrape_interval: {i}\n  evaluation_interval: {i}\nscrape_configs:\n- job_name: trellis-proxies\n  metrics_path: /stats/prometheus\n  static_configs:\n",
            args.control_plane,
            i = args.scrape_interval
        );
        let mut proxies: Vec<_> = reply.proxies.iter().filter(|p| !p.admin_address.is_empty()).collect();
        proxies.sort_by(|a, b| a.proxy_id.cmp(&b.proxy_id));
        for p in proxies {
            out.push_str(&format!(
                "  - targets: ['{}']\n    labels: {{workload: {}, namespace: {}, role: {}}}\n",
                p.admin_address,
                serde_json::to_string(&p.workload)?,
                serde_json::to_string(&p.namespace)?,
                p.role
            ));
        }
        out!("{out}");
        Ok(())
    })
}

/// Prints rows as aligned columns.
pub(crate) fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r.get(c).map(|s| s.chars().count()).unwrap_or(0)).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, cell)| format!("{cell:<w$}", w = widths[i])).collect();
        outln!("{}", line.join("  ").trim_end());
    }
}
