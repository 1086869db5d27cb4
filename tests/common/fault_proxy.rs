//! A small HTTP proxy in front of a real server that injects faults (429
//! with Retry-After, 5xx, slow answers, resets, stalls, lost answers) and records every
//! request it passes, so tests can check retries, backoff and rate budgets
//! against real targets. Faults come from a queue ([`FaultProxy::inject`])
//! or at random, seeded ([`FaultProxy::chaos`]).

use std::{
    collections::VecDeque,
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
    /// Close the connection without an answer.
    Reset,
    /// Answer nothing for this long (past the client's timeout), then close.
    Stall(Duration),
    /// Forward, let the server act, then close the connection without its
    /// answer: the request took effect and the client cannot know.
    Lost,
    /// Forward, let the server act, then answer this status instead of the
    /// server's answer, as a gateway whose upstream timed out does.
    ActedThen(u16),
    /// Forward untouched: queued before another fault, it aims that fault
    /// at a later request.
    Pass,
}

impl Fault {
    /// A short name for tallies: `429+retry-after`, `429`, `5xx`, `reset`,
    /// `stall`, `slow`, `lost`.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Status(429, Some(_)) => "429+retry-after",
            Fault::Status(429, None) => "429",
            Fault::Status(..) => "5xx",
            Fault::Delay(_) => "slow",
            Fault::Reset => "reset",
            Fault::Stall(_) => "stall",
            Fault::Lost => "lost",
            Fault::ActedThen(_) => "5xx after acting",
            Fault::Pass => "pass",
        }
    }
}

/// Random faults: each request gets one with `probability`, drawn evenly
/// from 429 with a Retry-After of 1–3 s, 429 without, 500, 503, a reset, a
/// stall of `stall`, a slow answer (0.5–3 s), and a lost answer.
struct Chaos {
    probability: f64,
    stall: Duration,
    rng: rand::rngs::StdRng,
}

impl Chaos {
    fn draw(&mut self) -> Option<Fault> {
        use rand::Rng as _;
        if !self.rng.random_bool(self.probability) {
            return None;
        }
        Some(match self.rng.random_range(0..8) {
            0 => Fault::Status(429, Some(self.rng.random_range(1..=3))),
            1 => Fault::Status(429, None),
            2 => Fault::Status(500, None),
            3 => Fault::Status(503, None),
            4 => Fault::Reset,
            5 => Fault::Stall(self.stall),
            6 => Fault::Lost,
            _ => Fault::Delay(Duration::from_millis(self.rng.random_range(500..3000))),
        })
    }
}

/// One request seen by the proxy.
#[derive(Debug, Clone)]
pub struct Record {
    pub at: Instant,
    pub method: String,
    pub path: String,
    /// 0 when nothing was answered (a reset or a stall).
    pub status: u16,
    pub injected: bool,
    /// The fault it got, if any ([`Fault::kind`]).
    pub fault: Option<&'static str>,
}

pub struct FaultProxy {
    pub url: String,
    faults: Arc<Mutex<VecDeque<Fault>>>,
    /// A fault for the next request with this method.
    targeted: Arc<Mutex<Option<(String, Fault)>>>,
    chaos: Arc<Mutex<Option<Chaos>>>,
    log: Arc<Mutex<Vec<Record>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 and forwards to `upstream` with `client`
    /// (give it the upstream's CA for https).
    pub async fn start(upstream: &str, client: reqwest::Client) -> FaultProxy {
        Self::start_with(upstream, client, false).await
    }

    /// Like [`FaultProxy::start`], but forwards the client's own `Host`
    /// header: for targets that check it, as SigV4-signed requests do (the
    /// client signs the host it connects to, the proxy's).
    pub async fn start_keeping_host(upstream: &str, client: reqwest::Client) -> FaultProxy {
        Self::start_with(upstream, client, true).await
    }

    async fn start_with(upstream: &str, client: reqwest::Client, keep_host: bool) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let faults: Arc<Mutex<VecDeque<Fault>>> = Arc::default();
        let chaos: Arc<Mutex<Option<Chaos>>> = Arc::default();
        let targeted: Arc<Mutex<Option<(String, Fault)>>> = Arc::default();
        let log: Arc<Mutex<Vec<Record>>> = Arc::default();
        let upstream = upstream.trim_end_matches('/').to_owned();
        let (f, c, l, t) = (faults.clone(), chaos.clone(), log.clone(), targeted.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (faults, chaos, log, upstream, client, targeted) =
                    (f.clone(), c.clone(), l.clone(), upstream.clone(), client.clone(), t.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (faults, chaos, log, upstream, client) =
                            (faults.clone(), chaos.clone(), log.clone(), upstream.clone(), client.clone());
                        let aimed = {
                            let mut targeted = targeted.lock().unwrap();
                            match targeted.as_ref() {
                                Some((method, _)) if method == req.method().as_str() => targeted.take().map(|t| t.1),
                                _ => None,
                            }
                        };
                        async move {
                            let fault = aimed.or_else(|| faults.lock().unwrap().pop_front());
                            let fault = fault.or_else(|| chaos.lock().unwrap().as_mut().and_then(Chaos::draw));
                            handle(req, fault, &log, &upstream, &client, keep_host)
                                .await
                                .ok_or_else(|| std::io::Error::other("injected reset"))
                        }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        FaultProxy { url, faults, targeted, chaos, log, task }
    }

    /// From now on each request gets a random fault with `probability`
    /// (seeded: the same seed draws the same faults in the same order);
    /// `None` stops that.
    pub fn chaos(&self, probability: Option<f64>, seed: u64, stall: Duration) {
        use rand::SeedableRng as _;
        *self.chaos.lock().unwrap() =
            probability.map(|probability| Chaos { probability, stall, rng: rand::rngs::StdRng::seed_from_u64(seed) });
    }

    /// The next `times` requests get `fault`.
    pub fn inject(&self, fault: Fault, times: usize) {
        let mut faults = self.faults.lock().unwrap();
        for _ in 0..times {
            faults.push_back(fault.clone());
        }
    }

    /// The next request with `method` (`PUT`...) gets `fault`.
    pub fn inject_next(&self, method: &str, fault: Fault) {
        *self.targeted.lock().unwrap() = Some((method.to_owned(), fault));
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

/// Answers one request; `None` resets the connection.
async fn handle(
    req: Request<hyper::body::Incoming>,
    fault: Option<Fault>,
    log: &Mutex<Vec<Record>>,
    upstream: &str,
    client: &reqwest::Client,
    keep_host: bool,
) -> Option<Response<Full<Bytes>>> {
    let at = Instant::now();
    let method = req.method().to_string();
    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let kind = fault.as_ref().map(Fault::kind);
    let record = |status: u16, injected: bool| {
        log.lock().unwrap().push(Record {
            at,
            method: method.clone(),
            path: path.clone(),
            status,
            injected,
            fault: kind,
        });
    };
    match fault {
        Some(Fault::Reset) => {
            record(0, true);
            return None;
        }
        Some(Fault::Stall(duration)) => {
            record(0, true);
            tokio::time::sleep(duration).await;
            return None;
        }
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
            return Some(response.body(Full::new(Bytes::from(body))).unwrap());
        }
        Some(Fault::Delay(delay)) => tokio::time::sleep(delay).await,
        Some(Fault::Lost | Fault::ActedThen(_) | Fault::Pass) | None => {}
    }
    let lost = matches!(fault, Some(Fault::Lost));
    let replaced = match fault {
        Some(Fault::ActedThen(status)) => Some(status),
        _ => None,
    };
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut forward = client.request(parts.method.clone(), format!("{upstream}{path}")).body(body);
    for (name, value) in &parts.headers {
        if (keep_host || name != "host") && name != "content-length" {
            forward = forward.header(name, value);
        }
    }
    match forward.send().await {
        Ok(answer) => {
            let status = answer.status().as_u16();
            record(replaced.unwrap_or(status), lost || replaced.is_some());
            if lost {
                let _ = answer.bytes().await;
                return None;
            }
            if let Some(status) = replaced {
                let _ = answer.bytes().await;
                let body = Bytes::from(format!(
                    r#"{{"error":"server_error","error_description":"injected {status} after the server acted"}}"#
                ));
                return Some(
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Full::new(body))
                        .unwrap(),
                );
            }
            let mut response = Response::builder().status(status);
            for (name, value) in answer.headers() {
                if name != "transfer-encoding" && name != "content-length" && name != "connection" {
                    response = response.header(name, value);
                }
            }
            let bytes = answer.bytes().await.unwrap_or_default();
            Some(response.body(Full::new(bytes)).unwrap())
        }
        Err(_) => {
            record(502, true);
            Some(Response::builder().status(502).body(Full::new(Bytes::from_static(b"bad gateway"))).unwrap())
        }
    }
}
