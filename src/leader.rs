//! Leader election on a `coordination.k8s.io/v1` Lease, so that replicas can
//! run side by side while only one acts on target apps.
//!
//! The algorithm is client-go's: every candidate reads the Lease each retry
//! period; it takes the Lease when it is free (no holder, or released) or
//! when the holder has not renewed it for `leaseDurationSeconds` — measured
//! on the candidate's own monotonic clock from the moment it last saw the
//! Lease change, so clock skew between nodes does not matter. Every write
//! carries the resourceVersion that was read (optimistic concurrency): of
//! two candidates racing for the same Lease, the apiserver accepts one and
//! answers 409 to the other.
//!
//! The leader renews every retry period. If it cannot renew for the renew
//! deadline (shorter than the lease duration, so it stops before anyone else
//! may start), or finds another holder, leadership is lost and the process
//! must stop acting at once. On a graceful shutdown the leader releases the
//! Lease (empty holder, 1 s duration) so a follower takes over immediately.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use jiff::Timestamp;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{api::PostParams, Api, Client, ResourceExt};
use tokio::{sync::oneshot, task::JoinHandle};

use crate::{metrics::Metrics, server::Health};

/// The Lease's name.
pub const LEASE_NAME: &str = "keysmith-leader";

/// Timing and identity of one candidate.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// The Lease's name ([`LEASE_NAME`]).
    pub name: String,
    /// The Lease's namespace.
    pub namespace: String,
    /// This candidate's identity, written as the Lease's holder.
    pub identity: String,
    /// How long followers wait after the last renewal before taking over.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up leading.
    pub renew_deadline: Duration,
    /// How often candidates try to acquire, and the leader renews.
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// Settings with client-go's defaults: 15 s lease, 10 s renew deadline,
    /// 2 s retry period.
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            name: LEASE_NAME.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// The leader must give up before a follower may take over, and must
    /// get more than one try at renewing.
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_duration <= self.renew_deadline {
            return Err("the lease duration must be longer than the renew deadline".into());
        }
        if self.renew_deadline <= self.retry_period {
            return Err("the renew deadline must be longer than the retry period".into());
        }
        if self.retry_period.is_zero() || self.lease_duration.as_secs() < 1 {
            return Err("the retry period must be positive and the lease duration at least 1s".into());
        }
        if self.identity.is_empty() {
            return Err("the identity must not be empty".into());
        }
        Ok(())
    }
}

/// This process's identity: POD_NAME, else the host name with a random
/// suffix (two processes on one host must differ).
pub fn default_identity() -> String {
    if let Some(pod) = std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()) {
        return pod;
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "keysmith".into());
    format!("{host}_{:08x}", rand::random::<u32>())
}

/// The Lease's namespace: the flag, else POD_NAMESPACE, else `default`.
pub fn default_namespace(flag: Option<String>) -> String {
    flag.filter(|n| !n.is_empty())
        .or_else(|| std::env::var("POD_NAMESPACE").ok().filter(|n| !n.is_empty()))
        .unwrap_or_else(|| "default".into())
}

/// Parses a duration flag (`15s`, `1m`, `500ms`).
pub fn parse_flag_duration(text: &str) -> Result<Duration, String> {
    crate::api::validation::parse_duration("duration", text).map_err(|e| e.message)
}

/// What a candidate may do with a Lease it has just read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It holds the Lease: renew it.
    Renew,
    /// The Lease is free or expired: take it.
    Acquire,
    /// Someone else holds it, for at most this much longer.
    Wait(Duration),
}

/// The pure part of the election. `holder` is the Lease's holderIdentity,
/// `unchanged_for` how long (on this process's clock) since it was last seen
/// to change, `lease_duration` its leaseDurationSeconds.
pub fn verdict(holder: Option<&str>, me: &str, unchanged_for: Duration, lease_duration: Duration) -> Verdict {
    match holder.filter(|h| !h.is_empty()) {
        None => Verdict::Acquire,
        Some(holder) if holder == me => Verdict::Renew,
        Some(_) if unchanged_for >= lease_duration => Verdict::Acquire,
        Some(_) => Verdict::Wait(lease_duration - unchanged_for),
    }
}

/// The Lease as last seen, and when it was first seen in that version.
#[derive(Debug, Clone)]
struct Observed {
    resource_version: String,
    holder: Option<String>,
    since: Instant,
}

/// One candidate for the Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
    observed: Option<Observed>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl LeaderElector {
    /// A candidate; nothing happens until [`LeaderElector::acquire`].
    pub fn new(client: Client, settings: LeaseSettings, metrics: Arc<Metrics>, health: Arc<Health>) -> Self {
        let api = Api::namespaced(client, &settings.namespace);
        Self { api, settings, observed: None, metrics, health }
    }

    /// This candidate's identity.
    pub fn identity(&self) -> &str {
        &self.settings.identity
    }

    fn observe(&mut self, lease: &Lease) {
        let resource_version = lease.resource_version().unwrap_or_default();
        if self.observed.as_ref().is_some_and(|o| o.resource_version == resource_version) {
            return;
        }
        let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty());
        if self.observed.as_ref().map(|o| &o.holder) != Some(&holder) {
            tracing::info!(lease = %self.settings.name, holder = holder.as_deref().unwrap_or(""), "the leader lease changed hands");
        }
        self.observed = Some(Observed { resource_version, holder, since: Instant::now() });
    }

    /// One attempt: `Ok(true)` when this candidate holds the Lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let me = self.settings.identity.clone();
        let duration_seconds = i32::try_from(self.settings.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(duration_seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(true)
                }
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(error),
            };
        };
        self.observe(&lease);
        let spec = lease.spec.clone().unwrap_or_default();
        let their_duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(self.settings.lease_duration);
        let unchanged_for = self.observed.as_ref().map(|o| o.since.elapsed()).unwrap_or_default();
        let holder = spec.holder_identity.as_deref();
        match verdict(holder, &me, unchanged_for, their_duration) {
            Verdict::Wait(_) => return Ok(false),
            Verdict::Renew => {}
            Verdict::Acquire => {
                let previous = holder.unwrap_or("").to_owned();
                let transitions = spec.lease_transitions.unwrap_or(0);
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                spec.acquire_time = Some(now.clone());
                if previous != me {
                    spec.lease_transitions = Some(transitions.saturating_add(1));
                }
            }
        }
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = Some(me);
        spec.lease_duration_seconds = Some(duration_seconds);
        spec.renew_time = Some(now);
        // `lease` still carries the resourceVersion read above: the apiserver
        // refuses the write (409) if anyone changed the Lease since.
        match self.api.replace(&self.settings.name, &PostParams::default(), &lease).await {
            Ok(updated) => {
                self.observe(&updated);
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Waits until this candidate holds the Lease, retrying forever, then
    /// keeps renewing it on a task of its own.
    pub async fn acquire(mut self) -> Leadership {
        tracing::info!(
            lease = %format!("{}/{}", self.settings.namespace, self.settings.name),
            identity = %self.settings.identity,
            "waiting for leadership"
        );
        loop {
            match tokio::time::timeout(self.settings.renew_deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => break,
                Ok(Ok(false)) => {}
                Ok(Err(error)) => tracing::warn!(%error, "could not read or take the leader lease"),
                Err(_) => tracing::warn!("reading or taking the leader lease timed out"),
            }
            // A little jitter so that candidates do not march in step.
            let jitter = self.settings.retry_period.mul_f64(rand::random::<f64>() * 0.2);
            tokio::time::sleep(self.settings.retry_period + jitter).await;
        }
        tracing::info!(identity = %self.settings.identity, "acquired leadership");
        self.metrics.set_leader(true);
        self.health.set_leading(true);
        let (lost_tx, lost_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(self.keep(lost_tx, stop_rx));
        Leadership { lost: lost_rx, stop: Some(stop_tx), task }
    }

    /// Renews until stopped (returns the elector, for release) or until
    /// leadership is lost (says why on `lost`).
    async fn keep(mut self, lost: oneshot::Sender<String>, mut stop: oneshot::Receiver<()>) -> Option<Self> {
        let mut renewed = Instant::now();
        let why = loop {
            tokio::select! {
                _ = &mut stop => return Some(self),
                _ = tokio::time::sleep(self.settings.retry_period) => {}
            }
            let left = self.settings.renew_deadline.saturating_sub(renewed.elapsed());
            let attempt = tokio::select! {
                _ = &mut stop => return Some(self),
                attempt = tokio::time::timeout(left, self.try_acquire_or_renew()) => attempt,
            };
            match attempt {
                Ok(Ok(true)) => renewed = Instant::now(),
                Ok(Ok(false)) => {
                    let holder = self.observed.as_ref().and_then(|o| o.holder.clone()).unwrap_or_default();
                    if holder != self.settings.identity {
                        break format!("another replica ({holder}) holds the leader lease");
                    }
                    // Still ours, but the Lease changed under the write (409): retry.
                    tracing::warn!("the leader lease changed while renewing it; retrying");
                }
                Ok(Err(error)) => tracing::warn!(%error, "could not renew the leader lease"),
                Err(_) => tracing::warn!("renewing the leader lease timed out"),
            }
            if renewed.elapsed() >= self.settings.renew_deadline {
                break format!("could not renew the leader lease within {:?}", self.settings.renew_deadline);
            }
        };
        self.metrics.set_leader(false);
        self.health.set_leading(false);
        let _ = lost.send(why);
        None
    }

    /// Gives the Lease up if this candidate still holds it.
    async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        let now = MicroTime(Timestamp::now());
        spec.holder_identity = Some(String::new());
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now.clone());
        spec.acquire_time = Some(now);
        self.api.replace(&self.settings.name, &PostParams::default(), &lease).await?;
        Ok(())
    }
}

/// Held while this process leads.
pub struct Leadership {
    lost: oneshot::Receiver<String>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Option<LeaderElector>>,
}

impl Leadership {
    /// Resolves when leadership is lost, saying why. The caller must stop
    /// acting at once.
    pub async fn lost(&mut self) -> String {
        (&mut self.lost).await.unwrap_or_else(|_| "the lease keeper stopped".into())
    }

    /// Stops renewing and releases the Lease so a follower takes over at
    /// once. Call it only after the controllers have stopped.
    pub async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Ok(Some(mut elector)) = self.task.await else {
            return;
        };
        elector.metrics.set_leader(false);
        elector.health.set_leading(false);
        match tokio::time::timeout(elector.settings.renew_deadline, elector.release()).await {
            Ok(Ok(())) => tracing::info!(identity = %elector.settings.identity, "released the leader lease"),
            Ok(Err(error)) => tracing::warn!(%error, "could not release the leader lease; it expires by itself"),
            Err(_) => tracing::warn!("releasing the leader lease timed out; it expires by itself"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(15);

    #[test]
    fn a_free_or_released_lease_is_taken_at_once() {
        assert_eq!(verdict(None, "a", Duration::ZERO, LEASE), Verdict::Acquire);
        assert_eq!(verdict(Some(""), "a", Duration::ZERO, Duration::from_secs(1)), Verdict::Acquire);
    }

    #[test]
    fn the_holder_renews() {
        assert_eq!(verdict(Some("a"), "a", Duration::from_secs(100), LEASE), Verdict::Renew);
    }

    #[test]
    fn another_holder_is_waited_out_for_the_whole_lease_duration() {
        assert_eq!(verdict(Some("b"), "a", Duration::ZERO, LEASE), Verdict::Wait(LEASE));
        assert_eq!(verdict(Some("b"), "a", Duration::from_secs(14), LEASE), Verdict::Wait(Duration::from_secs(1)));
        assert_eq!(verdict(Some("b"), "a", LEASE, LEASE), Verdict::Acquire);
        assert_eq!(verdict(Some("b"), "a", Duration::from_secs(60), LEASE), Verdict::Acquire);
        // The holder's own duration counts, not the candidate's.
        assert_eq!(
            verdict(Some("b"), "a", Duration::from_secs(20), Duration::from_secs(30)),
            Verdict::Wait(Duration::from_secs(10))
        );
    }

    #[test]
    fn settings_keep_the_leader_stopping_before_a_follower_starts() {
        let ok = LeaseSettings::new("ns", "me");
        assert!(ok.validate().is_ok());
        assert_eq!(
            (ok.lease_duration, ok.renew_deadline, ok.retry_period),
            (Duration::from_secs(15), Duration::from_secs(10), Duration::from_secs(2))
        );
        let overlapping = LeaseSettings { renew_deadline: Duration::from_secs(15), ..ok.clone() };
        assert!(overlapping.validate().is_err());
        let one_try = LeaseSettings { retry_period: Duration::from_secs(10), ..ok.clone() };
        assert!(one_try.validate().is_err());
        assert!(LeaseSettings { identity: String::new(), ..ok }.validate().is_err());
    }

    #[test]
    fn identities_differ_between_processes_on_one_host() {
        if std::env::var("POD_NAME").is_err() {
            assert_ne!(default_identity(), default_identity());
        }
        assert_eq!(default_namespace(Some("ops".into())), "ops");
    }

    #[test]
    fn duration_flags_parse() {
        assert_eq!(parse_flag_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_flag_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_flag_duration("15").is_err());
    }
}
