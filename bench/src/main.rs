//! `bench`: Trellis side by side with direct calls, HAProxy, nginx and (when supplied)
//! linkerd2-proxy. See docs/benchmarks.md for the method.
//!
//! ```text
//! scripts/bench.sh            # the whole suite (< 15 min on 2 cores)
//! scripts/bench.sh --quick    # a 1-minute subset that proves the harness works
//! ```
#![forbid(unsafe_code)]

mod backend;
mod console;
mod cpscale;
mod linkerd;
mod load;
mod peers;
mod wrk;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use load::{OpenLoop, Saturation, Target};
use peers::{Backends, Pinning};

#[derive(Parser, Debug)]
#[command(name = "bench", about = "Trellis benchmarks")]
struct Args {
    /// A 1-minute subset (what CI runs to prove the harness works; figures are not meaningful).
    #[arg(long)]
    quick: bool,
    /// The trellis binary (default: next to this one).
    #[arg(long)]
    trellis: Option<PathBuf>,
    /// Where to write `<date>.json`.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// `all` (default), `profile` (perf profile of one Trellis gateway at 5000 rps) or `console`
    /// (the console's stores over a 5-minute run at 1000 requests per second, and its cost to
    /// requests; unpinned: the whole mesh shares the machine).
    #[arg(default_value = "all")]
    what: String,
    /// Only scenarios whose name contains this (for investigating one; the direct baseline always runs).
    #[arg(long)]
    only: Option<String>,
    /// `console`: how many pairs of windows (with and without the console) to run (default 8;
    /// 1 with --quick).
    #[arg(long)]
    pairs: Option<usize>,
    /// `console`: more `trellis up` arguments for the mesh without the console, e.g.
    /// `--without-console-args=--otlp-endpoint=http://127.0.0.1:1/v1/traces` (its proxies then
    /// write and send spans that no one takes: the proxies' share of the console's cost).
    #[arg(long, allow_hyphen_values = true, value_delimiter = ' ')]
    without_console_args: Vec<String>,
    /// `console`: new instances of both meshes for every pair of windows, so that what one
    /// instance happens to be varies between pairs rather than repeating in each.
    #[arg(long)]
    mesh_per_pair: bool,
    /// `console`: run nothing; sum up the pairs of earlier runs (their JSON files) as one set,
    /// which `--mesh-per-pair` runs are (every pair has instances of its own).
    #[arg(long, num_args = 1..)]
    pool: Vec<PathBuf>,
}

#[derive(Clone, Debug, serde::Serialize)]
struct Row {
    scenario: String,
    shape: String,
    protocol: String,
    rate: u32,
    status: String,
    result: Option<OpenLoop>,
    added_p50_us: Option<i64>,
    added_p99_us: Option<i64>,
    cpu_ms_per_1000: Option<f64>,
    rss_mib: Option<f64>,
}

#[derive(Clone, Debug, serde::Serialize)]
struct SatRow {
    scenario: String,
    protocol: String,
    status: String,
    result: Option<Saturation>,
    cpu_ms_per_1000: Option<f64>,
}

/// One run of an external load tool (`wrk` closed loop, `oha` open loop) against a scenario.
#[derive(Clone, Debug, serde::Serialize)]
struct ToolRow {
    scenario: String,
    status: String,
    result: Option<wrk::ToolRun>,
    cpu_ms_per_1000: Option<f64>,
}

#[derive(Clone, Debug, serde::Serialize)]
struct ResRow {
    scenario: String,
    processes: usize,
    start_to_ready_ms: Vec<f64>,
    /// Summed over the processes.
    idle_rss_mib: f64,
    /// The anonymous part of `idle_rss_mib` (heap, stacks): what each proxy costs on its own.
    /// The rest is the executable's pages, which the page cache shares between processes.
    idle_anon_mib: f64,
    /// The largest process's.
    peak_rss_mib: f64,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    date: String,
    mode: String,
    machine: serde_json::Value,
    versions: serde_json::Value,
    pinning: String,
    method: serde_json::Value,
    latency: Vec<Row>,
    saturation: Vec<SatRow>,
    /// `wrk -c50` closed loop and `oha` open loop, HTTP/1.1.
    tools: Vec<ToolRow>,
    resources: Vec<ResRow>,
    control_plane: Option<cpscale::CpScale>,
}

/// A proxy setup to measure.
enum Scenario {
    /// One Trellis gateway; `Some(percent)`: with tracing at that sampling and access logs.
    TrellisGateway(Option<f64>),
    /// Two Trellis sidecars; `true`: mutual TLS.
    TrellisSidecars(bool),
    Haproxy(PathBuf, usize),
    Nginx(PathBuf, usize),
    Linkerd(PathBuf, usize),
}

struct Plan {
    rates: Vec<u32>,
    warmup: Duration,
    measure: Duration,
    sat_warmup: Duration,
    sat_measure: Duration,
    concurrency: usize,
    extra_protocols: bool,
    cp: (usize, usize),
    /// How long each `wrk` / `oha` run lasts.
    tool_run: Duration,
}

/// The external tools' runs against `target` (HTTP/1.1): `wrk -t1 -c50`, then `oha` at each of
/// `rates` when installed; the proxies' CPU per request over each run.
async fn tool_rows(scenario: &str, target: &Target, pids: &[u32], plan: &Plan) -> Vec<ToolRow> {
    let Target::Http1(url) = target else { return Vec::new() };
    let mut rows = Vec::new();
    let measured = |r: anyhow::Result<wrk::ToolRun>, c0: u64| {
        let c1 = peers::cpu_ns(pids);
        match r {
            Ok(run) => ToolRow {
                scenario: scenario.to_string(),
                status: "ok".into(),
                cpu_ms_per_1000: (!pids.is_empty() && run.requests > 0)
                    .then(|| (c1 - c0) as f64 / 1e6 / run.requests as f64 * 1000.0),
                result: Some(run),
            },
            Err(e) => ToolRow {
                scenario: scenario.to_string(),
                status: format!("failed: {e}"),
                result: None,
                cpu_ms_per_1000: None,
            },
        }
    };
    match wrk::wrk_bin() {
        Some(bin) => {
            eprintln!("bench: {scenario} wrk -c50");
            let c0 = peers::cpu_ns(pids);
            let r = wrk::wrk(&bin, url, 50, plan.tool_run).await;
            rows.push(measured(r, c0));
        }
        None => rows.push(ToolRow {
            scenario: scenario.to_string(),
            status: "not run: wrk not installed".into(),
            result: None,
            cpu_ms_per_1000: None,
        }),
    }
    if let Some(bin) = wrk::oha_bin() {
        for &rate in &plan.rates {
            eprintln!("bench: {scenario} oha @ {rate} rps");
            let c0 = peers::cpu_ns(pids);
            let r = wrk::oha(&bin, url, rate, 50, plan.tool_run).await;
            rows.push(measured(r, c0));
        }
    }
    rows
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.what == "all" {
        if let Some(code) = linkerd::enter_private_netns() {
            std::process::exit(code);
        }
    }
    let pin = Pinning::detect();
    if let (Some(core), false) = (pin.harness_core, args.what == "console") {
        let mut set = nix::sched::CpuSet::new();
        set.set(core)?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(args, pin))
}

fn cmd_version(cmd: &str, arg: &str) -> String {
    std::process::Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|_| "not installed".into())
}

fn today() -> String {
    cmd_version("date", "+%Y-%m-%d")
}

async fn run(args: Args, pin: Pinning) -> anyhow::Result<()> {
    let trellis = match &args.trellis {
        Some(t) => t.clone(),
        None => std::env::current_exe()?.with_file_name("trellis"),
    };
    anyhow::ensure!(trellis.is_file(), "{} not found: build it first (scripts/bench.sh does)", trellis.display());
    if args.what == "profile" {
        return profile(&pin, &trellis, args.only.as_deref()).await;
    }
    if args.what == "console" {
        let (rate, mut total, every, mut pairs, window) = if args.quick {
            (200, Duration::from_secs(20), Duration::from_secs(10), 1, Duration::from_secs(5))
        } else {
            (1000, Duration::from_secs(300), Duration::from_secs(30), 8, Duration::from_secs(20))
        };
        pairs = args.pairs.unwrap_or(pairs);
        // `--only cost`: the paired windows alone.
        if args.only.as_deref() == Some("cost") {
            total = Duration::ZERO;
        }
        if !args.pool.is_empty() {
            let paired = console::pool(&args.pool)?;
            println!("{} pairs from {} runs", paired.first().map_or(0, |p| p.differences_us.len()), args.pool.len());
            print_paired(&paired);
            return Ok(());
        }
        let cost = console::Cost {
            pairs,
            window,
            without_args: &args.without_console_args,
            mesh_per_pair: args.mesh_per_pair,
        };
        let r = console::run(&trellis, rate, total, every, cost).await?;
        if !r.samples.is_empty() {
            println!("### The console over {} s at {rate} req/s (examples/slow-fast, /fast)\n", total.as_secs());
            println!("| at s | p50 ms | p99 ms | errors | spans MiB (bound) | logs MiB (bound) | metrics MiB (bound) | evicted spans / lines / samples | control plane MiB |");
            println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        }
        for s in &r.samples {
            let store = |n: &str| s.stores.iter().find(|x| x.0 == n).cloned().unwrap_or_default();
            let (sp, lg, mt) = (store("spans"), store("logs"), store("metrics"));
            let mib = |b: u64| b as f64 / 1048576.0;
            println!(
                "| {:.0} | {:.3} | {:.3} | {} | {:.1} ({:.0}) | {:.1} ({:.0}) | {:.2} ({:.0}) | {} / {} / {} | {:.1} |",
                s.at_s,
                s.window.p50_us as f64 / 1000.0,
                s.window.p99_us as f64 / 1000.0,
                s.window.errors,
                mib(sp.1),
                mib(sp.2),
                mib(lg.1),
                mib(lg.2),
                mib(mt.1),
                mib(mt.2),
                sp.4,
                lg.4,
                mt.4,
                s.control_plane_rss_mib
            );
        }
        println!(
            "\n### What the console costs requests: {pairs} pairs of {} s windows at {rate} req/s, alternating\n",
            window.as_secs()
        );
        let roles: Vec<String> =
            r.windows.first().map(|w| w.cpu_ms_per_s.iter().map(|c| c.0.clone()).collect()).unwrap_or_default();
        println!(
            "| window | console | p50 ms | p99 ms | errors | CPU ms/s: {} | request threads µs/request: CPU / waiting | spans / lines received per request | dropped |",
            roles.join(" / ")
        );
        println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        for (i, w) in r.windows.iter().enumerate() {
            let per = |n: u64| n as f64 / w.load.requests.max(1) as f64;
            println!(
                "| {} | {} | {:.3} | {:.3} | {} | {} | {:.1} / {:.1} | {} | {} |",
                i + 1,
                if w.console { "on" } else { "off" },
                w.load.p50_us as f64 / 1000.0,
                w.load.p99_us as f64 / 1000.0,
                w.load.errors,
                w.cpu_ms_per_s.iter().map(|c| format!("{:.0}", c.1)).collect::<Vec<_>>().join(" / "),
                w.request_threads_cpu_us,
                w.request_threads_waiting_us,
                w.received.map(|(s, l)| format!("{:.2} / {:.2}", per(s), per(l))).unwrap_or_default(),
                w.dropped.map(|d| d.to_string()).unwrap_or_default()
            );
        }
        for on in [true, false] {
            let ws: Vec<_> = r.windows.iter().filter(|w| w.console == on).collect();
            let mut p50: Vec<f64> = ws.iter().map(|w| w.load.p50_us as f64 / 1000.0).collect();
            let mut p99: Vec<f64> = ws.iter().map(|w| w.load.p99_us as f64 / 1000.0).collect();
            let cpu: f64 = ws.iter().map(|w| w.cpu_ms_per_s.iter().map(|c| c.1).sum::<f64>()).sum::<f64>()
                / ws.len().max(1) as f64;
            let range = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                (
                    v.first().copied().unwrap_or(0.0),
                    v.get(v.len() / 2).copied().unwrap_or(0.0),
                    v.last().copied().unwrap_or(0.0),
                )
            };
            let mut run: Vec<f64> = ws.iter().map(|w| w.request_threads_cpu_us).collect();
            let mut wait: Vec<f64> = ws.iter().map(|w| w.request_threads_waiting_us).collect();
            let ((a, b, c), (d, e, f)) = (range(&mut p50), range(&mut p99));
            let ((g, h, i), (j, k, l)) = (range(&mut run), range(&mut wait));
            println!(
                "\nconsole {}: p50 median {b:.3} ms (range {a:.3}-{c:.3}), p99 median {e:.3} ms (range {d:.3}-{f:.3}), mesh CPU {cpu:.0} ms/s, request threads per request: CPU {h:.1} µs ({g:.1}-{i:.1}), waiting for a CPU {k:.1} µs ({j:.1}-{l:.1})",
                if on { "on" } else { "off" }
            );
        }
        println!(
            "\n| paired, with − without | median µs | interval µs (coverage) | slower / faster pairs | sign test p |"
        );
        println!("|---|---:|---:|---:|---:|");
        print_paired(&r.paired);
        std::fs::create_dir_all(&args.out)?;
        let file = args.out.join(format!("{}-console{}.json", today(), if args.quick { "-quick" } else { "" }));
        std::fs::write(&file, serde_json::to_string_pretty(&r)?)?;
        eprintln!("wrote {}", file.display());
        return Ok(());
    }
    let plan = if args.quick {
        Plan {
            rates: vec![1000],
            warmup: Duration::from_secs(1),
            measure: Duration::from_secs(3),
            sat_warmup: Duration::from_millis(500),
            sat_measure: Duration::from_secs(2),
            concurrency: 32,
            extra_protocols: false,
            cp: (100, 100),
            tool_run: Duration::from_secs(2),
        }
    } else {
        Plan {
            rates: vec![1000, 5000],
            warmup: Duration::from_secs(1),
            measure: Duration::from_secs(7),
            sat_warmup: Duration::from_secs(1),
            sat_measure: Duration::from_secs(4),
            concurrency: 64,
            extra_protocols: true,
            cp: (1000, 1000),
            tool_run: Duration::from_secs(5),
        }
    };
    let be = Backends { http: backend::http().await?, grpc: backend::grpc().await?, sink: backend::sink().await? };
    eprintln!("bench: {} mode; {}", if args.quick { "quick" } else { "full" }, pin.describe());

    let mut latency: Vec<Row> = Vec::new();
    let mut saturation: Vec<SatRow> = Vec::new();
    let mut resources: Vec<ResRow> = Vec::new();
    let mut tools: Vec<ToolRow> = Vec::new();

    // The baseline: straight to the backends.
    let direct = [
        ("HTTP/1.1", Target::Http1(format!("http://{}/", be.http))),
        ("HTTP/2", Target::Http2(format!("http://{}/", be.http))),
        ("gRPC", Target::Grpc(format!("http://{}", be.grpc))),
    ];
    for (proto, target) in &direct {
        if *proto != "HTTP/1.1" && !plan.extra_protocols {
            continue;
        }
        for &rate in &plan.rates {
            eprintln!("bench: direct {proto} @ {rate} rps");
            let r = load::open_loop(target, rate, plan.warmup, plan.measure).await?;
            latency.push(row("direct", "no proxy", proto, rate, r, None, None));
        }
        let s = load::closed_loop(target, plan.concurrency, plan.sat_warmup, plan.sat_measure).await?;
        saturation.push(SatRow {
            scenario: "direct".into(),
            protocol: proto.to_string(),
            status: "ok".into(),
            result: Some(s),
            cpu_ms_per_1000: None,
        });
        tools.extend(tool_rows("direct", target, &[], &plan).await);
    }

    let hap = peers::haproxy_bin().ok_or_else(|| "not run: haproxy not installed".to_string());
    let ngx = peers::nginx_bin().ok_or_else(|| "not run: nginx not installed".to_string());
    let linkerd = linkerd::availability();
    let mut scenarios: Vec<(&str, &str, Result<Scenario, String>)> = vec![
        ("trellis", "1 proxy", Ok(Scenario::TrellisGateway(None))),
        ("haproxy", "1 proxy", hap.clone().map(|b| Scenario::Haproxy(b, 1))),
    ];
    if !args.quick {
        scenarios.push(("nginx", "1 proxy", ngx.clone().map(|b| Scenario::Nginx(b, 1))));
    }
    scenarios.push(("linkerd2-proxy", "1 proxy", linkerd.clone().map(|b| Scenario::Linkerd(b, 1))));
    scenarios.push(("trellis", "2 proxies", Ok(Scenario::TrellisSidecars(false))));
    if !args.quick {
        scenarios.push(("trellis mTLS", "2 proxies", Ok(Scenario::TrellisSidecars(true))));
        scenarios.push(("haproxy", "2 proxies", hap.map(|b| Scenario::Haproxy(b, 2))));
        scenarios.push(("nginx", "2 proxies", ngx.map(|b| Scenario::Nginx(b, 2))));
    }
    scenarios.push(("linkerd2-proxy mTLS", "2 proxies", linkerd.map(|b| Scenario::Linkerd(b, 2))));
    if !args.quick {
        scenarios.push(("trellis + telemetry 100%", "1 proxy", Ok(Scenario::TrellisGateway(Some(100.0)))));
        scenarios.push(("trellis + telemetry 1%", "1 proxy", Ok(Scenario::TrellisGateway(Some(1.0)))));
    }

    for (name, shape, start) in &scenarios {
        if args.only.as_ref().is_some_and(|o| !format!("{name} ({shape})").contains(o.as_str())) {
            continue;
        }
        let start = match start {
            Ok(s) => s,
            Err(reason) => {
                for &rate in &plan.rates {
                    latency.push(Row {
                        scenario: name.to_string(),
                        shape: shape.to_string(),
                        protocol: "HTTP/1.1".into(),
                        rate,
                        status: reason.clone(),
                        result: None,
                        added_p50_us: None,
                        added_p99_us: None,
                        cpu_ms_per_1000: None,
                        rss_mib: None,
                    });
                }
                saturation.push(SatRow {
                    scenario: format!("{name} ({shape})"),
                    protocol: "HTTP/1.1".into(),
                    status: reason.clone(),
                    result: None,
                    cpu_ms_per_1000: None,
                });
                continue;
            }
        };
        eprintln!("bench: starting {name} ({shape})");
        let setup = match start {
            Scenario::TrellisGateway(tel) => peers::trellis_gateway(&pin, &trellis, be, *tel).await?,
            Scenario::TrellisSidecars(mtls) => peers::trellis_sidecars(&pin, &trellis, be, *mtls).await?,
            Scenario::Haproxy(bin, n) => peers::haproxy(&pin, bin, be, *n).await?,
            Scenario::Nginx(bin, n) => peers::nginx(&pin, bin, be, *n).await?,
            Scenario::Linkerd(bin, n) => linkerd::setup(&pin, bin, be, *n).await?,
        };
        let pids = setup.pids();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let idle = peers::rss_kib(&pids);
        let idle_anon = peers::anon_rss_kib(&pids);
        let mut targets = vec![("HTTP/1.1", setup.h1.clone())];
        let proto_rows = plan.extra_protocols && !name.contains("telemetry");
        if proto_rows {
            if let Some(t) = &setup.h2 {
                targets.push(("HTTP/2", t.clone()));
            }
            if let Some(t) = &setup.grpc {
                targets.push(("gRPC", t.clone()));
            }
        }
        for (proto, target) in &targets {
            for &rate in &plan.rates {
                eprintln!("bench: {name} ({shape}) {proto} @ {rate} rps");
                let c0 = peers::cpu_ns(&pids);
                let r = load::open_loop(target, rate, plan.warmup, plan.measure).await?;
                let c1 = peers::cpu_ns(&pids);
                let sent = rate as f64 * (plan.warmup + plan.measure).as_secs_f64();
                let cpu = (c1 - c0) as f64 / 1e6 / sent * 1000.0;
                let rss = peers::rss_kib(&pids) as f64 / 1024.0;
                let base = latency
                    .iter()
                    .find(|b| b.scenario == "direct" && b.protocol == *proto && b.rate == rate)
                    .and_then(|b| b.result.clone());
                latency.push(row(name, shape, proto, rate, r, Some(cpu), Some(rss)));
                if let (Some(last), Some(b)) = (latency.last_mut(), base) {
                    if let Some(res) = &last.result {
                        last.added_p50_us = Some(res.p50_us as i64 - b.p50_us as i64);
                        last.added_p99_us = Some(res.p99_us as i64 - b.p99_us as i64);
                    }
                }
            }
            let c0 = peers::cpu_ns(&pids);
            let s = load::closed_loop(target, plan.concurrency, plan.sat_warmup, plan.sat_measure).await?;
            let c1 = peers::cpu_ns(&pids);
            let total_s = (plan.sat_warmup + plan.sat_measure).as_secs_f64();
            let approx_requests = s.throughput_rps * total_s;
            let cpu =
                if approx_requests > 0.0 { Some((c1 - c0) as f64 / 1e6 / approx_requests * 1000.0) } else { None };
            saturation.push(SatRow {
                scenario: format!("{name} ({shape})"),
                protocol: proto.to_string(),
                status: "ok".into(),
                result: Some(s),
                cpu_ms_per_1000: cpu,
            });
            tools.extend(tool_rows(&format!("{name} ({shape})"), target, &pids, &plan).await);
        }
        resources.push(ResRow {
            scenario: format!("{name} ({shape})"),
            processes: pids.len(),
            start_to_ready_ms: setup.ready_ms.clone(),
            idle_rss_mib: idle as f64 / 1024.0,
            idle_anon_mib: idle_anon as f64 / 1024.0,
            peak_rss_mib: peers::peak_rss_kib(&pids) as f64 / 1024.0,
        });
        drop(setup);
    }

    eprintln!("bench: control plane with {} proxies and {} services", plan.cp.0, plan.cp.1);
    let cp = cpscale::run(&pin, &trellis, plan.cp.0, plan.cp.1)
        .await
        .map_err(|e| eprintln!("bench: control-plane scale failed: {e}"))
        .ok();

    let report = Report {
        date: today(),
        mode: if args.quick { "quick".into() } else { "full".into() },
        machine: serde_json::json!({
            "nproc": pin.cores,
            "cpu": std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default().lines().find_map(|l| l.strip_prefix("model name")).map(|s| s.trim_start_matches([' ', '\t', ':']).to_string()),
            "kernel": cmd_version("uname", "-r"),
        }),
        versions: serde_json::json!({
            "trellis": cmd_version(&trellis.display().to_string(), "--version"),
            "haproxy": peers::haproxy_bin().map(|b| cmd_version(&b.display().to_string(), "-v")).unwrap_or_else(|| "not installed".into()),
            "nginx": peers::nginx_bin().map(|b| cmd_version(&b.display().to_string(), "-v")).unwrap_or_else(|| "not installed".into()),
            "linkerd2-proxy": linkerd::version(),
            "wrk": wrk::wrk_bin().map(|b| wrk::version(&b, "-v")).unwrap_or_else(|| "not installed".into()),
            "oha": wrk::oha_bin().map(|b| wrk::version(&b, "--version")).unwrap_or_else(|| "not installed".into()),
            "rustc": cmd_version("rustc", "--version"),
        }),
        pinning: pin.describe(),
        method: serde_json::json!({
            "latency": format!("open loop at fixed rates, latency from each request's due time (HdrHistogram), {} s warm-up then {} s measured", plan.warmup.as_secs(), plan.measure.as_secs()),
            "saturation": format!("closed loop, {} concurrent requests, {} s", plan.concurrency, plan.sat_measure.as_secs()),
            "body": "1 KiB response, keep-alive connections",
            "added latency": "percentile with the proxy minus the same percentile direct, same run",
        }),
        latency,
        saturation,
        tools,
        resources,
        control_plane: cp,
    };
    println!("{}", markdown(&report));
    std::fs::create_dir_all(&args.out)?;
    let file = args.out.join(format!("{}{}.json", report.date, if args.quick { "-quick" } else { "" }));
    std::fs::write(&file, serde_json::to_string_pretty(&report)?)?;
    eprintln!("bench: wrote {}", file.display());
    Ok(())
}

fn row(scenario: &str, shape: &str, proto: &str, rate: u32, r: OpenLoop, cpu: Option<f64>, rss: Option<f64>) -> Row {
    let status = if r.valid() {
        "ok".to_string()
    } else if r.errors > 0 {
        format!("not reported: {} errors", r.errors)
    } else {
        format!("not reported: achieved {:.0} rps, more than 5% below {rate} (past the knee)", r.achieved_rps)
    };
    Row {
        scenario: scenario.into(),
        shape: shape.into(),
        protocol: proto.into(),
        rate,
        status,
        result: Some(r),
        added_p50_us: None,
        added_p99_us: None,
        cpu_ms_per_1000: cpu,
        rss_mib: rss,
    }
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn markdown(r: &Report) -> String {
    let mut out = format!(
        "## Results ({}, {} mode)\n\nMachine: {} CPU(s), {}; {}.\n\n### Latency (open loop; ms)\n\n| scenario | shape | protocol | rate | p50 | p90 | p99 | p99.9 | max | +p50 vs direct | +p99 vs direct | achieved rps | proxy CPU ms / 1000 req | proxy RSS MiB |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        r.date,
        r.mode,
        r.machine["nproc"],
        r.machine["cpu"].as_str().unwrap_or("?"),
        r.pinning
    );
    for row in &r.latency {
        match (&row.result, row.status.as_str()) {
            (Some(res), "ok") => out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} |\n",
                row.scenario,
                row.shape,
                row.protocol,
                row.rate,
                ms(res.p50_us),
                ms(res.p90_us),
                ms(res.p99_us),
                ms(res.p999_us),
                ms(res.max_us),
                row.added_p50_us.map(|v| format!("{:+.3}", v as f64 / 1000.0)).unwrap_or_else(|| "—".into()),
                row.added_p99_us.map(|v| format!("{:+.3}", v as f64 / 1000.0)).unwrap_or_else(|| "—".into()),
                res.achieved_rps,
                row.cpu_ms_per_1000.map(|c| format!("{c:.1}")).unwrap_or_else(|| "—".into()),
                row.rss_mib.map(|m| format!("{m:.1}")).unwrap_or_else(|| "—".into()),
            )),
            _ => out.push_str(&format!(
                "| {} | {} | {} | {} | {} | | | | | | | | | |\n",
                row.scenario, row.shape, row.protocol, row.rate, row.status
            )),
        }
    }
    out.push_str("\n### Saturation (closed loop)\n\n| scenario | protocol | max throughput (rps) | proxy CPU ms / 1000 req |\n|---|---|---:|---:|\n");
    for s in &r.saturation {
        match &s.result {
            Some(res) => out.push_str(&format!(
                "| {} | {} | {:.0} | {} |\n",
                s.scenario,
                s.protocol,
                res.throughput_rps,
                s.cpu_ms_per_1000.map(|c| format!("{c:.1}")).unwrap_or_else(|| "—".into())
            )),
            None => out.push_str(&format!("| {} | {} | {} | |\n", s.scenario, s.protocol, s.status)),
        }
    }
    out.push_str("\n### External tools (HTTP/1.1): `wrk -t1 -c50` closed loop, `oha` open loop at fixed rates\n\n| scenario | tool | rate | throughput (rps) | p50 | p99 | errors | proxy CPU ms / 1000 req |\n|---|---|---:|---:|---:|---:|---:|---:|\n");
    for t in &r.tools {
        match &t.result {
            Some(x) => out.push_str(&format!(
                "| {} | {} -c{} | {} | {:.0} | {} | {} | {} | {} |\n",
                t.scenario,
                x.tool,
                x.connections,
                x.rate.map(|r| r.to_string()).unwrap_or_else(|| "closed".into()),
                x.throughput_rps,
                ms(x.p50_us),
                ms(x.p99_us),
                x.errors,
                t.cpu_ms_per_1000.map(|c| format!("{c:.1}")).unwrap_or_else(|| "—".into())
            )),
            None => out.push_str(&format!("| {} | | | {} | | | | |\n", t.scenario, t.status)),
        }
    }
    out.push_str("\n### Resources\n\n| scenario | processes | start → ready (ms) | idle RSS, all processes (MiB) | of which anonymous (MiB) | peak RSS, largest process (MiB) |\n|---|---:|---|---:|---:|---:|\n");
    for x in &r.resources {
        let ready: Vec<String> = x.start_to_ready_ms.iter().map(|m| format!("{m:.1}")).collect();
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} |\n",
            x.scenario,
            x.processes,
            ready.join(", "),
            x.idle_rss_mib,
            x.idle_anon_mib,
            x.peak_rss_mib
        ));
    }
    if let Some(cp) = &r.control_plane {
        out.push_str(&format!(
            "\n### Control plane\n\n{} simulated proxies over the real API, {} services: initial sync {:.0} ms; a weight change reached proxies in p50 {:.1} ms, p99 {:.1} ms, last {:.1} ms; whole snapshot {} KiB per proxy, the change's delta {:.1} KiB; control plane RSS {:.1} MiB (peak {:.1}).\n",
            cp.proxies,
            cp.services,
            cp.initial_sync_ms,
            cp.change_p50_ms,
            cp.change_p99_ms,
            cp.change_max_ms,
            cp.snapshot_bytes / 1024,
            cp.delta_bytes as f64 / 1024.0,
            cp.cp_rss_kib as f64 / 1024.0,
            cp.cp_peak_rss_kib as f64 / 1024.0
        ));
    }
    out
}

/// A perf profile of the Trellis proxies at 5000 rps HTTP/1.1, the top symbols by self time:
/// one gateway, or with `--only sidecars` / `--only mTLS` the two sidecars, `--only telemetry` a
/// gateway with tracing (100%) and access logs.
async fn profile(pin: &Pinning, trellis: &std::path::Path, only: Option<&str>) -> anyhow::Result<()> {
    let be = Backends { http: backend::http().await?, grpc: backend::grpc().await?, sink: backend::sink().await? };
    let setup = match only {
        Some("mTLS") => peers::trellis_sidecars(pin, trellis, be, true).await?,
        Some("sidecars") => peers::trellis_sidecars(pin, trellis, be, false).await?,
        Some("telemetry") => peers::trellis_gateway(pin, trellis, be, Some(100.0)).await?,
        _ => peers::trellis_gateway(pin, trellis, be, None).await?,
    };
    let pid = setup.pids().iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",");
    let data = setup.tmp.path().join("perf.data");
    let mut perf = std::process::Command::new("perf")
        .args(["record", "-F", "999", "-g", "-o"])
        .arg(&data)
        .args(["-p", &pid, "--", "sleep", "10"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let r = load::open_loop(&setup.h1, 5000, Duration::from_secs(1), Duration::from_secs(8)).await?;
    perf.wait()?;
    eprintln!("bench: profiled at {:.0} rps", r.achieved_rps);
    let report = std::process::Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "dso,symbol",
            "--percent-limit",
            "0.7",
            "-g",
            "none",
            "-i",
        ])
        .arg(&data)
        .output()?;
    println!(
        "{}",
        String::from_utf8_lossy(&report.stdout)
            .lines()
            .filter(|l| !l.starts_with('#')
                && !l.trim().is_empty()
                && l.contains('%')
                && !l.trim_start().starts_with('|')
                && !l.trim_start().starts_with("--"))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

/// The paired differences' table and what they say.
fn print_paired(paired: &[console::Paired]) {
    println!("\n| paired, with − without | median µs | interval µs (coverage) | slower / faster pairs | sign test p |");
    println!("|---|---:|---:|---:|---:|");
    for p in paired {
        println!(
            "| {} | {:+.1} | {} | {} / {} | {:.3} |",
            p.percentile,
            p.median_us,
            match (p.interval_us, p.coverage) {
                (Some((lo, hi)), Some(c)) => format!("{lo:+} to {hi:+} ({:.1}%)", c * 100.0),
                _ => "too few pairs".into(),
            },
            p.slower,
            p.faster,
            p.sign_test_p
        );
    }
    println!("\nthe console's cost to requests: {}", console::verdict(paired));
}
