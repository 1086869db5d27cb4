//! The pure middle of the IntegrationAccount reconciler: from the spec, what
//! was observed in the target app, the status and the clock, decide what to
//! do. No I/O here, so every timing and diff rule is unit-tested.

pub mod lifecycle;

use std::{collections::BTreeSet, time::Duration};

use jiff::Timestamp;

use crate::{
    api::{CurrentKey, KeyRecord, KeyState},
    provider::{ObservedAccount, ObservedKey, RoleGrant},
    schedule::RotationSchedule,
};

/// How long a key lives when no rotation policy says otherwise, for
/// providers whose keys expire.
pub const DEFAULT_KEY_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long a replaced key stays valid when no rotation policy says.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(3600);
/// An expiring key is replaced this long before it expires, at the latest.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(3600);

/// Why a key is rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationReason {
    /// The account has no key yet.
    Initial,
    /// The key recorded in status is gone from the target app.
    KeyMissing,
    /// The output Secret does not hold the current key.
    SecretOutdated,
    /// The rotation policy says it is time.
    Scheduled,
    /// The key is older than maxKeyAge.
    MaxKeyAge,
    /// The key is about to expire by itself.
    Expiring,
    /// Someone set the rotate-now annotation.
    Manual,
}

impl RotationReason {
    /// CamelCase, for events and key records.
    pub fn as_str(self) -> &'static str {
        match self {
            RotationReason::Initial => "Initial",
            RotationReason::KeyMissing => "KeyMissing",
            RotationReason::SecretOutdated => "SecretOutdated",
            RotationReason::Scheduled => "Scheduled",
            RotationReason::MaxKeyAge => "MaxKeyAge",
            RotationReason::Expiring => "Expiring",
            RotationReason::Manual => "ManualRotation",
        }
    }
}

/// Why a key is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeReason {
    /// Its grace period after a rotation is over.
    GracePeriodEnded,
    /// The target holds it but status does not track it (for example, a key
    /// whose creation result was lost in a crash).
    Untracked,
    /// Room is needed for a new key under the key limit.
    KeyLimit,
    /// Confirmed rollover: every restart target rolled out with the new key.
    RolloutConfirmed,
    /// Confirmed rollover: `maxWait` passed and a rollout is not complete.
    RolloutTimedOut,
    /// Replaced, and unused for the policy's `revokeUnusedAfter` while its
    /// successor is in use.
    Unused,
}

impl RevokeReason {
    /// CamelCase, for events and key records.
    pub fn as_str(self) -> &'static str {
        match self {
            RevokeReason::GracePeriodEnded => "GracePeriodEnded",
            RevokeReason::Untracked => "Untracked",
            RevokeReason::KeyLimit => "KeyLimit",
            RevokeReason::RolloutConfirmed => "RolloutConfirmed",
            RevokeReason::RolloutTimedOut => "RolloutTimedOut",
            RevokeReason::Unused => "Unused",
        }
    }
}

/// One step towards the desired state, in the order it must run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create the account.
    CreateAccount,
    /// Bring the account's description, owner and state in line.
    UpdateAccount,
    /// Disable the account: it is dormant, and the policy says so.
    DisableAccount,
    /// Grant a role.
    Grant(RoleGrant),
    /// Revoke a role nobody declared (or one the policy now denies).
    Revoke(RoleGrant),
    /// Revoke a key.
    RevokeKey {
        /// The key's id.
        id: String,
        /// Why.
        reason: RevokeReason,
    },
    /// A key whose creation was recorded as pending is already in the
    /// output Secret (the process stopped between publishing it and
    /// recording that): record it as published, as the rotation would have.
    AdoptPublished {
        /// The key's id.
        id: String,
    },
    /// [`Action::AdoptPublished`] for a key the target named itself: the
    /// Secret holds key `id`, issued for the pending record `record`.
    AdoptPublishedAs {
        /// The key's id in the target (and the Secret).
        id: String,
        /// The id of the pending record.
        record: String,
    },
    /// Verify and publish a key issued earlier whose publication failed
    /// (this process still holds it): never issue another in its place.
    Publish {
        /// The key's id.
        id: String,
    },
    /// Issue, verify and publish a new key; the current one starts retiring.
    Rotate {
        /// Why.
        reason: RotationReason,
        /// The key limit leaves no room for a grace period: revoke the old
        /// key as soon as the new one is published.
        revoke_previous_at_once: bool,
    },
}

/// What the planner looks at.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    /// The clock.
    pub now: Timestamp,
    /// The account in the target app, if it exists.
    pub account: Option<&'a ObservedAccount>,
    /// The roles the RoleBindings grant, after policy.
    pub desired_roles: &'a BTreeSet<RoleGrant>,
    /// The roles the account holds.
    pub observed_roles: &'a BTreeSet<RoleGrant>,
    /// The keys the account holds.
    pub observed_keys: &'a [ObservedKey],
    /// status.keys.
    pub records: &'a [KeyRecord],
    /// status.currentKey.
    pub current: Option<&'a CurrentKey>,
    /// The key id in the output Secret, if the Secret exists and is ours.
    pub secret_key_id: Option<&'a str>,
    /// The parsed rotation policy, if any.
    pub schedule: Option<&'a RotationSchedule>,
    /// A stable per-account seed for jitter (the account's uid).
    pub seed: &'a str,
    /// The rotate-now annotation's value, and the last one acted on.
    pub rotate_request: Option<&'a str>,
    /// status.lastRotationRequest.
    pub last_rotation_request: Option<&'a str>,
    /// The most keys the account may hold.
    pub max_keys: usize,
    /// A key this process issued but could not publish yet, and still holds.
    pub held: Option<HeldKey<'a>>,
    /// No key may be issued now (the rotation policy is missing or invalid,
    /// or the output Secret is someone else's): a rotation planned would
    /// not run.
    pub keys_blocked: bool,
    /// With confirmed rollover, whether the restart targets have rolled out
    /// with the current key (observed only once a replaced key's grace
    /// period is over).
    pub rollout: Option<&'a Rollout>,
    /// The account is dormant and the policy disables dormant accounts: it
    /// is disabled (not re-enabled) and no key is rotated.
    pub disable_dormant: bool,
    /// Revoke a replaced key unused this long while its successor is in use
    /// (only where the provider reports use).
    pub revoke_unused_after: Option<Duration>,
}

/// A key issued but not yet published, held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldKey<'a> {
    /// Its id in the target app.
    pub id: &'a str,
    /// The id of the record made when it was issued (keysmith's own id; the
    /// target may have named the key otherwise).
    pub record: &'a str,
}

/// What the restart targets' rollouts say, for confirmed rollover.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rollout {
    /// The workloads (`Kind/name`) not yet rolled out with the current key,
    /// and why; empty when every rollout is complete.
    pub waiting_on: Vec<String>,
}

/// How often a rollout is looked at while a replaced key waits for it.
pub const ROLLOUT_POLL: Duration = Duration::from_secs(5);

/// What confirmed rollover decided about a replaced key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutDecision {
    /// Kept past its grace period: the rollout is not complete yet.
    Waiting {
        /// The replaced key.
        key: String,
        /// When it is revoked anyway.
        until: Timestamp,
        /// What is not rolled out yet.
        on: Vec<String>,
    },
    /// Revoked: every rollout is complete.
    Confirmed {
        /// The replaced key.
        key: String,
    },
    /// Revoked at `maxWait` with a rollout not complete.
    TimedOut {
        /// The replaced key.
        key: String,
        /// What had not rolled out.
        on: Vec<String>,
    },
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// What to do, in order.
    pub actions: Vec<Action>,
    /// When the current key is next due for rotation (before this plan runs).
    pub next_rotation: Option<Timestamp>,
    /// When something becomes due without any change: the next reconcile.
    pub wake_at: Option<Timestamp>,
    /// A reason the account cannot be managed at all (it belongs to someone else).
    pub blocked: Option<String>,
    /// Confirmed rollover's decision about a replaced key, if it made one.
    pub rollout: Option<RolloutDecision>,
}

/// When a key issued at `issued_at` is due for rotation.
pub fn rotation_due(
    schedule: Option<&RotationSchedule>,
    issued_at: Timestamp,
    expires_at: Option<Timestamp>,
    seed: &str,
) -> Option<Timestamp> {
    let scheduled = schedule.map(|s| s.next_rotation(issued_at, seed));
    let before_expiry = expires_at.map(|e| saturating_sub(e, EXPIRY_MARGIN.min(lifetime_of(issued_at, e) / 5)));
    match (scheduled, before_expiry) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn lifetime_of(issued: Timestamp, expires: Timestamp) -> Duration {
    Duration::try_from(expires.duration_since(issued)).unwrap_or(Duration::ZERO)
}

/// `t - d`, saturating at the earliest representable instant.
pub fn saturating_sub(t: Timestamp, d: Duration) -> Timestamp {
    jiff::SignedDuration::try_from(d).ok().and_then(|d| t.checked_sub(d).ok()).unwrap_or(Timestamp::MIN)
}

/// `t + d`, saturating at the latest representable instant.
pub fn saturating_add(t: Timestamp, d: Duration) -> Timestamp {
    jiff::SignedDuration::try_from(d).ok().and_then(|d| t.checked_add(d).ok()).unwrap_or(Timestamp::MAX)
}

/// Decides what to do.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let mut actions = Vec::new();
    match input.account {
        None => actions.push(Action::CreateAccount),
        Some(account) if !account.owned => {
            return Plan {
                actions,
                next_rotation: None,
                wake_at: None,
                rollout: None,
                blocked: Some(format!(
                    "an account named {:?} already exists in the target app and was not created by keysmith for this IntegrationAccount",
                    account.name
                )),
            }
        }
        Some(account) if input.disable_dormant => {
            if !account.disabled {
                actions.push(Action::DisableAccount);
            }
        }
        Some(account) if account.drifted || account.disabled => actions.push(Action::UpdateAccount),
        Some(_) => {}
    }

    for grant in input.desired_roles.difference(input.observed_roles) {
        actions.push(Action::Grant(grant.clone()));
    }
    for grant in input.observed_roles.difference(input.desired_roles) {
        actions.push(Action::Revoke(grant.clone()));
    }

    let observed_ids: BTreeSet<&str> = input.observed_keys.iter().map(|k| k.id.as_str()).collect();
    let current = input.current.filter(|_| input.account.is_some());

    // A key still recorded as pending (or issued) that the Secret already
    // holds was published: adopt it, then plan the rest on the next pass.
    let published_unrecorded = input.records.iter().find(|r| {
        matches!(r.state, KeyState::Pending | KeyState::Issued)
            && input.secret_key_id == Some(r.id.as_str())
            && observed_ids.contains(r.id.as_str())
            && current.is_none_or(|c| c.id != r.id)
    });
    if let Some(record) = published_unrecorded {
        actions.push(Action::AdoptPublished { id: record.id.clone() });
        return Plan { actions, next_rotation: None, wake_at: Some(input.now), blocked: None, rollout: None };
    }
    // The same where the target names keys itself (an AWS access key id):
    // the pending record has keysmith's id, the Secret the target's. Only
    // keysmith writes the Secret, so a key it holds that the target has and
    // nothing tracks, while exactly one key is recorded as pending, is that
    // key.
    let pending: Vec<&KeyRecord> = input.records.iter().filter(|r| r.state == KeyState::Pending).collect();
    if let (Some(secret), [record]) = (input.secret_key_id, pending.as_slice()) {
        let tracked = current.is_some_and(|c| c.id == secret) || input.records.iter().any(|r| r.id == secret);
        if observed_ids.contains(secret) && !tracked {
            actions.push(Action::AdoptPublishedAs { id: secret.to_owned(), record: record.id.clone() });
            return Plan { actions, next_rotation: None, wake_at: Some(input.now), blocked: None, rollout: None };
        }
    }
    // A key issued, still held, not yet published: publish it rather than
    // revoke it as untracked and issue another (whatever stopped it, a
    // Secret that cannot be written, say, would stop the next one too).
    // Its record may still be the Pending one, should the status write
    // that recorded the issue have failed. No wake-up of its own: a failed
    // publication retries with backoff, or waits for the change that fixes
    // it, and never loops.
    let held = input.held.filter(|held| {
        observed_ids.contains(held.id)
            && input.records.iter().any(|r| {
                (r.id == held.id && r.state == KeyState::Issued)
                    || (r.id == held.record && r.state == KeyState::Pending)
            })
    });
    if let Some(held) = held {
        actions.push(Action::Publish { id: held.id.to_owned() });
        return Plan { actions, next_rotation: None, wake_at: None, blocked: None, rollout: None };
    }
    let retiring: Vec<&KeyRecord> = input
        .records
        .iter()
        .filter(|r| r.state == KeyState::Retiring && observed_ids.contains(r.id.as_str()))
        .filter(|r| current.is_none_or(|c| c.id != r.id))
        .collect();

    // Keys nobody tracks: revoke. Retiring keys past their grace: revoke.
    // But the key the output Secret holds is what workloads read: where the
    // key limit leaves room for a successor beside it, it stays until one is
    // published (a rotation is always planned then: the Secret does not hold
    // the current key), and goes on a later pass.
    // Not while keys are blocked: no successor would come, and the Secret's
    // annotation (which a namespace editor can change) must not keep a
    // retired key alive.
    let in_secret = |id: &str| input.secret_key_id == Some(id) && input.max_keys >= 2 && !input.keys_blocked;
    let mut revoked: BTreeSet<String> = BTreeSet::new();
    for key in input.observed_keys {
        let tracked = current.is_some_and(|c| c.id == key.id) || retiring.iter().any(|r| r.id == key.id);
        if !tracked && !in_secret(&key.id) {
            revoked.insert(key.id.clone());
            actions.push(Action::RevokeKey { id: key.id.clone(), reason: RevokeReason::Untracked });
        }
    }
    let mut wake_at: Option<Timestamp> = None;
    let mut wake = |t: Timestamp| wake_at = Some(wake_at.map_or(t, |w: Timestamp| w.min(t)));
    let mut rollout = None;
    // A replaced key the target reports unused while its successor, in the
    // Secret, is in use: revoked early, where the policy says so.
    let successor_in_use = current.is_some_and(|c| {
        input.secret_key_id == Some(c.id.as_str())
            && input.records.iter().any(|r| r.id == c.id && r.last_used_at.is_some())
    });
    for record in &retiring {
        match record.revoke_at.as_ref().map(|t| t.0) {
            Some(at) if at > input.now => {
                let idle_since = [record.retiring_at.as_ref(), record.last_used_at.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(|t| t.0)
                    .max();
                match (input.revoke_unused_after, idle_since) {
                    (Some(idle), Some(since)) if successor_in_use && !in_secret(&record.id) => {
                        let idle_until = saturating_add(since, idle);
                        if idle_until <= input.now {
                            revoked.insert(record.id.clone());
                            actions.push(Action::RevokeKey { id: record.id.clone(), reason: RevokeReason::Unused });
                        } else {
                            wake(idle_until.min(at));
                        }
                    }
                    // The successor not in use yet: the drift checks look
                    // again; its grace period ends it in any case.
                    _ => wake(at),
                }
            }
            _ if in_secret(&record.id) => {}
            _ => {
                let unobserved = Rollout { waiting_on: vec!["the restart targets (not observed)".into()] };
                let reason = match input.schedule.and_then(RotationSchedule::confirm_rollout) {
                    Some(max_wait) => {
                        let facts = input.rollout.unwrap_or(&unobserved);
                        let published = record.retiring_at.as_ref().map_or(input.now, |t| t.0);
                        let until = saturating_add(published, max_wait);
                        let key = record.id.clone();
                        if facts.waiting_on.is_empty() {
                            rollout = Some(RolloutDecision::Confirmed { key });
                            RevokeReason::RolloutConfirmed
                        } else if input.now < until {
                            wake(saturating_add(input.now, ROLLOUT_POLL).min(until));
                            rollout = Some(RolloutDecision::Waiting { key, until, on: facts.waiting_on.clone() });
                            continue;
                        } else {
                            rollout = Some(RolloutDecision::TimedOut { key, on: facts.waiting_on.clone() });
                            RevokeReason::RolloutTimedOut
                        }
                    }
                    None => RevokeReason::GracePeriodEnded,
                };
                revoked.insert(record.id.clone());
                actions.push(Action::RevokeKey { id: record.id.clone(), reason });
            }
        }
    }

    // Is the current key usable, and is it time to replace it?
    let next_rotation = current.and_then(|c| next_rotation(input.schedule, c, input.seed));
    let facts = RotationFacts {
        now: input.now,
        current,
        key_in_target: current.is_some_and(|c| observed_ids.contains(c.id.as_str())),
        key_in_secret: current.is_some_and(|c| input.secret_key_id == Some(c.id.as_str())),
        rotate_requested: input.rotate_request.is_some() && input.rotate_request != input.last_rotation_request,
        schedule: input.schedule,
        next_rotation,
    };
    // A dormant account the policy disabled gets no new key: it could not
    // be verified, and nobody uses it.
    let reason = rotation_decision(&facts).map(|(_, reason)| reason).filter(|_| !input.disable_dormant);
    if reason.is_none() && !input.disable_dormant {
        if let Some(due) = next_rotation {
            wake(due);
        }
    }

    if let Some(reason) = reason {
        // Make room under the key limit: oldest retiring keys first, never
        // the key the Secret holds. Should the Secret hold a key other than
        // the current one (an older copy of it put back), the current key,
        // which no workload reads from it, goes before that one.
        let live_after =
            |revoked: &BTreeSet<String>| input.observed_keys.iter().filter(|k| !revoked.contains(&k.id)).count();
        let mut by_age: Vec<&str> = retiring.iter().filter(|r| !in_secret(&r.id)).map(|r| r.id.as_str()).collect();
        by_age
            .sort_by_key(|id| retiring.iter().find(|r| r.id == *id).and_then(|r| r.retiring_at.as_ref().map(|t| t.0)));
        let secret_holds_another = input
            .secret_key_id
            .is_some_and(|s| in_secret(s) && observed_ids.contains(s) && current.is_some_and(|c| c.id != s));
        if secret_holds_another {
            by_age.extend(current.filter(|c| observed_ids.contains(c.id.as_str())).map(|c| c.id.as_str()));
        }
        for id in by_age {
            if live_after(&revoked) < input.max_keys {
                break;
            }
            if revoked.insert(id.to_owned()) {
                actions.push(Action::RevokeKey { id: id.to_owned(), reason: RevokeReason::KeyLimit });
            }
        }
        let revoke_previous_at_once = live_after(&revoked) + 1 > input.max_keys;
        actions.push(Action::Rotate { reason, revoke_previous_at_once });
    }

    Plan { actions, next_rotation, wake_at, blocked: None, rollout }
}

/// When `key` is next due for rotation: the one place this is decided (the
/// planner, the skip of a converged account and the status all ask here).
pub fn next_rotation(schedule: Option<&RotationSchedule>, key: &CurrentKey, account_seed: &str) -> Option<Timestamp> {
    rotation_due(schedule, key.issued_at.0, key.expires_at.as_ref().map(|t| t.0), &seed_for(account_seed, &key.id))
}

/// What the rotation rules look at.
#[derive(Debug, Clone, Copy)]
pub struct RotationFacts<'a> {
    /// The clock.
    pub now: Timestamp,
    /// status.currentKey, if the account exists.
    pub current: Option<&'a CurrentKey>,
    /// Whether the target app still holds the current key.
    pub key_in_target: bool,
    /// Whether the output Secret holds the current key.
    pub key_in_secret: bool,
    /// Whether a rotate-now annotation not yet acted on is set.
    pub rotate_requested: bool,
    /// The rotation policy, if any.
    pub schedule: Option<&'a RotationSchedule>,
    /// When the current key is due ([`next_rotation`]).
    pub next_rotation: Option<Timestamp>,
}

/// One rule of the rotation chain: its name, and whether it rotates now.
#[derive(Debug, Clone, Copy)]
pub struct RotationRule {
    /// What the rule says, for tests and logs.
    pub name: &'static str,
    /// The reason to rotate now, if the rule applies.
    pub applies: fn(&RotationFacts<'_>) -> Option<RotationReason>,
}

fn no_key_yet(f: &RotationFacts<'_>) -> Option<RotationReason> {
    f.current.is_none().then_some(RotationReason::Initial)
}
fn key_gone_from_target(f: &RotationFacts<'_>) -> Option<RotationReason> {
    (f.current.is_some() && !f.key_in_target).then_some(RotationReason::KeyMissing)
}
fn secret_holds_another_key(f: &RotationFacts<'_>) -> Option<RotationReason> {
    (f.current.is_some() && !f.key_in_secret).then_some(RotationReason::SecretOutdated)
}
fn rotation_requested(f: &RotationFacts<'_>) -> Option<RotationReason> {
    f.rotate_requested.then_some(RotationReason::Manual)
}
fn older_than_max_key_age(f: &RotationFacts<'_>) -> Option<RotationReason> {
    let current = f.current?;
    f.schedule.is_some_and(|s| s.key_too_old(current.issued_at.0, f.now)).then_some(RotationReason::MaxKeyAge)
}
fn expiring_without_a_policy(f: &RotationFacts<'_>) -> Option<RotationReason> {
    let expires = f.current?.expires_at.as_ref()?.0;
    (f.schedule.is_none() && saturating_sub(expires, EXPIRY_MARGIN) <= f.now).then_some(RotationReason::Expiring)
}
fn due(f: &RotationFacts<'_>) -> Option<RotationReason> {
    f.current?;
    let due = f.next_rotation?;
    (due <= f.now).then_some(if f.schedule.is_some() { RotationReason::Scheduled } else { RotationReason::Expiring })
}

/// The rotation rules, in order: the first that applies decides why the key
/// rotates now; none applying means the key stays until [`next_rotation`].
pub const ROTATION_RULES: [RotationRule; 7] = [
    RotationRule { name: "no key yet", applies: no_key_yet },
    RotationRule { name: "key gone from the target app", applies: key_gone_from_target },
    RotationRule { name: "the Secret holds another key", applies: secret_holds_another_key },
    RotationRule { name: "rotate-now requested", applies: rotation_requested },
    RotationRule { name: "older than maxKeyAge", applies: older_than_max_key_age },
    RotationRule { name: "expiring, no policy", applies: expiring_without_a_policy },
    RotationRule { name: "due", applies: due },
];

/// The first rotation rule that applies, by name, and its reason.
pub fn rotation_decision(facts: &RotationFacts<'_>) -> Option<(&'static str, RotationReason)> {
    ROTATION_RULES.iter().find_map(|rule| (rule.applies)(facts).map(|reason| (rule.name, reason)))
}

/// The jitter seed for one key of one account.
pub fn seed_for(account_seed: &str, key_id: &str) -> String {
    format!("{account_seed}/{key_id}")
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::api::KeyRotationPolicySpec;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn owned() -> ObservedAccount {
        ObservedAccount { id: "sa".into(), name: "sa".into(), disabled: false, owned: true, drifted: false }
    }

    fn key(id: &str) -> ObservedKey {
        ObservedKey { last_used: None, id: id.into(), created_at: None }
    }

    fn record(id: &str, state: KeyState, revoke_at: Option<i64>, retiring_at: Option<i64>) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            state,
            created_at: Time(t(0)),
            published_at: None,
            retiring_at: retiring_at.map(|s| Time(t(s))),
            revoke_at: revoke_at.map(|s| Time(t(s))),
            revoked_at: None,
            expires_at: None,
            last_used_at: None,
            use_baseline_at: None,
            restarted_at: None,
            reason: None,
        }
    }

    fn schedule(every: &str) -> RotationSchedule {
        let spec: KeyRotationPolicySpec =
            serde_json::from_value(serde_json::json!({"rotateEvery": every, "gracePeriod": "10m"})).unwrap();
        RotationSchedule::from_spec(&spec).unwrap()
    }

    /// The rotation chain as a table: each row a name, the facts, and the
    /// rule that decides (with its reason), or none.
    #[test]
    fn the_rotation_rules_decide_in_order() {
        let key = CurrentKey { id: "k1".into(), issued_at: Time(t(0)), expires_at: None };
        let expiring = CurrentKey { expires_at: Some(Time(t(3000))), ..key.clone() };
        let hourly = schedule("1h");
        let aged_spec: KeyRotationPolicySpec =
            serde_json::from_value(serde_json::json!({"rotateEvery": "720h", "maxKeyAge": "30m"})).unwrap();
        let aged = RotationSchedule::from_spec(&aged_spec).unwrap();
        let healthy = RotationFacts {
            now: t(60),
            current: Some(&key),
            key_in_target: true,
            key_in_secret: true,
            rotate_requested: false,
            schedule: None,
            next_rotation: None,
        };
        type Row<'a> = (&'static str, RotationFacts<'a>, Option<(&'static str, RotationReason)>);
        let cases: Vec<Row<'_>> = vec![
            ("a healthy key without a policy stays", healthy, None),
            (
                "no current key",
                RotationFacts { current: None, key_in_target: false, key_in_secret: false, ..healthy },
                Some(("no key yet", RotationReason::Initial)),
            ),
            (
                "the target lost it, and the Secret is stale too",
                RotationFacts { key_in_target: false, key_in_secret: false, ..healthy },
                Some(("key gone from the target app", RotationReason::KeyMissing)),
            ),
            (
                "the Secret holds another key, and a rotation is requested",
                RotationFacts { key_in_secret: false, rotate_requested: true, ..healthy },
                Some(("the Secret holds another key", RotationReason::SecretOutdated)),
            ),
            (
                "requested, and overdue",
                RotationFacts { rotate_requested: true, schedule: Some(&hourly), next_rotation: Some(t(0)), ..healthy },
                Some(("rotate-now requested", RotationReason::Manual)),
            ),
            (
                "older than maxKeyAge before it is due",
                RotationFacts { now: t(3600), schedule: Some(&aged), next_rotation: Some(t(900_000)), ..healthy },
                Some(("older than maxKeyAge", RotationReason::MaxKeyAge)),
            ),
            (
                "expiring within the margin, no policy",
                RotationFacts { current: Some(&expiring), next_rotation: Some(t(2400)), ..healthy },
                Some(("expiring, no policy", RotationReason::Expiring)),
            ),
            (
                "due by the schedule",
                RotationFacts { now: t(3700), schedule: Some(&hourly), next_rotation: Some(t(3600)), ..healthy },
                Some(("due", RotationReason::Scheduled)),
            ),
            (
                "not yet due by the schedule",
                RotationFacts { schedule: Some(&hourly), next_rotation: Some(t(3600)), ..healthy },
                None,
            ),
        ];
        for (name, facts, expected) in cases {
            assert_eq!(rotation_decision(&facts), expected, "{name}");
        }
        let names: Vec<&str> = ROTATION_RULES.iter().map(|r| r.name).collect();
        assert_eq!(
            names,
            [
                "no key yet",
                "key gone from the target app",
                "the Secret holds another key",
                "rotate-now requested",
                "older than maxKeyAge",
                "expiring, no policy",
                "due"
            ]
        );
    }

    struct Case {
        account: Option<ObservedAccount>,
        desired: BTreeSet<RoleGrant>,
        observed: BTreeSet<RoleGrant>,
        keys: Vec<ObservedKey>,
        records: Vec<KeyRecord>,
        current: Option<CurrentKey>,
        secret_key: Option<String>,
        schedule: Option<RotationSchedule>,
        request: Option<String>,
        last_request: Option<String>,
        max_keys: usize,
        now: Timestamp,
        held: Option<String>,
        keys_blocked: bool,
        rollout: Option<Rollout>,
        disable_dormant: bool,
        revoke_unused_after: Option<Duration>,
    }

    impl Case {
        /// A healthy account with key k1 issued at t(0), published.
        fn steady() -> Self {
            Case {
                account: Some(owned()),
                desired: BTreeSet::new(),
                observed: BTreeSet::new(),
                keys: vec![key("k1")],
                records: vec![record("k1", KeyState::Published, None, None)],
                current: Some(CurrentKey { id: "k1".into(), issued_at: Time(t(0)), expires_at: None }),
                secret_key: Some("k1".into()),
                schedule: None,
                request: None,
                last_request: None,
                max_keys: 2,
                now: t(60),
                held: None,
                keys_blocked: false,
                rollout: None,
                disable_dormant: false,
                revoke_unused_after: None,
            }
        }

        fn run(&self) -> Plan {
            plan(&self.input())
        }

        fn input(&self) -> PlanInput<'_> {
            PlanInput {
                now: self.now,
                account: self.account.as_ref(),
                desired_roles: &self.desired,
                observed_roles: &self.observed,
                observed_keys: &self.keys,
                records: &self.records,
                current: self.current.as_ref(),
                secret_key_id: self.secret_key.as_deref(),
                schedule: self.schedule.as_ref(),
                seed: "uid",
                rotate_request: self.request.as_deref(),
                last_rotation_request: self.last_request.as_deref(),
                max_keys: self.max_keys,
                held: self.held.as_deref().map(|id| HeldKey { id, record: id }),
                keys_blocked: self.keys_blocked,
                rollout: self.rollout.as_ref(),
                disable_dormant: self.disable_dormant,
                revoke_unused_after: self.revoke_unused_after,
            }
        }
    }

    /// k1 replaced by k2 at t(100), k1 in its grace period until t(3700).
    fn rotated() -> Case {
        let mut case = Case::steady();
        case.keys = vec![key("k1"), key("k2")];
        let mut old = record("k1", KeyState::Retiring, Some(3700), Some(100));
        old.published_at = Some(Time(t(0)));
        let mut new = record("k2", KeyState::Published, None, None);
        new.published_at = Some(Time(t(100)));
        case.records = vec![new, old];
        case.current = Some(CurrentKey { id: "k2".into(), issued_at: Time(t(100)), expires_at: None });
        case.secret_key = Some("k2".into());
        case.revoke_unused_after = Some(Duration::from_secs(600));
        case
    }

    #[test]
    fn a_replaced_key_unused_while_its_successor_is_in_use_is_revoked_early() {
        let early = |case: &Case| {
            case.run().actions.contains(&Action::RevokeKey { id: "k1".into(), reason: RevokeReason::Unused })
        };
        let mut case = rotated();
        case.now = t(1000);
        assert!(!early(&case), "the successor is not used yet: k1 keeps its grace period");
        assert_eq!(case.run().wake_at, Some(t(3700)), "no wake-up before the grace period ends, so no loop");
        case.records[0].last_used_at = Some(Time(t(200)));
        assert!(early(&case), "k2 in use, k1 unused for 600 s since k2 was published");
        case.now = t(650);
        assert!(!early(&case), "k1 has not been unused for 600 s yet");
        assert_eq!(case.run().wake_at, Some(t(700)), "back when it will have been");
        case.now = t(1000);
        case.records[1].last_used_at = Some(Time(t(900)));
        assert!(!early(&case), "k1 was used at t(900): idle only until t(1500)");
        assert_eq!(case.run().wake_at, Some(t(1500)));
        case.now = t(1500);
        assert!(early(&case));
        // Not where the policy does not ask, nor for the key in the Secret.
        case.revoke_unused_after = None;
        assert!(!early(&case));
        let mut in_secret = rotated();
        in_secret.records[0].last_used_at = Some(Time(t(200)));
        in_secret.now = t(1000);
        in_secret.secret_key = Some("k1".into());
        assert!(!early(&in_secret), "the successor is not what the Secret holds: it is not in use from there");
    }

    #[test]
    fn a_dormant_account_the_policy_disables_is_disabled_and_gets_no_new_key() {
        let mut case = Case::steady();
        case.schedule = Some(schedule("1h"));
        case.now = t(7200);
        assert!(case.run().actions.iter().any(|a| matches!(a, Action::Rotate { .. })), "due");
        case.disable_dormant = true;
        let plan = case.run();
        assert_eq!(plan.actions, vec![Action::DisableAccount]);
        assert_eq!(plan.wake_at, None, "a rotation due but held back wakes nothing: no loop");
        case.account = Some(ObservedAccount { disabled: true, ..owned() });
        assert!(case.run().actions.is_empty(), "disabled stays disabled: no update re-enables it");
        case.disable_dormant = false;
        assert_eq!(case.run().actions[0], Action::UpdateAccount, "reactivated: enabled again");
    }

    fn grant(role: &str) -> RoleGrant {
        RoleGrant { role: role.into(), scope: Some("ns".into()) }
    }

    /// A key issued in an earlier pass that could not be published, still
    /// held by this process: published, never revoked as untracked nor
    /// replaced by another.
    /// Confirmed rollover as a table: facts → decision about the replaced key.
    #[test]
    fn a_replaced_key_waits_for_the_rollout_within_max_wait() {
        let confirm = |max_wait: &str| {
            let spec: KeyRotationPolicySpec = serde_json::from_value(serde_json::json!({
                "rotateEvery": "24h", "gracePeriod": "10m",
                "restartTargets": [{"kind": "Deployment", "name": "app"}],
                "confirmRollout": {"maxWait": max_wait}
            }))
            .unwrap();
            RotationSchedule::from_spec(&spec).unwrap()
        };
        let waiting = Rollout { waiting_on: vec!["Deployment/app: 0 of 1 updated replicas available".into()] };
        let done = Rollout::default();
        // k0 retiring since t(0), grace over at t(600).
        let case = |now: i64, max_wait: &str, rollout: Option<Rollout>| {
            let mut case = Case::steady();
            case.keys.push(key("k0"));
            case.records.push(record("k0", KeyState::Retiring, Some(600), Some(0)));
            case.schedule = Some(confirm(max_wait));
            case.now = t(now);
            case.rollout = rollout;
            case.run()
        };
        let revoke = |reason| vec![Action::RevokeKey { id: "k0".into(), reason }];

        // Within the grace period: nothing to ask yet.
        let plan = case(300, "30m", None);
        assert!(plan.actions.is_empty());
        assert_eq!((plan.wake_at, plan.rollout), (Some(t(600)), None));
        // Grace over, rollout not complete: kept, looked at again shortly.
        let plan = case(700, "30m", Some(waiting.clone()));
        assert!(plan.actions.is_empty(), "{plan:?}");
        assert_eq!(plan.wake_at, Some(t(705)));
        assert_eq!(
            plan.rollout,
            Some(RolloutDecision::Waiting { key: "k0".into(), until: t(1800), on: waiting.waiting_on.clone() })
        );
        // Not observed: as not complete.
        assert!(case(700, "30m", None).actions.is_empty());
        // Complete: revoked, confirmed.
        let plan = case(700, "30m", Some(done));
        assert_eq!(plan.actions, revoke(RevokeReason::RolloutConfirmed));
        assert_eq!(plan.rollout, Some(RolloutDecision::Confirmed { key: "k0".into() }));
        // maxWait passed: revoked anyway.
        let plan = case(1800, "30m", Some(waiting.clone()));
        assert_eq!(plan.actions, revoke(RevokeReason::RolloutTimedOut));
        assert_eq!(plan.rollout, Some(RolloutDecision::TimedOut { key: "k0".into(), on: waiting.waiting_on.clone() }));
        // maxWait shorter than the grace period: the grace period is the minimum.
        assert!(case(300, "1m", Some(waiting.clone())).actions.is_empty());
        assert_eq!(case(600, "1m", Some(waiting)).actions, revoke(RevokeReason::RolloutTimedOut));
    }

    /// The key the Secret holds is kept only while a successor can come.
    #[test]
    fn the_secrets_key_is_kept_for_a_successor_unless_keys_are_blocked() {
        let mut case = Case::steady();
        case.keys.push(key("k0"));
        case.secret_key = Some("k0".into());
        let actions = case.run().actions;
        assert!(!actions.iter().any(|a| matches!(a, Action::RevokeKey { id, .. } if id == "k0")), "{actions:?}");
        assert!(actions.iter().any(|a| matches!(a, Action::Rotate { .. })), "{actions:?}");
        case.keys_blocked = true;
        assert!(case.run().actions.contains(&Action::RevokeKey { id: "k0".into(), reason: RevokeReason::Untracked }));
    }

    /// A crash after publishing a key the target named itself: the pending
    /// record has keysmith's id, the Secret the target's.
    #[test]
    fn a_published_key_the_target_named_is_adopted() {
        let mut case = Case::steady();
        case.keys = vec![key("AKIA1")];
        case.records = vec![record("k1", KeyState::Pending, None, None)];
        case.current = None;
        case.secret_key = Some("AKIA1".into());
        assert_eq!(
            case.run().actions,
            [Action::AdoptPublishedAs { id: "AKIA1".into(), record: "k1".into() }],
            "not revoked as untracked"
        );
        // Two pending records: which one is unknowable; the key is not adopted.
        case.records.push(record("k2", KeyState::Pending, None, None));
        assert!(case.run().actions.iter().all(|a| !matches!(a, Action::AdoptPublishedAs { .. })));
    }

    #[test]
    fn a_held_key_is_published_not_replaced() {
        let mut case = Case::steady();
        case.keys.push(key("k2"));
        case.records.push(record("k2", KeyState::Issued, None, None));
        case.held = Some("k2".into());
        assert_eq!(case.run().actions, [Action::Publish { id: "k2".into() }]);

        // This process no longer holds it (it restarted): untracked.
        case.held = None;
        assert_eq!(case.run().actions, [Action::RevokeKey { id: "k2".into(), reason: RevokeReason::Untracked }]);

        // Held, its record still the Pending one (the status write after the
        // issue failed), under keysmith's id: published all the same.
        case.records = vec![record("k1", KeyState::Published, None, None), record("p2", KeyState::Pending, None, None)];
        let plan = plan(&PlanInput { held: Some(HeldKey { id: "k2", record: "p2" }), ..case.input() });
        assert_eq!(plan.actions, [Action::Publish { id: "k2".into() }]);
        assert_eq!(plan.wake_at, None, "no wake-up of its own: a failed publication must not loop");

        // Held, but gone from the target app: nothing to publish.
        case.held = Some("k2".into());
        case.keys.retain(|k| k.id != "k2");
        assert!(case.run().actions.iter().all(|a| !matches!(a, Action::Publish { .. })));
    }

    #[test]
    fn steady_state_does_nothing() {
        let plan = Case::steady().run();
        assert_eq!(plan.actions, vec![]);
        assert_eq!(plan.blocked, None);
    }

    #[test]
    fn new_account_is_created_granted_and_keyed() {
        let mut case = Case::steady();
        case.account = None;
        case.keys = vec![];
        case.records = vec![];
        case.current = None;
        case.secret_key = None;
        case.desired = BTreeSet::from([grant("view")]);
        assert_eq!(
            case.run().actions,
            vec![
                Action::CreateAccount,
                Action::Grant(grant("view")),
                Action::Rotate { reason: RotationReason::Initial, revoke_previous_at_once: false }
            ]
        );
    }

    #[test]
    fn foreign_account_blocks_everything() {
        let mut case = Case::steady();
        case.account = Some(ObservedAccount { owned: false, ..owned() });
        let plan = case.run();
        assert!(plan.actions.is_empty());
        assert!(plan.blocked.unwrap().contains("not created by keysmith"));
    }

    #[test]
    fn roles_converge_to_exactly_the_declared_set() {
        let mut case = Case::steady();
        case.desired = BTreeSet::from([grant("view"), grant("edit")]);
        case.observed = BTreeSet::from([grant("view"), grant("admin")]);
        assert_eq!(case.run().actions, vec![Action::Grant(grant("edit")), Action::Revoke(grant("admin"))]);
    }

    #[test]
    fn drifted_or_disabled_account_is_updated() {
        let mut case = Case::steady();
        case.account = Some(ObservedAccount { drifted: true, ..owned() });
        assert_eq!(case.run().actions, vec![Action::UpdateAccount]);
    }

    #[test]
    fn scheduled_rotation_waits_then_fires() {
        let mut case = Case::steady();
        case.schedule = Some(schedule("1h"));
        let plan = case.run();
        assert!(plan.actions.is_empty());
        assert_eq!(plan.next_rotation, Some(t(3600)));
        assert_eq!(plan.wake_at, Some(t(3600)));
        case.now = t(3600);
        assert_eq!(
            case.run().actions,
            vec![Action::Rotate { reason: RotationReason::Scheduled, revoke_previous_at_once: false }]
        );
    }

    #[test]
    fn manual_request_rotates_once() {
        let mut case = Case::steady();
        case.request = Some("2026-11-30T10:00:00Z".into());
        assert!(matches!(case.run().actions[..], [Action::Rotate { reason: RotationReason::Manual, .. }]));
        case.last_request = case.request.clone();
        assert!(case.run().actions.is_empty());
    }

    #[test]
    fn missing_key_or_stale_secret_rotates() {
        let mut case = Case::steady();
        case.keys = vec![];
        assert!(matches!(case.run().actions[..], [Action::Rotate { reason: RotationReason::KeyMissing, .. }]));
        let mut case = Case::steady();
        case.secret_key = None;
        assert!(matches!(case.run().actions[..], [Action::Rotate { reason: RotationReason::SecretOutdated, .. }]));
    }

    #[test]
    fn retiring_key_revoked_after_grace_only() {
        let mut case = Case::steady();
        case.keys = vec![key("k0"), key("k1")];
        case.records.push(record("k0", KeyState::Retiring, Some(120), Some(0)));
        let plan = case.run();
        assert!(plan.actions.is_empty());
        assert_eq!(plan.wake_at, Some(t(120)));
        case.now = t(120);
        assert_eq!(
            case.run().actions,
            vec![Action::RevokeKey { id: "k0".into(), reason: RevokeReason::GracePeriodEnded }]
        );
    }

    #[test]
    fn a_published_but_unrecorded_key_is_adopted_not_revoked() {
        let mut case = Case::steady();
        case.keys = vec![key("k1"), key("k2")];
        case.records.push(record("k2", KeyState::Pending, None, None));
        case.secret_key = Some("k2".into());
        let plan = case.run();
        assert_eq!(plan.actions, vec![Action::AdoptPublished { id: "k2".into() }]);
        assert_eq!(plan.wake_at, Some(case.now), "the rest is planned right after");
        // Not in the Secret: the pending key's result was lost; it is revoked.
        case.secret_key = Some("k1".into());
        assert_eq!(case.run().actions, vec![Action::RevokeKey { id: "k2".into(), reason: RevokeReason::Untracked }]);
    }

    #[test]
    fn untracked_keys_are_revoked() {
        let mut case = Case::steady();
        case.keys = vec![key("k1"), key("lost")];
        case.records.push(record("lost", KeyState::Pending, None, None));
        assert_eq!(case.run().actions, vec![Action::RevokeKey { id: "lost".into(), reason: RevokeReason::Untracked }]);
    }

    #[test]
    fn key_limit_revokes_retiring_first_never_the_live_key() {
        let mut case = Case::steady();
        case.keys = vec![key("k0"), key("k1")];
        case.records.push(record("k0", KeyState::Retiring, Some(10_000), Some(0)));
        case.request = Some("now".into());
        assert_eq!(
            case.run().actions,
            vec![
                Action::RevokeKey { id: "k0".into(), reason: RevokeReason::KeyLimit },
                Action::Rotate { reason: RotationReason::Manual, revoke_previous_at_once: false }
            ]
        );
        // With a limit of one, the old key cannot have a grace period.
        let mut case = Case::steady();
        case.max_keys = 1;
        case.request = Some("now".into());
        assert_eq!(
            case.run().actions,
            vec![Action::Rotate { reason: RotationReason::Manual, revoke_previous_at_once: true }]
        );
    }

    #[test]
    fn expiring_keys_are_replaced_before_they_expire() {
        let mut case = Case::steady();
        case.current = Some(CurrentKey { id: "k1".into(), issued_at: Time(t(0)), expires_at: Some(Time(t(86_400))) });
        let plan = case.run();
        assert!(plan.actions.is_empty());
        assert_eq!(plan.wake_at, Some(t(86_400 - 3600)));
        case.now = t(86_400 - 3600);
        assert!(matches!(case.run().actions[..], [Action::Rotate { reason: RotationReason::Expiring, .. }]));
    }
}
