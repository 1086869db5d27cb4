//! A small HTTP proxy in front of a real server that injects faults (429
//! with Retry-After, 5xx, slow answers) and records every request it passes,
//! so tests can check retries, backoff and rate budgets against real targets.

use std::{
    collections::VecDeque,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;

/// What the proxy does to a request instead of (or before) forwarding it.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status, and a Retry-After header if given (seconds).
    Status(u16, Option<u64>),
    /// Wait this long, then forward.
    Delay(Duration),
}

/// One request seen by the proxy.
#[derive(Debug, Clone)]
pub struct Record {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub injected: bool,
}

pub struct FaultProxy {
    pub url: String,
    faults: Arc<Mutex<VecDeque<Fault>>>,
    log: Arc<Mutex<Vec<Record>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 and forwards to `upstream` with `client`
    /// (give it the upstream's CA for https).
    pub async fn start(upstream: &str, client: reqwest::Client) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let faults: Arc<Mutex<VecDeque<Fault>>> = Arc::default();
        let log: Arc<Mutex<Vec<Record>>> = Arc::default();
        let upstream = upstream.trim_end_matches('/').to_owned();
        let (f, l) = (faults.clone(), log.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (faults, log, upstream, client) = (f.clone(), l.clone(), upstream.clone(), client.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let (faults, log, upstream, client) =
                            (faults.clone(), log.clone(), upstream.clone(), client.clone());
                        async move { Ok::<_, Infallible>(handle(req, &faults, &log, &upstream, &client).await) }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        FaultProxy { url, faults, log, task }
    }

    /// The next `times` requests get `fault`.
    pub fn inject(&self, fault: Fault, times: usize) {
        let mut faults = self.faults.lock().unwrap();
        for _ in 0..times {
            faults.push_back(fault.clone());
        }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Record> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    faults: &Mutex<VecDeque<Fault>>,
    log: &Mutex<Vec<Record>>,
    upstream: &str,
    client: &reqwest::Client,
) -> Response<Full<Bytes>> {
    let at = Instant::now();
    let method = req.method().to_string();
    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let fault = faults.lock().unwrap().pop_front();
    let record = |status: u16, injected: bool| {
        log.lock().unwrap().push(Record { at, method: method.clone(), path: path.clone(), status, injected });
    };
    match fault {
        Some(Fault::Status(status, retry_after)) => {
            record(status, true);
            let mut response = Response::builder().status(status).header("content-type", "application/json");
            if let Some(seconds) = retry_after {
                response = response.header("retry-after", seconds.to_string());
            }
            let body = format!(
                r#"{{"kind":"Status","apiVersion":"v1","status":"Failure","message":"injected {status}","code":{status}{}}}"#,
                retry_after.map(|s| format!(r#","details":{{"retryAfterSeconds":{s}}}"#)).unwrap_or_default()
            );
            return response.body(Full::new(Bytes::from(body))).unwrap();
        }
        Some(Fault::Delay(delay)) => tokio::time::sleep(delay).await,
        None => {}
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut forward = client.request(parts.method.clone(), format!("{upstream}{path}")).body(body);
    for (name, value) in &parts.headers {
        if name != "host" && name != "content-length" {
            forward = forward.header(name, value);
        }
    }
    match forward.send().await {
        Ok(answer) => {
            let status = answer.status().as_u16();
            record(status, false);
            let mut response = Response::builder().status(status);
            for (name, value) in answer.headers() {
                if name != "transfer-encoding" && name != "content-length" && name != "connection" {
                    response = response.header(name, value);
                }
            }
            let bytes = answer.bytes().await.unwrap_or_default();
            response.body(Full::new(bytes)).unwrap()
        }
        Err(_) => {
            record(502, true);
            Response::builder().status(502).body(Full::new(Bytes::from_static(b"bad gateway"))).unwrap()
        }
    }
}
