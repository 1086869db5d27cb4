//! The controllers, one per kind, sharing one [`Context`].
//!
//! Every kind is watched once; its events fan out to the controllers that
//! care (see [`stream`]). The IntegrationAccount controller is the only code
//! that talks to a target app about an account.

pub mod account;
pub mod binding;
pub mod conditions;
pub mod connection;
pub mod plan;
pub mod rotation;
pub mod secret;
pub mod stream;

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{future::BoxFuture, FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    core::PartialObjectMeta,
    runtime::{
        controller::{self, Action},
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
        watcher, Controller,
    },
    Api, Client, Resource, ResourceExt,
};
use tracing::Instrument;

use crate::{
    api::{AppConnection, ClusterAppConnection, IntegrationAccount, KeyRotationPolicy, RoleBinding},
    metrics::Metrics,
    provider::{ProviderError, ProviderRegistry},
    server::Health,
};

/// Why a reconcile failed. Most problems are not errors but conditions; these
/// are the failures worth retrying.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The target app failed.
    #[error("{0}")]
    Provider(#[from] ProviderError),
    /// A cache was not ready (the operator is starting).
    #[error("caches are not ready yet")]
    NotReady,
}

impl Error {
    /// A stable name for metrics labels and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApi",
            Error::Provider(e) => e.category(),
            Error::NotReady => "NotReady",
        }
    }

    /// The target's own Retry-After, if it gave one.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Provider(ProviderError::Transient { retry_after, .. }) => *retry_after,
            _ => None,
        }
    }
}

/// The caches every controller reads.
#[derive(Clone)]
pub struct Stores {
    /// IntegrationAccounts.
    pub accounts: Store<IntegrationAccount>,
    /// keysmith RoleBindings.
    pub bindings: Store<RoleBinding>,
    /// KeyRotationPolicies.
    pub policies: Store<KeyRotationPolicy>,
    /// AppConnections.
    pub connections: Store<AppConnection>,
    /// ClusterAppConnections.
    pub cluster_connections: Store<ClusterAppConnection>,
    /// Metadata of the Secrets keysmith manages (label-selected; no data cached).
    pub secrets: Store<PartialObjectMeta<Secret>>,
}

impl Stores {
    /// Waits until every cache holds a complete list. Call it once, before
    /// the controllers start: a store wakes only its latest waiter while it
    /// is still syncing, so concurrent waiters can hang.
    pub async fn ready(&self) -> Result<(), Error> {
        let not_ready = |_| Error::NotReady;
        self.accounts.wait_until_ready().await.map_err(not_ready)?;
        self.bindings.wait_until_ready().await.map_err(not_ready)?;
        self.policies.wait_until_ready().await.map_err(not_ready)?;
        self.connections.wait_until_ready().await.map_err(not_ready)?;
        self.cluster_connections.wait_until_ready().await.map_err(not_ready)?;
        self.secrets.wait_until_ready().await.map_err(not_ready)
    }
}

/// Test-only crash points, set with the KEYSMITH_FAILPOINT environment
/// variable: the process exits at that point, as a crash would. Only with
/// the `dev` feature: the image's operator ignores the variable.
#[derive(Debug, Clone, Default)]
pub struct Failpoints(Option<String>);

impl Failpoints {
    /// Reads KEYSMITH_FAILPOINT.
    pub fn from_env() -> Self {
        if cfg!(feature = "dev") {
            Self(std::env::var("KEYSMITH_FAILPOINT").ok().filter(|v| !v.is_empty()))
        } else {
            Self(None)
        }
    }
    /// Exits the process (code 86) if `name` is armed.
    pub fn hit(&self, name: &str) {
        if self.0.as_deref() == Some(name) {
            tracing::error!(failpoint = name, "failpoint hit; exiting");
            std::process::exit(86);
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    /// The operator's client.
    pub client: Client,
    /// Builds providers for connections.
    pub providers: ProviderRegistry,
    /// Publishes Kubernetes events.
    pub recorder: Recorder,
    /// The caches.
    pub stores: Stores,
    /// Crash points for tests.
    pub failpoints: Failpoints,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per object, for backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The resourceVersion of each object's last write by this process, to
    /// recognise a cache that has not caught up with it yet.
    written: Mutex<HashMap<String, u64>>,
    /// Accounts whose last reconcile observed the target app and left them
    /// Ready: what that reconcile acted on, and until when it stands.
    converged: Mutex<HashMap<String, Converged>>,
    /// How often an unchanged account is checked for drift.
    pub drift_check_interval: Duration,
}

/// An account's last full reconcile: the fingerprint of everything it acted
/// on (spec, status, connection, provider, policy, declared roles, output
/// Secret) and until when its observation of the target app stands (its
/// next rotation, revocation or drift check).
#[derive(Debug, Clone, Copy)]
struct Converged {
    fingerprint: u64,
    until: std::time::Instant,
}

impl Context {
    /// Publishes an event about `obj`; a failure to publish is logged, not fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event =
            KubeEvent { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
        if let Err(error) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(%error, reason, "could not publish event");
        }
    }

    /// Records that this process wrote `key` at `resource_version`.
    pub fn wrote(&self, key: &str, resource_version: Option<&str>) {
        if let (Some(rv), Ok(mut written)) = (resource_version.and_then(|v| v.parse::<u64>().ok()), self.written.lock())
        {
            let entry = written.entry(key.to_owned()).or_insert(rv);
            *entry = (*entry).max(rv);
        }
    }

    /// Whether the cached copy of `key` (at `resource_version`) predates this
    /// process's own last write: acting on it would undo that write.
    pub fn is_stale(&self, key: &str, resource_version: Option<&str>) -> bool {
        let Some(cached) = resource_version.and_then(|v| v.parse::<u64>().ok()) else { return false };
        self.written.lock().ok().and_then(|w| w.get(key).copied()).is_some_and(|last| cached < last)
    }

    /// Records that `key` converged on the inputs `fingerprint` hashes, and
    /// that nothing in the target app needs looking at before `until`.
    pub fn set_converged(&self, key: &str, fingerprint: u64, until: std::time::Instant) {
        if let Ok(mut converged) = self.converged.lock() {
            converged.insert(key.to_owned(), Converged { fingerprint, until });
        }
    }

    /// How long `key` may go without observing the target app: some time
    /// when its last reconcile converged on exactly these inputs and that
    /// still stands, else `None`.
    pub fn converged_for(&self, key: &str, fingerprint: u64) -> Option<Duration> {
        let converged = self.converged.lock().ok()?.get(key).copied()?;
        let left = converged.until.checked_duration_since(std::time::Instant::now())?;
        (converged.fingerprint == fingerprint && !left.is_zero()).then_some(left)
    }

    /// Forgets `key`'s convergence: the next reconcile observes the target app.
    pub fn forget_converged(&self, key: &str) {
        if let Ok(mut converged) = self.converged.lock() {
            converged.remove(key);
        }
    }

    fn reset_failures(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(key);
        }
    }

    fn next_backoff(&self, key: &str) -> Duration {
        let attempt = match self.failures.lock() {
            Ok(mut failures) => {
                let n = failures.entry(key.to_owned()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        };
        backoff(attempt)
    }
}

/// Exponential backoff with ±20 % jitter: 1 s, 2 s, 4 s ... up to 5 minutes.
pub fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.saturating_sub(1).min(9)).min(Duration::from_secs(300));
    let jitter = 0.8 + rand::random::<f64>() * 0.4;
    base.mul_f64(jitter)
}

/// The error policy every controller uses: honour the target's Retry-After,
/// else back off per object with jitter.
pub fn error_policy<K: Resource<DynamicType = ()>>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = ObjectRef::from_obj(obj.as_ref()).to_string();
    let delay = retry_delay(error, || ctx.next_backoff(&key));
    ctx.metrics.reconcile_failed(&K::kind(&()), error.category());
    tracing::warn!(object = %key, category = error.category(), %error, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

/// How long to wait after `error`: the target's Retry-After when it gave
/// one, else the object's next backoff step.
pub fn retry_delay(error: &Error, backoff: impl FnOnce() -> Duration) -> Duration {
    error.retry_after().unwrap_or_else(backoff)
}

/// Records a successful reconcile (resets the object's backoff).
pub fn succeeded<K: Resource<DynamicType = ()>>(obj: &K, ctx: &Context) {
    ctx.reset_failures(&ObjectRef::from_obj(obj).to_string());
}

/// Options for [`run`].
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Name reported on events.
    pub controller_name: String,
    /// How long to wait for the CRDs to be Established.
    pub crd_timeout: Duration,
    /// Watch only this namespace (ClusterAppConnections are always watched
    /// cluster-wide). `None` watches every namespace.
    pub namespace: Option<String>,
    /// How often an unchanged account is checked for drift in its target app
    /// (three read calls per account against the connection's rate budget).
    pub drift_check_interval: Duration,
    /// Who keysmith acts as for namespaced connections (see [`crate::tenancy`]).
    pub tenancy: crate::tenancy::Tenancy,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            controller_name: "keysmith".into(),
            crd_timeout: Duration::from_secs(120),
            namespace: None,
            drift_check_interval: account::DRIFT_CHECK_INTERVAL,
            tenancy: crate::tenancy::Tenancy::default(),
        }
    }
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// What the operator reports about itself: metrics, and readiness.
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    /// Reconcile, rotation and provider metrics; the cluster gauges read the caches.
    pub metrics: Arc<Metrics>,
    /// Set once the caches are synced and while the controllers run.
    pub health: Arc<Health>,
}

/// Runs every controller until `shutdown` resolves, then stops gracefully
/// (in-flight reconciles finish).
pub async fn run(
    client: Client,
    config: kube::Config,
    options: RunOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with(client, config, options, Telemetry::default(), futures::future::ready(()), shutdown).await
}

/// [`run`], reporting into `telemetry`, with the controllers held back until
/// `start` resolves (leader election: a follower keeps its caches warm and
/// reconciles nothing). Returns without starting them if `shutdown` comes
/// first.
pub async fn run_with(
    client: Client,
    config: kube::Config,
    options: RunOptions,
    telemetry: Telemetry,
    start: impl Future<Output = ()> + Send,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let shutdown = Box::pin(shutdown).shared();
    let Telemetry { metrics, health } = telemetry;
    crate::install::wait_for_crds(&client, options.crd_timeout).await?;
    let ns = options.namespace.as_deref();

    let (accounts, accounts_driver) =
        stream::watch::<IntegrationAccount, 3>(scoped(&client, ns), watcher::Config::default());
    let (bindings, bindings_driver) = stream::watch::<RoleBinding, 2>(scoped(&client, ns), watcher::Config::default());
    let (policies, policies_driver) =
        stream::watch::<KeyRotationPolicy, 2>(scoped(&client, ns), watcher::Config::default());
    let (connections, connections_driver) =
        stream::watch::<AppConnection, 3>(scoped(&client, ns), watcher::Config::default());
    let (cluster_connections, cluster_connections_driver) = stream::watch::<ClusterAppConnection, 3>(
        Api::<ClusterAppConnection>::all(client.clone()),
        watcher::Config::default(),
    );
    let secret_selector = format!("{}={}", crate::ownership::MANAGED_BY_KEY, crate::ownership::MANAGED_BY);
    let (secrets, secrets_driver) = stream::watch::<PartialObjectMeta<Secret>, 1>(
        scoped(&client, ns),
        watcher::Config::default().labels(&secret_selector),
    );
    let stores = Stores {
        accounts: accounts.store.clone(),
        bindings: bindings.store.clone(),
        policies: policies.store.clone(),
        connections: connections.store.clone(),
        cluster_connections: cluster_connections.store.clone(),
        secrets: secrets.store.clone(),
    };
    let reporter = Reporter { controller: options.controller_name.clone(), instance: std::env::var("POD_NAME").ok() };
    let ctx = Arc::new(Context {
        client: client.clone(),
        providers: ProviderRegistry::new(client.clone(), config)
            .with_metrics(metrics.clone())
            .with_tenancy(options.tenancy.clone()),
        recorder: Recorder::new(client.clone(), reporter),
        stores: stores.clone(),
        failpoints: Failpoints::from_env(),
        metrics: metrics.clone(),
        failures: Mutex::new(HashMap::new()),
        written: Mutex::new(HashMap::new()),
        converged: Mutex::new(HashMap::new()),
        drift_check_interval: options.drift_check_interval.max(Duration::from_secs(1)),
    });

    let [account_events, account_for_bindings, account_for_policies] = accounts.consumers;
    let [binding_events, binding_for_accounts] = bindings.consumers;
    let [policy_events, policy_for_accounts] = policies.consumers;
    let [connection_events, connection_for_accounts, connection_for_bindings] = connections.consumers;
    let [cluster_events, cluster_for_accounts, cluster_for_bindings] = cluster_connections.consumers;
    let [secret_events] = secrets.consumers;

    // The watches run on their own tasks; the controllers start once every
    // cache is complete, so no reconcile ever sees a partial picture (an
    // empty RoleBinding cache would otherwise revoke every role).
    let drivers = [
        tokio::spawn(accounts_driver),
        tokio::spawn(bindings_driver),
        tokio::spawn(policies_driver),
        tokio::spawn(connections_driver),
        tokio::spawn(cluster_connections_driver),
        tokio::spawn(secrets_driver),
    ];
    stores.ready().await?;
    metrics.watch(crate::metrics::Inventory {
        accounts: stores.accounts.clone(),
        connections: stores.connections.clone(),
        cluster_connections: stores.cluster_connections.clone(),
    });
    health.set_synced();
    tracing::info!("caches synced");
    tokio::select! {
        _ = start => {}
        _ = shutdown.clone() => {
            for handle in drivers {
                handle.abort();
            }
            tracing::info!("stopped before the controllers started");
            return Ok(());
        }
    }
    tracing::info!("starting controllers");

    let config = controller::Config::default().concurrency(8);
    let account_controller = account::controller(
        &stores,
        account_events,
        binding_for_accounts,
        policy_for_accounts,
        connection_for_accounts,
        cluster_for_accounts,
        secret_events,
    )
    .with_config(config.clone())
    .graceful_shutdown_on(shutdown.clone())
    .run(instrumented(account::reconcile), error_policy, ctx.clone())
    .for_each(|_| futures::future::ready(()));
    let binding_controller = binding::controller(
        &stores,
        binding_events,
        account_for_bindings,
        connection_for_bindings,
        cluster_for_bindings,
    )
    .with_config(config.clone())
    .graceful_shutdown_on(shutdown.clone())
    .run(instrumented(binding::reconcile), error_policy, ctx.clone())
    .for_each(|_| futures::future::ready(()));
    let policy_controller = rotation::controller(&stores, policy_events, account_for_policies)
        .with_config(config.clone())
        .graceful_shutdown_on(shutdown.clone())
        .run(instrumented(rotation::reconcile), error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let connection_controller = connection::namespaced_controller(&stores, connection_events)
        .with_config(config.clone())
        .graceful_shutdown_on(shutdown.clone())
        .run(instrumented(connection::reconcile_namespaced), error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let cluster_connection_controller = connection::cluster_controller(&stores, cluster_events)
        .with_config(config)
        .graceful_shutdown_on(shutdown.clone())
        .run(instrumented(connection::reconcile_cluster), error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));

    let controllers = [
        tokio::spawn(account_controller),
        tokio::spawn(binding_controller),
        tokio::spawn(policy_controller),
        tokio::spawn(connection_controller),
        tokio::spawn(cluster_connection_controller),
    ];
    health.set_leading(true);
    metrics.set_leader(true);
    tracing::info!("controllers started");
    for handle in controllers {
        handle.await?;
    }
    health.set_stopping();
    health.set_leading(false);
    metrics.set_leader(false);
    for handle in drivers {
        handle.abort();
    }
    tracing::info!("controllers stopped");
    Ok(())
}

/// Wraps a reconcile function: a `reconcile` span with the object and a
/// fresh `trace_id` around each run (every log line of the run carries
/// them), and its duration in `keysmith_reconcile_duration_seconds`.
fn instrumented<K, F, Fut>(
    reconcile: F,
) -> impl FnMut(Arc<K>, Arc<Context>) -> BoxFuture<'static, Result<Action, Error>>
where
    K: Resource<DynamicType = ()> + Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    move |obj, ctx| {
        let kind = K::kind(&()).into_owned();
        let object = match obj.meta().namespace.as_deref() {
            Some(ns) => format!("{ns}/{}", obj.name_any()),
            None => obj.name_any(),
        };
        let span = tracing::info_span!("reconcile", kind = %kind, object = %object, trace_id = %trace_id());
        let metrics = ctx.metrics.clone();
        let run = reconcile(obj, ctx);
        async move {
            let started = Instant::now();
            let result = run.await;
            metrics.reconciled(&kind, started.elapsed());
            result
        }
        .instrument(span)
        .boxed()
    }
}

/// A fresh id for one reconcile, to find all of its log lines.
fn trace_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The namespace and name of a namespaced object, for messages.
pub fn key_of<K: Resource>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Builds a `Controller` over a shared kind's events.
pub fn controller_for<K>(
    store: &Store<K>,
    events: impl futures::Stream<Item = watcher::Event<K>> + Send + 'static,
    key: fn(&K) -> u64,
) -> Controller<K>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    Controller::for_stream(stream::changes(events, key), store.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_wins_over_backoff() {
        let limited = Error::Provider(ProviderError::Transient {
            message: "429".into(),
            retry_after: Some(Duration::from_secs(7)),
        });
        assert_eq!(retry_delay(&limited, || Duration::from_secs(1)), Duration::from_secs(7));
        let flaky = Error::Provider(ProviderError::transient("503"));
        assert_eq!(retry_delay(&flaky, || Duration::from_secs(2)), Duration::from_secs(2));
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps_at_five_minutes() {
        for attempt in 1..=30 {
            let expected = Duration::from_secs(1u64 << (attempt - 1).min(9)).min(Duration::from_secs(300));
            let got = backoff(attempt);
            assert!(got >= expected.mul_f64(0.8) && got <= expected.mul_f64(1.2), "attempt {attempt}: {got:?}");
        }
        let samples: std::collections::BTreeSet<u128> = (0..20).map(|_| backoff(3).as_millis()).collect();
        assert!(samples.len() > 1, "backoff is jittered");
    }
}
