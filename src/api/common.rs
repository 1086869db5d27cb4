//! Types shared by several kinds: references, conditions, schema patterns.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Kubernetes object name (DNS-1123 subdomain).
pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A Go-style duration such as `720h`, `90m`, `1h30m` or `45s`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";
/// A five-field cron expression (minute hour day-of-month month day-of-week)
/// or one of the `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly` macros.
pub const CRON_PATTERN: &str =
    r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|([0-9A-Za-z*?/,-]+ +){4}[0-9A-Za-z*?/,-]+)$";
/// A key in a Secret's data.
pub const SECRET_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";

/// The condition types every kind reports; `Ready` summarises the others.
pub mod condition_types {
    /// Everything the object asks for is in place.
    pub const READY: &str = "Ready";
    /// The account exists in the target app and matches the spec.
    pub const ACCOUNT_READY: &str = "AccountReady";
    /// The account holds exactly the declared roles.
    pub const ROLES_SYNCED: &str = "RolesSynced";
    /// A verified key is published in the output Secret.
    pub const KEY_READY: &str = "KeyReady";
    /// A role was refused by the connection's policy.
    pub const POLICY_VIOLATION: &str = "PolicyViolation";
    /// Confirmed rollover: the replaced key was revoked once the restart
    /// targets rolled out with the new key (not part of Ready).
    pub const ROLLOUT_CONFIRMED: &str = "RolloutConfirmed";
    /// No key of the account was used for the rotation policy's
    /// `dormantAfter` (not part of Ready).
    pub const DORMANT: &str = "Dormant";
}

/// A reference to an object in the same namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectReference {
    /// Name of the object, in the same namespace as the referring object.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: String,
}

/// A reference to a key in a Secret holding a credential.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// Namespace of the Secret. An AppConnection may only read Secrets in its
    /// own namespace and must leave this empty; a ClusterAppConnection must
    /// set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = NAME_PATTERN))]
    pub namespace: Option<String>,
    /// Key within the Secret's data. Each provider documents its default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    pub key: Option<String>,
}

/// Conditions and the generation they describe; every kind's status has these.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommonStatus {
    /// The metadata.generation this status describes. Older than
    /// metadata.generation means keysmith has not yet acted on the latest spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions: Ready plus kind-specific ones. Each carries a
    /// machine-readable reason and a human-readable message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
