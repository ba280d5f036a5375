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
    // A third of all requests fail: more than the default budget's 20%, which by design
    // refuses retries past it. This service's owners allow half.
    let budget = "    retryBudget: {percent: {value: 50}}\n";
    let (_d, proxy, port) = gateway_with(&[&b], retries, budget).await;
    let got = statuses(&format!("http://127.0.0.1:{port}/flaky?every=3"), 3000, 4).await;
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
