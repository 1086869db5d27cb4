//! The load campaign (RELIABILITY.md): many accounts rotate every minute
//! while everything between the operator and the outside world fails at
//! random, seeded:
//!
//! - in front of each target app, the tests' fault proxies: for scim (a
//!   real SCIM server), aws_iam (moto) and oauth2 (oidc-provider), the HTTP
//!   proxy answers 429 with and without Retry-After, 500 and 503, resets
//!   the connection, stalls past the provider's timeout, answers slowly,
//!   or lets the request through and loses the answer; for postgres (a real
//!   server), the TCP proxy resets new connections, refuses them as a full
//!   server does (`53300`) or stalls them;
//! - between the operator and the kube-apiserver (which the kubernetes
//!   provider targets too), a TCP proxy cuts every open connection (watch
//!   streams and requests in flight) every 15–45 s and resets some new
//!   ones; the apiserver itself is killed (SIGKILL) and restarted while
//!   rotations are in flight; and the test keeps writing to the accounts,
//!   so the operator's writes, which carry a resourceVersion, meet real 409
//!   conflicts.
//!
//! The operator runs as its own process (restarted if it ever exits, and
//! counted). Afterwards the faults stop and every account must converge;
//! then each one's keys are checked against the target app itself
//! (`common/invariants.rs`); then all accounts are deleted with the faults
//! back on, and nothing may be left in the target apps. From the
//! operator's own log (one line per budget token and per reconcile) it
//! checks that no connection's rate budget was exceeded and counts hot
//! loops; from the apiserver's audit log, the 409s.
//!
//! `KEYSMITH_LOAD_SEED`, `KEYSMITH_LOAD_ACCOUNTS` (default 12),
//! `KEYSMITH_LOAD_SECS` (default 120: how long the faults last),
//! `KEYSMITH_LOAD_FAULT_RATE` (default 0.08: the share of requests and
//! connections to the targets that get a fault) and
//! `KEYSMITH_LOAD_PROVIDERS` (default `kubernetes,postgres,scim,aws_iam,oauth2`)
//! choose the run. For oauth2 the invariants read the registration records
//! the operator keeps in Secrets (never writing them), and the server is
//! asked which clients it holds: exactly the accounts' while they live,
//! none once they are deleted.

#[path = "common/campaign.rs"]
mod campaign;
mod common;
#[path = "common/invariants.rs"]
mod invariants;
#[path = "common/moto_server.rs"]
mod moto_server;
#[path = "common/oidc_server.rs"]
mod oidc_server;
#[path = "common/pg_server.rs"]
mod pg_server;
#[path = "common/scim_server.rs"]
mod scim_server;
#[path = "common/tcp_fault_proxy.rs"]
mod tcp_fault_proxy;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::{
    apply_yaml, control_plane, fault_proxy::FaultProxy, kubernetes_connection_identity, Operator, OperatorOptions,
    TestNamespace,
};
use keysmith::{
    api::{IntegrationAccount, KeyState},
    provider::{kubernetes::KubernetesProvider, Provider},
};
use kube::{
    api::{Api, DeleteParams, ListParams, Patch, PatchParams},
    ResourceExt,
};
use moto_server::MotoServer;
use oidc_server::OidcServer;
use pg_server::{PgServer, ADMIN, ADMIN_PASSWORD};
use rand::{rngs::StdRng, Rng, SeedableRng};
use scim_server::ScimServer;
use serde_json::json;
use tcp_fault_proxy::{Fault as TcpFault, TcpFaultProxy};

/// Each connection's budget.
const RATE: f64 = 8.0;
const BURST: f64 = 10.0;
/// Longer than every provider's request timeout (30 s) and postgres's
/// connect timeout (10 s).
const STALL: Duration = Duration::from_secs(35);
const PG_STALL: Duration = Duration::from_secs(12);
/// How long the apiserver stays down when restarted.
const APISERVER_DOWN: Duration = Duration::from_secs(3);
/// The longest an account may stay not Ready, or a rotation be late, while faulted.
const CONVERGE_BOUND: Duration = Duration::from_secs(360);
/// More reconciles of one account than this within [`HOT_WINDOW`] is a hot
/// loop. A reconcile requeues itself at most once a second, so a loop is
/// about 60 a minute; a rotation with its follow-ups and retries, a few.
const HOT_LIMIT: usize = 40;
const HOT_WINDOW: Duration = Duration::from_secs(60);

/// One target app, its fault proxy and the connection to it.
struct Target {
    /// The provider's name; also the AppConnection's (`_` as `-`).
    name: String,
    /// Straight to the target, for the invariants (not through a proxy).
    provider: Arc<dyn Provider>,
    role: String,
    /// The AppConnection's `spec.provider`.
    spec: String,
    http: Option<FaultProxy>,
    tcp: Option<TcpFaultProxy>,
}

impl Target {
    fn connection(&self) -> String {
        self.name.replace('_', "-")
    }

    fn faults(&self, rate: Option<f64>, seed: u64) {
        if let Some(proxy) = &self.http {
            proxy.chaos(rate, seed, STALL);
        }
        if let Some(proxy) = &self.tcp {
            let faults = vec![
                TcpFault::Reset,
                TcpFault::Reject { code: "53300", message: "sorry, too many clients already" },
                TcpFault::Stall(PG_STALL),
            ];
            proxy.chaos(rate, faults, seed);
        }
    }

    /// Faults injected so far, by kind.
    fn injected(&self) -> BTreeMap<String, usize> {
        let mut tally = BTreeMap::new();
        if let Some(proxy) = &self.http {
            for record in proxy.requests() {
                if let Some(kind) = record.fault {
                    *tally.entry(kind.to_owned()).or_default() += 1;
                }
            }
        }
        if let Some(proxy) = &self.tcp {
            for connection in proxy.connections() {
                let kind = match connection.fault {
                    Some(TcpFault::Reset) => "reset",
                    Some(TcpFault::Reject { .. }) => "refused (53300)",
                    Some(TcpFault::Stall(_)) => "stall",
                    None => continue,
                };
                *tally.entry(kind.to_owned()).or_default() += 1;
            }
        }
        tally
    }

    fn requests(&self) -> usize {
        self.http.as_ref().map(|p| p.requests().len()).or(self.tcp.as_ref().map(|p| p.connections().len())).unwrap_or(0)
    }
}

fn connection_yaml(target: &Target) -> String {
    format!(
        "apiVersion: keysmith.dev/v1alpha1\nkind: AppConnection\nmetadata: {{name: {}}}\nspec:\n  provider: {}\n  serviceAccountName: keysmith\n  rateLimit: {{requestsPerSecond: {RATE}, burst: {BURST}}}\n---\n",
        target.connection(),
        target.spec
    )
}

fn account_yaml(i: usize, target: &Target) -> String {
    format!(
        r#"
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {{name: load-{i}}}
spec:
  connectionRef: {{name: {connection}}}
  secret: {{name: load-{i}-key}}
  rotationPolicyRef: {{name: minutely}}
---
apiVersion: keysmith.dev/v1alpha1
kind: RoleBinding
metadata: {{name: load-{i}-roles}}
spec: {{accountRef: {{name: load-{i}}}, roles: ["{role}"]}}
"#,
        connection = target.connection(),
        role = target.role
    )
}

/// What the server's administrator did about the clients keysmith lost
/// control of: when each was dealt with, and the accounts nudged.
#[derive(Default)]
struct Admin {
    /// Client id → when its client and registration Secret were deleted.
    resolved: BTreeMap<String, Instant>,
    /// Accounts annotated because they had not picked up the deleted
    /// Secret 30 s later (the README's advice).
    nudged: std::collections::BTreeSet<String>,
}

/// The server's administrator at work: for each account whose conditions
/// (or, while it is being deleted, events) say keysmith lost control of an
/// OAuth2 client (an update's answer was lost, and with it the server's new
/// registration access token), delete that client at the server, then
/// keysmith's registration record, as the message asks, trying again until
/// the Secret is gone. An account still saying so about that client 30 s
/// later gets the README's nudge (`keysmith.dev/rotate-now`), counted.
async fn resolve_lost_control(
    oidc: &OidcServer,
    secrets: &Api<k8s_openapi::api::core::v1::Secret>,
    events: &Api<k8s_openapi::api::core::v1::Event>,
    accounts: &[IntegrationAccount],
    admin: &mut Admin,
) {
    const MARK: &str = "lost control of OAuth2 client ";
    let client_of = |message: &str| {
        let rest = message.split(MARK).nth(1)?;
        Some(rest.split(':').next().unwrap_or_default().to_owned()).filter(|id| !id.is_empty())
    };
    let events: Vec<k8s_openapi::api::core::v1::Event> =
        events.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    for account in accounts {
        let name = account.name_any();
        let conditions: Vec<String> =
            account.status.iter().flat_map(|s| s.common.conditions.iter()).map(|c| c.message.clone()).collect();
        let notes = events
            .iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(name.as_str()))
            .filter_map(|e| e.message.clone());
        for message in conditions.iter().cloned().chain(notes) {
            let Some(client_id) = client_of(&message) else { continue };
            match admin.resolved.get(&client_id) {
                None => {
                    println!("{name}: keysmith lost control of OAuth2 client {client_id}; the admin deletes it");
                    oidc.admin_delete_client(&client_id).await;
                    let record = format!("{name}-oauth2-registration");
                    match secrets.delete(&record, &DeleteParams::default()).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(e)) if e.code == 404 => {}
                        // Tried again next time: the client is already gone.
                        Err(error) => {
                            println!("{name}: deleting {record} failed ({error}); again later");
                            continue;
                        }
                    }
                    admin.resolved.insert(client_id, Instant::now());
                }
                Some(at)
                    if at.elapsed() > Duration::from_secs(30)
                        && !admin.nudged.contains(&name)
                        && conditions.iter().any(|c| client_of(c).as_deref() == Some(client_id.as_str())) =>
                {
                    println!("{name}: still waiting on client {client_id} 30 s after the admin acted; nudged");
                    let patch =
                        json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": format!("admin-{client_id}")}}});
                    let api: Api<IntegrationAccount> =
                        Api::namespaced(secrets.clone().into_client(), &account.namespace().unwrap_or_default());
                    let _ = api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await;
                    admin.nudged.insert(name.clone());
                }
                Some(_) => {}
            }
        }
    }
}

/// The account's number: `load-<i>`.
fn index(account: &IntegrationAccount) -> usize {
    account.name_any().trim_start_matches("load-").parse().unwrap_or_default()
}

fn is_ready(account: &IntegrationAccount) -> bool {
    let Some(status) = account.status.as_ref() else { return false };
    status.common.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
        && status.common.observed_generation == account.metadata.generation
}

fn is_settled(account: &IntegrationAccount) -> bool {
    is_ready(account) && !has_rotation_in_flight(account)
}

fn has_rotation_in_flight(account: &IntegrationAccount) -> bool {
    account.status.as_ref().is_some_and(|s| {
        s.pending.is_some() || s.keys.iter().any(|k| matches!(k.state, KeyState::Pending | KeyState::Issued))
    })
}

/// What the sampler saw, every 5 s, of every account.
#[derive(Default)]
struct Samples {
    /// The longest an account that had been Ready stayed not Ready.
    longest_not_ready: Duration,
    /// Since when each account is not Ready (once it has been Ready).
    not_ready_since: HashMap<String, Instant>,
    ever_ready: std::collections::HashSet<String>,
    /// The oldest current key seen, in seconds.
    oldest_key: i64,
    /// Key changes seen (rotations, counted from the current key's id).
    current: HashMap<String, String>,
    rotations: usize,
}

impl Samples {
    fn observe(&mut self, accounts: &[IntegrationAccount], now: Instant) {
        for account in accounts {
            let name = account.name_any();
            if is_ready(account) {
                self.ever_ready.insert(name.clone());
                if let Some(since) = self.not_ready_since.remove(&name) {
                    self.longest_not_ready = self.longest_not_ready.max(now - since);
                }
            } else if self.ever_ready.contains(&name) {
                let since = *self.not_ready_since.entry(name.clone()).or_insert(now);
                self.longest_not_ready = self.longest_not_ready.max(now - since);
            }
            if let Some(key) = account.status.as_ref().and_then(|s| s.current_key.as_ref()) {
                let age = jiff::Timestamp::now().as_second() - key.issued_at.0.as_second();
                self.oldest_key = self.oldest_key.max(age);
                match self.current.insert(name, key.id.clone()) {
                    Some(before) if before != key.id => self.rotations += 1,
                    _ => {}
                }
            }
        }
    }
}

/// One line of the operator's JSON log that the campaign reads.
struct LogLine {
    at: jiff::Timestamp,
    message: String,
    provider: Option<String>,
    account: Option<String>,
}

fn read_log(path: &std::path::Path) -> Vec<LogLine> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|v| {
            let message = v.get("message")?.as_str()?.to_owned();
            if message != "provider call" && message != "reconcile" {
                return None;
            }
            Some(LogLine {
                at: v.get("timestamp")?.as_str()?.parse().ok()?,
                message,
                provider: v.get("provider").and_then(|p| p.as_str()).map(str::to_owned),
                account: v.get("account").and_then(|p| p.as_str()).map(str::to_owned),
            })
        })
        .collect()
}

/// The token bucket run over the calls' times: how far below empty it
/// went, in requests (0 when the budget held). 0.5 of slack covers the
/// log's clock reading after the bucket's.
fn budget_excess(times: &[jiff::Timestamp]) -> f64 {
    let mut tokens = BURST;
    let mut last: Option<jiff::Timestamp> = None;
    let mut worst: f64 = 0.0;
    for at in times {
        if let Some(last) = last {
            let elapsed = at.duration_since(last).as_secs_f64().max(0.0);
            tokens = (tokens + elapsed * RATE).min(BURST);
        }
        last = Some(*at);
        tokens -= 1.0;
        worst = worst.min(tokens);
    }
    (-worst - 0.5).max(0.0)
}

/// Windows of [`HOT_WINDOW`] in which one account was reconciled more than
/// [`HOT_LIMIT`] times, and the most reconciles of one account in any such window.
fn hot_loops(lines: &[LogLine]) -> (usize, usize) {
    let mut by_account: HashMap<&str, Vec<jiff::Timestamp>> = HashMap::new();
    for line in lines.iter().filter(|l| l.message == "reconcile") {
        if let Some(account) = &line.account {
            by_account.entry(account).or_default().push(line.at);
        }
    }
    let (mut hot, mut most) = (0, 0);
    for times in by_account.values() {
        let mut start = 0;
        let mut in_hot = false;
        for end in 0..times.len() {
            while times[end].duration_since(times[start]).as_secs_f64() > HOT_WINDOW.as_secs_f64() {
                start += 1;
            }
            let count = end - start + 1;
            most = most.max(count);
            if count > HOT_LIMIT && !in_hot {
                hot += 1;
                in_hot = true;
            } else if count <= HOT_LIMIT {
                in_hot = false;
            }
        }
    }
    (hot, most)
}

/// A kubeconfig for the operator user whose server is `server`.
fn kubeconfig_via(
    cp: &keysmith::controlplane::ControlPlane,
    server: &str,
    dir: &std::path::Path,
) -> std::path::PathBuf {
    let mut config = cp.kubeconfig_for_token(cp.operator_token());
    for cluster in &mut config.clusters {
        if let Some(cluster) = cluster.cluster.as_mut() {
            cluster.server = Some(server.to_owned());
        }
    }
    let path = dir.join("operator-via-proxy.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

#[tokio::test]
async fn under_faults_and_load_no_key_is_lost_and_no_budget_exceeded() {
    let seed: u64 = campaign::env("KEYSMITH_LOAD_SEED", 20_261_207);
    let count: usize = campaign::env("KEYSMITH_LOAD_ACCOUNTS", 12);
    let secs: u64 = campaign::env("KEYSMITH_LOAD_SECS", 120);
    let rate: f64 = campaign::env("KEYSMITH_LOAD_FAULT_RATE", 0.08);
    assert!((0.0..=1.0).contains(&rate), "KEYSMITH_LOAD_FAULT_RATE is a share, 0 to 1");
    let providers = campaign::providers("KEYSMITH_LOAD_PROVIDERS", "kubernetes,postgres,scim,aws_iam,oauth2");
    println!("load campaign: seed {seed}, {count} accounts, {secs} s of faults at {rate}, providers {providers:?}");
    let mut rng = StdRng::seed_from_u64(seed);
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "load").await;

    // The target apps, each behind its fault proxy.
    let pg = if providers.iter().any(|p| p == "postgres") { Some(PgServer::start().await) } else { None };
    let scim = if providers.iter().any(|p| p == "scim") { Some(ScimServer::start().await) } else { None };
    let moto = if providers.iter().any(|p| p == "aws_iam") { Some(MotoServer::start().await) } else { None };
    let oidc = if providers.iter().any(|p| p == "oauth2") { Some(OidcServer::start().await) } else { None };
    let mut targets: Vec<Target> = Vec::new();
    let mut credentials = String::new();
    for name in &providers {
        let target = match name.as_str() {
            "kubernetes" => Target {
                name: name.clone(),
                provider: Arc::new(KubernetesProvider::new(
                    client.clone(),
                    cp.server_url().to_owned(),
                    Some(cp.ca_pem().to_owned()),
                    false,
                )),
                role: "view".into(),
                spec: "{kubernetes: {}}".into(),
                http: None,
                tcp: None,
            },
            "postgres" => {
                let pg = pg.as_ref().expect("postgres started");
                pg.superuser().await.batch_execute("CREATE ROLE load_reader NOLOGIN").await.expect("the role");
                let proxy = TcpFaultProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], pg.port))).await;
                credentials.push_str(&campaign::postgres_admin(ADMIN, ADMIN_PASSWORD));
                Target {
                    name: name.clone(),
                    provider: Arc::new(pg.provider()),
                    role: "load_reader".into(),
                    spec: campaign::postgres_spec(proxy.port()),
                    http: None,
                    tcp: Some(proxy),
                }
            }
            "scim" => {
                let scim = scim.as_ref().expect("the SCIM server started");
                scim.create_group("Load Readers").await;
                let proxy = FaultProxy::start(&scim.origin, scim.http.clone()).await;
                credentials.push_str(&campaign::scim_admin(&scim.token));
                Target {
                    name: name.clone(),
                    provider: Arc::new(scim.provider()),
                    role: "Load Readers".into(),
                    spec: campaign::scim_spec(&format!("{}/v2", proxy.url)),
                    http: Some(proxy),
                    tcp: None,
                }
            }
            "aws_iam" => {
                let moto = moto.as_ref().expect("moto started");
                let proxy = FaultProxy::start_keeping_host(&moto.endpoint, moto.http.clone()).await;
                credentials.push_str(&campaign::aws_admin(&moto.admin_key));
                Target {
                    name: name.clone(),
                    provider: Arc::new(moto.provider()),
                    role: moto.policy_arn("ks-read"),
                    spec: campaign::aws_spec(&proxy.url),
                    http: Some(proxy),
                    tcp: None,
                }
            }
            "oauth2" => {
                let oidc = oidc.as_ref().expect("oidc-provider started");
                // The server builds each client's configuration endpoint
                // from the request's Host: the proxy's, so the operator
                // reaches those through it too.
                let proxy = FaultProxy::start_keeping_host(&oidc.info.issuer, oidc.http.clone()).await;
                credentials.push_str(&campaign::oauth2_admin(&oidc.info.initial_access_token));
                Target {
                    name: name.clone(),
                    provider: Arc::new(oidc.operator_view(client.clone())),
                    role: "read".into(),
                    spec: campaign::oauth2_spec(&proxy.url),
                    http: Some(proxy),
                    tcp: None,
                }
            }
            other => panic!("unknown provider {other}"),
        };
        targets.push(target);
    }

    // The connections' identity: what the kubernetes provider needs, and
    // reading the admin credentials.
    let mut setup = kubernetes_connection_identity(&["view"]);
    setup.push_str(&credentials);
    setup.push_str(&campaign::credentials_reader(""));
    for target in &targets {
        setup.push_str(&connection_yaml(target));
    }
    setup.push_str(
        "apiVersion: keysmith.dev/v1alpha1\nkind: KeyRotationPolicy\nmetadata: {name: minutely}\nspec: {rotateEvery: 1m, jitter: 30s, gracePeriod: 10s}\n",
    );
    apply_yaml(&client, &ns.name, &setup).await;

    // The operator reaches the apiserver through a TCP proxy that can cut it off.
    let apiserver_addr: std::net::SocketAddr =
        cp.server_url().trim_start_matches("https://").parse().expect("the apiserver's address");
    let apiserver_proxy = TcpFaultProxy::start_raw(apiserver_addr).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kubeconfig_via(cp, &format!("https://127.0.0.1:{}", apiserver_proxy.port()), dir.path());
    let start_operator = || {
        Operator::start_with(
            cp,
            &ns.name,
            &OperatorOptions {
                env: &[("KEYSMITH_LOG_FORMAT", "json")],
                kubeconfig: Some(&kubeconfig),
                ..OperatorOptions::default()
            },
        )
    };
    let mut operators = vec![start_operator()];

    // The accounts, spread over the providers; all Ready before the faults.
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let created = Instant::now();
    let mut yaml = String::new();
    for i in 0..count {
        yaml.push_str(&account_yaml(i, &targets[i % targets.len()]));
        yaml.push_str("---\n");
    }
    apply_yaml(&client, &ns.name, &yaml).await;
    let all = |check: fn(&IntegrationAccount) -> bool| {
        let accounts = accounts.clone();
        async move {
            let list = accounts.list(&ListParams::default()).await.ok()?;
            (list.items.len() == count && list.items.iter().all(check)).then_some(list.items)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while all(is_ready).await.is_none() {
        assert!(
            Instant::now() < deadline,
            "the accounts never all got Ready before the faults:\n{}",
            operators[0].logs()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!("{count} accounts Ready in {:.0} s before any fault", created.elapsed().as_secs_f64());

    // The faults.
    let audit_mark = cp.audit_mark().unwrap();
    let before: Vec<usize> = targets.iter().map(Target::requests).collect();
    for (i, target) in targets.iter().enumerate() {
        target.faults(Some(rate), seed.wrapping_add(i as u64));
    }
    apiserver_proxy.chaos(Some(0.02), vec![TcpFault::Reset], seed);
    let stop = Arc::new(AtomicBool::new(false));
    let touches = {
        let (accounts, stop) = (accounts.clone(), stop.clone());
        let mut rng = StdRng::seed_from_u64(seed ^ 0x70c4);
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("load-{}", rng.random_range(0..count));
                let patch = json!({"metadata": {"labels": {"load.keysmith.dev/touch": n.to_string()}}});
                let _ = accounts.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await;
                n += 1;
                // About three writes a minute per account, however many.
                tokio::time::sleep(Duration::from_millis((20_000 / count as u64).max(100))).await;
            }
            n
        })
    };
    let samples = Arc::new(Mutex::new(Samples::default()));
    let sampler = {
        let (accounts, stop, samples) = (accounts.clone(), stop.clone(), samples.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(list) = accounts.list(&ListParams::default()).await {
                    samples.lock().unwrap().observe(&list.items, Instant::now());
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        })
    };
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let restarts_planned = (secs / 200).max(1);
    let mut restart_times: Vec<Instant> =
        (1..=restarts_planned).map(|k| started + Duration::from_secs(secs * k / (restarts_planned + 1))).collect();
    let mut next_cut = started + Duration::from_secs(rng.random_range(15..45));
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns.name);
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), &ns.name);
    let mut admin = Admin::default();
    let mut next_admin = started;
    let (mut cuts, mut cut_connections, mut restarts, mut in_flight_at_restart, mut operator_exits) = (0, 0, 0, 0, 0);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(status) = operators.last_mut().and_then(Operator::ended) {
            operator_exits += 1;
            println!("the operator ended ({status}); restarting it, as its Deployment would");
            operators.push(start_operator());
        }
        if let (Some(oidc), true) = (&oidc, Instant::now() >= next_admin) {
            let list = accounts.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
            resolve_lost_control(oidc, &secrets, &events, &list, &mut admin).await;
            next_admin = Instant::now() + Duration::from_secs(5);
        }
        if Instant::now() >= next_cut {
            cuts += 1;
            cut_connections += apiserver_proxy.cut();
            next_cut = Instant::now() + Duration::from_secs(rng.random_range(15..45));
        }
        if restart_times.first().is_some_and(|t| Instant::now() >= *t) {
            restart_times.remove(0);
            // Mid-rotation: a quarter of the accounts are asked to rotate
            // now, and the apiserver goes down while they are at it.
            let value = format!("restart-{restarts}");
            let asked: Vec<String> = (0..count).step_by(4).map(|i| format!("load-{i}")).collect();
            for name in &asked {
                let patch = json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": value}}});
                let _ = accounts.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await;
            }
            let wait_until = Instant::now() + Duration::from_secs(10);
            loop {
                let list = accounts.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
                let in_flight = list.iter().filter(|a| has_rotation_in_flight(a)).count();
                if in_flight > 0 || Instant::now() > wait_until {
                    in_flight_at_restart += in_flight;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            cp.restart_apiserver(APISERVER_DOWN).await.expect("the apiserver restarts");
            restarts += 1;
        }
    }

    // The faults stop; every account must converge.
    for target in &targets {
        target.faults(None, 0);
    }
    apiserver_proxy.chaos(None, Vec::new(), 0);
    stop.store(true, Ordering::Relaxed);
    let touched = touches.await.unwrap();
    sampler.await.unwrap();
    let quiet = Instant::now();
    let deadline = quiet + Duration::from_secs(300);
    let settled = loop {
        if let Some(list) = all(is_settled).await {
            break list;
        }
        if let Some(oidc) = &oidc {
            let list = accounts.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
            resolve_lost_control(oidc, &secrets, &events, &list, &mut admin).await;
        }
        if let Some(status) = operators.last_mut().and_then(Operator::ended) {
            operator_exits += 1;
            println!("the operator ended ({status}); restarting it");
            operators.push(start_operator());
        }
        if Instant::now() >= deadline {
            let list = accounts.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
            for account in list.iter().filter(|a| !is_settled(a)) {
                let status = serde_json::to_string_pretty(&account.status).unwrap_or_default();
                println!("not settled: {}\n{status}", account.name_any());
                let name = account.name_any();
                for line in std::fs::read_to_string(operators[operators.len() - 1].log_path())
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(&format!("/{name}\"")) || l.contains(&format!("{name}-oauth2")))
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                {
                    println!("  {line}");
                }
            }
            panic!("the accounts did not all converge within 300 s after the faults stopped");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let converged_in = quiet.elapsed();
    // How late replaced keys were revoked after their grace period: those
    // revoked (the last five of each account, as status keeps them), and
    // those still retiring past their time.
    let now = jiff::Timestamp::now().as_second();
    let late_revocation = settled
        .iter()
        .flat_map(|a| a.status.iter().flat_map(|s| s.keys.iter()))
        .filter_map(|k| {
            let due = k.revoke_at.as_ref()?.0.as_second();
            match k.state {
                KeyState::Revoked if k.reason.as_deref() == Some("GracePeriodEnded") => {
                    Some(k.revoked_at.as_ref()?.0.as_second() - due)
                }
                KeyState::Retiring => Some(now - due),
                _ => None,
            }
        })
        .max()
        .unwrap_or(0);

    // The invariants, against each target app itself.
    let mut violations = Vec::new();
    for account in &settled {
        let target = &targets[index(account) % targets.len()];
        let mut found = Vec::new();
        for _ in 0..10 {
            let account = accounts.get(&account.name_any()).await.unwrap();
            let limit = target.provider.capabilities().max_keys_per_account.map_or(2, |m| m.min(2) as usize);
            found = invariants::converged(&client, target.provider.as_ref(), &account, limit).await;
            if found.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        violations.extend(found.into_iter().map(|v| format!("{} ({}): {v}", account.name_any(), target.name)));
    }

    // No client at the oauth2 server that no account tracks, but those
    // whose registration answer was lost: RFC 7591 gives no way to find
    // them (no name lookup, no idempotent registration), so keysmith cannot
    // know of them (README.md says so); they are counted apart.
    let mut unknowable = 0;
    if let Some(oidc) = &oidc {
        let lost_registrations = targets
            .iter()
            .filter_map(|t| t.http.as_ref().filter(|_| t.name == "oauth2"))
            .flat_map(|proxy| proxy.requests())
            .filter(|r| r.method == "POST" && r.path == "/reg" && r.fault == Some("lost"))
            .count();
        let mut untracked = Vec::new();
        // A rotation may replace a token between the test's reads: again.
        for _ in 0..10 {
            let tracked: std::collections::BTreeSet<String> =
                futures::future::join_all(
                    settled.iter().filter(|a| targets[index(a) % targets.len()].name == "oauth2").map(|account| {
                        let provider = oidc.operator_view(client.clone());
                        async move {
                            provider.observe_account(&invariants::request(account)).await.ok().flatten().map(|a| a.id)
                        }
                    }),
                )
                .await
                .into_iter()
                .flatten()
                .collect();
            untracked = oidc.clients().await.difference(&tracked).cloned().collect::<Vec<_>>();
            if untracked.len() <= lost_registrations {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        unknowable = untracked.len().min(lost_registrations);
        for id in untracked.iter().skip(lost_registrations) {
            violations.push(format!("oauth2: client {id} is at the server and no account tracks it"));
        }
        for id in untracked.iter().take(lost_registrations) {
            oidc.admin_delete_client(id).await;
        }
    }

    // Deletion, with the target faults back on: nothing may be left behind.
    for (i, target) in targets.iter().enumerate() {
        target.faults(Some(rate), seed.wrapping_add(100 + i as u64));
    }
    let requests: Vec<_> = settled.iter().map(invariants::request).collect();
    for account in &settled {
        accounts.delete(&account.name_any(), &DeleteParams::default()).await.unwrap();
    }
    let deleting = Instant::now();
    let deadline = deleting + Duration::from_secs(300);
    while !accounts.list(&ListParams::default()).await.map(|l| l.items.is_empty()).unwrap_or(false) {
        assert!(Instant::now() < deadline, "the accounts were not all deleted within 300 s");
        if let Some(oidc) = &oidc {
            let list = accounts.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
            resolve_lost_control(oidc, &secrets, &events, &list, &mut admin).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let deleted_in = deleting.elapsed();
    for target in &targets {
        target.faults(None, 0);
    }
    if let Some(oidc) = &oidc {
        for id in oidc.clients().await {
            violations.push(format!("oauth2: client {id} is still at the server after every account was deleted"));
        }
    }
    for (i, request) in requests.iter().enumerate() {
        let i: usize = request.name.trim_start_matches("load-").parse().unwrap_or(i);
        let target = &targets[i % targets.len()];
        violations.extend(
            invariants::deleted(target.provider.as_ref(), request, "Delete")
                .await
                .into_iter()
                .map(|v| format!("{} ({}): {v}", request.name, target.name)),
        );
    }

    // The figures.
    let mut excess: BTreeMap<String, f64> = BTreeMap::new();
    let mut calls: BTreeMap<String, usize> = BTreeMap::new();
    let (mut hot, mut most) = (0, 0);
    let mut reconciles = 0;
    let mut target_excess: f64 = 0.0;
    for operator in &operators {
        let lines = read_log(operator.log_path());
        for target in &targets {
            let times: Vec<jiff::Timestamp> = lines
                .iter()
                .filter(|l| l.message == "provider call" && l.provider.as_deref() == Some(target.provider.name()))
                .map(|l| l.at)
                .collect();
            *calls.entry(target.name.clone()).or_default() += times.len();
            let e = excess.entry(target.name.clone()).or_default();
            *e = e.max(budget_excess(&times));
        }
        let (h, m) = hot_loops(&lines);
        if let Some(target) = targets.iter().find(|t| t.tcp.is_some()) {
            // At the target: postgres opens one connection per call.
            let times: Vec<jiff::Timestamp> = target
                .tcp
                .as_ref()
                .map(|p| p.connections().iter().map(|c| jiff::Timestamp::now() - c.at.elapsed()).collect())
                .unwrap_or_default();
            target_excess = target_excess.max(budget_excess(&times));
        }
        hot += h;
        most = most.max(m);
        reconciles += lines.iter().filter(|l| l.message == "reconcile").count();
    }
    let conflicts = cp
        .audit_records_since(audit_mark)
        .unwrap()
        .iter()
        .filter(|r| r.user == keysmith::controlplane::OPERATOR_USER && r.code == Some(409))
        .count();
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    println!("--- load campaign, seed {seed}: {count} accounts, {secs} s of faults ---");
    println!("rotations seen: {} (oldest current key seen: {} s)", samples.rotations, samples.oldest_key);
    for (target, before) in targets.iter().zip(&before) {
        let injected = target.injected();
        let total: usize = injected.values().sum();
        println!(
            "{:10} {} calls, {} requests/connections to the target, {total} faults injected {injected:?}, budget excess {:.2}",
            target.name,
            calls.get(&target.name).copied().unwrap_or(0),
            target.requests() - before,
            excess.get(&target.name).copied().unwrap_or(0.0)
        );
    }
    println!(
        "apiserver: {restarts} restarts (with {in_flight_at_restart} rotations in flight), {cuts} cuts of {cut_connections} open connections, {} connections reset at once, {conflicts} 409 conflicts on the operator's writes ({touched} writes by others)",
        apiserver_proxy.connections().iter().filter(|c| c.fault.is_some()).count()
    );
    println!(
        "operator: {} process(es), {operator_exits} exits; {reconciles} reconciles; hot loops (> {HOT_LIMIT} reconciles of one account in {} s): {hot}; most in any such window: {most}",
        operators.len(),
        HOT_WINDOW.as_secs()
    );
    println!(
        "convergence: longest not Ready while faulted {:.0} s; all settled {:.0} s after the faults stopped; all deleted in {:.0} s",
        samples.longest_not_ready.as_secs_f64(),
        converged_in.as_secs_f64(),
        deleted_in.as_secs_f64()
    );
    println!("latest revocation after its grace period: {late_revocation} s");
    println!("budget run over the connections postgres saw: excess {target_excess:.2}");
    if oidc.is_some() {
        println!(
            "oauth2: keysmith reported losing control of {} client(s) after lost answers; the admin deleted them: {:?}; accounts that needed the nudge: {:?}",
            admin.resolved.len(),
            admin.resolved.keys().collect::<Vec<_>>(),
            admin.nudged
        );
        println!("oauth2: {unknowable} client(s) left by a lost registration answer (keysmith cannot know of them)");
    }
    println!("violations: {}", violations.len());
    drop(operators);
    assert!(violations.is_empty(), "seed {seed}: {violations:#?}");
    assert!(excess.values().all(|e| *e == 0.0), "a connection's budget was exceeded: {excess:?}");
    assert_eq!(hot, 0, "hot loops");
    assert_eq!(operator_exits, 0, "the operator ended on its own");
    assert!(calls.values().all(|c| *c > 0), "no provider call was logged: {calls:?}");
    // Rotations happened under the faults (how many depends on timing: the
    // first is due 60–90 s after a key, later under backoff; figures above).
    assert!(samples.rotations > 0, "no rotation under the faults");
    // The convergence bound RELIABILITY.md states for these faults: no
    // account stays not Ready, and no rotation is late, by more than
    // CONVERGE_BOUND (the policy rotates at 60–90 s).
    assert!(late_revocation <= CONVERGE_BOUND.as_secs() as i64, "a key revoked {late_revocation} s late");
    assert!(samples.longest_not_ready <= CONVERGE_BOUND, "not Ready for {:?}", samples.longest_not_ready);
    assert!(
        samples.oldest_key <= 90 + CONVERGE_BOUND.as_secs() as i64,
        "a key {} s old: its rotation was more than {CONVERGE_BOUND:?} late",
        samples.oldest_key
    );
    ns.delete().await;
}
