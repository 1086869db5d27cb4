//! The status step of the account reconcile: what status says, as a pure
//! function of what was gathered, what the apply step reports and the
//! clock. Nothing here calls anything.

use std::collections::BTreeSet;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{
    conditions::ConditionUpdate,
    plan::{
        self,
        lifecycle::{self, whole_seconds, KeyEvent},
    },
};
use crate::{
    api::{
        condition_types::{ACCOUNT_READY, KEY_READY, READY, ROLES_SYNCED},
        ExternalAccount, GrantedRole, IntegrationAccountStatus,
    },
    provider::{ObservedAccount, RoleGrant},
    schedule::RotationSchedule,
};

/// What the apply step reports: what is now true in the target app.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// The account as last seen or returned by a create or update.
    pub account: Option<ObservedAccount>,
    /// The roles it holds now.
    pub roles: BTreeSet<RoleGrant>,
    /// The ids of the keys it holds now.
    pub live_keys: BTreeSet<String>,
    /// A role that could not be granted or revoked, and why.
    pub role_problem: Option<String>,
    /// Apply stopped on a transient failure of the target app.
    pub transient_failure: bool,
}

/// What was gathered that status reports.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The provider's name.
    pub provider: &'a str,
    /// The account's name in the target app.
    pub account_name: &'a str,
    /// `providerOptions.name`, else the IntegrationAccount's name.
    pub requested_name: &'a str,
    /// The connection, as `Kind/name`.
    pub connection: &'a str,
    /// The output Secret's name.
    pub secret_name: &'a str,
    /// The declared roles, after policy.
    pub desired: &'a BTreeSet<RoleGrant>,
    /// The rotation policy.
    pub schedule: Option<&'a RotationSchedule>,
    /// The account's uid (the jitter seed).
    pub seed: &'a str,
    /// No rotation is due while this holds (a dormant account keysmith
    /// disabled): no next rotation, so nothing wakes the account for one.
    pub rotation_held: bool,
}

/// Status after an apply, and the conditions it sets. `set` are the
/// conditions the reconcile already set (a problem found on the way wins
/// over the summary here).
pub fn after_apply(
    mut status: IntegrationAccountStatus,
    facts: &Facts<'_>,
    applied: &Applied,
    set: &[ConditionUpdate],
    now: Timestamp,
) -> (IntegrationAccountStatus, Vec<ConditionUpdate>) {
    let mut conditions = Vec::new();
    if let Some(current) = applied.account.clone().filter(|a| a.owned) {
        status.account = Some(ExternalAccount {
            provider: facts.provider.to_owned(),
            id: current.id,
            name: Some(current.name),
            account_name: Some(facts.account_name.to_owned()),
            requested_name: Some(facts.requested_name.to_owned()),
            disabled: current.disabled,
            connection: Some(facts.connection.to_owned()),
        });
    }
    status.roles = applied.roles.iter().map(|g| GrantedRole { role: g.role.clone(), scope: g.scope.clone() }).collect();
    if status.account.is_some() && !applied.transient_failure {
        conditions.push(ConditionUpdate::truthy(
            ACCOUNT_READY,
            "Created",
            format!("{} account {} exists", facts.provider, facts.account_name),
        ));
    }
    match &applied.role_problem {
        Some(problem) => conditions.push(ConditionUpdate::falsy(ROLES_SYNCED, "RoleNotGranted", problem.clone())),
        None if applied.roles == *facts.desired => conditions.push(ConditionUpdate::truthy(
            ROLES_SYNCED,
            "Synced",
            format!("the account holds exactly the {} declared role(s)", facts.desired.len()),
        )),
        None => {}
    }
    lifecycle::record(&mut status, KeyEvent::Observed { live: &applied.live_keys }, now);
    let current = status.current_key.clone().filter(|c| applied.live_keys.contains(&c.id));
    status.next_rotation_at = current
        .as_ref()
        .filter(|_| !facts.rotation_held)
        .and_then(|c| plan::next_rotation(facts.schedule, c, facts.seed).map(|t| Time(whole_seconds(t))));
    if !set.iter().chain(&conditions).any(|c| c.type_ == KEY_READY) {
        conditions.push(match &current {
            Some(key) => ConditionUpdate::truthy(
                KEY_READY,
                "Published",
                format!("key {} is published in Secret {}", key.id, facts.secret_name),
            ),
            None => ConditionUpdate::falsy(KEY_READY, "NoKey", "no key has been published yet"),
        });
    }
    (status, conditions)
}

/// Ready, from the other conditions: Suspended, else the first failing
/// one, else Ready once the account, its roles and its key are in place.
pub fn ready(suspended: bool, conditions: &[ConditionUpdate]) -> ConditionUpdate {
    let failing = conditions.iter().find(|c| [ACCOUNT_READY, ROLES_SYNCED, KEY_READY].contains(&c.type_) && !c.status);
    if suspended {
        ConditionUpdate::falsy(READY, "Suspended", "spec.suspend is true: keysmith makes no changes in the target app")
    } else if let Some(first) = failing {
        ConditionUpdate::falsy(READY, first.reason.clone(), first.message.clone())
    } else if conditions
        .iter()
        .filter(|c| [ACCOUNT_READY, ROLES_SYNCED, KEY_READY].contains(&c.type_) && c.status)
        .count()
        >= 3
    {
        ConditionUpdate::truthy(READY, "Ready", "the account, its roles and its key are in place")
    } else {
        ConditionUpdate::falsy(READY, "Reconciling", "keysmith is still working on this account")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::api::{CurrentKey, KeyRecord, KeyState};

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn facts(desired: &BTreeSet<RoleGrant>) -> Facts<'_> {
        Facts {
            provider: "noop",
            account_name: "robot",
            requested_name: "robot",
            connection: "AppConnection/fake",
            secret_name: "robot-key",
            desired,
            schedule: None,
            seed: "uid",
            rotation_held: false,
        }
    }

    fn owned() -> ObservedAccount {
        ObservedAccount { id: "id-1".into(), name: "robot".into(), disabled: false, owned: true, drifted: false }
    }

    fn published(id: &str) -> IntegrationAccountStatus {
        IntegrationAccountStatus {
            current_key: Some(CurrentKey { id: id.into(), issued_at: Time(t(0)), expires_at: None }),
            keys: vec![KeyRecord {
                id: id.into(),
                state: KeyState::Published,
                created_at: Time(t(0)),
                published_at: Some(Time(t(0))),
                retiring_at: None,
                revoke_at: None,
                revoked_at: None,
                expires_at: None,
                last_used_at: None,
                use_baseline_at: None,
                restarted_at: None,
                reason: None,
            }],
            ..Default::default()
        }
    }

    fn find<'a>(conditions: &'a [ConditionUpdate], type_: &str) -> &'a ConditionUpdate {
        conditions.iter().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_}"))
    }

    #[test]
    fn a_converged_account_reports_all_three_and_then_ready() {
        let desired: BTreeSet<RoleGrant> = [RoleGrant { role: "view".into(), scope: None }].into();
        let applied = Applied {
            account: Some(owned()),
            roles: desired.clone(),
            live_keys: ["k1".to_string()].into(),
            ..Default::default()
        };
        let (status, conditions) = after_apply(published("k1"), &facts(&desired), &applied, &[], t(60));
        assert_eq!(status.account.as_ref().unwrap().connection.as_deref(), Some("AppConnection/fake"));
        assert_eq!(status.roles.len(), 1);
        assert_eq!(find(&conditions, KEY_READY).reason, "Published");
        assert!(ready(false, &conditions).status);
        assert_eq!(ready(true, &conditions).reason, "Suspended");
        // Only the three conditions Ready summarises count towards it.
        let mut two = conditions.clone();
        two.retain(|c| c.type_ != ROLES_SYNCED);
        two.push(ConditionUpdate::truthy("RolloutConfirmed", "RolloutConfirmed", "rolled out"));
        assert_eq!(ready(false, &two).reason, "Reconciling");
    }

    /// A dormant account keysmith disabled has an overdue rotation held
    /// back: no next rotation in status, so the wake-up that follows from
    /// status is not "now" (which would observe the target every second).
    #[test]
    fn a_held_rotation_is_no_next_rotation_and_wakes_nothing() {
        let desired = BTreeSet::new();
        let schedule =
            RotationSchedule::from_spec(&serde_json::from_value(serde_json::json!({"rotateEvery": "1h"})).unwrap())
                .unwrap();
        let applied = Applied { account: Some(owned()), live_keys: ["k1".to_string()].into(), ..Default::default() };
        let due = Facts { schedule: Some(&schedule), ..facts(&desired) };
        let (status, _) = after_apply(published("k1"), &due, &applied, &[], t(7200));
        let overdue = status.next_rotation_at.as_ref().map(|t| t.0).expect("a rotation, overdue");
        assert!(overdue < t(7200));
        let wake = lifecycle::wake(None, &status.keys, Some(overdue), t(7200));
        assert_eq!(lifecycle::delay_until(wake.next, t(7200), Duration::from_secs(600)), Duration::from_secs(1));

        let held = Facts { rotation_held: true, ..due };
        let (status, _) = after_apply(published("k1"), &held, &applied, &[], t(7200));
        assert_eq!(status.next_rotation_at, None);
        let wake = lifecycle::wake(None, &status.keys, None, t(7200));
        assert_eq!(lifecycle::delay_until(wake.next, t(7200), Duration::from_secs(600)), Duration::from_secs(600));
    }

    #[test]
    fn a_key_gone_from_the_target_is_no_key_and_no_next_rotation() {
        let desired = BTreeSet::new();
        let applied = Applied { account: Some(owned()), ..Default::default() };
        let (status, conditions) = after_apply(published("k1"), &facts(&desired), &applied, &[], t(60));
        assert_eq!(status.keys[0].state, KeyState::Revoked);
        assert_eq!(status.keys[0].reason.as_deref(), Some("GoneFromTarget"));
        assert!(status.next_rotation_at.is_none());
        assert_eq!(find(&conditions, KEY_READY).reason, "NoKey");
        assert_eq!(ready(false, &conditions).reason, "NoKey");
    }

    #[test]
    fn a_problem_already_set_is_not_papered_over() {
        let desired = BTreeSet::new();
        let set = [ConditionUpdate::falsy(KEY_READY, "SecretNotOwned", "not ours")];
        let applied = Applied { account: Some(owned()), live_keys: ["k1".to_string()].into(), ..Default::default() };
        let (_, conditions) = after_apply(published("k1"), &facts(&desired), &applied, &set, t(60));
        assert!(conditions.iter().all(|c| c.type_ != KEY_READY));
    }

    #[test]
    fn roles_short_of_the_declared_ones_are_not_synced_and_a_refusal_says_which() {
        let desired: BTreeSet<RoleGrant> = [RoleGrant { role: "view".into(), scope: None }].into();
        let applied = Applied { account: Some(owned()), ..Default::default() };
        let (_, conditions) = after_apply(published("k1"), &facts(&desired), &applied, &[], t(60));
        assert!(conditions.iter().all(|c| c.type_ != ROLES_SYNCED));
        let applied = Applied { role_problem: Some("view: refused".into()), ..applied };
        let (_, conditions) = after_apply(published("k1"), &facts(&desired), &applied, &[], t(60));
        assert_eq!(find(&conditions, ROLES_SYNCED).message, "view: refused");
        assert_eq!(ready(false, &conditions).reason, "RoleNotGranted");
    }

    #[test]
    fn a_transient_failure_does_not_claim_the_account_is_ready() {
        let desired = BTreeSet::new();
        let applied = Applied {
            account: Some(owned()),
            live_keys: ["k1".to_string()].into(),
            transient_failure: true,
            ..Default::default()
        };
        let (_, conditions) = after_apply(published("k1"), &facts(&desired), &applied, &[], t(60));
        assert!(conditions.iter().all(|c| c.type_ != ACCOUNT_READY));
        assert_eq!(ready(false, &conditions).reason, "Reconciling");
    }
}
