//! `RoleBinding` (keysmith.dev): the roles an IntegrationAccount holds.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{CommonStatus, LocalObjectReference};

/// The account and the roles it is granted.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "keysmith.dev",
    version = "v1alpha1",
    kind = "RoleBinding",
    doc = "Binds an IntegrationAccount to exactly the roles, scopes or permission sets it needs in its target app. An account holds the union of the roles of all RoleBindings that point at it; roles nobody declared are removed, and roles the connection's policy denies are never granted. Not RBAC's RoleBinding: its short names are ksrb and ksrolebinding.",
    plural = "rolebindings",
    singular = "rolebinding",
    shortname = "ksrb",
    shortname = "ksrolebinding",
    category = "keysmith",
    namespaced,
    status = "RoleBindingStatus",
    printcolumn(
        name = "Account",
        type_ = "string",
        json_path = ".spec.accountRef.name",
        description = "The IntegrationAccount the roles are granted to"
    ),
    printcolumn(name = "Roles", type_ = "string", json_path = ".spec.roles", description = "The roles granted"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether every role is granted"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct RoleBindingSpec {
    /// The IntegrationAccount, in this namespace, that holds the roles.
    /// Immutable: bind another account with another RoleBinding.
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "accountRef is immutable; create a new RoleBinding instead"}]))]
    pub account_ref: LocalObjectReference,

    /// The roles to grant, in the target app's own names: ClusterRole names for
    /// the kubernetes provider, group display names for SCIM, scopes for
    /// OAuth 2.0, policy ARNs for AWS IAM, role names for PostgreSQL.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 512)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub roles: Vec<String>,

    /// Where the roles apply, in the provider's terms: a namespace for the
    /// kubernetes provider (default: the account's namespace; `*` for
    /// cluster-wide where the connection's policy allows it), a database for
    /// PostgreSQL. Empty means the provider's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub scope: Option<String>,
}

/// Observed state of a RoleBinding.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleBindingStatus {
    /// Conditions (Ready, PolicyViolation) and the generation they describe.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Roles from this binding that the account holds in the target app.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub granted_roles: Vec<String>,
    /// Roles from this binding that the connection's policy refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied_roles: Vec<String>,
}
