//! Prometheus metrics: what keysmith did (reconciles, rotations, calls to
//! target apps) and what the cluster's keysmith objects say (key ages,
//! rotation times, readiness).
//!
//! Counters and histograms are updated as things happen. The per-account and
//! per-connection gauges are computed at scrape time from the informer
//! caches: a key's age is `now - status.currentKey.issuedAt` at the moment of
//! the scrape (never stale between reconciles), and an account's series go
//! away with the account.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `keysmith_reconcile_duration_seconds` | histogram | controller |
//! | `keysmith_reconcile_errors_total` | counter | controller, category |
//! | `keysmith_key_age_seconds` | gauge | account, namespace |
//! | `keysmith_key_expiry_timestamp_seconds` | gauge | account, namespace |
//! | `keysmith_next_rotation_timestamp_seconds` | gauge | account, namespace |
//! | `keysmith_key_last_used_timestamp_seconds` | gauge | account, namespace: when any key of the account was last used, where the target reports it |
//! | `keysmith_account_dormant` | gauge | account, namespace: 1 while the `Dormant` condition is True, 0 while False (accounts whose policy sets no `dormantAfter` have no series) |
//! | `keysmith_rotations_total` | counter | result (`success`, `failure`), reason |
//! | `keysmith_provider_requests_total` | counter | provider, operation, outcome (`ok` or the error category) |
//! | `keysmith_provider_request_duration_seconds` | histogram | provider, operation |
//! | `keysmith_accounts` | gauge | connection, ready (`true`, `false`) |
//! | `keysmith_connection_ready` | gauge | namespace, connection, provider |
//! | `keysmith_leader` | gauge | (none): 1 while this replica runs the controllers |

use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, RwLock},
    time::Duration,
};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::{Registry, Unit},
};

use crate::{
    api::{
        condition_types::{DORMANT, READY},
        AppConnection, ClusterAppConnection, ConnectionKind, IntegrationAccount,
    },
    provider::guard::CallObserver,
};

/// The `Content-Type` of the Prometheus text format served by default.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The `Content-Type` of the OpenMetrics text format, served when asked for.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    controller: String,
    category: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RotationLabels {
    result: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderRequestLabels {
    provider: String,
    operation: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderOperationLabels {
    provider: String,
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabels {
    account: String,
    namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct AccountsLabels {
    connection: String,
    ready: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    namespace: String,
    connection: String,
    provider: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 5 ms .. ~82 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// keysmith's metrics registry. One per process; cheap to share in an `Arc`.
pub struct Metrics {
    registry: Registry,
    reconcile_duration: HistogramFamily<ControllerLabels>,
    reconcile_errors: Family<ErrorLabels, Counter>,
    rotations: Family<RotationLabels, Counter>,
    provider_requests: Family<ProviderRequestLabels, Counter>,
    provider_duration: HistogramFamily<ProviderOperationLabels>,
    leader: Gauge,
    cluster: Arc<ClusterState>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every keysmith metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let reconcile_duration: HistogramFamily<ControllerLabels> = Family::new_with_constructor(duration_histogram);
        registry.register_with_unit(
            "keysmith_reconcile_duration",
            "How long one reconcile took, by controller (the kind it reconciles)",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "keysmith_reconcile_errors",
            "Reconciles that failed and will be retried, by controller and error category",
            reconcile_errors.clone(),
        );
        let rotations = Family::<RotationLabels, Counter>::default();
        registry.register(
            "keysmith_rotations",
            "Key rotations attempted, by result (success: the new key is published; failure) and reason",
            rotations.clone(),
        );
        let provider_requests = Family::<ProviderRequestLabels, Counter>::default();
        registry.register(
            "keysmith_provider_requests",
            "Calls to target apps, by provider, operation and outcome (ok, or the error category)",
            provider_requests.clone(),
        );
        let provider_duration: HistogramFamily<ProviderOperationLabels> =
            Family::new_with_constructor(duration_histogram);
        registry.register_with_unit(
            "keysmith_provider_request_duration",
            "How long calls to target apps took, by provider and operation",
            Unit::Seconds,
            provider_duration.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "keysmith_leader",
            "1 while this replica runs the controllers (it holds the leader lease, or leader election is off)",
            leader.clone(),
        );
        let cluster = Arc::new(ClusterState::default());
        registry.register_collector(Box::new(cluster.clone()));
        Self {
            registry,
            reconcile_duration,
            reconcile_errors,
            rotations,
            provider_requests,
            provider_duration,
            leader,
            cluster,
        }
    }

    /// Every metric in the Prometheus text format (version 0.0.4), or in the
    /// OpenMetrics text format when `openmetrics`.
    pub fn encode(&self, openmetrics: bool) -> Result<String, fmt::Error> {
        let mut out = String::new();
        if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        }
        Ok(out)
    }

    /// The caches [`Self::watch`] was given, once they are synced (the
    /// inventory feed reads them too).
    pub fn inventory(&self) -> Option<Inventory> {
        self.cluster.stores.read().ok().and_then(|s| s.clone())
    }

    /// Reads the per-account and per-connection gauges from these caches
    /// from now on. Call it once they are synced.
    pub fn watch(&self, stores: Inventory) {
        if let Ok(mut slot) = self.cluster.stores.write() {
            *slot = Some(stores);
        }
    }

    /// One reconcile of `controller` finished after `elapsed`.
    pub fn reconciled(&self, controller: &str, elapsed: Duration) {
        self.reconcile_duration
            .get_or_create(&ControllerLabels { controller: controller.to_owned() })
            .observe(elapsed.as_secs_f64());
    }

    /// One reconcile of `controller` failed with an error of `category`.
    pub fn reconcile_failed(&self, controller: &str, category: &str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels { controller: controller.to_owned(), category: category.to_owned() })
            .inc();
    }

    /// A rotation for `reason` published its new key (`success`) or not.
    pub fn rotation(&self, success: bool, reason: &str) {
        let result = if success { "success" } else { "failure" };
        self.rotations.get_or_create(&RotationLabels { result: result.into(), reason: reason.to_owned() }).inc();
    }

    /// One call to a target app.
    pub fn provider_request(&self, provider: &str, operation: &str, outcome: &str, elapsed: Duration) {
        self.provider_requests
            .get_or_create(&ProviderRequestLabels {
                provider: provider.to_owned(),
                operation: operation.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.provider_duration
            .get_or_create(&ProviderOperationLabels { provider: provider.to_owned(), operation: operation.to_owned() })
            .observe(elapsed.as_secs_f64());
    }

    /// Whether this replica runs the controllers.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }
}

/// The caches the scrape-time gauges are computed from.
#[derive(Clone)]
pub struct Inventory {
    /// IntegrationAccounts.
    pub accounts: kube::runtime::reflector::Store<IntegrationAccount>,
    /// AppConnections.
    pub connections: kube::runtime::reflector::Store<AppConnection>,
    /// ClusterAppConnections.
    pub cluster_connections: kube::runtime::reflector::Store<ClusterAppConnection>,
}

/// The gauges computed at scrape time from the caches.
#[derive(Default)]
struct ClusterState {
    stores: RwLock<Option<Inventory>>,
}

impl fmt::Debug for ClusterState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterState").finish_non_exhaustive()
    }
}

fn seconds(t: Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

fn is_ready(conditions: &[Condition]) -> bool {
    conditions.iter().any(|c| c.type_ == READY && c.status == "True")
}

/// How an account names its connection in `keysmith_accounts`:
/// `AppConnection/<namespace>/<name>` or `ClusterAppConnection/<name>`.
fn connection_label(account: &IntegrationAccount) -> String {
    let reference = &account.spec.connection_ref;
    match reference.kind {
        ConnectionKind::AppConnection => {
            format!("AppConnection/{}/{}", account.metadata.namespace.as_deref().unwrap_or_default(), reference.name)
        }
        ConnectionKind::ClusterAppConnection => format!("ClusterAppConnection/{}", reference.name),
    }
}

/// Computes one per-account gauge from the account's times and now.
type KeyGauge = fn(&KeyTimes, f64) -> Option<f64>;

/// One account's gauges.
struct KeyTimes {
    labels: AccountLabels,
    issued_at: Option<f64>,
    expires_at: Option<f64>,
    next_rotation: Option<f64>,
    last_used: Option<f64>,
    dormant: Option<bool>,
}

impl Collector for ClusterState {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(stores) = self.stores.read().ok().and_then(|s| s.clone()) else {
            return Ok(());
        };
        let now = seconds(Timestamp::now());
        let mut keys = Vec::new();
        let mut accounts: BTreeMap<AccountsLabels, i64> = BTreeMap::new();
        for account in stores.accounts.state() {
            let status = account.status.as_ref();
            let ready = status.is_some_and(|s| is_ready(&s.common.conditions));
            let labels = AccountsLabels { connection: connection_label(&account), ready: ready.to_string() };
            *accounts.entry(labels).or_default() += 1;
            let current = status.and_then(|s| s.current_key.as_ref());
            keys.push(KeyTimes {
                labels: AccountLabels {
                    account: account.metadata.name.clone().unwrap_or_default(),
                    namespace: account.metadata.namespace.clone().unwrap_or_default(),
                },
                issued_at: current.map(|k| seconds(k.issued_at.0)),
                expires_at: current.and_then(|k| k.expires_at.as_ref()).map(|t| seconds(t.0)),
                next_rotation: status.and_then(|s| s.next_rotation_at.as_ref()).map(|t| seconds(t.0)),
                last_used: status.and_then(|s| s.last_used_at.as_ref()).map(|t| seconds(t.0)),
                dormant: status.and_then(|s| {
                    s.common
                        .conditions
                        .iter()
                        .find(|c| c.type_ == DORMANT && c.reason != "NotReported")
                        .map(|c| c.status == "True")
                }),
            });
        }

        let gauges: [(&str, &str, KeyGauge); 4] = [
            (
                "keysmith_key_age",
                "Age of the account's current key at scrape time (now - status.currentKey.issuedAt)",
                |k, now| k.issued_at.map(|t| (now - t).max(0.0)),
            ),
            (
                "keysmith_key_expiry_timestamp",
                "When the account's current key expires by itself, as a Unix timestamp (keys that do not expire have no series)",
                |k, _| k.expires_at,
            ),
            (
                "keysmith_next_rotation_timestamp",
                "When keysmith next rotates the account's key, as a Unix timestamp",
                |k, _| k.next_rotation,
            ),
            (
                "keysmith_key_last_used_timestamp",
                "When any key of the account was last used, as a Unix timestamp (where the target app reports use)",
                |k, _| k.last_used,
            ),
        ];
        for (name, help, value) in gauges {
            let mut metric = encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Gauge)?;
            for key in &keys {
                if let Some(v) = value(key, now) {
                    metric.encode_family(&key.labels)?.encode_gauge(&v)?;
                }
            }
        }

        let mut metric = encoder.encode_descriptor(
            "keysmith_account_dormant",
            "1 while no key of the account was used for its policy's dormantAfter (the Dormant condition), else 0",
            None,
            MetricType::Gauge,
        )?;
        for key in &keys {
            if let Some(dormant) = key.dormant {
                metric.encode_family(&key.labels)?.encode_gauge(&i64::from(dormant))?;
            }
        }

        let mut metric = encoder.encode_descriptor(
            "keysmith_accounts",
            "IntegrationAccounts by connection (Kind/[namespace/]name) and Ready condition",
            None,
            MetricType::Gauge,
        )?;
        for (labels, count) in &accounts {
            metric.encode_family(labels)?.encode_gauge(count)?;
        }

        let mut metric = encoder.encode_descriptor(
            "keysmith_connection_ready",
            "1 when the connection's admin credential works (its Ready condition is True), else 0",
            None,
            MetricType::Gauge,
        )?;
        for connection in stores.connections.state() {
            let status = connection.status.as_ref();
            let labels = ConnectionLabels {
                namespace: connection.metadata.namespace.clone().unwrap_or_default(),
                connection: connection.metadata.name.clone().unwrap_or_default(),
                provider: status
                    .and_then(|s| s.provider.clone())
                    .or_else(|| connection.spec.connection.provider.selected().map(str::to_owned))
                    .unwrap_or_default(),
            };
            let ready = status.is_some_and(|s| is_ready(&s.common.conditions));
            metric.encode_family(&labels)?.encode_gauge(&i64::from(ready))?;
        }
        for connection in stores.cluster_connections.state() {
            let status = connection.status.as_ref();
            let labels = ConnectionLabels {
                namespace: String::new(),
                connection: connection.metadata.name.clone().unwrap_or_default(),
                provider: status
                    .and_then(|s| s.provider.clone())
                    .or_else(|| connection.spec.connection.provider.selected().map(str::to_owned))
                    .unwrap_or_default(),
            };
            let ready = status.is_some_and(|s| is_ready(&s.common.conditions));
            metric.encode_family(&labels)?.encode_gauge(&i64::from(ready))?;
        }
        Ok(())
    }
}

impl CallObserver for Metrics {
    fn provider_call(&self, provider: &str, operation: &str, outcome: &str, elapsed: Duration) {
        self.provider_request(provider, operation, outcome, elapsed);
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;

    use super::*;
    use crate::provider::{
        AccountRequest, Capabilities, IssuedKey, KeyRequest, ObservedAccount, ObservedKey, Provider, ProviderError,
        RoleGrant,
    };

    struct Flaky;

    #[async_trait]
    impl Provider for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities { last_use_lag: None, max_keys_per_account: None, key_expiry: false, disable: false }
        }
        async fn verify_connection(&self) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn observe_account(&self, _: &AccountRequest) -> Result<Option<ObservedAccount>, ProviderError> {
            Err(ProviderError::transient("503"))
        }
        async fn create_account(&self, _: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
            Err(ProviderError::Conflict("taken".into()))
        }
        async fn update_account(&self, _: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
            Err(ProviderError::NotFound("gone".into()))
        }
        async fn disable_account(&self, _: &AccountRequest) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn delete_account(&self, _: &AccountRequest) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn list_roles(&self, _: &AccountRequest) -> Result<Vec<RoleGrant>, ProviderError> {
            Ok(Vec::new())
        }
        async fn grant_role(&self, _: &AccountRequest, _: &RoleGrant) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn revoke_role(&self, _: &AccountRequest, _: &RoleGrant) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn issue_key(&self, _: &AccountRequest, _: &KeyRequest) -> Result<IssuedKey, ProviderError> {
            Err(ProviderError::LimitExceeded("2 keys".into()))
        }
        async fn list_keys(&self, _: &AccountRequest) -> Result<Vec<ObservedKey>, ProviderError> {
            Ok(Vec::new())
        }
        async fn revoke_key(&self, _: &AccountRequest, _: &str) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn verify_key(&self, _: &AccountRequest, _: &IssuedKey) -> Result<(), ProviderError> {
            Ok(())
        }
    }

    fn request() -> AccountRequest {
        AccountRequest {
            name: "robot".into(),
            namespace: "ns".into(),
            account_name: "robot".into(),
            owner_uid: "uid".into(),
            description: None,
            owner: None,
            options: Default::default(),
        }
    }

    #[tokio::test]
    async fn every_provider_call_is_counted_with_its_outcome() {
        let metrics = Arc::new(Metrics::new());
        let bucket = Arc::new(crate::provider::ratelimit::TokenBucket::new(1000.0, 1000));
        let provider = crate::provider::guard::Guarded::new(Arc::new(Flaky), bucket).observed_by(metrics.clone());
        provider.verify_connection().await.unwrap();
        provider.verify_connection().await.unwrap();
        assert!(provider.observe_account(&request()).await.is_err());
        assert!(provider.issue_key(&request(), &KeyRequest { key_id: "k".into(), lifetime: None }).await.is_err());
        let text = metrics.encode(false).unwrap();
        for line in [
            r#"keysmith_provider_requests_total{provider="flaky",operation="verify_connection",outcome="ok"} 2"#,
            r#"keysmith_provider_requests_total{provider="flaky",operation="observe_account",outcome="Transient"} 1"#,
            r#"keysmith_provider_requests_total{provider="flaky",operation="issue_key",outcome="LimitExceeded"} 1"#,
            r#"keysmith_provider_request_duration_seconds_count{provider="flaky",operation="verify_connection"} 2"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert_eq!(provider.name(), "flaky", "the wrapper is transparent");
    }

    #[test]
    fn metric_names_are_the_documented_ones() {
        let metrics = Metrics::new();
        metrics.reconciled("IntegrationAccount", Duration::from_millis(20));
        metrics.reconcile_failed("IntegrationAccount", "Transient");
        metrics.rotation(true, "Scheduled");
        metrics.rotation(false, "ManualRotation");
        metrics.set_leader(true);
        let text = metrics.encode(false).unwrap();
        for line in [
            r#"keysmith_reconcile_duration_seconds_count{controller="IntegrationAccount"} 1"#,
            r#"keysmith_reconcile_errors_total{controller="IntegrationAccount",category="Transient"} 1"#,
            r#"keysmith_rotations_total{result="success",reason="Scheduled"} 1"#,
            r#"keysmith_rotations_total{result="failure",reason="ManualRotation"} 1"#,
            "keysmith_leader 1",
            "# TYPE keysmith_reconcile_duration_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        let openmetrics = metrics.encode(true).unwrap();
        assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    }
}
