//! Load generation.
//!
//! Open loop: request `i` is due at `start + i / rate`, whatever happened to earlier ones; a
//! timer thread (OS sleeps, ~50 µs precision, not Tokio's 1 ms timer wheel) releases each at its
//! due time and its latency is measured from that due time, so a stall shows up in the
//! percentiles instead of silently lowering the rate (no coordinated omission). The first
//! `warmup` is not recorded.
//!
//! Closed loop (saturation): `concurrency` workers each send the next request as soon as the
//! previous one completes; throughput is completions per second.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use trellis_demo::echo::{EchoClient, EchoRequest};

/// What to call.
#[derive(Clone, Debug)]
pub enum Target {
    Http1(String),
    Http2(String),
    /// A gRPC endpoint (`http://host:port`), called with unary `Echo`.
    Grpc(String),
}

/// One request sender, shared by all requests of a run.
#[derive(Clone)]
pub enum Sender {
    Http(Client<HttpConnector, Empty<Bytes>>, String),
    Grpc(EchoClient<tonic::transport::Channel>),
}

impl Sender {
    pub async fn new(target: &Target) -> anyhow::Result<Sender> {
        Ok(match target {
            Target::Http1(u) => {
                let mut c = Client::builder(TokioExecutor::new());
                c.pool_max_idle_per_host(1024);
                Sender::Http(c.build_http(), u.clone())
            }
            Target::Http2(u) => {
                Sender::Http(Client::builder(TokioExecutor::new()).http2_only(true).build_http(), u.clone())
            }
            Target::Grpc(u) => Sender::Grpc(EchoClient::connect(u.clone()).await?),
        })
    }

    /// One request; `Ok` when it got a success answer and read it whole.
    pub async fn once(&self) -> Result<(), String> {
        match self {
            Sender::Http(c, u) => {
                let resp = c.get(u.parse().map_err(|e| format!("{e}"))?).await.map_err(|e| e.to_string())?;
                let ok = resp.status().is_success();
                resp.into_body().collect().await.map_err(|e| e.to_string())?;
                if ok {
                    Ok(())
                } else {
                    Err("non-2xx".into())
                }
            }
            Sender::Grpc(c) => {
                let mut c = c.clone();
                c.unary(EchoRequest { message: "x".repeat(1024), count: 0, fail_code: 0 })
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// What an open-loop run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OpenLoop {
    pub target_rps: u32,
    pub achieved_rps: f64,
    pub requests: u64,
    pub errors: u64,
    /// Microseconds.
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub measured_s: f64,
}

impl OpenLoop {
    /// A row is reportable only below the knee: the achieved rate within 5% of the target.
    pub fn valid(&self) -> bool {
        self.achieved_rps >= self.target_rps as f64 * 0.95 && self.errors == 0
    }
}

pub async fn open_loop(target: &Target, rate: u32, warmup: Duration, measure: Duration) -> anyhow::Result<OpenLoop> {
    let sender = Sender::new(target).await?;
    let total = ((warmup + measure).as_secs_f64() * rate as f64) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
    let errors = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let start = Instant::now() + Duration::from_millis(20);
    let ticker = std::thread::spawn(move || {
        for i in 0..total {
            let due = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if tx.send(due).is_err() {
                return;
            }
        }
    });
    let measure_from = start + warmup;
    let mut tasks = Vec::with_capacity(total as usize);
    while let Some(due) = rx.recv().await {
        let (s, h, e, d) = (sender.clone(), hist.clone(), errors.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(10), s.once()).await;
            let latency = due.elapsed();
            if due >= measure_from {
                match r {
                    Ok(Ok(())) => {
                        let _ = h.lock().map(|mut h| h.record(latency.as_micros().max(1) as u64));
                        d.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        e.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let _ = ticker.join();
    for t in tasks {
        let _ = t.await;
    }
    // The achieved rate counts requests that completed within the window they were due in.
    let measured_s = measure.as_secs_f64();
    let h = hist.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let requests = done.load(Ordering::Relaxed);
    Ok(OpenLoop {
        target_rps: rate,
        achieved_rps: requests as f64 / measured_s,
        requests,
        errors: errors.load(Ordering::Relaxed),
        p50_us: h.value_at_quantile(0.50),
        p90_us: h.value_at_quantile(0.90),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
        measured_s,
    })
}

/// What a saturation run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Saturation {
    pub concurrency: usize,
    pub throughput_rps: f64,
    pub requests: u64,
    pub errors: u64,
}

pub async fn closed_loop(
    target: &Target,
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Saturation> {
    let sender = Sender::new(target).await?;
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let from = start + warmup;
    let until = from + measure;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (s, d, e) = (sender.clone(), done.clone(), errors.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < until {
                let r = s.once().await;
                let now = Instant::now();
                if now >= from && now < until {
                    match r {
                        Ok(()) => d.fetch_add(1, Ordering::Relaxed),
                        Err(_) => e.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let requests = done.load(Ordering::Relaxed);
    Ok(Saturation {
        concurrency,
        throughput_rps: requests as f64 / measure.as_secs_f64(),
        requests,
        errors: errors.load(Ordering::Relaxed),
    })
}
