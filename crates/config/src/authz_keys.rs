//! The `when` condition keys of AuthorizationPolicy that Trellis evaluates (Istio's names).

/// Whether `key` is one Trellis knows how to evaluate.
pub fn is_supported(key: &str) -> bool {
    const PLAIN: &[&str] = &[
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "destination.ip",
        "destination.port",
        "connection.sni",
    ];
    PLAIN.contains(&key) || indexed(key, "request.headers").is_some() || indexed(key, "request.auth.claims").is_some()
}

/// `request.headers[x-foo]` → `["x-foo"]`; `request.auth.claims[a][b]` → `["a", "b"]`.
pub fn indexed<'a>(key: &'a str, prefix: &str) -> Option<Vec<&'a str>> {
    let mut rest = key.strip_prefix(prefix)?;
    let mut out = Vec::new();
    while let Some(r) = rest.strip_prefix('[') {
        let end = r.find(']')?;
        out.push(&r[..end]);
        rest = &r[end + 1..];
    }
    (rest.is_empty() && !out.is_empty()).then_some(out)
}
