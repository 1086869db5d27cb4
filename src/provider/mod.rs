//! The boundary between keysmith and a target app.
//!
//! A [`Provider`] manages accounts, their roles and their keys in one target
//! app, shaped like crossplane's external client (observe / create / update /
//! delete) plus roles and keys. Every operation is idempotent where the target
//! allows it: creating what already exists and is ours succeeds, deleting what
//! is gone succeeds. Errors are classified so the controllers can tell a typo
//! from an outage ([`ProviderError`]).

pub mod aws_iam;
pub mod gcp_iam;
pub mod guard;
pub mod http;
pub mod kubernetes;
pub mod noop;
pub mod oauth2;
pub mod openbao;
pub mod postgres;
pub mod ratelimit;
pub mod registry;
pub mod scim;
pub mod zabbix;

use std::{collections::BTreeMap, fmt, time::Duration};

use async_trait::async_trait;
use jiff::Timestamp;

pub use crate::tenancy::Identity;
pub use registry::{Connect, ProviderRegistry, ResolvedConnection};

/// A failure talking to a target app, classified by what the caller should do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Worth retrying: timeouts, 5xx, 429. `retry_after` is the target's own
    /// hint (a Retry-After header), honoured before keysmith's backoff.
    #[error("temporarily unavailable: {message}")]
    Transient {
        /// What went wrong.
        message: String,
        /// How long the target asked us to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// The connection's admin credential was refused (401/403 on an admin call).
    #[error("the connection's credential was refused: {0}")]
    Unauthorized(String),
    /// The object does not exist in the target app.
    #[error("not found: {0}")]
    NotFound(String),
    /// The object exists but belongs to someone else, or changed under us.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The target app (or the connection's policy) allows no more of this.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// The request can never succeed as written: fix the spec.
    #[error("invalid: {0}")]
    Invalid(String),
}

impl ProviderError {
    /// A stable, short name for metrics labels and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            ProviderError::Transient { .. } => "Transient",
            ProviderError::Unauthorized(_) => "Unauthorized",
            ProviderError::NotFound(_) => "NotFound",
            ProviderError::Conflict(_) => "Conflict",
            ProviderError::LimitExceeded(_) => "LimitExceeded",
            ProviderError::Invalid(_) => "Invalid",
        }
    }

    /// A transient error without a hint.
    pub fn transient(message: impl Into<String>) -> Self {
        ProviderError::Transient { message: message.into(), retry_after: None }
    }
}

/// What a provider can and cannot do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// The most keys the target allows per account (AWS IAM: 2), if limited.
    pub max_keys_per_account: Option<u32>,
    /// Whether keys expire by themselves (then keysmith asks for a lifetime
    /// that covers the rotation interval plus the grace period).
    pub key_expiry: bool,
    /// Whether accounts can be disabled rather than deleted.
    pub disable: bool,
    /// Whether [`ObservedKey::last_used`] says when each key was last used
    /// (then a key without it was never used), and how late the target may
    /// report a use: `Some(lag)` if it reports use, `None` if it cannot.
    pub last_use_lag: Option<Duration>,
}

/// The account keysmith wants in the target app, derived from an
/// IntegrationAccount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRequest {
    /// The account's name in the target app (for the kubernetes provider, the
    /// ServiceAccount's name).
    pub name: String,
    /// The IntegrationAccount's namespace.
    pub namespace: String,
    /// The IntegrationAccount's name.
    pub account_name: String,
    /// The IntegrationAccount's uid: the ownership tag keysmith puts on
    /// everything it creates, so it never adopts what it does not own.
    pub owner_uid: String,
    /// spec.description.
    pub description: Option<String>,
    /// spec.owner.
    pub owner: Option<String>,
    /// spec.providerOptions.
    pub options: BTreeMap<String, String>,
}

/// An account as observed in the target app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedAccount {
    /// The target's identifier.
    pub id: String,
    /// The name shown in the target's audit log.
    pub name: String,
    /// Whether the account is disabled.
    pub disabled: bool,
    /// Whether it carries keysmith's ownership tag for this IntegrationAccount.
    pub owned: bool,
    /// Whether its description/owner/labels differ from the request.
    pub drifted: bool,
}

/// One role on one scope. Ordered so role sets diff deterministically.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RoleGrant {
    /// The role in the target's own terms.
    pub role: String,
    /// Where it applies (namespace, database...); `None` is the provider's default.
    pub scope: Option<String>,
}

impl fmt::Display for RoleGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scope {
            Some(scope) => write!(f, "{} on {}", self.role, scope),
            None => f.write_str(&self.role),
        }
    }
}

/// A request for a new key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRequest {
    /// keysmith's identifier for the key, recorded in status before the call
    /// so a key whose creation result was lost can be found and revoked.
    /// Providers that name keys themselves tag the key with it where possible.
    pub key_id: String,
    /// How long the key should live, for providers whose keys expire.
    pub lifetime: Option<Duration>,
}

/// The shortest value [`KeyMaterial::redact`] replaces.
pub const REDACT_MIN_LEN: usize = 8;

/// Secret values. Its `Debug` and `Display` never show the values, so key
/// material cannot leak into logs, events or error messages by accident.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct KeyMaterial(BTreeMap<String, String>);

impl KeyMaterial {
    /// Wraps the Secret's data (key name → value).
    pub fn new(values: BTreeMap<String, String>) -> Self {
        Self(values)
    }
    /// The values, for writing into the output Secret.
    pub fn expose(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// `text` with every value (and its base64 form, as an apiserver would
    /// echo a Secret's data) replaced by `<redacted>`: for messages about a
    /// failure to write them.
    /// Values shorter than [`REDACT_MIN_LEN`] (a port, a database name) are
    /// left alone; the rest go longest first, base64 forms before plain
    /// ones, so no replacement cuts into another secret's text.
    pub fn redact(&self, text: &str) -> String {
        use base64::Engine as _;
        let mut needles: Vec<String> = self
            .0
            .values()
            .filter(|v| v.len() >= REDACT_MIN_LEN)
            .flat_map(|v| [base64::engine::general_purpose::STANDARD.encode(v.as_bytes()), v.clone()])
            .collect();
        needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        needles.iter().fold(text.to_owned(), |out, needle| out.replace(needle.as_str(), "<redacted>"))
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.keys().map(|k| (k, "<redacted>"))).finish()
    }
}

/// A key the target app just issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedKey {
    /// The key's identifier in the target (or keysmith's `key_id`).
    pub id: String,
    /// When the target stops accepting it by itself, if it does.
    pub expires_at: Option<Timestamp>,
    /// What goes into the output Secret, in the ecosystem's conventional key
    /// names (`token`, `kubeconfig`, `AWS_ACCESS_KEY_ID`, `password`...).
    pub material: KeyMaterial,
}

/// A key as observed in the target app (no material).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedKey {
    /// The key's identifier.
    pub id: String,
    /// When it was created, if the target says.
    pub created_at: Option<Timestamp>,
    /// When the target last saw it used, if it says (see
    /// [`Capabilities::last_use_lag`]). keysmith's own verification
    /// happens before a key is published, and counts only until then.
    pub last_used: Option<Timestamp>,
}

/// What one check of a freshly issued key found, for [`until_accepted`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The target accepted the key.
    Accepted,
    /// Not yet: what the target said.
    Refused(String),
}

/// Checks a freshly issued key with `check` until the target accepts it,
/// `check` fails for good (its error), or `window` passes (then a
/// [`ProviderError::Transient`] saying `what` was not accepted, with the last
/// refusal): targets take a moment to accept a new key. Pauses start at
/// 200 ms and double, up to 2 s.
pub async fn until_accepted<F, Fut>(what: &str, window: Duration, mut check: F) -> Result<(), ProviderError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Check, ProviderError>>,
{
    let deadline = std::time::Instant::now() + window;
    let mut pause = Duration::from_millis(200);
    loop {
        let refused = match check().await? {
            Check::Accepted => return Ok(()),
            Check::Refused(said) => said,
        };
        if std::time::Instant::now() + pause > deadline {
            return Err(ProviderError::transient(format!(
                "{what} was not accepted within {}s: {refused}",
                window.as_secs()
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// One target app, reached through one connection's admin credential.
#[async_trait]
pub trait Provider: Send + Sync {
    /// The provider's name as in spec.provider (`kubernetes`, `scim`, ...).
    fn name(&self) -> &'static str;
    /// What the provider can do.
    fn capabilities(&self) -> Capabilities;
    /// Checks that the admin credential works.
    async fn verify_connection(&self) -> Result<(), ProviderError>;
    /// The scope a role applies to when a RoleBinding names none, so desired
    /// and observed grants compare equal (kubernetes: the account's namespace).
    fn default_scope(&self, _account: &AccountRequest) -> Option<String> {
        None
    }

    /// The account, if it exists (owned or not).
    async fn observe_account(&self, account: &AccountRequest) -> Result<Option<ObservedAccount>, ProviderError>;
    /// Creates the account. Succeeds if it already exists and is ours;
    /// [`ProviderError::Conflict`] if it exists and is not.
    async fn create_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError>;
    /// Brings an existing, owned account's description, owner and labels in
    /// line with the request (and re-enables it if disabled).
    async fn update_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError>;
    /// Disables the account, keeping it. Succeeds if it is gone.
    async fn disable_account(&self, account: &AccountRequest) -> Result<(), ProviderError>;
    /// Deletes the account and whatever keysmith created for it (role
    /// grants, key anchors). Succeeds if it is gone.
    async fn delete_account(&self, account: &AccountRequest) -> Result<(), ProviderError>;

    /// The roles the account holds.
    async fn list_roles(&self, account: &AccountRequest) -> Result<Vec<RoleGrant>, ProviderError>;
    /// Grants a role. Succeeds if already granted.
    async fn grant_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError>;
    /// Revokes a role. Succeeds if not granted.
    async fn revoke_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError>;

    /// Issues a new key.
    async fn issue_key(&self, account: &AccountRequest, request: &KeyRequest) -> Result<IssuedKey, ProviderError>;
    /// The keys the account holds.
    async fn list_keys(&self, account: &AccountRequest) -> Result<Vec<ObservedKey>, ProviderError>;
    /// Revokes a key so the target refuses it from now on. Succeeds if gone.
    async fn revoke_key(&self, account: &AccountRequest, key_id: &str) -> Result<(), ProviderError>;
    /// Proves a freshly issued key works by using it against the target.
    async fn verify_key(&self, account: &AccountRequest, key: &IssuedKey) -> Result<(), ProviderError>;
}

/// A provider an in-process test hands the operator (see
/// [`crate::controller::RunOptions::fake_provider`]).
#[cfg(feature = "dev")]
#[derive(Clone)]
pub struct FakeProvider(pub std::sync::Arc<dyn Provider>);

#[cfg(feature = "dev")]
impl std::fmt::Debug for FakeProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("FakeProvider").field(&self.0.name()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_key_is_checked_until_accepted_refused_for_good_or_out_of_time() {
        let tries = std::sync::atomic::AtomicUsize::new(0);
        let third_time = || async {
            let n = tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(if n < 2 { Check::Refused(format!("not yet ({n})")) } else { Check::Accepted })
        };
        until_accepted("key k1", Duration::from_secs(5), third_time).await.expect("accepted on the third try");
        assert_eq!(tries.load(std::sync::atomic::Ordering::SeqCst), 3);

        let never = || async { Ok(Check::Refused("invalid_grant".to_owned())) };
        match until_accepted("key k2", Duration::from_millis(500), never).await {
            Err(ProviderError::Transient { message, .. }) => {
                assert!(message.contains("key k2 was not accepted") && message.contains("invalid_grant"), "{message}")
            }
            other => panic!("out of time must be Transient, got {other:?}"),
        }

        let fatal = || async { Err(ProviderError::Conflict("another account's key".to_owned())) };
        let started = std::time::Instant::now();
        assert!(matches!(
            until_accepted("key k3", Duration::from_secs(5), fatal).await,
            Err(ProviderError::Conflict(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(1), "a refusal for good is not retried");
    }

    #[test]
    fn redaction_removes_every_secret_and_its_base64_but_not_short_values() {
        use base64::Engine as _;
        let secret = "s3cr3t-p4ssw0rd-value";
        let token = "eyJhbGciOiJSUzI1NiJ9.payload.signature";
        let material = KeyMaterial::new(BTreeMap::from([
            ("dbname".to_owned(), "ledger".to_owned()),
            ("password".to_owned(), secret.to_owned()),
            ("port".to_owned(), "5432".to_owned()),
            ("token".to_owned(), token.to_owned()),
        ]));
        let b64 = |v: &str| base64::engine::general_purpose::STANDARD.encode(v.as_bytes());
        let text = format!("refused {secret} and {token}; data {} {}; db ledger on 5432", b64(secret), b64(token));
        let redacted = material.redact(&text);
        for leaked in [secret.to_owned(), token.to_owned(), b64(secret), b64(token)] {
            assert!(!redacted.contains(&leaked), "{redacted}");
        }
        assert!(redacted.contains("db ledger on 5432"), "short values are not secrets: {redacted}");
    }
}
