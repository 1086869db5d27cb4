//! What every reconcile shares: the caches, the clients, the provider
//! registry, the event recorder and the per-object memory (backoff, what was
//! last written and acted on).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::Secret;
use kube::{
    core::PartialObjectMeta,
    runtime::{
        controller::Action,
        events::{Event as KubeEvent, EventType, Recorder},
        reflector::{ObjectRef, Store},
    },
    Client, Resource, ResourceExt,
};

use super::error::{backoff, retry_delay, Error};
use crate::{
    api::{AppConnection, ClusterAppConnection, IntegrationAccount, KeyRotationPolicy, RoleBinding},
    metrics::Metrics,
    provider::ProviderRegistry,
};

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

/// The apiserver refuses an event whose note is longer than this (bytes).
pub const EVENT_NOTE_LIMIT: usize = 1024;

/// `note` cut to [`EVENT_NOTE_LIMIT`] on a character boundary, ending in
/// `...` when cut: a longer one would be refused, and the event lost.
pub fn fit_note(note: String) -> String {
    if note.len() <= EVENT_NOTE_LIMIT {
        return note;
    }
    let mut end = EVENT_NOTE_LIMIT - 3;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
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
    pub failpoints: crate::failpoints::Failpoints,
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
    /// Keys issued but not yet published, by account: kept (in memory
    /// only, never in status or logs) until they are published or replaced,
    /// so a failure after issuing never leads to issuing again.
    held: Mutex<HashMap<String, Held>>,
    /// How often an unchanged account is checked for drift.
    pub drift_check_interval: Duration,
}

/// A key issued for an account that could not be published yet.
#[derive(Debug, Clone)]
pub struct Held {
    /// The key, with its material.
    pub key: crate::provider::IssuedKey,
    /// The id of the record made when it was issued.
    pub record: String,
    /// The spec cannot publish it (a rename of a data key the provider does
    /// not write): the generation that said so, and why. It waits for
    /// another generation.
    pub unpublishable: Option<(Option<i64>, String)>,
    /// Why it was issued.
    pub reason: super::plan::RotationReason,
    /// Whether the key it replaces is revoked as soon as it is published.
    pub revoke_previous_at_once: bool,
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
    /// A context with no per-object memory yet. `drift_check_interval` is
    /// at least a second.
    pub fn new(
        client: Client,
        providers: ProviderRegistry,
        recorder: Recorder,
        stores: Stores,
        metrics: Arc<Metrics>,
        drift_check_interval: Duration,
    ) -> Self {
        Self {
            client,
            providers,
            recorder,
            stores,
            failpoints: crate::failpoints::Failpoints::from_env(),
            metrics,
            failures: Mutex::new(HashMap::new()),
            written: Mutex::new(HashMap::new()),
            converged: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            drift_check_interval: drift_check_interval.max(Duration::from_secs(1)),
        }
    }

    /// Keeps `held` for the account `key` until it is published.
    pub fn hold(&self, key: &str, held: Held) {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key.to_owned(), held);
    }

    /// The key held for the account `key`, if any.
    pub fn held(&self, key: &str) -> Option<Held> {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(key).cloned()
    }

    /// Forgets the key held for the account `key` (published, or replaced).
    pub fn release(&self, key: &str) {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(key);
    }

    /// Publishes an event about `obj`; a failure to publish is logged, not fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let note = Some(fit_note(note));
        let event = KubeEvent { type_, reason: reason.into(), note, action: action.into(), secondary: None };
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

/// The error policy every controller uses: honour the target's Retry-After,
/// else back off per object with jitter.
pub fn error_policy<K: Resource<DynamicType = ()>>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = ObjectRef::from_obj(obj.as_ref()).to_string();
    let delay = retry_delay(error, || ctx.next_backoff(&key));
    ctx.metrics.reconcile_failed(&K::kind(&()), error.category());
    tracing::warn!(object = %key, category = error.category(), %error, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

/// Records a successful reconcile (resets the object's backoff).
pub fn succeeded<K: Resource<DynamicType = ()>>(obj: &K, ctx: &Context) {
    ctx.reset_failures(&ObjectRef::from_obj(obj).to_string());
}

/// The namespace and name of a namespaced object, for messages.
pub fn key_of<K: Resource>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_notes_fit_what_the_apiserver_accepts() {
        assert_eq!(fit_note("short".into()), "short");
        let exact = "x".repeat(EVENT_NOTE_LIMIT);
        assert_eq!(fit_note(exact.clone()), exact);
        let long = "é".repeat(EVENT_NOTE_LIMIT);
        let fitted = fit_note(long);
        assert!(fitted.len() <= EVENT_NOTE_LIMIT, "{}", fitted.len());
        assert!(fitted.ends_with("..."));
    }
}
