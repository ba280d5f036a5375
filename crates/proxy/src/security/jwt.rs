//! RequestAuthentication: JWT validation as Istio does it.
//!
//! The token is read from the rule's `fromHeaders`/`fromParams`/`fromCookies` (default:
//! `Authorization: Bearer`, then the `access_token` query parameter). A request without one passes unauthenticated
//! (an AuthorizationPolicy may require a request principal); a request with one that fails —
//! unknown issuer, bad signature, unknown key, expired, not yet valid, wrong audience — gets 401.
//! Keys come inline (`jwks`) or from `jwksUri`, fetched on first use, cached across snapshots,
//! refreshed every 20 minutes and whenever a token names a key id the cache lacks (so a rotated
//! JWKS is picked up at once).
//!
//! Everything a rule needs is prepared when the snapshot is built — header names, where tokens
//! are looked for, one `Validation` per signing algorithm — and a fresh remote key set is read
//! without a lock, so a request only parses and verifies its token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::runtime::error::{BuildError, Problem, Resource};

use arc_swap::ArcSwapOption;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use trellis_config::model::security::JwtRule;

/// The principal and claims of a valid token.
#[derive(Clone, Debug)]
pub struct Verified {
    /// `iss/sub`, Istio's request principal.
    pub principal: String,
    pub claims: serde_json::Value,
}

#[derive(Debug)]
pub enum Outcome {
    NoToken,
    Valid(Verified),
    /// 401 with this message.
    Invalid(String),
}

enum Keys {
    Inline(Arc<KeySet>),
    Remote(Arc<RemoteJwks>),
}

/// A JWKS with every key made ready for verification once, when the set is read or fetched,
/// not per request.
pub struct KeySet {
    keys: Vec<(Option<String>, DecodingKey)>,
}

impl KeySet {
    fn prepare(set: &JwkSet) -> KeySet {
        KeySet {
            keys: set
                .keys
                .iter()
                .filter_map(|j| Some((j.common.key_id.clone(), DecodingKey::from_jwk(j).ok()?)))
                .collect(),
        }
    }

    fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|(k, _)| k.as_deref() == Some(kid))
    }
}

struct RuleRt {
    issuer: String,
    keys: Keys,
    /// One per signing algorithm (the library wants the token's algorithm named up front).
    validations: Vec<(Algorithm, Validation)>,
    output_payload_to_header: Option<HeaderName>,
    forward_original_token: bool,
    claim_headers: Vec<(HeaderName, String)>,
}

const ALGORITHMS: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::EdDSA,
];

/// Where the rules of a snapshot look for a token, in order: headers, then query parameters,
/// then cookies.
#[derive(Default)]
struct TokenSources {
    headers: Vec<(HeaderName, String)>,
    params: Vec<String>,
    cookies: Vec<String>,
}

/// Where a token was found (an output may remove it).
enum Location {
    Header(HeaderName),
    Elsewhere,
}

/// The JWT rules of one snapshot.
#[derive(Default)]
pub struct JwtAuth {
    rules: Vec<RuleRt>,
    sources: TokenSources,
}

/// Remote key sets, shared by every snapshot of a proxy.
#[derive(Default)]
pub struct JwksCache {
    sets: Mutex<HashMap<String, Arc<RemoteJwks>>>,
}

impl JwksCache {
    fn get(&self, uri: &str) -> Arc<RemoteJwks> {
        let mut m = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(uri.to_string())
            .or_insert_with(|| {
                Arc::new(RemoteJwks {
                    uri: uri.to_string(),
                    keys: ArcSwapOption::empty(),
                    fetching: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }
}

pub struct RemoteJwks {
    uri: String,
    /// The last key set fetched, and when: requests read it without a lock.
    keys: ArcSwapOption<Fetched>,
    /// Held while fetching, so concurrent requests wait for one fetch instead of each making one.
    fetching: tokio::sync::Mutex<()>,
}

struct Fetched {
    set: Arc<KeySet>,
    at: Instant,
}

const REFRESH: Duration = Duration::from_secs(20 * 60);
const MIN_REFETCH: Duration = Duration::from_millis(500);

impl RemoteJwks {
    /// The key set; fetched when missing, stale, or (`want_kid`) lacking that key id.
    async fn keys(&self, want_kid: Option<&str>) -> Result<Arc<KeySet>, String> {
        // A fresh set that has the key (or was fetched moments ago): no lock, no fetch.
        let usable = |f: &Fetched| {
            let age = f.at.elapsed();
            age <= REFRESH && (want_kid.is_none_or(|k| f.set.has_kid(k)) || age < MIN_REFETCH)
        };
        if let Some(f) = self.keys.load().as_deref().filter(|f| usable(f)) {
            return Ok(f.set.clone());
        }
        let _fetching = self.fetching.lock().await;
        // Another request may have fetched while this one waited.
        let current = self.keys.load_full();
        if let Some(f) = current.as_deref().filter(|f| usable(f)) {
            return Ok(f.set.clone());
        }
        match fetch_jwks(&self.uri).await {
            Ok(set) => {
                let set = Arc::new(KeySet::prepare(&set));
                self.keys.store(Some(Arc::new(Fetched { set: set.clone(), at: Instant::now() })));
                Ok(set)
            }
            Err(e) => {
                tracing::warn!(uri = %self.uri, "cannot fetch JWKS: {e}");
                current.map(|f| f.set.clone()).ok_or(e)
            }
        }
    }
}

async fn fetch_jwks(uri: &str) -> Result<JwkSet, String> {
    let uri: http::Uri = uri.parse().map_err(|e| format!("bad jwksUri: {e}"))?;
    let host = uri.host().ok_or("jwksUri has no host")?.to_string();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let fut = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| e.to_string())?;
        let req = http::Request::get(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .header(http::header::HOST, host.as_str())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let io: crate::upstream::Io = if https {
            let cfg = trellis_identity::tls::origination(None, None, false, b"http/1.1").map_err(|e| e.to_string())?;
            let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
            Box::new(tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.map_err(|e| e.to_string())?)
        } else {
            Box::new(tcp)
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("{uri} answered {}", resp.status()));
        }
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        serde_json::from_slice::<JwkSet>(&body).map_err(|e| format!("bad JWKS: {e}"))
    };
    tokio::time::timeout(Duration::from_secs(5), fut).await.map_err(|_| "timed out".to_string())?
}

impl JwtAuth {
    pub fn build(rules: &[JwtRule], cache: &JwksCache) -> Result<JwtAuth, BuildError> {
        let mut out = Vec::new();
        let mut sources = TokenSources::default();
        for r in rules {
            let at = |p: Problem| p.at(Resource::JwtRule(r.issuer.clone()));
            let keys = match (&r.jwks, &r.jwks_uri) {
                (Some(j), _) => Keys::Inline(Arc::new(KeySet::prepare(
                    &serde_json::from_str(j).map_err(|e| at(Problem::Jwks(e.to_string())))?,
                ))),
                (None, Some(u)) => Keys::Remote(cache.get(u)),
                (None, None) => return Err(at(Problem::NoKeys)),
            };
            let header = |n: &str| HeaderName::from_bytes(n.as_bytes()).map_err(|_| at(Problem::HeaderName(n.into())));
            for h in &r.from_headers {
                let h = (header(&h.name)?, h.prefix.clone().unwrap_or_default());
                if !sources.headers.contains(&h) {
                    sources.headers.push(h);
                }
            }
            let push = |list: &mut Vec<String>, v: &String| {
                if !list.contains(v) {
                    list.push(v.clone());
                }
            };
            r.from_params.iter().for_each(|p| push(&mut sources.params, p));
            r.from_cookies.iter().for_each(|c| push(&mut sources.cookies, c));
            if r.from_headers.is_empty() && r.from_params.is_empty() && r.from_cookies.is_empty() {
                let bearer = (http::header::AUTHORIZATION, "Bearer ".to_string());
                if !sources.headers.contains(&bearer) {
                    sources.headers.push(bearer);
                }
                push(&mut sources.params, &"access_token".to_string());
            }
            let validations = ALGORITHMS
                .iter()
                .map(|alg| {
                    let mut v = Validation::new(*alg);
                    v.set_issuer(&[&r.issuer]);
                    v.set_required_spec_claims::<&str>(&[]);
                    v.leeway = 60;
                    v.validate_nbf = true;
                    if r.audiences.is_empty() {
                        v.validate_aud = false;
                    } else {
                        v.set_audience(&r.audiences);
                    }
                    (*alg, v)
                })
                .collect();
            out.push(RuleRt {
                issuer: r.issuer.clone(),
                keys,
                validations,
                output_payload_to_header: r.output_payload_to_header.as_deref().map(header).transpose()?,
                forward_original_token: r.forward_original_token.unwrap_or(false),
                claim_headers: r
                    .output_claim_to_headers
                    .iter()
                    .map(|c| Ok((header(&c.header)?, c.claim.clone())))
                    .collect::<Result<_, BuildError>>()?,
            });
        }
        Ok(JwtAuth { rules: out, sources })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Finds and validates the request's token; on success applies the rule's header outputs.
    pub async fn authenticate(&self, parts: &mut http::request::Parts) -> Outcome {
        let Some((token, location)) = self.find_token(parts) else { return Outcome::NoToken };
        let Some(issuer) = unverified_issuer(&token) else {
            return Outcome::Invalid("Jwt is not in the form of Header.Payload.Signature".into());
        };
        let Some(rule) = self.rules.iter().find(|r| r.issuer == issuer) else {
            return Outcome::Invalid("Jwt issuer is not configured".into());
        };
        let header = match jsonwebtoken::decode_header(&token) {
            Ok(h) => h,
            Err(_) => return Outcome::Invalid("Jwt header is an invalid JSON".into()),
        };
        let set = match &rule.keys {
            Keys::Inline(s) => s.clone(),
            Keys::Remote(r) => match r.keys(header.kid.as_deref()).await {
                Ok(s) => s,
                Err(e) => return Outcome::Invalid(format!("Jwks remote fetch is failed: {e}")),
            },
        };
        let candidates: Vec<&DecodingKey> =
            set.keys.iter().filter(|(kid, _)| header.kid.is_none() || *kid == header.kid).map(|(_, k)| k).collect();
        if candidates.is_empty() {
            return Outcome::Invalid("Jwks doesn't have key to match kid or alg from Jwt".into());
        }
        let Some((_, validation)) = rule.validations.iter().find(|(alg, _)| *alg == header.alg) else {
            return Outcome::Invalid("Jwt verification fails".into());
        };
        let mut last = String::from("Jwt verification fails");
        for key in candidates {
            match jsonwebtoken::decode::<serde_json::Value>(&token, key, validation) {
                Ok(data) => {
                    let claims = data.claims;
                    let sub = claims.get("sub").and_then(|s| s.as_str()).unwrap_or("");
                    self.apply_outputs(rule, parts, &token, location, &claims);
                    return Outcome::Valid(Verified { principal: format!("{}/{sub}", rule.issuer), claims });
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind::*;
                    last = match e.kind() {
                        ExpiredSignature => "Jwt is expired".into(),
                        ImmatureSignature => "Jwt not yet valid".into(),
                        InvalidAudience => "Audiences in Jwt are not allowed".into(),
                        InvalidIssuer => "Jwt issuer is not configured".into(),
                        _ => "Jwt verification fails".into(),
                    };
                }
            }
        }
        Outcome::Invalid(last)
    }

    /// The first token present, and where it was.
    fn find_token(&self, parts: &http::request::Parts) -> Option<(String, Location)> {
        let sources = &self.sources;
        for (h, prefix) in &sources.headers {
            if let Some(v) = parts.headers.get(h).and_then(|v| v.to_str().ok()) {
                if let Some(t) = v.strip_prefix(prefix.as_str()) {
                    return Some((t.trim().to_string(), Location::Header(h.clone())));
                }
            }
        }
        if let Some(query) = parts.uri.query().filter(|_| !sources.params.is_empty()) {
            for p in &sources.params {
                let found = query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| k == p);
                if let Some((_, v)) = found {
                    return Some((v.to_string(), Location::Elsewhere));
                }
            }
        }
        if !sources.cookies.is_empty() {
            let cookies = || {
                parts
                    .headers
                    .get_all(http::header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(';'))
                    .filter_map(|kv| kv.trim().split_once('='))
            };
            for c in &sources.cookies {
                if let Some((_, v)) = cookies().find(|(k, _)| k == c) {
                    return Some((v.trim_matches('"').to_string(), Location::Elsewhere));
                }
            }
        }
        None
    }

    fn apply_outputs(
        &self,
        rule: &RuleRt,
        parts: &mut http::request::Parts,
        token: &str,
        location: Location,
        claims: &serde_json::Value,
    ) {
        if !rule.forward_original_token {
            if let Location::Header(h) = location {
                parts.headers.remove(h);
            }
        }
        if let Some(h) = &rule.output_payload_to_header {
            if let Some(payload) = token.split('.').nth(1) {
                if let Ok(v) = HeaderValue::from_str(payload) {
                    parts.headers.insert(h.clone(), v);
                }
            }
        }
        for (h, claim) in &rule.claim_headers {
            if let Some(v) = claims.get(claim) {
                let s = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                if let Ok(v) = HeaderValue::from_str(&s) {
                    parts.headers.insert(h.clone(), v);
                }
            }
        }
    }
}

fn unverified_issuer(token: &str) -> Option<String> {
    let mut it = token.split('.');
    let (_, payload, _) = (it.next()?, it.next()?, it.next()?);
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("iss")?.as_str().map(str::to_string)
}
