//! Resilience policies through a real gateway: retries (conditions, methods, body replay,
//! per-try timeout, the retry budget). Misbehaving upstreams are test backends that fail on
//! command (`/flaky`, `/status/N`, `/slow`).

mod support;

use support::mesh::{metric_sum, metrics};
use support::*;

/// A gateway routing everything to `app.internal` (the given backends), with `route_extra`
/// under the route (e.g. a `retries:` block) and `dr` as the DestinationRule's trafficPolicy.
async fn gateway_with(backends: &[&Backend], route_extra: &str, dr: &str) -> (ConfigDir, ProxyProc, u16) {
    let dir = ConfigDir::new();
    let mut y = gateway("gw", GW);
    let eps: Vec<(std::net::SocketAddr, &[(&str, &str)])> = backends.iter().map(|b| (b.addr, &[][..])).collect();
    y.push_str(&service("app.internal", "HTTP", &eps));
    y.push_str(&format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs}}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route: [{{destination: {{host: app.internal}}}}]\n{route_extra}"
    ));
    if !dr.is_empty() {
        y.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: app}}\nspec:\n  host: app.internal\n  trafficPolicy:\n{dr}"
        ));
    }
    let cfg = dir.write("mesh.yaml", &y);
    let proxy = ProxyProc::start(&["--role", "gateway", "-c", cfg.to_str().expect("path")]).await;
    let port = proxy.port(GW).await;
    (dir, proxy, port)
}

/// `n` GETs of `url` over `concurrency` keep-alive clients: the status of each.
async fn statuses(url: &str, n: usize, concurrency: usize) -> Vec<u16> {
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            let mut out = Vec::new();
            for _ in (c..n).step_by(concurrency) {
                let req = http::Request::get(url.as_str()).body(empty()).expect("req");
                out.push(send(&client, req).await.status.as_u16());
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_an_upstream_failing_one_request_in_three() {
    let b = Backend::start("flaky").await;
    let retries = "    retries: {attempts: 3, retryOn: 5xx}\n";
    let (_d, proxy, port) = gateway_with(&[&b], retries, "").await;
    // One client, so the upstream's every third request is a failing first try or a retry in
    // turn (with several clients their requests interleave, and a retry can land on the next
    // failing turn: that is chance, not the policy).
    let got = statuses(&format!("http://127.0.0.1:{port}/flaky?every=3"), 3000, 1).await;
    let ok = got.iter().filter(|s| **s == 200).count();
    let upstream = b.count();
    let m = metrics(proxy.admin).await;
    println!("{ok}/3000 succeeded; the upstream saw {upstream} requests");
    println!("{}", m.lines().filter(|l| l.contains("retries")).collect::<Vec<_>>().join("\n"));
    assert!(ok * 1000 >= 3000 * 995, "success {ok}/3000 is under 99.5%");
    assert!(upstream >= 4400, "one failure in three was retried: the upstream saw {upstream} requests");
    let sent = metric_sum(&m, "trellis_proxy_upstream_retries_total", &[("outcome", "sent"), ("reason", "5xx")]);
    assert_eq!(sent as usize, upstream - 3000, "every retry is counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_policy_retries_idempotent_requests_only_and_a_route_policy_replays_bodies() {
    // No `retries`: Istio's default policy (2 retries on 503 and connection failures), for
    // idempotent methods only.
    let b = Backend::start("down").await;
    let (_d, _p, port) = gateway_with(&[&b], "", "").await;
    let client = h1_client();
    let get =
        send(&client, http::Request::get(format!("http://127.0.0.1:{port}/status/503")).body(empty()).expect("req"))
            .await;
    assert_eq!((get.status.as_u16(), b.count()), (503, 3), "a GET is tried 3 times");
    let post = send(
        &client,
        http::Request::post(format!("http://127.0.0.1:{port}/status/503")).body(full("order #1")).expect("req"),
    )
    .await;
    assert_eq!((post.status.as_u16(), b.count()), (503, 4), "a POST is sent once: it may have taken effect");

    // The route's own policy retries a POST, sending its body again.
    let f = Backend::start("flaky").await;
    let (_d2, _p2, port2) = gateway_with(&[&f], "    retries: {attempts: 2, retryOn: \"503\"}\n", "").await;
    let payload = "x".repeat(20_000);
    for i in 0..10 {
        let r = send(
            &client,
            http::Request::post(format!("http://127.0.0.1:{port2}/flaky?every=2"))
                .body(full(payload.clone()))
                .expect("req"),
        )
        .await;
        assert_eq!(r.status, 200, "POST {i}: {}", r.body);
        assert_eq!(r.json()["received"], 20_000, "the retry carried the whole body: {}", r.body);
    }
    assert!(f.count() >= 15, "half the tries failed and were retried: {}", f.count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_try_timeout_ends_each_try_and_the_route_answers_504() {
    let b = Backend::start("slow").await;
    let (_d, _p, port) =
        gateway_with(&[&b], "    retries: {attempts: 2, perTryTimeout: 100ms, retryOn: gateway-error}\n", "").await;
    let r = get(&format!("http://127.0.0.1:{port}/slow?ms=3000"), &[]).await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.flag(), Some("UT"));
    // Three tries reached the backend while each (3 s of work) was still running: the
    // per-try timeout, not the backend, ended them.
    assert_eq!(b.count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stay_within_the_budget_when_every_request_fails() {
    let b = Backend::start("down").await;
    let (_d, proxy, port) = gateway_with(
        &[&b],
        "    retries: {attempts: 5, retryOn: 5xx}\n",
        "    retryBudget: {percent: {value: 20}, minRetryConcurrency: 1}\n",
    )
    .await;
    let got = statuses(&format!("http://127.0.0.1:{port}/status/503"), 1000, 20).await;
    assert!(got.iter().all(|s| *s == 503));
    let upstream = b.count();
    let share = (upstream - 1000) as f64 / upstream as f64 * 100.0;
    let m = metrics(proxy.admin).await;
    let refused = metric_sum(&m, "trellis_proxy_upstream_retries_total", &[("outcome", "budget_exhausted")]);
    println!(
        "upstream saw {upstream} requests for 1000: retries are {share:.1}% of them; {refused} refused by the budget"
    );
    // Unlimited, 5 retries each would be 83% of the upstream's requests.
    assert!(share <= 25.0, "retries are {share:.1}% of upstream requests, over the 20% budget (+5 points)");
    assert!(upstream > 1000 && refused > 0.0, "the budget allowed some retries and refused others");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_hit_their_share_and_delays_show_in_the_access_log() {
    let b = Backend::start("app").await;
    let dir = ConfigDir::new();
    let log = dir.path().join("access.log");
    let mut y = gateway("gw", GW);
    y.push_str(&service("app.internal", "HTTP", &[(b.addr, &[])]));
    y.push_str(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - match: [{uri: {prefix: /abort}}]\n    fault: {abort: {httpStatus: 418, percentage: {value: 30}}}\n    route: [{destination: {host: app.internal}}]\n  - match: [{uri: {prefix: /delay}}]\n    fault: {delay: {fixedDelay: 50ms, percentage: {value: 10}}}\n    route: [{destination: {host: app.internal}}]\n",
    );
    let cfg = dir.write("mesh.yaml", &y);
    let proxy = ProxyProc::start(&[
        "--role",
        "gateway",
        "-c",
        cfg.to_str().expect("path"),
        "--access-log",
        log.to_str().expect("path"),
    ])
    .await;
    let port = proxy.port(GW).await;
    let got = statuses(&format!("http://127.0.0.1:{port}/abort"), 3000, 8).await;
    let aborted = got.iter().filter(|s| **s == 418).count();
    let share = aborted as f64 / 30.0;
    println!("{aborted}/3000 aborted ({share:.1}%); the upstream saw {}", b.count());
    assert!((27.0..=33.0).contains(&share), "aborted {share:.1}%, configured 30%");
    assert_eq!(got.len() - aborted, b.count(), "aborted requests never reach the upstream");

    let got = statuses(&format!("http://127.0.0.1:{port}/delay"), 1000, 20).await;
    assert!(got.iter().all(|s| *s == 200));
    let lines = wait_lines(&log, 4000).await;
    let delay_lines: Vec<&serde_json::Value> = lines.iter().filter(|l| l["path"] == "/delay").collect();
    let delayed: Vec<&&serde_json::Value> = delay_lines.iter().filter(|l| l["response_flags"] == "DI").collect();
    let share = delayed.len() as f64 / 10.0;
    println!("{} of 1000 delayed ({share:.1}%)", delayed.len());
    assert!((7.0..=13.0).contains(&share), "delayed {share:.1}%, configured 10%");
    assert!(
        delayed.iter().all(|l| l["duration"].as_f64().unwrap_or(0.0) >= 50.0),
        "every delayed request's logged duration includes the 50ms delay"
    );
    let aborted_lines = lines.iter().filter(|l| l["response_flags"] == "FI" && l["response_code"] == 418).count();
    assert_eq!(aborted_lines, aborted, "each abort is logged with FI");
    let m = metrics(proxy.admin).await;
    assert_eq!(metric_sum(&m, "trellis_proxy_faults_injected_total", &[("kind", "abort")]) as usize, aborted);
    assert_eq!(metric_sum(&m, "trellis_proxy_faults_injected_total", &[("kind", "delay")]) as usize, delayed.len());
}

/// The access log's lines, once it has `n` of them.
async fn wait_lines(log: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(std::time::Instant::now() < deadline, "{} access log lines, waiting for {n}", lines.len());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await; // poll interval of a wait on the access log file
    }
}

/// Three endpoints behind a round-robin gateway with outlier detection as `outlier` says, and
/// no retries (each failure reaches the client, so the test sees what the balancer did).
async fn outlier_gateway(backends: &[&Backend], outlier: &str) -> (ConfigDir, ProxyProc, u16) {
    gateway_with(
        backends,
        "    retries: {attempts: 0}\n",
        &format!("    loadBalancer: {{simple: ROUND_ROBIN}}\n    outlierDetection: {outlier}\n"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_gets_no_traffic_and_comes_back() {
    let (a, b, bad) = (Backend::start("a").await, Backend::start("b").await, Backend::start("bad").await);
    bad.fail(500);
    let (_d, proxy, port) = outlier_gateway(
        &[&a, &b, &bad],
        "{consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 100}",
    )
    .await;
    let url = format!("http://127.0.0.1:{port}/");
    // One at a time, so the endpoint's third failure ejects it before another request is sent.
    let client = h1_client();
    let mut statuses = Vec::new();
    let mut ejected_at = None;
    for _ in 0..150 {
        let sent = std::time::Instant::now();
        let req = http::Request::get(url.as_str()).body(empty()).expect("req");
        let status = send(&client, req).await.status.as_u16();
        statuses.push(status);
        if status == 500 && statuses.iter().filter(|s| **s == 500).count() == 3 {
            ejected_at = Some(sent); // the ejection happened after the third failing request was sent
        }
    }
    let ejected_at = ejected_at.expect("three failures");
    // (150 requests take well under the 3s ejection.)
    assert_eq!(bad.count(), 3, "ejected after its third consecutive 5xx, then no traffic");
    assert_eq!(statuses.iter().filter(|s| **s == 500).count(), 3);
    assert_eq!(a.count() + b.count(), 147);
    let m = metrics(proxy.admin).await;
    assert_eq!(metric_sum(&m, "trellis_proxy_outlier_ejections_total", &[("reason", "consecutive_5xx")]), 1.0);

    // Healthy again; it gets traffic once its ejection time (3s) is up, not before.
    bad.fail(0);
    let deadline = ejected_at + std::time::Duration::from_secs(20);
    while bad.count() == 3 {
        assert!(std::time::Instant::now() < deadline, "the endpoint never came back");
        let r = send(&client, http::Request::get(url.as_str()).body(empty()).expect("req")).await;
        assert_eq!(r.status, 200);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await; // request pacing while waiting for the return
    }
    let back = ejected_at.elapsed();
    assert!(back >= std::time::Duration::from_secs(3), "back only after baseEjectionTime, not {back:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ejection_percent_keeps_endpoints_in_service() {
    let (a, bad1, bad2) = (Backend::start("a").await, Backend::start("bad1").await, Backend::start("bad2").await);
    bad1.fail(503);
    bad2.fail(503);
    // 34% of 3 endpoints: one may be ejected, the other failing one stays.
    let (_d, proxy, port) = outlier_gateway(
        &[&a, &bad1, &bad2],
        "{consecutive5xxErrors: 2, baseEjectionTime: 60s, maxEjectionPercent: 34}",
    )
    .await;
    let client = h1_client();
    for _ in 0..90 {
        send(&client, http::Request::get(format!("http://127.0.0.1:{port}/")).body(empty()).expect("req")).await;
    }
    let (c1, c2) = (bad1.count(), bad2.count());
    println!("failing endpoints saw {c1} and {c2} of 90 requests");
    assert!(c1.min(c2) == 2 && c1.max(c2) >= 30, "one ejected after 2 failures, the other kept: {c1}, {c2}");
    let m = metrics(proxy.admin).await;
    assert_eq!(metric_sum(&m, "trellis_proxy_outlier_ejections_total", &[]), 1.0);
}

/// `n` concurrent GETs of `url`, each on its own connection: (status, flag) of each.
async fn burst(url: &str, n: usize) -> Vec<(u16, Option<String>)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let url = url.to_string();
            tokio::spawn(async move {
                let r = get(&url, &[]).await;
                (r.status.as_u16(), r.flag().map(str::to_string))
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("request task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_pool_limits_overflow_with_503_uo_and_the_upstream_never_sees_more() {
    let b = Backend::start("slow").await;
    let (_d, proxy, port) = gateway_with(
        &[&b],
        "    retries: {attempts: 0}\n",
        "    connectionPool:\n      tcp: {maxConnections: 2}\n      http: {http1MaxPendingRequests: 2}\n",
    )
    .await;
    // 8 at once, each holding its connection 400 ms: 2 are served, 2 wait for a connection,
    // 4 overflow at once.
    let got = burst(&format!("http://127.0.0.1:{port}/slow?ms=400"), 8).await;
    let ok = got.iter().filter(|(s, _)| *s == 200).count();
    let overflow = got.iter().filter(|(s, f)| *s == 503 && f.as_deref() == Some("UO")).count();
    println!(
        "{got:?}; upstream peak {} with {} connections",
        b.peak.load(std::sync::atomic::Ordering::SeqCst),
        b.connections.load(std::sync::atomic::Ordering::SeqCst)
    );
    assert_eq!((ok, overflow), (4, 4), "{got:?}");
    assert!(b.peak.load(std::sync::atomic::Ordering::SeqCst) <= 2, "never more than 2 requests at the upstream");
    assert!(b.connections.load(std::sync::atomic::Ordering::SeqCst) <= 2, "never more than 2 connections");
    let m = metrics(proxy.admin).await;
    assert_eq!(metric_sum(&m, "trellis_proxy_upstream_overflows_total", &[("limit", "pending_requests")]), 4.0);

    // http2MaxRequests bounds the requests in flight to the service, over any connections.
    let b2 = Backend::start("slow2").await;
    let (_d2, _p2, port2) = gateway_with(
        &[&b2],
        "    retries: {attempts: 0}\n",
        "    connectionPool:\n      http: {http2MaxRequests: 3}\n",
    )
    .await;
    let got = burst(&format!("http://127.0.0.1:{port2}/slow?ms=400"), 6).await;
    let ok = got.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(ok, 3, "{got:?}");
    assert!(got.iter().all(|(s, f)| *s == 200 || (*s == 503 && f.as_deref() == Some("UO"))), "{got:?}");
    assert!(b2.peak.load(std::sync::atomic::Ordering::SeqCst) <= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_are_answered_and_allowed_origins_decorated_per_policy() {
    let b = Backend::start("app").await;
    let dir = ConfigDir::new();
    let mut y = gateway("gw", GW);
    y.push_str(&service("app.internal", "HTTP", &[(b.addr, &[])]));
    y.push_str(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - match: [{uri: {prefix: /strict}}]\n    corsPolicy: {allowOrigins: [{exact: https://shop.test}], allowMethods: [GET], unmatchedPreflights: IGNORE}\n    route: [{destination: {host: app.internal}}]\n  - corsPolicy:\n      allowOrigins: [{exact: https://shop.test}, {prefix: \"https://dev.\"}]\n      allowMethods: [GET, POST]\n      allowHeaders: [x-token]\n      exposeHeaders: [x-trace]\n      maxAge: 1h\n      allowCredentials: true\n    route: [{destination: {host: app.internal}}]\n",
    );
    let cfg = dir.write("mesh.yaml", &y);
    let proxy = ProxyProc::start(&["--role", "gateway", "-c", cfg.to_str().expect("path")]).await;
    let port = proxy.port(GW).await;
    let client = h1_client();
    let preflight = |path: &str, origin: &str| {
        http::Request::builder()
            .method("OPTIONS")
            .uri(format!("http://127.0.0.1:{port}{path}"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "x-token")
            .body(empty())
            .expect("req")
    };

    let r = send(&client, preflight("/api", "https://dev.shop.test")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some("https://dev.shop.test"));
    assert_eq!(r.header("access-control-allow-methods"), Some("GET,POST"));
    assert_eq!(r.header("access-control-allow-headers"), Some("x-token"));
    assert_eq!(r.header("access-control-max-age"), Some("3600"));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(b.count(), 0, "an allowed preflight is answered by the proxy");

    let r = send(&client, preflight("/api", "https://evil.test")).await;
    assert_eq!((r.status.as_u16(), r.header("access-control-allow-origin")), (200, None));
    assert_eq!(b.count(), 1, "a preflight from another origin goes on to the upstream (FORWARD)");
    let r = send(&client, preflight("/strict", "https://evil.test")).await;
    assert_eq!((r.status.as_u16(), r.header("access-control-allow-origin")), (200, None));
    assert_eq!(b.count(), 1, "with IGNORE it is answered by the proxy, without CORS headers");

    let r = get(&format!("http://127.0.0.1:{port}/api"), &[("origin", "https://shop.test")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some("https://shop.test"));
    assert_eq!(r.header("access-control-expose-headers"), Some("x-trace"));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    let r = get(&format!("http://127.0.0.1:{port}/api"), &[("origin", "https://evil.test")]).await;
    assert_eq!((r.status.as_u16(), r.header("access-control-allow-origin")), (200, None));
    assert_eq!(b.count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_get_their_share_and_a_dead_mirror_changes_nothing_for_the_client() {
    let (app, shadow) = (Backend::start("app").await, Backend::start("shadow").await);
    // A mirror that accepts connections and never answers.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hole_addr = hole.local_addr().expect("addr");
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = hole.accept().await {
            keep.lock().expect("lock").push(s);
        }
    });
    let dir = ConfigDir::new();
    let mut y = gateway("gw", GW);
    y.push_str(&service("app.internal", "HTTP", &[(app.addr, &[])]));
    y.push_str(&service("shadow.internal", "HTTP", &[(shadow.addr, &[])]));
    y.push_str(&service("hole.internal", "HTTP", &[(hole_addr, &[])]));
    y.push_str(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - match: [{uri: {prefix: /dead}}]\n    route: [{destination: {host: app.internal}}]\n    mirror: {host: hole.internal}\n  - route: [{destination: {host: app.internal}}]\n    mirror: {host: shadow.internal}\n    mirrorPercentage: {value: 50}\n",
    );
    let cfg = dir.write("mesh.yaml", &y);
    let proxy = ProxyProc::start(&["--role", "gateway", "-c", cfg.to_str().expect("path")]).await;
    let port = proxy.port(GW).await;

    let got = statuses(&format!("http://127.0.0.1:{port}/live"), 1000, 4).await;
    assert!(got.iter().all(|s| *s == 200));
    // The copies are sent on their own: wait until the mirror has every one the proxy sent.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let sent = loop {
        let m = metrics(proxy.admin).await;
        let sent = metric_sum(&m, "trellis_proxy_mirrored_requests_total", &[("outcome", "sent")]) as usize;
        if sent > 0 && shadow.count() == sent {
            break sent;
        }
        assert!(std::time::Instant::now() < deadline, "the mirror saw {} of {sent} copies", shadow.count());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await; // poll interval of a wait on /metrics
    };
    let share = sent as f64 / 10.0;
    println!("{sent} of 1000 mirrored ({share:.1}%)");
    assert!((45.0..=55.0).contains(&share), "mirrored {share:.1}%, configured 50%");
    assert_eq!(app.count(), 1000, "the primary got every request");

    // Every request's copy goes to a mirror that never answers: the client sees nothing of it.
    let outcome = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        statuses(&format!("http://127.0.0.1:{port}/dead"), 200, 4),
    )
    .await
    .expect("requests with a dead mirror complete");
    assert!(outcome.iter().all(|s| *s == 200));
    let m = metrics(proxy.admin).await;
    let answered = metric_sum(
        &m,
        "trellis_proxy_mirrored_requests_total",
        &[("cluster_name", "outbound|80||hole.internal"), ("outcome", "answered")],
    );
    assert_eq!(answered, 0.0, "the dead mirror answered none of the copies the clients did not wait for");
    assert!(!held.lock().expect("lock").is_empty(), "copies did reach the dead mirror");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_local_rate_limit_envoyfilter_holds_the_configured_rate() {
    let b = Backend::start("app").await;
    let dir = ConfigDir::new();
    let mut y = gateway("gw", GW);
    y.push_str(&service("app.internal", "HTTP", &[(b.addr, &[])]));
    y.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route: [{destination: {host: app.internal}}]\n---\n");
    // Istio's documented shape, unchanged but for the context (the gateway) and the bucket:
    // 5 tokens every 100 ms, 50 requests a second.
    y.push_str(
        r#"apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: filter-local-ratelimit-gw, namespace: istio-system}
spec:
  workloadSelector:
    labels: {istio: ingressgateway}
  configPatches:
  - applyTo: HTTP_FILTER
    match:
      context: GATEWAY
      listener:
        filterChain:
          filter: {name: envoy.filters.network.http_connection_manager}
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.local_ratelimit
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
          value:
            stat_prefix: http_local_rate_limiter
            token_bucket: {max_tokens: 5, tokens_per_fill: 5, fill_interval: 0.1s}
            filter_enabled:
              runtime_key: local_rate_limit_enabled
              default_value: {numerator: 100, denominator: HUNDRED}
            filter_enforced:
              runtime_key: local_rate_limit_enforced
              default_value: {numerator: 100, denominator: HUNDRED}
            response_headers_to_add:
            - append: false
              header: {key: x-local-rate-limit, value: "true"}
"#,
    );
    let cfg = dir.write("mesh.yaml", &y);
    let proxy = ProxyProc::start(&["--role", "gateway", "-c", cfg.to_str().expect("path")]).await;
    let port = proxy.port(GW).await;
    // 100 requests a second for 10 s: twice the limit.
    let samples = support::load::Load::open_loop(&format!("http://127.0.0.1:{port}/"), 100, 1000).finish().await;
    let first = samples.iter().map(|s| s.sent).min().expect("samples");
    let last = samples.iter().map(|s| s.sent).max().expect("samples");
    let window = (last - first).as_secs_f64();
    let accepted = samples.iter().filter(|s| s.status == 200).count() as f64;
    let refused = samples.iter().filter(|s| s.status == 429).count() as f64;
    assert_eq!((accepted + refused) as usize, samples.len(), "every request got 200 or 429");
    // The bucket starts full (5), then 50 a second.
    let expected = 5.0 + 50.0 * window;
    println!(
        "{accepted} accepted, {refused} refused over {window:.2}s: {:.1}/s (expected {:.1})",
        accepted / window,
        expected / window
    );
    assert!((accepted - expected).abs() <= expected * 0.05, "{accepted} accepted, expected {expected:.0} ±5%");
    let r = get(&format!("http://127.0.0.1:{port}/"), &[]).await;
    if r.status == 429 {
        assert_eq!(r.header("x-local-rate-limit"), Some("true"));
        assert_eq!(r.header("x-ratelimit-limit"), Some("5"));
        assert_eq!(r.flag(), Some("RL"));
    }
    let m = metrics(proxy.admin).await;
    assert_eq!(
        metric_sum(&m, "trellis_proxy_rate_limited_requests_total", &[("outcome", "refused")]) as usize,
        refused as usize + usize::from(r.status == 429)
    );
    assert_eq!(
        b.count() as f64,
        accepted + f64::from(u8::from(r.status == 200)),
        "refused requests never reach the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_local_rate_limits_give_each_selected_route_its_own_bucket() {
    let b = Backend::start("app").await;
    let dir = ConfigDir::new();
    let mut y = gateway("gw", GW);
    y.push_str(&service("app.internal", "HTTP", &[(b.addr, &[])]));
    y.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - name: limited\n    match: [{uri: {prefix: /limited}}]\n    route: [{destination: {host: app.internal}}]\n  - name: by-kind\n    match: [{uri: {prefix: /kind}}]\n    route: [{destination: {host: app.internal}}]\n  - name: free\n    route: [{destination: {host: app.internal}}]\n---\n");
    // Istio's documented per-route shape: the filter inserted with no bucket of its own, then a
    // bucket on the routes one HTTP_ROUTE patch selects (by virtual host and route name).
    y.push_str(&format!(
        r#"apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {{name: per-route, namespace: istio-system}}
spec:
  workloadSelector:
    labels: {{istio: ingressgateway}}
  configPatches:
  - applyTo: HTTP_FILTER
    match:
      context: GATEWAY
      listener:
        filterChain:
          filter: {{name: envoy.filters.network.http_connection_manager}}
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.local_ratelimit
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
          value: {{stat_prefix: http_local_rate_limiter}}
  - applyTo: HTTP_ROUTE
    match:
      context: GATEWAY
      routeConfiguration:
        vhost:
          name: "*:{GW}"
          route: {{name: limited, action: ANY}}
    patch:
      operation: MERGE
      value:
        typed_per_filter_config:
          envoy.filters.http.local_ratelimit:
            "@type": type.googleapis.com/udpa.type.v1.TypedStruct
            type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
            value:
              stat_prefix: http_local_rate_limiter
              token_bucket: {{max_tokens: 3, tokens_per_fill: 3, fill_interval: 60s}}
              filter_enabled: {{runtime_key: e, default_value: {{numerator: 100, denominator: HUNDRED}}}}
              filter_enforced: {{runtime_key: f, default_value: {{numerator: 100, denominator: HUNDRED}}}}
---
apiVersion: trellis.dev/v1alpha1
kind: RateLimit
metadata: {{name: by-kind, namespace: istio-system}}
spec:
  selector: {{matchLabels: {{istio: ingressgateway}}}}
  requests: 2
  interval: 60s
  routes: [by-kind]
"#
    ));
    let cfg = dir.write("mesh.yaml", &y);
    let analyzed = std::process::Command::new(support::trellis_bin()).arg("analyze").arg(&cfg).output().expect("run");
    let text = format!("{}{}", String::from_utf8_lossy(&analyzed.stdout), String::from_utf8_lossy(&analyzed.stderr));
    assert!(analyzed.status.success() && !text.contains("TRL0005") && !text.contains("not applied"), "{text}");
    let proxy = ProxyProc::start(&["--role", "gateway", "-c", cfg.to_str().expect("path")]).await;
    let port = proxy.port(GW).await;
    let mut statuses = std::collections::BTreeMap::<&str, Vec<u16>>::new();
    for path in ["/limited", "/kind", "/free"] {
        for _ in 0..10 {
            statuses
                .entry(path)
                .or_default()
                .push(get(&format!("http://127.0.0.1:{port}{path}"), &[]).await.status.as_u16());
        }
    }
    let ok_then_refused = |n: usize| [vec![200u16; n], vec![429; 10 - n]].concat();
    assert_eq!(statuses["/limited"], ok_then_refused(3), "the EnvoyFilter route's bucket of 3");
    assert_eq!(statuses["/kind"], ok_then_refused(2), "the RateLimit route's bucket of 2, its own");
    assert_eq!(statuses["/free"], vec![200; 10], "a route no limit selects");
    assert_eq!(b.count(), 3 + 2 + 10, "refused requests never reach the upstream");
    let m = metrics(proxy.admin).await;
    let refused = |policy: &str| {
        metric_sum(&m, "trellis_proxy_rate_limited_requests_total", &[("outcome", "refused"), ("policy", policy)])
    };
    assert_eq!(refused("EnvoyFilter istio-system/per-route"), 7.0);
    assert_eq!(refused("RateLimit istio-system/by-kind"), 8.0);
}
