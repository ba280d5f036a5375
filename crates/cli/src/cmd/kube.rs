//! The Kubernetes commands: `trellis proxy-init` (the injected init container) and `trellis
//! inject` (offline sidecar injection, as `istioctl kube-inject`).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context, Result};
use trellis_kube::capture::{check_cidr, CaptureRules};
use trellis_kube::inject::{self, Injector};

#[derive(clap::Args, Debug)]
pub struct ProxyInitArgs {
    /// The proxy's UID (and GID): its own connections are never captured.
    #[arg(long, default_value_t = inject::PROXY_UID as u32)]
    proxy_uid: u32,
    #[arg(long)]
    proxy_gid: Option<u32>,
    #[arg(long, default_value_t = inject::INBOUND_PORT)]
    inbound_port: u16,
    #[arg(long, default_value_t = inject::OUTBOUND_PORT)]
    outbound_port: u16,
    /// Inbound ports left alone (comma-separated).
    #[arg(long, value_delimiter = ',')]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone (comma-separated).
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Outbound destination CIDRs left alone (comma-separated).
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_cidrs: Vec<String>,
    /// Print the rules instead of applying them.
    #[arg(long)]
    dry_run: bool,
}

pub fn proxy_init(args: ProxyInitArgs) -> ExitCode {
    exit_code(run_proxy_init(args))
}

fn exit_code(r: Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_proxy_init(args: ProxyInitArgs) -> Result<()> {
    for c in &args.exclude_outbound_cidrs {
        check_cidr(c).map_err(anyhow::Error::msg)?;
    }
    let rules = CaptureRules {
        proxy_uid: args.proxy_uid,
        proxy_gid: args.proxy_gid.unwrap_or(args.proxy_uid),
        inbound_port: args.inbound_port,
        outbound_port: args.outbound_port,
        exclude_inbound_ports: args.exclude_inbound_ports,
        exclude_outbound_ports: args.exclude_outbound_ports,
        exclude_outbound_cidrs: args.exclude_outbound_cidrs,
    }
    .restore_input();
    if args.dry_run {
        out!("{rules}");
        return Ok(());
    }
    let mut child = Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run iptables-restore (is iptables installed in the image?)")?;
    child.stdin.take().context("iptables-restore stdin")?.write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("iptables-restore failed: {}\nrules:\n{rules}", String::from_utf8_lossy(&out.stderr).trim());
    }
    eprintln!("transparent capture installed: inbound → {}, outbound → {}", args.inbound_port, args.outbound_port);
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct InjectArgs {
    /// A manifest file (multi-document YAML or JSON), or `-` for standard input.
    #[arg(long = "filename", short = 'f')]
    file: PathBuf,
    /// The proxy image.
    #[arg(long)]
    image: Option<String>,
    /// Where sidecars reach the control plane.
    #[arg(long)]
    control_plane: Option<String>,
    /// Where sidecars send the console spans and access-log lines (default: the Helm chart's
    /// control plane, trellis-control.trellis-system.svc:15014).
    #[arg(long, conflicts_with = "no_console")]
    console: Option<String>,
    /// Sidecars send no spans or access-log lines to a console (the chart's `console.enabled=false`).
    #[arg(long)]
    no_console: bool,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
}

pub fn inject(args: InjectArgs) -> ExitCode {
    exit_code(run_inject(args))
}

fn run_inject(args: InjectArgs) -> Result<()> {
    let mut text = String::new();
    if args.file.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text = std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    }
    let mut injector = Injector { trust_domain: args.trust_domain.clone(), ..Injector::default() };
    if let Some(i) = args.image {
        injector.image = i;
    }
    if let Some(cp) = args.control_plane {
        injector.control_plane = cp;
    }
    if args.no_console {
        injector.console = None;
    } else if let Some(c) = args.console {
        injector.console = Some(c);
    }
    let docs = trellis_config::yaml::parse_documents(&text).map_err(|e| {
        anyhow::anyhow!("{}:{}:{}: invalid YAML: {}", args.file.display(), e.pos.line, e.pos.column, e.message)
    })?;
    let mut out = String::new();
    let mut injected = 0;
    for doc in docs {
        let mut value: serde_json::Value = trellis_config::yaml::decode(&doc, |_| {})
            .map_err(|e| anyhow::anyhow!("{}: {}", args.file.display(), e.message))?;
        if value.is_null() {
            continue;
        }
        injected += injector.inject_object(&mut value);
        // JSON is YAML: kubectl reads the documents as they are.
        out.push_str("---\n");
        out.push_str(&serde_json::to_string_pretty(&value)?);
        out.push('\n');
    }
    super::print_or_quit(&out);
    eprintln!("{injected} pod template(s) injected");
    Ok(())
}
