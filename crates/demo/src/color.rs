//! The color app (App Mesh's traffic-shifting demo): `colorteller` answers its color;
//! `colorgateway` asks a colorteller (through the mesh) and reports the running share of each
//! color it has seen.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::StatusCode;

use crate::web;

/// `colorteller`: answers `$COLOR` on every path.
pub async fn teller() -> std::io::Result<()> {
    let color = std::env::var("COLOR").unwrap_or_else(|_| "black".into());
    // Which instance answered, for canaries and scaling demos (a Pod's HOSTNAME is its name).
    let instance = std::env::var("HOSTNAME").ok().and_then(|h| http::HeaderValue::from_str(&h).ok());
    web::serve("colorteller", web::port(8080), move |_req| {
        let (color, instance) = (color.clone(), instance.clone());
        async move {
            let mut resp = web::text(StatusCode::OK, color);
            if let Some(i) = instance {
                resp.headers_mut().insert("x-served-by", i);
            }
            resp
        }
    })
    .await
}

/// How many recent answers `stats` covers: enough to show a 2:1 split, few enough that a
/// shift shows within a hundred requests (cumulative shares would hide it for long).
pub const STATS_WINDOW: usize = 100;

/// `colorgateway`: `GET /color` → `{"color":"blue","stats":{"blue":0.67,"green":0.33},"of_last":100}`
/// (shares of the last [`STATS_WINDOW`] answers); `GET /color/clear` forgets them.
pub async fn gateway() -> std::io::Result<()> {
    let teller = std::env::var("COLORTELLER_URL").unwrap_or_else(|_| "http://colorteller".into());
    let counts: Arc<Mutex<std::collections::VecDeque<String>>> = Arc::default();
    let client = web::client();
    web::serve("colorgateway", web::port(8080), move |req| {
        let (teller, counts, client) = (teller.clone(), counts.clone(), client.clone());
        async move {
            match req.uri().path() {
                "/color/clear" => {
                    counts.lock().unwrap_or_else(|p| p.into_inner()).clear();
                    web::text(StatusCode::OK, "cleared")
                }
                "/color" => {
                    let got = web::forward(client.get(format!("{}/", teller.trim_end_matches('/'))), req.headers())
                        .send()
                        .await;
                    let color = match got {
                        Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default().trim().to_string(),
                        Ok(r) => {
                            return web::json(
                                StatusCode::BAD_GATEWAY,
                                &serde_json::json!({"error": format!("colorteller answered {}", r.status())}),
                            )
                        }
                        Err(e) => {
                            return web::json(StatusCode::BAD_GATEWAY, &serde_json::json!({"error": e.to_string()}))
                        }
                    };
                    let mut recent = counts.lock().unwrap_or_else(|p| p.into_inner());
                    if recent.len() == STATS_WINDOW {
                        recent.pop_front();
                    }
                    recent.push_back(color.clone());
                    let mut c: BTreeMap<&str, u64> = BTreeMap::new();
                    for k in recent.iter() {
                        *c.entry(k).or_insert(0) += 1;
                    }
                    let total = recent.len() as f64;
                    let stats: serde_json::Map<String, serde_json::Value> = c
                        .iter()
                        .map(|(k, v)| (k.to_string(), serde_json::json!(((*v as f64 / total) * 100.0).round() / 100.0)))
                        .collect();
                    web::json(
                        StatusCode::OK,
                        &serde_json::json!({"color": color, "stats": stats, "of_last": recent.len()}),
                    )
                }
                _ => web::json(StatusCode::NOT_FOUND, &serde_json::json!({"error": "try /color"})),
            }
        }
    })
    .await
}
