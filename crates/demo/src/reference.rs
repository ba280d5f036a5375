//! The reference platform: Services A–H (../REFERENCE-APPS.md §1, as shipped in
//! docs/reference-apps.md). One program; `SERVICE_NAME`, `GREETING` and the downstream URLs
//! (`SERVICE_B_URL=http://service-b`, ...) make it any of the eight.

use std::sync::Arc;

use http::{Method, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::web::{self, Body};

/// The greeting of each service, by letter.
pub fn default_greeting(service: &str) -> &'static str {
    match service.trim_start_matches("Service ").trim_start_matches("service-").to_ascii_uppercase().as_str() {
        "A" => "Hello, from Service A!",
        "B" => "Namasté (नमस्ते), from Service B!",
        "C" => "Konnichiwa (こんにちは), from Service C!",
        "D" => "Shalom (שָׁלוֹם), from Service D!",
        "E" => "Bonjour, from Service E!",
        "F" => "Hola, from Service F!",
        "G" => "Ahlan (أهلا), from Service G!",
        "H" => "Nǐ hǎo (你好), from Service H!",
        _ => "Hello!",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    path: String,
    status: u16,
}

struct App {
    name: String,
    greeting: String,
    downstreams: Vec<String>,
    client: reqwest::Client,
    hostname: String,
    requests: Family<RequestLabels, Counter>,
    registry: Registry,
    /// The service's letter (`A`..`H`): which asynchronous legs it has.
    letter: char,
    /// D publishes here; F consumes from here.
    queue: Option<Arc<crate::redis::Redis>>,
    /// C, F, G and H store their greetings here.
    datastore: Option<Arc<crate::redis::Redis>>,
}

/// Runs one reference service until SIGTERM.
pub async fn run() -> std::io::Result<()> {
    let name = std::env::var("SERVICE_NAME").unwrap_or_else(|_| "Service A".into());
    let greeting = std::env::var("GREETING").unwrap_or_else(|_| default_greeting(&name).to_string());
    // Downstreams are the `SERVICE_<X>_URL` variables, called in name order.
    let mut downstreams: Vec<(String, String)> =
        std::env::vars().filter(|(k, _)| k.starts_with("SERVICE_") && k.ends_with("_URL")).collect();
    downstreams.sort();
    let downstreams: Vec<String> = downstreams.into_iter().map(|(_, v)| v.trim_end_matches('/').to_string()).collect();
    let mut registry = Registry::default();
    let requests = Family::<RequestLabels, Counter>::default();
    registry.register("reference_requests", "Requests served, by path and status", requests.clone());
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    // The asynchronous legs (../REFERENCE-APPS.md §1): D publishes to a queue F consumes; C,
    // F, G and H store their greetings. Redis serves both (`QUEUE_URL`, `DATASTORE_URL`, or the
    // `REDIS_ADDR` of a `redis` upstream under `trellis up`).
    let letter = name.trim_start_matches("Service ").chars().next().unwrap_or('?').to_ascii_uppercase();
    let queue = matches!(letter, 'D' | 'F')
        .then(|| crate::redis::Redis::from_env("QUEUE_URL", "REDIS_ADDR"))
        .flatten()
        .map(Arc::new);
    let datastore = matches!(letter, 'C' | 'F' | 'G' | 'H')
        .then(|| crate::redis::Redis::from_env("DATASTORE_URL", "REDIS_ADDR"))
        .flatten()
        .map(Arc::new);
    for (leg, wanted, set) in [
        ("QUEUE_URL", matches!(letter, 'D' | 'F'), queue.is_some()),
        ("DATASTORE_URL", matches!(letter, 'C' | 'F' | 'G' | 'H'), datastore.is_some()),
    ] {
        if wanted && !set {
            web::log(&name, "info", &format!("{leg} not set; the asynchronous leg is skipped"), serde_json::json!({}));
        }
    }
    let app = Arc::new(App {
        name: name.clone(),
        greeting,
        downstreams,
        client: web::client(),
        hostname,
        requests,
        registry,
        letter,
        queue,
        datastore,
    });
    if app.letter == 'F' && app.queue.is_some() {
        tokio::spawn(consume(app.clone()));
    }
    let port = web::port(8080);
    web::serve(&name, port, move |req| {
        let app = app.clone();
        async move {
            let path = req.uri().path().to_string();
            let resp = app.handle(req).await;
            app.requests
                .get_or_create(&RequestLabels { path: metric_path(&path), status: resp.status().as_u16() })
                .inc();
            resp
        }
    })
    .await
}

/// Bounded label values for the app's own metrics.
fn metric_path(path: &str) -> String {
    if path.starts_with("/api/status/") {
        "/api/status/{code}".into()
    } else if ["/api/greeting", "/api/health", "/api/metrics", "/api/request-echo"].contains(&path) {
        path.to_string()
    } else {
        "other".into()
    }
}

impl App {
    async fn handle(&self, req: http::Request<hyper::body::Incoming>) -> http::Response<Body> {
        let path = req.uri().path().to_string();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/api/greeting") => {
                // `?sleep_ms=N` delays this service's own answer (timeout and shutdown demos).
                let sleep = req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("sleep_ms=")));
                if let Some(ms) = sleep.and_then(|v| v.parse::<u64>().ok()) {
                    tokio::time::sleep(std::time::Duration::from_millis(ms.min(60_000))).await;
                }
                self.greeting(req.headers()).await
            }
            (&Method::GET, "/api/health") => web::json(StatusCode::OK, &serde_json::json!({"alive": true})),
            (&Method::GET, "/api/metrics") => {
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, &self.registry) {
                    Ok(()) => web::text(StatusCode::OK, out),
                    Err(e) => web::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
            (_, "/api/request-echo") => {
                let (parts, body) = web::read_body(req).await;
                let mut out = format!("{} {} {:?}\n", parts.method, parts.uri, parts.version);
                for (k, v) in &parts.headers {
                    out.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
                }
                out.push('\n');
                out.push_str(&String::from_utf8_lossy(&body));
                web::text(StatusCode::OK, out)
            }
            (&Method::GET, p) if p.starts_with("/api/status/") => {
                let code = p["/api/status/".len()..].parse::<u16>().ok().and_then(|c| StatusCode::from_u16(c).ok());
                match code {
                    Some(c) => web::json(c, &serde_json::json!({"status": c.as_u16(), "service": self.name})),
                    None => web::json(StatusCode::BAD_REQUEST, &serde_json::json!({"error": "not a status code"})),
                }
            }
            _ => web::json(StatusCode::NOT_FOUND, &serde_json::json!({"error": "not found", "path": path})),
        }
    }

    async fn greeting(&self, headers: &http::HeaderMap) -> http::Response<Body> {
        let mut greetings: Vec<serde_json::Value> = Vec::new();
        for url in &self.downstreams {
            let call = web::forward(self.client.get(format!("{url}/api/greeting")), headers).send().await;
            let body = match call {
                Ok(r) if r.status().is_success() => r.json::<Vec<serde_json::Value>>().await.map_err(|e| e.to_string()),
                Ok(r) => Err(format!("{url} answered {}", r.status())),
                Err(e) => Err(format!("{url}: {e}")),
            };
            match body {
                Ok(list) => greetings.extend(list),
                Err(e) => {
                    web::log(&self.name, "error", "downstream call failed", serde_json::json!({"error": e}));
                    return web::json(StatusCode::BAD_GATEWAY, &serde_json::json!({"error": e, "service": self.name}));
                }
            }
        }
        let own = self.own_greeting();
        // The asynchronous legs never hold up the answer.
        if let Some(q) = self.queue.as_ref().filter(|_| self.letter == 'D') {
            let message = own.to_string();
            leg(
                &self.name,
                "queue",
                q,
                |r| async move { r.push(crate::redis::QUEUE, message.as_bytes(), 10_000).await },
            );
        }
        if let Some(d) = &self.datastore {
            let message = own.to_string();
            leg(
                &self.name,
                "datastore",
                d,
                |r| async move { r.push(crate::redis::STORE, message.as_bytes(), 1000).await },
            );
        }
        greetings.push(own);
        web::json(StatusCode::OK, &serde_json::Value::Array(greetings))
    }

    fn own_greeting(&self) -> serde_json::Value {
        serde_json::json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "service": self.name,
            "message": self.greeting,
            "created": web::now_rfc3339(),
            "hostname": self.hostname,
        })
    }
}

/// Runs one operation on the queue or the datastore off the request path; a failure is logged
/// (at most every 30 s) and dropped.
fn leg<F, Fut>(name: &str, which: &'static str, redis: &Arc<crate::redis::Redis>, op: F)
where
    F: FnOnce(Arc<crate::redis::Redis>) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    let (name, redis, fut) = (name.to_string(), redis.clone(), op(redis.clone()));
    tokio::spawn(async move {
        if let Err(e) = fut.await {
            if redis.should_log() {
                let fields = serde_json::json!({"addr": redis.addr(), "error": e.to_string()});
                web::log(&name, "error", &format!("{which} unreachable"), fields);
            }
        }
    });
}

/// Service F: consumes the queue D publishes to, storing its own greeting for each message.
async fn consume(app: Arc<App>) {
    let (Some(queue), Some(store)) = (app.queue.clone(), app.datastore.clone()) else { return };
    web::log(&app.name, "info", "consuming the greetings queue", serde_json::json!({"addr": queue.addr()}));
    loop {
        match queue.pop(crate::redis::QUEUE, 5).await {
            Ok(Some(message)) => {
                let mut own = app.own_greeting();
                own["received"] = serde_json::from_slice(&message).unwrap_or(serde_json::Value::Null);
                if let Err(e) = store.push(crate::redis::STORE, own.to_string().as_bytes(), 1000).await {
                    if store.should_log() {
                        web::log(
                            &app.name,
                            "error",
                            "datastore unreachable",
                            serde_json::json!({"error": e.to_string()}),
                        );
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                if queue.should_log() {
                    web::log(&app.name, "error", "queue unreachable", serde_json::json!({"error": e.to_string()}));
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}
