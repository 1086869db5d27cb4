//! The provider conformance suite against the `postgres` provider and a real
//! PostgreSQL server (one throwaway cluster per test, `tests/common/pg_server.rs`;
//! the provider acts as an admin role with only CREATEROLE and
//! pg_signal_backend).
//!
//! The suite's generic checks that do not need HTTP run as they are:
//! accounts are NOLOGIN group roles tagged in their comment, a role made by
//! hand is the foreign account, roles are memberships of two roles created
//! first, keys are LOGIN roles (several at once, no limit of the provider's
//! own), and whether a key "works" is decided by logging in with its `uri`.
//!
//! The suite's `throttling_and_outages_are_transient` and
//! `rate_budget_is_never_exceeded` are HTTP-shaped (an HTTP fault proxy,
//! status codes, Retry-After), and PostgreSQL speaks its own wire protocol
//! over TCP: [`Target::upstream`] has no meaning here. Their postgres
//! counterparts below check the same promises through a TCP fault proxy
//! (`tests/common/tcp_fault_proxy.rs`), and against the real server's own
//! connection limit; [`Target::provider_via`] takes the proxy's `host:port`.
//!
//! PostgreSQL has no 429 and no Retry-After. A server that cannot take a
//! connection answers the startup message with a FATAL error and closes:
//! SQLSTATE 53300 (too many connections: max_connections, or the role's
//! CONNECTION LIMIT) or 57P03 (starting up, shutting down, in recovery).
//! Those, resets, refusals and stalls must all be
//! [`ProviderError::Transient`] with no `retry_after`, so the controller's
//! own backoff (with jitter) decides when to come back.

mod common;
mod conformance;
#[path = "common/pg_server.rs"]
mod pg_server;
#[path = "common/tcp_fault_proxy.rs"]
mod tcp_fault_proxy;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use conformance::Target;
use keysmith::{
    api::PostgresSslMode,
    provider::{
        guard::Guarded, postgres::PostgresProvider, ratelimit::TokenBucket, AccountRequest, IssuedKey, Provider,
        ProviderError, RoleGrant,
    },
};
use pg_server::{connect, refused, PgServer, ADMIN, ADMIN_PASSWORD};
use tcp_fault_proxy::{Fault, TcpFaultProxy};

/// The two roles every target has, for `role_sync_adds_and_removes`.
const ROLES: [&str; 2] = ["conf_reader", "conf_writer"];
/// How long a provider behind the fault proxy waits for a connection: the
/// suite's "request timeout of about two seconds".
const PROXIED_TIMEOUT: Duration = Duration::from_secs(2);

struct Postgres {
    server: PgServer,
}

impl Postgres {
    async fn start() -> Postgres {
        let server = PgServer::start().await;
        server
            .superuser()
            .await
            .batch_execute(&format!("CREATE ROLE {} NOLOGIN; CREATE ROLE {} NOLOGIN", ROLES[0], ROLES[1]))
            .await
            .expect("create the roles to grant");
        Postgres { server }
    }

    /// The server's own address, to put a proxy in front of.
    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.server.port))
    }

    /// The provider, through a proxy at `addr`.
    fn provider_at(&self, addr: SocketAddr) -> PostgresProvider {
        PostgresProvider::new(addr.ip().to_string(), addr.port(), "postgres", ADMIN, ADMIN_PASSWORD)
            .with_ssl_mode(PostgresSslMode::Disable)
            .with_connect_timeout(PROXIED_TIMEOUT)
    }
}

#[async_trait::async_trait]
impl Target for Postgres {
    fn provider(&self) -> Arc<dyn Provider> {
        Arc::new(self.server.provider())
    }

    fn upstream(&self) -> (String, reqwest::Client) {
        panic!(
            "PostgreSQL speaks its own protocol over TCP, not HTTP: the HTTP fault proxy cannot stand in \
             front of it (see connection_faults_are_transient and rate_budget_is_never_exceeded here)"
        )
    }

    /// `url` is the TCP address (`host:port`) of a proxy in front of the
    /// server, not an HTTP URL.
    async fn provider_via(&self, url: &str) -> Arc<dyn Provider> {
        let addr: SocketAddr = url.parse().unwrap_or_else(|e| panic!("{url:?} is not a host:port address: {e}"));
        Arc::new(self.provider_at(addr))
    }

    async fn refused_provider(&self) -> Arc<dyn Provider> {
        Arc::new(PostgresProvider::new(
            "127.0.0.1",
            self.server.port,
            "postgres",
            ADMIN,
            format!("not-the-password-{:016x}", rand::random::<u64>()),
        ))
    }

    fn account(&self, name: &str) -> AccountRequest {
        AccountRequest {
            name: format!("conf-{name}"),
            namespace: "conformance".into(),
            account_name: name.to_owned(),
            owner_uid: format!("uid-{:016x}-{name}", rand::random::<u64>()),
            description: Some("conformance".into()),
            owner: Some("tests".into()),
            options: Default::default(),
        }
    }

    fn roles(&self) -> [RoleGrant; 2] {
        ROLES.map(|role| RoleGrant { role: role.into(), scope: None })
    }

    async fn make_foreign_account(&self, name: &str) {
        let su = self.server.superuser().await;
        self.server.exec_formatted(&su, "CREATE ROLE %I LOGIN", &[name]).await;
    }

    async fn key_works(&self, key: &IssuedKey) -> bool {
        let login = self.server.login_key(key).await;
        if refused(&login) {
            return false;
        }
        match login {
            Ok(session) => session.simple_query("SELECT 1").await.is_ok(),
            Err(e) => panic!("logging in with key {} failed, and not as a refusal: {e}", key.id),
        }
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let target = Postgres::start().await;
            conformance::$name(&target).await;
        }
    )*};
}

conformance!(
    create_is_idempotent_and_adopts_nothing,
    another_integration_accounts_account_is_never_taken_over,
    delete_tolerates_not_found,
    role_sync_adds_and_removes,
    keys_issue_verify_and_revoke,
    refused_credential_is_unauthorized,
);

/// What `observe_account` through the proxy must give: Transient, with no
/// Retry-After (PostgreSQL has none), within `within`.
async fn expect_transient(p: &dyn Provider, account: &AccountRequest, what: &str, within: Duration) -> String {
    let started = Instant::now();
    let result = p.observe_account(account).await;
    let took = started.elapsed();
    match result {
        Err(ProviderError::Transient { message, retry_after: None }) => {
            assert!(took < within, "{what}: the provider took {took:?} to give up");
            message
        }
        other => panic!("{what} must be Transient without a retry_after, got {other:?}"),
    }
}

/// The postgres counterpart of the suite's `throttling_and_outages_are_transient`:
/// a server that answers "too many connections" or "starting up", resets,
/// refuses or stalls the connection is a Transient failure, never anything
/// a user must fix, and a stalled server does not hold the provider longer
/// than its connect timeout.
#[tokio::test]
async fn connection_faults_are_transient() {
    let target = Postgres::start().await;
    let proxy = TcpFaultProxy::start(target.addr()).await;
    let p = target.provider_via(&proxy.addr.to_string()).await;
    let account = target.account("faults");
    p.observe_account(&account).await.expect("the proxy passes connections through");
    let quick = Duration::from_secs(5);

    // The server's own "come back later" answers, as it sends them.
    for (code, message) in
        [("53300", "sorry, too many clients already"), ("57P03", "the database system is starting up")]
    {
        proxy.inject(Fault::Reject { code, message }, 1);
        let error = expect_transient(&*p, &account, code, quick).await;
        assert!(error.contains(code) && error.contains(message), "{error}");
    }
    proxy.inject(Fault::Reset, 1);
    expect_transient(&*p, &account, "a reset connection", quick).await;
    proxy.pause().await;
    expect_transient(&*p, &account, "a refused connection", quick).await;
    proxy.resume().await;
    // A server that accepts and then says nothing: the provider's connect
    // timeout (2 s here) bounds the whole handshake, long before the proxy
    // would let go (30 s, far apart so a loaded machine cannot blur them).
    let stall = Duration::from_secs(30);
    proxy.inject(Fault::Stall(stall), 1);
    let error = expect_transient(&*p, &account, "a stalled connection", Duration::from_secs(20)).await;
    assert!(error.contains("did not complete the connection handshake within 2s"), "{error}");

    p.observe_account(&account).await.expect("after the faults, calls succeed again");
    let connections = proxy.connections();
    let faulted: Vec<_> = connections.iter().filter_map(|c| c.fault.clone()).collect();
    assert_eq!(faulted.len(), 4, "each fault hit one connection: {connections:?}");
    // The provider leaves retrying to the controller: one connection per
    // call, none retried by itself (the refused one never got through).
    assert_eq!(connections.len(), 2 + 4, "{connections:?}");
}

/// The real server's own refusal: the admin role's CONNECTION LIMIT is
/// reached (SQLSTATE 53300, as with max_connections). Transient, and the
/// next call after a session ends succeeds.
#[tokio::test]
async fn the_servers_connection_limit_is_transient() {
    let target = Postgres::start().await;
    let su = target.server.superuser().await;
    su.batch_execute(&format!("ALTER ROLE {ADMIN} CONNECTION LIMIT 1")).await.expect("limit the admin");
    let held = connect(target.server.port, ADMIN, ADMIN_PASSWORD, "postgres").await.expect("the one admin session");
    let p = target.provider();
    match p.verify_connection().await {
        Err(ProviderError::Transient { message, retry_after: None }) => {
            assert!(message.contains("53300") && message.contains("too many connections"), "{message}")
        }
        other => panic!("a full connection limit must be Transient without a retry_after, got {other:?}"),
    }
    drop(held);
    // The server frees the slot when the backend has exited.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = p.verify_connection().await {
        assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
        assert!(Instant::now() < deadline, "the slot was never freed: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// At most this many stamps fall in any one-second window.
fn max_per_second(stamps: &[Instant]) -> usize {
    let mut stamps = stamps.to_vec();
    stamps.sort();
    (0..stamps.len())
        .map(|i| stamps[i..].iter().filter(|t| t.duration_since(stamps[i]) < Duration::from_secs(1)).count())
        .max()
        .unwrap_or(0)
}

/// The postgres counterpart of the suite's `rate_budget_is_never_exceeded`:
/// many concurrent callers behind the connection's token bucket never open
/// connections or run statements on the server faster than the budget,
/// counted at a TCP proxy in front of it.
#[tokio::test]
async fn rate_budget_is_never_exceeded() {
    let target = Postgres::start().await;
    let proxy = TcpFaultProxy::start(target.addr()).await;
    let (rate, burst) = (4.0, 2u32);
    let p: Arc<dyn Provider> = Arc::new(Guarded::new(
        target.provider_via(&proxy.addr.to_string()).await,
        Arc::new(TokenBucket::new(rate, burst)),
    ));
    let account = target.account("budget");
    // What one call costs the server: the budget counts calls.
    p.observe_account(&account).await.expect("observe through the proxy");
    let per_call = proxy.connections().len();
    let statements_per_call = proxy.statements().len();
    assert_eq!(per_call, 1, "each call opens one admin connection");
    assert!(statements_per_call >= 1, "the proxy sees the statements");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let calls: Vec<_> = (0..16)
        .map(|_| {
            let (p, account) = (p.clone(), account.clone());
            tokio::spawn(async move { p.observe_account(&account).await })
        })
        .collect();
    for call in calls {
        call.await.expect("the call's task").expect("observe");
    }
    let connections: Vec<Instant> = proxy.connections()[per_call..].iter().map(|c| c.at).collect();
    let statements: Vec<Instant> = proxy.statements()[statements_per_call..].iter().map(|s| s.at).collect();
    assert_eq!(connections.len(), 16 * per_call);
    assert_eq!(statements.len(), 16 * statements_per_call);
    let allowed_calls = burst as usize + rate as usize;
    let most = max_per_second(&connections);
    assert!(most <= allowed_calls * per_call, "{most} connections within one second; budget {rate}/s, burst {burst}");
    let most = max_per_second(&statements);
    assert!(
        most <= allowed_calls * statements_per_call,
        "{most} statements within one second; budget {rate} calls/s of {statements_per_call} each, burst {burst}"
    );
    let (first, last) = (connections.iter().min().copied(), connections.iter().max().copied());
    let span = last.zip(first).map(|(l, f)| l.duration_since(f)).unwrap_or_default();
    assert!(span >= Duration::from_secs_f64((16.0 - f64::from(burst)) / rate * 0.9), "16 calls took only {span:?}");
}
