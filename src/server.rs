//! The operator's HTTP endpoints: `/metrics` (Prometheus), `/healthz` (the
//! process is alive and serving) and `/readyz` (the caches are synced).
//!
//! A replica that is synced but waiting for the leader lease is ready: it
//! can take over at once, and counting it unready would stall rolling
//! updates and PodDisruptionBudgets for no benefit (no traffic is routed
//! to it). Whether a replica leads shows in the `keysmith_leader` gauge and
//! in `/readyz`'s body.

use std::{
    convert::Infallible,
    fmt,
    net::SocketAddr,
    str::FromStr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{HeaderValue, ACCEPT, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE};

/// Where the endpoints listen: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub Option<SocketAddr>);

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "off" | "" => Ok(ListenAddr(None)),
            addr => addr
                .parse()
                .map(|a| ListenAddr(Some(a)))
                .map_err(|_| format!("{addr:?} is not an address such as 0.0.0.0:8080 or 127.0.0.1:0, nor `off`")),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("off"),
        }
    }
}

/// What `/readyz` reports. Shared between the controllers, the leader
/// election and the server.
#[derive(Debug, Default)]
pub struct Health {
    synced: AtomicBool,
    leading: AtomicBool,
    stopping: AtomicBool,
}

impl Health {
    /// The caches hold a complete list.
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::SeqCst);
    }
    /// The controllers run (or stopped running).
    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::SeqCst);
    }
    /// The process is shutting down: no longer ready.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
    /// `Ok(what)` when ready, `Err(why not)` otherwise.
    pub fn readiness(&self) -> Result<&'static str, &'static str> {
        if self.stopping.load(Ordering::SeqCst) {
            Err("shutting down")
        } else if !self.synced.load(Ordering::SeqCst) {
            Err("caches are not synced yet")
        } else if self.leading.load(Ordering::SeqCst) {
            Ok("ok: caches synced, controllers running")
        } else {
            Ok("ok: caches synced, waiting for leadership")
        }
    }
}

/// Binds `addr` and serves the endpoints on a task of their own. Returns the
/// bound address (useful with port 0) and the task.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding the metrics address {addr}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            let health = health.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let response = respond(&request, &metrics, &health);
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(error) = connection.await {
                    tracing::debug!(%error, %peer, "metrics connection ended with an error");
                }
            });
        }
    });
    Ok((bound, task))
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

fn respond(request: &Request<Incoming>, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match request.uri().path() {
        "/healthz" | "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match health.readiness() {
            Ok(what) => text(StatusCode::OK, format!("{what}\n")),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        "/metrics" => {
            let openmetrics = request
                .headers()
                .get(ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            match metrics.encode(openmetrics) {
                Ok(body) => {
                    let mut response = text(StatusCode::OK, body);
                    let content_type = if openmetrics { OPENMETRICS_CONTENT_TYPE } else { PROMETHEUS_CONTENT_TYPE };
                    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                    response
                }
                Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "could not encode the metrics\n"),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics, /healthz or /readyz\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!("0.0.0.0:8080".parse::<ListenAddr>().unwrap().0, Some("0.0.0.0:8080".parse().unwrap()));
        assert_eq!("off".parse::<ListenAddr>().unwrap().0, None);
        assert!("8080".parse::<ListenAddr>().is_err());
    }

    #[test]
    fn ready_once_synced_leader_or_not_until_stopping() {
        let health = Health::default();
        assert!(health.readiness().is_err());
        health.set_synced();
        assert!(health.readiness().unwrap().contains("waiting for leadership"));
        health.set_leading(true);
        assert!(health.readiness().unwrap().contains("controllers running"));
        health.set_stopping();
        assert_eq!(health.readiness(), Err("shutting down"));
    }

    #[tokio::test]
    async fn serves_the_three_endpoints() {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), metrics, health.clone()).await.unwrap();
        let get = |path: &str| {
            let url = format!("http://{addr}{path}");
            async move {
                let response = reqwest::get(url).await.unwrap();
                let status = response.status().as_u16();
                let content_type = response.headers()[CONTENT_TYPE.as_str()].to_str().unwrap().to_owned();
                (status, content_type, response.text().await.unwrap())
            }
        };
        assert_eq!(get("/healthz").await.0, 200);
        assert_eq!(get("/readyz").await.0, 503);
        health.set_synced();
        assert_eq!(get("/readyz").await.0, 200);
        let (status, content_type, body) = get("/metrics").await;
        assert_eq!(status, 200);
        assert_eq!(content_type, PROMETHEUS_CONTENT_TYPE);
        assert!(body.contains("# TYPE keysmith_leader gauge"), "{body}");
        assert_eq!(get("/nope").await.0, 404);
        task.abort();
    }
}
