//! The built-in `kubernetes` provider: the target app is a Kubernetes cluster.
//!
//! - account → a ServiceAccount, labelled with the IntegrationAccount's uid;
//! - role → an RBAC RoleBinding to the named ClusterRole in the scope
//!   namespace, or a ClusterRoleBinding for scope `*` (only where the
//!   connection allows it). The roles an account holds are every binding
//!   that names its ServiceAccount, whoever made it, so that roles nobody
//!   declared can be found and removed: a hand-made binding to a ClusterRole
//!   reads as that role, one to a namespaced Role as `Role/<name>` (which
//!   keysmith never grants, so it is always revoked). Revoking deletes
//!   keysmith's own binding, and takes the ServiceAccount out of anyone
//!   else's (deleting it when the ServiceAccount was its only subject);
//! - key → a TokenRequest token bound to a per-key "anchor" Secret. Deleting
//!   the anchor revokes the token: the apiserver refuses tokens whose bound
//!   object is gone.
//!
//! Everything keysmith creates carries `app.kubernetes.io/managed-by=keysmith`
//! and `keysmith.dev/account-uid=<IntegrationAccount uid>`, so it can be found
//! by label and is never confused with objects someone else made.

use crate::ownership;
use std::{collections::BTreeMap, fmt, sync::Arc, time::Duration};

use async_trait::async_trait;
use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use k8s_openapi::{
    api::{
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
        core::v1::{Secret, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions},
    config::{AuthInfo, Cluster, Context, KubeConfigOptions, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext},
    Client,
};
use serde_json::json;

mod connect;
pub mod index;

pub use connect::connect;

pub use super::http::classify_kube_error as classify;
pub use crate::tenancy::CLUSTER_SCOPE;
use index::{AnchorIndex, Indexed, IndexedBinding, RbacIndex, WatchIndex};
pub use index::{KEY_ANCHOR_TYPE, NAMESPACED_ROLE_PREFIX};

use super::{
    AccountRequest, Capabilities, Identity, IssuedKey, KeyMaterial, KeyRequest, ObservedAccount, ObservedKey, Provider,
    ProviderError, RoleGrant,
};

/// The ClusterRole a binding grants, as requested.
pub const ROLE_ANNOTATION: &str = "keysmith.dev/role";
/// The scope a binding takes effect on: its namespace, or `*`.
pub const SCOPE_ANNOTATION: &str = "keysmith.dev/scope";

/// The shortest token lifetime the TokenRequest API accepts.
const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(600);
/// The token lifetime when the request names none.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest name of a namespaced or cluster object (a DNS-1123 subdomain).
const MAX_NAME_LEN: usize = 253;
/// Longest label value.
const MAX_LABEL_VALUE_LEN: usize = 63;
/// Hex digits of the hash added to names that were shortened or sanitised.
const HASH_LEN: usize = 10;
/// The name of the cluster entry in issued kubeconfigs.
const KUBECONFIG_CLUSTER: &str = "keysmith-target";

/// A Kubernetes cluster as the target app, reached with an admin client.
#[derive(Clone)]
pub struct KubernetesProvider {
    /// Every call is made with this client: the connection's identity.
    client: Client,
    /// Feeds the watch-fed indexes: the same client, or keysmith's own when
    /// the indexes are shared by every connection to this cluster.
    observer: Client,
    /// Who `client` is: keysmith, or a ServiceAccount it impersonates.
    identity: Identity,
    server_url: String,
    ca_pem: Option<String>,
    allow_cluster_scope: bool,
    tls_server_name: Option<String>,
    insecure_skip_tls_verify: bool,
    /// Every RBAC binding that can give a ServiceAccount a role, fed by a
    /// watch: reading an account's roles costs no request.
    index: Arc<RbacIndex>,
    /// Every key anchor Secret (metadata), fed by a watch: reading an
    /// account's keys costs no request.
    anchors: Arc<AnchorIndex>,
}

impl fmt::Debug for KubernetesProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesProvider")
            .field("server_url", &self.server_url)
            .field("has_ca", &self.ca_pem.is_some())
            .field("allow_cluster_scope", &self.allow_cluster_scope)
            .finish_non_exhaustive()
    }
}

impl KubernetesProvider {
    /// A provider acting through `client` (the connection's admin
    /// credential). `server_url` and `ca_pem` (the apiserver's CA, PEM) go
    /// into the kubeconfigs handed out with each key, so they must be how
    /// the integration reaches the same cluster.
    pub fn new(client: Client, server_url: String, ca_pem: Option<String>, allow_cluster_scope: bool) -> Self {
        Self {
            observer: client.clone(),
            client,
            identity: Identity::Operator,
            server_url: server_url.trim_end_matches('/').to_owned(),
            ca_pem,
            allow_cluster_scope,
            tls_server_name: None,
            insecure_skip_tls_verify: false,
            index: Arc::new(WatchIndex::new("RoleBindings and ClusterRoleBindings")),
            anchors: Arc::new(WatchIndex::new("key anchor Secrets")),
        }
    }

    /// A provider built from a client configuration: the client is built
    /// from it, and the server URL, CA, TLS server name and (in)secure
    /// verification setting are carried into issued kubeconfigs.
    pub fn from_config(config: kube::Config, allow_cluster_scope: bool) -> Result<Self, ProviderError> {
        let server_url = config.cluster_url.to_string();
        let ca_pem = match (&config.root_cert, &config.root_cert_file) {
            (Some(certs), _) if !certs.is_empty() => Some(der_certs_to_pem(certs)),
            (_, Some(file)) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| ProviderError::Invalid(format!("reading the CA bundle {}: {e}", file.display())))?,
            ),
            _ => None,
        };
        let tls_server_name = config.tls_server_name.clone();
        let insecure_skip_tls_verify = config.accept_invalid_certs;
        let client = Client::try_from(config).map_err(classify)?;
        let mut provider = Self::new(client, server_url, ca_pem, allow_cluster_scope);
        provider.tls_server_name = tls_server_name;
        provider.insecure_skip_tls_verify = insecure_skip_tls_verify;
        Ok(provider)
    }

    /// Says who the provider's client is (it must already be configured so):
    /// with a ServiceAccount, the connection check asks what that account
    /// may do in its own namespace, and refusals name it.
    pub fn acting_as(mut self, identity: Identity) -> Self {
        self.identity = identity;
        self
    }

    /// Reads roles and keys from indexes shared with other connections to
    /// the same cluster, fed by `observer` (keysmith's own client): one
    /// watch per kind for the whole cluster instead of one per connection,
    /// and a ServiceAccount that may not list bindings cluster-wide can
    /// still have its roles read. The index is only ever asked about the
    /// bindings that name the account's own ServiceAccount and the anchors
    /// of its own keys: what the account's own token could learn with a
    /// SelfSubjectRulesReview. Every change is still made as the
    /// connection's identity.
    pub fn with_indexes(mut self, index: Arc<RbacIndex>, anchors: Arc<AnchorIndex>, observer: Client) -> Self {
        self.index = index;
        self.anchors = anchors;
        self.observer = observer;
        self
    }

    /// The apiserver URL written into issued kubeconfigs.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// Whether scope `*` (a ClusterRoleBinding) may be granted.
    pub fn allow_cluster_scope(&self) -> bool {
        self.allow_cluster_scope
    }

    fn service_accounts(&self, namespace: &str) -> Api<ServiceAccount> {
        Api::namespaced(self.client.clone(), namespace)
    }

    fn secrets(&self, namespace: &str) -> Api<Secret> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// The ServiceAccount, if it exists.
    async fn get_service_account(&self, account: &AccountRequest) -> Result<Option<ServiceAccount>, ProviderError> {
        self.service_accounts(sa_namespace(account)).get_opt(&account.name).await.map_err(classify)
    }

    /// The ServiceAccount, which must exist and be ours.
    async fn owned_service_account(&self, account: &AccountRequest) -> Result<ServiceAccount, ProviderError> {
        match self.get_service_account(account).await? {
            None => Err(ProviderError::NotFound(format!("ServiceAccount {} does not exist", sa_ref(account)))),
            Some(sa) if !is_owned(&sa.metadata, account) => Err(foreign_account(account)),
            Some(sa) => Ok(sa),
        }
    }

    /// Merge-patches the ServiceAccount's labels and annotations to what we
    /// want, `disabled` setting or clearing the disabled annotation. The
    /// resourceVersion guards against the ownership changing under us.
    async fn patch_service_account(
        &self,
        account: &AccountRequest,
        current: &ServiceAccount,
        disabled: bool,
    ) -> Result<ServiceAccount, ProviderError> {
        let mut annotations: serde_json::Map<String, serde_json::Value> =
            desired_annotations(account).into_iter().map(|(k, v)| (k, json!(v))).collect();
        for key in [ownership::DESCRIPTION, ownership::OWNER] {
            annotations.entry(key).or_insert(serde_json::Value::Null);
        }
        annotations
            .insert(ownership::DISABLED.to_owned(), if disabled { json!("true") } else { serde_json::Value::Null });
        let patch = json!({
            "metadata": {
                "resourceVersion": current.metadata.resource_version,
                "labels": desired_labels(account),
                "annotations": annotations,
            }
        });
        self.service_accounts(sa_namespace(account))
            .patch(
                &account.name,
                &PatchParams { field_manager: Some(ownership::FIELD_MANAGER.to_owned()), ..PatchParams::default() },
                &Patch::Merge(&patch),
            )
            .await
            .map_err(classify)
    }

    /// The key anchors of the account (in the ServiceAccount's namespace).
    /// Deletes every key anchor of the account, revoking all its tokens.
    async fn revoke_all_keys(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        let namespace = sa_namespace(account);
        let secrets = self.secrets(namespace);
        // From the index, which knows each anchor's owner and uid: the
        // connection's identity needs no right to read Secrets.
        for (name, anchor) in self.anchors.anchors_with_entries(&self.observer, &account.owner_uid, namespace).await? {
            delete_ignoring_not_found(&secrets, &name, anchor.uid.clone()).await?;
            self.anchors.forget(namespace, &name);
        }
        Ok(())
    }

    /// The kubeconfig that authenticates as the ServiceAccount with `token`.
    fn kubeconfig(&self, account: &AccountRequest, token: &str) -> Kubeconfig {
        let user = format!("system:serviceaccount:{}:{}", sa_namespace(account), account.name);
        Kubeconfig {
            api_version: Some("v1".to_owned()),
            kind: Some("Config".to_owned()),
            clusters: vec![NamedCluster {
                name: KUBECONFIG_CLUSTER.to_owned(),
                cluster: Some(Cluster {
                    server: Some(self.server_url.clone()),
                    certificate_authority_data: self.ca_pem.as_ref().map(|pem| BASE64.encode(pem)),
                    tls_server_name: self.tls_server_name.clone(),
                    insecure_skip_tls_verify: self.insecure_skip_tls_verify.then_some(true),
                    ..Cluster::default()
                }),
                ..NamedCluster::default()
            }],
            auth_infos: vec![NamedAuthInfo {
                name: user.clone(),
                auth_info: Some(AuthInfo { token: Some(token.to_owned().into()), ..AuthInfo::default() }),
                ..NamedAuthInfo::default()
            }],
            contexts: vec![NamedContext {
                name: user.clone(),
                context: Some(Context {
                    cluster: KUBECONFIG_CLUSTER.to_owned(),
                    user: Some(user.clone()),
                    namespace: Some(sa_namespace(account).to_owned()),
                    ..Context::default()
                }),
                ..NamedContext::default()
            }],
            current_context: Some(user),
            ..Kubeconfig::default()
        }
    }

    /// What goes into the output Secret for a token.
    fn material(&self, account: &AccountRequest, token: &str) -> Result<KeyMaterial, ProviderError> {
        // A serialisation error names a position, never a value.
        let kubeconfig = serde_yaml::to_string(&self.kubeconfig(account, token))
            .map_err(|e| ProviderError::Invalid(format!("rendering the kubeconfig: {e}")))?;
        let mut values = BTreeMap::new();
        values.insert("token".to_owned(), token.to_owned());
        values.insert("server".to_owned(), self.server_url.clone());
        values.insert("namespace".to_owned(), sa_namespace(account).to_owned());
        values.insert("kubeconfig".to_owned(), kubeconfig);
        if let Some(ca) = &self.ca_pem {
            values.insert("ca.crt".to_owned(), ca.clone());
        }
        Ok(KeyMaterial::new(values))
    }

    /// Creates the anchor Secret of a key, or finds ours from an earlier
    /// attempt. Returns it and whether it was created now.
    async fn ensure_anchor(
        &self,
        account: &AccountRequest,
        sa: &ServiceAccount,
        key_id: &str,
    ) -> Result<(Secret, bool), ProviderError> {
        let name = anchor_name(&account.name, key_id);
        let mut labels = desired_labels(account);
        labels.insert(ownership::KEY_ID.to_owned(), label_value(key_id));
        let mut annotations = BTreeMap::new();
        annotations.insert(ownership::KEY_ID.to_owned(), key_id.to_owned());
        annotations.insert(
            ownership::INTEGRATION_ACCOUNT.to_owned(),
            ownership::account_reference(&account.namespace, &account.account_name),
        );
        let anchor = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(sa_namespace(account).to_owned()),
                labels: Some(labels),
                annotations: Some(annotations),
                // When the ServiceAccount goes, the garbage collector takes
                // its anchors with it.
                owner_references: Some(vec![OwnerReference {
                    api_version: "v1".to_owned(),
                    kind: "ServiceAccount".to_owned(),
                    name: account.name.clone(),
                    uid: sa.metadata.uid.clone().unwrap_or_default(),
                    ..OwnerReference::default()
                }])
                .filter(|refs| refs.iter().all(|r| !r.uid.is_empty())),
                ..ObjectMeta::default()
            },
            type_: Some(KEY_ANCHOR_TYPE.to_owned()),
            ..Secret::default()
        };
        let secrets = self.secrets(sa_namespace(account));
        match secrets.create(&post_params(), &anchor).await {
            Ok(created) => {
                self.anchors.applied(&created);
                Ok((created, true))
            }
            // Ours from an earlier attempt, if the index (anchor type,
            // keysmith's labels, this account, this key) says so: no right
            // to read Secrets is needed to tell.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let namespace = sa_namespace(account);
                let existing = self.anchors.anchor(&self.observer, namespace, &name).await?;
                if let Some(found) = existing.filter(|a| a.owner_uid == account.owner_uid && a.key_id == key_id) {
                    let secret = Secret {
                        metadata: ObjectMeta {
                            name: Some(name.clone()),
                            namespace: Some(namespace.to_owned()),
                            uid: found.uid,
                            ..ObjectMeta::default()
                        },
                        ..Secret::default()
                    };
                    Ok((secret, false))
                } else {
                    Err(ProviderError::Conflict(format!(
                        "Secret {}/{name} exists and is not keysmith's anchor for key {key_id}",
                        sa_namespace(account)
                    )))
                }
            }
            Err(e) => Err(classify(e)),
        }
    }
}

/// The rights a ServiceAccount that a namespaced connection acts as needs in
/// its namespace: (verb, API group, resource).
const SERVICE_ACCOUNT_RIGHTS: [(&str, &str, &str); 8] = [
    ("create", "", "serviceaccounts"),
    ("patch", "", "serviceaccounts"),
    ("delete", "", "serviceaccounts"),
    ("create", "", "serviceaccounts/token"),
    ("create", "", "secrets"),
    ("delete", "", "secrets"),
    ("create", "rbac.authorization.k8s.io", "rolebindings"),
    ("delete", "rbac.authorization.k8s.io", "rolebindings"),
];

impl KubernetesProvider {
    /// Whether the provider's identity may `verb` `resource` (in `namespace`,
    /// or cluster-wide), by a SelfSubjectAccessReview.
    async fn may(
        &self,
        namespace: Option<&str>,
        verb: &str,
        group: &str,
        resource: &str,
    ) -> Result<bool, ProviderError> {
        let (resource, subresource) = match resource.split_once('/') {
            Some((resource, sub)) => (resource, Some(sub.to_owned())),
            None => (resource, None),
        };
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    namespace: namespace.map(str::to_owned),
                    verb: Some(verb.to_owned()),
                    group: Some(group.to_owned()),
                    resource: Some(resource.to_owned()),
                    subresource,
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let review = Api::<SelfSubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(classify)?;
        Ok(review.status.is_some_and(|s| s.allowed))
    }

    /// Deletes a binding labelled for the account, if it still is (by uid).
    async fn delete_leftover<B: Binding + Indexed<IndexedBinding>>(
        &self,
        api: &Api<B>,
        name: &str,
        account: &AccountRequest,
    ) -> Result<(), ProviderError> {
        match api.get_opt(name).await.map_err(classify)? {
            Some(binding) if is_owned(binding.meta(), account) => {
                delete_ignoring_not_found(api, name, binding.meta().uid.clone()).await?;
                self.index.deleted(&binding);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Takes `wanted` (with its effective scope) away from the account in
    /// the bindings `api` lists: keysmith's own bindings are deleted, anyone
    /// else's lose the ServiceAccount (see [`release_binding`]). Bindings
    /// that neither keysmith made for the account nor name its
    /// ServiceAccount are never touched.
    async fn revoke_from<B: Binding + Indexed<IndexedBinding>>(
        &self,
        api: &Api<B>,
        account: &AccountRequest,
        wanted: &RoleGrant,
    ) -> Result<(), ProviderError> {
        let listed = api.list(&ListParams::default()).await.map_err(classify)?;
        let (owned, foreign): (Vec<B>, Vec<B>) = listed
            .items
            .into_iter()
            .filter(|b| holds(b, account) && grant_of(b).as_ref() == Some(wanted))
            .partition(|b| is_owned(b.meta(), account));
        for binding in &owned {
            if let Some(name) = binding.meta().name.as_deref() {
                delete_ignoring_not_found(api, name, binding.meta().uid.clone()).await?;
                self.index.deleted(binding);
            }
        }
        if foreign.is_empty() {
            return Ok(());
        }
        // Edit other people's bindings only for a ServiceAccount that is
        // ours: one that is gone holds nothing, and one that someone else
        // made is theirs to manage.
        match self.get_service_account(account).await? {
            None => return Ok(()),
            Some(sa) if !is_owned(&sa.metadata, account) => return Err(foreign_account(account)),
            Some(_) => {}
        }
        for binding in &foreign {
            match release_binding(api, binding, account).await? {
                Some(patched) => self.index.applied(&patched),
                None => self.index.deleted(binding),
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Provider for KubernetesProvider {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { last_use_lag: None, max_keys_per_account: None, key_expiry: true, disable: true }
    }

    fn default_scope(&self, account: &AccountRequest) -> Option<String> {
        Some(sa_namespace(account).to_owned())
    }

    async fn verify_connection(&self) -> Result<(), ProviderError> {
        match &self.identity {
            Identity::Operator => {
                if self.may(None, "create", "", "serviceaccounts").await? {
                    Ok(())
                } else {
                    Err(ProviderError::Unauthorized(
                        "the connection's credential may not create ServiceAccounts".to_owned(),
                    ))
                }
            }
            // What a ServiceAccount needs in its own namespace to manage
            // accounts there; granting roles needs more (holding them, or
            // `bind`), which the apiserver checks on each grant.
            Identity::ServiceAccount { namespace, name } => {
                let mut missing = Vec::new();
                for (verb, group, resource) in SERVICE_ACCOUNT_RIGHTS {
                    if !self.may(Some(namespace), verb, group, resource).await? {
                        missing.push(format!("{verb} {resource}"));
                    }
                }
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(ProviderError::Unauthorized(format!(
                        "ServiceAccount {namespace}/{name}, which this connection acts as, may not {} in namespace {namespace}",
                        missing.join(", ")
                    )))
                }
            }
        }
    }

    async fn observe_account(&self, account: &AccountRequest) -> Result<Option<ObservedAccount>, ProviderError> {
        Ok(self.get_service_account(account).await?.map(|sa| observed_account(&sa, account)))
    }

    async fn create_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(account.name.clone()),
                namespace: Some(sa_namespace(account).to_owned()),
                labels: Some(desired_labels(account)),
                annotations: Some(desired_annotations(account)),
                ..ObjectMeta::default()
            },
            // The account is for a system outside the cluster: pods have no
            // business running as it.
            automount_service_account_token: Some(false),
            ..ServiceAccount::default()
        };
        let api = self.service_accounts(sa_namespace(account));
        match api.create(&post_params(), &sa).await {
            Ok(created) => Ok(observed_account(&created, account)),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let existing = api.get(&account.name).await.map_err(classify)?;
                if is_owned(&existing.metadata, account) {
                    Ok(observed_account(&existing, account))
                } else {
                    Err(foreign_account(account))
                }
            }
            Err(e) => Err(classify(e)),
        }
    }

    async fn update_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        // The patch carries the resourceVersion it read; kube-controller-manager
        // edits ServiceAccounts too (token Secrets), so a lost race is retried
        // on a fresh read.
        let mut attempts = 0;
        loop {
            let current = self.owned_service_account(account).await?;
            match self.patch_service_account(account, &current, false).await {
                Ok(updated) => return Ok(observed_account(&updated, account)),
                Err(ProviderError::Conflict(_)) if attempts < 3 => attempts += 1,
                Err(error) => return Err(error),
            }
        }
    }

    async fn disable_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        // Tokens only come from anchors, so revoking them all leaves the
        // account unable to authenticate; its role bindings (keysmith's and
        // anyone else's) are kept for when it is enabled again.
        self.revoke_all_keys(account).await?;
        match self.get_service_account(account).await? {
            None => Ok(()),
            Some(sa) if !is_owned(&sa.metadata, account) => {
                tracing::warn!(service_account = %sa_ref(account), "not disabling a ServiceAccount keysmith does not own");
                Ok(())
            }
            Some(sa) => match self.patch_service_account(account, &sa, true).await {
                Err(ProviderError::NotFound(_)) => Ok(()),
                other => other.map(|_| ()),
            },
        }
    }

    async fn delete_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        // Keys first, so nothing can use the account while the rest goes.
        self.revoke_all_keys(account).await?;

        // Every role it holds, however granted, so that no binding is left
        // naming a ServiceAccount that is gone. Only for our own
        // ServiceAccount: bindings naming someone else's are not ours to edit.
        let ours = self.get_service_account(account).await?.is_some_and(|sa| is_owned(&sa.metadata, account));
        if ours {
            for grant in self.list_roles(account).await? {
                self.revoke_role(account, &grant).await?;
            }
        }

        // Whatever keysmith made for the account and is still there (a
        // binding whose subjects someone edited, say). Labels can be forged:
        // one the connection's identity may not delete is left, with a
        // warning, rather than blocking the deletion.
        for key in self.index.labelled_for(&self.observer, &account.owner_uid).await? {
            let deleted = match key.namespace.as_deref() {
                Some(ns) => {
                    let api = Api::<RoleBinding>::namespaced(self.client.clone(), ns);
                    self.delete_leftover(&api, &key.name, account).await
                }
                None => {
                    let api = Api::<ClusterRoleBinding>::all(self.client.clone());
                    self.delete_leftover(&api, &key.name, account).await
                }
            };
            match deleted {
                Err(ProviderError::Unauthorized(message)) => tracing::warn!(
                    binding = %key.name,
                    namespace = key.namespace.as_deref().unwrap_or(""),
                    %message,
                    "leaving a binding labelled for this account that the connection's identity may not delete"
                ),
                other => other?,
            }
        }

        match self.get_service_account(account).await? {
            None => Ok(()),
            Some(sa) if !is_owned(&sa.metadata, account) => {
                tracing::warn!(service_account = %sa_ref(account), "not deleting a ServiceAccount keysmith does not own");
                Ok(())
            }
            Some(sa) => {
                let api = self.service_accounts(sa_namespace(account));
                delete_ignoring_not_found(&api, &account.name, sa.metadata.uid.clone()).await
            }
        }
    }

    async fn list_roles(&self, account: &AccountRequest) -> Result<Vec<RoleGrant>, ProviderError> {
        // From the watch-fed index: hand-made bindings can be anywhere and
        // carry no label to select them by, and listing every binding in the
        // cluster per account would cost O(accounts x bindings).
        self.index.grants_for(&self.observer, sa_namespace(account), &account.name).await
    }

    async fn grant_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        let target = binding_target(account, grant);
        if target.is_none() && !self.allow_cluster_scope {
            return Err(ProviderError::Invalid(format!(
                "cluster-wide scope \"{CLUSTER_SCOPE}\" is not allowed by this connection"
            )));
        }
        if grant.role.is_empty() {
            return Err(ProviderError::Invalid("the role name is empty".to_owned()));
        }
        // A binding names the ServiceAccount by name: grant only to one
        // keysmith made for this very IntegrationAccount.
        self.owned_service_account(account).await?;
        // `Role/<name>` stands for a namespaced Role someone else bound; no
        // ClusterRole name contains a slash.
        if grant.role.contains('/') {
            return Err(ProviderError::Invalid(format!(
                "\"{}\" is not a ClusterRole name: keysmith grants ClusterRoles only",
                grant.role
            )));
        }
        // RBAC accepts bindings to ClusterRoles that do not exist (they grant
        // nothing). A typo should surface, so look first; an admin that may
        // not read ClusterRoles skips the check.
        match Api::<ClusterRole>::all(self.client.clone()).get_opt(&grant.role).await {
            Ok(None) => return Err(ProviderError::NotFound(format!("ClusterRole \"{}\" does not exist", grant.role))),
            Ok(Some(_)) | Err(kube::Error::Api(_)) => {}
            Err(e) => return Err(classify(e)),
        }

        let name = binding_name(account, grant);
        let metadata = ObjectMeta {
            name: Some(name.clone()),
            namespace: target.clone(),
            labels: Some(desired_labels(account)),
            annotations: Some(binding_annotations(account, grant)),
            ..ObjectMeta::default()
        };
        let role_ref = RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "ClusterRole".to_owned(),
            name: grant.role.clone(),
        };
        let subjects = Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: account.name.clone(),
            namespace: Some(sa_namespace(account).to_owned()),
            ..Subject::default()
        }]);
        match &target {
            Some(ns) => {
                let api = Api::<RoleBinding>::namespaced(self.client.clone(), ns);
                let binding = RoleBinding { metadata, role_ref, subjects };
                let made = match api.create(&post_params(), &binding).await {
                    Ok(made) => made,
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        let existing = api.get(&name).await.map_err(classify)?;
                        settle_existing(&api, existing, &binding.role_ref, account, &format!("RoleBinding {ns}/{name}"))
                            .await?
                    }
                    Err(e) => return Err(classify(e)),
                };
                self.index.applied(&made);
            }
            None => {
                let api = Api::<ClusterRoleBinding>::all(self.client.clone());
                let binding = ClusterRoleBinding { metadata, role_ref, subjects };
                let made = match api.create(&post_params(), &binding).await {
                    Ok(made) => made,
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        let existing = api.get(&name).await.map_err(classify)?;
                        settle_existing(
                            &api,
                            existing,
                            &binding.role_ref,
                            account,
                            &format!("ClusterRoleBinding {name}"),
                        )
                        .await?
                    }
                    Err(e) => return Err(classify(e)),
                };
                self.index.applied(&made);
            }
        }
        Ok(())
    }

    async fn revoke_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        let wanted = RoleGrant { role: grant.role.clone(), scope: Some(effective_scope(account, grant)) };
        match binding_target(account, grant) {
            Some(ns) => {
                let api = Api::<RoleBinding>::namespaced(self.client.clone(), &ns);
                self.revoke_from(&api, account, &wanted).await
            }
            None => {
                let api = Api::<ClusterRoleBinding>::all(self.client.clone());
                self.revoke_from(&api, account, &wanted).await
            }
        }
    }

    async fn issue_key(&self, account: &AccountRequest, request: &KeyRequest) -> Result<IssuedKey, ProviderError> {
        if request.key_id.is_empty() {
            return Err(ProviderError::Invalid("the key id is empty".to_owned()));
        }
        let sa = self.owned_service_account(account).await?;
        let (anchor, created) = self.ensure_anchor(account, &sa, &request.key_id).await?;
        let lifetime = request.lifetime.unwrap_or(DEFAULT_TOKEN_LIFETIME).max(MIN_TOKEN_LIFETIME);
        let token_request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX)),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".to_owned()),
                    kind: Some("Secret".to_owned()),
                    name: anchor.metadata.name.clone(),
                    uid: anchor.metadata.uid.clone(),
                }),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let issued = self
            .service_accounts(sa_namespace(account))
            .create_token_request(&account.name, &post_params(), &token_request)
            .await;
        let status = match issued {
            Ok(TokenRequest { status: Some(status), .. }) if !status.token.is_empty() => status,
            failed => {
                if created {
                    if let Some(name) = anchor.metadata.name.as_deref() {
                        let _ = delete_ignoring_not_found(
                            &self.secrets(sa_namespace(account)),
                            name,
                            anchor.metadata.uid.clone(),
                        )
                        .await;
                    }
                }
                return Err(match failed {
                    Err(e) => classify(e),
                    Ok(_) => ProviderError::transient("the TokenRequest returned no token"),
                });
            }
        };
        Ok(IssuedKey {
            id: request.key_id.clone(),
            expires_at: Some(status.expiration_timestamp.0),
            material: self.material(account, &status.token)?,
        })
    }

    async fn list_keys(&self, account: &AccountRequest) -> Result<Vec<ObservedKey>, ProviderError> {
        // From the watch-fed index: a label-selected list makes the
        // apiserver read every Secret of the namespace.
        self.anchors.keys_for(&self.observer, &account.owner_uid, sa_namespace(account)).await
    }

    async fn revoke_key(&self, account: &AccountRequest, key_id: &str) -> Result<(), ProviderError> {
        let namespace = sa_namespace(account);
        let name = anchor_name(&account.name, key_id);
        match self.anchors.anchor(&self.observer, namespace, &name).await? {
            Some(anchor) if anchor.owner_uid == account.owner_uid => {
                delete_ignoring_not_found(&self.secrets(namespace), &name, anchor.uid.clone()).await?;
                self.anchors.forget(namespace, &name);
                Ok(())
            }
            // Gone, or someone else's Secret: our key cannot be behind it.
            _ => Ok(()),
        }
    }

    async fn verify_key(&self, account: &AccountRequest, key: &IssuedKey) -> Result<(), ProviderError> {
        let token = key
            .material
            .expose()
            .get("token")
            .ok_or_else(|| ProviderError::Invalid("the key has no token".to_owned()))?;
        let config =
            kube::Config::from_custom_kubeconfig(self.kubeconfig(account, token), &KubeConfigOptions::default())
                .await
                .map_err(|e| ProviderError::Invalid(format!("the issued kubeconfig is unusable: {e}")))?;
        let client = Client::try_from(config).map_err(classify)?;
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(sa_namespace(account).to_owned()),
                    verb: Some("get".to_owned()),
                    resource: Some("serviceaccounts".to_owned()),
                    name: Some(account.name.clone()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        // Any answer but 401 means the apiserver knew who we were.
        match Api::<SelfSubjectAccessReview>::all(client).create(&PostParams::default(), &review).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 401 => {
                Err(ProviderError::Invalid("the new token was not accepted".to_owned()))
            }
            Err(kube::Error::Api(status)) if status.code == 403 => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }
}

/// The namespace of the account's ServiceAccount.
fn sa_namespace(account: &AccountRequest) -> &str {
    account.options.get("namespace").map(String::as_str).filter(|ns| !ns.is_empty()).unwrap_or(&account.namespace)
}

/// `namespace/name` of the ServiceAccount, for messages.
fn sa_ref(account: &AccountRequest) -> String {
    format!("{}/{}", sa_namespace(account), account.name)
}

fn foreign_account(account: &AccountRequest) -> ProviderError {
    ProviderError::Conflict(format!(
        "ServiceAccount {} exists and was not created by keysmith for this IntegrationAccount",
        sa_ref(account)
    ))
}

fn post_params() -> PostParams {
    PostParams { field_manager: Some(ownership::FIELD_MANAGER.to_owned()), ..PostParams::default() }
}

/// The labels on everything keysmith creates for the account.
fn desired_labels(account: &AccountRequest) -> BTreeMap<String, String> {
    BTreeMap::from([
        (ownership::MANAGED_BY_KEY.to_owned(), ownership::MANAGED_BY.to_owned()),
        (ownership::ACCOUNT_UID.to_owned(), account.owner_uid.clone()),
    ])
}

/// The annotations keysmith keeps on the ServiceAccount (disabled aside).
fn desired_annotations(account: &AccountRequest) -> BTreeMap<String, String> {
    let mut annotations = BTreeMap::from([(
        ownership::INTEGRATION_ACCOUNT.to_owned(),
        ownership::account_reference(&account.namespace, &account.account_name),
    )]);
    if let Some(description) = &account.description {
        annotations.insert(ownership::DESCRIPTION.to_owned(), description.clone());
    }
    if let Some(owner) = &account.owner {
        annotations.insert(ownership::OWNER.to_owned(), owner.clone());
    }
    annotations
}

fn is_owned(meta: &ObjectMeta, account: &AccountRequest) -> bool {
    meta.labels.as_ref().and_then(|l| l.get(ownership::ACCOUNT_UID)).is_some_and(|uid| *uid == account.owner_uid)
}

fn observed_account(sa: &ServiceAccount, account: &AccountRequest) -> ObservedAccount {
    let meta = &sa.metadata;
    let labels = meta.labels.clone().unwrap_or_default();
    let annotations = meta.annotations.clone().unwrap_or_default();
    let labels_match = desired_labels(account).iter().all(|(k, v)| labels.get(k) == Some(v));
    let desired = desired_annotations(account);
    let annotations_match = [ownership::INTEGRATION_ACCOUNT, ownership::DESCRIPTION, ownership::OWNER]
        .into_iter()
        .all(|key| annotations.get(key) == desired.get(key));
    ObservedAccount {
        id: meta.uid.clone().unwrap_or_default(),
        name: format!("system:serviceaccount:{}:{}", sa_namespace(account), account.name),
        disabled: annotations.get(ownership::DISABLED).is_some_and(|v| v == "true"),
        owned: is_owned(meta, account),
        drifted: !(labels_match && annotations_match),
    }
}

/// Where a grant's binding lives: `Some(namespace)` for a RoleBinding,
/// `None` for a ClusterRoleBinding.
fn binding_target(account: &AccountRequest, grant: &RoleGrant) -> Option<String> {
    match grant.scope.as_deref() {
        Some(CLUSTER_SCOPE) => None,
        Some(ns) if !ns.is_empty() => Some(ns.to_owned()),
        _ => Some(sa_namespace(account).to_owned()),
    }
}

/// The scope a grant takes effect on: a namespace, or `*` for cluster-wide.
/// No scope (or an empty one) means the ServiceAccount's own namespace.
fn effective_scope(account: &AccountRequest, grant: &RoleGrant) -> String {
    binding_target(account, grant).unwrap_or_else(|| CLUSTER_SCOPE.to_owned())
}

/// The binding's name: readable, and unique per ServiceAccount, role and
/// effective scope (the hash covers all of them, so a ServiceAccount of the
/// same name in another namespace gets other bindings).
fn binding_name(account: &AccountRequest, grant: &RoleGrant) -> String {
    let identity =
        format!("{}\0{}\0{}\0{}", sa_namespace(account), account.name, grant.role, effective_scope(account, grant));
    hashed_name(&format!("keysmith-{}-{}", account.name, grant.role), &identity)
}

fn binding_annotations(account: &AccountRequest, grant: &RoleGrant) -> BTreeMap<String, String> {
    BTreeMap::from([
        (ROLE_ANNOTATION.to_owned(), grant.role.clone()),
        (SCOPE_ANNOTATION.to_owned(), effective_scope(account, grant)),
        (
            ownership::INTEGRATION_ACCOUNT.to_owned(),
            ownership::account_reference(&account.namespace, &account.account_name),
        ),
    ])
}

/// What keysmith reads of an RBAC binding: RoleBindings and
/// ClusterRoleBindings alike.
trait Binding:
    kube::Resource<DynamicType = ()> + Clone + fmt::Debug + serde::de::DeserializeOwned + serde::Serialize + Send + Sync
{
    /// `RoleBinding` or `ClusterRoleBinding`, for messages.
    const KIND: &'static str;
    /// The namespace the binding lives in (`None` for a ClusterRoleBinding).
    fn binding_namespace(&self) -> Option<&str>;
    /// Where the binding takes effect: its namespace, or `*` for a
    /// ClusterRoleBinding. `None` for a RoleBinding without a namespace.
    fn scope(&self) -> Option<String>;
    fn subjects(&self) -> &[Subject];
    fn role_ref(&self) -> &RoleRef;
}

impl Binding for RoleBinding {
    const KIND: &'static str = "RoleBinding";
    fn binding_namespace(&self) -> Option<&str> {
        self.metadata.namespace.as_deref()
    }
    fn scope(&self) -> Option<String> {
        self.metadata.namespace.clone()
    }
    fn subjects(&self) -> &[Subject] {
        self.subjects.as_deref().unwrap_or_default()
    }
    fn role_ref(&self) -> &RoleRef {
        &self.role_ref
    }
}

impl Binding for ClusterRoleBinding {
    const KIND: &'static str = "ClusterRoleBinding";
    fn binding_namespace(&self) -> Option<&str> {
        None
    }
    fn scope(&self) -> Option<String> {
        Some(CLUSTER_SCOPE.to_owned())
    }
    fn subjects(&self) -> &[Subject] {
        self.subjects.as_deref().unwrap_or_default()
    }
    fn role_ref(&self) -> &RoleRef {
        &self.role_ref
    }
}

/// Whether `subject` is the account's ServiceAccount, read as the RBAC
/// authorizer reads it: in a RoleBinding, a ServiceAccount subject without a
/// namespace is in the binding's namespace.
fn is_account_subject(subject: &Subject, binding_namespace: Option<&str>, account: &AccountRequest) -> bool {
    let namespace = subject.namespace.as_deref().filter(|ns| !ns.is_empty()).or(binding_namespace);
    subject.kind == "ServiceAccount" && subject.name == account.name && namespace == Some(sa_namespace(account))
}

/// Whether the binding gives the account its role: it names the
/// ServiceAccount (keysmith's label alone gives nothing, and can be forged).
fn holds<B: Binding>(binding: &B, account: &AccountRequest) -> bool {
    binding.subjects().iter().any(|s| is_account_subject(s, binding.binding_namespace(), account))
}

/// The grant a binding stands for, with its effective scope (see
/// [`Binding::scope`]). A namespaced Role reads as `Role/<name>`.
fn grant_of<B: Binding>(binding: &B) -> Option<RoleGrant> {
    index::grant(binding.scope(), binding.role_ref())
}

/// A binding of the name keysmith gives a grant already exists: it is ours
/// only if it carries the account's label and binds the wanted role (else a
/// conflict: never taken over); ours but without the ServiceAccount among
/// its subjects (someone edited it), the ServiceAccount is put back,
/// conditional on the binding being as read.
async fn settle_existing<B: Binding>(
    api: &Api<B>,
    existing: B,
    role_ref: &RoleRef,
    account: &AccountRequest,
    what: &str,
) -> Result<B, ProviderError> {
    if !is_owned(existing.meta(), account) || existing.role_ref() != role_ref {
        return Err(ProviderError::Conflict(format!(
            "{what} exists and was not created by keysmith for this IntegrationAccount"
        )));
    }
    if holds(&existing, account) {
        return Ok(existing);
    }
    let mut subjects: Vec<Subject> = existing.subjects().to_vec();
    subjects.push(Subject {
        kind: "ServiceAccount".to_owned(),
        name: account.name.clone(),
        namespace: Some(sa_namespace(account).to_owned()),
        ..Subject::default()
    });
    let patch = json!({
        "metadata": { "resourceVersion": existing.meta().resource_version },
        "subjects": subjects,
    });
    let params = PatchParams { field_manager: Some(ownership::FIELD_MANAGER.to_owned()), ..PatchParams::default() };
    api.patch(&existing.meta().name.clone().unwrap_or_default(), &params, &Patch::Merge(&patch)).await.map_err(classify)
}

/// Takes the account's ServiceAccount out of a binding someone else made:
/// deletes the binding if the ServiceAccount is its only subject, else
/// merge-patches `subjects` to the others. Both are conditional on the
/// binding being as read (its uid and resourceVersion), so a change made in
/// between is never lost: the apiserver answers 409 and this returns
/// [`ProviderError::Conflict`] for the caller to retry. Gone is fine.
/// Returns the binding as patched, or `None` when it is gone.
async fn release_binding<B: Binding>(
    api: &Api<B>,
    binding: &B,
    account: &AccountRequest,
) -> Result<Option<B>, ProviderError> {
    let meta = binding.meta();
    let Some(name) = meta.name.as_deref() else {
        return Ok(None);
    };
    let what = match binding.binding_namespace() {
        Some(ns) => format!("{} {ns}/{name}", B::KIND),
        None => format!("{} {name}", B::KIND),
    };
    let others: Vec<&Subject> =
        binding.subjects().iter().filter(|s| !is_account_subject(s, binding.binding_namespace(), account)).collect();
    let result = if others.is_empty() {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: meta.uid.clone(),
                resource_version: meta.resource_version.clone(),
            }),
            ..DeleteParams::background()
        };
        api.delete(name, &params).await.map(|_| None)
    } else {
        let patch = json!({
            "metadata": { "resourceVersion": meta.resource_version },
            "subjects": others,
        });
        let params = PatchParams { field_manager: Some(ownership::FIELD_MANAGER.to_owned()), ..PatchParams::default() };
        api.patch(name, &params, &Patch::Merge(&patch)).await.map(Some)
    };
    match result {
        Ok(patched) => Ok(patched),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
        Err(kube::Error::Api(status)) if status.code == 409 => Err(ProviderError::Conflict(format!(
            "{what} changed while removing ServiceAccount {} from it: {}",
            sa_ref(account),
            status.message
        ))),
        Err(e) => Err(classify(e)),
    }
}

/// The anchor Secret's name for a key.
fn anchor_name(sa_name: &str, key_id: &str) -> String {
    let raw = format!("{sa_name}-key-{key_id}");
    let sanitised = sanitise(&raw, MAX_NAME_LEN);
    if sanitised == raw {
        raw
    } else {
        hashed_name(&raw, &format!("{sa_name}\0{key_id}"))
    }
}

/// `raw` made a DNS-1123 subdomain, shortened to leave room for a hash of
/// `identity`, which is appended.
fn hashed_name(raw: &str, identity: &str) -> String {
    let prefix = sanitise(raw, MAX_NAME_LEN - HASH_LEN - 1);
    let hash = short_hash(identity);
    if prefix.is_empty() {
        hash
    } else {
        format!("{prefix}-{hash}")
    }
}

/// Lowercase; anything but `[a-z0-9.-]` becomes `-`; at most `max` long;
/// starting and ending with an alphanumeric character.
fn sanitise(raw: &str, max: usize) -> String {
    let mapped: String = raw
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' })
        .take(max)
        .collect();
    mapped.trim_matches(|c: char| !c.is_ascii_alphanumeric()).to_owned()
}

/// A label value standing for `value`: itself if valid, else a sanitised,
/// hashed form (the exact value lives in an annotation).
fn label_value(value: &str) -> String {
    let valid = value.len() <= MAX_LABEL_VALUE_LEN
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        return value.to_owned();
    }
    let prefix: String = value
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .take(MAX_LABEL_VALUE_LEN - HASH_LEN - 1)
        .collect();
    let prefix = prefix.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if prefix.is_empty() {
        short_hash(value)
    } else {
        format!("{prefix}-{}", short_hash(value))
    }
}

/// The first [`HASH_LEN`] hex digits of the 64-bit FNV-1a hash: stable across
/// Rust releases and platforms, unlike `DefaultHasher`.
fn short_hash(input: &str) -> String {
    let hash =
        input.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3));
    let mut hex = format!("{hash:016x}");
    hex.truncate(HASH_LEN);
    hex
}

/// DER certificates as a PEM bundle.
fn der_certs_to_pem(certs: &[Vec<u8>]) -> String {
    let mut pem = String::new();
    for der in certs {
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        let encoded = BASE64.encode(der);
        let mut rest = encoded.as_str();
        while !rest.is_empty() {
            let (line, tail) = rest.split_at(rest.len().min(64));
            pem.push_str(line);
            pem.push('\n');
            rest = tail;
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    pem
}

/// Deletes an object (only the one with `uid`, when known); gone is fine.
async fn delete_ignoring_not_found<K>(api: &Api<K>, name: &str, uid: Option<String>) -> Result<(), ProviderError>
where
    K: kube::Resource + Clone + fmt::Debug + serde::de::DeserializeOwned,
{
    let params = DeleteParams {
        preconditions: uid.map(|uid| Preconditions { uid: Some(uid), resource_version: None }),
        ..DeleteParams::background()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(classify(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_subdomains_with_a_stable_hash() {
        let account = AccountRequest {
            name: "ci".to_owned(),
            namespace: "team".to_owned(),
            account_name: "ci".to_owned(),
            owner_uid: "uid".to_owned(),
            description: None,
            owner: None,
            options: BTreeMap::new(),
        };
        let grant = RoleGrant { role: "system:aggregate-to-view".to_owned(), scope: None };
        let name = binding_name(&account, &grant);
        assert!(name.starts_with("keysmith-ci-system-aggregate-to-view-"), "{name}");
        assert_eq!(name, binding_name(&account, &grant));
        let explicit = RoleGrant { scope: Some("team".to_owned()), ..grant.clone() };
        assert_eq!(name, binding_name(&account, &explicit), "no scope is the ServiceAccount's namespace");
        let elsewhere = AccountRequest { namespace: "other".to_owned(), ..account.clone() };
        assert_ne!(name, binding_name(&elsewhere, &grant));

        let long = RoleGrant { role: "x".repeat(400), scope: None };
        let name = binding_name(&account, &long);
        assert!(name.len() <= MAX_NAME_LEN, "{}", name.len());

        assert_eq!(anchor_name("ci", "k-1"), "ci-key-k-1");
        let odd = anchor_name("ci", "Key_1");
        assert!(odd.starts_with("ci-key-key-1-"), "{odd}");
        assert_ne!(odd, anchor_name("ci", "key-1"));
    }

    #[test]
    fn label_values_stay_valid() {
        assert_eq!(label_value("k-20250101-abc"), "k-20250101-abc");
        let long = label_value(&"a".repeat(100));
        assert!(long.len() <= MAX_LABEL_VALUE_LEN);
        assert!(label_value("::").chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn short_hash_is_fnv1a() {
        // FNV-1a 64 of "" is cbf29ce484222325, of "a" af63dc4c8601ec8c.
        assert_eq!(short_hash(""), "cbf29ce484");
        assert_eq!(short_hash("a"), "af63dc4c86");
    }

    fn subject(kind: &str, name: &str, namespace: Option<&str>) -> Subject {
        Subject {
            kind: kind.to_owned(),
            name: name.to_owned(),
            namespace: namespace.map(str::to_owned),
            ..Subject::default()
        }
    }

    fn test_account(namespace: &str, name: &str) -> AccountRequest {
        AccountRequest {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            account_name: name.to_owned(),
            owner_uid: format!("uid-{:016x}", rand::random::<u64>()),
            description: None,
            owner: None,
            options: BTreeMap::new(),
        }
    }

    #[test]
    fn subjects_are_read_as_the_rbac_authorizer_reads_them() {
        let account = test_account("team", "ci");
        let sa = |ns| subject("ServiceAccount", "ci", ns);
        assert!(is_account_subject(&sa(Some("team")), None, &account));
        assert!(is_account_subject(&sa(Some("team")), Some("elsewhere"), &account));
        // No namespace: the RoleBinding's own; a ClusterRoleBinding has none.
        assert!(is_account_subject(&sa(None), Some("team"), &account));
        assert!(is_account_subject(&sa(Some("")), Some("team"), &account));
        assert!(!is_account_subject(&sa(None), Some("elsewhere"), &account));
        assert!(!is_account_subject(&sa(None), None, &account));
        assert!(!is_account_subject(&sa(Some("other")), Some("team"), &account));
        assert!(!is_account_subject(&subject("ServiceAccount", "cd", Some("team")), None, &account));
        assert!(!is_account_subject(&subject("User", "ci", Some("team")), None, &account));
    }

    #[test]
    fn bindings_read_as_grants() {
        let role_ref = |kind: &str, name: &str| RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: kind.to_owned(),
            name: name.to_owned(),
        };
        let in_namespace = |kind: &str, name: &str| RoleBinding {
            metadata: ObjectMeta {
                name: Some("b".to_owned()),
                namespace: Some("team".to_owned()),
                ..ObjectMeta::default()
            },
            role_ref: role_ref(kind, name),
            subjects: None,
        };
        assert_eq!(
            grant_of(&in_namespace("ClusterRole", "edit")),
            Some(RoleGrant { role: "edit".to_owned(), scope: Some("team".to_owned()) })
        );
        assert_eq!(
            grant_of(&in_namespace("Role", "pod-reader")),
            Some(RoleGrant { role: "Role/pod-reader".to_owned(), scope: Some("team".to_owned()) })
        );
        let cluster = ClusterRoleBinding {
            metadata: ObjectMeta { name: Some("b".to_owned()), ..ObjectMeta::default() },
            role_ref: role_ref("ClusterRole", "view"),
            subjects: None,
        };
        assert_eq!(
            grant_of(&cluster),
            Some(RoleGrant { role: "view".to_owned(), scope: Some(CLUSTER_SCOPE.to_owned()) })
        );
    }

    /// Against the shared local control plane: a binding that changed since
    /// it was read is never edited or deleted, and the caller is told to retry.
    #[tokio::test]
    async fn a_binding_changed_under_us_is_a_conflict() {
        use k8s_openapi::api::core::v1::Namespace;

        let cp = crate::controlplane::shared().await.expect("control plane starts");
        let client = cp.client().await.expect("admin client");
        let ns = format!("kp-unit-race-{:08x}", rand::random::<u32>());
        let namespaces = Api::<Namespace>::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: ObjectMeta { name: Some(ns.clone()), ..ObjectMeta::default() },
                    ..Namespace::default()
                },
            )
            .await
            .expect("create namespace");
        let account = test_account(&ns, "racer");
        let api = Api::<RoleBinding>::namespaced(client.clone(), &ns);
        let binding = |name: &str, subjects: Vec<Subject>| RoleBinding {
            metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".to_owned(),
                kind: "ClusterRole".to_owned(),
                name: "view".to_owned(),
            },
            subjects: Some(subjects),
        };
        let sa = subject("ServiceAccount", "racer", Some(&ns));
        let jane = subject("User", "jane", None);
        let bob = subject("User", "bob", None);
        // The apiserver fills in a User's apiGroup: compare kinds and names.
        let names = |b: &RoleBinding| b.subjects().iter().map(|s| format!("{}/{}", s.kind, s.name)).collect::<Vec<_>>();

        // Shared: someone adds bob between our read and our patch.
        let stale = api
            .create(&PostParams::default(), &binding("shared", vec![sa.clone(), jane.clone()]))
            .await
            .expect("create shared");
        let patch = json!({"subjects": [sa.clone(), jane.clone(), bob.clone()]});
        api.patch("shared", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("add bob");
        let err = release_binding(&api, &stale, &account).await.expect_err("stale");
        assert!(matches!(err, ProviderError::Conflict(_)), "{err:?}");
        let current = api.get("shared").await.expect("still there");
        assert_eq!(names(&current), ["ServiceAccount/racer", "User/jane", "User/bob"]);
        release_binding(&api, &current, &account).await.expect("fresh");
        let released = api.get("shared").await.expect("still there");
        assert_eq!(names(&released), ["User/jane", "User/bob"]);

        // Ours alone: someone adds bob between our read and our delete.
        let stale =
            api.create(&PostParams::default(), &binding("alone", vec![sa.clone()])).await.expect("create alone");
        let patch = json!({"subjects": [sa.clone(), bob.clone()]});
        api.patch("alone", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("add bob");
        let err = release_binding(&api, &stale, &account).await.expect_err("stale");
        assert!(matches!(err, ProviderError::Conflict(_)), "{err:?}");
        let current = api.get("alone").await.expect("not deleted");
        assert_eq!(names(&current), ["ServiceAccount/racer", "User/bob"]);

        // Gone is fine.
        api.delete("alone", &DeleteParams::default()).await.expect("delete");
        release_binding(&api, &current, &account).await.expect("gone is fine");

        let _ = namespaces.delete(&ns, &DeleteParams::background()).await;
    }

    #[test]
    fn der_is_wrapped_at_64_columns() {
        let pem = der_certs_to_pem(&[vec![0u8; 100]]);
        let body: Vec<&str> = pem.lines().collect();
        assert_eq!(body.first(), Some(&"-----BEGIN CERTIFICATE-----"));
        assert_eq!(body.last(), Some(&"-----END CERTIFICATE-----"));
        assert!(body.iter().all(|l| l.len() <= 64));
    }
}
