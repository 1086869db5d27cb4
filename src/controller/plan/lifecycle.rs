//! The key lifecycle, decided in one place:
//!
//! ```text
//! Pending ──issued──▶ Issued ──published──▶ Published ──next key published──▶ Retiring
//!    │                  │                                                     │
//!    └──────────────────┴───────────── revoked (or gone from target) ─────────┴──▶ Revoked
//! ```
//!
//! Apply performs the calls; after each one it tells [`record`] what
//! happened, and `record` alone changes `status.keys`, `status.currentKey`
//! and `status.pending`. When the previous key is revoked, how long it
//! stays valid and when the reconcile next wakes are decided here too.

use std::{collections::BTreeSet, time::Duration};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{saturating_add, RotationReason, DEFAULT_GRACE_PERIOD};
use crate::{
    api::{CurrentKey, IntegrationAccountStatus, KeyRecord, KeyState, PendingOperation},
    schedule::RotationSchedule,
};

/// How many revoked key records status keeps (the newest).
pub const REVOKED_RECORDS_KEPT: usize = 5;

/// What just happened to a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyEvent<'a> {
    /// A key is about to be issued; recorded (and written) before the call,
    /// so a crash between issuing and publishing leaves a record to find.
    Issuing {
        /// The id keysmith asked for.
        id: &'a str,
        /// Why.
        reason: RotationReason,
    },
    /// The target app issued it, under `id` (which may differ from `pending`).
    Issued {
        /// The id recorded when issuing.
        pending: &'a str,
        /// The id the target app gave it.
        id: &'a str,
        /// When it expires by itself, if it does.
        expires_at: Option<Timestamp>,
    },
    /// An issued key will not be published (it failed verification, or
    /// could not be rendered): nothing is pending any more.
    Abandoned,
    /// The key is in the output Secret: it is the current key now, and the
    /// key published before it retires until `revoke_previous_at`.
    Published {
        /// The key.
        id: &'a str,
        /// When it was issued.
        issued_at: Timestamp,
        /// When it expires by itself, if it does.
        expires_at: Option<Timestamp>,
        /// When the previous key is to be revoked.
        revoke_previous_at: Timestamp,
    },
    /// The key was revoked in the target app (or was already gone).
    Revoked {
        /// The key.
        id: &'a str,
        /// Why (a [`super::RevokeReason`] or a failure's name).
        reason: &'a str,
    },
    /// The workloads reading the Secret were restarted for this key.
    Restarted {
        /// The key.
        id: &'a str,
    },
    /// The target app now holds exactly these keys: a published, retiring or
    /// issued key it no longer holds was revoked by someone else, and a key
    /// recorded as about to be issued that it does not hold never was.
    Observed {
        /// The ids of the keys the target holds.
        live: &'a BTreeSet<String>,
    },
}

/// Drops seconds' fractions: status times are whole seconds.
pub fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

fn blank(id: &str, state: KeyState, now: Timestamp) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        state,
        created_at: Time(now),
        published_at: None,
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

/// The one place a key record changes state.
pub fn record(status: &mut IntegrationAccountStatus, event: KeyEvent<'_>, now: Timestamp) {
    match event {
        KeyEvent::Issuing { id, reason } => {
            status.pending =
                Some(PendingOperation { operation: "IssueKey".into(), token: id.into(), started_at: Time(now) });
            status.keys.push(KeyRecord { reason: Some(reason.as_str().into()), ..blank(id, KeyState::Pending, now) });
        }
        KeyEvent::Issued { pending, id, expires_at } => {
            if let Some(record) = status.keys.iter_mut().find(|r| r.id == pending) {
                record.id = id.into();
                record.state = KeyState::Issued;
                record.expires_at = expires_at.map(|t| Time(whole_seconds(t)));
            }
        }
        KeyEvent::Abandoned => status.pending = None,
        KeyEvent::Published { id, issued_at, expires_at, revoke_previous_at } => {
            for record in &mut status.keys {
                if record.id == id {
                    record.state = KeyState::Published;
                    record.published_at = Some(Time(now));
                } else if record.state == KeyState::Published {
                    record.state = KeyState::Retiring;
                    record.retiring_at = Some(Time(now));
                    record.revoke_at = Some(Time(revoke_previous_at));
                    record.reason = Some("Rotated".into());
                }
            }
            status.current_key = Some(CurrentKey {
                id: id.to_owned(),
                issued_at: Time(whole_seconds(issued_at)),
                expires_at: expires_at.map(|t| Time(whole_seconds(t))),
            });
            status.pending = None;
        }
        KeyEvent::Revoked { id, reason } => {
            match status.keys.iter_mut().find(|r| r.id == id) {
                Some(record) => {
                    record.state = KeyState::Revoked;
                    record.revoked_at = Some(Time(now));
                    record.reason = Some(reason.into());
                }
                None => status.keys.push(KeyRecord {
                    revoked_at: Some(Time(now)),
                    reason: Some(reason.into()),
                    ..blank(id, KeyState::Revoked, now)
                }),
            }
            if status.pending.as_ref().is_some_and(|p| p.token == id) {
                status.pending = None;
            }
        }
        KeyEvent::Restarted { id } => {
            if let Some(record) = status.keys.iter_mut().find(|r| r.id == id) {
                record.restarted_at = Some(Time(now));
            }
        }
        KeyEvent::Observed { live } => {
            for record in &mut status.keys {
                if live.contains(&record.id) {
                    continue;
                }
                match record.state {
                    KeyState::Published | KeyState::Retiring | KeyState::Issued => {
                        record.reason.get_or_insert_with(|| "GoneFromTarget".into());
                    }
                    // Recorded before an issue that never happened (the
                    // process stopped first, or the call failed).
                    KeyState::Pending => record.reason = Some("NotIssued".into()),
                    KeyState::Revoked => continue,
                }
                record.state = KeyState::Revoked;
                record.revoked_at.get_or_insert(Time(now));
            }
            let token_live = |token: &str| {
                status.keys.iter().any(|r| r.id == token && matches!(r.state, KeyState::Pending | KeyState::Issued))
            };
            if status.pending.as_ref().is_some_and(|p| !token_live(&p.token)) {
                status.pending = None;
            }
            prune(&mut status.keys);
        }
    }
}

/// Keeps every live record and the newest [`REVOKED_RECORDS_KEPT`] revoked ones.
fn prune(records: &mut Vec<KeyRecord>) {
    records.sort_by_key(|r| std::cmp::Reverse(r.created_at.0));
    let mut revoked_seen = 0;
    records.retain(|r| {
        if r.state == KeyState::Revoked {
            revoked_seen += 1;
            revoked_seen <= REVOKED_RECORDS_KEPT
        } else {
            true
        }
    });
}

/// When the key published before one published `now` is to be revoked:
/// after the policy's grace period (one hour without a policy), or at once
/// when the key limit leaves no room for both.
pub fn revoke_previous_at(now: Timestamp, schedule: Option<&RotationSchedule>, at_once: bool) -> Timestamp {
    if at_once {
        return now;
    }
    let grace = schedule.map(RotationSchedule::grace_period).unwrap_or(DEFAULT_GRACE_PERIOD);
    whole_seconds(saturating_add(now, grace))
}

/// When the reconcile is next due, after a plan ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wake {
    /// The next revocation (or other plan wake-up); the converged memo stands until then.
    pub revocation: Option<Timestamp>,
    /// The earliest of that and the next rotation.
    pub next: Option<Timestamp>,
}

/// The next wake-up: the plan's own, the next revocation of a retiring key
/// (one retired by this pass included), and the next rotation.
/// `planned_at` is the time the plan was made (the pass's `now`, which
/// revocation times of keys retired in the pass count from). A revocation
/// time before it is not one: the plan saw that key and either revoked it
/// or kept it on purpose (a rollout to wait for) and said when to look
/// again. A key retired in the pass is due at or after it (at it with a
/// grace period under a second), so it counts even when the pass outlasted
/// the grace period: the wake-up is then due at once, and the next pass,
/// planned later, no longer counts it, so this never loops. Measured
/// against the clock at the end of the pass instead, that key was skipped
/// and waited for the drift check (found by the zero-downtime campaign,
/// RELIABILITY.md).
pub fn wake(
    plan_wake: Option<Timestamp>,
    records: &[KeyRecord],
    next_rotation: Option<Timestamp>,
    planned_at: Timestamp,
) -> Wake {
    let revocation = plan_wake
        .into_iter()
        .chain(
            records
                .iter()
                .filter(|k| k.state == KeyState::Retiring)
                .filter_map(|k| k.revoke_at.as_ref().map(|t| t.0))
                .filter(|at| *at >= planned_at),
        )
        .min();
    Wake { revocation, next: revocation.into_iter().chain(next_rotation).min() }
}

/// How long until `wake`, plus a second, and never longer than `ceiling`
/// (the drift check).
pub fn delay_until(wake: Option<Timestamp>, now: Timestamp, ceiling: Duration) -> Duration {
    wake.map(|t| Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO) + Duration::from_secs(1))
        .unwrap_or(ceiling)
        .min(ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn rec(id: &str, state: KeyState) -> KeyRecord {
        blank(id, state, t(0))
    }

    fn states(status: &IntegrationAccountStatus) -> Vec<(String, KeyState)> {
        let mut v: Vec<_> = status.keys.iter().map(|r| (r.id.clone(), r.state)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The lifecycle as a table: name → records before → event → records
    /// after (id, state), current key and pending after.
    #[test]
    fn every_transition_as_a_table() {
        use KeyState::*;
        let live: BTreeSet<String> = ["k1".to_string()].into();
        type Row<'a> = (&'a str, Vec<KeyRecord>, KeyEvent<'a>, Vec<(&'a str, KeyState)>, Option<&'a str>, bool);
        let rows: Vec<Row<'_>> = vec![
            (
                "issuing records a pending key and the intent",
                vec![rec("k1", Published)],
                KeyEvent::Issuing { id: "k2", reason: RotationReason::Scheduled },
                vec![("k1", Published), ("k2", Pending)],
                None,
                true,
            ),
            (
                "issued takes the target's id",
                vec![rec("k2", Pending)],
                KeyEvent::Issued { pending: "k2", id: "AKIA2", expires_at: None },
                vec![("AKIA2", Issued)],
                None,
                true,
            ),
            (
                "published makes it current and retires the previous key",
                vec![rec("k1", Published), rec("k2", Issued)],
                KeyEvent::Published { id: "k2", issued_at: t(0), expires_at: None, revoke_previous_at: t(600) },
                vec![("k1", Retiring), ("k2", Published)],
                Some("k2"),
                false,
            ),
            (
                "a key already retiring stays retiring",
                vec![rec("k0", Retiring), rec("k1", Published), rec("k2", Issued)],
                KeyEvent::Published { id: "k2", issued_at: t(0), expires_at: None, revoke_previous_at: t(600) },
                vec![("k0", Retiring), ("k1", Retiring), ("k2", Published)],
                Some("k2"),
                false,
            ),
            (
                "revoked",
                vec![rec("k1", Retiring)],
                KeyEvent::Revoked { id: "k1", reason: "GracePeriodEnded" },
                vec![("k1", Revoked)],
                None,
                true,
            ),
            (
                "an untracked key revoked gets a record",
                vec![],
                KeyEvent::Revoked { id: "stray", reason: "Untracked" },
                vec![("stray", Revoked)],
                None,
                true,
            ),
            (
                "abandoned clears the intent only",
                vec![rec("k2", Revoked)],
                KeyEvent::Abandoned,
                vec![("k2", Revoked)],
                None,
                false,
            ),
            (
                "observed: keys gone from the target are revoked; a pending one never issued too",
                vec![rec("k0", Published), rec("k1", Retiring), rec("k2", Pending)],
                KeyEvent::Observed { live: &live },
                vec![("k0", Revoked), ("k1", Retiring), ("k2", Revoked)],
                None,
                false,
            ),
        ];
        for (name, before, event, after, current, pending_after) in rows {
            let mut status = IntegrationAccountStatus {
                keys: before,
                pending: Some(PendingOperation {
                    operation: "IssueKey".into(),
                    token: "x".into(),
                    started_at: Time(t(0)),
                }),
                ..Default::default()
            };
            record(&mut status, event, t(60));
            let mut want: Vec<(String, KeyState)> = after.into_iter().map(|(id, s)| (id.to_string(), s)).collect();
            want.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(states(&status), want, "{name}");
            assert_eq!(status.current_key.as_ref().map(|c| c.id.as_str()), current, "{name}");
            assert_eq!(status.pending.is_some(), pending_after, "{name}");
        }
    }

    #[test]
    fn publishing_times_the_previous_keys_revocation() {
        let mut status = IntegrationAccountStatus {
            keys: vec![rec("k1", KeyState::Published), rec("k2", KeyState::Issued)],
            ..Default::default()
        };
        record(
            &mut status,
            KeyEvent::Published { id: "k2", issued_at: t(0), expires_at: Some(t(7200)), revoke_previous_at: t(660) },
            t(60),
        );
        let old = status.keys.iter().find(|r| r.id == "k1").unwrap();
        assert_eq!(old.revoke_at, Some(Time(t(660))));
        assert_eq!(old.retiring_at, Some(Time(t(60))));
        assert_eq!(old.reason.as_deref(), Some("Rotated"));
        assert_eq!(status.current_key.unwrap().expires_at, Some(Time(t(7200))));
    }

    #[test]
    fn revocation_of_the_pending_key_clears_the_intent() {
        let mut status = IntegrationAccountStatus { keys: vec![rec("k2", KeyState::Pending)], ..Default::default() };
        record(&mut status, KeyEvent::Issuing { id: "k3", reason: RotationReason::Initial }, t(0));
        record(&mut status, KeyEvent::Revoked { id: "k3", reason: "VerificationFailed" }, t(1));
        assert!(status.pending.is_none());
    }

    #[test]
    fn an_intent_whose_key_is_live_is_kept_and_one_never_issued_is_closed() {
        let live: BTreeSet<String> = ["k2".to_string()].into();
        let mut status = IntegrationAccountStatus::default();
        record(&mut status, KeyEvent::Issuing { id: "k2", reason: RotationReason::Initial }, t(0));
        record(&mut status, KeyEvent::Observed { live: &live }, t(1));
        assert!(status.pending.is_some(), "issued, not yet published: still pending");
        assert_eq!(status.keys[0].state, KeyState::Pending);
        record(&mut status, KeyEvent::Observed { live: &BTreeSet::new() }, t(2));
        assert!(status.pending.is_none());
        assert_eq!((status.keys[0].state, status.keys[0].reason.as_deref()), (KeyState::Revoked, Some("NotIssued")));
    }

    #[test]
    fn only_the_newest_revoked_records_are_kept() {
        let mut status = IntegrationAccountStatus::default();
        for i in 0..9 {
            status.keys.push(KeyRecord { created_at: Time(t(i)), ..rec(&format!("r{i}"), KeyState::Revoked) });
        }
        status.keys.push(rec("live", KeyState::Published));
        let live: BTreeSet<String> = ["live".to_string()].into();
        record(&mut status, KeyEvent::Observed { live: &live }, t(100));
        let ids: Vec<&str> = status.keys.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["r8", "r7", "r6", "r5", "r4", "live"]);
    }

    #[test]
    fn the_previous_key_lives_for_the_grace_period_or_not_at_all() {
        assert_eq!(revoke_previous_at(t(0), None, false), t(3600));
        assert_eq!(revoke_previous_at(t(0), None, true), t(0));
    }

    #[test]
    fn wake_is_the_earliest_of_plan_revocation_and_rotation() {
        let retiring = KeyRecord { revoke_at: Some(Time(t(300))), ..rec("k1", KeyState::Retiring) };
        let w = wake(None, std::slice::from_ref(&retiring), Some(t(200)), t(0));
        assert_eq!(w, Wake { revocation: Some(t(300)), next: Some(t(200)) });
        let w = wake(Some(t(100)), std::slice::from_ref(&retiring), None, t(0));
        assert_eq!(w, Wake { revocation: Some(t(100)), next: Some(t(100)) });
        assert_eq!(wake(None, &[], None, t(0)), Wake { revocation: None, next: None });
        // Past its revocation time and still retiring (kept for a rollout):
        // the plan's own wake-up decides, not a busy loop.
        let w = wake(Some(t(305)), std::slice::from_ref(&retiring), None, t(301));
        assert_eq!(w.revocation, Some(t(305)));
        // Retired in a pass planned at 298 that ended after 300: still due;
        // and with a grace period under a second, due at the plan's time.
        let w = wake(None, std::slice::from_ref(&retiring), None, t(298));
        assert_eq!(w.revocation, Some(t(300)));
        let w = wake(None, std::slice::from_ref(&retiring), None, t(300));
        assert_eq!(w.revocation, Some(t(300)));
        let ceiling = Duration::from_secs(600);
        assert_eq!(delay_until(None, t(0), ceiling), ceiling);
        assert_eq!(delay_until(Some(t(10)), t(0), ceiling), Duration::from_secs(11));
        assert_eq!(delay_until(Some(t(-10)), t(0), ceiling), Duration::from_secs(1));
        assert_eq!(delay_until(Some(t(10_000)), t(0), ceiling), ceiling);
    }
}
