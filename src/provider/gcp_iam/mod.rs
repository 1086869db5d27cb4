//! The `gcpIam` provider: the target app is a Google Cloud project's IAM,
//! the archetype of "a service account, its roles, up to ten downloadable
//! keys".
//!
//! - **account** → a service account `<name>@<project>.iam.gserviceaccount.com`
//!   (IAM API v1). Its account id is the account's name, which Google
//!   requires to be 6–30 characters of lowercase letters, digits and
//!   hyphens, starting with a letter (set `providerOptions.name` where the
//!   IntegrationAccount's name does not fit). Service accounts carry no
//!   labels, so keysmith's ownership tag is the first line of the
//!   `description` ([`ownership::uid_tag`]), followed by the
//!   IntegrationAccount, its description and owner, cut to Google's 256
//!   characters; `displayName` is `<namespace>/<name>`, cut to 100. A
//!   service account without keysmith's tag for this IntegrationAccount is
//!   never changed, keyed or deleted. Google's reads are eventually
//!   consistent: a service account just created may be answered `404` for a
//!   while, which keysmith treats as "not there yet" (a create then answers
//!   `409`, and keysmith waits, [`ProviderError::Transient`]).
//! - **disabling** → `:disable` (and `:enable` when an update finds it
//!   disabled). **Deleting** removes the account's project bindings first
//!   (Google would leave them as `deleted:serviceAccount:…`), then the
//!   account, whose keys go with it.
//! - **roles** → bindings of the project's IAM policy (Resource Manager v1):
//!   a role is a predefined or custom role name (`roles/…`,
//!   `projects/…/roles/…`, `organizations/…/roles/…`), without a scope (the
//!   project is the connection's). keysmith reads the policy at version 3,
//!   changes only the unconditional binding of that role for this member,
//!   and writes it back with the etag it read, keeping the version,
//!   conditional bindings and audit configs; a `409 ABORTED` (someone wrote
//!   in between) is read again and retried, up to [`POLICY_ATTEMPTS`] times.
//!   Conditional bindings are never touched or counted.
//! - **key** → a user-managed service-account key (RSA 2048); the output
//!   Secret's [`CREDENTIALS_KEY`] is its JSON key file, as Google hands it
//!   out once (point `GOOGLE_APPLICATION_CREDENTIALS` at the mounted file).
//!   Google allows [`MAX_KEYS`] keys per service account, disabled ones
//!   included: the next is a `400 FAILED_PRECONDITION`, which keysmith
//!   reports as [`ProviderError::LimitExceeded`]; an organization policy
//!   forbidding key creation (`constraints/iam.disableServiceAccountKeyCreation`)
//!   answers the same status with a `PreconditionFailure` naming it, which
//!   is [`ProviderError::Invalid`] (the connection cannot work). Revoking
//!   disables the key, then deletes it.
//! - **verifying** a key → an OAuth 2.0 JWT-bearer exchange (RFC 7523)
//!   signed with the new key (RS256, `kid` = its id) at the key file's
//!   `token_uri`, as Google's client libraries do; refused exchanges are
//!   tried again for up to [`VERIFY_WINDOW`] (new keys take a moment).
//! - **the connection's credential** → a service-account key file of an
//!   admin service account holding `roles/iam.serviceAccountAdmin`,
//!   `roles/iam.serviceAccountKeyAdmin` and
//!   `roles/resourcemanager.projectIamAdmin` on the project (least
//!   privilege; [`ADMIN_ROLES`]). keysmith exchanges it for access tokens
//!   itself and keeps each until a minute before it expires.
//!
//! Errors quote Google's `status` and `message`, never a key or token.
//! Proven against a contract fake of Google's APIs (`tests/gcp/`), not yet
//! against Google Cloud.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::Mutex,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use base64::Engine as _;
use jiff::Timestamp;
use reqwest::{header, StatusCode};
use serde_json::{json, Map, Value};

use super::{
    http::{classify_status, retry_after, transport_error},
    AccountRequest, Capabilities, Check, IssuedKey, KeyMaterial, KeyRequest, ObservedAccount, ObservedKey, Provider,
    ProviderError, RoleGrant,
};
use crate::ownership;

/// Output Secret key (and the admin Secret's default key): a JSON key file.
pub const CREDENTIALS_KEY: &str = "credentials.json";
/// Google's limit of user-managed keys per service account.
pub const MAX_KEYS: u32 = 10;
/// The roles the connection's service account needs on the project.
pub const ADMIN_ROLES: [&str; 3] =
    ["roles/iam.serviceAccountAdmin", "roles/iam.serviceAccountKeyAdmin", "roles/resourcemanager.projectIamAdmin"];
/// The OAuth scope keysmith asks for.
pub const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Google's IAM API.
pub const IAM_ENDPOINT: &str = "https://iam.googleapis.com";
/// Google's Resource Manager API.
pub const RESOURCE_MANAGER_ENDPOINT: &str = "https://cloudresourcemanager.googleapis.com";
/// How often a policy change is tried when others write in between.
pub const POLICY_ATTEMPTS: u32 = 5;
/// How long a new key may take to be accepted.
pub const VERIFY_WINDOW: Duration = Duration::from_secs(30);

const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_DESCRIPTION: usize = 256;
const MAX_DISPLAY_NAME: usize = 100;
const MAX_QUOTED: usize = 300;
/// The organization policy constraints that forbid key creation (the legacy
/// and the managed one both contain this).
const KEY_CREATION_POLICY: &str = "disableServiceAccountKeyCreation";
/// The longest an access token is kept, whatever the token endpoint says.
const MAX_TOKEN_LIFETIME: u64 = 3600;

/// A service-account key file: what keysmith reads of it. Its `Debug` never
/// shows the private key.
#[derive(Clone)]
pub struct KeyFile {
    /// The service account's email.
    pub client_email: String,
    /// The key's id (the JWT's `kid`).
    pub private_key_id: String,
    /// The RSA private key, PKCS#8 PEM.
    private_key: String,
    /// Where tokens are exchanged.
    pub token_uri: String,
}

impl fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFile")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .field("private_key", &"<redacted>")
            .field("token_uri", &self.token_uri)
            .finish()
    }
}

impl KeyFile {
    /// Reads a JSON key file. Errors name the missing field, never a value.
    pub fn parse(text: &str) -> Result<Self, ProviderError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|_| ProviderError::Invalid("the service-account key file is not JSON".to_owned()))?;
        let field = |name: &str| {
            value
                .get(name)
                .and_then(Value::as_str)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| ProviderError::Invalid(format!("the service-account key file has no {name}")))
        };
        if value.get("type").and_then(Value::as_str) != Some("service_account") {
            return Err(ProviderError::Invalid(
                "the key file's type is not service_account: keysmith needs a service-account key file".to_owned(),
            ));
        }
        Ok(Self {
            client_email: field("client_email")?,
            private_key_id: field("private_key_id")?,
            private_key: field("private_key")?,
            token_uri: field("token_uri")?,
        })
    }

    /// A JWT-bearer assertion for `scope`, signed with the key (RS256).
    fn assertion(&self, scope: &str, now: i64) -> Result<String, ProviderError> {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.private_key_id});
        let claims =
            json!({"iss": self.client_email, "scope": scope, "aud": self.token_uri, "iat": now, "exp": now + 3600});
        let input = format!("{}.{}", engine.encode(header.to_string()), engine.encode(claims.to_string()));
        let der = pem_body(&self.private_key)
            .ok_or_else(|| ProviderError::Invalid("the key file's private_key is not a PEM private key".to_owned()))?;
        let pair = ring::signature::RsaKeyPair::from_pkcs8(&der)
            .map_err(|_| ProviderError::Invalid("the key file's private_key is not an RSA key in PKCS#8".to_owned()))?;
        let mut signature = vec![0; pair.public().modulus_len()];
        pair.sign(
            &ring::signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            input.as_bytes(),
            &mut signature,
        )
        .map_err(|_| ProviderError::Invalid("signing with the key file's private_key failed".to_owned()))?;
        Ok(format!("{input}.{}", engine.encode(signature)))
    }
}

/// Until when a token answer is kept: a minute before it expires. The
/// lifetime comes from the token endpoint the key file names (a tenant's,
/// behind an AppConnection), so it is kept within an hour (Google's tokens
/// live 3599 s) and never trusted to be sane.
fn keep_until(answer: &Value, now: Instant) -> Instant {
    let lifetime = answer.get("expires_in").and_then(Value::as_u64).unwrap_or(300).min(MAX_TOKEN_LIFETIME);
    now + Duration::from_secs(lifetime.saturating_sub(60).max(1))
}

/// The DER inside a `-----BEGIN PRIVATE KEY-----` PEM block.
fn pem_body(pem: &str) -> Option<Vec<u8>> {
    let start = pem.find("-----BEGIN PRIVATE KEY-----")? + "-----BEGIN PRIVATE KEY-----".len();
    let end = pem[start..].find("-----END PRIVATE KEY-----")? + start;
    let body: String = pem[start..end].chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// What a failed call said: Google's status (`FAILED_PRECONDITION`...), the
/// HTTP status, and the classified error.
struct Failure {
    status: Option<StatusCode>,
    google: Option<String>,
    /// `PreconditionFailure` violation types in the error's details.
    preconditions: Vec<String>,
    error: ProviderError,
}

impl Failure {
    fn is(&self, status: StatusCode, google: &str) -> bool {
        self.status == Some(status) && self.google.as_deref() == Some(google)
    }

    fn not_found(&self) -> bool {
        self.status == Some(StatusCode::NOT_FOUND)
    }
}

impl From<ProviderError> for Failure {
    fn from(error: ProviderError) -> Self {
        Self { status: None, google: None, preconditions: Vec::new(), error }
    }
}

/// Access tokens of the connection's service account, each kept until a
/// minute before it expires.
struct TokenSource {
    key: KeyFile,
    cached: Mutex<Option<(String, Instant)>>,
}

/// Google Cloud IAM service accounts in one project.
pub struct GcpIamProvider {
    project: String,
    iam: String,
    resource_manager: String,
    admin: TokenSource,
    http: reqwest::Client,
    timeout: Duration,
    verify_window: Duration,
    /// One policy change at a time per connection: every account's roles
    /// are in the one project policy, and concurrent writers only abort
    /// each other.
    policy_writer: tokio::sync::Mutex<()>,
}

impl fmt::Debug for GcpIamProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcpIamProvider")
            .field("project", &self.project)
            .field("iam", &self.iam)
            .field("resource_manager", &self.resource_manager)
            .field("admin", &self.admin.key)
            .finish()
    }
}

impl GcpIamProvider {
    /// A provider for `project`, calling the IAM API at `iam` and Resource
    /// Manager at `resource_manager` (empty: Google's), as the service
    /// account of `admin_key_file` (a JSON key file).
    pub fn new(
        project: String,
        iam: String,
        resource_manager: String,
        admin_key_file: &str,
        http: reqwest::Client,
    ) -> Result<Self, ProviderError> {
        let key = KeyFile::parse(admin_key_file)
            .map_err(|e| ProviderError::Invalid(format!("the connection's credential: {e}")))?;
        let base = |url: String, default: &str| {
            if url.is_empty() {
                default.to_owned()
            } else {
                url.trim_end_matches('/').to_owned()
            }
        };
        Ok(Self {
            project,
            iam: base(iam, IAM_ENDPOINT),
            resource_manager: base(resource_manager, RESOURCE_MANAGER_ENDPOINT),
            admin: TokenSource { key, cached: Mutex::new(None) },
            http,
            timeout: REQUEST_TIMEOUT,
            verify_window: VERIFY_WINDOW,
            policy_writer: tokio::sync::Mutex::new(()),
        })
    }

    /// Sets how long one request may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets how long a new key may take to be accepted.
    pub fn with_verify_window(mut self, window: Duration) -> Self {
        self.verify_window = window;
        self
    }

    fn email(&self, account: &AccountRequest) -> String {
        format!("{}@{}.iam.gserviceaccount.com", account.name, self.project)
    }

    fn account_url(&self, account: &AccountRequest) -> String {
        format!("{}/v1/projects/{}/serviceAccounts/{}", self.iam, self.project, self.email(account))
    }

    /// An access token of the connection's service account.
    async fn token(&self) -> Result<String, ProviderError> {
        if let Ok(cached) = self.admin.cached.lock() {
            if let Some((token, _)) = cached.as_ref().filter(|(_, until)| *until > Instant::now()) {
                return Ok(token.clone());
            }
        }
        let answer = self.exchange(&self.admin.key).await.map_err(|failure| match failure.error {
            ProviderError::Invalid(message) if failure.status == Some(StatusCode::BAD_REQUEST) => {
                ProviderError::Unauthorized(format!("the connection's service-account key was refused: {message}"))
            }
            other => other,
        })?;
        let token = answer.get("access_token").and_then(Value::as_str).unwrap_or_default().to_owned();
        if token.is_empty() {
            return Err(ProviderError::transient("the token endpoint answered without an access_token"));
        }
        let until = keep_until(&answer, Instant::now());
        if let Ok(mut cached) = self.admin.cached.lock() {
            *cached = Some((token.clone(), until));
        }
        Ok(token)
    }

    /// A JWT-bearer exchange signed with `key` at its `token_uri`.
    async fn exchange(&self, key: &KeyFile) -> Result<Value, Failure> {
        let what = format!("exchanging a token for {} at {}", key.client_email, key.token_uri);
        let assertion = key.assertion(SCOPE, Timestamp::now().as_second())?;
        let response = self
            .http
            .post(&key.token_uri)
            .timeout(self.timeout)
            .form(&[("grant_type", JWT_BEARER), ("assertion", assertion.as_str())])
            .send()
            .await
            .map_err(|e| Failure::from(transport_error(&what, e)))?;
        let status = response.status();
        let hint = retry_after(response.headers());
        let text = response.text().await.map_err(|e| Failure::from(transport_error(&what, e)))?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        let text = |name: &str| body.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
        let message = format!(
            "{what}: HTTP {status}: {} ({})",
            scrub(&text("error"), &[&assertion]),
            scrub(&text("error_description"), &[&assertion])
        );
        Err(Failure {
            status: Some(status),
            google: Some(text("error")),
            preconditions: Vec::new(),
            error: classify_status(status, message, hint),
        })
    }

    /// One call to a Google API as the connection's service account.
    async fn call(&self, method: reqwest::Method, url: &str, body: Option<&Value>) -> Result<Value, Failure> {
        let token = self.token().await?;
        let path = url.split_once("/v1/").map_or(url, |(_, path)| path);
        let what = format!("{method} {path}");
        let mut request = self
            .http
            .request(method.clone(), url)
            .timeout(self.timeout)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::ACCEPT, "application/json");
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| Failure::from(transport_error(&what, e)))?;
        let status = response.status();
        let hint = retry_after(response.headers());
        let text = response.text().await.map_err(|e| Failure::from(transport_error(&what, e)))?;
        if status.is_success() {
            if text.trim().is_empty() {
                return Ok(Value::Object(Map::new()));
            }
            return serde_json::from_str(&text).map_err(|_| {
                Failure::from(ProviderError::transient(format!("{what}: the answer is not JSON (HTTP {status})")))
            });
        }
        if status == StatusCode::UNAUTHORIZED {
            // The token may have been revoked early: the next call gets another.
            if let Ok(mut cached) = self.admin.cached.lock() {
                *cached = None;
            }
        }
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let error = body.get("error").cloned().unwrap_or(Value::Null);
        let google = error.get("status").and_then(Value::as_str).map(str::to_owned);
        let detail = error.get("message").and_then(Value::as_str).unwrap_or_default();
        let preconditions = error
            .get("details")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .flat_map(|d| d.get("violations").and_then(Value::as_array).cloned().unwrap_or_default())
            .filter_map(|v| v.get("type").and_then(Value::as_str).map(str::to_owned))
            .collect();
        let message = format!(
            "{what}: {} {} (HTTP {})",
            google.as_deref().unwrap_or("error"),
            scrub(detail, &[&token]),
            status.as_u16()
        );
        let error = match (status.as_u16(), google.as_deref()) {
            (403, _) => ProviderError::Unauthorized(message),
            (409, Some("ABORTED")) => ProviderError::Conflict(message),
            (429, _) => ProviderError::Transient { message, retry_after: hint },
            _ => classify_status(status, message, hint),
        };
        Err(Failure { status: Some(status), google, preconditions, error })
    }

    async fn get_account(&self, account: &AccountRequest) -> Result<Option<Value>, ProviderError> {
        check_account_id(account)?;
        match self.call(reqwest::Method::GET, &self.account_url(account), None).await {
            Ok(found) => Ok(Some(found)),
            Err(failure) if failure.not_found() => Ok(None),
            Err(failure) => Err(failure.error),
        }
    }

    /// The account, which must be this IntegrationAccount's.
    async fn owned_account(&self, account: &AccountRequest) -> Result<Value, ProviderError> {
        match self.get_account(account).await? {
            None => Err(ProviderError::NotFound(format!("service account {} does not exist", self.email(account)))),
            Some(found) if !is_owned(&found, account) => Err(self.foreign(account)),
            Some(found) => Ok(found),
        }
    }

    /// The account, which must be this IntegrationAccount's, for a change
    /// that needs it (a grant, a key): one Google does not show yet, just
    /// after it was created, is waited for.
    async fn owned_for_change(&self, account: &AccountRequest) -> Result<Value, ProviderError> {
        match self.owned_account(account).await {
            Err(ProviderError::NotFound(message)) => {
                Err(ProviderError::transient(format!("{message} (yet: Google's reads lag a create by a few seconds)")))
            }
            other => other,
        }
    }

    /// Whether the account is this IntegrationAccount's (`true`) or gone
    /// (`false`); someone else's is a conflict.
    async fn ours_or_gone(&self, account: &AccountRequest) -> Result<bool, ProviderError> {
        match self.owned_account(account).await {
            Ok(_) => Ok(true),
            Err(ProviderError::NotFound(_)) => Ok(false),
            Err(error) => Err(error),
        }
    }

    fn foreign(&self, account: &AccountRequest) -> ProviderError {
        ProviderError::Conflict(format!(
            "service account {} exists and was not created by keysmith for this IntegrationAccount",
            self.email(account)
        ))
    }

    fn policy_url(&self, verb: &str) -> String {
        format!("{}/v1/projects/{}:{verb}", self.resource_manager, self.project)
    }

    /// Reads the project policy (version 3), lets `change` edit its
    /// bindings, and writes it back with the etag read, retrying when
    /// someone wrote in between. Does not write when nothing changed.
    async fn change_policy<F>(&self, mut change: F) -> Result<(), ProviderError>
    where
        F: FnMut(&mut Vec<Value>) -> bool,
    {
        let _one_writer = self.policy_writer.lock().await;
        let mut attempt = 1;
        loop {
            let read = json!({"options": {"requestedPolicyVersion": 3}});
            let mut policy = self
                .call(reqwest::Method::POST, &self.policy_url("getIamPolicy"), Some(&read))
                .await
                .map_err(|f| f.error)?;
            let mut bindings: Vec<Value> =
                policy.get("bindings").and_then(Value::as_array).cloned().unwrap_or_default();
            if !change(&mut bindings) {
                return Ok(());
            }
            if let Some(object) = policy.as_object_mut() {
                object.insert("bindings".to_owned(), Value::Array(bindings));
                object.insert("version".to_owned(), json!(3));
            }
            let write = json!({"policy": policy});
            match self.call(reqwest::Method::POST, &self.policy_url("setIamPolicy"), Some(&write)).await {
                Ok(_) => return Ok(()),
                Err(failure) if failure.is(StatusCode::CONFLICT, "ABORTED") && attempt < POLICY_ATTEMPTS => {
                    tracing::debug!(attempt, "the project policy changed under keysmith's write; reading it again");
                    let jitter = rand::random::<u64>() % 100;
                    tokio::time::sleep(Duration::from_millis((100 << attempt) + jitter)).await;
                    attempt += 1;
                }
                Err(failure) if failure.is(StatusCode::CONFLICT, "ABORTED") => {
                    return Err(ProviderError::transient(format!(
                        "{}; others kept changing the project policy ({POLICY_ATTEMPTS} attempts)",
                        failure.error
                    )));
                }
                Err(failure) if failure.status == Some(StatusCode::BAD_REQUEST) && is_not_yet_visible(&failure) => {
                    return Err(ProviderError::transient(format!(
                        "{}; a new service account takes a moment to be usable in policies",
                        failure.error
                    )));
                }
                Err(failure) => return Err(failure.error),
            }
        }
    }

    fn material(key_file: &str) -> KeyMaterial {
        KeyMaterial::new(BTreeMap::from([(CREDENTIALS_KEY.to_owned(), key_file.to_owned())]))
    }
}

/// Whether a policy write was refused because a member's service account
/// does not exist (yet: reads after a create are eventually consistent).
fn is_not_yet_visible(failure: &Failure) -> bool {
    let message = failure.error.to_string();
    message.contains("Service account") && message.contains("does not exist")
}

/// The `description` keysmith writes: its ownership tag, then who the
/// account is for, cut to Google's limit.
fn desired_description(account: &AccountRequest) -> String {
    let mut text = ownership::uid_tag(&account.owner_uid);
    text.push_str(&format!(
        "\nintegration-account: {}",
        ownership::account_reference(&account.namespace, &account.account_name)
    ));
    if let Some(description) = account.description.as_deref().filter(|d| !d.is_empty()) {
        text.push_str(&format!("\ndescription: {description}"));
    }
    if let Some(owner) = account.owner.as_deref().filter(|o| !o.is_empty()) {
        text.push_str(&format!("\nowner: {owner}"));
    }
    cut(text, MAX_DESCRIPTION)
}

fn desired_display_name(account: &AccountRequest) -> String {
    cut(format!("{}/{}", account.namespace, account.account_name), MAX_DISPLAY_NAME)
}

/// `text` cut to at most `bytes` UTF-8 bytes (Google's limits are in
/// bytes), at a character boundary.
fn cut(mut text: String, bytes: usize) -> String {
    if text.len() > bytes {
        let mut end = bytes;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn is_owned(found: &Value, account: &AccountRequest) -> bool {
    let description = found.get("description").and_then(Value::as_str).unwrap_or_default();
    !account.owner_uid.is_empty() && description.lines().next() == Some(ownership::uid_tag(&account.owner_uid).as_str())
}

fn observed(found: &Value, account: &AccountRequest) -> ObservedAccount {
    let text = |name: &str| found.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
    ObservedAccount {
        id: text("email"),
        name: text("email"),
        disabled: found.get("disabled").and_then(Value::as_bool).unwrap_or(false),
        owned: is_owned(found, account),
        drifted: text("description") != desired_description(account)
            || text("displayName") != desired_display_name(account),
    }
}

/// Google's account id rules.
fn check_account_id(account: &AccountRequest) -> Result<(), ProviderError> {
    let id = account.name.as_str();
    let valid = (6..=30).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && id.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if valid {
        Ok(())
    } else {
        Err(ProviderError::Invalid(format!(
            "{id:?} cannot be a Google Cloud service account id: it must be 6 to 30 characters of lowercase \
             letters, digits and hyphens, starting with a letter and not ending with a hyphen (set \
             spec.providerOptions.name; behind a ClusterAppConnection, its accountNameTemplate)"
        )))
    }
}

fn check_role(grant: &RoleGrant) -> Result<(), ProviderError> {
    if grant.scope.is_some() {
        return Err(ProviderError::Invalid(format!(
            "{grant}: gcpIam roles apply to the connection's project and take no scope"
        )));
    }
    let role = grant.role.as_str();
    let name_ok =
        |name: &str| !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    let valid = match role.split('/').collect::<Vec<_>>().as_slice() {
        ["roles", name] => name_ok(name),
        ["projects" | "organizations", parent, "roles", name] => !parent.is_empty() && name_ok(name),
        _ => false,
    };
    if valid {
        Ok(())
    } else {
        Err(ProviderError::Invalid(format!(
            "{role:?} is not a Google Cloud role name (roles/NAME, projects/PROJECT/roles/NAME or \
             organizations/ORG/roles/NAME)"
        )))
    }
}

/// The unconditional roles `member` holds in `bindings`.
fn roles_of(bindings: &[Value], member: &str) -> BTreeSet<String> {
    bindings
        .iter()
        .filter(|b| b.get("condition").is_none())
        .filter(|b| b.get("members").and_then(Value::as_array).is_some_and(|m| m.iter().any(|m| m == member)))
        .filter_map(|b| b.get("role").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

/// Adds `member` to the unconditional binding of `role`; whether anything changed.
fn add_member(bindings: &mut Vec<Value>, role: &str, member: &str) -> bool {
    if roles_of(bindings, member).contains(role) {
        return false;
    }
    let existing = bindings
        .iter_mut()
        .find(|b| b.get("condition").is_none() && b.get("role").and_then(Value::as_str) == Some(role));
    match existing.and_then(|b| b.get_mut("members")).and_then(Value::as_array_mut) {
        Some(members) => members.push(json!(member)),
        None => bindings.push(json!({"role": role, "members": [member]})),
    }
    true
}

/// Removes `member` from the unconditional bindings of `role` (every role
/// when `None`), dropping bindings left empty; whether anything changed.
fn remove_member(bindings: &mut Vec<Value>, role: Option<&str>, member: &str) -> bool {
    let mut changed = false;
    for binding in bindings.iter_mut() {
        let applies = binding.get("condition").is_none()
            && role.is_none_or(|r| binding.get("role").and_then(Value::as_str) == Some(r));
        if let Some(members) = binding.get_mut("members").and_then(Value::as_array_mut).filter(|_| applies) {
            let before = members.len();
            members.retain(|m| m != member);
            changed |= members.len() != before;
        }
    }
    bindings.retain(|b| b.get("members").and_then(Value::as_array).is_none_or(|m| !m.is_empty()));
    changed
}

/// `text` with every secret cut out, and at most [`MAX_QUOTED`] characters.
fn scrub(text: &str, secrets: &[&str]) -> String {
    super::http::scrub(text, secrets, MAX_QUOTED)
}

fn key_id_of(name: &str) -> String {
    name.rsplit('/').next().unwrap_or(name).to_owned()
}

#[async_trait]
impl Provider for GcpIamProvider {
    fn name(&self) -> &'static str {
        "gcpIam"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { last_use_lag: None, max_keys_per_account: Some(MAX_KEYS), key_expiry: false, disable: true }
    }

    /// The key file is exchanged for a token, and the token reads the
    /// project policy and lists the service accounts.
    async fn verify_connection(&self) -> Result<(), ProviderError> {
        let read = json!({"options": {"requestedPolicyVersion": 3}});
        self.call(reqwest::Method::POST, &self.policy_url("getIamPolicy"), Some(&read)).await.map_err(|f| f.error)?;
        let list = format!("{}/v1/projects/{}/serviceAccounts?pageSize=1", self.iam, self.project);
        self.call(reqwest::Method::GET, &list, None).await.map_err(|f| f.error)?;
        Ok(())
    }

    async fn observe_account(&self, account: &AccountRequest) -> Result<Option<ObservedAccount>, ProviderError> {
        check_account_id(account)?;
        Ok(self.get_account(account).await?.map(|found| observed(&found, account)))
    }

    async fn create_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        check_account_id(account)?;
        let url = format!("{}/v1/projects/{}/serviceAccounts", self.iam, self.project);
        let body = json!({
            "accountId": account.name,
            "serviceAccount": {"displayName": desired_display_name(account), "description": desired_description(account)},
        });
        match self.call(reqwest::Method::POST, &url, Some(&body)).await {
            Ok(created) => Ok(observed(&created, account)),
            Err(failure) if failure.status == Some(StatusCode::CONFLICT) => match self.get_account(account).await? {
                Some(found) if is_owned(&found, account) => Ok(observed(&found, account)),
                Some(_) => Err(self.foreign(account)),
                None => Err(ProviderError::transient(format!(
                    "service account {} exists but cannot be read yet (Google's reads are eventually consistent)",
                    self.email(account)
                ))),
            },
            Err(failure) => Err(failure.error),
        }
    }

    async fn update_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        let found = self.owned_account(account).await?;
        let url = self.account_url(account);
        if found.get("disabled").and_then(Value::as_bool).unwrap_or(false) {
            self.call(reqwest::Method::POST, &format!("{url}:enable"), Some(&json!({}))).await.map_err(|f| f.error)?;
        }
        let current = observed(&found, account);
        if !current.drifted {
            return Ok(ObservedAccount { disabled: false, ..current });
        }
        let body = json!({
            "serviceAccount": {"displayName": desired_display_name(account), "description": desired_description(account)},
            "updateMask": "displayName,description",
        });
        let updated = self.call(reqwest::Method::PATCH, &url, Some(&body)).await.map_err(|f| f.error)?;
        Ok(ObservedAccount { disabled: false, ..observed(&updated, account) })
    }

    async fn disable_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        match self.owned_account(account).await {
            Ok(_) => {}
            Err(ProviderError::NotFound(_)) => return Ok(()),
            Err(ProviderError::Conflict(message)) => {
                tracing::warn!(%message, "not disabling a service account keysmith does not own");
                return Ok(());
            }
            Err(error) => return Err(error),
        }
        let url = format!("{}:disable", self.account_url(account));
        match self.call(reqwest::Method::POST, &url, Some(&json!({}))).await {
            Ok(_) => Ok(()),
            Err(failure) if failure.not_found() => Ok(()),
            Err(failure) => Err(failure.error),
        }
    }

    async fn delete_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        match self.owned_account(account).await {
            Ok(_) => {}
            Err(ProviderError::NotFound(_)) => return Ok(()),
            Err(ProviderError::Conflict(message)) => {
                tracing::warn!(%message, "not deleting a service account keysmith does not own");
                return Ok(());
            }
            Err(error) => return Err(error),
        }
        let member = format!("serviceAccount:{}", self.email(account));
        self.change_policy(|bindings| remove_member(bindings, None, &member)).await?;
        match self.call(reqwest::Method::DELETE, &self.account_url(account), None).await {
            Ok(_) => Ok(()),
            Err(failure) if failure.not_found() => Ok(()),
            Err(failure) => Err(failure.error),
        }
    }

    async fn list_roles(&self, account: &AccountRequest) -> Result<Vec<RoleGrant>, ProviderError> {
        let read = json!({"options": {"requestedPolicyVersion": 3}});
        let policy = self
            .call(reqwest::Method::POST, &self.policy_url("getIamPolicy"), Some(&read))
            .await
            .map_err(|f| f.error)?;
        let bindings = policy.get("bindings").and_then(Value::as_array).cloned().unwrap_or_default();
        let member = format!("serviceAccount:{}", self.email(account));
        Ok(roles_of(&bindings, &member).into_iter().map(|role| RoleGrant { role, scope: None }).collect())
    }

    async fn grant_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        check_role(grant)?;
        self.owned_for_change(account).await?;
        let member = format!("serviceAccount:{}", self.email(account));
        self.change_policy(|bindings| add_member(bindings, &grant.role, &member)).await
    }

    async fn revoke_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        if !self.ours_or_gone(account).await? {
            // Gone: Google keeps the binding as deleted:serviceAccount:…,
            // which no longer names this account; nothing to do.
            return Ok(());
        }
        let member = format!("serviceAccount:{}", self.email(account));
        self.change_policy(|bindings| remove_member(bindings, Some(&grant.role), &member)).await
    }

    async fn issue_key(&self, account: &AccountRequest, _request: &KeyRequest) -> Result<IssuedKey, ProviderError> {
        self.owned_for_change(account).await?;
        let url = format!("{}/keys", self.account_url(account));
        let body = json!({"privateKeyType": "TYPE_GOOGLE_CREDENTIALS_FILE", "keyAlgorithm": "KEY_ALG_RSA_2048"});
        let created = match self.call(reqwest::Method::POST, &url, Some(&body)).await {
            Ok(created) => created,
            Err(failure) if failure.not_found() => {
                return Err(ProviderError::transient(format!("{} (Google's reads lag a create)", failure.error)))
            }
            Err(failure) if failure.is(StatusCode::BAD_REQUEST, "FAILED_PRECONDITION") => {
                if let Some(constraint) = failure.preconditions.iter().find(|t| t.contains(KEY_CREATION_POLICY)) {
                    return Err(ProviderError::Invalid(format!(
                        "the organization policy {constraint} forbids creating keys for service account {}: \
                         keysmith cannot issue keys in this project until it is lifted",
                        self.email(account)
                    )));
                }
                return Err(ProviderError::LimitExceeded(format!(
                    "service account {} already holds {MAX_KEYS} keys, Google's limit (disabled keys count): {}",
                    self.email(account),
                    failure.error
                )));
            }
            Err(failure) => return Err(failure.error),
        };
        let id = created.get("name").and_then(Value::as_str).map(key_id_of).unwrap_or_default();
        let data = created.get("privateKeyData").and_then(Value::as_str).unwrap_or_default();
        // Never quoted: it is the key.
        let key_file = base64::engine::general_purpose::STANDARD
            .decode(data)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .filter(|text| KeyFile::parse(text).is_ok())
            .ok_or_else(|| {
                ProviderError::transient(format!(
                    "Google created key {id} for {} but its key file is garbled; it is left for keysmith to revoke",
                    self.email(account)
                ))
            })?;
        if id.is_empty() {
            return Err(ProviderError::transient("Google created a key without a name"));
        }
        Ok(IssuedKey { id, expires_at: None, material: Self::material(&key_file) })
    }

    async fn list_keys(&self, account: &AccountRequest) -> Result<Vec<ObservedKey>, ProviderError> {
        check_account_id(account)?;
        let url = format!("{}/keys?keyTypes=USER_MANAGED", self.account_url(account));
        let listed = match self.call(reqwest::Method::GET, &url, None).await {
            Ok(listed) => listed,
            Err(failure) if failure.not_found() => return Ok(Vec::new()),
            Err(failure) => return Err(failure.error),
        };
        let mut keys: Vec<ObservedKey> = listed
            .get("keys")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|key| {
                let id = key_id_of(key.get("name")?.as_str()?);
                let created_at = key.get("validAfterTime").and_then(Value::as_str).and_then(|t| t.parse().ok());
                Some(ObservedKey { last_used: None, id, created_at })
            })
            .collect();
        keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(keys)
    }

    async fn revoke_key(&self, account: &AccountRequest, key_id: &str) -> Result<(), ProviderError> {
        if key_id.is_empty() || key_id.len() > 64 || !key_id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(ProviderError::Invalid(format!("{key_id:?} is not a service-account key id")));
        }
        if !self.ours_or_gone(account).await? {
            return Ok(());
        }
        let url = format!("{}/keys/{key_id}", self.account_url(account));
        // Disabled first: refused at once, and still there to enable should
        // the deletion fail.
        match self.call(reqwest::Method::POST, &format!("{url}:disable"), Some(&json!({}))).await {
            Ok(_) => {}
            Err(failure) if failure.not_found() => return Ok(()),
            Err(failure) => return Err(failure.error),
        }
        match self.call(reqwest::Method::DELETE, &url, None).await {
            Ok(_) => Ok(()),
            Err(failure) if failure.not_found() => Ok(()),
            Err(failure) => Err(failure.error),
        }
    }

    async fn verify_key(&self, account: &AccountRequest, key: &IssuedKey) -> Result<(), ProviderError> {
        let text = key
            .material
            .expose()
            .get(CREDENTIALS_KEY)
            .ok_or_else(|| ProviderError::Invalid(format!("the key has no {CREDENTIALS_KEY}")))?;
        let key_file = KeyFile::parse(text)?;
        if key_file.client_email != self.email(account) {
            return Err(ProviderError::Conflict(format!(
                "the key belongs to {}, not to {}",
                key_file.client_email,
                self.email(account)
            )));
        }
        let what = format!("the new key {}", key.id);
        super::until_accepted(&what, self.verify_window, || async {
            match self.exchange(&key_file).await {
                Ok(answer) if answer.get("access_token").and_then(Value::as_str).is_some_and(|t| !t.is_empty()) => {
                    Ok(Check::Accepted)
                }
                Ok(_) => Ok(Check::Refused("the token endpoint answered without an access_token".to_owned())),
                Err(Failure { error: ProviderError::Transient { message, .. }, .. }) => Ok(Check::Refused(message)),
                Err(failure) if failure.google.as_deref() == Some("invalid_grant") => {
                    Ok(Check::Refused(failure.error.to_string()))
                }
                Err(failure) => Err(failure.error),
            }
        })
        .await
    }
}

/// The connect step: the admin key file from its Secret, then the client.
pub async fn connect(
    spec: &crate::api::GcpIamSpec,
    connect: &super::Connect<'_>,
) -> Result<std::sync::Arc<dyn Provider>, ProviderError> {
    let (key_file, version) = connect.secret_value(&spec.credentials_secret_ref, CREDENTIALS_KEY).await?;
    let key = format!("gcpIam/{}/{version}", connect.connection.uid);
    connect
        .cached(key, || async {
            Ok(std::sync::Arc::new(GcpIamProvider::new(
                spec.project.clone(),
                spec.iam_endpoint.clone().unwrap_or_default(),
                spec.resource_manager_endpoint.clone().unwrap_or_default(),
                &key_file,
                connect.http_client()?,
            )?) as std::sync::Arc<dyn Provider>)
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(name: &str) -> AccountRequest {
        AccountRequest {
            name: name.to_owned(),
            namespace: "payments".to_owned(),
            account_name: "billing-sync".to_owned(),
            owner_uid: "uid-1".to_owned(),
            description: Some("nightly".to_owned()),
            owner: Some("team-payments".to_owned()),
            options: BTreeMap::new(),
        }
    }

    #[test]
    fn account_ids_follow_googles_rules() {
        for good in ["billing-sync", "abcdef", "a2345678901234567890123456789z"] {
            check_account_id(&account(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in ["short", "payments.billing-sync", "Billing-sync", "1billing", "billing-", "a".repeat(31).as_str()] {
            let err = check_account_id(&account(bad)).expect_err(bad);
            assert!(matches!(err, ProviderError::Invalid(ref m) if m.contains("providerOptions.name")), "{bad}: {err}");
        }
    }

    #[test]
    fn roles_are_role_names_without_a_scope() {
        let grant =
            |role: &str, scope: Option<&str>| RoleGrant { role: role.to_owned(), scope: scope.map(str::to_owned) };
        for good in
            ["roles/viewer", "roles/storage.objectViewer", "projects/p-1/roles/custom_1", "organizations/123/roles/x"]
        {
            check_role(&grant(good, None)).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in ["viewer", "roles/", "roles/a/b", "projects//roles/x", "roles/view er"] {
            assert!(check_role(&grant(bad, None)).is_err(), "{bad}");
        }
        assert!(check_role(&grant("roles/viewer", Some("other-project"))).is_err());
    }

    #[test]
    fn bindings_change_only_the_members_unconditional_binding() {
        let member = "serviceAccount:a@p.iam.gserviceaccount.com";
        let conditional =
            json!({"role": "roles/viewer", "members": [member], "condition": {"title": "t", "expression": "true"}});
        let mut bindings =
            vec![json!({"role": "roles/owner", "members": ["user:admin@example.com"]}), conditional.clone()];
        assert!(roles_of(&bindings, member).is_empty(), "a conditional binding is not a role keysmith manages");
        assert!(add_member(&mut bindings, "roles/viewer", member));
        assert!(!add_member(&mut bindings, "roles/viewer", member), "twice is once");
        assert!(add_member(&mut bindings, "roles/owner", member));
        assert_eq!(roles_of(&bindings, member), BTreeSet::from(["roles/owner".to_owned(), "roles/viewer".to_owned()]));
        assert!(remove_member(&mut bindings, Some("roles/viewer"), member));
        assert!(bindings.contains(&conditional), "the conditional binding is kept");
        assert!(
            !bindings.iter().any(|b| b.get("condition").is_none() && b["role"] == "roles/viewer"),
            "emptied, dropped"
        );
        assert!(remove_member(&mut bindings, None, member));
        assert_eq!(bindings[0], json!({"role": "roles/owner", "members": ["user:admin@example.com"]}));
        assert!(!remove_member(&mut bindings, None, member));
    }

    #[test]
    fn the_description_carries_the_ownership_tag_first_and_fits() {
        let mut long = account("billing-sync");
        long.description = Some("x".repeat(400));
        let text = desired_description(&long);
        assert!(text.starts_with("keysmith:uid-1\nintegration-account: payments/billing-sync\n"));
        assert_eq!(text.chars().count(), MAX_DESCRIPTION);
        let found = json!({"email": "e", "description": text, "displayName": "payments/billing-sync"});
        assert!(is_owned(&found, &long));
        let other = AccountRequest { owner_uid: "uid-2".to_owned(), ..long.clone() };
        assert!(!is_owned(&found, &other));
        assert!(!observed(&found, &long).drifted);
    }

    #[test]
    fn a_token_lifetime_from_the_endpoint_never_overflows() {
        let now = Instant::now();
        for (answer, kept) in [
            (json!({"expires_in": u64::MAX}), 3540),
            (json!({"expires_in": 3599}), 3539),
            (json!({"expires_in": 10}), 1),
            (json!({"expires_in": -5}), 240),
            (json!({}), 240),
        ] {
            assert_eq!(keep_until(&answer, now) - now, Duration::from_secs(kept), "{answer}");
        }
    }

    #[test]
    fn texts_are_cut_to_googles_limits_in_bytes() {
        let mut account = account("billing-sync");
        account.description = Some("Abrechnungsexport für Zürich ".repeat(20));
        let text = desired_description(&account);
        assert!(text.len() <= MAX_DESCRIPTION && text.len() > MAX_DESCRIPTION - 4, "{} bytes", text.len());
        assert!(text.starts_with("keysmith:uid-1\n"));
        assert_eq!(cut("ü".repeat(60), 101).len(), 100, "never inside a character");
    }

    #[test]
    fn key_files_parse_and_never_show_their_private_key() {
        let text = r#"{"type": "service_account", "client_email": "a@p.iam.gserviceaccount.com",
            "private_key_id": "k1", "private_key": "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ib2R5\n-----END PRIVATE KEY-----\n",
            "token_uri": "https://oauth2.googleapis.com/token"}"#;
        let key = KeyFile::parse(text).expect("parses");
        assert!(!format!("{key:?}").contains("c2VjcmV0"));
        let err = key.assertion(SCOPE, 0).expect_err("not an RSA key");
        assert!(!err.to_string().contains("c2VjcmV0"), "{err}");
        let err = KeyFile::parse(&text.replace("service_account", "authorized_user")).expect_err("wrong type");
        assert!(err.to_string().contains("service_account"));
        assert!(KeyFile::parse("not json").is_err());
    }
}
