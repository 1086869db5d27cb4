//! Dormant keys and accounts, from when the target app says each key was
//! last used. Pure: the reconciler records what it observed and asks here.
//!
//! keysmith verifies a new key by using it before it publishes it, so a use
//! counts only once it is later than the key's publication plus
//! [`USE_MARGIN`] (for the target's clock): a key nobody picked up is never
//! taken for one in use.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{conditions::ConditionUpdate, plan::saturating_add};
use crate::{
    api::{condition_types::DORMANT, IntegrationAccountStatus, KeyState},
    provider::ObservedKey,
};

/// How much later than a key's publication a use must be to count.
pub const USE_MARGIN: Duration = Duration::from_secs(10);
/// Setting this annotation to a new value restarts the dormancy clock.
pub const REACTIVATE_ANNOTATION: &str = "keysmith.dev/reactivate";

/// Acts on the `keysmith.dev/reactivate` annotation: a value not acted on
/// yet restarts the dormancy clock at `now`. Whether it did.
pub fn reactivate(status: &mut IntegrationAccountStatus, request: Option<&str>, now: Timestamp) -> bool {
    match request {
        Some(value) if status.last_reactivation_request.as_deref() != Some(value) => {
            status.last_reactivation_request = Some(value.to_owned());
            status.reactivated_at = Some(Time(now));
            true
        }
        _ => false,
    }
}

/// Records each observed key's last use on its record, and the latest on
/// the account, keeping earlier ones (a revoked key's use still counts).
///
/// The first look after a key's publication takes what the target reports
/// as the key's baseline: keysmith's own verification, on the target's
/// clock, so a target whose clock runs ahead does not make it look like
/// use. A use counts once it is later than both the baseline and the
/// publication plus [`USE_MARGIN`] (a target that reports late would show
/// the verification only after that first look).
pub fn record_use(status: &mut IntegrationAccountStatus, observed: &[ObservedKey]) {
    for record in status.keys.iter_mut().filter(|r| r.state != KeyState::Revoked) {
        let Some(published) = record.published_at.as_ref().map(|t| t.0) else { continue };
        let Some(key) = observed.iter().find(|k| k.id == record.id) else { continue };
        let Some(baseline) = record.use_baseline_at.as_ref().map(|t| t.0) else {
            record.use_baseline_at = Some(Time(key.last_used.map_or(published, |used| used.max(published))));
            continue;
        };
        let floor = baseline.max(saturating_add(published, USE_MARGIN));
        if let Some(used) = key.last_used.filter(|used| *used > floor) {
            if record.last_used_at.as_ref().is_none_or(|t| t.0 < used) {
                record.last_used_at = Some(Time(used));
            }
        }
    }
    let latest = status.keys.iter().filter_map(|r| r.last_used_at.as_ref().map(|t| t.0)).max();
    if let Some(latest) = latest {
        if status.last_used_at.as_ref().is_none_or(|t| t.0 < latest) {
            status.last_used_at = Some(Time(latest));
        }
    }
}

/// What the clock and the last use say about an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dormancy {
    /// No key was used for `dormantAfter`.
    pub dormant: bool,
    /// When the account was last used, if ever.
    pub last_used: Option<Timestamp>,
    /// Since when it counts as unused: its last use, its reactivation, or
    /// its creation, whichever is latest.
    pub since: Timestamp,
    /// Why `since` is what it is.
    pub since_what: &'static str,
    /// When it is (or becomes) dormant unless used.
    pub from: Timestamp,
}

/// Whether the account is dormant at `now`, having been created at
/// `created_at`.
pub fn assess(now: Timestamp, after: Duration, status: &IntegrationAccountStatus, created_at: Timestamp) -> Dormancy {
    let last_used = status.last_used_at.as_ref().map(|t| t.0);
    let candidates = [
        (Some(created_at), "it was created"),
        (status.reactivated_at.as_ref().map(|t| t.0), "it was reactivated"),
        (last_used, "its last use"),
    ];
    let (since, since_what) = candidates
        .into_iter()
        .filter_map(|(t, what)| t.map(|t| (t, what)))
        .max_by_key(|(t, _)| *t)
        .unwrap_or((created_at, "it was created"));
    let from = saturating_add(since, after);
    Dormancy { dormant: now >= from, last_used, since, since_what, from }
}

/// The `Dormant` condition for an assessment.
pub fn condition(dormancy: &Dormancy, after: Duration, disabled: bool) -> ConditionUpdate {
    let after = humantime(after);
    if dormancy.dormant {
        let then = if disabled {
            "; keysmith disabled it (set the keysmith.dev/reactivate annotation to a new value to enable it again)"
        } else {
            ""
        };
        ConditionUpdate::truthy(
            DORMANT,
            "Unused",
            format!(
                "no key of this account was used since {} ({}), longer than dormantAfter ({after}){then}",
                whole(dormancy.since),
                dormancy.since_what
            ),
        )
    } else {
        let used = match dormancy.last_used {
            Some(t) => format!("a key was last used at {}", whole(t)),
            None => "no key has been used yet".to_owned(),
        };
        ConditionUpdate::falsy(
            DORMANT,
            "InUse",
            format!("{used}; dormant from {} if unused until then (dormantAfter {after})", whole(dormancy.from)),
        )
    }
}

/// The `Dormant` condition where the provider cannot tell.
pub fn not_reported(provider: &str) -> ConditionUpdate {
    ConditionUpdate::falsy(
        DORMANT,
        "NotReported",
        format!("the {provider} provider does not report when keys are used, so keysmith cannot tell whether this account is dormant"),
    )
}

fn whole(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

fn humantime(d: Duration) -> String {
    jiff::SignedDuration::try_from(d).map(|d| format!("{d:#}")).unwrap_or_else(|_| format!("{}s", d.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::KeyRecord;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn record(id: &str, state: KeyState, published: Option<i64>) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            state,
            created_at: Time(t(0)),
            published_at: published.map(|s| Time(t(s))),
            retiring_at: None,
            revoke_at: None,
            revoked_at: None,
            expires_at: None,
            last_used_at: None,
            use_baseline_at: None,
            restarted_at: None,
            reason: None,
        }
    }

    fn used(id: &str, at: Option<i64>) -> ObservedKey {
        ObservedKey { id: id.into(), created_at: Some(t(0)), last_used: at.map(t) }
    }

    #[test]
    fn verification_before_publication_is_not_use_and_later_uses_are_kept() {
        let mut status = IntegrationAccountStatus {
            keys: vec![record("a", KeyState::Published, Some(100)), record("b", KeyState::Pending, None)],
            ..Default::default()
        };
        // The first look: keysmith's own check, just before publication.
        record_use(&mut status, &[used("a", Some(99)), used("b", Some(150))]);
        assert_eq!(status.keys[0].use_baseline_at, Some(Time(t(100))));
        record_use(&mut status, &[used("a", Some(105))]);
        assert_eq!(status.keys[0].last_used_at, None, "within the margin after publication");
        assert_eq!(status.last_used_at, None, "an unpublished key's use does not count");
        record_use(&mut status, &[used("a", Some(500))]);
        assert_eq!(status.keys[0].last_used_at, Some(Time(t(500))));
        // An older report never moves it back; the account keeps the latest.
        record_use(&mut status, &[used("a", Some(300))]);
        assert_eq!(status.keys[0].last_used_at, Some(Time(t(500))));
        status.keys[0].state = KeyState::Revoked;
        record_use(&mut status, &[]);
        assert_eq!(status.last_used_at, Some(Time(t(500))), "a revoked key's use still counts");
    }

    #[test]
    fn a_target_clock_running_ahead_or_reporting_late_never_makes_verification_use() {
        // The target's clock is 40 s ahead: keysmith's check, made before
        // publication at t(100), shows as t(139).
        let mut ahead =
            IntegrationAccountStatus { keys: vec![record("a", KeyState::Published, Some(100))], ..Default::default() };
        record_use(&mut ahead, &[used("a", Some(139))]);
        record_use(&mut ahead, &[used("a", Some(139))]);
        assert_eq!(ahead.last_used_at, None, "the same report again is not use");
        record_use(&mut ahead, &[used("a", Some(200))]);
        assert_eq!(ahead.last_used_at, Some(Time(t(200))), "a later one is");
        // The target reports late: nothing at the first look, the check
        // (at t(99)) only afterwards.
        let mut late =
            IntegrationAccountStatus { keys: vec![record("a", KeyState::Published, Some(100))], ..Default::default() };
        record_use(&mut late, &[used("a", None)]);
        record_use(&mut late, &[used("a", Some(99))]);
        assert_eq!(late.last_used_at, None);
        // A key not listed at all sets no baseline.
        let mut unseen =
            IntegrationAccountStatus { keys: vec![record("a", KeyState::Published, Some(100))], ..Default::default() };
        record_use(&mut unseen, &[]);
        assert_eq!(unseen.keys[0].use_baseline_at, None);
    }

    #[test]
    fn dormancy_counts_from_the_latest_of_creation_reactivation_and_use() {
        let day = Duration::from_secs(86_400);
        let mut status = IntegrationAccountStatus::default();
        let fresh = assess(t(1000), day, &status, t(0));
        assert!(!fresh.dormant && fresh.since == t(0) && fresh.from == t(86_400), "{fresh:?}");
        assert!(assess(t(86_400), day, &status, t(0)).dormant, "never used for a day after creation");
        status.last_used_at = Some(Time(t(50_000)));
        let used = assess(t(86_400), day, &status, t(0));
        assert!(!used.dormant && used.since_what == "its last use", "{used:?}");
        assert!(assess(t(136_400), day, &status, t(0)).dormant);
        status.reactivated_at = Some(Time(t(136_400)));
        let woken = assess(t(136_401), day, &status, t(0));
        assert!(!woken.dormant && woken.since_what == "it was reactivated", "{woken:?}");
    }

    #[test]
    fn the_condition_says_since_when_and_what_to_do() {
        let day = Duration::from_secs(86_400);
        let status = IntegrationAccountStatus::default();
        let dormant = assess(t(2 * 86_400), day, &status, t(0));
        let c = condition(&dormant, day, true);
        assert!(c.status && c.reason == "Unused", "{c:?}");
        assert!(c.message.contains("it was created") && c.message.contains("keysmith.dev/reactivate"), "{}", c.message);
        let c = condition(&assess(t(10), day, &status, t(0)), day, false);
        assert!(!c.status && c.message.contains("no key has been used yet"), "{}", c.message);
    }
}
