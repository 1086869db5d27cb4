//! Picks and builds the provider for a connection: the one field set under
//! spec.provider decides.

use std::{collections::HashMap, sync::Arc};

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
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
    watch_index::{AnchorIndex, RbacIndex, WatchIndex},
    Provider, ProviderError,
};
use crate::{
    api::{ConnectionKind, ConnectionSpec, SecretKeySelector},
    metrics::{InstrumentedProvider, Metrics},
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
    metrics: Option<Arc<Metrics>>,
    /// Who keysmith acts as for namespaced connections.
    tenancy: tenancy::Tenancy,
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
            impersonating: Mutex::new(HashMap::new()),
            local_indexes: (
                Arc::new(WatchIndex::new("RoleBindings and ClusterRoleBindings")),
                Arc::new(WatchIndex::new("key anchor Secrets")),
            ),
            cache: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            metrics: None,
            tenancy: tenancy::Tenancy::default(),
            noop_enabled,
        }
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
            let allow = kubernetes.allow_cluster_scope;
            let identity = &connection.identity;
            let (cache_key, config, local) = match &kubernetes.kubeconfig_secret_ref {
                // This cluster, as the connection's identity.
                None => {
                    let mut config = self.config.clone();
                    config.auth_info.impersonate = identity.impersonate();
                    (format!("local/{allow}/{identity:?}"), config, true)
                }
                Some(selector) => {
                    let (text, version) = self.read_secret(connection, selector, "kubeconfig").await?;
                    let kubeconfig = kube::config::Kubeconfig::from_yaml(&text).map_err(|e| {
                        ProviderError::Invalid(format!(
                            "the kubeconfig in Secret {:?} does not parse: {e}",
                            selector.name
                        ))
                    })?;
                    self_contained(&kubeconfig).map_err(|problem| {
                        ProviderError::Invalid(format!("the kubeconfig in Secret {:?} {problem}", selector.name))
                    })?;
                    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                        .await
                        .map_err(|e| {
                            ProviderError::Invalid(format!(
                                "the kubeconfig in Secret {:?} is not usable: {e}",
                                selector.name
                            ))
                        })?;
                    (format!("{}/{}/{allow}", connection.uid, version), config, false)
                }
            };
            let mut cache = self.cache.lock().await;
            if let Some(found) = cache.get(&cache_key) {
                return Ok(found.clone());
            }
            if local {
                self.check_identity(identity).await?;
            }
            let mut built = KubernetesProvider::from_config(config, allow)?.acting_as(identity.clone());
            if local {
                let (bindings, anchors) = &self.local_indexes;
                built = built.with_indexes(bindings.clone(), anchors.clone(), self.client.clone());
            }
            let built: Arc<dyn Provider> = Arc::new(built);
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
            let store = Arc::new(match connection.kind {
                ConnectionKind::AppConnection => SecretRegistrationStore::new(self.client.clone()),
                // Out of the tenants' reach: the registration access token
                // can change the client's scopes.
                ConnectionKind::ClusterAppConnection => {
                    let namespace = match &oauth.initial_access_token_secret_ref {
                        Some(selector) => connection.secret_namespace(selector)?,
                        None => std::env::var("POD_NAMESPACE").ok().filter(|ns| !ns.is_empty()).ok_or_else(|| {
                            ProviderError::Invalid(
                                "a ClusterAppConnection keeps OAuth 2.0 registrations in the namespace of its initialAccessTokenSecretRef (or keysmith's own, POD_NAMESPACE); name one".to_owned(),
                            )
                        })?,
                    };
                    SecretRegistrationStore::in_namespace(self.client.clone(), namespace)
                }
            });
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
        let client = Client::try_from(config).map_err(super::kubernetes::classify)?;
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
            Err(e) => Err(super::kubernetes::classify(e)),
        }
    }
}

/// A kubeconfig from a Secret must carry its credentials itself: one that
/// names a file (`tokenFile`, certificate or key paths), a command (`exec`)
/// or an auth provider would make keysmith read its own files, such as its
/// own ServiceAccount token, or run programs on the connection writer's word.
fn self_contained(kubeconfig: &kube::config::Kubeconfig) -> Result<(), String> {
    for named in &kubeconfig.auth_infos {
        let Some(user) = &named.auth_info else { continue };
        let refused = [
            (user.token_file.is_some(), "tokenFile"),
            (user.client_certificate.is_some(), "client-certificate (a file)"),
            (user.client_key.is_some(), "client-key (a file)"),
            (user.exec.is_some(), "exec"),
            (user.auth_provider.is_some(), "auth-provider"),
        ];
        if let Some((_, what)) = refused.iter().find(|(set, _)| *set) {
            return Err(format!(
                "uses {what} for user {:?}; keysmith accepts only credentials written into the kubeconfig (token, client-certificate-data, client-key-data)",
                named.name
            ));
        }
    }
    for named in &kubeconfig.clusters {
        if named.cluster.as_ref().is_some_and(|c| c.certificate_authority.is_some()) {
            return Err(format!(
                "names a certificate-authority file for cluster {:?}; use certificate-authority-data",
                named.name
            ));
        }
    }
    Ok(())
}

/// The HTTP client for HTTP-based providers: rustls, bounded waits.
fn http_client() -> Result<reqwest::Client, ProviderError> {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| ProviderError::Invalid(format!("cannot build an HTTP client: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubeconfig_must_carry_its_credentials_itself() {
        let base = |user: &str, cluster: &str| {
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"https://127.0.0.1:6443\"{cluster}}}}}]\nusers: [{{name: u, user: {{{user}}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
            )
        };
        let parse = |text: &str| kube::config::Kubeconfig::from_yaml(text).expect("parses");
        assert!(self_contained(&parse(&base("token: abc", ""))).is_ok());
        assert!(self_contained(&parse(&base("client-certificate-data: YQ==, client-key-data: YQ==", ""))).is_ok());
        for (user, what) in [
            ("tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token", "tokenFile"),
            ("client-certificate: /etc/x.crt", "client-certificate"),
            ("client-key: /etc/x.key", "client-key"),
            ("exec: {apiVersion: client.authentication.k8s.io/v1, command: /bin/sh}", "exec"),
            ("auth-provider: {name: gcp}", "auth-provider"),
        ] {
            let problem = self_contained(&parse(&base(user, ""))).expect_err(what);
            assert!(problem.contains(what), "{problem}");
        }
        let file_ca = base("token: abc", ", certificate-authority: /etc/ca.crt");
        assert!(self_contained(&parse(&file_ca)).expect_err("a CA file").contains("certificate-authority"));
    }
}
