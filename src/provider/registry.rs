//! Picks and builds the provider for a connection: the one field set under
//! spec.provider decides.

use std::{collections::HashMap, sync::Arc};

use k8s_openapi::api::core::v1::Secret;
use kube::{config::KubeConfigOptions, Api, Client};
use tokio::sync::Mutex;

use super::{
    aws_iam::AwsIamProvider,
    kubernetes::KubernetesProvider,
    noop::{self, NoopProvider},
    oauth2::OAuth2Provider,
    oauth2_store::SecretRegistrationStore,
    postgres::PostgresProvider,
    ratelimit::{RateLimited, TokenBucket, DEFAULT_RATE},
    scim::ScimProvider,
    Provider, ProviderError,
};
use crate::{
    api::{AppConnectionSpec, ConnectionKind, SecretKeySelector},
    metrics::{InstrumentedProvider, Metrics},
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
    /// Its spec.
    pub spec: AppConnectionSpec,
}

impl ResolvedConnection {
    /// `Kind/name`, as recorded on accounts.
    pub fn display(&self) -> String {
        format!("{:?}/{}", self.kind, self.name)
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
    cache: Mutex<HashMap<String, Arc<dyn Provider>>>,
    buckets: Mutex<HashMap<String, Arc<TokenBucket>>>,
    metrics: Option<Arc<Metrics>>,
    /// `KEYSMITH_ENABLE_NOOP_PROVIDER=1`: connections annotated
    /// `keysmith.dev/noop-provider: "true"` get the no-op provider.
    noop_enabled: bool,
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
            cache: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            metrics: None,
            noop_enabled,
        }
    }

    /// Counts and times every call of every provider it hands out in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The provider for `connection`; instrumented when the registry has metrics.
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
            self.cached(format!("noop/{}", connection.uid), || Ok(Arc::new(NoopProvider::new()))).await?
        } else {
            self.build(connection).await?
        };
        let measured: Arc<dyn Provider> = match &self.metrics {
            Some(metrics) => Arc::new(InstrumentedProvider::new(provider, metrics.clone())),
            None => provider,
        };
        Ok(Arc::new(RateLimited::new(measured, self.bucket_for(connection).await)))
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

    async fn build(&self, connection: &ResolvedConnection) -> Result<Arc<dyn Provider>, ProviderError> {
        let provider = &connection.spec.provider;
        if let Some(kubernetes) = &provider.kubernetes {
            let (cache_key, config) = match &kubernetes.kubeconfig_secret_ref {
                None => (format!("local/{}", kubernetes.allow_cluster_scope), self.config.clone()),
                Some(selector) => {
                    let (text, version) = self.read_secret(connection, selector, "kubeconfig").await?;
                    let kubeconfig = kube::config::Kubeconfig::from_yaml(&text).map_err(|e| {
                        ProviderError::Invalid(format!(
                            "the kubeconfig in Secret {:?} does not parse: {e}",
                            selector.name
                        ))
                    })?;
                    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                        .await
                        .map_err(|e| {
                            ProviderError::Invalid(format!(
                                "the kubeconfig in Secret {:?} is not usable: {e}",
                                selector.name
                            ))
                        })?;
                    (format!("{}/{}/{}", connection.uid, version, kubernetes.allow_cluster_scope), config)
                }
            };
            let mut cache = self.cache.lock().await;
            if let Some(found) = cache.get(&cache_key) {
                return Ok(found.clone());
            }
            let built: Arc<dyn Provider> =
                Arc::new(KubernetesProvider::from_config(config, kubernetes.allow_cluster_scope)?);
            cache.insert(cache_key, built.clone());
            return Ok(built);
        }
        if let Some(scim) = &provider.scim {
            let (token, version) = self.read_secret(connection, &scim.token_secret_ref, "token").await?;
            let key = format!("scim/{}/{version}", connection.uid);
            return self
                .cached(key, || Ok(Arc::new(ScimProvider::new(scim.base_url.clone(), token, http_client()?))))
                .await;
        }
        if let Some(oauth) = &provider.oauth2 {
            let (token, version) = match &oauth.initial_access_token_secret_ref {
                Some(selector) => {
                    let (token, version) = self.read_secret(connection, selector, "token").await?;
                    (Some(token), version)
                }
                None => (None, String::new()),
            };
            let key = format!("oauth2/{}/{version}", connection.uid);
            let store = Arc::new(SecretRegistrationStore::new(self.client.clone()));
            return self
                .cached(key, || {
                    Ok(Arc::new(OAuth2Provider::new(
                        oauth.registration_endpoint.clone(),
                        oauth.token_endpoint.clone(),
                        oauth.introspection_endpoint.clone(),
                        token,
                        http_client()?,
                        store,
                    )))
                })
                .await;
        }
        if let Some(iam) = &provider.aws_iam {
            let selector = &iam.credentials_secret_ref;
            let (data, version) = self.read_secret_data(connection, selector).await?;
            let field = |key: &str| {
                data.get(key).cloned().ok_or_else(|| {
                    ProviderError::Invalid(format!("credential Secret {:?} has no key {key:?}", selector.name))
                })
            };
            let (id, secret) = (field("AWS_ACCESS_KEY_ID")?, field("AWS_SECRET_ACCESS_KEY")?);
            let key = format!("awsIam/{}/{version}", connection.uid);
            return self
                .cached(key, || {
                    Ok(Arc::new(AwsIamProvider::new(
                        iam.endpoint.clone().unwrap_or_default(),
                        iam.region.clone(),
                        iam.path.clone(),
                        id,
                        secret,
                        http_client()?,
                    )))
                })
                .await;
        }
        if let Some(pg) = &provider.postgres {
            let selector = &pg.credentials_secret_ref;
            let (data, version) = self.read_secret_data(connection, selector).await?;
            let field = |key: &str| {
                data.get(key).cloned().ok_or_else(|| {
                    ProviderError::Invalid(format!("credential Secret {:?} has no key {key:?}", selector.name))
                })
            };
            let (user, password) = (field("username")?, field("password")?);
            let port = u16::try_from(pg.port)
                .map_err(|_| ProviderError::Invalid(format!("port {} is out of range", pg.port)))?;
            let key = format!("postgres/{}/{version}", connection.uid);
            return self
                .cached(key, || {
                    Ok(Arc::new(
                        PostgresProvider::new(pg.host.clone(), port, pg.database.clone(), user, password)
                            .with_ssl_mode(pg.ssl_mode),
                    ))
                })
                .await;
        }
        match provider.selected() {
            Some(name) => {
                Err(ProviderError::Invalid(format!("the {name} provider is not available in this build of keysmith")))
            }
            None => Err(ProviderError::Invalid("spec.provider must set exactly one provider".into())),
        }
    }

    async fn cached(
        &self,
        key: String,
        build: impl FnOnce() -> Result<Arc<dyn Provider>, ProviderError>,
    ) -> Result<Arc<dyn Provider>, ProviderError> {
        let mut cache = self.cache.lock().await;
        if let Some(found) = cache.get(&key) {
            return Ok(found.clone());
        }
        let built = build()?;
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
        let value = data.get(key).cloned().ok_or_else(|| {
            ProviderError::Invalid(format!("credential Secret {:?} has no key {key:?}", selector.name))
        })?;
        Ok((value, version))
    }

    /// A credential Secret's data and resourceVersion (to key caches). Never
    /// puts a value in an error.
    async fn read_secret_data(
        &self,
        connection: &ResolvedConnection,
        selector: &SecretKeySelector,
    ) -> Result<(std::collections::BTreeMap<String, String>, String), ProviderError> {
        let namespace = connection.secret_namespace(selector)?;
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &namespace);
        let secret = match api.get_opt(&selector.name).await {
            Ok(Some(secret)) => secret,
            Ok(None) => {
                return Err(ProviderError::Invalid(format!(
                    "credential Secret {namespace}/{} does not exist",
                    selector.name
                )))
            }
            Err(e) => return Err(super::kubernetes::classify(e)),
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

/// The HTTP client for HTTP-based providers: rustls, bounded waits.
fn http_client() -> Result<reqwest::Client, ProviderError> {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| ProviderError::Invalid(format!("cannot build an HTTP client: {e}")))
}
