//! The controllers, one per kind, sharing one [`Context`].
//!
//! Every kind is watched once; its events fan out to the controllers that
//! care (see [`stream`]). The IntegrationAccount controller is the only code
//! that talks to a target app about an account.

pub mod account;
pub mod binding;
pub mod conditions;
pub mod connection;
mod context;
pub mod dormancy;
mod error;
pub mod observe;
pub mod plan;
pub mod rotation;
pub mod secret;
pub mod status;
pub mod stream;

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{future::BoxFuture, FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    core::PartialObjectMeta,
    runtime::{
        controller::{self, Action},
        events::{Recorder, Reporter},
        reflector::Store,
        watcher, Controller,
    },
    Api, Client, Resource, ResourceExt,
};
use tracing::Instrument;

pub use crate::failpoints::Failpoints;
pub use context::{error_policy, key_of, succeeded, Context, Held, Stores};
pub use error::{backoff, retry_delay, Error};

use crate::{
    api::{AppConnection, ClusterAppConnection, IntegrationAccount, KeyRotationPolicy, RoleBinding},
    metrics::Metrics,
    provider::ProviderRegistry,
    server::Health,
};

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
    /// In-process tests only: the provider connections marked for the no-op
    /// provider get instead (see [`crate::provider::noop`]; the same two
    /// switches apply). Not in the operator's build.
    #[cfg(feature = "dev")]
    pub fake_provider: Option<crate::provider::FakeProvider>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            controller_name: "keysmith".into(),
            crd_timeout: Duration::from_secs(120),
            namespace: None,
            drift_check_interval: account::DRIFT_CHECK_INTERVAL,
            tenancy: crate::tenancy::Tenancy::default(),
            #[cfg(feature = "dev")]
            fake_provider: None,
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
    let registry = ProviderRegistry::new(client.clone(), config)
        .with_metrics(metrics.clone())
        .with_tenancy(options.tenancy.clone());
    #[cfg(feature = "dev")]
    let registry = match options.fake_provider.clone() {
        Some(fake) => registry.with_fake(fake),
        None => registry,
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        registry,
        Recorder::new(client.clone(), reporter),
        stores.clone(),
        metrics.clone(),
        options.drift_check_interval,
    ));

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
