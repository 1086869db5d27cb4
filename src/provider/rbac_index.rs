//! A watch-fed index of the RBAC bindings that can give a ServiceAccount a
//! role, for the `kubernetes` provider.
//!
//! The roles an account holds are every binding that names its
//! ServiceAccount, whoever made it; hand-made bindings carry no label to
//! select them by. Listing every RoleBinding and ClusterRoleBinding in the
//! cluster for each account costs O(accounts × bindings) per resync. One
//! watch per kind instead keeps, for each binding that names a
//! ServiceAccount or carries keysmith's account label, only what the
//! provider needs: the ServiceAccounts it names, its owner label and the
//! grant it stands for (a few hundred bytes per binding, never the objects).
//! Reading an account's roles then costs no request at all.
//!
//! keysmith's own writes are applied to the index as soon as the apiserver
//! accepts them, so a reconcile that grants or revokes reads its own change;
//! everyone else's arrive with the watch (milliseconds). The watches start
//! with the first read and stop when the provider is dropped.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding, RoleRef, Subject};
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client, Resource, ResourceExt,
};
use tokio::{sync::watch, task::AbortHandle};

use super::{
    kubernetes::{ACCOUNT_UID_LABEL, CLUSTER_SCOPE, NAMESPACED_ROLE_PREFIX},
    ProviderError, RoleGrant,
};

/// How long a read waits for the first full list before giving up (transient).
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Page size of the initial lists, so memory stays bounded in large clusters.
const PAGE_SIZE: u32 = 500;

/// Which kind a binding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BindingKind {
    /// A namespaced RoleBinding.
    RoleBinding,
    /// A ClusterRoleBinding.
    ClusterRoleBinding,
}

/// A binding's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BindingKey {
    /// Its kind.
    pub kind: BindingKind,
    /// Its namespace (`None` for a ClusterRoleBinding).
    pub namespace: Option<String>,
    /// Its name.
    pub name: String,
}

/// What the index keeps of one binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedBinding {
    /// The value of keysmith's account-uid label, if any.
    pub owner_uid: Option<String>,
    /// `(namespace, name)` of every ServiceAccount subject, the namespace
    /// defaulted to the binding's own.
    pub service_accounts: Vec<(String, String)>,
    /// The grant it stands for (`None` for a RoleBinding without a namespace).
    pub grant: Option<RoleGrant>,
}

/// A binding as the index reads it.
pub trait IndexedKind: Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static {
    /// Its kind.
    const INDEX_KIND: BindingKind;
    /// Its subjects.
    fn indexed_subjects(&self) -> &[Subject];
    /// Its roleRef.
    fn indexed_role_ref(&self) -> &RoleRef;
}

impl IndexedKind for RoleBinding {
    const INDEX_KIND: BindingKind = BindingKind::RoleBinding;
    fn indexed_subjects(&self) -> &[Subject] {
        self.subjects.as_deref().unwrap_or_default()
    }
    fn indexed_role_ref(&self) -> &RoleRef {
        &self.role_ref
    }
}

impl IndexedKind for ClusterRoleBinding {
    const INDEX_KIND: BindingKind = BindingKind::ClusterRoleBinding;
    fn indexed_subjects(&self) -> &[Subject] {
        self.subjects.as_deref().unwrap_or_default()
    }
    fn indexed_role_ref(&self) -> &RoleRef {
        &self.role_ref
    }
}

/// The key and entry for a binding, or just the key when it can give no
/// ServiceAccount a role and carries no keysmith label (not kept).
pub fn index_entry<B: IndexedKind>(binding: &B) -> (BindingKey, Option<IndexedBinding>) {
    let namespace = binding.namespace();
    let key = BindingKey { kind: B::INDEX_KIND, namespace: namespace.clone(), name: binding.name_any() };
    let service_accounts: Vec<(String, String)> = binding
        .indexed_subjects()
        .iter()
        .filter(|s| s.kind == "ServiceAccount")
        .filter_map(|s| {
            let ns = s.namespace.clone().filter(|ns| !ns.is_empty()).or_else(|| namespace.clone())?;
            Some((ns, s.name.clone()))
        })
        .collect();
    let owner_uid = binding.labels().get(ACCOUNT_UID_LABEL).cloned();
    if service_accounts.is_empty() && owner_uid.is_none() {
        return (key, None);
    }
    let scope = match B::INDEX_KIND {
        BindingKind::RoleBinding => namespace,
        BindingKind::ClusterRoleBinding => Some(CLUSTER_SCOPE.to_owned()),
    };
    let grant = grant(scope, binding.indexed_role_ref());
    (key, Some(IndexedBinding { owner_uid, service_accounts, grant }))
}

/// The grant a binding to `role_ref` stands for where it takes effect
/// (`scope`: its namespace, or `*`). A namespaced Role reads as `Role/<name>`.
pub fn grant(scope: Option<String>, role_ref: &RoleRef) -> Option<RoleGrant> {
    let role = if role_ref.kind == "Role" {
        format!("{NAMESPACED_ROLE_PREFIX}{}", role_ref.name)
    } else {
        role_ref.name.clone()
    };
    scope.map(|scope| RoleGrant { role, scope: Some(scope) })
}

/// Whether the index has listed everything once, and the last watch error.
#[derive(Debug, Clone, Default)]
struct SyncState {
    role_bindings: bool,
    cluster_role_bindings: bool,
    error: Option<ProviderError>,
}

impl SyncState {
    fn done(&self) -> bool {
        self.role_bindings && self.cluster_role_bindings
    }
}

/// The index. Cheap to share: the provider holds it in an `Arc`.
pub struct RbacIndex {
    entries: Arc<RwLock<HashMap<BindingKey, IndexedBinding>>>,
    sync: watch::Sender<SyncState>,
    tasks: Mutex<Option<Vec<AbortHandle>>>,
}

impl std::fmt::Debug for RbacIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbacIndex").field("bindings", &self.len()).field("synced", &self.sync.borrow().done()).finish()
    }
}

impl Default for RbacIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RbacIndex {
    fn drop(&mut self) {
        if let Some(tasks) = self.tasks.lock().unwrap_or_else(PoisonError::into_inner).take() {
            for task in tasks {
                task.abort();
            }
        }
    }
}

impl RbacIndex {
    /// An empty index. Nothing runs until it is first read.
    pub fn new() -> Self {
        Self { entries: Arc::default(), sync: watch::Sender::new(SyncState::default()), tasks: Mutex::new(None) }
    }

    /// How many bindings the index holds.
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether the index holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts the two watches, once.
    fn start(&self, client: &Client) {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        if tasks.is_some() {
            return;
        }
        let role_bindings =
            tokio::spawn(run_watch::<RoleBinding>(Api::all(client.clone()), self.entries.clone(), self.sync.clone()));
        let cluster_role_bindings = tokio::spawn(run_watch::<ClusterRoleBinding>(
            Api::all(client.clone()),
            self.entries.clone(),
            self.sync.clone(),
        ));
        *tasks = Some(vec![role_bindings.abort_handle(), cluster_role_bindings.abort_handle()]);
    }

    /// Waits until both kinds have been listed once. A refused credential
    /// fails at once; anything else is retried by the watch until
    /// [`SYNC_TIMEOUT`], then reported as transient.
    async fn synced(&self, client: &Client) -> Result<(), ProviderError> {
        self.start(client);
        let mut rx = self.sync.subscribe();
        let waited = tokio::time::timeout(SYNC_TIMEOUT, async {
            loop {
                {
                    let state = rx.borrow_and_update();
                    if state.done() {
                        return Ok(());
                    }
                    if let Some(error @ (ProviderError::Unauthorized(_) | ProviderError::Invalid(_))) = &state.error {
                        return Err(error.clone());
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(ProviderError::Transient {
                        message: "the RBAC binding watch stopped".to_owned(),
                        retry_after: None,
                    });
                }
            }
        })
        .await;
        match waited {
            Ok(result) => result,
            Err(_) => {
                let cause = self.sync.borrow().error.as_ref().map(|e| format!(": {e}")).unwrap_or_default();
                Err(ProviderError::Transient {
                    message: format!(
                        "RoleBindings and ClusterRoleBindings could not be listed within {}s{cause}",
                        SYNC_TIMEOUT.as_secs()
                    ),
                    retry_after: None,
                })
            }
        }
    }

    /// Every binding `matches` accepts, once the index is synced.
    pub async fn bindings_where(
        &self,
        client: &Client,
        matches: impl Fn(&IndexedBinding) -> bool,
    ) -> Result<Vec<(BindingKey, IndexedBinding)>, ProviderError> {
        self.synced(client).await?;
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        let mut found: Vec<(BindingKey, IndexedBinding)> =
            entries.iter().filter(|(_, b)| matches(b)).map(|(k, b)| (k.clone(), b.clone())).collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }

    /// The grants held through bindings keysmith made for `owner_uid` or
    /// that name the ServiceAccount `namespace/name`.
    pub async fn grants_for(
        &self,
        client: &Client,
        owner_uid: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Vec<RoleGrant>, ProviderError> {
        let held = self
            .bindings_where(client, |b| {
                b.owner_uid.as_deref() == Some(owner_uid)
                    || b.service_accounts.iter().any(|(ns, n)| ns == namespace && n == name)
            })
            .await?;
        let mut grants: Vec<RoleGrant> = held.into_iter().filter_map(|(_, b)| b.grant).collect();
        grants.sort();
        grants.dedup();
        Ok(grants)
    }

    /// Records a binding the apiserver just accepted (created or changed by
    /// keysmith), ahead of its watch event.
    pub fn applied<B: IndexedKind>(&self, binding: &B) {
        let (key, entry) = index_entry(binding);
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        match entry {
            Some(entry) => entries.insert(key, entry),
            None => entries.remove(&key),
        };
    }

    /// Forgets a binding keysmith just deleted, ahead of its watch event.
    pub fn deleted(&self, key: &BindingKey) {
        self.entries.write().unwrap_or_else(PoisonError::into_inner).remove(key);
    }
}

/// Feeds one kind's watch into the index until aborted. The watcher
/// re-lists (paged) after a desync and backs off on errors.
async fn run_watch<B>(
    api: Api<B>,
    entries: Arc<RwLock<HashMap<BindingKey, IndexedBinding>>>,
    sync: watch::Sender<SyncState>,
) where
    B: IndexedKind + serde::de::DeserializeOwned,
{
    let config = watcher::Config::default().page_size(PAGE_SIZE);
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut relisted: BTreeMap<BindingKey, IndexedBinding> = BTreeMap::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => relisted.clear(),
            Ok(watcher::Event::InitApply(binding)) => {
                if let (key, Some(entry)) = index_entry(&binding) {
                    relisted.insert(key, entry);
                }
            }
            Ok(watcher::Event::InitDone) => {
                {
                    let mut entries = entries.write().unwrap_or_else(PoisonError::into_inner);
                    entries.retain(|k, _| k.kind != B::INDEX_KIND);
                    entries.extend(std::mem::take(&mut relisted));
                }
                sync.send_modify(|s| {
                    match B::INDEX_KIND {
                        BindingKind::RoleBinding => s.role_bindings = true,
                        BindingKind::ClusterRoleBinding => s.cluster_role_bindings = true,
                    }
                    s.error = None;
                });
            }
            Ok(watcher::Event::Apply(binding)) => {
                let (key, entry) = index_entry(&binding);
                let mut entries = entries.write().unwrap_or_else(PoisonError::into_inner);
                match entry {
                    Some(entry) => entries.insert(key, entry),
                    None => entries.remove(&key),
                };
            }
            Ok(watcher::Event::Delete(binding)) => {
                let (key, _) = index_entry(&binding);
                entries.write().unwrap_or_else(PoisonError::into_inner).remove(&key);
            }
            Err(error) => {
                let error = classify_watch_error(&error);
                tracing::debug!(kind = ?B::INDEX_KIND, %error, "RBAC binding watch failed; retrying");
                sync.send_modify(|s| s.error = Some(error));
            }
        }
    }
}

fn classify_watch_error(error: &watcher::Error) -> ProviderError {
    let status = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status))
        | watcher::Error::WatchError(status) => Some(status),
        _ => None,
    };
    match status {
        Some(status) => super::kubernetes::classify(kube::Error::Api(status.clone())),
        None => ProviderError::Transient { message: error.to_string(), retry_after: None },
    }
}
