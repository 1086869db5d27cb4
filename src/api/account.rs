//! `IntegrationAccount`: the dedicated account in a target app.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{CommonStatus, LocalObjectReference, NAME_PATTERN, SECRET_KEY_PATTERN};

/// The desired account, where its key goes, and what happens on deletion.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "keysmith.dev",
    version = "v1alpha1",
    kind = "IntegrationAccount",
    doc = "A dedicated account that one integration uses to call a target app, and the Secret its live key is written to. keysmith creates the account through the target app's API, keeps exactly the roles that RoleBindings grant it, rotates its key according to its KeyRotationPolicy, and deprovisions it when this object is deleted.",
    plural = "integrationaccounts",
    singular = "integrationaccount",
    shortname = "ia",
    shortname = "intacct",
    category = "keysmith",
    namespaced,
    status = "IntegrationAccountStatus",
    printcolumn(
        name = "Connection",
        type_ = "string",
        json_path = ".spec.connectionRef.name",
        description = "The AppConnection or ClusterAppConnection the account lives behind"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the account, its roles and its key are all in place"
    ),
    printcolumn(
        name = "Key Age",
        type_ = "date",
        json_path = ".status.currentKey.issuedAt",
        description = "When the live key was issued"
    ),
    printcolumn(
        name = "Next Rotation",
        type_ = "string",
        json_path = ".status.nextRotationAt",
        description = "When the key will next be rotated"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct IntegrationAccountSpec {
    /// The connection to the target app the account lives in. Immutable: to
    /// move an integration to another app, create a new IntegrationAccount.
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "connectionRef is immutable; create a new IntegrationAccount instead"}]))]
    pub connection_ref: ConnectionReference,

    /// What the integration is for. Written to the account in the target app
    /// where the app has a description field, so audits can tell who it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub description: Option<String>,

    /// The team or person accountable for the integration (for example
    /// `team-payments`). Recorded on the account in the target app for audits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub owner: Option<String>,

    /// The Secret, in this namespace, that keysmith writes the live key to.
    /// keysmith creates and owns it, and never writes into a Secret it did not
    /// create.
    pub secret: SecretTemplate,

    /// The KeyRotationPolicy, in this namespace, that says when the key
    /// rotates. Without one the key is issued once and rotated only on demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_policy_ref: Option<LocalObjectReference>,

    /// What happens in the target app when this object is deleted:
    /// `Delete` revokes the keys and deletes the account, `Disable` revokes the
    /// keys and disables the account, `Orphan` leaves both in place.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Stops all changes in the target app while true: no creation, role sync
    /// or rotation. Status keeps being reported.
    #[serde(default)]
    pub suspend: bool,

    /// Provider-specific settings for this account, such as an IAM path or a
    /// SCIM display name. Each provider documents the keys it reads; unknown
    /// keys are reported in status.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub provider_options: BTreeMap<String, String>,
}

/// Which kind of connection an IntegrationAccount refers to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ConnectionKind {
    /// An AppConnection in the account's namespace.
    #[default]
    AppConnection,
    /// A cluster-wide ClusterAppConnection whose namespaceSelector admits the
    /// account's namespace.
    ClusterAppConnection,
}

/// A reference to an AppConnection (same namespace) or a ClusterAppConnection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionReference {
    /// `AppConnection` (default) or `ClusterAppConnection`.
    #[serde(default)]
    pub kind: ConnectionKind,
    /// Name of the connection.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: String,
}

/// Where and how the live key is written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretTemplate {
    /// Name of the Secret, in the IntegrationAccount's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// Extra labels put on the Secret, for example to let a workload's
    /// tooling select it. keysmith's own labels take precedence.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations put on the Secret. keysmith's own annotations take
    /// precedence.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Renames of the Secret's data keys: from the provider's key name (for
    /// example `token` or `AWS_ACCESS_KEY_ID`) to the name the workload expects.
    /// Keys not listed keep the provider's name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("additionalProperties" = {"type": "string", "minLength": 1, "maxLength": 253, "pattern": SECRET_KEY_PATTERN}))]
    pub keys: BTreeMap<String, String>,
}

/// What keysmith does in the target app when an IntegrationAccount is deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// Revoke every key and delete the account.
    #[default]
    Delete,
    /// Revoke every key and disable the account, keeping it for audit.
    Disable,
    /// Leave the account and its keys in the target app.
    Orphan,
}

/// Observed state of an IntegrationAccount.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IntegrationAccountStatus {
    /// Conditions (Ready, AccountReady, RolesSynced, KeyReady) and the
    /// generation they describe.
    #[serde(flatten)]
    pub common: CommonStatus,

    /// The account in the target app. keysmith records the app's identifier
    /// here, never in the spec, so nobody can point an object at an account
    /// keysmith did not create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<ExternalAccount>,

    /// The roles the account holds in the target app, as last observed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<GrantedRole>,

    /// The key currently published in the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_key: Option<CurrentKey>,

    /// Every key keysmith issued for this account, newest first, with its
    /// lifecycle. Revoked keys are kept for a while as an audit trail.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyRecord>,

    /// When the key will next be rotated (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_at: Option<Time>,

    /// The last value of the `keysmith.dev/rotate-now` annotation that keysmith
    /// acted on. Setting the annotation to any other value rotates the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation_request: Option<String>,

    /// When any key of this account was last used, as far as the target app
    /// reports (the latest of the keys' `lastUsedAt`, kept after they are
    /// revoked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<Time>,

    /// The last value of the `keysmith.dev/reactivate` annotation that
    /// keysmith acted on. Setting it to any other value restarts the
    /// dormancy clock (and re-enables an account disabled as dormant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reactivation_request: Option<String>,

    /// When the account was last reactivated with that annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reactivated_at: Option<Time>,

    /// An external operation that was started but whose result has not been
    /// recorded yet. Written before the call, so a crash in between leaves a
    /// trace the next reconcile acts on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingOperation>,
}

/// A role the account holds, and where.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantedRole {
    /// The role, in the target app's terms.
    pub role: String,
    /// Where it applies (namespace, database...), if the provider has scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// The account as it exists in the target app.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalAccount {
    /// The provider that manages the account (`kubernetes`, `scim`, ...).
    pub provider: String,
    /// The target app's identifier for the account.
    pub id: String,
    /// The account's name in the target app, as shown in its audit log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The name keysmith created the account under in the target app (the
    /// requested name put through the connection's naming template). It
    /// stays the account's name, whatever the template says later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_name: Option<String>,
    /// The name that was requested for it (`providerOptions.name`, else the
    /// IntegrationAccount's name). keysmith refuses to act if
    /// `providerOptions.name` changes: an account is never renamed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_name: Option<String>,
    /// Whether the account is disabled in the target app.
    #[serde(default)]
    pub disabled: bool,
    /// The connection (`Kind/name`) the account was created through. keysmith
    /// refuses to act if spec.connectionRef no longer matches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<String>,
}

/// The key currently published in the output Secret.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CurrentKey {
    /// The key's identifier (never the key material).
    pub id: String,
    /// When the key was issued.
    pub issued_at: Time,
    /// When the target app stops accepting the key, if it expires by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
}

/// Where a key is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum KeyState {
    /// Creation was requested in the target app; the result is not known yet.
    Pending,
    /// The target app issued the key and keysmith verified it works.
    Issued,
    /// The key is the one in the output Secret.
    Published,
    /// A newer key was published; this one stays valid until its grace period ends.
    Retiring,
    /// The key was revoked in the target app.
    Revoked,
}

/// The lifecycle of one key. Identifiers and times only, never key material.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyRecord {
    /// The key's identifier in the target app (or keysmith's own, for apps
    /// that do not name keys).
    pub id: String,
    /// Where the key is in its life.
    pub state: KeyState,
    /// When creation was requested.
    pub created_at: Time,
    /// When the key was written to the output Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_at: Option<Time>,
    /// When a newer key replaced it in the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring_at: Option<Time>,
    /// When the key is due to be revoked (the end of its grace period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_at: Option<Time>,
    /// When the key was revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Time>,
    /// When the target app stops accepting the key by itself, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// When the target app last saw the key used after keysmith published
    /// it, for providers that report use (keysmith's own check of a new key
    /// comes before publication and does not count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<Time>,
    /// The last use the target app reported the first time keysmith looked
    /// after publishing the key (keysmith's own verification, on the
    /// target's clock), or the publication if none: only later uses count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_baseline_at: Option<Time>,
    /// When the rotation policy's restart targets were rolled for this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_at: Option<Time>,
    /// Why the key reached its current state (for example `Rotated`,
    /// `ManualRotation`, `Orphaned`, `AccountDeleted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An external operation recorded before it is attempted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingOperation {
    /// What was started, for example `CreateAccount` or `IssueKey`.
    pub operation: String,
    /// A token keysmith attaches to the created object so it can find it
    /// again if the result is lost.
    pub token: String,
    /// When the operation started.
    pub started_at: Time,
}
