//! The `openBao` provider: the target app is an OpenBao (or HashiCorp
//! Vault-compatible) server's AppRole auth method, the way machines log in
//! to a secrets manager.
//!
//! - **account** → an AppRole role `auth/<mount>/role/<name>`. Its name is
//!   the account's name: letters, digits, `_`, `-` and `.`, starting and
//!   ending with a letter or digit, at most [`MAX_NAME`] characters (set
//!   `providerOptions.name` where the IntegrationAccount's name does not
//!   fit). An AppRole role carries no labels or description, so keysmith's
//!   ownership tag is its `role_id`: keysmith sets it at creation to
//!   `keysmith-<IntegrationAccount uid>-<random>`, and a role whose
//!   `role_id` does not start with this IntegrationAccount's prefix is never
//!   changed, keyed or deleted. The `role_id` is an identifier, not a
//!   credential: a login needs a secret-id too (`bind_secret_id`, which
//!   keysmith keeps on).
//! - **settings keysmith holds the role to** (drift when someone changes
//!   them, repaired by an update): `bind_secret_id` on,
//!   `token_no_default_policy` on (the role holds exactly the declared
//!   policies, not `default` besides), `token_period` 0 (a periodic token
//!   could be renewed for ever), `token_max_ttl` the connection's
//!   `tokenMaxTtlSeconds`, `token_ttl` no longer than that, and
//!   `secret_id_num_uses` 0.
//! - **roles** → the role's `token_policies`: ACL policy names, lowercase
//!   (OpenBao lowercases policy names when they are written), without a
//!   scope. `root` is refused: OpenBao issues no root token to an auth
//!   method, and keysmith says so before asking.
//! - **key** → a secret-id, tagged with keysmith's key id in its metadata
//!   (so it shows in the audit log with the token's metadata); the output
//!   Secret holds [`ROLE_ID_KEY`] and [`SECRET_ID_KEY`]. Several secret-ids
//!   live at once, so a rotation overlaps; each expires at the lifetime
//!   keysmith asks for. A key's id is its `secret_id_accessor`, and
//!   revoking destroys the secret-id by accessor.
//! - **verifying** a key → a login at `auth/<mount>/login` with the new
//!   `role_id` and `secret_id`; the token it returns is revoked at once by
//!   accessor, so verification leaves nothing behind.
//! - **what revoking does not do**: tokens that earlier logins obtained stay
//!   valid until their own TTL runs out, which is why keysmith keeps
//!   `token_max_ttl` short (an hour by default).
//! - **disabling**: AppRole has no disabled state; `deletionPolicy:
//!   Disable` revokes every secret-id and keeps the role, which can then
//!   not log in.
//! - **the connection's credential** → an OpenBao token (`X-Vault-Token`)
//!   whose policy allows the role paths keysmith manages (see the README for
//!   a least-privilege policy), `auth/token/lookup-self`, and
//!   `auth/token/revoke-accessor` (to revoke the token a verification login
//!   got, which holds no `default` policy to revoke itself with).
//!
//! Errors quote OpenBao's `errors`, never a token or a secret-id.

use std::{collections::BTreeSet, fmt, time::Duration};

use async_trait::async_trait;
use jiff::Timestamp;
use reqwest::{header::HeaderValue, Method, StatusCode};
use serde_json::{json, Value};

use super::{
    http::{classify_status, retry_after, scrub, transport_error},
    AccountRequest, Capabilities, Check, IssuedKey, KeyMaterial, KeyRequest, ObservedAccount, ObservedKey, Provider,
    ProviderError, RoleGrant,
};

/// Output Secret key: the role's `role_id`.
pub const ROLE_ID_KEY: &str = "role_id";
/// Output Secret key: the secret-id.
pub const SECRET_ID_KEY: &str = "secret_id";
/// The admin Secret's default key.
pub const TOKEN_KEY: &str = "token";
/// The longest AppRole role name keysmith accepts.
pub const MAX_NAME: usize = 128;
/// The metadata field of a secret-id that carries keysmith's key id.
pub const KEY_ID_METADATA: &str = "keysmith_key_id";
/// The metadata field of a secret-id that names its IntegrationAccount.
pub const ACCOUNT_METADATA: &str = "keysmith_integration_account";
/// How long a new secret-id may take to be accepted (a performance
/// standby may lag the active node).
pub const VERIFY_WINDOW: Duration = Duration::from_secs(10);

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_QUOTED: usize = 300;
const TOKEN_HEADER: &str = "X-Vault-Token";

/// AppRole roles behind one auth mount of one OpenBao server.
pub struct OpenBaoProvider {
    address: String,
    mount: String,
    token: String,
    token_max_ttl: u64,
    http: reqwest::Client,
    timeout: Duration,
    verify_window: Duration,
}

impl fmt::Debug for OpenBaoProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenBaoProvider")
            .field("address", &self.address)
            .field("mount", &self.mount)
            .field("token", &"<redacted>")
            .field("token_max_ttl", &self.token_max_ttl)
            .finish()
    }
}

/// What a failed call said: the HTTP status, OpenBao's first error, and the
/// classified error.
struct Failure {
    status: Option<StatusCode>,
    said: String,
    error: ProviderError,
}

impl From<ProviderError> for Failure {
    fn from(error: ProviderError) -> Self {
        Self { status: None, said: String::new(), error }
    }
}

impl Failure {
    /// A 404 for a path that exists (the role or the entry is not there), as
    /// opposed to one for a path no auth method serves.
    fn not_found(&self) -> bool {
        self.status == Some(StatusCode::NOT_FOUND) && !self.no_route()
    }

    fn no_route(&self) -> bool {
        no_route(&self.said)
    }

    /// OpenBao answers a LIST or secret-id call for a role that does not
    /// exist with `400 role "x" does not exist`.
    fn role_missing(&self) -> bool {
        self.status == Some(StatusCode::BAD_REQUEST) && self.said.contains("does not exist")
    }
}

impl OpenBaoProvider {
    /// A provider for the AppRole auth method at `auth/<mount>` of the server
    /// at `address`, acting with `token`; roles it manages issue tokens that
    /// live at most `token_max_ttl`.
    pub fn new(
        address: &str,
        mount: &str,
        token: String,
        token_max_ttl: Duration,
        http: reqwest::Client,
    ) -> Result<Self, ProviderError> {
        if token.trim().is_empty() || HeaderValue::from_str(&token).is_err() {
            return Err(ProviderError::Invalid(
                "the connection's OpenBao token is empty or not a valid header value".to_owned(),
            ));
        }
        let mount = mount.trim_matches('/');
        if mount.is_empty()
            || !mount.split('/').all(|part| {
                part.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                    && part.chars().all(is_path_char)
            })
        {
            return Err(ProviderError::Invalid(format!("{mount:?} is not an auth mount path")));
        }
        Ok(Self {
            address: address.trim_end_matches('/').to_owned(),
            mount: mount.to_owned(),
            token,
            token_max_ttl: token_max_ttl.as_secs().max(1),
            http,
            timeout: REQUEST_TIMEOUT,
            verify_window: VERIFY_WINDOW,
        })
    }

    /// Sets how long one request may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets how long a new secret-id may take to be accepted.
    pub fn with_verify_window(mut self, window: Duration) -> Self {
        self.verify_window = window;
        self
    }

    fn role_path(&self, account: &AccountRequest) -> String {
        format!("auth/{}/role/{}", self.mount, account.name)
    }

    /// One call to OpenBao's HTTP API with `token` (the admin's, unless a
    /// login's). `secrets` are cut out of anything quoted back.
    async fn call_with(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<&Value>,
        secrets: &[&str],
    ) -> Result<Value, Failure> {
        let what = format!("{method} {path}");
        let url = format!("{}/v1/{path}", self.address);
        let mut request = self.http.request(method.clone(), &url).timeout(self.timeout);
        if let Some(token) = token {
            request = request.header(TOKEN_HEADER, token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| Failure::from(transport_error(&what, e)))?;
        let status = response.status();
        let hint = retry_after(response.headers());
        let text = response.text().await.map_err(|e| Failure::from(transport_error(&what, e)))?;
        if status.is_success() {
            if text.trim().is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_str(&text).map_err(|_| {
                Failure::from(ProviderError::transient(format!("{what}: the answer is not JSON (HTTP {status})")))
            });
        }
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let errors: Vec<String> = body
            .get("errors")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|e| e.replace("1 error occurred:", "").replace(['\n', '\t'], " ").replace("* ", "").trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        let said = errors.join("; ");
        let mut all_secrets = vec![self.token.as_str()];
        all_secrets.extend_from_slice(secrets);
        if let Some(token) = token {
            all_secrets.push(token);
        }
        let quoted = if said.is_empty() { "no error text".to_owned() } else { scrub(&said, &all_secrets, MAX_QUOTED) };
        let message = format!("{what}: {quoted} (HTTP {})", status.as_u16());
        let failure = |error| Failure { status: Some(status), said: said.clone(), error };
        if status == StatusCode::NOT_FOUND
            && (said.contains("no handler for route") || said.contains("unsupported path"))
        {
            return Err(failure(ProviderError::Invalid(format!(
                "{message}: is an AppRole auth method mounted at auth/{}?",
                self.mount
            ))));
        }
        if status == StatusCode::FORBIDDEN && token == Some(self.token.as_str()) {
            return Err(failure(ProviderError::Unauthorized(format!(
                "{message}: does the connection's token hold a policy allowing {path}?"
            ))));
        }
        Err(failure(match status.as_u16() {
            // OpenBao answers a sealed or standby server with 503, and a
            // rate-limit quota with 429 and Retry-After.
            429 | 500..=599 => ProviderError::Transient { message, retry_after: hint },
            _ => classify_status(status, message, hint),
        }))
    }

    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, Failure> {
        self.call_with(Some(&self.token), method, path, body, &[]).await
    }

    /// The role's settings and its `role_id`, if it exists.
    async fn get_role(&self, account: &AccountRequest) -> Result<Option<(Value, String)>, ProviderError> {
        check_name(account)?;
        let path = self.role_path(account);
        let role = match self.call(Method::GET, &path, None).await {
            Ok(found) => found.get("data").cloned().unwrap_or(Value::Null),
            Err(failure) if failure.not_found() => return Ok(None),
            Err(failure) => return Err(failure.error),
        };
        let role_id = match self.call(Method::GET, &format!("{path}/role-id"), None).await {
            Ok(found) => found.pointer("/data/role_id").and_then(Value::as_str).unwrap_or_default().to_owned(),
            // Deleted in between.
            Err(failure) if failure.not_found() || failure.role_missing() => return Ok(None),
            Err(failure) => return Err(failure.error),
        };
        Ok(Some((role, role_id)))
    }

    /// The role, which must be this IntegrationAccount's.
    async fn owned_role(&self, account: &AccountRequest) -> Result<(Value, String), ProviderError> {
        match self.get_role(account).await? {
            None => Err(ProviderError::NotFound(format!("AppRole role {} does not exist", self.role_path(account)))),
            Some((_, role_id)) if !is_owned(&role_id, account) => Err(self.foreign(account)),
            Some(found) => Ok(found),
        }
    }

    /// Whether the role is this IntegrationAccount's (`true`) or gone
    /// (`false`); someone else's is a conflict.
    async fn ours_or_gone(&self, account: &AccountRequest) -> Result<bool, ProviderError> {
        match self.owned_role(account).await {
            Ok(_) => Ok(true),
            Err(ProviderError::NotFound(_)) => Ok(false),
            Err(error) => Err(error),
        }
    }

    fn foreign(&self, account: &AccountRequest) -> ProviderError {
        ProviderError::Conflict(format!(
            "AppRole role {} exists and was not created by keysmith for this IntegrationAccount",
            self.role_path(account)
        ))
    }

    /// The settings keysmith holds every role it manages to.
    fn settings(&self) -> Value {
        json!({
            "bind_secret_id": true,
            "token_no_default_policy": true,
            "token_period": 0,
            "token_max_ttl": self.token_max_ttl,
            "token_ttl": self.token_max_ttl,
            "secret_id_num_uses": 0,
        })
    }

    fn observed(&self, role: &Value, role_id: &str, account: &AccountRequest) -> ObservedAccount {
        let number = |name: &str| role.get(name).and_then(Value::as_u64).unwrap_or(0);
        let flag = |name: &str| role.get(name).and_then(Value::as_bool).unwrap_or(false);
        let drifted = !flag("bind_secret_id")
            || !flag("token_no_default_policy")
            || number("token_period") != 0
            || number("token_max_ttl") != self.token_max_ttl
            || number("token_ttl") == 0
            || number("token_ttl") > self.token_max_ttl
            || number("secret_id_num_uses") != 0;
        ObservedAccount {
            id: self.role_path(account),
            name: account.name.clone(),
            disabled: false,
            owned: is_owned(role_id, account),
            drifted,
        }
    }

    /// The role's policies, and its `role_id` (this IntegrationAccount's).
    async fn policies(&self, account: &AccountRequest) -> Result<(String, BTreeSet<String>), ProviderError> {
        let (role, role_id) = self.owned_role(account).await?;
        Ok((role_id, policies_of(&role)))
    }

    /// Writes the role's policies. AppRole has no compare-and-set: the
    /// `role_id` read just before goes with every write, so a role deleted
    /// in between comes back as this IntegrationAccount's, never as an
    /// untagged role holding its policies.
    async fn set_policies(
        &self,
        account: &AccountRequest,
        role_id: &str,
        policies: &BTreeSet<String>,
    ) -> Result<(), ProviderError> {
        let mut body = self.settings();
        body["role_id"] = json!(role_id);
        body["token_policies"] = json!(policies.iter().collect::<Vec<_>>());
        self.call(Method::POST, &self.role_path(account), Some(&body)).await.map_err(|f| f.error)?;
        Ok(())
    }

    /// The accessors of the role's secret-ids.
    async fn accessors(&self, account: &AccountRequest) -> Result<Vec<String>, ProviderError> {
        // A LIST, as `GET ?list=true` (what OpenBao's own clients send).
        let path = format!("{}/secret-id?list=true", self.role_path(account));
        match self.call(Method::GET, &path, None).await {
            Ok(listed) => Ok(listed
                .pointer("/data/keys")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()),
            Err(failure) if failure.not_found() || failure.role_missing() => Ok(Vec::new()),
            Err(failure) => Err(failure.error),
        }
    }
}

/// Whether OpenBao said no auth method serves the path.
fn no_route(said: &str) -> bool {
    said.contains("no handler for route") || said.contains("unsupported path")
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// The `role_id` prefix that marks a role as this IntegrationAccount's.
fn owner_prefix(account: &AccountRequest) -> String {
    format!("keysmith-{}-", account.owner_uid)
}

fn is_owned(role_id: &str, account: &AccountRequest) -> bool {
    !account.owner_uid.is_empty() && role_id.starts_with(&owner_prefix(account))
}

fn policies_of(role: &Value) -> BTreeSet<String> {
    role.get("token_policies")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect()
}

/// An AppRole role name OpenBao accepts (`\w([\w.-]*\w)?`, ASCII).
fn check_name(account: &AccountRequest) -> Result<(), ProviderError> {
    let name = &account.name;
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.chars().all(is_path_char)
        && edge(name.chars().next())
        && edge(name.chars().last());
    if ok {
        Ok(())
    } else {
        Err(ProviderError::Invalid(format!(
            "{name:?} is not an AppRole role name: use at most {MAX_NAME} letters, digits, '_', '-' and '.', \
             starting and ending with a letter, digit or '_' (set providerOptions.name)"
        )))
    }
}

/// A role: an ACL policy name, lowercase, without a scope; never `root`.
fn check_role(grant: &RoleGrant) -> Result<(), ProviderError> {
    if let Some(scope) = &grant.scope {
        return Err(ProviderError::Invalid(format!(
            "OpenBao policies have no scope; remove scope {scope:?} from role {}",
            grant.role
        )));
    }
    let role = &grant.role;
    if role == "root" {
        return Err(ProviderError::Invalid(
            "the root policy cannot be granted: OpenBao issues no root token to an auth method".to_owned(),
        ));
    }
    let ok = !role.is_empty()
        && role.len() <= MAX_NAME
        && role.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ProviderError::Invalid(format!(
            "{role:?} is not an OpenBao policy name: use lowercase letters, digits, '_', '-' and '.' \
             (OpenBao lowercases policy names)"
        )))
    }
}

/// A secret-id accessor: a UUID as OpenBao makes them.
fn check_accessor(accessor: &str) -> Result<(), ProviderError> {
    if accessor.is_empty() || accessor.len() > 64 || !accessor.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(ProviderError::Invalid(format!("{accessor:?} is not a secret-id accessor")));
    }
    Ok(())
}

#[async_trait]
impl Provider for OpenBaoProvider {
    fn name(&self) -> &'static str {
        "openBao"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { last_use_lag: None, max_keys_per_account: None, key_expiry: true, disable: false }
    }

    /// The token looks itself up: refused means the credential is wrong.
    async fn verify_connection(&self) -> Result<(), ProviderError> {
        match self.call(Method::GET, "auth/token/lookup-self", None).await {
            Ok(_) => Ok(()),
            Err(failure) if failure.status == Some(StatusCode::FORBIDDEN) => Err(ProviderError::Unauthorized(format!(
                "the connection's OpenBao token was refused (expired, revoked, or without the default policy's \
                 auth/token/lookup-self): {}",
                failure.error
            ))),
            Err(failure) => Err(failure.error),
        }
    }

    async fn observe_account(&self, account: &AccountRequest) -> Result<Option<ObservedAccount>, ProviderError> {
        Ok(self.get_role(account).await?.map(|(role, role_id)| self.observed(&role, &role_id, account)))
    }

    async fn create_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        if let Some((role, role_id)) = self.get_role(account).await? {
            return if is_owned(&role_id, account) {
                Ok(self.observed(&role, &role_id, account))
            } else {
                Err(self.foreign(account))
            };
        }
        let role_id = format!("{}{:016x}", owner_prefix(account), rand::random::<u64>());
        let mut body = self.settings();
        body["role_id"] = json!(role_id);
        body["token_policies"] = json!([]);
        self.call(Method::POST, &self.role_path(account), Some(&body)).await.map_err(|f| f.error)?;
        match self.get_role(account).await? {
            Some((role, found)) if is_owned(&found, account) => Ok(self.observed(&role, &found, account)),
            Some(_) => Err(self.foreign(account)),
            None => Err(ProviderError::transient(format!(
                "AppRole role {} was written but cannot be read back",
                self.role_path(account)
            ))),
        }
    }

    async fn update_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        let (role, role_id) = self.owned_role(account).await?;
        if !self.observed(&role, &role_id, account).drifted {
            return Ok(self.observed(&role, &role_id, account));
        }
        // With the role_id read: see set_policies.
        let mut body = self.settings();
        body["role_id"] = json!(role_id);
        self.call(Method::POST, &self.role_path(account), Some(&body)).await.map_err(|f| f.error)?;
        let (role, role_id) = self.owned_role(account).await?;
        Ok(self.observed(&role, &role_id, account))
    }

    async fn disable_account(&self, _account: &AccountRequest) -> Result<(), ProviderError> {
        Err(ProviderError::Invalid(
            "an AppRole role cannot be disabled: deletionPolicy Disable revokes its secret-ids and keeps it".to_owned(),
        ))
    }

    async fn delete_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        match self.owned_role(account).await {
            Ok(_) => {}
            Err(ProviderError::NotFound(_)) => return Ok(()),
            Err(ProviderError::Conflict(message)) => {
                tracing::warn!(%message, "not deleting an AppRole role keysmith does not own");
                return Ok(());
            }
            Err(error) => return Err(error),
        }
        // Deleting the role destroys its secret-ids with it.
        match self.call(Method::DELETE, &self.role_path(account), None).await {
            Ok(_) => Ok(()),
            Err(failure) if failure.not_found() => Ok(()),
            Err(failure) => Err(failure.error),
        }
    }

    async fn list_roles(&self, account: &AccountRequest) -> Result<Vec<RoleGrant>, ProviderError> {
        Ok(self.policies(account).await?.1.into_iter().map(|role| RoleGrant { role, scope: None }).collect())
    }

    async fn grant_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        check_role(grant)?;
        let (role_id, mut policies) = self.policies(account).await?;
        if policies.insert(grant.role.clone()) {
            self.set_policies(account, &role_id, &policies).await?;
        }
        Ok(())
    }

    async fn revoke_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        if !self.ours_or_gone(account).await? {
            return Ok(());
        }
        let (role_id, mut policies) = self.policies(account).await?;
        if policies.remove(&grant.role) {
            self.set_policies(account, &role_id, &policies).await?;
        }
        Ok(())
    }

    async fn issue_key(&self, account: &AccountRequest, request: &KeyRequest) -> Result<IssuedKey, ProviderError> {
        let (_, role_id) = self.owned_role(account).await?;
        let metadata = json!({
            KEY_ID_METADATA: request.key_id,
            ACCOUNT_METADATA: format!("{}/{}", account.namespace, account.account_name),
        });
        let mut body = json!({ "metadata": metadata.to_string() });
        let ttl = request.lifetime.map(|l| l.as_secs().max(1));
        if let Some(ttl) = ttl {
            body["ttl"] = json!(ttl);
        }
        let path = format!("{}/secret-id", self.role_path(account));
        let created = self.call(Method::POST, &path, Some(&body)).await.map_err(|f| f.error)?;
        let data = created.get("data").cloned().unwrap_or(Value::Null);
        let accessor = data.get("secret_id_accessor").and_then(Value::as_str).unwrap_or_default().to_owned();
        // Never quoted: it is the key.
        let secret_id = data.get("secret_id").and_then(Value::as_str).unwrap_or_default().to_owned();
        if accessor.is_empty() || secret_id.is_empty() {
            return Err(ProviderError::transient(format!(
                "OpenBao answered a secret-id request for {} without a secret-id or accessor; \
                 whatever it made is left for keysmith to revoke",
                self.role_path(account)
            )));
        }
        // OpenBao says the TTL it applied (a role's secret_id_ttl caps it).
        let applied = data.get("secret_id_ttl").and_then(Value::as_u64).filter(|t| *t > 0).or(ttl);
        let expires_at =
            applied.and_then(|secs| Timestamp::now().checked_add(jiff::SignedDuration::from_secs(secs as i64)).ok());
        Ok(IssuedKey {
            id: accessor,
            expires_at,
            material: KeyMaterial::new(
                [(ROLE_ID_KEY.to_owned(), role_id), (SECRET_ID_KEY.to_owned(), secret_id)].into_iter().collect(),
            ),
        })
    }

    async fn list_keys(&self, account: &AccountRequest) -> Result<Vec<ObservedKey>, ProviderError> {
        check_name(account)?;
        let lookup = format!("{}/secret-id-accessor/lookup", self.role_path(account));
        let mut keys = Vec::new();
        for accessor in self.accessors(account).await? {
            let body = json!({ "secret_id_accessor": accessor });
            let created_at = match self.call(Method::POST, &lookup, Some(&body)).await {
                Ok(found) => found.pointer("/data/creation_time").and_then(Value::as_str).and_then(|t| t.parse().ok()),
                // Destroyed or expired in between.
                Err(failure) if failure.not_found() || failure.role_missing() => continue,
                Err(failure) if failure.said.contains("failed to find accessor entry") => continue,
                Err(failure) => return Err(failure.error),
            };
            keys.push(ObservedKey { last_used: None, id: accessor, created_at });
        }
        keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(keys)
    }

    async fn revoke_key(&self, account: &AccountRequest, key_id: &str) -> Result<(), ProviderError> {
        check_accessor(key_id)?;
        if !self.ours_or_gone(account).await? {
            return Ok(());
        }
        let path = format!("{}/secret-id-accessor/destroy", self.role_path(account));
        match self.call(Method::POST, &path, Some(&json!({ "secret_id_accessor": key_id }))).await {
            Ok(_) => Ok(()),
            Err(failure) if failure.not_found() || failure.role_missing() => Ok(()),
            // OpenBao answers an unknown accessor with a 500: gone if the
            // list agrees.
            Err(failure) => {
                if self.accessors(account).await?.iter().any(|a| a == key_id) {
                    Err(failure.error)
                } else {
                    Ok(())
                }
            }
        }
    }

    async fn verify_key(&self, account: &AccountRequest, key: &IssuedKey) -> Result<(), ProviderError> {
        let values = key.material.expose();
        let (Some(role_id), Some(secret_id)) = (values.get(ROLE_ID_KEY), values.get(SECRET_ID_KEY)) else {
            return Err(ProviderError::Invalid(format!("the key has no {ROLE_ID_KEY} or {SECRET_ID_KEY}")));
        };
        if !is_owned(role_id, account) {
            return Err(ProviderError::Conflict(format!(
                "the key's role_id is not this IntegrationAccount's role {}",
                self.role_path(account)
            )));
        }
        let login = format!("auth/{}/login", self.mount);
        let body = json!({ "role_id": role_id, "secret_id": secret_id });
        let what = format!("the new secret-id {}", key.id);
        super::until_accepted(&what, self.verify_window, || async {
            match self.call_with(None, Method::POST, &login, Some(&body), &[secret_id]).await {
                Ok(answer) => {
                    let token = answer.pointer("/auth/client_token").and_then(Value::as_str).unwrap_or_default();
                    let accessor = answer.pointer("/auth/accessor").and_then(Value::as_str).unwrap_or_default();
                    if token.is_empty() {
                        return Ok(Check::Refused("the login answered without a token".to_owned()));
                    }
                    // Verification leaves no token behind. The login's token
                    // holds only the declared policies (no `default`, so no
                    // revoke-self): the admin revokes it.
                    let revoke = json!({ "accessor": accessor });
                    if let Err(failure) = self
                        .call_with(
                            Some(&self.token),
                            Method::POST,
                            "auth/token/revoke-accessor",
                            Some(&revoke),
                            &[secret_id, token],
                        )
                        .await
                    {
                        tracing::warn!(
                            error = %failure.error,
                            "could not revoke the token of a verification login (allow auth/token/revoke-accessor); \
                             it expires within token_max_ttl"
                        );
                    }
                    Ok(Check::Accepted)
                }
                Err(Failure { error: ProviderError::Transient { message, .. }, .. }) => Ok(Check::Refused(message)),
                Err(failure) if failure.status == Some(StatusCode::BAD_REQUEST) => {
                    Ok(Check::Refused(failure.error.to_string()))
                }
                Err(failure) => Err(failure.error),
            }
        })
        .await
    }
}

/// The connect step: the admin token from its Secret, then the client.
pub async fn connect(
    spec: &crate::api::OpenBaoSpec,
    connect: &super::Connect<'_>,
) -> Result<std::sync::Arc<dyn Provider>, ProviderError> {
    let (token, version) = connect.secret_value(&spec.token_secret_ref, TOKEN_KEY).await?;
    let key = format!("openBao/{}/{version}", connect.connection.uid);
    let max_ttl = Duration::from_secs(u64::try_from(spec.token_max_ttl_seconds).unwrap_or(3600));
    connect
        .cached(key, || async {
            Ok(std::sync::Arc::new(OpenBaoProvider::new(
                &spec.address,
                &spec.mount,
                token.trim().to_owned(),
                max_ttl,
                connect.http_client()?,
            )?) as std::sync::Arc<dyn Provider>)
        })
        .await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn account(name: &str) -> AccountRequest {
        AccountRequest {
            name: name.to_owned(),
            namespace: "payments".to_owned(),
            account_name: "billing-sync".to_owned(),
            owner_uid: "uid-1".to_owned(),
            description: None,
            owner: None,
            options: BTreeMap::new(),
        }
    }

    fn grant(role: &str) -> RoleGrant {
        RoleGrant { role: role.to_owned(), scope: None }
    }

    #[test]
    fn role_names_follow_openbaos_rules() {
        for good in ["billing-sync", "payments.billing-sync", "a", "_x", "A1_b.c-d"] {
            check_name(&account(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in ["", "-x", "x-", "x.", "a b", "a/b", "ä", &"a".repeat(MAX_NAME + 1)] {
            let err = check_name(&account(bad)).expect_err(bad);
            assert!(matches!(err, ProviderError::Invalid(ref m) if m.contains("providerOptions.name")), "{bad}: {err}");
        }
    }

    #[test]
    fn policies_are_lowercase_names_and_never_root() {
        for good in ["payments-read", "kv.read", "default", "p_1"] {
            check_role(&grant(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in ["root", "Payments", "a b", "", "a/b", "a,b"] {
            assert!(matches!(check_role(&grant(bad)), Err(ProviderError::Invalid(_))), "{bad}");
        }
        let scoped = RoleGrant { role: "kv-read".to_owned(), scope: Some("ns".to_owned()) };
        assert!(check_role(&scoped).is_err());
    }

    #[test]
    fn ownership_is_the_role_id_prefix_of_this_integration_account() {
        let ours = account("x");
        assert!(is_owned("keysmith-uid-1-00ff", &ours));
        assert!(!is_owned("keysmith-uid-10-00ff", &ours), "another uid sharing a prefix");
        assert!(!is_owned("5f1e3c2a-uuid", &ours));
        let nobody = AccountRequest { owner_uid: String::new(), ..ours };
        assert!(!is_owned("keysmith--", &nobody), "an empty uid owns nothing");
    }

    #[test]
    fn accessors_are_checked_before_they_reach_a_path() {
        check_accessor("de0e76b2-9651-2b02-f0ae-038ba3cc5685").unwrap();
        for bad in ["", "../x", "a/b", "a b", &"a".repeat(65)] {
            assert!(check_accessor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_token_never_shows_in_debug_and_bad_tokens_or_mounts_are_refused() {
        let http = reqwest::Client::new();
        let p = OpenBaoProvider::new(
            "http://127.0.0.1:1",
            "approle",
            "s.secret-token".into(),
            Duration::from_secs(60),
            http.clone(),
        )
        .unwrap();
        assert!(!format!("{p:?}").contains("s.secret-token"));
        assert!(OpenBaoProvider::new("http://x", "approle", " ".into(), Duration::from_secs(60), http.clone()).is_err());
        assert!(
            OpenBaoProvider::new("http://x", "approle", "a\nb".into(), Duration::from_secs(60), http.clone()).is_err()
        );
        for mount in ["", "a//b", "../x", "a b"] {
            assert!(
                OpenBaoProvider::new("http://x", mount, "t".into(), Duration::from_secs(60), http.clone()).is_err(),
                "{mount}"
            );
        }
    }
}
