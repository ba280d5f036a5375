//! Traffic for tests that change config under load, and the property they assert: the switch
//! from the old config to the new one is atomic.
//!
//! Every loop is bounded in count and in time. Samples carry the instants a request was sent
//! and its answer received, so assertions compare against signals the system exposes (the
//! first new answer, the moment a proxy reported the new version) rather than wall-clock
//! windows.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

use super::{empty, h1_client};

/// One request of a load loop.
#[derive(Clone, Debug)]
pub struct Sample {
    pub sent: Instant,
    pub received: Instant,
    /// 0 when the request failed without a response.
    pub status: u16,
    pub body: String,
    /// The dedicated connection it went over (`None`: the open loop's pooled client).
    pub conn: Option<usize>,
}

/// Status and body of a response (status 0 and the error as body when there was none within
/// 10 s).
async fn answer<E: std::fmt::Display>(
    response: impl std::future::Future<Output = Result<http::Response<hyper::body::Incoming>, E>>,
) -> (u16, String) {
    match tokio::time::timeout(Duration::from_secs(10), response).await {
        Ok(Ok(r)) => {
            let status = r.status().as_u16();
            let b = r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            (status, String::from_utf8_lossy(&b).into_owned())
        }
        Ok(Err(e)) => (0, format!("error: {e}")),
        Err(_) => (0, "error: no answer in 10 s".into()),
    }
}

/// Traffic running in the background.
pub struct Load {
    samples: Arc<Mutex<Vec<Sample>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Set: the open loop sends no more requests.
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Load {
    /// Open loop: `count` GETs of `url`, `rate` per second, each on its own task over a pooled
    /// HTTP/1.1 client (what a busy client population looks like).
    pub fn open_loop(url: &str, rate: u32, count: u32) -> Load {
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
        let stop: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let (url, s, halt) = (url.to_string(), samples.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let client = h1_client();
            let start = Instant::now();
            let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
            let mut tasks = Vec::new();
            for i in 0..count {
                // Rate pacing of an open-loop load generator.
                tokio::time::sleep_until((start + interval * i).into()).await;
                if halt.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let (c, u, s) = (client.clone(), url.clone(), s.clone());
                tasks.push(tokio::spawn(async move {
                    let sent = Instant::now();
                    let req = http::Request::get(u).body(empty()).expect("request");
                    let (status, body) = answer(c.request(req)).await;
                    let sample = Sample { sent, received: Instant::now(), status, body, conn: None };
                    s.lock().expect("samples").push(sample);
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        });
        Load { samples, tasks: vec![task], stop }
    }

    /// Stops an open loop before its count (the requests already sent complete).
    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// `conns` dedicated keep-alive HTTP/1.1 connections, each sending `per_conn` GETs of
    /// `url` one after another (`pause` between them), so each connection's answers are in
    /// order; a connection stops at its first failure.
    pub fn per_connection(url: &str, conns: usize, per_conn: usize, pause: Duration) -> Load {
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
        let uri: http::Uri = url.parse().expect("url");
        let authority = uri.authority().expect("authority").to_string();
        let path = uri.path_and_query().map(|p| p.to_string()).unwrap_or_else(|| "/".into());
        let tasks = (0..conns)
            .map(|c| {
                let (s, authority, path) = (samples.clone(), authority.clone(), path.clone());
                tokio::spawn(async move {
                    let stream = tokio::net::TcpStream::connect(&authority).await.expect("connect");
                    let (mut sender, conn) =
                        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
                    tokio::spawn(conn);
                    for _ in 0..per_conn {
                        let req = http::Request::get(&path)
                            .header(http::header::HOST, &authority)
                            .body(empty())
                            .expect("request");
                        let sent = Instant::now();
                        let response = async {
                            sender.ready().await?;
                            sender.send_request(req).await
                        };
                        let (status, body) = answer(response).await;
                        let failed = status == 0;
                        s.lock().expect("samples").push(Sample {
                            sent,
                            received: Instant::now(),
                            status,
                            body,
                            conn: Some(c),
                        });
                        if failed {
                            return;
                        }
                        // Pacing, so the loop spans the config change instead of racing ahead.
                        tokio::time::sleep(pause).await; // pacing between a connection's requests
                    }
                })
            })
            .collect();
        Load { samples, tasks, stop: Arc::default() }
    }

    /// Answers received so far.
    pub fn received(&self) -> usize {
        self.samples.lock().expect("samples").len()
    }

    /// Waits until `n` answers have been received (the load is under way).
    pub async fn wait_received(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.received() < n {
            assert!(Instant::now() < deadline, "only {} of {n} answers within {within:?}", self.received());
            tokio::time::sleep(Duration::from_millis(5)).await; // poll interval of a wait on a counter
        }
    }

    /// Waits for the loop to end; every sample, in the order requests were sent.
    pub async fn finish(self) -> Vec<Sample> {
        for t in self.tasks {
            let _ = t.await;
        }
        let mut v = self.samples.lock().expect("samples").clone();
        v.sort_by_key(|s| s.sent);
        v
    }
}

/// Asserts that no request failed and that the switch from old answers to new ones was atomic:
/// no request sent after the first new answer arrived got an old answer, and on each dedicated
/// connection no old answer follows a new one. Returns how many answers were old and new.
pub fn assert_atomic_switch(
    samples: &[Sample],
    is_old: impl Fn(&str) -> bool,
    is_new: impl Fn(&str) -> bool,
) -> (usize, usize) {
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.status != 200).collect();
    assert!(failed.is_empty(), "{} failed requests, first: {:?}", failed.len(), &failed[..failed.len().min(3)]);
    let unknown: Vec<&Sample> = samples.iter().filter(|s| !is_old(&s.body) && !is_new(&s.body)).collect();
    assert!(unknown.is_empty(), "answers neither old nor new: {:?}", &unknown[..unknown.len().min(3)]);
    let first_new = samples.iter().filter(|s| is_new(&s.body)).map(|s| s.received).min().expect("no new answer at all");
    let stale: Vec<&Sample> = samples.iter().filter(|s| s.sent > first_new && is_old(&s.body)).collect();
    assert!(
        stale.is_empty(),
        "{} requests sent after the first new answer got an old one, first: {:?}",
        stale.len(),
        stale.first()
    );
    let conns: std::collections::BTreeSet<usize> = samples.iter().filter_map(|s| s.conn).collect();
    for c in conns {
        let mut seen_new = false;
        for s in samples.iter().filter(|s| s.conn == Some(c)) {
            seen_new |= is_new(&s.body);
            assert!(!(seen_new && is_old(&s.body)), "connection {c}: an old answer after a new one: {s:?}");
        }
    }
    let old = samples.iter().filter(|s| is_old(&s.body)).count();
    (old, samples.len() - old)
}

/// Asserts that every request sent after `applied` (when the system reported the new config
/// in force) got a new answer; returns how many there were.
pub fn assert_new_after(samples: &[Sample], applied: Instant, is_new: impl Fn(&str) -> bool) -> usize {
    let after: Vec<&Sample> = samples.iter().filter(|s| s.sent > applied).collect();
    let old: Vec<&&Sample> = after.iter().filter(|s| !is_new(&s.body)).collect();
    assert!(
        old.is_empty(),
        "{} of {} requests sent after the change was in force got an old answer: {:?}",
        old.len(),
        after.len(),
        old.first()
    );
    after.len()
}
