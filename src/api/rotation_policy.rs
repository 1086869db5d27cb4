//! `KeyRotationPolicy`: when keys rotate and what restarts afterwards.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{CommonStatus, CRON_PATTERN, DURATION_PATTERN, NAME_PATTERN};

/// When keys rotate and what happens around a rotation. Set rotateEvery, schedule, or both.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "keysmith.dev",
    version = "v1alpha1",
    kind = "KeyRotationPolicy",
    doc = "Says when the keys of the IntegrationAccounts that reference it rotate, how long a replaced key stays valid, and which workloads restart once a new key is in their Secret. Rotation is zero-downtime: the new key is issued and verified before it is published, and the old one is revoked only after the grace period.",
    plural = "keyrotationpolicies",
    singular = "keyrotationpolicy",
    shortname = "krp",
    category = "keysmith",
    namespaced,
    status = "KeyRotationPolicyStatus",
    printcolumn(name = "Every", type_ = "string", json_path = ".spec.rotateEvery", description = "Rotation interval"),
    printcolumn(
        name = "Schedule",
        type_ = "string",
        json_path = ".spec.schedule",
        description = "Rotation schedule (cron)"
    ),
    printcolumn(
        name = "Accounts",
        type_ = "integer",
        json_path = ".status.accountCount",
        description = "IntegrationAccounts using this policy"
    ),
    printcolumn(
        name = "Next Rotation",
        type_ = "string",
        json_path = ".status.nextRotationAt",
        description = "The earliest rotation due among those accounts"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
// A CEL rule rather than `anyOf`: the apiserver checks CEL rules only on
// objects the schema accepts, and the rule's message says what to do.
#[schemars(extend(
    "x-kubernetes-validations" = [{"rule": "has(self.rotateEvery) || has(self.schedule)", "message": "set rotateEvery, schedule, or both"}]
))]
#[serde(rename_all = "camelCase")]
pub struct KeyRotationPolicySpec {
    /// Rotate when the live key is this old, as a duration such as `720h`
    /// (30 days) or `1h30m`. With `schedule` too, whichever comes first wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub rotate_every: Option<String>,

    /// Rotate at the times of this cron expression (`minute hour day-of-month
    /// month day-of-week`, for example `0 3 * * SUN`), in `timeZone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = CRON_PATTERN))]
    pub schedule: Option<String>,

    /// The IANA time zone `schedule` is read in, for example `Europe/Berlin`.
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z][A-Za-z0-9_+/-]*$"))]
    pub time_zone: String,

    /// A random delay of up to this duration added to each account's
    /// rotation time, so that many accounts do not rotate at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub jitter: Option<String>,

    /// How long a replaced key stays valid after the new one is published,
    /// so that workloads still holding it keep working until they restart.
    #[serde(default = "default_grace_period")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub grace_period: String,

    /// The oldest a key may get. A key older than this is rotated at once,
    /// whatever the schedule says, and alerts fire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub max_key_age: Option<String>,

    /// Workloads in the account's namespace that are restarted (rolled, as
    /// `kubectl rollout restart` does) after a new key is published.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub restart_targets: Vec<RestartTarget>,
    /// Confirmed rollover: the replaced key is revoked only once every
    /// restart target has rolled out with the new key (its rollout
    /// complete), never before `gracePeriod` ends, and at the latest
    /// `maxWait` after the new key was published, when a stuck rollout
    /// shows as the account's `RolloutConfirmed=False` condition and a
    /// Warning event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm_rollout: Option<ConfirmRollout>,
    /// Dormancy: an account none of whose keys was used for this long (as
    /// the target app reports it; since it was created or reactivated, if
    /// never) gets the condition `Dormant=True`, a Warning event and the
    /// `keysmith_account_dormant` metric. Only for providers that report
    /// when keys are used (`zabbix`, `awsIam`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub dormant_after: Option<String>,
    /// With `dormantAfter`: also disable a dormant account in the target
    /// app (its keys stop working; none is rotated) until the
    /// `keysmith.dev/reactivate` annotation is set to a new value.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disable_dormant: bool,
    /// Revoke a replaced key before its grace period ends once the target
    /// app reports it unused for this long (since the new key was
    /// published, or since its own last use, whichever is later) while the
    /// new key is in use. Only for providers that report when keys are
    /// used; never before the new key is published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub revoke_unused_after: Option<String>,
}

/// How long keysmith waits for restart targets to roll out before it
/// revokes the replaced key anyway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfirmRollout {
    /// The longest the replaced key stays valid after the new one is
    /// published while a rollout is not complete, as a duration (`30m`).
    #[serde(default = "default_max_wait")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub max_wait: String,
}

fn default_max_wait() -> String {
    "30m".to_owned()
}

fn default_time_zone() -> String {
    "UTC".to_owned()
}

fn default_grace_period() -> String {
    "1h".to_owned()
}

/// A workload restarted after a rotation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestartTarget {
    /// The workload's kind.
    pub kind: RestartTargetKind,
    /// The workload's name, in the account's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: String,
}

/// Kinds of workload keysmith can restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum RestartTargetKind {
    /// An apps/v1 Deployment.
    Deployment,
    /// An apps/v1 StatefulSet.
    StatefulSet,
    /// An apps/v1 DaemonSet.
    DaemonSet,
}

/// Observed state of a KeyRotationPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyRotationPolicyStatus {
    /// Conditions (Ready: the policy is valid) and the generation they describe.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// How many IntegrationAccounts reference this policy.
    #[serde(default)]
    pub account_count: i32,
    /// The earliest rotation due among those accounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_at: Option<Time>,
}
