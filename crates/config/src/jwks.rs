//! A structural check of JSON Web Key Sets (RFC 7517), for `trellis analyze`.

/// Checks that `text` is a JWKS: an object with a non-empty `keys` array whose keys each have a
/// `kty` and the members that type needs.
pub fn check(text: &str) -> Result<usize, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let keys = v.get("keys").and_then(|k| k.as_array()).ok_or("no `keys` array")?;
    if keys.is_empty() {
        return Err("`keys` is empty".into());
    }
    for (i, k) in keys.iter().enumerate() {
        let kty = k.get("kty").and_then(|t| t.as_str()).ok_or(format!("key {i} has no `kty`"))?;
        let needs: &[&str] = match kty {
            "RSA" => &["n", "e"],
            "EC" => &["crv", "x", "y"],
            "OKP" => &["crv", "x"],
            "oct" => &["k"],
            other => return Err(format!("key {i} has unknown kty {other:?}")),
        };
        for n in needs {
            if k.get(*n).and_then(|x| x.as_str()).is_none() {
                return Err(format!("{kty} key {i} has no `{n}`"));
            }
        }
    }
    Ok(keys.len())
}
