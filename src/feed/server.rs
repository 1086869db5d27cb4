//! The feed's HTTP server (see the module docs of [`super`]). It listens on
//! its own address, apart from `/metrics`, and answers only with a
//! credential from `--inventory-credentials-dir`, a mounted Secret holding
//! `token` (an API token sent as `Authorization: Bearer`), or `client_id`
//! and `client_secret` (OAuth 2.0 client credentials, RFC 6749 §4.4,
//! exchanged at `POST /api/v1/oauth/token` for a bearer token that lives
//! [`TOKEN_LIFETIME`]), or both. The files are read again on every check,
//! so a rotated Secret takes effect without a restart. Secrets are compared
//! by their SHA-256 digests in constant time, and never logged.
//!
//! An issued token is its expiry, a nonce, and an HMAC-SHA256 over both
//! keyed with the client secret: any replica with the same Secret accepts
//! it, nothing is kept in memory, and rotating the client secret ends every
//! token issued with the old one.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    body::{Bytes, Incoming},
    header::{HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::{net::TcpListener, task::JoinHandle};

use super::{page, select, View, DEFAULT_PAGE, MAX_PAGE, SCIM_ERROR, SCIM_LIST};
use crate::{metrics::Metrics, provider::http::percent_encode as encode};

/// How long a token from the token endpoint lives.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// The most connections served at once; more are closed.
pub const MAX_CONNECTIONS: usize = 64;
/// The longest a connection stays open.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// The longest a token request's body may take to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// The scope tokens are issued for.
pub const SCOPE: &str = "accounts.read";
const MAX_BODY: usize = 4096;

type Body = Full<Bytes>;

/// What the feed checks requests against.
struct Credentials {
    dir: PathBuf,
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// Compares two digests without an early exit.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn read(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name)).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The signature of an issued token's `expiry.nonce`.
fn sign(client_id: &str, client_secret: &str, expiry: u64, nonce: &str) -> Option<String> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(client_secret.as_bytes()).ok()?;
    mac.update(format!("keysmith-inventory-token.v1|{client_id}|{expiry}|{nonce}").as_bytes());
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

impl Credentials {
    fn token(&self) -> Option<[u8; 32]> {
        read(&self.dir, "token").map(|t| digest(&t))
    }

    fn client(&self) -> Option<(String, String)> {
        Some((read(&self.dir, "client_id")?, read(&self.dir, "client_secret")?))
    }

    /// What the directory offers, for the startup check and the log.
    fn offered(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.token().is_some() {
            out.push("an API token");
        }
        if self.client().is_some() {
            out.push("OAuth 2.0 client credentials");
        }
        out
    }

    fn bearer_ok(&self, presented: &str) -> bool {
        let presented_digest = digest(presented);
        if self.token().is_some_and(|t| same(&t, &presented_digest)) {
            return true;
        }
        // ksf.<expiry>.<nonce>.<signature>
        let mut parts = presented.split('.');
        let (Some("ksf"), Some(expiry), Some(nonce), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        let Ok(expiry) = expiry.parse::<u64>() else { return false };
        let now = unix_now();
        if expiry <= now || expiry > now + TOKEN_LIFETIME.as_secs() + 60 {
            return false;
        }
        let Some((id, secret)) = self.client() else { return false };
        sign(&id, &secret, expiry, nonce).is_some_and(|want| same(&digest(&want), &digest(signature)))
    }

    fn client_ok(&self, id: &str, secret: &str) -> bool {
        match self.client() {
            // Both compared, always, so timing says nothing about which.
            Some((want_id, want_secret)) => {
                same(&digest(&want_id), &digest(id)) & same(&digest(&want_secret), &digest(secret))
            }
            None => false,
        }
    }

    fn issue(&self) -> Option<String> {
        let (id, secret) = self.client()?;
        let expiry = unix_now() + TOKEN_LIFETIME.as_secs();
        let nonce = format!("{:032x}", rand::random::<u128>());
        let signature = sign(&id, &secret, expiry, &nonce)?;
        Some(format!("ksf.{expiry}.{nonce}.{signature}"))
    }
}

/// Binds `addr` and serves the feed from the caches `source` watches.
/// Fails, before binding, when `credentials_dir` offers no credential: the
/// feed never runs open.
pub async fn serve(
    addr: SocketAddr,
    source: Arc<Metrics>,
    credentials_dir: PathBuf,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let credentials = Arc::new(Credentials { dir: credentials_dir });
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let offered = credentials.offered();
    if offered.is_empty() {
        anyhow::bail!(
            "the inventory feed needs a credential: {} holds neither `token` nor `client_id` and `client_secret`",
            credentials.dir.display()
        );
    }
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding the inventory address {addr}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, credentials = %offered.join(" and "), "serving the inventory feed: /api/v1/accounts, /scim/v2/Users");
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting an inventory connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // A bounded number of connections, each for a bounded time: a
            // client that holds connections open cannot starve the process
            // the controllers run in.
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "too many inventory connections: closing this one");
                continue;
            };
            let (source, credentials) = (source.clone(), credentials.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let service = service_fn(move |request| {
                    let (source, credentials) = (source.clone(), credentials.clone());
                    async move { Ok::<_, Infallible>(respond(request, &source, &credentials).await) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                    Ok(Err(error)) => tracing::debug!(%error, %peer, "inventory connection ended with an error"),
                    Ok(Ok(())) => {}
                    Err(_) => tracing::debug!(%peer, "inventory connection closed after its time"),
                }
            });
        }
    });
    Ok((bound, task))
}

fn json_response(status: StatusCode, body: &Value, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn error(view: View, status: StatusCode, code: &str, detail: &str) -> Response<Body> {
    match view {
        View::Rest => json_response(status, &json!({"error": code, "message": detail}), "application/json"),
        View::Scim => {
            let mut body = json!({"schemas": [SCIM_ERROR], "status": status.as_u16().to_string(), "detail": detail});
            if status == StatusCode::BAD_REQUEST {
                body["scimType"] = json!(code);
            }
            json_response(status, &body, "application/scim+json")
        }
    }
}

fn unauthorized(view: View) -> Response<Body> {
    let mut response = error(
        view,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "send Authorization: Bearer with the feed's API token or a token from /api/v1/oauth/token",
    );
    response.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"keysmith inventory\""));
    response
}

/// `%XX` and `+` decoded.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(request: &Request<Incoming>) -> HashMap<String, String> {
    request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(pair), String::new()),
        })
        .collect()
}

fn bearer(request: &Request<Incoming>) -> Option<String> {
    let value = request.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
}

/// `scheme://host` the client used, for links.
fn origin(request: &Request<Incoming>) -> String {
    let host = request.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    let https = request
        .headers()
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    format!("{}://{host}", if https { "https" } else { "http" })
}

fn number(params: &HashMap<String, String>, name: &str, default: usize) -> Result<usize, String> {
    match params.get(name).filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(v) => v.parse::<usize>().map_err(|_| format!("{name} must be a whole number, not {v:?}")),
    }
}

async fn respond(request: Request<Incoming>, source: &Metrics, credentials: &Credentials) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let view = if path.starts_with("/scim/") { View::Scim } else { View::Rest };
    if path == "/api/v1/oauth/token" {
        return token_endpoint(request, credentials).await;
    }
    let known = path == "/api/v1/accounts"
        || path.starts_with("/api/v1/accounts/")
        || path == "/scim/v2/Users"
        || path.starts_with("/scim/v2/Users/")
        || path == "/scim/v2/ServiceProviderConfig";
    if !known {
        return error(view, StatusCode::NOT_FOUND, "not_found", "try /api/v1/accounts or /scim/v2/Users");
    }
    if !bearer(&request).is_some_and(|t| credentials.bearer_ok(&t)) {
        return unauthorized(view);
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response =
            error(view, StatusCode::METHOD_NOT_ALLOWED, "read_only", "the inventory feed is read-only: GET only");
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    if path == "/scim/v2/ServiceProviderConfig" {
        return json_response(StatusCode::OK, &service_provider_config(), "application/scim+json");
    }
    let Some(inventory) = source.inventory() else {
        return error(view, StatusCode::SERVICE_UNAVAILABLE, "not_ready", "keysmith's caches are not synced yet");
    };
    let state = inventory.accounts.state();
    let accounts: Vec<&crate::api::IntegrationAccount> = state.iter().map(|a| a.as_ref()).collect();
    let params = query(&request);
    let base = origin(&request);
    match view {
        View::Rest => rest(&path, &params, &accounts, &base),
        View::Scim => scim(&path, &params, &accounts, &base),
    }
}

fn rest(
    path: &str,
    params: &HashMap<String, String>,
    accounts: &[&crate::api::IntegrationAccount],
    base: &str,
) -> Response<Body> {
    if let Some(id) = path.strip_prefix("/api/v1/accounts/") {
        return match select(accounts.iter().copied(), View::Rest, None)
            .ok()
            .and_then(|r| r.into_iter().find(|r| r.id == id))
        {
            Some(record) => json_response(StatusCode::OK, &record.rest(), "application/json"),
            None => error(View::Rest, StatusCode::NOT_FOUND, "not_found", "no such account"),
        };
    }
    let limit = match number(params, "limit", DEFAULT_PAGE) {
        Ok(limit) => limit.clamp(1, MAX_PAGE),
        Err(message) => return error(View::Rest, StatusCode::BAD_REQUEST, "invalid_request", &message),
    };
    let after = match params.get("after").filter(|a| !a.is_empty()) {
        None => None,
        Some(cursor) => match base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(cursor)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
        {
            Some(id) => Some(id),
            None => {
                return error(
                    View::Rest,
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "after is not a cursor this feed gave",
                )
            }
        },
    };
    let filter = params.get("filter").map(String::as_str);
    let records = match select(accounts.iter().copied(), View::Rest, filter) {
        Ok(records) => records,
        Err(message) => return error(View::Rest, StatusCode::BAD_REQUEST, "invalid_filter", &message),
    };
    let (slice, next) = page(&records, after.as_deref(), limit);
    let next = next.map(|id| {
        let cursor = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id.as_bytes());
        let filter = filter.map(|f| format!("&filter={}", encode(f))).unwrap_or_default();
        format!("{base}/api/v1/accounts?limit={limit}&after={cursor}{filter}")
    });
    let body = json!({"next": next, "results": slice.iter().map(super::Record::rest).collect::<Vec<_>>()});
    json_response(StatusCode::OK, &body, "application/json")
}

fn scim(
    path: &str,
    params: &HashMap<String, String>,
    accounts: &[&crate::api::IntegrationAccount],
    base: &str,
) -> Response<Body> {
    let location = format!("{base}/scim/v2/Users");
    if let Some(id) = path.strip_prefix("/scim/v2/Users/") {
        return match select(accounts.iter().copied(), View::Scim, None)
            .ok()
            .and_then(|r| r.into_iter().find(|r| r.id == id))
        {
            Some(record) => json_response(StatusCode::OK, &record.scim(&location), "application/scim+json"),
            None => error(View::Scim, StatusCode::NOT_FOUND, "not_found", "no such User"),
        };
    }
    let (start, count) = match (number(params, "startIndex", 1), number(params, "count", DEFAULT_PAGE)) {
        (Ok(start), Ok(count)) => (start.max(1), count.min(MAX_PAGE)),
        (Err(message), _) | (_, Err(message)) => {
            return error(View::Scim, StatusCode::BAD_REQUEST, "invalidValue", &message)
        }
    };
    let records = match select(accounts.iter().copied(), View::Scim, params.get("filter").map(String::as_str)) {
        Ok(records) => records,
        Err(message) => return error(View::Scim, StatusCode::BAD_REQUEST, "invalidFilter", &message),
    };
    let slice: Vec<Value> = records.iter().skip(start - 1).take(count).map(|r| r.scim(&location)).collect();
    let body = json!({
        "schemas": [SCIM_LIST],
        "totalResults": records.len(),
        "startIndex": start,
        "itemsPerPage": slice.len(),
        "Resources": slice,
    });
    json_response(StatusCode::OK, &body, "application/scim+json")
}

fn service_provider_config() -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
        "patch": {"supported": false},
        "bulk": {"supported": false, "maxOperations": 0, "maxPayloadSize": 0},
        "filter": {"supported": true, "maxResults": MAX_PAGE},
        "changePassword": {"supported": false},
        "sort": {"supported": false},
        "etag": {"supported": false},
        "authenticationSchemes": [{
            "type": "oauthbearertoken",
            "name": "OAuth Bearer Token",
            "description": "An API token, or a token from /api/v1/oauth/token (client credentials)",
        }],
    })
}

/// RFC 6749 §4.4: client credentials in HTTP Basic (or the form), answered
/// with a bearer token.
async fn token_endpoint(request: Request<Incoming>, credentials: &Credentials) -> Response<Body> {
    let oauth_error = |status: StatusCode, code: &str| {
        let mut response = json_response(status, &json!({"error": code}), "application/json");
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"keysmith inventory\""));
        }
        response
    };
    if request.method() != Method::POST {
        let mut response = oauth_error(StatusCode::METHOD_NOT_ALLOWED, "invalid_request");
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let basic = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split_once(' ').filter(|(s, _)| s.eq_ignore_ascii_case("basic")).map(|(_, b)| b.trim().to_owned())
        })
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|pair| pair.split_once(':').map(|(id, secret)| (decode(id), decode(secret))));
    let body = match tokio::time::timeout(BODY_TIMEOUT, Limited::new(request.into_body(), MAX_BODY).collect()).await {
        Ok(Ok(body)) => body.to_bytes(),
        _ => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request"),
    };
    let form: HashMap<String, String> = String::from_utf8_lossy(&body)
        .split('&')
        .filter_map(|pair| pair.split_once('=').map(|(k, v)| (decode(k), decode(v))))
        .collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    if let Some(scope) = form.get("scope").filter(|s| !s.trim().is_empty()) {
        if scope.split_whitespace().any(|s| s != SCOPE) {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_scope");
        }
    }
    let client = basic.or_else(|| Some((form.get("client_id")?.clone(), form.get("client_secret")?.clone())));
    let Some((id, secret)) = client else {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    };
    if !credentials.client_ok(&id, &secret) {
        tracing::warn!("the inventory feed's token endpoint refused a client");
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    match credentials.issue() {
        Some(token) => json_response(
            StatusCode::OK,
            &json!({"access_token": token, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME.as_secs(), "scope": SCOPE}),
            "application/json",
        ),
        None => oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded_and_encoded_back() {
        assert_eq!(decode("status+eq+%22Active%22"), "status eq \"Active\"");
        assert_eq!(decode("100%"), "100%", "a stray % is kept");
        assert_eq!(decode("%zz"), "%zz");
        let filter = r#"name co "a&b" and x eq "é""#;
        assert_eq!(decode(&encode(filter)), filter);
    }

    #[test]
    fn credentials_are_read_from_the_directory_and_compared_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let credentials = Credentials { dir: dir.path().to_owned() };
        assert!(credentials.offered().is_empty());
        assert!(credentials.issue().is_none(), "no client, no token");
        std::fs::write(dir.path().join("token"), "feed-token-123\n").unwrap();
        assert!(credentials.bearer_ok("feed-token-123") && !credentials.bearer_ok("feed-token-12"));
        std::fs::write(dir.path().join("client_id"), "trelica").unwrap();
        std::fs::write(dir.path().join("client_secret"), "s3cret").unwrap();
        assert_eq!(credentials.offered(), ["an API token", "OAuth 2.0 client credentials"]);
        assert!(credentials.client_ok("trelica", "s3cret"));
        assert!(!credentials.client_ok("trelica", "s3cre") && !credentials.client_ok("other", "s3cret"));
        // A rotated token file takes effect at once.
        std::fs::write(dir.path().join("token"), "rotated").unwrap();
        assert!(!credentials.bearer_ok("feed-token-123") && credentials.bearer_ok("rotated"));
    }

    #[test]
    fn issued_tokens_are_signed_expire_and_end_with_the_client_secret() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("client_id"), "trelica").unwrap();
        std::fs::write(dir.path().join("client_secret"), "s3cret").unwrap();
        let credentials = Credentials { dir: dir.path().to_owned() };
        let token = credentials.issue().unwrap();
        assert!(credentials.bearer_ok(&token));
        // Another replica, reading the same Secret, accepts it.
        assert!(Credentials { dir: dir.path().to_owned() }.bearer_ok(&token));
        // Tampered: another expiry, nonce or signature.
        let parts: Vec<&str> = token.split('.').collect();
        let later = format!("ksf.{}.{}.{}", parts[1].parse::<u64>().unwrap() + 1, parts[2], parts[3]);
        assert!(!credentials.bearer_ok(&later));
        assert!(!credentials.bearer_ok(&format!("ksf.{}.{}0.{}", parts[1], parts[2], parts[3])));
        assert!(!credentials.bearer_ok(&format!("{token}x")));
        assert!(!credentials.bearer_ok(&format!("{token}.extra")));
        // Expired, or valid for longer than the feed issues: refused.
        let (now, nonce) = (unix_now(), "n");
        let past = format!("ksf.{}.{nonce}.{}", now - 1, sign("trelica", "s3cret", now - 1, nonce).unwrap());
        assert!(!credentials.bearer_ok(&past));
        let far = now + 10 * TOKEN_LIFETIME.as_secs();
        let forever = format!("ksf.{far}.{nonce}.{}", sign("trelica", "s3cret", far, nonce).unwrap());
        assert!(!credentials.bearer_ok(&forever));
        // A rotated client secret ends the tokens issued with the old one.
        std::fs::write(dir.path().join("client_secret"), "rotated").unwrap();
        assert!(!credentials.bearer_ok(&token));
    }
}
