//! The `oauth2` provider: the target app is an OAuth 2.0 authorization server
//! that registers clients dynamically (RFC 7591) and lets them be managed
//! afterwards (RFC 7592).
//!
//! - **account** → a registered client: `client_name` is the account's
//!   name, `grant_types` `["client_credentials"]` (see roles), no
//!   `response_types` or `redirect_uris`, `token_endpoint_auth_method`
//!   `client_secret_basic` (or `client_secret_post` with the provider option
//!   [`AUTH_METHOD_OPTION`]), and RFC 7591's `software_id` = `keysmith` and
//!   `software_version`, which servers that keep them show their admins.
//!   Registration sends the connection's initial access token as a bearer
//!   token. RFC 7591 offers no way to look a client up by name or by any tag,
//!   so **ownership is the [`RegistrationStore`]**: a client is keysmith's for
//!   an IntegrationAccount when the store holds its registration under that
//!   IntegrationAccount's uid, and keysmith never touches any other client.
//!   Observing reads the client configuration endpoint (RFC 7592 §2.1) with
//!   the registration access token; `404`, or `401` `invalid_token` (the
//!   server forgets a deleted client's token), means the client is gone.
//!   There is nothing in RFC 7591/7592 to disable a client, so
//!   [`Capabilities::disable`] is false: with `deletionPolicy: Disable`
//!   keysmith revokes the keys, which leaves the client with a secret nobody
//!   holds.
//! - **registration access token** (RAT): the credential that manages one
//!   client. keysmith keeps it with the client id, the client configuration
//!   endpoint and the current key in a [`RegistrationStore`] (in keysmith, a
//!   Secret it owns; see [`Registration::to_secret_data`] for its keys), never
//!   in status, events, logs or errors. Servers may rotate it on every update
//!   (RFC 7592 §2.2; oidc-provider does by default), so every answer that
//!   carries a new one is written to the store at once: a new token the store
//!   failed to keep (after three tries) leaves the client unmanageable, which
//!   the error says, naming the client for the server's admin to remove.
//!   An update whose answer never arrives (a connection reset or a timeout
//!   after the server acted) may have rotated the token with nobody to
//!   receive the new one. So before each update keysmith records that one
//!   is in flight ([`STORE_UPDATE_SENT_AT`]), and clears the mark once an
//!   answer says what became of it: a success (which carries any new
//!   token), or a client error other than 408 (the server did not act). A
//!   5xx or 408 may come after the server acted, so the mark stays; a read
//!   that the old token still passes clears it, but only once twice the
//!   request timeout has passed since the update was sent (the update may
//!   still be running at the server, or a replica may lag). A token refused while the mark is set is
//!   not taken as a deleted client: keysmith has **lost control** of a
//!   client that may live on with its scopes and secret, and says so as a
//!   [`ProviderError::Conflict`] naming the client for the server's admin
//!   to delete and the registration record to delete afterwards, and waits
//!   (deletion of the IntegrationAccount waits too). RFC 7592 offers no way
//!   back: only the server's administrator can remove the client. Not
//!   covered: a lost answer to a registration (the client is unknown to
//!   keysmith), and servers that replace the token on reads too.
//! - **roles** → the client's `scope` metadata (space-separated scope
//!   tokens); roles have no scope of their own (`RoleGrant::scope` must be
//!   `None`). Granting and revoking read the configuration and `PUT` it back
//!   with the scope changed (RFC 7592 §2.2 replaces the whole metadata, so the
//!   body is everything the server returned, `client_id` included, minus the
//!   four fields RFC 7592 forbids in a request). RFC 7591 §2 lets a server
//!   give a client registered *without* `scope` a default set, and some give
//!   it every scope they know (oidc-provider does). So a client holding no
//!   role is registered with **no grant type at all** (`grant_types: []`), and
//!   gets `client_credentials` back with its first scope: an account without
//!   roles can authenticate but obtain no token.
//! - **key** → the client secret. A client has exactly one, so
//!   [`Capabilities::max_keys_per_account`] is 1 and **there is no grace
//!   period**: issuing a key replaces the secret and the previous one stops
//!   working at once (the next token request with it fails `invalid_client`);
//!   workloads must re-read the Secret (use `restartTargets`). A server that
//!   let a client hold several secrets at once (vendor APIs do, with their
//!   own calls outside RFC 7591/7592) would allow two keys, so that the old
//!   secret keeps working through the grace period while workloads pick up
//!   the new one, and revoking would remove one secret without touching the
//!   other.
//!
//!   RFC 7592 lets a server issue a new `client_secret` in its answer to an
//!   update, and gives the client no standard way to ask for one. keysmith
//!   follows the convention of RFC 7592 §2.2, which lets an update carry the
//!   current `client_secret` (and the server must refuse one that does not
//!   match): an update that **includes** the current secret asks to keep it
//!   (role changes, drift repair), one that **leaves it out** asks for a new
//!   one (issuing and revoking keys). The server must be set up to honour
//!   this; with oidc-provider that is a registration policy on the initial
//!   access token (see `tests/oidc/server.js`). keysmith checks the answer
//!   either way: a rotation that returns the same secret is an
//!   [`ProviderError::Invalid`] "the server does not rotate client secrets",
//!   and an update that was to keep the secret but changed it clears the
//!   current key, so the controller issues a new one.
//!
//!   RFC 7592 §2.1 returns the `client_secret` with the configuration, which
//!   is how keysmith knows the secret it is keeping or replacing without
//!   storing it. The key id (keysmith's [`KeyRequest::key_id`]) and when it
//!   was issued are kept in the store: [`Provider::list_keys`] reads them
//!   from there, without calling the server. Revoking the current key rotates the secret once more and throws
//!   the new one away; revoking a key that is no longer current changes
//!   nothing, as it stopped working when it was replaced.
//! - **verifying a key**: a `client_credentials` token request at the token
//!   endpoint with the new client id and secret, asking for the client's
//!   scopes; where the connection names an introspection endpoint (RFC 7662),
//!   the token is introspected with the client's own credentials and must be
//!   `active`. A refused secret is `401`/`invalid_client` (RFC 6749 §5.2).
//!   A client without roles has no grant type, so its token request fails
//!   with a `400` after the server authenticated it (RFC 6749 says
//!   `unauthorized_client`, oidc-provider says `invalid_request`); the secret
//!   is then proven at the introspection endpoint, which must accept the
//!   client's credentials, and without one that `400` is taken as proof,
//!   which holds for servers that authenticate the client first, as
//!   oidc-provider does.
//! - **verifying the connection**: RFC 7591 has no call that checks an
//!   initial access token without registering a client. keysmith sends the
//!   registration endpoint a request whose metadata no server can accept
//!   (`grant_types` is a string, not an array, and so is `redirect_uris`):
//!   a `400` error means the token was accepted and the metadata refused,
//!   `401`/`403` that the token was refused. A server that registers the
//!   client all the same gets it deleted again at once. It then checks that
//!   the token endpoint (and the introspection endpoint) answer as such
//!   endpoints do to a request without client credentials: a `400`/`401`
//!   OAuth error, not a `404`. A server that validates the metadata before
//!   the token would pass this check with a bad token; the first
//!   registration would then fail `Unauthorized`.
//!
//! The output Secret holds `client_id`, `client_secret`, `token_url` (the
//! connection's token endpoint) and `scope` (the client's scopes when the key
//! was issued, space-separated, empty for none: a role granted later shows
//! there from the next rotation, though the server lets the client ask for
//! it at once).
//!
//! Errors: RFC 7591/6749 error responses are classified by status and
//! `error` code: `401`/`403` and `invalid_token`, `invalid_client`,
//! `access_denied` → `Unauthorized`; `404` → `NotFound`; `409` → `Conflict`;
//! `invalid_client_metadata`, `invalid_redirect_uri`, `invalid_scope` and
//! other 4xx → `Invalid`; `429`, `408`, 5xx, `temporarily_unavailable`,
//! connection failures and timeouts → `Transient`, with the delay of a
//! `Retry-After` header (seconds or an HTTP date). No token or secret ever
//! appears in an error or a log line: the server's `error_description` is
//! quoted with any credential the request carried cut out.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use async_trait::async_trait;
use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use jiff::Timestamp;
use reqwest::{
    header::{self, HeaderValue},
    RequestBuilder, StatusCode, Url,
};
use serde_json::{json, Map, Value};

pub mod store;

use super::{
    http::{classify_status, retry_after, transport_error},
    AccountRequest, Capabilities, IssuedKey, KeyMaterial, KeyRequest, ObservedAccount, ObservedKey, Provider,
    ProviderError, RoleGrant,
};

/// The `software_id` keysmith registers its clients with (RFC 7591 §2).
pub const SOFTWARE_ID: &str = "keysmith";
/// The grant type keysmith's clients use.
pub const CLIENT_CREDENTIALS: &str = "client_credentials";
/// The provider option (`spec.providerOptions`) choosing how the client
/// authenticates at the token endpoint: `client_secret_basic` (the default)
/// or `client_secret_post`.
pub const AUTH_METHOD_OPTION: &str = "tokenEndpointAuthMethod";
/// `token_endpoint_auth_method` with HTTP Basic authentication (RFC 6749 §2.3.1).
pub const CLIENT_SECRET_BASIC: &str = "client_secret_basic";
/// `token_endpoint_auth_method` with the credentials in the form body.
pub const CLIENT_SECRET_POST: &str = "client_secret_post";

/// Output Secret key: the client id.
pub const CLIENT_ID_KEY: &str = "client_id";
/// Output Secret key: the client secret.
pub const CLIENT_SECRET_KEY: &str = "client_secret";
/// Output Secret key: the token endpoint.
pub const TOKEN_URL_KEY: &str = "token_url";
/// Output Secret key: the client's scopes when the key was issued.
pub const SCOPE_KEY: &str = "scope";

/// Registration Secret key: the client id.
pub const STORE_CLIENT_ID: &str = "client_id";
/// Registration Secret key: the client configuration endpoint (RFC 7592).
pub const STORE_REGISTRATION_CLIENT_URI: &str = "registration_client_uri";
/// Registration Secret key: the registration access token (a credential).
pub const STORE_REGISTRATION_ACCESS_TOKEN: &str = "registration_access_token";
/// Registration Secret key: keysmith's id of the current client secret.
pub const STORE_KEY_ID: &str = "key_id";
/// Registration Secret key: when the current client secret was issued (RFC 3339).
pub const STORE_KEY_ISSUED_AT: &str = "key_issued_at";
/// Registration Secret key: when keysmith sent an update whose answer it has
/// not seen yet (RFC 3339); absent otherwise.
pub const STORE_UPDATE_SENT_AT: &str = "update_sent_at";

/// How long one request may take, unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Client metadata RFC 7592 §2.2 forbids in an update request.
const READ_ONLY_FIELDS: [&str; 4] =
    ["registration_access_token", "registration_client_uri", "client_secret_expires_at", "client_id_issued_at"];
/// The longest server error description quoted in an error message.
const MAX_DETAIL_LEN: usize = 300;
/// How often a changed registration is written to the store before giving up.
const STORE_ATTEMPTS: u32 = 3;

/// One client's registration, as keysmith keeps it: a credential, so it lives
/// in a Secret, never in status. Its `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct Registration {
    /// The client id the server issued.
    pub client_id: String,
    /// The client configuration endpoint (RFC 7592 §1, `registration_client_uri`).
    pub registration_client_uri: String,
    /// The registration access token that manages the client.
    pub registration_access_token: String,
    /// The key that set the client's current secret, if keysmith issued one.
    pub current_key: Option<StoredKey>,
    /// When keysmith sent an update whose answer it has not seen: the server
    /// may have replaced the registration access token with nobody to
    /// receive the new one.
    pub update_sent_at: Option<Timestamp>,
}

/// The key behind a client's current secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// keysmith's key id ([`KeyRequest::key_id`]).
    pub id: String,
    /// When the secret was issued.
    pub issued_at: Timestamp,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("client_id", &self.client_id)
            .field("registration_client_uri", &self.registration_client_uri)
            .field("registration_access_token", &"<redacted>")
            .field("current_key", &self.current_key)
            .field("update_sent_at", &self.update_sent_at)
            .finish()
    }
}

impl Registration {
    /// The registration as Secret data: [`STORE_CLIENT_ID`],
    /// [`STORE_REGISTRATION_CLIENT_URI`], [`STORE_REGISTRATION_ACCESS_TOKEN`],
    /// when keysmith issued the current secret, [`STORE_KEY_ID`] and
    /// [`STORE_KEY_ISSUED_AT`], and while an update is in flight,
    /// [`STORE_UPDATE_SENT_AT`].
    pub fn to_secret_data(&self) -> BTreeMap<String, String> {
        let mut data = BTreeMap::from([
            (STORE_CLIENT_ID.to_owned(), self.client_id.clone()),
            (STORE_REGISTRATION_CLIENT_URI.to_owned(), self.registration_client_uri.clone()),
            (STORE_REGISTRATION_ACCESS_TOKEN.to_owned(), self.registration_access_token.clone()),
        ]);
        if let Some(key) = &self.current_key {
            data.insert(STORE_KEY_ID.to_owned(), key.id.clone());
            data.insert(STORE_KEY_ISSUED_AT.to_owned(), key.issued_at.to_string());
        }
        if let Some(at) = &self.update_sent_at {
            data.insert(STORE_UPDATE_SENT_AT.to_owned(), at.to_string());
        }
        data
    }

    /// Reads a registration back from Secret data written by
    /// [`Registration::to_secret_data`]. Errors name the missing or garbled
    /// key, never a value.
    pub fn from_secret_data(data: &BTreeMap<String, String>) -> Result<Self, ProviderError> {
        let required = |key: &str| {
            data.get(key)
                .filter(|v| !v.is_empty())
                .cloned()
                .ok_or_else(|| ProviderError::Invalid(format!("the OAuth2 registration Secret has no {key}")))
        };
        let current_key = match data.get(STORE_KEY_ID).filter(|v| !v.is_empty()) {
            None => None,
            Some(id) => {
                let issued_at = required(STORE_KEY_ISSUED_AT)?.parse::<Timestamp>().map_err(|_| {
                    ProviderError::Invalid(format!(
                        "the OAuth2 registration Secret's {STORE_KEY_ISSUED_AT} is not an RFC 3339 time"
                    ))
                })?;
                Some(StoredKey { id: id.clone(), issued_at })
            }
        };
        let update_sent_at = match data.get(STORE_UPDATE_SENT_AT).filter(|v| !v.is_empty()) {
            None => None,
            Some(at) => Some(at.parse::<Timestamp>().map_err(|_| {
                ProviderError::Invalid(format!(
                    "the OAuth2 registration Secret's {STORE_UPDATE_SENT_AT} is not an RFC 3339 time"
                ))
            })?),
        };
        Ok(Self {
            client_id: required(STORE_CLIENT_ID)?,
            registration_client_uri: required(STORE_REGISTRATION_CLIENT_URI)?,
            registration_access_token: required(STORE_REGISTRATION_ACCESS_TOKEN)?,
            current_key,
            update_sent_at,
        })
    }
}

/// Where keysmith keeps each client's [`Registration`], keyed by the owning
/// IntegrationAccount's uid ([`AccountRequest::owner_uid`]); the whole
/// request is passed so an implementation can also place the record (in
/// keysmith: a Secret in the account's namespace, owned by the
/// IntegrationAccount, holding [`Registration::to_secret_data`]). Being in
/// the store is what makes a client keysmith's.
#[async_trait]
pub trait RegistrationStore: Send + Sync {
    /// The registration kept for the account, if any.
    async fn get(&self, account: &AccountRequest) -> Result<Option<Registration>, ProviderError>;
    /// Keeps `registration` for the account, replacing what was there.
    async fn put(&self, account: &AccountRequest, registration: &Registration) -> Result<(), ProviderError>;
    /// Forgets the account's registration. Succeeds if there is none.
    async fn delete(&self, account: &AccountRequest) -> Result<(), ProviderError>;
    /// Where the account's registration is kept, for people: what to delete
    /// to let keysmith register a new client.
    fn describe(&self, _account: &AccountRequest) -> String {
        "keysmith's registration record of the client".to_owned()
    }
}

/// A [`RegistrationStore`] in memory, for tests and tools: what it holds is
/// lost with the process.
#[derive(Default)]
pub struct InMemoryRegistrationStore {
    registrations: Mutex<BTreeMap<String, Registration>>,
}

impl InMemoryRegistrationStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Registration>> {
        self.registrations.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for InMemoryRegistrationStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let guard = self.lock();
        f.debug_struct("InMemoryRegistrationStore").field("owner_uids", &guard.keys().collect::<Vec<_>>()).finish()
    }
}

#[async_trait]
impl RegistrationStore for InMemoryRegistrationStore {
    async fn get(&self, account: &AccountRequest) -> Result<Option<Registration>, ProviderError> {
        Ok(self.lock().get(&account.owner_uid).cloned())
    }

    async fn put(&self, account: &AccountRequest, registration: &Registration) -> Result<(), ProviderError> {
        self.lock().insert(account.owner_uid.clone(), registration.clone());
        Ok(())
    }

    async fn delete(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        self.lock().remove(&account.owner_uid);
        Ok(())
    }
}

/// How a client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthMethod {
    Basic,
    Post,
}

impl AuthMethod {
    fn of(account: &AccountRequest) -> Result<Self, ProviderError> {
        match account.options.get(AUTH_METHOD_OPTION).map(String::as_str) {
            None | Some("") | Some(CLIENT_SECRET_BASIC) => Ok(Self::Basic),
            Some(CLIENT_SECRET_POST) => Ok(Self::Post),
            Some(other) => Err(ProviderError::Invalid(format!(
                "providerOptions.{AUTH_METHOD_OPTION} is {other:?}; keysmith supports \
                 {CLIENT_SECRET_BASIC} and {CLIENT_SECRET_POST}"
            ))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Basic => CLIENT_SECRET_BASIC,
            Self::Post => CLIENT_SECRET_POST,
        }
    }
}

/// An OAuth 2.0 authorization server with dynamic client registration as the
/// target app.
pub struct OAuth2Provider {
    registration_endpoint: String,
    token_endpoint: String,
    introspection_endpoint: Option<String>,
    initial_access_token: Option<String>,
    http: reqwest::Client,
    store: Arc<dyn RegistrationStore>,
    timeout: Duration,
}

impl fmt::Debug for OAuth2Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2Provider")
            .field("registration_endpoint", &self.registration_endpoint)
            .field("token_endpoint", &self.token_endpoint)
            .field("introspection_endpoint", &self.introspection_endpoint)
            .field("has_initial_access_token", &self.initial_access_token.is_some())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What went wrong with one HTTP exchange, before classification.
#[derive(Debug)]
enum Failure {
    /// The server answered with an error status.
    Status { status: StatusCode, error: Option<String>, message: String, retry_after: Option<Duration> },
    /// Anything else, already classified.
    Other(ProviderError),
}

impl Failure {
    fn status(&self) -> Option<StatusCode> {
        match self {
            Failure::Status { status, .. } => Some(*status),
            Failure::Other(_) => None,
        }
    }

    fn error_code(&self) -> Option<&str> {
        match self {
            Failure::Status { error, .. } => error.as_deref(),
            Failure::Other(_) => None,
        }
    }

    /// Whether a call to a client configuration endpoint says the client (or
    /// its registration access token, which servers forget with the client)
    /// is gone.
    fn client_gone(&self) -> bool {
        matches!(self.status(), Some(StatusCode::NOT_FOUND | StatusCode::UNAUTHORIZED))
            || self.error_code() == Some("invalid_token")
    }
}

impl From<Failure> for ProviderError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Status { status, error, message, retry_after } => {
                classify(status, error.as_deref(), message, retry_after)
            }
            Failure::Other(error) => error,
        }
    }
}

/// Classifies an error answer by what the caller should do.
fn classify(status: StatusCode, error: Option<&str>, message: String, retry_after: Option<Duration>) -> ProviderError {
    let code = status.as_u16();
    if code == 429 || code == 408 || status.is_server_error() || matches!(error, Some("temporarily_unavailable")) {
        return ProviderError::Transient { message, retry_after };
    }
    if matches!(code, 401 | 403) || matches!(error, Some("invalid_token" | "invalid_client" | "access_denied")) {
        return ProviderError::Unauthorized(message);
    }
    classify_status(status, message, retry_after)
}

impl OAuth2Provider {
    /// A provider registering clients at `registration_endpoint` (with
    /// `initial_access_token` as a bearer token, where the server requires
    /// one), verifying their secrets at `token_endpoint` and, if given,
    /// `introspection_endpoint`, and keeping each client's registration in
    /// `store`.
    pub fn new(
        registration_endpoint: String,
        token_endpoint: String,
        introspection_endpoint: Option<String>,
        initial_access_token: Option<String>,
        http: reqwest::Client,
        store: Arc<dyn RegistrationStore>,
    ) -> Self {
        Self {
            registration_endpoint,
            token_endpoint,
            introspection_endpoint: introspection_endpoint.filter(|e| !e.is_empty()),
            initial_access_token: initial_access_token.filter(|t| !t.is_empty()),
            http,
            store,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Sets how long one request may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The token endpoint, as written into output Secrets (`token_url`).
    pub fn token_endpoint(&self) -> &str {
        &self.token_endpoint
    }

    /// Sends a request and reads its JSON answer (`Null` for an empty body).
    /// `secrets` are cut out of anything quoted from the server.
    async fn exchange(&self, what: &str, request: RequestBuilder, secrets: &[&str]) -> Result<Value, Failure> {
        let response = request
            .timeout(self.timeout)
            .header(header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| Failure::Other(transport_error(what, e)))?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let text = response.text().await.map_err(|e| Failure::Other(transport_error(what, e)))?;
        if status.is_success() {
            if text.trim().is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_str(&text).map_err(|_| {
                Failure::Other(ProviderError::Invalid(format!(
                    "{what}: the server answered HTTP {status} with a body that is not JSON"
                )))
            });
        }
        let body: Option<Map<String, Value>> = serde_json::from_str(&text).ok();
        let field = |name: &str| body.as_ref().and_then(|b| b.get(name)).and_then(Value::as_str).map(str::to_owned);
        let error = field("error");
        let mut message = format!("{what}: HTTP {status}");
        if let Some(error) = &error {
            message.push_str(&format!(": {}", scrub(error, secrets)));
        }
        if let Some(description) = field("error_description").filter(|d| !d.is_empty()) {
            message.push_str(&format!(" ({})", scrub(&description, secrets)));
        }
        Err(Failure::Status { status, error, message, retry_after })
    }

    /// Reads the client's configuration (RFC 7592 §2.1); `None` when the
    /// client is gone. A registration the server changed in its answer is
    /// written back to the store.
    async fn read_client(
        &self,
        account: &AccountRequest,
        registration: &mut Registration,
    ) -> Result<Option<Map<String, Value>>, ProviderError> {
        let what = format!("reading OAuth2 client {}", registration.client_id);
        let request = self
            .http
            .get(&registration.registration_client_uri)
            .header(header::AUTHORIZATION, bearer(&registration.registration_access_token, "registration access")?);
        let config = match self.exchange(&what, request, &[&registration.registration_access_token]).await {
            Ok(Value::Object(config)) => config,
            Ok(_) => return Err(ProviderError::Invalid(format!("{what}: the answer is not a JSON object"))),
            Err(failure) if failure.client_gone() => {
                self.check_control(account, registration, &failure)?;
                return Ok(None);
            }
            Err(failure) => return Err(failure.into()),
        };
        check_client_id(&what, registration, &config)?;
        // The token still works long after an update was sent: that update
        // never reached the server. (Sooner, it may still be running there,
        // or a replica may lag: the mark stays.)
        let quiet = Timestamp::now() - jiff::SignedDuration::try_from(self.timeout * 2).unwrap_or_default();
        let settled = registration.update_sent_at.is_some_and(|at| at < quiet);
        if settled {
            registration.update_sent_at = None;
        }
        if absorb(registration, &config) {
            self.persist(account, registration, &what).await?;
        } else if settled {
            self.keep_mark(account, registration).await;
        }
        Ok(Some(config))
    }

    /// Replaces the client's metadata with `body` (RFC 7592 §2.2), lets
    /// `update` record what the answer means for the registration, and
    /// writes the registration (with the server's new registration access
    /// token, if it rotated it) to the store.
    async fn write_client<F>(
        &self,
        account: &AccountRequest,
        registration: &mut Registration,
        body: &Map<String, Value>,
        update: F,
    ) -> Result<Map<String, Value>, ProviderError>
    where
        F: FnOnce(&mut Registration, &Map<String, Value>),
    {
        let what = format!("updating OAuth2 client {}", registration.client_id);
        // Recorded first: if the answer is lost, the server may have
        // replaced the registration access token (see the module docs). A
        // failure to record it is the store's own (nothing was sent).
        let prior = registration.update_sent_at.replace(Timestamp::now());
        self.store.put(account, registration).await?;
        let request = self
            .http
            .put(&registration.registration_client_uri)
            .header(header::AUTHORIZATION, bearer(&registration.registration_access_token, "registration access")?)
            .json(body);
        let sent_secret = body.get("client_secret").and_then(Value::as_str).unwrap_or_default();
        let answer = self.exchange(&what, request, &[&registration.registration_access_token, sent_secret]).await;
        let config = match answer {
            Ok(Value::Object(config)) => config,
            Ok(_) => return Err(ProviderError::Invalid(format!("{what}: the answer is not a JSON object"))),
            Err(failure) if failure.client_gone() => {
                // Refused: this update did nothing, but an earlier one's
                // answer may have been lost.
                registration.update_sent_at = prior;
                self.keep_mark(account, registration).await;
                self.check_control(account, registration, &failure)?;
                return Err(ProviderError::NotFound(format!(
                    "OAuth2 client {} is gone, or the server no longer accepts its registration access token",
                    registration.client_id
                )));
            }
            // A client error (but a timeout) is an answer from a server that
            // did not act: the token is the same. A 5xx or 408 may come
            // after the server acted (from it, or a gateway): the mark stays.
            Err(failure @ Failure::Status { status, .. })
                if status.is_client_error() && status != StatusCode::REQUEST_TIMEOUT =>
            {
                registration.update_sent_at = prior;
                self.keep_mark(account, registration).await;
                return Err(failure.into());
            }
            Err(failure) => return Err(failure.into()),
        };
        check_client_id(&what, registration, &config)?;
        registration.update_sent_at = None;
        absorb(registration, &config);
        update(registration, &config);
        self.persist(account, registration, &what).await?;
        Ok(config)
    }

    /// Writes a changed mark to the store, as best it can: a mark left set
    /// costs a later read, and a mark the store failed to set was never
    /// needed (the request it marks was not sent).
    async fn keep_mark(&self, account: &AccountRequest, registration: &Registration) {
        if let Err(error) = self.store.put(account, registration).await {
            tracing::warn!(client_id = %registration.client_id, %error, "could not record the OAuth2 client's update mark; a later read settles it");
        }
    }

    /// A refused registration access token means the client is gone, unless
    /// an update's answer was lost: then the server may have replaced the
    /// token, and the client lives on out of keysmith's reach. That is an
    /// error naming the client, until someone deletes the record.
    fn check_control(
        &self,
        account: &AccountRequest,
        registration: &Registration,
        failure: &Failure,
    ) -> Result<(), ProviderError> {
        let Some(sent_at) = registration.update_sent_at else {
            return Ok(());
        };
        if failure.status() == Some(StatusCode::NOT_FOUND) {
            return Ok(());
        }
        let client_id = &registration.client_id;
        tracing::error!(%client_id, %sent_at, "keysmith lost control of an OAuth2 client: an update's answer never arrived and the server no longer accepts the registration access token");
        Err(ProviderError::Conflict(format!(
            "keysmith lost control of OAuth2 client {client_id}: the answer to the update sent at {sent_at} never \
             arrived, and the server no longer accepts the client's registration access token (servers may replace \
             it on every update). The client may still exist with its scopes and secret. Ask the server's \
             administrator to delete client {client_id}, then delete {} so keysmith registers a new client",
            self.store.describe(account)
        )))
    }

    /// Writes the registration to the store, trying again on failure: after
    /// a rotated registration access token it is the only copy.
    async fn persist(
        &self,
        account: &AccountRequest,
        registration: &Registration,
        what: &str,
    ) -> Result<(), ProviderError> {
        let mut attempt = 1;
        loop {
            match self.store.put(account, registration).await {
                Ok(()) => return Ok(()),
                Err(error) if attempt < STORE_ATTEMPTS => {
                    tracing::warn!(client_id = %registration.client_id, %error, "storing an OAuth2 registration failed; trying again");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    attempt += 1;
                }
                Err(error) => {
                    tracing::error!(
                        client_id = %registration.client_id,
                        %error,
                        "the OAuth2 registration could not be stored: if the server rotated its registration access token, keysmith can no longer manage the client"
                    );
                    return Err(ProviderError::Conflict(format!(
                        "{what}: the registration of OAuth2 client {} could not be stored ({error}); if the server \
                         rotated its registration access token, keysmith can no longer manage the client and the \
                         server's administrator must remove it",
                        registration.client_id
                    )));
                }
            }
        }
    }

    /// The registration and current configuration of the account's client,
    /// which must exist.
    async fn existing_client(
        &self,
        account: &AccountRequest,
    ) -> Result<(Registration, Map<String, Value>), ProviderError> {
        let not_found = || {
            ProviderError::NotFound(format!(
                "keysmith has no OAuth2 client for IntegrationAccount {}/{}",
                account.namespace, account.account_name
            ))
        };
        let mut registration = self.store.get(account).await?.ok_or_else(not_found)?;
        match self.read_client(account, &mut registration).await? {
            Some(config) => Ok((registration, config)),
            None => Err(not_found()),
        }
    }

    /// Sets the client's scopes with an update that keeps its secret.
    async fn set_scopes(
        &self,
        account: &AccountRequest,
        mut registration: Registration,
        config: &Map<String, Value>,
        scopes: &BTreeSet<String>,
    ) -> Result<(), ProviderError> {
        let body = update_body(config, account, scopes, true)?;
        self.keep_secret_update(account, &mut registration, config, &body).await.map(|_| ())
    }

    /// An update meant to keep the client's secret. A server that replaced
    /// it all the same has broken the live key: the current key is
    /// forgotten so the controller issues a new one.
    async fn keep_secret_update(
        &self,
        account: &AccountRequest,
        registration: &mut Registration,
        before: &Map<String, Value>,
        body: &Map<String, Value>,
    ) -> Result<Map<String, Value>, ProviderError> {
        let old = client_secret(before).map(str::to_owned);
        let client_id = registration.client_id.clone();
        self.write_client(account, registration, body, |registration, after| {
            if old.is_some() && client_secret(after).is_some() && client_secret(after) != old.as_deref() {
                tracing::warn!(client_id = %client_id, "the server replaced the client secret on an update meant to keep it; the current key no longer works");
                registration.current_key = None;
            }
        })
        .await
    }

    /// Replaces the client's secret (an update without `client_secret`).
    /// `key` becomes the current key; `None` throws the new secret away.
    /// Returns the new configuration, which holds the new secret.
    async fn rotate_secret(
        &self,
        account: &AccountRequest,
        registration: &mut Registration,
        config: &Map<String, Value>,
        key: Option<StoredKey>,
    ) -> Result<Map<String, Value>, ProviderError> {
        let scopes = scopes_of(config);
        let body = update_body(config, account, &scopes, false)?;
        let old = client_secret(config).map(str::to_owned);
        let mut rotated = false;
        let after = self
            .write_client(account, registration, &body, |registration, after| {
                let new = client_secret(after);
                rotated = new.is_some() && new != old.as_deref();
                if rotated {
                    registration.current_key = key;
                }
            })
            .await?;
        if !rotated {
            return Err(ProviderError::Invalid(format!(
                "the server kept the secret of OAuth2 client {} on an update without client_secret: it does not \
                 rotate client secrets as keysmith asks (see the oauth2 provider's documentation)",
                registration.client_id
            )));
        }
        Ok(after)
    }

    /// A token request for the client with the client credentials grant.
    async fn token_request(
        &self,
        client_id: &str,
        secret: &str,
        method: AuthMethod,
        scope: Option<&str>,
    ) -> Result<Value, Failure> {
        let mut form = vec![("grant_type", CLIENT_CREDENTIALS.to_owned())];
        if let Some(scope) = scope.filter(|s| !s.is_empty()) {
            form.push(("scope", scope.to_owned()));
        }
        let request = client_auth(self.http.post(&self.token_endpoint), method, client_id, secret, &mut form)
            .map_err(Failure::Other)?
            .form(&form);
        let what = format!("token request for OAuth2 client {client_id}");
        self.exchange(&what, request, &[secret]).await
    }

    /// Introspects `token` (RFC 7662) with the client's own credentials.
    async fn introspect(
        &self,
        endpoint: &str,
        client_id: &str,
        secret: &str,
        method: AuthMethod,
        token: &str,
    ) -> Result<Value, Failure> {
        let mut form = vec![("token", token.to_owned()), ("token_type_hint", "access_token".to_owned())];
        let request =
            client_auth(self.http.post(endpoint), method, client_id, secret, &mut form).map_err(Failure::Other)?;
        let what = format!("introspecting a token of OAuth2 client {client_id}");
        self.exchange(&what, request.form(&form), &[secret, token]).await
    }

    /// Checks that `endpoint` answers a request without client credentials
    /// as an OAuth endpoint does (an OAuth error, or success), not with 404.
    async fn probe_endpoint(&self, name: &str, endpoint: &str, form: &[(&str, &str)]) -> Result<(), ProviderError> {
        let what = format!("probing the {name} endpoint {endpoint}");
        match self.exchange(&what, self.http.post(endpoint).form(form), &[]).await {
            Ok(_) => Ok(()),
            Err(failure @ Failure::Other(_)) => Err(failure.into()),
            Err(failure) => {
                let status = failure.status().unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                if failure.error_code().is_some() && matches!(status.as_u16(), 400 | 401) {
                    return Ok(());
                }
                match ProviderError::from(failure) {
                    ProviderError::NotFound(message) | ProviderError::Invalid(message) => Err(ProviderError::Invalid(
                        format!("{message}: this does not look like an OAuth 2.0 {name} endpoint"),
                    )),
                    ProviderError::Unauthorized(message) if status.as_u16() == 403 => {
                        Err(ProviderError::Invalid(format!("{message}: keysmith cannot reach the {name} endpoint")))
                    }
                    other => Err(other),
                }
            }
        }
    }

    /// Deletes a client keysmith just registered and cannot keep.
    async fn discard_client(&self, uri: &str, token: &str, client_id: &str) {
        let request = match bearer(token, "registration access") {
            Ok(value) => self.http.delete(uri).header(header::AUTHORIZATION, value),
            Err(_) => return,
        };
        let what = format!("deleting OAuth2 client {client_id}");
        if let Err(failure) = self.exchange(&what, request, &[token]).await {
            let error = ProviderError::from(failure);
            tracing::error!(client_id, %error, "could not delete an OAuth2 client keysmith registered and cannot keep; the server's administrator must remove it");
        }
    }

    /// The output Secret's values.
    fn material(&self, client_id: &str, secret: &str, scopes: &BTreeSet<String>) -> KeyMaterial {
        KeyMaterial::new(BTreeMap::from([
            (CLIENT_ID_KEY.to_owned(), client_id.to_owned()),
            (CLIENT_SECRET_KEY.to_owned(), secret.to_owned()),
            (TOKEN_URL_KEY.to_owned(), self.token_endpoint.clone()),
            (SCOPE_KEY.to_owned(), join_scopes(scopes)),
        ]))
    }
}

#[async_trait]
impl Provider for OAuth2Provider {
    fn name(&self) -> &'static str {
        "oauth2"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { last_use_lag: None, max_keys_per_account: Some(1), key_expiry: false, disable: false }
    }

    /// See the module docs: an unacceptable registration request proves
    /// whether the initial access token is accepted, then the token (and
    /// introspection) endpoints must answer as OAuth endpoints.
    async fn verify_connection(&self) -> Result<(), ProviderError> {
        let what = format!("probing the registration endpoint {}", self.registration_endpoint);
        let mut request = self.http.post(&self.registration_endpoint).json(&json!({
            "client_name": "keysmith connection check (never registered)",
            "grant_types": "keysmith-connection-check",
            "redirect_uris": "keysmith-connection-check",
        }));
        if let Some(token) = &self.initial_access_token {
            request = request.header(header::AUTHORIZATION, bearer(token, "initial access")?);
        }
        let secrets: Vec<&str> = self.initial_access_token.iter().map(String::as_str).collect();
        match self.exchange(&what, request, &secrets).await {
            Ok(answer) => {
                // Registered all the same: take it back.
                let field = |name: &str| answer.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
                let (client_id, uri, token) =
                    (field("client_id"), field("registration_client_uri"), field("registration_access_token"));
                tracing::warn!(%client_id, "the registration endpoint accepted keysmith's invalid check request; deleting the client");
                if !uri.is_empty() && !token.is_empty() {
                    self.discard_client(&uri, &token, &client_id).await;
                }
            }
            Err(failure) => match failure.status().map(|s| s.as_u16()) {
                Some(400) if !matches!(failure.error_code(), Some("invalid_token" | "invalid_client")) => {}
                Some(401 | 403) => {
                    let hint = if self.initial_access_token.is_some() {
                        "the registration endpoint refused the initial access token"
                    } else {
                        "the registration endpoint requires an initial access token (initialAccessTokenSecretRef)"
                    };
                    return Err(ProviderError::Unauthorized(format!("{hint}: {}", ProviderError::from(failure))));
                }
                Some(404 | 405) => {
                    return Err(ProviderError::Invalid(format!(
                        "{}: this is not an OAuth 2.0 dynamic client registration endpoint",
                        ProviderError::from(failure)
                    )))
                }
                _ => return Err(failure.into()),
            },
        }
        self.probe_endpoint("token", &self.token_endpoint, &[("grant_type", CLIENT_CREDENTIALS)]).await?;
        if let Some(endpoint) = &self.introspection_endpoint {
            self.probe_endpoint("introspection", endpoint, &[("token", "keysmith-connection-check")]).await?;
        }
        Ok(())
    }

    async fn observe_account(&self, account: &AccountRequest) -> Result<Option<ObservedAccount>, ProviderError> {
        let Some(mut registration) = self.store.get(account).await? else {
            return Ok(None);
        };
        Ok(self.read_client(account, &mut registration).await?.map(|config| observed(&config, account)))
    }

    async fn create_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        let metadata = desired_metadata(account)?;
        if let Some(mut registration) = self.store.get(account).await? {
            if let Some(config) = self.read_client(account, &mut registration).await? {
                return Ok(observed(&config, account));
            }
            tracing::info!(client_id = %registration.client_id, "the OAuth2 client keysmith registered is gone; registering a new one");
        }
        let what = format!("registering an OAuth2 client at {}", self.registration_endpoint);
        let mut request = self.http.post(&self.registration_endpoint).json(&metadata);
        if let Some(token) = &self.initial_access_token {
            request = request.header(header::AUTHORIZATION, bearer(token, "initial access")?);
        }
        let secrets: Vec<&str> = self.initial_access_token.iter().map(String::as_str).collect();
        let config = match self.exchange(&what, request, &secrets).await? {
            Value::Object(config) => config,
            _ => return Err(ProviderError::Invalid(format!("{what}: the answer is not a JSON object"))),
        };
        let field = |name: &str| config.get(name).and_then(Value::as_str).filter(|v| !v.is_empty());
        let Some(client_id) = field("client_id") else {
            return Err(ProviderError::Invalid(format!("{what}: the server answered without a client_id")));
        };
        let (Some(uri), Some(token)) = (field("registration_client_uri"), field("registration_access_token")) else {
            tracing::error!(client_id, "the OAuth2 server registered a client without a registration access token; its administrator must remove it");
            return Err(ProviderError::Invalid(format!(
                "{what}: the server registered client {client_id} but issued no registration access token or \
                 client configuration endpoint; keysmith needs RFC 7592 client management (the client must be \
                 removed by the server's administrator)"
            )));
        };
        if Url::parse(uri).map(|u| !matches!(u.scheme(), "http" | "https")).unwrap_or(true) {
            self.discard_client(uri, token, client_id).await;
            return Err(ProviderError::Invalid(format!(
                "{what}: the server's registration_client_uri for client {client_id} is not an http(s) URL"
            )));
        }
        let registration = Registration {
            client_id: client_id.to_owned(),
            registration_client_uri: uri.to_owned(),
            registration_access_token: token.to_owned(),
            current_key: None,
            update_sent_at: None,
        };
        if let Err(error) = self.persist(account, &registration, &what).await {
            self.discard_client(uri, token, client_id).await;
            return Err(error);
        }
        tracing::debug!(client_id, "registered an OAuth2 client");
        Ok(observed(&config, account))
    }

    async fn update_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        let (mut registration, config) = self.existing_client(account).await?;
        if !is_drifted(&config, account) {
            return Ok(observed(&config, account));
        }
        let body = update_body(&config, account, &scopes_of(&config), true)?;
        let after = self.keep_secret_update(account, &mut registration, &config, &body).await?;
        Ok(observed(&after, account))
    }

    async fn disable_account(&self, _account: &AccountRequest) -> Result<(), ProviderError> {
        Err(ProviderError::Invalid(
            "OAuth 2.0 dynamic client registration cannot disable a client: use deletionPolicy Delete or Orphan"
                .to_owned(),
        ))
    }

    async fn delete_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        let Some(registration) = self.store.get(account).await? else {
            return Ok(());
        };
        let what = format!("deleting OAuth2 client {}", registration.client_id);
        let request = self
            .http
            .delete(&registration.registration_client_uri)
            .header(header::AUTHORIZATION, bearer(&registration.registration_access_token, "registration access")?);
        match self.exchange(&what, request, &[&registration.registration_access_token]).await {
            Ok(_) => {}
            Err(failure) if failure.status() == Some(StatusCode::NOT_FOUND) => {}
            Err(failure) if failure.client_gone() => {
                self.check_control(account, &registration, &failure)?;
                tracing::warn!(
                    client_id = %registration.client_id,
                    "the OAuth2 server no longer accepts the client's registration access token: taking the client as deleted (if it still exists, the server's administrator must remove it)"
                );
            }
            Err(failure) => return Err(failure.into()),
        }
        self.store.delete(account).await
    }

    async fn list_roles(&self, account: &AccountRequest) -> Result<Vec<RoleGrant>, ProviderError> {
        let Some(mut registration) = self.store.get(account).await? else {
            return Ok(Vec::new());
        };
        let Some(config) = self.read_client(account, &mut registration).await? else {
            return Ok(Vec::new());
        };
        Ok(scopes_of(&config).into_iter().map(|role| RoleGrant { role, scope: None }).collect())
    }

    async fn grant_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        check_role(grant)?;
        let (registration, config) = self.existing_client(account).await?;
        let mut scopes = scopes_of(&config);
        if !scopes.insert(grant.role.clone()) && grants_client_credentials(&config) {
            return Ok(());
        }
        self.set_scopes(account, registration, &config, &scopes).await
    }

    async fn revoke_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        let Some(mut registration) = self.store.get(account).await? else {
            return Ok(());
        };
        let Some(config) = self.read_client(account, &mut registration).await? else {
            return Ok(());
        };
        let mut scopes = scopes_of(&config);
        if !scopes.remove(&grant.role) {
            return Ok(());
        }
        self.set_scopes(account, registration, &config, &scopes).await
    }

    async fn issue_key(&self, account: &AccountRequest, request: &KeyRequest) -> Result<IssuedKey, ProviderError> {
        if request.key_id.is_empty() {
            return Err(ProviderError::Invalid("the key id is empty".to_owned()));
        }
        let (mut registration, config) = self.existing_client(account).await?;
        let key = StoredKey { id: request.key_id.clone(), issued_at: Timestamp::now() };
        let after = self.rotate_secret(account, &mut registration, &config, Some(key)).await?;
        let secret = client_secret(&after).unwrap_or_default();
        let expires_at = after
            .get("client_secret_expires_at")
            .and_then(Value::as_i64)
            .filter(|at| *at > 0)
            .and_then(|at| Timestamp::from_second(at).ok());
        tracing::debug!(client_id = %registration.client_id, key_id = %request.key_id, "issued a new OAuth2 client secret");
        Ok(IssuedKey {
            id: request.key_id.clone(),
            expires_at,
            material: self.material(&registration.client_id, secret, &scopes_of(&after)),
        })
    }

    async fn list_keys(&self, account: &AccountRequest) -> Result<Vec<ObservedKey>, ProviderError> {
        Ok(self
            .store
            .get(account)
            .await?
            .and_then(|r| r.current_key)
            .map(|key| ObservedKey { last_used: None, id: key.id, created_at: Some(key.issued_at) })
            .into_iter()
            .collect())
    }

    async fn revoke_key(&self, account: &AccountRequest, key_id: &str) -> Result<(), ProviderError> {
        let Some(mut registration) = self.store.get(account).await? else {
            return Ok(());
        };
        // A key that is no longer current stopped working when it was replaced.
        if registration.current_key.as_ref().is_none_or(|key| key.id != key_id) {
            return Ok(());
        }
        let Some(config) = self.read_client(account, &mut registration).await? else {
            return Ok(());
        };
        self.rotate_secret(account, &mut registration, &config, None).await?;
        tracing::debug!(client_id = %registration.client_id, key_id, "revoked an OAuth2 client secret");
        Ok(())
    }

    async fn verify_key(&self, account: &AccountRequest, key: &IssuedKey) -> Result<(), ProviderError> {
        let values = key.material.expose();
        let value = |name: &str| {
            values
                .get(name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| ProviderError::Invalid(format!("the key has no {name}")))
        };
        let (client_id, secret) = (value(CLIENT_ID_KEY)?, value(CLIENT_SECRET_KEY)?);
        let scope = values.get(SCOPE_KEY).map(String::as_str).filter(|s| !s.is_empty());
        let method = AuthMethod::of(account)?;
        let refused = |failure: Failure, endpoint: &str| {
            ProviderError::Invalid(format!(
                "the {endpoint} endpoint refused the new secret of OAuth2 client {client_id}: {}",
                ProviderError::from(failure)
            ))
        };
        let answer = match self.token_request(client_id, secret, method, scope).await {
            Ok(answer) => answer,
            Err(failure) if is_refused(&failure) => return Err(refused(failure, "token")),
            // A client without scopes has no grant type. The server
            // authenticated it before refusing the grant (RFC 6749 §5.2 says
            // `unauthorized_client`; oidc-provider says `invalid_request`).
            // Where the server offers introspection, the secret is proven
            // there; else that answer is all the proof there is.
            Err(failure) if scope.is_none() && failure.status() == Some(StatusCode::BAD_REQUEST) => {
                let Some(endpoint) = &self.introspection_endpoint else {
                    return Ok(());
                };
                return match self.introspect(endpoint, client_id, secret, method, "keysmith-verification").await {
                    Ok(_) => Ok(()),
                    Err(failure) if is_refused(&failure) => Err(refused(failure, "introspection")),
                    Err(failure) => Err(failure.into()),
                };
            }
            Err(failure) => return Err(failure.into()),
        };
        let Some(token) = answer.get("access_token").and_then(Value::as_str).filter(|t| !t.is_empty()) else {
            return Err(ProviderError::Invalid(format!(
                "the token endpoint answered OAuth2 client {client_id} without an access_token"
            )));
        };
        if let Some(endpoint) = &self.introspection_endpoint {
            let active = match self.introspect(endpoint, client_id, secret, method, token).await {
                Ok(answer) => answer.get("active").and_then(Value::as_bool) == Some(true),
                Err(failure) if is_refused(&failure) => return Err(refused(failure, "introspection")),
                Err(failure) => return Err(failure.into()),
            };
            if !active {
                return Err(ProviderError::Invalid(format!(
                    "the introspection endpoint says the token issued to OAuth2 client {client_id} is not active"
                )));
            }
        }
        Ok(())
    }
}

/// Whether a token or introspection endpoint refused the client's credentials.
fn is_refused(failure: &Failure) -> bool {
    failure.status() == Some(StatusCode::UNAUTHORIZED) || failure.error_code() == Some("invalid_client")
}

/// The metadata keysmith registers, and sets on every update. A new client
/// holds no scope, so no grant type (see the module docs).
fn desired_metadata(account: &AccountRequest) -> Result<Map<String, Value>, ProviderError> {
    let method = AuthMethod::of(account)?;
    let mut metadata = Map::new();
    metadata.insert("client_name".to_owned(), json!(account.name));
    metadata.insert("grant_types".to_owned(), json!([]));
    metadata.insert("response_types".to_owned(), json!([]));
    metadata.insert("redirect_uris".to_owned(), json!([]));
    metadata.insert("token_endpoint_auth_method".to_owned(), json!(method.name()));
    metadata.insert("software_id".to_owned(), json!(SOFTWARE_ID));
    metadata.insert("software_version".to_owned(), json!(env!("CARGO_PKG_VERSION")));
    Ok(metadata)
}

/// The body of an update (RFC 7592 §2.2): the client's whole configuration
/// as the server returned it, without the fields a request must not carry,
/// with keysmith's metadata and `scopes`. `keep_secret` keeps the current
/// `client_secret` in the body (asking to keep it), else it is left out
/// (asking for a new one).
fn update_body(
    config: &Map<String, Value>,
    account: &AccountRequest,
    scopes: &BTreeSet<String>,
    keep_secret: bool,
) -> Result<Map<String, Value>, ProviderError> {
    let mut body = config.clone();
    for field in READ_ONLY_FIELDS {
        body.remove(field);
    }
    if !keep_secret {
        body.remove("client_secret");
    }
    body.extend(desired_metadata(account)?);
    if scopes.is_empty() {
        body.remove("scope");
    } else {
        body.insert("scope".to_owned(), json!(join_scopes(scopes)));
        body.insert("grant_types".to_owned(), json!([CLIENT_CREDENTIALS]));
    }
    Ok(body)
}

/// The client's scopes.
fn scopes_of(config: &Map<String, Value>) -> BTreeSet<String> {
    config.get("scope").and_then(Value::as_str).unwrap_or_default().split_whitespace().map(str::to_owned).collect()
}

fn join_scopes(scopes: &BTreeSet<String>) -> String {
    scopes.iter().map(String::as_str).collect::<Vec<_>>().join(" ")
}

fn grant_types(config: &Map<String, Value>) -> BTreeSet<String> {
    config
        .get("grant_types")
        .and_then(Value::as_array)
        .map(|types| types.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default()
}

fn grants_client_credentials(config: &Map<String, Value>) -> bool {
    grant_types(config).contains(CLIENT_CREDENTIALS)
}

fn client_secret(config: &Map<String, Value>) -> Option<&str> {
    config.get("client_secret").and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Whether the client's metadata differs from what keysmith sets: its
/// name, grant types (exactly `client_credentials` with scopes, none
/// without), authentication method, response types, and `software_id` where
/// the server keeps it.
fn is_drifted(config: &Map<String, Value>, account: &AccountRequest) -> bool {
    let text = |name: &str| config.get(name).and_then(Value::as_str);
    let expected_grants: BTreeSet<String> =
        if scopes_of(config).is_empty() { BTreeSet::new() } else { BTreeSet::from([CLIENT_CREDENTIALS.to_owned()]) };
    let method = AuthMethod::of(account).map(AuthMethod::name).unwrap_or(CLIENT_SECRET_BASIC);
    let response_types = config.get("response_types").and_then(Value::as_array).is_some_and(|t| !t.is_empty());
    text("client_name") != Some(account.name.as_str())
        || grant_types(config) != expected_grants
        || text("token_endpoint_auth_method").is_some_and(|m| m != method)
        || text("software_id").is_some_and(|id| id != SOFTWARE_ID)
        || response_types
}

fn observed(config: &Map<String, Value>, account: &AccountRequest) -> ObservedAccount {
    let text = |name: &str| config.get(name).and_then(Value::as_str).map(str::to_owned);
    let id = text("client_id").unwrap_or_default();
    ObservedAccount {
        name: text("client_name").unwrap_or_else(|| id.clone()),
        id,
        disabled: false,
        owned: true,
        drifted: is_drifted(config, account),
    }
}

/// Takes a rotated registration access token or moved configuration
/// endpoint from a server's answer. Returns whether anything changed.
fn absorb(registration: &mut Registration, config: &Map<String, Value>) -> bool {
    let mut changed = false;
    if let Some(token) = config.get("registration_access_token").and_then(Value::as_str).filter(|t| !t.is_empty()) {
        if token != registration.registration_access_token {
            registration.registration_access_token = token.to_owned();
            changed = true;
        }
    }
    if let Some(uri) = config.get("registration_client_uri").and_then(Value::as_str).filter(|u| !u.is_empty()) {
        let usable = Url::parse(uri).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
        if usable && uri != registration.registration_client_uri {
            registration.registration_client_uri = uri.to_owned();
            changed = true;
        }
    }
    changed
}

fn check_client_id(what: &str, registration: &Registration, config: &Map<String, Value>) -> Result<(), ProviderError> {
    match config.get("client_id").and_then(Value::as_str) {
        Some(id) if id != registration.client_id => Err(ProviderError::Conflict(format!(
            "{what}: the server answered for client {id}, not {}",
            registration.client_id
        ))),
        _ => Ok(()),
    }
}

/// A role must be one OAuth scope token (RFC 6749 §3.3) and have no scope.
fn check_role(grant: &RoleGrant) -> Result<(), ProviderError> {
    if grant.scope.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ProviderError::Invalid(format!(
            "OAuth2 scopes apply to the whole client: role {:?} cannot have scope {:?}",
            grant.role,
            grant.scope.as_deref().unwrap_or_default()
        )));
    }
    let valid = |c: char| c == '\x21' || ('\x23'..='\x5b').contains(&c) || ('\x5d'..='\x7e').contains(&c);
    if grant.role.is_empty() || !grant.role.chars().all(valid) {
        return Err(ProviderError::Invalid(format!(
            "{:?} is not an OAuth 2.0 scope: a scope is printable ASCII without spaces, '\"' or '\\'",
            grant.role
        )));
    }
    Ok(())
}

/// An `Authorization: Bearer` header value, marked sensitive.
fn bearer(token: &str, what: &str) -> Result<HeaderValue, ProviderError> {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| ProviderError::Invalid(format!("the {what} token has characters an HTTP header cannot carry")))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Adds the client's credentials to a token endpoint request: HTTP Basic
/// with both parts form-urlencoded first (RFC 6749 §2.3.1), or form fields.
fn client_auth(
    request: RequestBuilder,
    method: AuthMethod,
    client_id: &str,
    secret: &str,
    form: &mut Vec<(&'static str, String)>,
) -> Result<RequestBuilder, ProviderError> {
    match method {
        AuthMethod::Basic => {
            let credentials = BASE64.encode(format!("{}:{}", form_urlencode(client_id), form_urlencode(secret)));
            let mut value = HeaderValue::from_str(&format!("Basic {credentials}"))
                .map_err(|_| ProviderError::Invalid("the client credentials cannot be encoded".to_owned()))?;
            value.set_sensitive(true);
            Ok(request.header(header::AUTHORIZATION, value))
        }
        AuthMethod::Post => {
            form.push(("client_id", client_id.to_owned()));
            form.push(("client_secret", secret.to_owned()));
            Ok(request)
        }
    }
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_urlencode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => out.push(char::from(byte)),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// Cuts every credential out of `text`, and shortens it.
fn scrub(text: &str, secrets: &[&str]) -> String {
    super::http::scrub(text, secrets, MAX_DETAIL_LEN)
}

/// The connect step: the initial access token (if any) from its Secret, the
/// registration store (out of the tenants' reach behind a
/// ClusterAppConnection), then the client.
pub async fn connect(
    spec: &crate::api::OAuth2Spec,
    connect: &super::Connect<'_>,
) -> Result<std::sync::Arc<dyn Provider>, ProviderError> {
    use crate::api::ConnectionKind;
    let connection = connect.connection;
    let (token, version) = match &spec.initial_access_token_secret_ref {
        Some(selector) => {
            let (token, version) = connect.secret_value(selector, "token").await?;
            (Some(token), version)
        }
        None => (None, String::new()),
    };
    let key = format!("oauth2/{}/{version}", connection.uid);
    let store = std::sync::Arc::new(match connection.kind {
        ConnectionKind::AppConnection => store::SecretRegistrationStore::new(connect.operator_client()),
        // Out of the tenants' reach: the registration access token can
        // change the client's scopes.
        ConnectionKind::ClusterAppConnection => {
            let namespace = match &spec.initial_access_token_secret_ref {
                Some(selector) => connection.secret_namespace(selector)?,
                None => std::env::var("POD_NAMESPACE").ok().filter(|ns| !ns.is_empty()).ok_or_else(|| {
                    ProviderError::Invalid(
                        "a ClusterAppConnection keeps OAuth 2.0 registrations in the namespace of its initialAccessTokenSecretRef (or keysmith's own, POD_NAMESPACE); name one".to_owned(),
                    )
                })?,
            };
            store::SecretRegistrationStore::in_namespace(connect.operator_client(), namespace)
        }
    });
    connect
        .cached(key, || async {
            Ok(std::sync::Arc::new(OAuth2Provider::new(
                spec.registration_endpoint.clone(),
                spec.token_endpoint.clone(),
                spec.introspection_endpoint.clone(),
                token,
                connect.http_client()?,
                store,
            )) as std::sync::Arc<dyn Provider>)
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account() -> AccountRequest {
        AccountRequest {
            name: "billing-sync".to_owned(),
            namespace: "payments".to_owned(),
            account_name: "billing-sync".to_owned(),
            owner_uid: "uid-1".to_owned(),
            description: None,
            owner: None,
            options: BTreeMap::new(),
        }
    }

    #[test]
    fn errors_are_classified_by_status_and_code() {
        let c = |status: u16, error: Option<&str>| {
            classify(StatusCode::from_u16(status).expect("status"), error, "m".to_owned(), None).category()
        };
        assert_eq!(c(400, Some("invalid_client_metadata")), "Invalid");
        assert_eq!(c(400, Some("invalid_redirect_uri")), "Invalid");
        assert_eq!(c(400, Some("invalid_scope")), "Invalid");
        assert_eq!(c(400, Some("invalid_token")), "Unauthorized");
        assert_eq!(c(401, Some("invalid_token")), "Unauthorized");
        assert_eq!(c(403, None), "Unauthorized");
        assert_eq!(c(404, None), "NotFound");
        assert_eq!(c(409, None), "Conflict");
        assert_eq!(c(429, None), "Transient");
        assert_eq!(c(503, None), "Transient");
        assert_eq!(c(400, Some("temporarily_unavailable")), "Transient");
        let throttled = classify(
            StatusCode::TOO_MANY_REQUESTS,
            None,
            "m".to_owned(),
            super::super::http::parse_retry_after("7", Timestamp::UNIX_EPOCH),
        );
        assert_eq!(
            throttled,
            ProviderError::Transient { message: "m".to_owned(), retry_after: Some(Duration::from_secs(7)) }
        );
    }

    #[test]
    fn credentials_are_form_urlencoded() {
        assert_eq!(form_urlencode("a-b_c.d*e"), "a-b_c.d*e");
        assert_eq!(form_urlencode("a b:c/d%"), "a+b%3Ac%2Fd%25");
        assert_eq!(form_urlencode("é"), "%C3%A9");
    }

    #[test]
    fn roles_must_be_scope_tokens() {
        let grant =
            |role: &str, scope: Option<&str>| RoleGrant { role: role.to_owned(), scope: scope.map(str::to_owned) };
        assert!(check_role(&grant("read", None)).is_ok());
        assert!(check_role(&grant("https://api.example/read", Some(""))).is_ok());
        for bad in ["", "two words", "quote\"", "back\\slash", "tab\t", "é"] {
            assert!(matches!(check_role(&grant(bad, None)), Err(ProviderError::Invalid(_))), "{bad:?}");
        }
        assert!(matches!(check_role(&grant("read", Some("db"))), Err(ProviderError::Invalid(_))));
    }

    #[test]
    fn updates_carry_the_whole_metadata_without_read_only_fields() {
        let config: Map<String, Value> = serde_json::from_value(json!({
            "client_id": "c1",
            "client_secret": "s1",
            "client_secret_expires_at": 0,
            "client_id_issued_at": 1,
            "registration_access_token": "rat",
            "registration_client_uri": "http://127.0.0.1/reg/c1",
            "client_name": "old",
            "grant_types": [],
            "id_token_signed_response_alg": "RS256",
        }))
        .expect("map");
        let scopes = BTreeSet::from(["write".to_owned(), "read".to_owned()]);
        let body = update_body(&config, &account(), &scopes, true).expect("body");
        for field in READ_ONLY_FIELDS {
            assert!(!body.contains_key(field), "{field}");
        }
        assert_eq!(body["client_id"], "c1");
        assert_eq!(body["client_secret"], "s1");
        assert_eq!(body["client_name"], "billing-sync");
        assert_eq!(body["scope"], "read write");
        assert_eq!(body["grant_types"], json!(["client_credentials"]));
        assert_eq!(body["id_token_signed_response_alg"], "RS256");

        let rotate = update_body(&config, &account(), &BTreeSet::new(), false).expect("body");
        assert!(!rotate.contains_key("client_secret"));
        assert!(!rotate.contains_key("scope"));
        assert_eq!(rotate["grant_types"], json!([]));
    }

    #[test]
    fn drift_follows_the_scopes() {
        let config = |value: Value| -> Map<String, Value> { serde_json::from_value(value).expect("map") };
        let ok = config(
            json!({"client_name": "billing-sync", "grant_types": ["client_credentials"], "scope": "read", "software_id": "keysmith"}),
        );
        assert!(!is_drifted(&ok, &account()));
        let no_scope_but_grant = config(json!({"client_name": "billing-sync", "grant_types": ["client_credentials"]}));
        assert!(is_drifted(&no_scope_but_grant, &account()));
        let renamed = config(json!({"client_name": "other", "grant_types": []}));
        assert!(is_drifted(&renamed, &account()));
        let foreign_software = config(json!({"client_name": "billing-sync", "grant_types": [], "software_id": "x"}));
        assert!(is_drifted(&foreign_software, &account()));
    }

    #[test]
    fn registrations_round_trip_through_secret_data_and_hide_the_token() {
        let registration = Registration {
            client_id: "c1".to_owned(),
            registration_client_uri: "http://127.0.0.1/reg/c1".to_owned(),
            registration_access_token: "very-secret-rat".to_owned(),
            current_key: Some(StoredKey {
                id: "k1".to_owned(),
                issued_at: "2026-01-01T00:00:00Z".parse().expect("time"),
            }),
            update_sent_at: None,
        };
        let data = registration.to_secret_data();
        assert_eq!(
            data.keys().map(String::as_str).collect::<Vec<_>>(),
            ["client_id", "key_id", "key_issued_at", "registration_access_token", "registration_client_uri"]
        );
        assert_eq!(Registration::from_secret_data(&data).expect("parse"), registration);
        assert!(!format!("{registration:?}").contains("very-secret-rat"));
        let mut missing = data.clone();
        missing.remove(STORE_REGISTRATION_ACCESS_TOKEN);
        let err = Registration::from_secret_data(&missing).expect_err("missing");
        assert!(err.to_string().contains(STORE_REGISTRATION_ACCESS_TOKEN));

        let in_flight =
            Registration { update_sent_at: Some("2026-01-02T03:04:05Z".parse().expect("time")), ..registration };
        let data = in_flight.to_secret_data();
        assert_eq!(data.get(STORE_UPDATE_SENT_AT).map(String::as_str), Some("2026-01-02T03:04:05Z"));
        assert_eq!(Registration::from_secret_data(&data).expect("parse"), in_flight);
    }

    #[test]
    fn scrub_cuts_credentials_and_long_text() {
        assert_eq!(scrub("token abc123 refused", &["abc123", ""]), "token <redacted> refused");
        assert!(scrub(&"x".repeat(1000), &[]).chars().count() <= MAX_DETAIL_LEN + 1);
    }
}
