//! The `scim` provider: the target app is a SCIM 2.0 service (RFC 7643 and
//! RFC 7644), reached at its base URL with an admin bearer token.
//!
//! - **account** → a SCIM `User`: `userName` is the account's name,
//!   `displayName` its description (or its name when it has none), `active`
//!   whether it is enabled, and `externalId` = `keysmith:<IntegrationAccount
//!   uid>`, the ownership tag. keysmith only ever changes, disables or
//!   deletes a User carrying its own tag: a User of the same name without it
//!   is a [`ProviderError::Conflict`]. SCIM compares `userName`s without
//!   regard to case, so `Ci-Bot` and `ci-bot` are the same account.
//! - **role** → membership of a SCIM `Group`; the role's name is the Group's
//!   `displayName`, compared exactly (SCIM's `eq` filter ignores case, keysmith
//!   does not, so desired and observed roles always compare equal). Roles have
//!   no scope. keysmith never creates or deletes Groups, only memberships.
//!   Deleting an account first takes it out of every Group, as servers do not
//!   all do this themselves.
//! - **key** → the User's `password`, a fresh random one per key (32
//!   characters from letters, digits and `!#%*+-.:=?@^_~`, at least one of
//!   each, drawn from a cryptographically secure generator). A User has
//!   exactly one password, so the provider allows one key per account and
//!   **there is no grace period**: issuing a key replaces the password, the
//!   previous one stops working at once, and workloads must re-read the
//!   Secret (use `restartTargets`). SCIM never returns passwords, so the id
//!   of the key that set the current password is kept on the User, in
//!   `nickName` = `keysmith-key:<key id>` (an attribute of the core schema
//!   every server has; anything else a person wrote there is overwritten).
//!   Password and `nickName` are set in one PATCH, which RFC 7644 §3.5.2
//!   makes atomic, so the marker is there if and only if the password is.
//!   Revoking the current key sets a random password nobody knows and clears
//!   the marker; revoking an older key, already replaced, changes nothing.
//! - **verifying a key**: SCIM has no way to authenticate as a User with its
//!   password (a SCIM service takes its admin's bearer token, not user
//!   logins), so keysmith cannot prove the password works for a login.
//!   It reads the User back instead and checks that it is active and that its
//!   `nickName` names the new key: that proves the server accepted and kept
//!   the password of that key, no more.
//!
//! The output Secret holds `username` (the `userName`), `password` and
//! `scim_base_url` (the connection's base URL).
//!
//! Every request carries `Authorization: Bearer <token>` and speaks
//! `application/scim+json`. Updates send `If-Match` with the User's
//! `meta.version` when the server versions its resources; a `412 Precondition
//! Failed` is met by reading the User again and retrying once. Errors are
//! classified as everywhere in keysmith: 401/403 → `Unauthorized`, 404 →
//! `NotFound`, 409 and 412 → `Conflict`, other 4xx (and 501) → `Invalid`, 429,
//! 5xx and timeouts → `Transient`, with the `Retry-After` header's delay
//! (seconds or an HTTP date). Neither the bearer token nor a password ever
//! appears in an error or a log line: for requests that carry a password the
//! server's own error detail is left out too, in case it echoes the value.
//!
//! The admin token needs, on `/Users`: search, create, PATCH, DELETE; on
//! `/Groups`: search and PATCH. Group searches use the filter
//! `members.value eq "<user id>"` and fall back to listing every Group
//! (paged with `startIndex`/`count`) when the server refuses that filter.

use crate::ownership;
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use async_trait::async_trait;
use rand::Rng;
use reqwest::{header, Method, StatusCode, Url};
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::{json, Value};

use super::{
    http::{classify_status, retry_after, transport_error},
    AccountRequest, Capabilities, IssuedKey, KeyMaterial, KeyRequest, ObservedAccount, ObservedKey, Provider,
    ProviderError, RoleGrant,
};

/// The media type of SCIM requests and responses (RFC 7644 §3.1).
pub const SCIM_MEDIA_TYPE: &str = "application/scim+json";
/// The core User schema.
pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
/// The PATCH request message schema.
pub const PATCH_OP_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
/// `nickName` of a User whose password keysmith set: this prefix, then the key id.
pub const KEY_ID_PREFIX: &str = "keysmith-key:";
/// Output Secret key: the User's `userName`.
pub const USERNAME_KEY: &str = "username";
/// Output Secret key: the password.
pub const PASSWORD_KEY: &str = "password";
/// Output Secret key: the SCIM base URL.
pub const BASE_URL_KEY: &str = "scim_base_url";
/// Length of generated passwords.
pub const PASSWORD_LENGTH: usize = 32;
/// How many resources a search asks for per page, unless told otherwise.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// How long one request may take, unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

const LOWER: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const DIGITS: &[u8] = b"0123456789";
/// Symbols: no quotes, backslashes, `$`, backticks or spaces, so the password
/// survives JSON, YAML, env files and shell assignments without escaping.
const SYMBOLS: &[u8] = b"!#%*+-.:=?@^_~";
/// The longest server error detail quoted in an error message.
const MAX_DETAIL_LEN: usize = 300;
/// A search stops after this many pages (a server ignoring `startIndex`
/// would otherwise be read forever).
const MAX_PAGES: usize = 10_000;

/// A SCIM 2.0 service as the target app.
pub struct ScimProvider {
    base_url: String,
    bearer_token: String,
    http: reqwest::Client,
    page_size: u32,
    timeout: Duration,
    /// Whether the server is believed to support `members.value eq` on
    /// Groups; cleared the first time it refuses the filter.
    member_filter: AtomicBool,
}

impl fmt::Debug for ScimProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScimProvider")
            .field("base_url", &self.base_url)
            .field("page_size", &self.page_size)
            .field("timeout", &self.timeout)
            .field("member_filter", &self.member_filter.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl ScimProvider {
    /// A provider for the SCIM service at `base_url` (for example
    /// `https://example.com/scim/v2`), acting with the admin `bearer_token`
    /// through `http`. A malformed URL shows as [`ProviderError::Invalid`] on
    /// the first call.
    pub fn new(base_url: String, bearer_token: String, http: reqwest::Client) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            bearer_token,
            http,
            page_size: DEFAULT_PAGE_SIZE,
            timeout: DEFAULT_TIMEOUT,
            member_filter: AtomicBool::new(true),
        }
    }

    /// Asks for `page_size` resources per page when searching (at least 1).
    pub fn with_page_size(mut self, page_size: u32) -> Self {
        self.page_size = page_size.max(1);
        self
    }

    /// Limits each request to `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether to try the `members.value eq` filter when listing an
    /// account's Groups (on by default), rather than listing every Group.
    pub fn with_member_filter(self, enabled: bool) -> Self {
        self.member_filter.store(enabled, Ordering::Relaxed);
        self
    }

    /// The base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn url(&self, segments: &[&str]) -> Result<Url, ProviderError> {
        let invalid = |why: &str| ProviderError::Invalid(format!("the SCIM base URL {:?} {why}", self.base_url));
        let mut url = Url::parse(&self.base_url).map_err(|e| invalid(&format!("is not a valid URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("is not an http(s) URL"));
        }
        url.path_segments_mut().map_err(|()| invalid("cannot have a path"))?.pop_if_empty().extend(segments);
        Ok(url)
    }

    /// Sends one request; a status outside 2xx is a [`Failure::Status`].
    async fn call(&self, req: Req<'_>) -> Result<Reply, Failure> {
        let what = req.describe();
        let mut url = self.url(&req.segments).map_err(Failure::Other)?;
        if !req.query.is_empty() {
            url.query_pairs_mut().extend_pairs(req.query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        let mut builder = self
            .http
            .request(req.method.clone(), url)
            .bearer_auth(&self.bearer_token)
            .header(header::ACCEPT, SCIM_MEDIA_TYPE)
            .timeout(self.timeout);
        if let Some(version) = &req.if_match {
            builder = builder.header(header::IF_MATCH, version);
        }
        if let Some(body) = &req.body {
            let bytes = serde_json::to_vec(body)
                .map_err(|e| Failure::Other(ProviderError::Invalid(format!("encoding SCIM {what}: {e}"))))?;
            builder = builder.header(header::CONTENT_TYPE, SCIM_MEDIA_TYPE).body(bytes);
        }
        let response = builder.send().await.map_err(|e| Failure::Other(transport_error(&format!("SCIM {what}"), e)))?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let bytes = response.bytes().await.map_err(|e| Failure::Other(transport_error(&format!("SCIM {what}"), e)))?;
        if status.is_success() {
            let body = if bytes.iter().all(u8::is_ascii_whitespace) {
                None
            } else {
                Some(serde_json::from_slice::<Value>(&bytes).map_err(|e| {
                    Failure::Other(ProviderError::transient(format!(
                        "SCIM {what} answered with a body that is not JSON: {e}"
                    )))
                })?)
            };
            return Ok(Reply { body, what });
        }
        let error = serde_json::from_slice::<ScimError>(&bytes).unwrap_or_default();
        let scim_type = error.scim_type.filter(|t| !t.is_empty());
        let mut message = format!("SCIM {what} answered HTTP {}", status.as_u16());
        if let Some(t) = &scim_type {
            message.push_str(&format!(" ({t})"));
        }
        if !req.sensitive {
            if let Some(detail) = error.detail.filter(|d| !d.trim().is_empty()) {
                message.push_str(": ");
                message.push_str(&truncate(detail.trim(), MAX_DETAIL_LEN));
            }
        }
        Err(Failure::Status { status, scim_type, message, retry_after })
    }

    /// Sends a request and decodes its JSON body.
    async fn fetch<T: DeserializeOwned>(&self, req: Req<'_>) -> Result<T, Failure> {
        let reply = self.call(req).await?;
        reply.decode().map_err(Failure::Other)
    }

    /// The User named `name` (SCIM compares user names without regard to case).
    async fn find_user(&self, name: &str) -> Result<Option<User>, ProviderError> {
        let page: ListResponse<User> = self
            .fetch(Req::new(Method::GET, vec!["Users"]).query("filter", format!("userName eq {}", filter_value(name))))
            .await?;
        let mut users = page.resources.unwrap_or_default();
        if let Some(i) = users.iter().position(|u| u.user_name == name) {
            return Ok(Some(users.swap_remove(i)));
        }
        // Never trust a result whose name does not match: a server ignoring
        // the filter would hand back unrelated Users.
        let folded = name.to_lowercase();
        Ok(users.into_iter().find(|u| u.user_name.to_lowercase() == folded))
    }

    /// The User of the account, which must exist and be ours.
    async fn owned_user(&self, account: &AccountRequest) -> Result<User, ProviderError> {
        match self.find_user(&account.name).await? {
            None => Err(ProviderError::NotFound(format!("SCIM user {:?} does not exist", account.name))),
            Some(user) if !is_owned(&user, account) => Err(foreign_user(&user, account)),
            Some(user) => Ok(user),
        }
    }

    async fn get_user(&self, id: &str) -> Result<User, ProviderError> {
        Ok(self.fetch(Req::new(Method::GET, vec!["Users", id])).await?)
    }

    /// PATCHes the account's User with the operations `ops` computes from
    /// its current state (`None`: nothing to do), conditional on its version.
    /// On 412 the User is read again, still ours, and `ops` recomputed: once.
    /// Returns the User after the change when the server said or nothing
    /// changed, `None` when it answered 204.
    async fn patch_user<F>(
        &self,
        account: &AccountRequest,
        mut user: User,
        doing: &str,
        sensitive: bool,
        ops: F,
    ) -> Result<Option<User>, ProviderError>
    where
        F: Fn(&User) -> Option<Vec<Value>>,
    {
        let mut retried = false;
        loop {
            let Some(operations) = ops(&user) else {
                return Ok(Some(user));
            };
            let req = Req::new(Method::PATCH, vec!["Users", &user.id])
                .body(json!({"schemas": [PATCH_OP_SCHEMA], "Operations": operations}))
                .if_match(user.version())
                .sensitive(sensitive);
            match self.call(req).await {
                Ok(reply) => return reply.body.is_some().then(|| reply.decode::<User>()).transpose(),
                Err(f) if f.is(StatusCode::PRECONDITION_FAILED) && !retried => {
                    tracing::debug!(user = %account.name, "SCIM user changed while {doing}; reading it again");
                    retried = true;
                    user = self.owned_user(account).await?;
                }
                Err(f) if f.is(StatusCode::PRECONDITION_FAILED) => {
                    return Err(ProviderError::Conflict(format!(
                        "SCIM user {:?} kept changing while {doing}",
                        account.name
                    )))
                }
                Err(f) => return Err(f.into()),
            }
        }
    }

    /// Every Group, over as many pages as it takes, optionally filtered.
    async fn search_groups(&self, filter: Option<String>, attributes: &str) -> Result<Vec<Group>, Failure> {
        let mut groups: Vec<Group> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut start: u64 = 1;
        for _ in 0..MAX_PAGES {
            let mut req = Req::new(Method::GET, vec!["Groups"])
                .query("attributes", attributes.to_owned())
                .query("startIndex", start.to_string())
                .query("count", self.page_size.to_string());
            if let Some(filter) = &filter {
                req = req.query("filter", filter.clone());
            }
            let page: ListResponse<Group> = self.fetch(req).await?;
            if page.start_index.is_some_and(|s| s != start) {
                return Err(Failure::Other(ProviderError::Invalid(format!(
                    "SCIM GET /Groups was asked for startIndex {start} and answered with {}: \
                     the server does not page as RFC 7644 §3.4.2.4 says",
                    page.start_index.unwrap_or_default()
                ))));
            }
            let resources = page.resources.unwrap_or_default();
            let got = resources.len() as u64;
            // Pages by index can shift while Groups come and go: keep each once.
            groups.extend(resources.into_iter().filter(|g| seen.insert(g.id.clone())));
            let total = page.total_results.unwrap_or(0);
            if got == 0 || start - 1 + got >= total {
                return Ok(groups);
            }
            // The server may return fewer than asked for (its maxResults).
            start += got;
        }
        Err(Failure::Other(ProviderError::Invalid(format!("SCIM GET /Groups had more than {MAX_PAGES} pages"))))
    }

    /// The Groups the User with `user_id` is a member of.
    async fn groups_of(&self, user_id: &str) -> Result<Vec<Group>, ProviderError> {
        if self.member_filter.load(Ordering::Relaxed) {
            let filter = format!("members.value eq {}", filter_value(user_id));
            match self.search_groups(Some(filter), "displayName").await {
                Ok(groups) => return Ok(groups),
                Err(f) if f.is(StatusCode::BAD_REQUEST) || f.is(StatusCode::NOT_IMPLEMENTED) => {
                    tracing::debug!("the SCIM service refused a members.value filter; listing every Group instead");
                    self.member_filter.store(false, Ordering::Relaxed);
                }
                Err(f) => return Err(f.into()),
            }
        }
        let groups = self.search_groups(None, "displayName,members").await?;
        Ok(groups.into_iter().filter(|g| g.has_member(user_id)).collect())
    }

    /// The Groups whose displayName is exactly `name`, and those equal to it
    /// only without regard to case.
    async fn groups_named(&self, name: &str) -> Result<(Vec<Group>, Vec<Group>), ProviderError> {
        let filter = format!("displayName eq {}", filter_value(name));
        let groups = self.search_groups(Some(filter), "displayName").await?;
        let folded = name.to_lowercase();
        let (exact, others): (Vec<Group>, Vec<Group>) =
            groups.into_iter().partition(|g| g.display_name.as_deref() == Some(name));
        let near =
            others.into_iter().filter(|g| g.display_name.as_deref().map(str::to_lowercase) == Some(folded.clone()));
        Ok((exact, near.collect()))
    }

    /// PATCHes a Group's members; a Group gone since is fine.
    async fn patch_members(&self, group: &Group, operation: Value) -> Result<(), Failure> {
        let req = Req::new(Method::PATCH, vec!["Groups", &group.id])
            .body(json!({"schemas": [PATCH_OP_SCHEMA], "Operations": [operation]}));
        match self.call(req).await {
            Ok(_) => Ok(()),
            Err(f) if f.is(StatusCode::NOT_FOUND) => Ok(()),
            Err(f) => Err(f),
        }
    }

    /// Takes the User out of a Group. Not a member is fine: some servers
    /// answer 400 `noTarget` when the filter matches no member.
    async fn remove_member(&self, group: &Group, user_id: &str) -> Result<(), ProviderError> {
        let op = json!({"op": "remove", "path": format!("members[value eq {}]", filter_value(user_id))});
        match self.patch_members(group, op).await {
            Ok(()) => Ok(()),
            Err(f) if f.scim_type() == Some("noTarget") => Ok(()),
            Err(f) => Err(f.into()),
        }
    }
}

#[async_trait]
impl Provider for ScimProvider {
    fn name(&self) -> &'static str {
        "scim"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { last_use_lag: None, max_keys_per_account: Some(1), key_expiry: false, disable: true }
    }

    /// Lists one User with the token (the ServiceProviderConfig endpoint may
    /// be, and on many servers is, readable without one), then checks that
    /// the service supports PATCH, which keysmith needs.
    async fn verify_connection(&self) -> Result<(), ProviderError> {
        self.call(
            Req::new(Method::GET, vec!["Users"])
                .query("count", "1".to_owned())
                .query("attributes", "userName".to_owned()),
        )
        .await?;
        match self.fetch::<ServiceProviderConfig>(Req::new(Method::GET, vec!["ServiceProviderConfig"])).await {
            Ok(config) if config.patch.as_ref().and_then(|p| p.supported) == Some(false) => {
                Err(ProviderError::Invalid(
                    "the SCIM service does not support PATCH (its ServiceProviderConfig says so), which keysmith needs"
                        .to_owned(),
                ))
            }
            Ok(_) => Ok(()),
            // Not every server serves its configuration.
            Err(f) if f.is(StatusCode::NOT_FOUND) => Ok(()),
            Err(f) => Err(f.into()),
        }
    }

    async fn observe_account(&self, account: &AccountRequest) -> Result<Option<ObservedAccount>, ProviderError> {
        Ok(self.find_user(&account.name).await?.map(|user| observed(&user, account)))
    }

    async fn create_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        let body = json!({
            "schemas": [USER_SCHEMA],
            "userName": account.name,
            "displayName": display_name(account),
            "active": true,
            "externalId": external_id(account),
        });
        match self.call(Req::new(Method::POST, vec!["Users"]).body(body)).await {
            Ok(reply) if reply.body.is_some() => Ok(observed(&reply.decode::<User>()?, account)),
            Ok(_) => match self.find_user(&account.name).await? {
                Some(user) => Ok(observed(&user, account)),
                None => Err(ProviderError::transient(format!(
                    "SCIM user {:?} was created but cannot be found yet",
                    account.name
                ))),
            },
            Err(f) if f.is(StatusCode::CONFLICT) => match self.find_user(&account.name).await? {
                Some(user) if is_owned(&user, account) => Ok(observed(&user, account)),
                Some(user) => Err(foreign_user(&user, account)),
                None => Err(ProviderError::Conflict(format!(
                    "the SCIM service refused to create user {:?} as not unique, but has no user of that name: \
                     another unique attribute clashes",
                    account.name
                ))),
            },
            Err(f) => Err(f.into()),
        }
    }

    async fn update_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        let user = self.owned_user(account).await?;
        let want = display_name(account);
        let updated = self
            .patch_user(account, user.clone(), "updating it", false, |user| {
                let mut ops = Vec::new();
                if user.display_name.as_deref() != Some(want.as_str()) {
                    ops.push(json!({"op": "replace", "path": "displayName", "value": want}));
                }
                if user.active == Some(false) {
                    ops.push(json!({"op": "replace", "path": "active", "value": true}));
                }
                (!ops.is_empty()).then_some(ops)
            })
            .await?;
        let user = match updated {
            Some(user) => user,
            None => self.get_user(&user.id).await?,
        };
        Ok(observed(&user, account))
    }

    async fn disable_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        let Some(user) = self.find_user(&account.name).await? else {
            return Ok(());
        };
        if !is_owned(&user, account) {
            return Err(foreign_user(&user, account));
        }
        self.patch_user(account, user, "disabling it", false, |user| {
            (user.active != Some(false)).then(|| vec![json!({"op": "replace", "path": "active", "value": false})])
        })
        .await?;
        Ok(())
    }

    async fn delete_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        let Some(mut user) = self.find_user(&account.name).await? else {
            return Ok(());
        };
        if !is_owned(&user, account) {
            return Err(foreign_user(&user, account));
        }
        // Servers need not drop a deleted User from its Groups (scim2-server
        // does not): leave no dangling member behind.
        for group in self.groups_of(&user.id).await? {
            self.remove_member(&group, &user.id).await?;
        }
        let mut retried = false;
        loop {
            let req = Req::new(Method::DELETE, vec!["Users", &user.id]).if_match(user.version());
            match self.call(req).await {
                Ok(_) => return Ok(()),
                Err(f) if f.is(StatusCode::NOT_FOUND) => return Ok(()),
                Err(f) if f.is(StatusCode::PRECONDITION_FAILED) && !retried => {
                    retried = true;
                    user = match self.find_user(&account.name).await? {
                        None => return Ok(()),
                        Some(user) if !is_owned(&user, account) => return Err(foreign_user(&user, account)),
                        Some(user) => user,
                    };
                }
                Err(f) if f.is(StatusCode::PRECONDITION_FAILED) => {
                    return Err(ProviderError::Conflict(format!(
                        "SCIM user {:?} kept changing while deleting it",
                        account.name
                    )))
                }
                Err(f) => return Err(f.into()),
            }
        }
    }

    async fn list_roles(&self, account: &AccountRequest) -> Result<Vec<RoleGrant>, ProviderError> {
        let Some(user) = self.find_user(&account.name).await? else {
            return Ok(Vec::new());
        };
        let roles: BTreeSet<RoleGrant> = self
            .groups_of(&user.id)
            .await?
            .into_iter()
            .filter_map(|g| g.display_name)
            .map(|role| RoleGrant { role, scope: None })
            .collect();
        Ok(roles.into_iter().collect())
    }

    async fn grant_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        if let Some(scope) = &grant.scope {
            return Err(ProviderError::Invalid(format!(
                "SCIM roles (Group memberships) have no scope; leave the RoleBinding's scope empty, not {scope:?}"
            )));
        }
        let user = self.owned_user(account).await?;
        let (exact, near) = self.groups_named(&grant.role).await?;
        let group = match exact.as_slice() {
            [group] => group,
            [] => {
                let hint = near
                    .iter()
                    .filter_map(|g| g.display_name.as_deref())
                    .next()
                    .map(|n| format!(" (group names are case-sensitive; did you mean {n:?}?)"))
                    .unwrap_or_default();
                return Err(ProviderError::NotFound(format!("SCIM group {:?} does not exist{hint}", grant.role)));
            }
            many => {
                return Err(ProviderError::Conflict(format!(
                    "{} SCIM groups are named {:?}: keysmith cannot tell which one to grant",
                    many.len(),
                    grant.role
                )))
            }
        };
        let op = json!({"op": "add", "path": "members", "value": [{"value": user.id}]});
        match self.patch_members(group, op).await {
            Ok(()) => Ok(()),
            // Some servers refuse to add a member twice.
            Err(f) if f.is(StatusCode::CONFLICT) => {
                if self.groups_of(&user.id).await?.iter().any(|g| g.id == group.id) {
                    Ok(())
                } else {
                    Err(f.into())
                }
            }
            Err(f) => Err(f.into()),
        }
    }

    async fn revoke_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        if grant.scope.is_some() {
            // A scoped SCIM role cannot be held: it is not granted.
            return Ok(());
        }
        let Some(user) = self.find_user(&account.name).await? else {
            return Ok(());
        };
        if !is_owned(&user, account) {
            return Err(foreign_user(&user, account));
        }
        let (exact, _) = self.groups_named(&grant.role).await?;
        for group in &exact {
            self.remove_member(group, &user.id).await?;
        }
        Ok(())
    }

    async fn issue_key(&self, account: &AccountRequest, request: &KeyRequest) -> Result<IssuedKey, ProviderError> {
        let user = self.owned_user(account).await?;
        let user_name = user.user_name.clone();
        let password = generate_password();
        let marker = key_marker(&request.key_id);
        self.patch_user(account, user, "setting its password", true, |_| {
            Some(vec![
                json!({"op": "replace", "path": "password", "value": password}),
                json!({"op": "replace", "path": "nickName", "value": marker}),
            ])
        })
        .await?;
        let mut values = BTreeMap::new();
        values.insert(USERNAME_KEY.to_owned(), user_name);
        values.insert(PASSWORD_KEY.to_owned(), password);
        values.insert(BASE_URL_KEY.to_owned(), self.base_url.clone());
        Ok(IssuedKey { id: request.key_id.clone(), expires_at: None, material: KeyMaterial::new(values) })
    }

    async fn list_keys(&self, account: &AccountRequest) -> Result<Vec<ObservedKey>, ProviderError> {
        Ok(self
            .find_user(&account.name)
            .await?
            .filter(|user| is_owned(user, account))
            .and_then(|user| user.key_id().map(str::to_owned))
            .map(|id| ObservedKey { last_used: None, id, created_at: None })
            .into_iter()
            .collect())
    }

    async fn revoke_key(&self, account: &AccountRequest, key_id: &str) -> Result<(), ProviderError> {
        let Some(user) = self.find_user(&account.name).await? else {
            return Ok(());
        };
        if !is_owned(&user, account) {
            return Err(foreign_user(&user, account));
        }
        // Only the key that set the current password can be revoked: an older
        // one stopped working when it was replaced.
        self.patch_user(account, user, "revoking its password", true, |user| {
            (user.key_id() == Some(key_id)).then(|| {
                vec![
                    json!({"op": "replace", "path": "password", "value": generate_password()}),
                    json!({"op": "remove", "path": "nickName"}),
                ]
            })
        })
        .await?;
        Ok(())
    }

    async fn verify_key(&self, account: &AccountRequest, key: &IssuedKey) -> Result<(), ProviderError> {
        if key.material.expose().get(PASSWORD_KEY).is_none_or(|p| p.is_empty()) {
            return Err(ProviderError::Invalid(format!("key {} carries no password", key.id)));
        }
        let user = self.owned_user(account).await?;
        if user.active == Some(false) {
            return Err(ProviderError::Conflict(format!(
                "SCIM user {:?} is disabled: its password does not work",
                account.name
            )));
        }
        match user.key_id() {
            Some(id) if id == key.id => Ok(()),
            Some(other) => Err(ProviderError::Conflict(format!(
                "the password of SCIM user {:?} was set for key {other}, not {}",
                account.name, key.id
            ))),
            None => Err(ProviderError::Conflict(format!(
                "SCIM user {:?} does not record key {} as its password's (nickName is not {KEY_ID_PREFIX}{})",
                account.name, key.id, key.id
            ))),
        }
    }
}

/// One request, before it is sent.
struct Req<'a> {
    method: Method,
    segments: Vec<&'a str>,
    query: Vec<(&'static str, String)>,
    body: Option<Value>,
    if_match: Option<String>,
    /// The body carries a password: leave the server's error detail out.
    sensitive: bool,
}

impl<'a> Req<'a> {
    fn new(method: Method, segments: Vec<&'a str>) -> Self {
        Self { method, segments, query: Vec::new(), body: None, if_match: None, sensitive: false }
    }
    fn query(mut self, key: &'static str, value: String) -> Self {
        self.query.push((key, value));
        self
    }
    fn body(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }
    fn if_match(mut self, version: Option<&str>) -> Self {
        self.if_match = version.map(str::to_owned);
        self
    }
    fn sensitive(mut self, sensitive: bool) -> Self {
        self.sensitive = sensitive;
        self
    }
    /// `PATCH /Users/<id>`, for messages (never the query: it may hold a filter).
    fn describe(&self) -> String {
        format!("{} /{}", self.method, self.segments.join("/"))
    }
}

/// A 2xx answer.
struct Reply {
    body: Option<Value>,
    what: String,
}

impl Reply {
    fn decode<T: DeserializeOwned>(&self) -> Result<T, ProviderError> {
        let body = self.body.clone().unwrap_or(Value::Null);
        serde_json::from_value(body)
            .map_err(|e| ProviderError::transient(format!("SCIM {} answered with an unexpected body: {e}", self.what)))
    }
}

/// A failed request: an HTTP status to look at, or an already classified error.
#[derive(Debug)]
enum Failure {
    Status { status: StatusCode, scim_type: Option<String>, message: String, retry_after: Option<Duration> },
    Other(ProviderError),
}

impl Failure {
    fn is(&self, code: StatusCode) -> bool {
        matches!(self, Failure::Status { status, .. } if *status == code)
    }
    fn scim_type(&self) -> Option<&str> {
        match self {
            Failure::Status { scim_type, .. } => scim_type.as_deref(),
            Failure::Other(_) => None,
        }
    }
}

impl From<Failure> for ProviderError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Other(err) => err,
            Failure::Status { status, message, retry_after, .. } => classify_status(status, message, retry_after),
        }
    }
}

/// A string as a SCIM filter value: a JSON string literal (RFC 7644 §3.4.2.2),
/// so quotes and backslashes are escaped.
pub fn filter_value(value: &str) -> String {
    serde_json::Value::String(value.to_owned()).to_string()
}

/// A fresh random password of [`PASSWORD_LENGTH`] characters with at least
/// one lowercase and one uppercase letter, a digit and a symbol.
pub fn generate_password() -> String {
    let alphabet: Vec<u8> = [LOWER, UPPER, DIGITS, SYMBOLS].concat();
    let mut rng = rand::rng();
    loop {
        let password: Vec<u8> = (0..PASSWORD_LENGTH).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect();
        if [LOWER, UPPER, DIGITS, SYMBOLS].iter().all(|class| password.iter().any(|c| class.contains(c))) {
            return password.into_iter().map(char::from).collect();
        }
    }
}

fn external_id(account: &AccountRequest) -> String {
    ownership::uid_tag(&account.owner_uid)
}

fn key_marker(key_id: &str) -> String {
    format!("{KEY_ID_PREFIX}{key_id}")
}

/// The User's displayName keysmith wants: the description, else the name.
fn display_name(account: &AccountRequest) -> String {
    account.description.as_deref().map(str::trim).filter(|d| !d.is_empty()).unwrap_or(&account.name).to_owned()
}

fn is_owned(user: &User, account: &AccountRequest) -> bool {
    user.external_id.as_deref() == Some(external_id(account).as_str())
}

fn observed(user: &User, account: &AccountRequest) -> ObservedAccount {
    ObservedAccount {
        id: user.id.clone(),
        name: user.user_name.clone(),
        disabled: user.active == Some(false),
        owned: is_owned(user, account),
        drifted: user.display_name.as_deref() != Some(display_name(account).as_str()) || user.active == Some(false),
    }
}

fn foreign_user(user: &User, account: &AccountRequest) -> ProviderError {
    let has = match user.external_id.as_deref() {
        Some(id) => format!("externalId {id:?}"),
        None => "no externalId".to_owned(),
    };
    ProviderError::Conflict(format!(
        "SCIM user {:?} exists and was not created by keysmith for this IntegrationAccount: it has {has}, not {:?}",
        user.user_name,
        external_id(account)
    ))
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct User {
    id: String,
    #[serde(default)]
    user_name: String,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    active: Option<bool>,
    #[serde(default)]
    external_id: Option<String>,
    #[serde(default)]
    nick_name: Option<String>,
    #[serde(default)]
    meta: Option<Meta>,
}

impl User {
    fn version(&self) -> Option<&str> {
        self.meta.as_ref().and_then(|m| m.version.as_deref()).filter(|v| !v.is_empty())
    }
    /// The key id recorded in `nickName`, if keysmith set the password.
    fn key_id(&self) -> Option<&str> {
        self.nick_name.as_deref().and_then(|n| n.strip_prefix(KEY_ID_PREFIX)).filter(|id| !id.is_empty())
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Meta {
    #[serde(default)]
    version: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Group {
    id: String,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    members: Option<Vec<Member>>,
}

impl Group {
    fn has_member(&self, user_id: &str) -> bool {
        self.members.iter().flatten().any(|m| m.value.as_deref() == Some(user_id))
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Member {
    #[serde(default)]
    value: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListResponse<T> {
    #[serde(default)]
    total_results: Option<u64>,
    #[serde(default)]
    start_index: Option<u64>,
    #[serde(default = "Option::default", rename = "Resources", alias = "resources")]
    resources: Option<Vec<T>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ScimError {
    #[serde(default)]
    scim_type: Option<String>,
    #[serde(default)]
    detail: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ServiceProviderConfig {
    #[serde(default)]
    patch: Option<Supported>,
}

#[derive(Debug, Default, Deserialize)]
struct Supported {
    #[serde(default)]
    supported: Option<bool>,
}

/// The connect step: the admin token from its Secret, then the client.
pub async fn connect(
    spec: &crate::api::ScimSpec,
    connect: &super::Connect<'_>,
) -> Result<std::sync::Arc<dyn Provider>, ProviderError> {
    let (token, version) = connect.secret_value(&spec.token_secret_ref, "token").await?;
    let key = format!("scim/{}/{version}", connect.connection.uid);
    connect
        .cached(key, || async {
            Ok(std::sync::Arc::new(ScimProvider::new(spec.base_url.clone(), token, connect.http_client()?))
                as std::sync::Arc<dyn Provider>)
        })
        .await
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    #[test]
    fn filter_values_are_json_strings() {
        assert_eq!(filter_value("ci-bot"), r#""ci-bot""#);
        assert_eq!(filter_value(r#"o"brien\x"#), r#""o\"brien\\x""#);
    }

    #[test]
    fn passwords_are_long_mixed_and_fresh() {
        let a = generate_password();
        let b = generate_password();
        assert_ne!(a, b);
        for password in [a, b] {
            assert_eq!(password.len(), PASSWORD_LENGTH);
            let bytes = password.as_bytes();
            for class in [LOWER, UPPER, DIGITS, SYMBOLS] {
                assert!(bytes.iter().any(|c| class.contains(c)), "{class:?}");
            }
            assert!(bytes.iter().all(|c| [LOWER, UPPER, DIGITS, SYMBOLS].iter().any(|class| class.contains(c))));
        }
    }

    /// An HTTP server answering each connection with the next canned
    /// response, recording the requests it got.
    async fn canned(responses: Vec<String>) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}/v2", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            for response in responses {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut buf).await else { return };
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(str::to_owned))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length || n == 0 {
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                log.lock().expect("lock").push(String::from_utf8_lossy(&request).to_string());
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            }
        });
        (base, seen)
    }

    fn http(status: &str, headers: &[&str], body: &str) -> String {
        let mut response = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
        for h in headers {
            response.push_str(h);
            response.push_str("\r\n");
        }
        response.push_str("\r\n");
        response.push_str(body);
        response
    }

    fn account() -> AccountRequest {
        AccountRequest {
            name: "bot".to_owned(),
            namespace: "ns".to_owned(),
            account_name: "bot".to_owned(),
            owner_uid: "uid-1".to_owned(),
            description: None,
            owner: None,
            options: BTreeMap::new(),
        }
    }

    fn user_list(version: &str, nick: &str) -> String {
        json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
            "totalResults": 1,
            "Resources": [{"id": "u1", "userName": "bot", "displayName": "old", "externalId": "keysmith:uid-1",
                           "nickName": nick, "meta": {"version": version}}],
        })
        .to_string()
    }

    #[tokio::test]
    async fn throttling_is_transient_with_the_servers_delay() {
        let (base, _) = canned(vec![
            http("429 Too Many Requests", &["Retry-After: 7"], r#"{"status":"429","detail":"slow down"}"#),
            http("503 Service Unavailable", &["Retry-After: Thu, 01 Jan 2099 00:00:00 GMT"], ""),
            http("502 Bad Gateway", &["Content-Type: text/html"], "<html>oops</html>"),
        ])
        .await;
        let scim = ScimProvider::new(base, "secret-token".to_owned(), reqwest::Client::new());
        let err = scim.verify_connection().await.expect_err("429");
        assert_eq!(
            err,
            ProviderError::Transient {
                message: "SCIM GET /Users answered HTTP 429: slow down".to_owned(),
                retry_after: Some(Duration::from_secs(7)),
            }
        );
        let err = scim.verify_connection().await.expect_err("503");
        assert!(
            matches!(err, ProviderError::Transient { retry_after: Some(d), .. } if d > Duration::from_secs(86_400)),
            "{err:?}"
        );
        let err = scim.verify_connection().await.expect_err("502");
        assert!(matches!(err, ProviderError::Transient { retry_after: None, .. }), "{err:?}");
    }

    #[tokio::test]
    async fn a_timeout_is_transient() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}/v2", listener.local_addr().expect("addr"));
        // Accepts, never answers.
        let hold = tokio::spawn(async move {
            let _conn = listener.accept().await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let scim =
            ScimProvider::new(base, "t".to_owned(), reqwest::Client::new()).with_timeout(Duration::from_millis(300));
        let err = scim.verify_connection().await.expect_err("timeout");
        assert!(matches!(&err, ProviderError::Transient { message, .. } if message.contains("timed out")), "{err:?}");
        hold.abort();
    }

    #[tokio::test]
    async fn a_changed_user_is_read_again_and_the_patch_retried_once() {
        let (base, seen) = canned(vec![
            http("200 OK", &[], &user_list("W/\"1\"", "")),
            http("412 Precondition Failed", &[], r#"{"status":"412"}"#),
            http("200 OK", &[], &user_list("W/\"2\"", "")),
            http("204 No Content", &["ETag: W/\"3\""], ""),
        ])
        .await;
        let scim = ScimProvider::new(base, "secret-token".to_owned(), reqwest::Client::new());
        let key = scim.issue_key(&account(), &KeyRequest { key_id: "k1".to_owned(), lifetime: None }).await;
        let key = key.expect("issued after one retry");
        let requests = seen.lock().expect("lock").clone();
        assert_eq!(requests.len(), 4);
        assert!(requests[1].starts_with("PATCH /v2/Users/u1 "), "{}", requests[1]);
        assert!(requests[1].to_ascii_lowercase().contains("if-match: w/\"1\""), "{}", requests[1]);
        assert!(requests[3].to_ascii_lowercase().contains("if-match: w/\"2\""), "{}", requests[3]);
        assert!(requests[3].to_ascii_lowercase().contains("content-type: application/scim+json"));
        assert!(requests[3].contains("keysmith-key:k1"));
        assert!(requests[3].contains(&key.material.expose()[PASSWORD_KEY]));
        assert!(requests.iter().all(|r| r.contains("Bearer secret-token") || r.contains("bearer secret-token")));
    }

    #[tokio::test]
    async fn a_second_412_is_a_conflict_and_password_errors_leave_the_detail_out() {
        let (base, _) = canned(vec![
            http("200 OK", &[], &user_list("W/\"1\"", "")),
            http("412 Precondition Failed", &[], r#"{"status":"412"}"#),
            http("200 OK", &[], &user_list("W/\"2\"", "")),
            http("412 Precondition Failed", &[], r#"{"status":"412"}"#),
            http("200 OK", &[], &user_list("W/\"3\"", "")),
            http(
                "400 Bad Request",
                &[],
                r#"{"status":"400","scimType":"invalidValue","detail":"password 'x' is weak"}"#,
            ),
        ])
        .await;
        let scim = ScimProvider::new(base, "t".to_owned(), reqwest::Client::new());
        let request = KeyRequest { key_id: "k1".to_owned(), lifetime: None };
        let err = scim.issue_key(&account(), &request).await.expect_err("412 twice");
        assert!(matches!(err, ProviderError::Conflict(_)), "{err:?}");
        let err = scim.issue_key(&account(), &request).await.expect_err("400");
        assert_eq!(err, ProviderError::Invalid("SCIM PATCH /Users/u1 answered HTTP 400 (invalidValue)".to_owned()));
    }
}
