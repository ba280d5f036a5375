//! The tracing demo: `frontend` serves `/fast` and `/slow`, each calling `business-logic`;
//! `business-logic` answers `/fast` at once and spends ~3 s (`SLOW_SECONDS`) of `/slow` in an
//! operation named `data_transformation`, which it reports as a span of its own over OTLP/HTTP
//! (to `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, as any OpenTelemetry SDK does), a child of the
//! request's span. In the trace, it is the long inner operation of every slow request.

use std::time::{Duration, SystemTime};

use http::StatusCode;
use trellis_telemetry::trace::{Attr, SpanData, SpanKind};

use crate::web;

/// `frontend`: `/fast` and `/slow` ask `business-logic` (`BUSINESS_LOGIC_URL`) for the same page.
pub async fn frontend() -> std::io::Result<()> {
    let backend = std::env::var("BUSINESS_LOGIC_URL").unwrap_or_else(|_| "http://business-logic".into());
    let client = web::client();
    web::serve("frontend", web::port(8080), move |req| {
        let (backend, client) = (backend.clone(), client.clone());
        async move {
            let path = req.uri().path().to_string();
            if path != "/fast" && path != "/slow" {
                return web::text(StatusCode::NOT_FOUND, "try /fast or /slow");
            }
            let url = format!("{}{path}", backend.trim_end_matches('/'));
            match web::forward(client.get(url), req.headers()).send().await {
                Ok(r) if r.status().is_success() => {
                    web::text(StatusCode::OK, format!("frontend{path}: {}", r.text().await.unwrap_or_default()))
                }
                Ok(r) => web::text(StatusCode::BAD_GATEWAY, format!("business-logic answered {}", r.status())),
                Err(e) => web::text(StatusCode::BAD_GATEWAY, format!("business-logic unreachable: {e}")),
            }
        }
    })
    .await
}

/// `business-logic`: `/fast` at once; `/slow` after `data_transformation` (`SLOW_SECONDS`, 3).
pub async fn business_logic() -> std::io::Result<()> {
    let slow = std::env::var("SLOW_SECONDS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(3.0);
    let service = format!("business-logic.{}", std::env::var("TRELLIS_NAMESPACE").unwrap_or_else(|_| "default".into()));
    let spans = match std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").ok().and_then(|e| e.parse::<http::Uri>().ok())
    {
        Some(uri) => Some(trellis_telemetry::export::SpanSink::start(
            trellis_telemetry::export::ExportConfig { otlp: vec![uri], zipkin: None },
            prometheus_client::metrics::counter::Counter::default(),
        )?),
        None => None,
    };
    let service: std::sync::Arc<str> = service.into();
    web::serve("business-logic", web::port(8080), move |req| {
        let (spans, service) = (spans.clone(), service.clone());
        async move {
            match req.uri().path() {
                "/fast" => web::text(StatusCode::OK, "fast result"),
                "/slow" => {
                    let start = SystemTime::now();
                    // The work itself: here, waiting stands for it.
                    tokio::time::sleep(Duration::from_secs_f64(slow)).await;
                    if let (Some(sink), (Some(trace), parent)) = (&spans, web::trace_ids(req.headers())) {
                        if let Some(trace_id) = trellis_telemetry::trace::parse_trace_hex(&trace) {
                            sink.submit(SpanData {
                                trace_id,
                                span_id: trellis_telemetry::trace::new_span_id(),
                                parent_id: parent.as_deref().and_then(trellis_telemetry::trace::parse_span_hex),
                                name: "data_transformation".into(),
                                kind: SpanKind::Internal,
                                start,
                                end: SystemTime::now(),
                                attributes: vec![("records", Attr::Int(10_000))],
                                error: false,
                                service: service.clone(),
                            });
                        }
                    }
                    web::text(StatusCode::OK, "slow result")
                }
                _ => web::text(StatusCode::NOT_FOUND, "try /fast or /slow"),
            }
        }
    })
    .await
}
