//! Sidecars: the outbound listener as the app's `HTTP_PROXY` (absolute-form requests, as curl
//! and every HTTP library send them), Host-addressed requests, local ports bound to named
//! upstreams, mesh VirtualServices, Kubernetes Service names, and the inbound listener.

mod support;

use std::net::SocketAddr;

use support::*;

async fn curl_via_proxy(proxy: SocketAddr, url: &str, extra: &[&str]) -> (u16, String) {
    let mut args = vec![
        "-s".to_string(),
        "-o".into(),
        "-".into(),
        "-w".into(),
        "\n%{http_code}".into(),
        "--max-time".into(),
        "10".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(url.to_string());
    let out = tokio::task::spawn_blocking(move || {
        // The standard variable, as a workload gets it from `trellis up`.
        std::process::Command::new("curl")
            .args(&args)
            .env("http_proxy", format!("http://{proxy}"))
            .env_remove("no_proxy")
            .output()
            .expect("curl")
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_http_proxy_routes_by_mesh_virtual_services() {
    let (v1, v2) = (Backend::start("reviews-v1").await, Backend::start("reviews-v2").await);
    let ratings = Backend::start("ratings").await;
    let dir = ConfigDir::new();
    let mut y = String::new();
    // Kubernetes Services + WorkloadEntries, as a mesh expansion would declare them.
    y.push_str("apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080}]\n---\n");
    for (name, b, version) in [("reviews-v1", &v1, "v1"), ("reviews-v2", &v2, "v2")] {
        y.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: bookinfo}}\nspec:\n  address: 127.0.0.1\n  ports: {{http: {}}}\n  labels: {{app: reviews, version: {version}}}\n---\n",
            b.addr.port()
        ));
    }
    y.push_str(&service("ratings", "HTTP", &[(ratings.addr, &[])]));
    y.push_str("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  host: reviews\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n---\n");
    y.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n  http:\n  - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n  - route: [{destination: {host: reviews, subset: v1}}]\n");
    let cfg = dir.write("mesh.yaml", &y);
    let p = ProxyProc::start(&[
        "--role",
        "sidecar",
        "--workload",
        "productpage",
        "--namespace",
        "bookinfo",
        "-c",
        cfg.to_str().expect("path"),
        "--outbound",
        "127.0.0.1:0",
    ])
    .await;
    let out_addr = p.listener("outbound").await;

    // HTTP_PROXY clients send absolute-form requests; the short name resolves in the proxy's
    // namespace, and the VirtualService picks the subset.
    let (code, body) = curl_via_proxy(out_addr, "http://reviews:9080/reviews/1", &[]).await;
    assert_eq!(code, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(j["server"], "reviews-v1");
    assert_eq!(j["path"], "/reviews/1");
    assert_eq!(j["headers"]["host"], "reviews:9080");
    assert!(j["headers"].get("proxy-connection").is_none());
    let (_, body) =
        curl_via_proxy(out_addr, "http://reviews.bookinfo.svc.cluster.local:9080/r", &["-H", "end-user: jason"]).await;
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).expect("json")["server"], "reviews-v2");
    // A ServiceEntry host on port 80 with no VirtualService: the default route.
    let (code, body) = curl_via_proxy(out_addr, "http://ratings/x", &[]).await;
    assert_eq!(
        (code, serde_json::from_str::<serde_json::Value>(&body).expect("json")["server"].clone()),
        (200, "ratings".into())
    );
    // Origin-form with a Host header works too.
    let r = get(&format!("http://{out_addr}/y"), &[("host", "ratings")]).await;
    assert_eq!(r.server(), "ratings");
    // Unknown hosts are passed through (ALLOW_ANY, Istio's default); this one does not resolve.
    let (code, body) = curl_via_proxy(out_addr, "http://unknown.example/", &[]).await;
    assert_eq!(code, 503);
    assert!(body.contains("(UF)"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_ports_and_inbound_listener_connect_two_sidecars() {
    let app = Backend::start("service-b").await;
    let dir = ConfigDir::new();
    // The server's sidecar first, on a port of its choosing; then the config that names it.
    let server_cfg = dir.write("server.yaml", "");
    let server = ProxyProc::start(&[
        "--workload",
        "service-b",
        "-c",
        server_cfg.to_str().expect("path"),
        "--inbound",
        &format!("127.0.0.1:0=127.0.0.1:{}", app.addr.port()),
    ])
    .await;
    let in_addr = server.listener("inbound-0").await;
    let cfg = dir.write("mesh.yaml", &service("service-b", "HTTP", &[(in_addr, &[])]));
    let client = ProxyProc::start(&[
        "--workload",
        "service-a",
        "-c",
        cfg.to_str().expect("path"),
        "--upstream",
        "127.0.0.1:0=service-b:80",
    ])
    .await;
    let upstream = client.listener("upstream-0").await.port();

    let r = get(&format!("http://127.0.0.1:{upstream}/api/greeting"), &[("x-request-id", "abc")]).await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["server"], "service-b");
    assert_eq!(j["headers"]["host"], "service-b", "the fixed upstream's authority");
    assert_eq!(j["headers"]["x-request-id"], "abc");
    // Inbound forwards whatever it gets to the app, keep-alive on both sides.
    let r = get(&format!("http://{in_addr}/direct"), &[("host", "anything")]).await;
    assert_eq!(r.server(), "service-b");
    assert_eq!(app.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_traffic_policy_allow_any_passes_through_and_registry_only_refuses() {
    let declared = Backend::start("declared").await;
    // An external host the mesh does not know, standing in at 127.0.0.2.
    let undeclared_port = fixed_http_server("127.0.0.2:0", "undeclared").await.port();
    let dir = ConfigDir::new();
    let mesh = service("external.test", "HTTP", &[(declared.addr, &[])]);
    let sidecar = |mode: &str| {
        format!("{mesh}apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: istio-system}}\nspec:\n  outboundTrafficPolicy: {{mode: {mode}}}\n")
    };
    let cfg = dir.write("mesh.yaml", &sidecar("ALLOW_ANY"));
    let p =
        ProxyProc::start(&["--workload", "app", "-c", cfg.to_str().expect("path"), "--outbound", "127.0.0.1:0"]).await;
    let out = p.listener("outbound").await;
    let undeclared_url = format!("http://127.0.0.2:{undeclared_port}/");

    // ALLOW_ANY: the declared host through its cluster, the undeclared one passed through.
    let (code, body) = curl_via_proxy(out, "http://external.test/", &[]).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = curl_via_proxy(out, &undeclared_url, &[]).await;
    assert_eq!((code, body.as_str()), (200, "undeclared"), "passed through under ALLOW_ANY");

    // REGISTRY_ONLY: the undeclared host is refused with 502 NR, the declared one still works.
    let v0 = p.version().await;
    dir.write("mesh.yaml", &sidecar("REGISTRY_ONLY"));
    p.wait_version_change(&v0, std::time::Duration::from_secs(5)).await;
    let (code, body) = curl_via_proxy(out, &undeclared_url, &["-D", "-"]).await;
    assert_eq!(code, 502, "{body}");
    assert!(body.to_ascii_lowercase().contains("x-trellis-response-flags: nr"), "{body}");
    let (code, body) = curl_via_proxy(out, "http://external.test/", &[]).await;
    assert_eq!(code, 200, "{body}");

    let m = support::mesh::metrics(p.admin).await;
    let sum = |svc: &str, code: &str| {
        support::mesh::metric_sum(
            &m,
            "istio_requests_total",
            &[("destination_service_name", svc), ("response_code", code)],
        )
    };
    assert_eq!(sum("PassthroughCluster", "200"), 1.0, "{m}");
    assert_eq!(sum("BlackHoleCluster", "502"), 1.0, "{m}");
}
