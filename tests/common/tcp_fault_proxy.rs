//! A small TCP proxy in front of a real server that injects connection
//! faults and records what passes, for targets that do not speak HTTP (the
//! HTTP one is `fault_proxy.rs`). It forwards bytes untouched; it only reads
//! the client's side as PostgreSQL frontend messages to count statements.
//!
//! Faults apply to the next connections, one each, in the order injected:
//! - [`Fault::Reset`]: accepted, then reset at once (RST): a server that
//!   crashed or restarted, a load balancer with no backend behind it;
//! - [`Fault::Reject`]: the startup message is answered with a FATAL
//!   ErrorResponse carrying a SQLSTATE, then closed, as the server itself
//!   does when it is out of connection slots (`53300`) or starting up or
//!   shutting down (`57P03`);
//! - [`Fault::Stall`]: accepted, then nothing for a while (the client's
//!   bytes are read and dropped, nothing is answered), then closed: a server
//!   or pooler that hangs.
//!
//! [`TcpFaultProxy::pause`] stops listening altogether, so connections are
//! refused (ECONNREFUSED), until [`TcpFaultProxy::resume`];
//! [`TcpFaultProxy::cut`] closes every open connection (a watch stream or a
//! request in flight ends mid-way); [`TcpFaultProxy::chaos`] gives new
//! connections a random fault (seeded). [`TcpFaultProxy::start_raw`] is for
//! other protocols than PostgreSQL (TLS to a kube-apiserver): nothing is
//! parsed, only bytes forwarded.
//!
//! Test files include it with `#[path = "common/tcp_fault_proxy.rs"] mod tcp_fault_proxy;`.
#![allow(dead_code)]

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
};

/// What the proxy does to a connection instead of forwarding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Accept, then reset the connection at once.
    Reset,
    /// Answer the startup message with a FATAL ErrorResponse with this
    /// SQLSTATE and message, then close.
    Reject { code: &'static str, message: &'static str },
    /// Accept, answer nothing for this long, then close.
    Stall(Duration),
}

/// One connection the proxy accepted.
#[derive(Debug, Clone)]
pub struct Connection {
    /// When it was accepted.
    pub at: Instant,
    /// The fault it got, if any (else it was forwarded).
    pub fault: Option<Fault>,
}

/// One frontend message that runs SQL: a simple Query (`Q`) or the Parse
/// (`P`) of an extended-protocol query.
#[derive(Debug, Clone)]
pub struct Statement {
    /// When the proxy saw it.
    pub at: Instant,
    /// `Q` or `P`.
    pub tag: char,
}

#[derive(Default)]
struct Shared {
    /// Forward bytes without reading them as PostgreSQL messages.
    raw: bool,
    chaos: Mutex<Option<(f64, Vec<Fault>, rand::rngs::StdRng)>>,
    faults: Mutex<VecDeque<Fault>>,
    connections: Mutex<Vec<Connection>>,
    statements: Mutex<Vec<Statement>>,
}

/// The proxy: listens on 127.0.0.1, forwards to `upstream`.
pub struct TcpFaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
    /// Forwarding tasks, ended on drop.
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TcpFaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> TcpFaultProxy {
        Self::start_with(upstream, Shared::default())
    }

    /// Like [`TcpFaultProxy::start`] for any protocol: bytes are forwarded
    /// unread (no statements are counted).
    pub async fn start_raw(upstream: SocketAddr) -> TcpFaultProxy {
        Self::start_with(upstream, Shared { raw: true, ..Shared::default() })
    }

    fn start_with(upstream: SocketAddr, shared: Shared) -> TcpFaultProxy {
        let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0))).expect("listen on 127.0.0.1");
        let addr = listener.local_addr().expect("local address");
        let proxy = TcpFaultProxy {
            addr,
            upstream,
            shared: Arc::new(shared),
            acceptor: Mutex::new(None),
            tasks: Arc::default(),
        };
        proxy.spawn_acceptor(listener);
        proxy
    }

    /// From now on each new connection gets one of `faults`, drawn evenly,
    /// with `probability` (seeded); `None` stops that.
    pub fn chaos(&self, probability: Option<f64>, faults: Vec<Fault>, seed: u64) {
        use rand::SeedableRng as _;
        *self.shared.chaos.lock().expect("chaos lock") =
            probability.map(|p| (p, faults, rand::rngs::StdRng::seed_from_u64(seed)));
    }

    /// Closes every open connection now, mid-stream; new ones are accepted
    /// as before. Returns how many were open.
    pub fn cut(&self) -> usize {
        let mut tasks = self.tasks.lock().expect("tasks lock");
        tasks.retain(|t| !t.is_finished());
        let open = tasks.len();
        for task in tasks.drain(..) {
            task.abort();
        }
        open
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The next connection gets `fault`, `times` times over.
    pub fn inject(&self, fault: Fault, times: usize) {
        let mut faults = self.shared.faults.lock().expect("faults lock");
        faults.extend(std::iter::repeat_n(fault, times));
    }

    /// Every connection accepted so far.
    pub fn connections(&self) -> Vec<Connection> {
        self.shared.connections.lock().expect("connections lock").clone()
    }

    /// Every statement forwarded so far.
    pub fn statements(&self) -> Vec<Statement> {
        self.shared.statements.lock().expect("statements lock").clone()
    }

    /// Stops listening: new connections are refused. Open ones go on.
    pub async fn pause(&self) {
        let acceptor = self.acceptor.lock().expect("acceptor lock").take();
        if let Some(acceptor) = acceptor {
            acceptor.abort();
            // Once the task is gone, so is its listener.
            let _ = acceptor.await;
        }
    }

    /// Listens again, on the same port.
    pub async fn resume(&self) {
        // Another socket may take the port meanwhile; rarely, on loopback.
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match listen(self.addr) {
                Ok(listener) => break listener,
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("listen on {} again: {e}", self.addr),
            }
        };
        self.spawn_acceptor(listener);
    }

    fn spawn_acceptor(&self, listener: TcpListener) {
        let (shared, tasks, upstream) = (self.shared.clone(), self.tasks.clone(), self.upstream);
        let acceptor = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                let mut fault = shared.faults.lock().expect("faults lock").pop_front();
                if fault.is_none() {
                    use rand::Rng as _;
                    if let Some((p, faults, rng)) = shared.chaos.lock().expect("chaos lock").as_mut() {
                        if !faults.is_empty() && rng.random_bool(*p) {
                            fault = Some(faults[rng.random_range(0..faults.len())].clone());
                        }
                    }
                }
                shared
                    .connections
                    .lock()
                    .expect("connections lock")
                    .push(Connection { at: Instant::now(), fault: fault.clone() });
                let task = tokio::spawn(serve(client, fault, upstream, shared.clone()));
                let mut tasks = tasks.lock().expect("tasks lock");
                tasks.retain(|t| !t.is_finished());
                tasks.push(task);
            }
        });
        *self.acceptor.lock().expect("acceptor lock") = Some(acceptor);
    }
}

impl Drop for TcpFaultProxy {
    fn drop(&mut self) {
        if let Some(acceptor) = self.acceptor.lock().expect("acceptor lock").take() {
            acceptor.abort();
        }
        for task in self.tasks.lock().expect("tasks lock").drain(..) {
            task.abort();
        }
    }
}

/// A listener with SO_REUSEADDR, so a paused proxy can listen on its port again.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

async fn serve(mut client: TcpStream, fault: Option<Fault>, upstream: SocketAddr, shared: Arc<Shared>) {
    match fault {
        Some(Fault::Reset) => {
            // SO_LINGER 0: close() sends RST instead of FIN.
            let _ = client.set_zero_linger();
            drop(client);
        }
        Some(Fault::Reject { code, message }) => {
            let mut parser = FrontendParser::default();
            let mut buf = [0u8; 4096];
            // Read until the startup message is complete (an SSLRequest
            // first is answered "no TLS", as a server without TLS does).
            while !parser.startup_done {
                let Ok(n) = client.read(&mut buf).await else { return };
                if n == 0 {
                    return;
                }
                let before = parser.ssl_requests;
                parser.feed(&buf[..n]);
                if parser.ssl_requests > before && client.write_all(b"N").await.is_err() {
                    return;
                }
            }
            let _ = client.write_all(&error_response(code, message)).await;
            let _ = client.shutdown().await;
        }
        Some(Fault::Stall(duration)) => {
            let mut buf = [0u8; 4096];
            let _ = tokio::time::timeout(duration, async {
                while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {}
                // The client gave up: hold on to the socket until the end.
                std::future::pending::<()>().await;
            })
            .await;
        }
        None => forward(client, upstream, shared).await,
    }
}

async fn forward(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let to_server = async {
        let mut parser = FrontendParser::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let tags = if shared.raw { Vec::new() } else { parser.feed(&buf[..n]) };
            if !tags.is_empty() {
                let at = Instant::now();
                let mut statements = shared.statements.lock().expect("statements lock");
                statements.extend(
                    tags.into_iter().filter(|t| *t == b'Q' || *t == b'P').map(|t| Statement { at, tag: char::from(t) }),
                );
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let to_client = async {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(to_server, to_client);
}

/// PostgreSQL's request codes that may come before the startup message.
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

/// Splits the client's byte stream into frontend messages: first untagged
/// packets (an optional SSLRequest or GSSENCRequest, then the startup
/// message), then `tag, int32 length, body` messages.
#[derive(Default)]
struct FrontendParser {
    buf: Vec<u8>,
    startup_done: bool,
    ssl_requests: usize,
}

impl FrontendParser {
    /// Takes more bytes; returns the tags of the messages they completed.
    fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        self.buf.extend_from_slice(data);
        let mut tags = Vec::new();
        let mut at = 0;
        loop {
            let rest = &self.buf[at..];
            if !self.startup_done {
                if rest.len() < 8 {
                    break;
                }
                let len = be32(&rest[0..4]) as usize;
                if rest.len() < len.max(8) {
                    break;
                }
                let code = be32(&rest[4..8]);
                at += len.max(8);
                if code == SSL_REQUEST || code == GSSENC_REQUEST {
                    self.ssl_requests += 1;
                } else {
                    self.startup_done = true;
                }
            } else {
                if rest.len() < 5 {
                    break;
                }
                let len = be32(&rest[1..5]) as usize;
                if rest.len() < 1 + len.max(4) {
                    break;
                }
                tags.push(rest[0]);
                at += 1 + len.max(4);
            }
        }
        self.buf.drain(..at);
        tags
    }
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// A FATAL ErrorResponse (`E`), as the server sends before closing.
fn error_response(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', message)] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut message = vec![b'E'];
    message.extend_from_slice(&u32::try_from(body.len() + 4).unwrap_or(u32::MAX).to_be_bytes());
    message.extend_from_slice(&body);
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_messages_are_split_across_reads() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&8u32.to_be_bytes());
        stream.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        stream.extend_from_slice(&9u32.to_be_bytes());
        stream.extend_from_slice(&196_608u32.to_be_bytes());
        stream.push(0);
        for (tag, body) in [(b'p', &b"scram"[..]), (b'Q', b"SELECT 1\0"), (b'P', b"\0SELECT $1\0\0\0"), (b'S', b"")] {
            stream.push(tag);
            stream.extend_from_slice(&(u32::try_from(body.len()).unwrap() + 4).to_be_bytes());
            stream.extend_from_slice(body);
        }
        let mut parser = FrontendParser::default();
        let mut tags = Vec::new();
        for chunk in stream.chunks(3) {
            tags.extend(parser.feed(chunk));
        }
        assert_eq!(tags, b"pQPS");
        assert_eq!(parser.ssl_requests, 1);
        assert!(parser.startup_done && parser.buf.is_empty());
    }
}
