//! The console's page, embedded at build time (`build.rs` lists every file under `assets/`).

include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// A file of the page by its path under `assets/`, with its content type.
pub fn get(path: &str) -> Option<(&'static [u8], &'static str)> {
    let (_, body) = ASSETS.iter().find(|(p, _)| *p == path)?;
    let ctype = match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        _ => "text/plain; charset=utf-8",
    };
    Some((body, ctype))
}
