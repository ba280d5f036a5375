//! Every error the proxy answers for itself: status, body and response flag.

mod support;

use support::*;

async fn gateway_to(yaml_services: &str, route_host: &str, timeout: Option<&str>) -> (ConfigDir, ProxyProc, u16) {
    let dir = ConfigDir::new();
    let mut y = gateway("gw", GW);
    y.push_str(yaml_services);
    let timeout = timeout.map(|t| format!("    timeout: {t}\n")).unwrap_or_default();
    y.push_str(&format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs}}\nspec:\n  hosts: [app.test]\n  gateways: [gw]\n  http:\n  - match: [{{uri: {{prefix: /api}}}}]\n{timeout}    route: [{{destination: {{host: {route_host}}}}}]\n"
    ));
    let cfg = dir.write("mesh.yaml", &y);
    let proxy = ProxyProc::start(&["--role", "gateway", "-c", cfg.to_str().expect("path")]).await;
    let port = proxy.port(GW).await;
    (dir, proxy, port)
}

#[tokio::test]
async fn no_route_is_404_nr_naming_host_and_path() {
    let b = Backend::start("b").await;
    let (_d, _p, port) = gateway_to(&service("b.internal", "HTTP", &[(b.addr, &[])]), "b.internal", None).await;
    let r = get(&format!("http://127.0.0.1:{port}/other"), &[("host", "app.test")]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.flag(), Some("NR"));
    assert_eq!(r.body, "no route for host \"app.test\" and path \"/other\" (NR)\n");
    let r = get(&format!("http://127.0.0.1:{port}/api"), &[("host", "unknown.test")]).await;
    assert_eq!((r.status.as_u16(), r.flag()), (404, Some("NR")));
    assert!(r.body.contains("unknown.test"));
    // The route works for the host it is bound to.
    assert_eq!(get(&format!("http://127.0.0.1:{port}/api"), &[("host", "app.test")]).await.status, 200);
}

#[tokio::test]
async fn no_endpoint_is_503_uh() {
    let svc = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: empty}\nspec:\n  hosts: [empty.internal]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: STATIC\n---\n";
    let (_d, _p, port) = gateway_to(svc, "empty.internal", None).await;
    let r = get(&format!("http://127.0.0.1:{port}/api"), &[("host", "app.test")]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.flag(), Some("UH"));
    assert!(r.body.contains("no healthy upstream") && r.body.contains("outbound|80||empty.internal"), "{}", r.body);
}

#[tokio::test]
async fn connect_failure_is_503_uf() {
    let closed: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let (_d, _p, port) = gateway_to(&service("down.internal", "HTTP", &[(closed, &[])]), "down.internal", None).await;
    let r = get(&format!("http://127.0.0.1:{port}/api"), &[("host", "app.test")]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.flag(), Some("UF"));
    assert!(r.body.contains("upstream connect error") && r.body.contains(&closed.to_string()), "{}", r.body);
}

#[tokio::test]
async fn upstream_reset_is_503_ur() {
    let (addr, _task) = resetting_backend().await;
    let (_d, _p, port) = gateway_to(&service("reset.internal", "HTTP", &[(addr, &[])]), "reset.internal", None).await;
    let r = get(&format!("http://127.0.0.1:{port}/api"), &[("host", "app.test")]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.flag(), Some("UR"));
    assert!(r.body.contains("reset before response headers"), "{}", r.body);
}

#[tokio::test]
async fn timeout_is_504_ut_and_the_proxy_keeps_serving() {
    let b = Backend::start("slow").await;
    let (_d, _p, port) =
        gateway_to(&service("slow.internal", "HTTP", &[(b.addr, &[])]), "slow.internal", Some("100ms")).await;
    let r = get(&format!("http://127.0.0.1:{port}/api/x?sleep_ms=3000"), &[("host", "app.test")]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.flag(), Some("UT"));
    assert_eq!(r.body, "upstream request timeout after 100ms (UT)\n");
    let r = get(&format!("http://127.0.0.1:{port}/api/x"), &[("host", "app.test")]).await;
    assert_eq!(r.status, 200);
}
