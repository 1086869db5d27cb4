//! The planner under arbitrary input: any observation of the target app
//! (consistent with what the observe step can return), any status, any
//! Secret, any rotation policy the parser accepts, any clock. Properties:
//!
//! - it never panics;
//! - it never revokes the key workloads read before a successor is
//!   published: the key the output Secret holds (where the key limit leaves
//!   room for two), and the current key unless the Secret holds another;
//! - a rotation never leaves more live keys than the key limit;
//! - the key lifecycle applied to its decisions keeps at most one current
//!   key, and `status.keys` bounded.
//!
//! `PROPTEST_CASES` raises the number of cases (default 2000 here).

use std::{collections::BTreeSet, time::Duration};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use keysmith::{
    api::{CurrentKey, IntegrationAccountStatus, KeyRecord, KeyRotationPolicySpec, KeyState},
    controller::plan::{
        self,
        lifecycle::{self, KeyEvent},
        Action, HeldKey, PlanInput, Rollout,
    },
    provider::{ObservedAccount, ObservedKey, RoleGrant},
    schedule::RotationSchedule,
};
use proptest::prelude::*;

const IDS: [&str; 5] = ["k0", "k1", "k2", "k3", "k4"];

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn state() -> impl Strategy<Value = KeyState> {
    prop_oneof![
        Just(KeyState::Pending),
        Just(KeyState::Issued),
        Just(KeyState::Published),
        Just(KeyState::Retiring),
        Just(KeyState::Revoked),
    ]
}

fn record(id: &'static str) -> impl Strategy<Value = KeyRecord> {
    (
        state(),
        0i64..100_000,
        proptest::option::of(0i64..200_000),
        proptest::option::of(0i64..200_000),
        proptest::option::of(0i64..200_000),
    )
        .prop_map(move |(state, created, retiring, revoke, used)| KeyRecord {
            id: id.into(),
            state,
            created_at: Time(t(created)),
            published_at: None,
            retiring_at: retiring.map(|s| Time(t(s))),
            revoke_at: revoke.map(|s| Time(t(s))),
            revoked_at: None,
            expires_at: None,
            last_used_at: used.map(|s| Time(t(s))),
            use_baseline_at: None,
            restarted_at: None,
            reason: None,
        })
}

fn schedule() -> impl Strategy<Value = Option<RotationSchedule>> {
    let specs = [
        serde_json::json!({"rotateEvery": "1h", "gracePeriod": "10m"}),
        serde_json::json!({"rotateEvery": "24h", "gracePeriod": "1h", "maxKeyAge": "2h"}),
        serde_json::json!({"schedule": "0 3 * * *", "timeZone": "Europe/Paris", "gracePeriod": "0s"}),
        serde_json::json!({"rotateEvery": "720h", "jitter": "1h"}),
        serde_json::json!({"rotateEvery": "1h", "gracePeriod": "5m",
            "restartTargets": [{"kind": "Deployment", "name": "app"}], "confirmRollout": {"maxWait": "20m"}}),
    ];
    proptest::option::of(proptest::sample::select(specs.to_vec())).prop_map(|spec| {
        spec.map(|spec| {
            let spec: KeyRotationPolicySpec = serde_json::from_value(spec).unwrap();
            RotationSchedule::from_spec(&spec).unwrap()
        })
    })
}

fn roles() -> impl Strategy<Value = BTreeSet<RoleGrant>> {
    proptest::collection::btree_set(
        proptest::sample::select(vec!["view", "edit", "admin"]).prop_map(|r| RoleGrant { role: r.into(), scope: None }),
        0..3,
    )
}

#[derive(Debug, Clone)]
struct Input {
    now: Timestamp,
    account: Option<ObservedAccount>,
    desired: BTreeSet<RoleGrant>,
    observed_roles: BTreeSet<RoleGrant>,
    keys: Vec<ObservedKey>,
    records: Vec<KeyRecord>,
    current: Option<CurrentKey>,
    secret_key: Option<String>,
    schedule: Option<RotationSchedule>,
    request: Option<String>,
    last_request: Option<String>,
    max_keys: usize,
    held: Option<String>,
    keys_blocked: bool,
    rollout: Option<Rollout>,
    disable_dormant: bool,
    revoke_unused_after: Option<Duration>,
}

fn input() -> impl Strategy<Value = Input> {
    let account = proptest::option::of((any::<bool>(), any::<bool>(), any::<bool>())).prop_map(|a| {
        a.map(|(owned, disabled, drifted)| ObservedAccount {
            id: "id".into(),
            name: "robot".into(),
            disabled,
            owned,
            drifted,
        })
    });
    let ids = proptest::sample::select(IDS.to_vec());
    (
        (0i64..300_000, account, roles(), roles()),
        (
            proptest::sample::subsequence(IDS.to_vec(), 0..=5),
            proptest::collection::vec(ids.clone().prop_flat_map(record), 0..6),
            proptest::option::of((ids.clone(), 0i64..200_000, proptest::option::of(1i64..200_000))),
            proptest::option::of(ids.clone()),
        ),
        (
            schedule(),
            proptest::option::of(proptest::sample::select(vec!["a", "b"])),
            proptest::option::of(proptest::sample::select(vec!["a", "b"])),
            1usize..4,
            proptest::option::of(ids),
            proptest::option::of(any::<bool>()),
            any::<bool>(),
        ),
        (any::<bool>(), proptest::option::of(1u64..5_000)),
    )
        .prop_map(
            |(
                (now, account, desired, observed_roles),
                (keys, mut records, current, secret_key),
                (schedule, request, last_request, max_keys, held, rollout, keys_blocked),
                (disable_dormant, revoke_unused_after),
            )| {
                // What observe_target can return: roles and keys only for an
                // account keysmith owns.
                let owned = account.as_ref().is_some_and(|a| a.owned);
                let keys = if owned {
                    keys.into_iter()
                        .map(|id| ObservedKey { last_used: None, id: id.into(), created_at: None })
                        .collect()
                } else {
                    vec![]
                };
                // Status holds at most one record per key id.
                let mut seen = BTreeSet::new();
                records.retain(|r| seen.insert(r.id.clone()));
                let current = current.map(|(id, issued, lifetime)| CurrentKey {
                    id: id.into(),
                    issued_at: Time(t(issued)),
                    expires_at: lifetime.map(|l| Time(t(issued + l))),
                });
                Input {
                    now: t(now),
                    account,
                    desired,
                    observed_roles: if owned { observed_roles } else { BTreeSet::new() },
                    keys,
                    records,
                    current,
                    secret_key: secret_key.map(Into::into),
                    schedule,
                    request: request.map(Into::into),
                    last_request: last_request.map(Into::into),
                    max_keys,
                    held: held.map(Into::into),
                    keys_blocked,
                    rollout: rollout
                        .map(|done| Rollout { waiting_on: if done { vec![] } else { vec!["Deployment/app".into()] } }),
                    disable_dormant,
                    revoke_unused_after: revoke_unused_after.map(Duration::from_secs),
                }
            },
        )
}

fn decide(input: &Input) -> plan::Plan {
    plan::plan(&PlanInput {
        now: input.now,
        account: input.account.as_ref(),
        desired_roles: &input.desired,
        observed_roles: &input.observed_roles,
        observed_keys: &input.keys,
        records: &input.records,
        current: input.current.as_ref(),
        secret_key_id: input.secret_key.as_deref(),
        schedule: input.schedule.as_ref(),
        seed: "uid",
        rotate_request: input.request.as_deref(),
        last_rotation_request: input.last_request.as_deref(),
        max_keys: input.max_keys,
        held: input.held.as_deref().map(|id| HeldKey { id, record: id }),
        keys_blocked: input.keys_blocked,
        rollout: input.rollout.as_ref(),
        disable_dormant: input.disable_dormant,
        revoke_unused_after: input.revoke_unused_after,
    })
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn the_live_keys_are_never_revoked_before_a_successor(input in input()) {
        let plan = decide(&input);
        let in_target = |id: &str| input.keys.iter().any(|k| k.id == id);
        for action in &plan.actions {
            if let Action::RevokeKey { id, reason } = action {
                // The current key, unless the Secret holds another live key
                // (an older copy of the Secret put back): then that one is
                // what workloads read.
                let secret_holds_another = input
                    .secret_key
                    .as_deref()
                    .is_some_and(|s| in_target(s) && input.current.as_ref().is_some_and(|c| c.id != s));
                if let Some(current) = input.current.as_ref().filter(|_| input.account.is_some()) {
                    if !(secret_holds_another && input.max_keys >= 2 && !input.keys_blocked) {
                        prop_assert_ne!(id, &current.id, "revoked the current key ({:?}): {:?}", reason, plan);
                    }
                }
                // With a limit of one key a rotation replaces the key in
                // place (the oauth2 provider's client secret): no successor
                // can exist beside it.
                // While keys are blocked no successor can come, and the key
                // is revoked on schedule as before.
                if input.secret_key.as_deref() == Some(id.as_str()) && in_target(id) && input.max_keys >= 2 && !input.keys_blocked {
                    prop_assert!(
                        false,
                        "revoked {} ({:?}), the key the Secret holds, before a successor is published: {:?}",
                        id,
                        reason,
                        plan
                    );
                }
            }
        }
    }

    #[test]
    fn a_rotation_never_exceeds_the_key_limit(input in input()) {
        let plan = decide(&input);
        let revoked: BTreeSet<&str> = plan
            .actions
            .iter()
            .filter_map(|a| match a { Action::RevokeKey { id, .. } => Some(id.as_str()), _ => None })
            .collect();
        let live_before = input.keys.iter().filter(|k| !revoked.contains(k.id.as_str())).count();
        for action in &plan.actions {
            if let Action::Rotate { revoke_previous_at_once, .. } = action {
                let previous_live = input
                    .current
                    .as_ref()
                    .is_some_and(|c| input.keys.iter().any(|k| k.id == c.id) && !revoked.contains(c.id.as_str()));
                let after = live_before + 1 - usize::from(*revoke_previous_at_once && previous_live);
                prop_assert!(after <= input.max_keys, "{} live keys after rotating, limit {}: {:?}", after, input.max_keys, plan);
            }
        }
    }

    #[test]
    fn the_lifecycle_keeps_one_current_key_and_bounded_records(input in input(), events in proptest::collection::vec(0u8..6, 0..20)) {
        let mut status = IntegrationAccountStatus { keys: input.records.clone(), current_key: input.current.clone(), ..Default::default() };
        let live: BTreeSet<String> = input.keys.iter().map(|k| k.id.clone()).collect();
        for (i, event) in events.iter().enumerate() {
            let id = IDS[i % IDS.len()];
            let now = input.now;
            match event {
                // Key ids are fresh: a key is issued once.
                0 if status.keys.iter().any(|r| r.id == id) => {}
                0 => lifecycle::record(&mut status, KeyEvent::Issuing { id, reason: plan::RotationReason::Scheduled }, now),
                1 => lifecycle::record(&mut status, KeyEvent::Issued { pending: id, id, expires_at: None }, now),
                2 => lifecycle::record(&mut status, KeyEvent::Published { id, issued_at: now, expires_at: None, revoke_previous_at: now }, now),
                3 => lifecycle::record(&mut status, KeyEvent::Revoked { id, reason: "GracePeriodEnded" }, now),
                4 => lifecycle::record(&mut status, KeyEvent::Observed { live: &live }, now),
                _ => lifecycle::record(&mut status, KeyEvent::Abandoned, now),
            }
            let published = status.keys.iter().filter(|r| r.state == KeyState::Published).count();
            prop_assert!(published <= 1 + input.records.iter().filter(|r| r.state == KeyState::Published).count());
            if let (Some(current), 2) = (&status.current_key, event) {
                prop_assert_eq!(&current.id, id);
                let states: Vec<_> = status.keys.iter().filter(|r| r.state == KeyState::Published).map(|r| r.id.clone()).collect();
                prop_assert!(states.iter().all(|s| s == id), "after publishing {} these are Published too: {:?}", id, states);
            }
            if *event == 4 {
                let revoked = status.keys.iter().filter(|r| r.state == KeyState::Revoked).count();
                prop_assert!(revoked <= lifecycle::REVOKED_RECORDS_KEPT);
            }
        }
    }
}
