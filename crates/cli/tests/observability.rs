//! Observability end to end: traces (one tree per request, OTLP and Zipkin, sampling,
//! interop with the OpenTelemetry SDK), access logs, exporter failure, and metrics scraped by a
//! real Prometheus, including every query of the shipped Grafana dashboards.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::mesh::{example, Up};
use support::*;

/// Asserts that `spans` form one trace shaped gateway → A → (B → (D, E → (G, H)), C), with a
/// CLIENT span in the caller and a SERVER span in the callee for every hop.
fn assert_greeting_tree(spans: &[SeenSpan]) {
    let traces: BTreeSet<&str> = spans.iter().map(|s| s.trace_id.as_str()).collect();
    assert_eq!(traces.len(), 1, "one trace: {traces:?}");
    assert_eq!(spans.len(), 14, "gateway + 2 spans for each of the 6 sidecar hops + A's inbound: {spans:#?}");
    let by_id: BTreeMap<&str, &SeenSpan> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let roots: Vec<&&SeenSpan> = by_id.values().filter(|s| s.parent_id.is_none()).collect();
    assert_eq!(roots.len(), 1, "one root");
    assert_eq!(roots[0].service, "istio-ingressgateway.istio-system");
    assert_eq!(roots[0].kind, "SERVER");
    let parent = |s: &SeenSpan| s.parent_id.as_deref().and_then(|p| by_id.get(p)).copied();
    let server = |svc: &str| {
        spans
            .iter()
            .find(|s| s.kind == "SERVER" && s.service == format!("{svc}.default"))
            .unwrap_or_else(|| panic!("no SERVER span of {svc}: {spans:#?}"))
    };
    // A's inbound span is a child of the gateway's.
    assert_eq!(parent(server("service-a")).map(|p| p.span_id.as_str()), Some(roots[0].span_id.as_str()));
    for (caller, callee) in support::mesh::REFERENCE_CALLS {
        let callee_span = server(callee);
        let client = parent(callee_span).unwrap_or_else(|| panic!("{callee}'s SERVER span has no parent"));
        assert_eq!(
            (client.kind.as_str(), client.service.as_str()),
            ("CLIENT", format!("{caller}.default").as_str()),
            "{callee}'s parent"
        );
        assert_eq!(client.attributes.get("peer.workload").map(String::as_str), Some(callee));
        let up = parent(client).unwrap_or_else(|| panic!("{caller}'s CLIENT span has no parent"));
        assert_eq!(up.span_id, server(caller).span_id, "{caller}'s CLIENT span is a child of its SERVER span");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_greeting_is_one_trace_tree_in_otlp_and_zipkin() {
    let collector = Collector::start().await;
    let port = free_port();
    let dir = example("reference-platform", port);
    let up = Up::start_with(
        dir.path(),
        port,
        &["--otlp-endpoint", &collector.otlp_url(), "--zipkin-endpoint", &collector.zipkin_url()],
    )
    .await;
    let r = get(&up.url("/api/greeting"), &[]).await;
    assert_eq!(r.status, 200);
    let spans = collector.wait_otlp("14 spans", |s| s.len() >= 14).await;
    assert_greeting_tree(&spans);
    let deadline = Instant::now() + Duration::from_secs(10);
    while collector.zipkin_spans().len() < 14 {
        assert!(Instant::now() < deadline, "zipkin spans: {:#?}", collector.zipkin_spans());
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on the collector
    }
    let zipkin = collector.zipkin_spans();
    assert_greeting_tree(&zipkin);
    // Span attributes follow OpenTelemetry's HTTP conventions plus the mesh's.
    let a = spans.iter().find(|s| s.kind == "SERVER" && s.service == "service-a.default").expect("A");
    assert_eq!(a.attributes.get("http.request.method").map(String::as_str), Some("GET"));
    assert_eq!(a.attributes.get("url.path").map(String::as_str), Some("/api/greeting"));
    assert_eq!(a.attributes.get("http.response.status_code").map(String::as_str), Some("200"));
    assert!(a.attributes.get("upstream_cluster").is_some_and(|c| c.starts_with("inbound|")));
    assert_eq!(a.attributes.get("response_flags").map(String::as_str), Some("-"));
}

/// A static gateway in front of `backend`, exporting to `collector`, with extra flags.
async fn traced_gateway(backend: SocketAddr, collector: &Collector, extra: &[&str]) -> (ConfigDir, ProxyProc, u16) {
    let dir = ConfigDir::new();
    let mut y = gateway("gw", GW);
    y.push_str(&service("app.internal", "HTTP", &[(backend, &[])]));
    y.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route: [{destination: {host: app.internal}}]\n");
    let cfg = dir.write("mesh.yaml", &y);
    let otlp = collector.otlp_url();
    let mut args =
        vec!["--role", "gateway", "--workload", "edge", "-c", cfg.to_str().expect("path"), "--otlp-endpoint", &otlp];
    args.extend_from_slice(extra);
    let proxy = ProxyProc::start(&args).await;
    let port = proxy.port(GW).await;
    (dir, proxy, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_percentage_and_upstream_decisions_are_honoured() {
    let collector = Collector::start().await;
    let b = Backend::start("b").await;
    let (_d, _p, port) = traced_gateway(b.addr, &collector, &["--trace-sampling", "10"]).await;
    let client = h1_client();
    for _ in 0..2000 {
        let r =
            send(&client, http::Request::get(format!("http://127.0.0.1:{port}/")).body(empty()).expect("req")).await;
        assert_eq!(r.status, 200);
    }
    // Every request carried context to the backend, sampled or not.
    let r = get(&format!("http://127.0.0.1:{port}/"), &[]).await;
    assert!(r.json()["headers"]["traceparent"].as_str().is_some_and(|t| t.starts_with("00-")));
    // A last request the caller samples: spans are exported in order, so once its span has
    // arrived, every earlier one has too.
    let marker = format!("{:032x}", 0xfee1);
    get(&format!("http://127.0.0.1:{port}/"), &[("traceparent", &format!("00-{marker}-{:016x}-01", 0xbeef))]).await;
    collector.wait_otlp("the marker trace", |s| s.iter().any(|x| x.trace_id == marker)).await;
    let traces: BTreeSet<String> =
        collector.otlp_spans().into_iter().map(|s| s.trace_id).filter(|t| *t != marker).collect();
    println!("10% sampling: {} traces of 2001 requests", traces.len());
    assert!((140..=260).contains(&traces.len()), "{} traces", traces.len());

    // An upstream decision wins: sampled=0 is never exported, sampled=1 always is.
    let before = collector.otlp_spans().len();
    for i in 0..50 {
        let tp0 = format!("00-{:032x}-{:016x}-00", 0xabc000 + i, 0x1234 + i);
        let r = get(&format!("http://127.0.0.1:{port}/"), &[("traceparent", &tp0)]).await;
        assert!(r.json()["headers"]["traceparent"]
            .as_str()
            .is_some_and(|t| t.ends_with("-00") && t.contains(&format!("{:032x}", 0xabc000 + i))));
    }
    let forced = format!("00-{:032x}-{:016x}-01", 0xfeed, 0xbeef);
    get(&format!("http://127.0.0.1:{port}/"), &[("traceparent", &forced)]).await;
    let spans =
        collector.wait_otlp("the forced trace", |s| s.iter().any(|x| x.trace_id == format!("{:032x}", 0xfeed))).await;
    let forced_span = spans.iter().find(|x| x.trace_id == format!("{:032x}", 0xfeed)).expect("span");
    assert_eq!(forced_span.parent_id.as_deref(), Some(format!("{:016x}", 0xbeef).as_str()), "joins the caller's span");
    // Exactly the trace ids sent with sampled=0 (a looser match, such as "contains abc0", also
    // catches random ids of the 10% sample now and then).
    let unsampled_ids: BTreeSet<String> = (0..50).map(|i| format!("{:032x}", 0xabc000 + i)).collect();
    let unsampled = spans.iter().filter(|s| unsampled_ids.contains(&s.trace_id)).count();
    assert_eq!(unsampled, 0, "sampled=0 traces are not exported");
    assert!(
        spans.len() - before <= 2,
        "only the forced span (and maybe one from the 10% sample of the probe) was added"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_line_per_request_joined_to_its_span() {
    let collector = Collector::start().await;
    let b = Backend::start("b").await;
    let logdir = tempfile::tempdir().expect("tempdir");
    let log = logdir.path().join("access.log");
    let (_d, proxy, port) =
        traced_gateway(b.addr, &collector, &["--trace-sampling", "100", "--access-log", log.to_str().expect("path")])
            .await;
    for i in 0..20 {
        let r = get(&format!("http://127.0.0.1:{port}/item/{i}"), &[("x-request-id", &format!("req-{i}"))]).await;
        assert_eq!(r.status, 200);
    }
    // A client that goes away mid-response still gets its line, flagged DC.
    {
        let resp = h1_client()
            .request(
                http::Request::get(format!("http://127.0.0.1:{port}/bytes?n=200000000")).body(empty()).expect("req"),
            )
            .await
            .expect("resp");
        let mut body = resp.into_body();
        let _ = http_body_util::BodyExt::frame(&mut body).await;
        drop(body);
    }
    let spans = collector.wait_otlp("21 spans", |s| s.len() >= 21).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
        if lines.len() >= 21 {
            break lines;
        }
        assert!(Instant::now() < deadline, "{} lines:\n{text}\n{}", lines.len(), proxy.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a wait on the access log file
    };
    assert_eq!(lines.len(), 21, "exactly one line per request");
    for i in 0..20 {
        let line = lines
            .iter()
            .find(|l| l["x_request_id"] == format!("req-{i}"))
            .unwrap_or_else(|| panic!("no line for req-{i}"));
        assert_eq!(line["path"], format!("/item/{i}"));
        assert_eq!(line["response_code"], 200);
        assert_eq!(line["method"], "GET");
        assert_eq!(line["upstream_host"], b.addr.to_string());
        assert_eq!(line["source_workload"], "edge");
        let span = spans
            .iter()
            .find(|s| s.span_id == line["span_id"].as_str().unwrap_or(""))
            .expect("the line's span was exported");
        assert_eq!(span.trace_id, line["trace_id"].as_str().unwrap_or(""));
    }
    let cut = lines.iter().find(|l| l["path"] == "/bytes").expect("line of the abandoned download");
    assert_eq!(cut["response_flags"], "DC", "{cut}");
    assert_eq!(cut["response_code"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_exporter_costs_requests_nothing_and_is_counted() {
    let b = Backend::start("b").await;
    let dir = ConfigDir::new();
    let mut y = gateway("gw", GW);
    y.push_str(&service("app.internal", "HTTP", &[(b.addr, &[])]));
    y.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route: [{destination: {host: app.internal}}]\n");
    let cfg = dir.write("mesh.yaml", &y);
    let dead = format!("http://127.0.0.1:{}/v1/traces", free_port());
    let proxy = ProxyProc::start(&[
        "--role",
        "gateway",
        "-c",
        cfg.to_str().expect("path"),
        "--trace-sampling",
        "100",
        "--otlp-endpoint",
        &dead,
    ])
    .await;
    let port = proxy.port(GW).await;
    for _ in 0..200 {
        assert_eq!(get(&format!("http://127.0.0.1:{port}/"), &[]).await.status, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = admin_get(proxy.admin, "/metrics").await.expect("metrics").1;
        let dropped: f64 = text
            .lines()
            .find(|l| l.starts_with("trellis_proxy_spans_dropped_total "))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0);
        if dropped >= 200.0 {
            break;
        }
        assert!(Instant::now() < deadline, "drop counter at {dropped}");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval of a wait on a metric
    }
}

async fn python_interop(format: &str) {
    let collector = Collector::start().await;
    let (app_port, inbound) = (free_port(), free_port());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/otel/app.py");
    let mut app = Command::new("python3")
        .arg(&script)
        .arg(app_port.to_string())
        .arg(format)
        .env("OTLP", collector.otlp_url())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", app_port)).await.is_err() {
        if let Ok(Some(s)) = app.try_wait() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut app.stderr.take().expect("stderr"), &mut err);
            panic!("python app exited ({s}); install opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http and opentelemetry-propagator-b3:\n{err}");
        }
        assert!(Instant::now() < deadline, "python app did not start");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval of a wait on the app's port
    }
    let dir = ConfigDir::new();
    let mut y = gateway("gw", GW);
    y.push_str(&service("py.internal", "HTTP", &[(format!("127.0.0.1:{inbound}").parse().expect("addr"), &[])]));
    y.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route: [{destination: {host: py.internal}}]\n");
    let cfg = dir.write("mesh.yaml", &y);
    let cfg = cfg.to_str().expect("path");
    let otlp = collector.otlp_url();
    let fmt_flag = if format == "b3" { "b3" } else { "w3c" };
    let common = ["--trace-sampling", "100", "--otlp-endpoint", otlp.as_str(), "--trace-formats", fmt_flag];
    let gw =
        ProxyProc::start(&[&["--role", "gateway", "--workload", "edge", "-c", cfg][..], &common[..]].concat()).await;
    let gw_port = gw.port(GW).await;
    let inbound_arg = format!("{inbound}={app_port}");
    let _sidecar =
        ProxyProc::start(&[&["--workload", "py", "-c", cfg, "--inbound", &inbound_arg][..], &common[..]].concat())
            .await;

    let r = get(&format!("http://127.0.0.1:{gw_port}/hello"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let app_trace = r.json()["trace_id"].as_str().expect("trace id").to_string();
    let spans = collector.wait_otlp("3 spans", |s| s.len() >= 3).await;
    let _ = app.kill();
    let _ = app.wait();
    assert!(spans.iter().all(|s| s.trace_id == app_trace), "one trace: {spans:#?}");
    let gw = spans.iter().find(|s| s.service == "edge.default").expect("gateway span");
    let side = spans.iter().find(|s| s.service == "py.default").expect("sidecar span");
    let py = spans.iter().find(|s| s.service == "python-app").expect("the app's own span");
    assert_eq!(gw.parent_id, None);
    assert_eq!(side.parent_id.as_deref(), Some(gw.span_id.as_str()));
    assert_eq!(py.parent_id.as_deref(), Some(side.span_id.as_str()), "the app's span is a child of its sidecar's");
    assert_eq!(py.kind, "SERVER");
    let headers = &r.json()["headers"];
    if format == "b3" {
        assert!(headers.get("traceparent").is_none() && headers.get("x-b3-traceid").is_some(), "{headers}");
    } else {
        assert!(headers.get("traceparent").is_some() && headers.get("x-b3-traceid").is_none(), "{headers}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opentelemetry_sdk_app_joins_the_trace_with_w3c() {
    python_interop("w3c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opentelemetry_sdk_app_joins_the_trace_with_b3() {
    python_interop("b3").await;
}

// --- Prometheus ---

fn prometheus_bin() -> String {
    for p in ["/usr/bin/prometheus", "/usr/local/bin/prometheus"] {
        if Path::new(p).is_file() {
            return p.to_string();
        }
    }
    panic!("prometheus is not installed: `apt-get install prometheus` (scripts/test.sh does)");
}

async fn prom_query(addr: SocketAddr, q: &str) -> serde_json::Value {
    let url = format!("http://{addr}/api/v1/query?query={}", urlencode(q));
    let r = get(&url, &[]).await;
    assert_eq!(r.status, 200, "{q}: {}", r.body);
    r.json()["data"]["result"].clone()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Every `expr` in a Grafana dashboard, with its template variables matching everything.
fn dashboard_queries(path: &Path) -> Vec<String> {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("dashboard JSON");
    let mut out = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(e) = m.get("expr").and_then(|e| e.as_str()) {
                    out.push(e.to_string());
                }
                for (k, x) in m {
                    if k != "templating" {
                        walk(x, out);
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&j["panels"], &mut out);
    out.into_iter()
        .map(|q| {
            q.replace("$__rate_interval", "30s")
                .replace("$__range", "5m")
                .replace("$namespace", ".*")
                .replace("$service", ".*")
                .replace("$workload", ".*")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_istio_metrics_and_every_dashboard_query_has_data() {
    let prometheus = prometheus_bin();
    let port = free_port();
    let dir = example("reference-platform", port);
    let up = Up::start(dir.path(), port).await;
    let out = Command::new(trellis_bin())
        .args(["prometheus-config", "--scrape-interval", "1s", "--control-plane", &up.cp.to_string()])
        .output()
        .expect("prometheus-config");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = String::from_utf8(out.stdout).expect("utf8");
    // Eight apps' sidecars, the gateway, and Redis's sidecar (the asynchronous legs).
    assert_eq!(config.matches("- targets:").count(), 10, "{config}");
    let pdir = tempfile::tempdir().expect("tempdir");
    std::fs::write(pdir.path().join("prometheus.yml"), &config).expect("write");
    let paddr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let prom = Command::new(prometheus)
        .arg(format!("--config.file={}", pdir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", pdir.path().join("data").display()))
        .arg(format!("--web.listen-address={paddr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(prom);
    let deadline = Instant::now() + Duration::from_secs(30);
    while get_opt(&format!("http://{paddr}/-/ready")).await != Some(200) {
        assert!(Instant::now() < deadline, "prometheus not ready");
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval of a wait on /-/ready
    }
    // Load: 20 greetings/s (and a few errors) for the rate windows.
    let load_until = Instant::now() + Duration::from_secs(12);
    let url = up.url("/api/greeting");
    let status_url = up.url("/api/status/503");
    let missing_url = up.url("/api/status/404");
    let loader = tokio::spawn(async move {
        let c = h1_client();
        while Instant::now() < load_until {
            let _ = send(&c, http::Request::get(&url).body(empty()).expect("req")).await;
            let _ = send(&c, http::Request::get(&status_url).body(empty()).expect("req")).await;
            let _ = send(&c, http::Request::get(&missing_url).body(empty()).expect("req")).await;
            tokio::time::sleep(Duration::from_millis(50)).await; // rate pacing of the load loop
        }
    });
    // All targets up.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up_count = prom_query(paddr, "sum(up)").await;
        if up_count[0]["value"][1].as_str() == Some("10") {
            break;
        }
        assert!(Instant::now() < deadline, "targets not up: {up_count}");
        tokio::time::sleep(Duration::from_millis(200)).await; // poll interval of a wait on Prometheus targets
    }
    // A rate needs two scrapes of each target: wait until every HTTP service has one.
    let expected = ["a", "b", "c", "d", "e", "g", "h"];
    let deadline = Instant::now() + Duration::from_secs(30);
    let names = loop {
        let rates = prom_query(
            paddr,
            "sum by (destination_service_name) (rate(istio_requests_total{reporter=\"destination\"}[30s]))",
        )
        .await;
        let names: BTreeMap<String, f64> = rates
            .as_array()
            .expect("vector")
            .iter()
            .map(|r| {
                (
                    r["metric"]["destination_service_name"].as_str().unwrap_or("").to_string(),
                    r["value"][1].as_str().unwrap_or("0").parse().unwrap_or(0.0),
                )
            })
            .collect();
        if expected.iter().all(|s| names.get(&format!("service-{s}")).is_some_and(|v| *v > 0.0))
            || Instant::now() >= deadline
        {
            break names;
        }
        tokio::time::sleep(Duration::from_millis(250)).await; // poll interval of a wait on a Prometheus query
    };
    for s in expected {
        assert!(names.get(&format!("service-{s}")).is_some_and(|v| *v > 0.0), "service-{s}: {names:?}");
    }
    assert!(!names.contains_key("service-f"), "F gets no HTTP traffic: {names:?}");
    let p99 = prom_query(
        paddr,
        "histogram_quantile(0.99, sum by (le) (rate(istio_request_duration_milliseconds_bucket[30s])))",
    )
    .await;
    let v: f64 = p99[0]["value"][1].as_str().expect("value").parse().expect("number");
    println!("p99 across the mesh: {v} ms");
    assert!(v.is_finite() && v > 0.0);
    let src = prom_query(paddr, "sum by (source_workload) (istio_requests_total{reporter=\"destination\",destination_service_name=\"service-e\"})").await;
    let sources: Vec<&str> =
        src.as_array().expect("vector").iter().filter_map(|r| r["metric"]["source_workload"].as_str()).collect();
    assert_eq!(sources, vec!["service-b"]);
    // The asynchronous legs over TCP: Redis's sidecar sees D publish, F consume, and C, F, G, H
    // store, each from its own workload, over mTLS.
    let deadline = Instant::now() + Duration::from_secs(30);
    let tcp_sources = loop {
        let res = prom_query(
            paddr,
            "sum by (source_workload) (istio_tcp_connections_opened_total{reporter=\"destination\",destination_service_name=\"redis\",connection_security_policy=\"mutual_tls\"})",
        )
        .await;
        let mut s: Vec<String> = res
            .as_array()
            .expect("vector")
            .iter()
            .filter_map(|r| r["metric"]["source_workload"].as_str().map(str::to_string))
            .collect();
        s.sort();
        if s.len() >= 5 || Instant::now() >= deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(250)).await; // poll interval of a wait on a Prometheus query
    };
    assert_eq!(tcp_sources, ["service-c", "service-d", "service-f", "service-g", "service-h"]);

    let dashboards = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana");
    // Each series needs two scrapes of its own before its rate has data, and a series born a
    // moment after the others (the gateway's first 404, say) can be one scrape behind: a query
    // may wait for it, up to a shared deadline.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut checked = 0;
    for e in std::fs::read_dir(&dashboards).expect("deploy/grafana") {
        let path = e.expect("entry").path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        for q in dashboard_queries(&path) {
            let has_data = |res: &serde_json::Value| res.as_array().is_some_and(|a| !a.is_empty());
            let mut res = prom_query(paddr, &q).await;
            while !has_data(&res) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(250)).await; // poll interval of a wait on a Prometheus query
                res = prom_query(paddr, &q).await;
            }
            assert!(has_data(&res), "{}: no data for {q}", path.display());
            checked += 1;
        }
    }
    println!("{checked} dashboard queries returned data");
    assert!(checked >= 10);
    loader.await.expect("load");
}

async fn get_opt(url: &str) -> Option<u16> {
    h1_client().request(http::Request::get(url).body(empty()).ok()?).await.ok().map(|r| r.status().as_u16())
}
