//! The DJ app (App Mesh's canary demo): `dj` asks `metal` and `jazz` for their artists; each
//! genre has a v1 (names) and a v2 (names with home towns).

use http::StatusCode;

use crate::web;

fn artists(genre: &str, version: &str) -> Vec<&'static str> {
    match (genre, version) {
        ("metal", "v2") => vec!["Megadeth (Los Angeles, California)", "Judas Priest (West Bromwich, England)"],
        ("metal", _) => vec!["Megadeth", "Judas Priest"],
        ("jazz", "v2") => vec!["Astrud Gilberto (Salvador, Brazil)", "Miles Davis (Alton, Illinois)"],
        ("jazz", _) => vec!["Astrud Gilberto", "Miles Davis"],
        _ => vec![],
    }
}

/// `metal` or `jazz`: `GET /` → the artists of `$VERSION`.
pub async fn genre(genre: String) -> std::io::Result<()> {
    let version = std::env::var("VERSION").unwrap_or_else(|_| "v1".into());
    let name = format!("{genre}-{version}");
    web::serve(&name.clone(), web::port(8080), move |_req| {
        let list = artists(&genre, &version);
        async move { web::json(StatusCode::OK, &serde_json::json!(list)) }
    })
    .await
}

/// `dj`: `GET /metal`, `GET /jazz` → that genre's artists; `GET /` → both.
pub async fn dj() -> std::io::Result<()> {
    let metal = std::env::var("METAL_URL").unwrap_or_else(|_| "http://metal".into());
    let jazz = std::env::var("JAZZ_URL").unwrap_or_else(|_| "http://jazz".into());
    let client = web::client();
    web::serve("dj", web::port(8080), move |req| {
        let (metal, jazz, client) = (metal.clone(), jazz.clone(), client.clone());
        async move {
            let ask = |url: String| {
                let rb = web::forward(client.get(url), req.headers());
                async move {
                    match rb.send().await {
                        Ok(r) if r.status().is_success() => {
                            r.json::<serde_json::Value>().await.map_err(|e| e.to_string())
                        }
                        Ok(r) => Err(format!("answered {}", r.status())),
                        Err(e) => Err(e.to_string()),
                    }
                }
            };
            let result = match req.uri().path() {
                "/metal" => ask(format!("{metal}/")).await,
                "/jazz" => ask(format!("{jazz}/")).await,
                "/" => match (ask(format!("{metal}/")).await, ask(format!("{jazz}/")).await) {
                    (Ok(m), Ok(j)) => Ok(serde_json::json!({"metal": m, "jazz": j})),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                },
                _ => return web::json(StatusCode::NOT_FOUND, &serde_json::json!({"error": "try /metal, /jazz or /"})),
            };
            match result {
                Ok(v) => web::json(StatusCode::OK, &v),
                Err(e) => web::json(StatusCode::BAD_GATEWAY, &serde_json::json!({"error": e})),
            }
        }
    })
    .await
}
