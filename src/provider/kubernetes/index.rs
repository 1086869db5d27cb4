//! Watch-fed indexes for the `kubernetes` provider: what it needs to know of
//! RBAC bindings and key anchor Secrets, without a request per account.
//!
//! The roles an account holds are every binding that names its
//! ServiceAccount, whoever made it; hand-made bindings carry no label to
//! select them by. Its keys are its anchor Secrets, found by label in its
//! namespace, which the apiserver answers by reading every Secret of that
//! namespace from etcd. Per account and per reconcile, both cost
//! O(accounts × objects): at 5,000 accounts in one namespace a label-selected
//! list of anchors took 1.4 s of apiserver time, and drift checks alone kept
//! the apiserver busy. One watch per kind instead keeps, for each binding
//! that names a ServiceAccount or carries keysmith's account label, and for
//! each anchor (metadata only), what the provider needs (a few hundred bytes
//! each, never the objects). Reading an account's roles or keys then costs
//! no request at all.
//!
//! keysmith's own writes are applied to the index as soon as the apiserver
//! accepts them, so a reconcile reads its own change; everyone else's arrive
//! with the watch (milliseconds). The first list of each watch is a
//! consistent read, so what an earlier process created is seen. The watches
//! start with the first read and stop when the provider is dropped.

use crate::ownership;
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::Secret,
    rbac::v1::{ClusterRoleBinding, RoleBinding, RoleRef, Subject},
};
use kube::{
    core::PartialObjectMeta,
    runtime::{watcher, WatchStreamExt},
    Api, Client, Resource, ResourceExt,
};
use tokio::{sync::watch, task::AbortHandle};

use crate::{
    provider::{http::classify_kube_error, ObservedKey, ProviderError, RoleGrant},
    tenancy::CLUSTER_SCOPE,
};

/// The `type` of key anchor Secrets.
pub const KEY_ANCHOR_TYPE: &str = "keysmith.dev/key-anchor";
/// How a grant names a namespaced Role (`Role/<name>`), as opposed to a
/// ClusterRole. keysmith only reports and revokes these: it never grants them.
pub const NAMESPACED_ROLE_PREFIX: &str = "Role/";

/// How long a read waits for the first full list before giving up (transient).
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Page size of the initial lists, so memory stays bounded in large clusters.
const PAGE_SIZE: u32 = 500;

/// An object's identity in an index: its kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IndexKey {
    /// `RoleBinding`, `ClusterRoleBinding` or `Secret`.
    pub kind: &'static str,
    /// Its namespace (`None` when cluster-scoped).
    pub namespace: Option<String>,
    /// Its name.
    pub name: String,
}

/// How an object enters an index: its key, and its entry if it belongs.
pub trait Indexed<E>: Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static {
    /// The kind, as in [`IndexKey::kind`].
    const KIND: &'static str;
    /// The key, and what the index keeps of the object (`None`: nothing).
    fn index_entry(&self) -> (IndexKey, Option<E>) {
        let key = IndexKey { kind: Self::KIND, namespace: self.namespace(), name: self.name_any() };
        (key, self.entry())
    }
    /// What the index keeps of the object, or `None` when it is not for it.
    fn entry(&self) -> Option<E>;
}

/// Whether each kind has been listed once, and the last watch error.
#[derive(Debug, Clone, Default)]
struct SyncState {
    listed: BTreeMap<&'static str, bool>,
    error: Option<ProviderError>,
}

impl SyncState {
    fn done(&self) -> bool {
        !self.listed.is_empty() && self.listed.values().all(|l| *l)
    }
}

type Entries<E> = Arc<RwLock<HashMap<IndexKey, E>>>;

/// A watch-fed map from object to entry. Cheap to share in an `Arc`.
pub struct WatchIndex<E> {
    entries: Entries<E>,
    sync: watch::Sender<SyncState>,
    tasks: Mutex<Option<Vec<AbortHandle>>>,
    what: &'static str,
}

impl<E> std::fmt::Debug for WatchIndex<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchIndex")
            .field("what", &self.what)
            .field("entries", &self.entries.read().unwrap_or_else(PoisonError::into_inner).len())
            .field("synced", &self.sync.borrow().done())
            .finish()
    }
}

impl<E> Drop for WatchIndex<E> {
    fn drop(&mut self) {
        if let Some(tasks) = self.tasks.lock().unwrap_or_else(PoisonError::into_inner).take() {
            for task in tasks {
                task.abort();
            }
        }
    }
}

impl<E: Clone + Send + Sync + 'static> WatchIndex<E> {
    /// An empty index; `what` names its contents in errors.
    pub fn new(what: &'static str) -> Self {
        Self { entries: Arc::default(), sync: watch::Sender::new(SyncState::default()), tasks: Mutex::new(None), what }
    }

    /// How many objects the index holds.
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether the index holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts the watches `start` spawns, once. Each gets the entries, the
    /// sync state (with its kind registered as not yet listed) and returns
    /// its task.
    fn start_once(&self, start: impl FnOnce(&Entries<E>, &watch::Sender<SyncState>) -> Vec<AbortHandle>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        if tasks.is_none() {
            *tasks = Some(start(&self.entries, &self.sync));
        }
    }

    /// Waits until every kind has been listed once. A refused credential
    /// fails at once; anything else is retried by the watch until
    /// [`SYNC_TIMEOUT`], then reported as transient.
    async fn synced(&self) -> Result<(), ProviderError> {
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
                        message: format!("the {} watch stopped", self.what),
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
                    message: format!("the {} could not be listed within {}s{cause}", self.what, SYNC_TIMEOUT.as_secs()),
                    retry_after: None,
                })
            }
        }
    }

    /// Every entry `matches` accepts, sorted by key, once the index is synced.
    async fn entries_where(&self, matches: impl Fn(&E) -> bool) -> Result<Vec<(IndexKey, E)>, ProviderError> {
        self.synced().await?;
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        let mut found: Vec<(IndexKey, E)> =
            entries.iter().filter(|(_, e)| matches(e)).map(|(k, e)| (k.clone(), e.clone())).collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }

    /// Records an object the apiserver just accepted from keysmith (created
    /// or changed), ahead of its watch event.
    pub fn applied<K: Indexed<E>>(&self, object: &K) {
        let (key, entry) = object.index_entry();
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        match entry {
            Some(entry) => entries.insert(key, entry),
            None => entries.remove(&key),
        };
    }

    /// Forgets an object keysmith just deleted, ahead of its watch event.
    pub fn deleted<K: Indexed<E>>(&self, object: &K) {
        let (key, _) = object.index_entry();
        self.entries.write().unwrap_or_else(PoisonError::into_inner).remove(&key);
    }
}

/// Feeds one kind's watch events into `entries` until aborted. The watcher
/// re-lists (paged) after a desync and backs off on errors.
fn spawn_watch<K, E, S>(stream: S, entries: &Entries<E>, sync: &watch::Sender<SyncState>) -> AbortHandle
where
    K: Indexed<E>,
    E: Send + Sync + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    sync.send_modify(|s| {
        s.listed.insert(K::KIND, false);
    });
    let (entries, sync) = (entries.clone(), sync.clone());
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut relisted: HashMap<IndexKey, E> = HashMap::new();
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => relisted.clear(),
                Ok(watcher::Event::InitApply(object)) => {
                    if let (key, Some(entry)) = object.index_entry() {
                        relisted.insert(key, entry);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    {
                        let mut entries = entries.write().unwrap_or_else(PoisonError::into_inner);
                        entries.retain(|k, _| k.kind != K::KIND);
                        entries.extend(std::mem::take(&mut relisted));
                    }
                    sync.send_modify(|s| {
                        s.listed.insert(K::KIND, true);
                        s.error = None;
                    });
                }
                Ok(watcher::Event::Apply(object)) => {
                    let (key, entry) = object.index_entry();
                    let mut entries = entries.write().unwrap_or_else(PoisonError::into_inner);
                    match entry {
                        Some(entry) => entries.insert(key, entry),
                        None => entries.remove(&key),
                    };
                }
                Ok(watcher::Event::Delete(object)) => {
                    let (key, _) = object.index_entry();
                    entries.write().unwrap_or_else(PoisonError::into_inner).remove(&key);
                }
                Err(error) => {
                    let error = classify_watch_error(&error);
                    tracing::debug!(kind = K::KIND, %error, "watch failed; retrying");
                    sync.send_modify(|s| s.error = Some(error));
                }
            }
        }
    });
    task.abort_handle()
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
        Some(status) => classify_kube_error(kube::Error::Api(status.clone())),
        None => ProviderError::Transient { message: error.to_string(), retry_after: None },
    }
}

// --- RBAC bindings -------------------------------------------------------

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

/// A binding's entry: kept when it names a ServiceAccount or carries
/// keysmith's account label.
fn binding_entry(
    namespace: Option<String>,
    scope: Option<String>,
    subjects: &[Subject],
    role_ref: &RoleRef,
    labels: &BTreeMap<String, String>,
) -> Option<IndexedBinding> {
    let service_accounts: Vec<(String, String)> = subjects
        .iter()
        .filter(|s| s.kind == "ServiceAccount")
        .filter_map(|s| {
            let ns = s.namespace.clone().filter(|ns| !ns.is_empty()).or_else(|| namespace.clone())?;
            Some((ns, s.name.clone()))
        })
        .collect();
    let owner_uid = labels.get(ownership::ACCOUNT_UID).cloned();
    if service_accounts.is_empty() && owner_uid.is_none() {
        return None;
    }
    Some(IndexedBinding { owner_uid, service_accounts, grant: grant(scope, role_ref) })
}

impl Indexed<IndexedBinding> for RoleBinding {
    const KIND: &'static str = "RoleBinding";
    fn entry(&self) -> Option<IndexedBinding> {
        let subjects = self.subjects.as_deref().unwrap_or_default();
        binding_entry(self.namespace(), self.namespace(), subjects, &self.role_ref, self.labels())
    }
}

impl Indexed<IndexedBinding> for ClusterRoleBinding {
    const KIND: &'static str = "ClusterRoleBinding";
    fn entry(&self) -> Option<IndexedBinding> {
        let subjects = self.subjects.as_deref().unwrap_or_default();
        binding_entry(None, Some(CLUSTER_SCOPE.to_owned()), subjects, &self.role_ref, self.labels())
    }
}

/// The RBAC bindings that can give a ServiceAccount a role.
pub type RbacIndex = WatchIndex<IndexedBinding>;

impl RbacIndex {
    /// Starts the binding watches, once.
    fn start(&self, client: &Client) {
        self.start_once(|entries, sync| {
            let config = watcher::Config::default().page_size(PAGE_SIZE);
            let role_bindings = watcher(Api::<RoleBinding>::all(client.clone()), config.clone()).default_backoff();
            let cluster_bindings = watcher(Api::<ClusterRoleBinding>::all(client.clone()), config).default_backoff();
            vec![spawn_watch(role_bindings, entries, sync), spawn_watch(cluster_bindings, entries, sync)]
        });
    }

    /// The grants held through bindings that name the ServiceAccount
    /// `namespace/name`, whoever made them. A binding carrying keysmith's
    /// label for the account but not naming its ServiceAccount grants it
    /// nothing, and labels can be forged by whoever may write a binding:
    /// only subjects count.
    pub async fn grants_for(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
    ) -> Result<Vec<RoleGrant>, ProviderError> {
        self.start(client);
        let held =
            self.entries_where(|b| b.service_accounts.iter().any(|(ns, n)| ns == namespace && n == name)).await?;
        let mut grants: Vec<RoleGrant> = held.into_iter().filter_map(|(_, b)| b.grant).collect();
        grants.sort();
        grants.dedup();
        Ok(grants)
    }

    /// The bindings carrying keysmith's label for `owner_uid`, whatever
    /// they name: what is left to clean up when the account goes.
    pub async fn labelled_for(&self, client: &Client, owner_uid: &str) -> Result<Vec<IndexKey>, ProviderError> {
        self.start(client);
        Ok(self
            .entries_where(|b| b.owner_uid.as_deref() == Some(owner_uid))
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }
}

// --- Key anchors ---------------------------------------------------------

/// What the index keeps of one key anchor Secret (from its metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedAnchor {
    /// The owning account's uid (its account-uid label).
    pub owner_uid: String,
    /// The key id (its annotation, or its label).
    pub key_id: String,
    /// When the anchor, hence the key, was created.
    pub created_at: Option<jiff::Timestamp>,
    /// The anchor's uid: what its token is bound to, and the precondition
    /// that deletes exactly this anchor.
    pub uid: Option<String>,
}

fn anchor_entry(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<IndexedAnchor> {
    let owner_uid = meta.labels.as_ref()?.get(ownership::ACCOUNT_UID)?.clone();
    let key_id = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ownership::KEY_ID))
        .or_else(|| meta.labels.as_ref().and_then(|l| l.get(ownership::KEY_ID)))?
        .clone();
    Some(IndexedAnchor {
        owner_uid,
        key_id,
        created_at: meta.creation_timestamp.as_ref().map(|t| t.0),
        uid: meta.uid.clone(),
    })
}

impl Indexed<IndexedAnchor> for PartialObjectMeta<Secret> {
    const KIND: &'static str = "Secret";
    fn entry(&self) -> Option<IndexedAnchor> {
        anchor_entry(&self.metadata)
    }
}

impl Indexed<IndexedAnchor> for Secret {
    const KIND: &'static str = "Secret";
    fn entry(&self) -> Option<IndexedAnchor> {
        (self.type_.as_deref() == Some(KEY_ANCHOR_TYPE)).then(|| anchor_entry(&self.metadata)).flatten()
    }
}

/// The key anchor Secrets keysmith made, by their metadata.
pub type AnchorIndex = WatchIndex<IndexedAnchor>;

impl AnchorIndex {
    /// Starts the anchor watch, once: keysmith's label, a key id, and the
    /// anchor type; metadata only.
    fn start(&self, client: &Client) {
        self.start_once(|entries, sync| {
            let config = watcher::Config::default()
                .page_size(PAGE_SIZE)
                .labels(&format!("{}={},{}", ownership::MANAGED_BY_KEY, ownership::MANAGED_BY, ownership::KEY_ID))
                .fields(&format!("type={KEY_ANCHOR_TYPE}"));
            let anchors = watcher(Api::<PartialObjectMeta<Secret>>::all(client.clone()), config).default_backoff();
            vec![spawn_watch(anchors, entries, sync)]
        });
    }

    /// The anchors of the account `owner_uid` in `namespace`, sorted by name.
    async fn anchors(
        &self,
        client: &Client,
        owner_uid: &str,
        namespace: &str,
    ) -> Result<Vec<(IndexKey, IndexedAnchor)>, ProviderError> {
        self.start(client);
        let found = self.entries_where(|a| a.owner_uid == owner_uid).await?;
        Ok(found.into_iter().filter(|(k, _)| k.namespace.as_deref() == Some(namespace)).collect())
    }

    /// The keys of the account `owner_uid` whose anchors live in `namespace`,
    /// oldest first.
    pub async fn keys_for(
        &self,
        client: &Client,
        owner_uid: &str,
        namespace: &str,
    ) -> Result<Vec<ObservedKey>, ProviderError> {
        let mut keys: Vec<ObservedKey> = self
            .anchors(client, owner_uid, namespace)
            .await?
            .into_iter()
            .map(|(_, a)| ObservedKey { last_used: None, id: a.key_id, created_at: a.created_at })
            .collect();
        keys.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
        Ok(keys)
    }

    /// The anchor Secret `namespace/name`, if the index holds it (it holds
    /// only Secrets of the anchor type carrying keysmith's labels).
    pub async fn anchor(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
    ) -> Result<Option<IndexedAnchor>, ProviderError> {
        self.start(client);
        self.synced().await?;
        let key = IndexKey { kind: "Secret", namespace: Some(namespace.to_owned()), name: name.to_owned() };
        Ok(self.entries.read().unwrap_or_else(PoisonError::into_inner).get(&key).cloned())
    }

    /// Forgets the anchor `namespace/name`, which keysmith just deleted.
    pub fn forget(&self, namespace: &str, name: &str) {
        let key = IndexKey { kind: "Secret", namespace: Some(namespace.to_owned()), name: name.to_owned() };
        self.entries.write().unwrap_or_else(PoisonError::into_inner).remove(&key);
    }

    /// The anchors of `owner_uid` in `namespace`: name and entry.
    pub async fn anchors_with_entries(
        &self,
        client: &Client,
        owner_uid: &str,
        namespace: &str,
    ) -> Result<Vec<(String, IndexedAnchor)>, ProviderError> {
        Ok(self.anchors(client, owner_uid, namespace).await?.into_iter().map(|(k, a)| (k.name, a)).collect())
    }
}
