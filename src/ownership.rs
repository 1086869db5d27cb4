//! The ownership contract: how keysmith marks what it creates, in the
//! cluster and in every target app, so that it only ever changes or deletes
//! what is its own. One set of names for every provider; each writes them in
//! the form its target app has: Kubernetes labels and annotations, AWS IAM
//! tags, a SCIM `externalId`, the comment on a PostgreSQL role, an OAuth 2.0
//! registration record.
//!
//! The owning IntegrationAccount's uid ([`ACCOUNT_UID`], or [`UID_PREFIX`]
//! and the uid where a target has one free-text field) is the tag that
//! decides ownership: a name can be taken by anyone, a uid cannot.

/// Says keysmith manages an object, user or Secret.
pub const MANAGED_BY_KEY: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_KEY`].
pub const MANAGED_BY: &str = "keysmith";
/// The owning IntegrationAccount's uid: the ownership tag.
pub const ACCOUNT_UID: &str = "keysmith.dev/account-uid";
/// `<namespace>/<name>` of the owning IntegrationAccount; on an output
/// Secret, a label holding the account's name.
pub const INTEGRATION_ACCOUNT: &str = "keysmith.dev/integration-account";
/// The id of a key (a key anchor's label and annotation, an output Secret's
/// annotation).
pub const KEY_ID: &str = "keysmith.dev/key-id";
/// The IntegrationAccount's `spec.description`, for audits.
pub const DESCRIPTION: &str = "keysmith.dev/description";
/// The IntegrationAccount's `spec.owner`, for audits.
pub const OWNER: &str = "keysmith.dev/owner";
/// Set to `true` on an account keysmith disabled.
pub const DISABLED: &str = "keysmith.dev/disabled";
/// Where a target app has one free-text field for the ownership tag (a SCIM
/// User's `externalId`, the first line of a PostgreSQL role's comment): this
/// prefix, then the owning IntegrationAccount's uid.
pub const UID_PREFIX: &str = "keysmith:";
/// The field manager keysmith applies and patches with.
pub const FIELD_MANAGER: &str = "keysmith";

/// The one-field ownership tag of an account: [`UID_PREFIX`] and its uid.
pub fn uid_tag(uid: &str) -> String {
    format!("{UID_PREFIX}{uid}")
}

/// The value of [`INTEGRATION_ACCOUNT`] for an account: `<namespace>/<name>`.
pub fn account_reference(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}
