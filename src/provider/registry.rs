//! Picks and builds the provider for a connection: the one field set under
//! spec.provider decides.

use std::{collections::HashMap, sync::Arc};

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{Api, Client};
use tokio::sync::Mutex;

use super::{
    guard::{CallObserver, Guarded},
    kubernetes::index::{AnchorIndex, RbacIndex, WatchIndex},
    noop::{self, NoopProvider},
    ratelimit::{TokenBucket, DEFAULT_RATE},
    Provider, ProviderError,
};
use crate::{
    api::{ConnectionKind, ConnectionSpec, SecretKeySelector},
    tenancy::{self, Identity},
};

/// A connection resolved for one account: where it is and what it says.
#[derive(Debug, Clone)]
pub struct ResolvedConnection {
    /// AppConnection or ClusterAppConnection.
    pub kind: ConnectionKind,
    /// Its name.
    pub name: String,
    /// Its namespace (AppConnection only).
    pub namespace: Option<String>,
    /// Its uid, to key caches.
    pub uid: String,
    /// What it says of the target app, policy and budget.
    pub spec: ConnectionSpec,
    /// Who keysmith acts as towards this cluster's apiserver for it: a
    /// ServiceAccount of its namespace for an AppConnection, keysmith itself
    /// for a ClusterAppConnection (see [`crate::tenancy`]).
    pub identity: Identity,
    /// How accounts behind it are named in the target app (ClusterAppConnection).
    pub account_name_template: Option<String>,
}

impl ResolvedConnection {
    /// An AppConnection, acting as the ServiceAccount `tenancy` picks for it;
    /// a problem when it may not act at all.
    pub fn namespaced(
        connection: &crate::api::AppConnection,
        tenancy: &tenancy::Tenancy,
    ) -> Result<Self, tenancy::ConnectionProblem> {
        use kube::ResourceExt;
        let spec = &connection.spec;
        let name = connection.name_any();
        let namespace = connection.namespace();
        let identity = tenancy.identity(
            ConnectionKind::AppConnection,
            &name,
            namespace.as_deref(),
            spec.connection.provider.selected(),
            spec.service_account_name.as_deref(),
        )?;
        Ok(Self {
            kind: ConnectionKind::AppConnection,
            name,
            namespace,
            uid: connection.uid().unwrap_or_default(),
            spec: spec.connection.clone(),
            identity,
            account_name_template: None,
        })
    }

    /// A ClusterAppConnection, acting as keysmith.
    pub fn cluster(connection: &crate::api::ClusterAppConnection) -> Self {
        use kube::ResourceExt;
        Self {
            kind: ConnectionKind::ClusterAppConnection,
            name: connection.name_any(),
            namespace: None,
            uid: connection.uid().unwrap_or_default(),
            spec: connection.spec.connection.clone(),
            identity: Identity::Operator,
            account_name_template: connection.spec.account_name_template.clone(),
        }
    }

    /// `Kind/name`, as recorded on accounts.
    pub fn display(&self) -> String {
        format!("{:?}/{}", self.kind, self.name)
    }

    /// The template accounts behind this connection are named by, if any:
    /// a ClusterAppConnection's own, else its provider's default.
    pub fn name_template(&self) -> Option<String> {
        match self.kind {
            ConnectionKind::AppConnection => None,
            ConnectionKind::ClusterAppConnection => Some(self.account_name_template.clone().unwrap_or_else(|| {
                if self.spec.provider.kubernetes.is_some() {
                    "{name}".to_owned()
                } else {
                    tenancy::DEFAULT_NAME_TEMPLATE.to_owned()
                }
            })),
        }
    }

    /// The namespace a credential Secret reference points into: an
    /// AppConnection's own, or the one a ClusterAppConnection names.
    pub fn secret_namespace(&self, selector: &SecretKeySelector) -> Result<String, ProviderError> {
        match (&self.kind, &self.namespace, &selector.namespace) {
            (ConnectionKind::AppConnection, Some(own), None) => Ok(own.clone()),
            (ConnectionKind::AppConnection, Some(own), Some(other)) if own == other => Ok(own.clone()),
            (ConnectionKind::AppConnection, _, Some(other)) => Err(ProviderError::Invalid(format!(
                "an AppConnection may only read Secrets in its own namespace, not {other:?}; use a ClusterAppConnection"
            ))),
            (ConnectionKind::ClusterAppConnection, _, Some(ns)) => Ok(ns.clone()),
            _ => Err(ProviderError::Invalid(format!(
                "the Secret reference {:?} must name its namespace on a ClusterAppConnection",
                selector.name
            ))),
        }
    }
}

/// Builds providers, reusing clients where the credential has not changed.
pub struct ProviderRegistry {
    client: Client,
    config: kube::Config,
    /// Clients that impersonate a connection's ServiceAccount, by username.
    impersonating: Mutex<HashMap<String, Client>>,
    /// The watch-fed indexes of this cluster's RBAC bindings and key
    /// anchors, shared by every `kubernetes` connection to it and fed with
    /// keysmith's own client (see [`KubernetesProvider::with_indexes`]).
    local_indexes: (Arc<RbacIndex>, Arc<AnchorIndex>),
    cache: Mutex<HashMap<String, Arc<dyn Provider>>>,
    buckets: Mutex<HashMap<String, Arc<TokenBucket>>>,
    observer: Option<Arc<dyn CallObserver>>,
    /// Who keysmith acts as for namespaced connections.
    tenancy: tenancy::Tenancy,
    /// `KEYSMITH_ENABLE_NOOP_PROVIDER=1`: connections annotated
    /// `keysmith.dev/noop-provider: "true"` get the no-op provider.
    noop_enabled: bool,
    /// Crash points for the tests (inert without the `dev` feature).
    failpoints: crate::failpoints::Failpoints,
    /// In-process tests: what a connection marked for the no-op provider gets.
    #[cfg(feature = "dev")]
    fake: Option<super::FakeProvider>,
}

impl ProviderRegistry {
    /// A registry whose `kubernetes` provider targets the cluster `client`
    /// (built from `config`) talks to, unless a connection names another.
    pub fn new(client: Client, config: kube::Config) -> Self {
        let noop_enabled = noop::enabled_by_env();
        if noop_enabled {
            tracing::warn!(
                "{}=1: connections annotated {}=\"true\" use the in-memory no-op provider (benchmarks only)",
                noop::ENABLE_ENV,
                noop::ANNOTATION
            );
        }
        Self {
            client,
            config,
            impersonating: Mutex::new(HashMap::new()),
            local_indexes: (
                Arc::new(WatchIndex::new("RoleBindings and ClusterRoleBindings")),
                Arc::new(WatchIndex::new("key anchor Secrets")),
            ),
            cache: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            observer: None,
            tenancy: tenancy::Tenancy::default(),
            noop_enabled,
            failpoints: crate::failpoints::Failpoints::from_env(),
            #[cfg(feature = "dev")]
            fake: None,
        }
    }

    /// In-process tests: connections marked for the no-op provider (both
    /// switches still apply) get `fake` instead.
    #[cfg(feature = "dev")]
    pub fn with_fake(mut self, fake: super::FakeProvider) -> Self {
        self.fake = Some(fake);
        self
    }

    /// The no-op provider for `connection`, or the test's fake.
    async fn noop_for(&self, connection: &ResolvedConnection) -> Result<Arc<dyn Provider>, ProviderError> {
        #[cfg(feature = "dev")]
        if let Some(fake) = &self.fake {
            return Ok(fake.0.clone());
        }
        self.cached(format!("noop/{}", connection.uid), || async {
            Ok(Arc::new(NoopProvider::new()) as Arc<dyn Provider>)
        })
        .await
    }

    /// Acts for namespaced connections as `tenancy` says (flags).
    pub fn with_tenancy(mut self, tenancy: tenancy::Tenancy) -> Self {
        self.tenancy = tenancy;
        self
    }

    /// The tenancy settings.
    pub fn tenancy(&self) -> &tenancy::Tenancy {
        &self.tenancy
    }

    /// Reports every call of every provider it hands out to `observer`
    /// (the metrics).
    pub fn with_metrics(mut self, observer: Arc<dyn CallObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The provider for `connection`, guarded (see [`Guarded`]).
    pub async fn provider_for(&self, connection: &ResolvedConnection) -> Result<Arc<dyn Provider>, ProviderError> {
        self.provider_for_annotated(connection, &std::collections::BTreeMap::new()).await
    }

    /// [`Self::provider_for`], given the connection object's annotations:
    /// the no-op provider when this process allows it and the connection
    /// asks for it (see [`noop`]); the one its spec selects otherwise.
    pub async fn provider_for_annotated(
        &self,
        connection: &ResolvedConnection,
        annotations: &std::collections::BTreeMap<String, String>,
    ) -> Result<Arc<dyn Provider>, ProviderError> {
        let provider = if self.noop_enabled && noop::requested(annotations) {
            self.noop_for(connection).await?
        } else {
            self.build(connection).await?
        };
        let guarded =
            Guarded::new(provider, self.bucket_for(connection).await).with_failpoints(self.failpoints.clone());
        Ok(Arc::new(match &self.observer {
            Some(observer) => guarded.observed_by(observer.clone()),
            None => guarded,
        }))
    }

    /// The connection's token bucket, shared by every account behind it;
    /// rebuilt when its rateLimit changes.
    pub async fn bucket_for(&self, connection: &ResolvedConnection) -> Arc<TokenBucket> {
        let (rate, burst) = connection
            .spec
            .rate_limit
            .as_ref()
            .map(|r| (r.requests_per_second, u32::try_from(r.burst).unwrap_or(1)))
            .unwrap_or(DEFAULT_RATE);
        let key = format!("{}/{}", connection.display(), connection.uid);
        let mut buckets = self.buckets.lock().await;
        match buckets.get(&key) {
            Some(bucket) if bucket.settings() == TokenBucket::new(rate, burst).settings() => bucket.clone(),
            _ => {
                let bucket = Arc::new(TokenBucket::new(rate, burst));
                buckets.insert(key, bucket.clone());
                bucket
            }
        }
    }

    /// Dispatches to the selected provider's own connect step, which reads
    /// its credentials and builds it (see [`Connect`]).
    async fn build(&self, connection: &ResolvedConnection) -> Result<Arc<dyn Provider>, ProviderError> {
        let provider = &connection.spec.provider;
        let connect = Connect { connection, registry: self };
        if let Some(spec) = &provider.kubernetes {
            return super::kubernetes::connect(spec, &connect).await;
        }
        if let Some(spec) = &provider.scim {
            return super::scim::connect(spec, &connect).await;
        }
        if let Some(spec) = &provider.oauth2 {
            return super::oauth2::connect(spec, &connect).await;
        }
        if let Some(spec) = &provider.aws_iam {
            return super::aws_iam::connect(spec, &connect).await;
        }
        if let Some(spec) = &provider.postgres {
            return super::postgres::connect(spec, &connect).await;
        }
        if let Some(spec) = &provider.gcp_iam {
            return super::gcp_iam::connect(spec, &connect).await;
        }
        if let Some(spec) = &provider.open_bao {
            return super::openbao::connect(spec, &connect).await;
        }
        if let Some(spec) = &provider.zabbix {
            return super::zabbix::connect(spec, &connect).await;
        }
        match provider.selected() {
            Some(name) => {
                Err(ProviderError::Invalid(format!("the {name} provider is not available in this build of keysmith")))
            }
            None => Err(ProviderError::Invalid("spec.provider must set exactly one provider".into())),
        }
    }

    async fn cached<F>(&self, key: String, build: impl FnOnce() -> F) -> Result<Arc<dyn Provider>, ProviderError>
    where
        F: std::future::Future<Output = Result<Arc<dyn Provider>, ProviderError>>,
    {
        let mut cache = self.cache.lock().await;
        if let Some(found) = cache.get(&key) {
            return Ok(found.clone());
        }
        let built = build().await?;
        cache.insert(key, built.clone());
        Ok(built)
    }

    /// One key of a credential Secret (see [`Self::read_secret_data`]).
    async fn read_secret(
        &self,
        connection: &ResolvedConnection,
        selector: &SecretKeySelector,
        default_key: &str,
    ) -> Result<(String, String), ProviderError> {
        let key = selector.key.as_deref().unwrap_or(default_key);
        let (data, version) = self.read_secret_data(connection, selector).await?;
        Ok((required(&data, selector, key)?, version))
    }

    /// A credential Secret's data and resourceVersion (to key caches). Never
    /// puts a value in an error.
    async fn read_secret_data(
        &self,
        connection: &ResolvedConnection,
        selector: &SecretKeySelector,
    ) -> Result<(std::collections::BTreeMap<String, String>, String), ProviderError> {
        let namespace = connection.secret_namespace(selector)?;
        self.check_identity(&connection.identity).await?;
        let api: Api<Secret> = Api::namespaced(self.client_for(&connection.identity).await?, &namespace);
        let secret = match api.get_opt(&selector.name).await {
            Ok(Some(secret)) => secret,
            Ok(None) => {
                return Err(ProviderError::Invalid(format!(
                    "credential Secret {namespace}/{} does not exist",
                    selector.name
                )))
            }
            Err(e) => return Err(super::http::classify_kube_error(e)),
        };
        let data = secret
            .data
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| String::from_utf8(v.0).ok().map(|v| (k, v.trim_end_matches('\n').to_owned())))
            .collect();
        Ok((data, secret.metadata.resource_version.unwrap_or_default()))
    }
}

impl ProviderRegistry {
    /// A client for this cluster's apiserver acting as `identity`:
    /// keysmith's own, or one impersonating the ServiceAccount.
    pub async fn client_for(&self, identity: &Identity) -> Result<Client, ProviderError> {
        let Some(user) = identity.impersonate() else {
            return Ok(self.client.clone());
        };
        let mut clients = self.impersonating.lock().await;
        if let Some(client) = clients.get(&user) {
            return Ok(client.clone());
        }
        let mut config = self.config.clone();
        config.auth_info.impersonate = Some(user.clone());
        let client = Client::try_from(config).map_err(super::http::classify_kube_error)?;
        clients.insert(user, client.clone());
        Ok(client)
    }

    /// An impersonated ServiceAccount must exist: RBAC bindings can name a
    /// ServiceAccount nobody created yet, and keysmith must not borrow them.
    pub async fn check_identity(&self, identity: &Identity) -> Result<(), ProviderError> {
        let Identity::ServiceAccount { namespace, name } = identity else {
            return Ok(());
        };
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        match api.get_metadata_opt(name).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(ProviderError::NotFound(format!(
                "ServiceAccount {namespace}/{name}, which the AppConnection acts as, does not exist"
            ))),
            Err(e) => Err(super::http::classify_kube_error(e)),
        }
    }
}

/// What a provider's connect step (`<provider>::connect`, after crossplane's
/// ExternalConnector) gets from the registry: the connection, its credential
/// Secrets read as the connection's identity, the shared HTTP client, this
/// cluster, and the cache of built providers. Every provider turns its own
/// spec and credentials into a client; the registry only dispatches.
pub struct Connect<'a> {
    /// The connection being connected.
    pub connection: &'a ResolvedConnection,
    registry: &'a ProviderRegistry,
}

impl Connect<'_> {
    /// One key of a credential Secret (`selector.key`, else `default_key`)
    /// and the Secret's resourceVersion (to key the cache). Never puts a
    /// value in an error.
    pub async fn secret_value(
        &self,
        selector: &SecretKeySelector,
        default_key: &str,
    ) -> Result<(String, String), ProviderError> {
        self.registry.read_secret(self.connection, selector, default_key).await
    }

    /// Named keys of a credential Secret, each required, and its
    /// resourceVersion.
    pub async fn secret_values<const N: usize>(
        &self,
        selector: &SecretKeySelector,
        keys: [&str; N],
    ) -> Result<([String; N], String), ProviderError> {
        let (data, version) = self.registry.read_secret_data(self.connection, selector).await?;
        let mut values: [String; N] = std::array::from_fn(|_| String::new());
        for (value, key) in values.iter_mut().zip(keys) {
            *value = required(&data, selector, key)?;
        }
        Ok((values, version))
    }

    /// The provider cached under `key` (what it was built from: the
    /// connection's uid and its credential's version), else `build`'s, which
    /// runs at most once at a time.
    pub async fn cached<F>(&self, key: String, build: impl FnOnce() -> F) -> Result<Arc<dyn Provider>, ProviderError>
    where
        F: std::future::Future<Output = Result<Arc<dyn Provider>, ProviderError>>,
    {
        self.registry.cached(key, build).await
    }

    /// The HTTP client for HTTP-based providers: rustls, bounded waits.
    pub fn http_client(&self) -> Result<reqwest::Client, ProviderError> {
        http_client()
    }

    /// keysmith's own client of this cluster (not impersonating).
    pub fn operator_client(&self) -> Client {
        self.registry.client.clone()
    }

    /// keysmith's configuration for this cluster.
    pub fn local_config(&self) -> kube::Config {
        self.registry.config.clone()
    }

    /// The watch-fed indexes of this cluster's RBAC bindings and key anchors,
    /// shared by every `kubernetes` connection to it.
    pub fn local_indexes(&self) -> (Arc<RbacIndex>, Arc<AnchorIndex>) {
        self.registry.local_indexes.clone()
    }

    /// Fails unless the connection's identity may be acted as (see
    /// [`ProviderRegistry::check_identity`]).
    pub async fn check_identity(&self) -> Result<(), ProviderError> {
        self.registry.check_identity(&self.connection.identity).await
    }
}

/// `key` of a credential Secret's data; its absence is the connection's to fix.
fn required(
    data: &std::collections::BTreeMap<String, String>,
    selector: &SecretKeySelector,
    key: &str,
) -> Result<String, ProviderError> {
    data.get(key)
        .cloned()
        .ok_or_else(|| ProviderError::Invalid(format!("credential Secret {:?} has no key {key:?}", selector.name)))
}

/// The HTTP client for HTTP-based providers: rustls, bounded waits.
fn http_client() -> Result<reqwest::Client, ProviderError> {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| ProviderError::Invalid(format!("cannot build an HTTP client: {e}")))
}
