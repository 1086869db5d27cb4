//! What every HTTP provider (SCIM, OAuth 2.0, AWS IAM) shares: the class of
//! an error status, the class of a failure to get an answer at all, and the
//! `Retry-After` header. A provider looks at its own error codes first (an
//! OAuth 2.0 `error`, an AWS `Code`) and falls back to [`classify_status`].

use std::{error::Error as _, time::Duration};

use jiff::Timestamp;
use reqwest::StatusCode;

use super::ProviderError;

/// The class of an HTTP error status: what the caller should do about it.
pub fn classify_status(status: StatusCode, message: String, retry_after: Option<Duration>) -> ProviderError {
    match status.as_u16() {
        401 | 403 => ProviderError::Unauthorized(message),
        404 => ProviderError::NotFound(message),
        409 | 412 => ProviderError::Conflict(message),
        408 | 429 => ProviderError::Transient { message, retry_after },
        // Not implemented: asking again will not help.
        501 => ProviderError::Invalid(message),
        500..=599 => ProviderError::Transient { message, retry_after },
        400..=499 => ProviderError::Invalid(message),
        _ => ProviderError::Transient { message, retry_after },
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`).
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `text` quoted from a server, with every one of `secrets` (the credentials
/// the request carried) cut out, and cut to at most `max` characters (with
/// `…`): a server may echo what it was sent.
pub fn scrub(text: &str, secrets: &[&str], max: usize) -> String {
    let mut text = text.to_owned();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        text = text.replace(secret, "<redacted>");
    }
    if text.chars().count() > max {
        text = text.chars().take(max).collect::<String>() + "…";
    }
    text
}

/// A failure to get an answer at all: `what` says which request it was. The
/// URL is left out (a base URL may carry userinfo); the causes are kept. A
/// request that cannot be built, or a redirect keysmith refuses to follow,
/// is the connection's spec to fix; anything else may pass.
pub fn transport_error(what: &str, error: reqwest::Error) -> ProviderError {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    let invalid = error.is_builder() || error.is_redirect();
    let error = error.without_url();
    let mut message = format!("{what} {kind}: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    if invalid {
        ProviderError::Invalid(message)
    } else {
        ProviderError::transient(message)
    }
}

/// What the apiserver said, with its HTTP code and reason, without the
/// client's wrapping (and without the request, which may carry data).
pub fn kube_error_message(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) if status.reason.is_empty() => format!("{} (HTTP {})", status.message, status.code),
        kube::Error::Api(status) => format!("{} (HTTP {} {})", status.message, status.code, status.reason),
        other => other.to_string(),
    }
}

/// The class of a Kubernetes API error (the apiserver's status, or a
/// failure to reach it): what the caller should do about it.
pub fn classify_kube_error(err: kube::Error) -> ProviderError {
    let message = kube_error_message(&err);
    match err {
        kube::Error::Api(status) => match status.code {
            401 | 403 => ProviderError::Unauthorized(message),
            404 => ProviderError::NotFound(message),
            409 => ProviderError::Conflict(message),
            400 | 405 | 406 | 413 | 415 | 422 => ProviderError::Invalid(message),
            _ => ProviderError::Transient {
                message,
                retry_after: status
                    .details
                    .as_ref()
                    .map(|d| d.retry_after_seconds)
                    .filter(|s| *s > 0)
                    .map(|s| Duration::from_secs(u64::from(s))),
            },
        },
        kube::Error::Auth(e) => ProviderError::Unauthorized(e.to_string()),
        e @ (kube::Error::BuildRequest(_)
        | kube::Error::HttpError(_)
        | kube::Error::InferConfig(_)
        | kube::Error::InferKubeconfig(_)
        | kube::Error::ProxyProtocolUnsupported { .. }
        | kube::Error::ProxyProtocolDisabled { .. }
        | kube::Error::RustlsTls(_)
        | kube::Error::TlsRequired) => ProviderError::Invalid(e.to_string()),
        // Connection failures, timeouts, garbled responses.
        e => ProviderError::transient(e.to_string()),
    }
}

/// The `Retry-After` header of an answer, if it has a valid one.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, Timestamp::now()))
}

/// A `Retry-After` value: delay-seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str, now: Timestamp) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse::<u64>().ok().map(Duration::from_secs);
    }
    let at = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    let seconds = at.as_second().saturating_sub(now.as_second());
    Some(Duration::from_secs(u64::try_from(seconds).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now: Timestamp = "2026-01-10T10:00:00Z".parse().expect("timestamp");
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(" 12 ", now), Some(Duration::from_secs(12)));
        assert_eq!(parse_retry_after("Sat, 10 Jan 2026 10:00:30 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Sat, 10 Jan 2026 10:01:00 GMT", now), Some(Duration::from_secs(60)));
        assert_eq!(parse_retry_after("Sat, 10 Jan 2026 09:00:00 GMT", now), Some(Duration::ZERO), "in the past");
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn statuses_are_classified() {
        let class =
            |code: u16| classify_status(StatusCode::from_u16(code).expect("status"), String::new(), None).category();
        for (code, category) in [
            (400, "Invalid"),
            (401, "Unauthorized"),
            (403, "Unauthorized"),
            (404, "NotFound"),
            (408, "Transient"),
            (409, "Conflict"),
            (412, "Conflict"),
            (413, "Invalid"),
            (429, "Transient"),
            (500, "Transient"),
            (501, "Invalid"),
            (503, "Transient"),
        ] {
            assert_eq!(class(code), category, "HTTP {code}");
        }
        let throttled = classify_status(StatusCode::TOO_MANY_REQUESTS, "m".to_owned(), Some(Duration::from_secs(7)));
        assert_eq!(
            throttled,
            ProviderError::Transient { message: "m".to_owned(), retry_after: Some(Duration::from_secs(7)) }
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_transient_and_names_no_url() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let url = format!("http://user:hunter2@127.0.0.1:{port}/scim/v2/Users");
        let error = reqwest::Client::new().get(&url).send().await.expect_err("nothing listens");
        let error = transport_error("GET /Users", error);
        let ProviderError::Transient { message, .. } = &error else { panic!("{error:?}") };
        assert!(message.starts_with("GET /Users could not connect: "), "{message}");
        assert!(!message.contains("hunter2") && !message.contains("/scim/v2"), "{message}");
    }
}
