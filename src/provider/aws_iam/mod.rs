//! The `awsIam` provider: the target app is AWS IAM (or an IAM-compatible
//! endpoint), reached through the IAM Query API with an admin access key.
//!
//! - **account** → an IAM user named after the account, created under the
//!   connection's path (`/keysmith/` by default) and tagged
//!   `keysmith.dev/account-uid=<IntegrationAccount uid>` (the ownership tag),
//!   `keysmith.dev/integration-account=<namespace>/<name>`,
//!   `app.kubernetes.io/managed-by=keysmith`, and, for audits,
//!   `keysmith.dev/description` and `keysmith.dev/owner`. Tag values only
//!   allow letters, digits, spaces and `_ . : / = + - @`, at most 256 of them:
//!   anything else becomes `_`, and longer values are cut. keysmith only
//!   changes, disables or deletes a user under the connection's path that
//!   carries its own uid tag; a user of the same name without it, or
//!   elsewhere, is a [`ProviderError::Conflict`].
//! - **disabling** tags the user `keysmith.dev/disabled=true` and makes every
//!   access key `Inactive` (keys, not the user, are what authenticate API
//!   calls). Bringing a disabled account back ([`Provider::update_account`])
//!   makes its inactive keys `Active` again, then drops the tag.
//! - **role** → an attached managed policy; the role is the policy's ARN
//!   (`arn:aws:iam::aws:policy/ReadOnlyAccess`). Roles have no scope. Inline
//!   policies and group memberships are not roles: keysmith neither reads nor
//!   changes them (and AWS will not delete a user that still has them).
//! - **key** → an access key. AWS allows two per user, so
//!   [`Capabilities::max_keys_per_account`] is 2, and the controller revokes
//!   the retiring key before it issues a new one; issuing never deletes a key
//!   by itself, and a third key is [`ProviderError::LimitExceeded`]. A key's
//!   id is its access key id (AWS cannot name keys, so keysmith's own key id
//!   is not recorded in IAM). Revoking deletes the key.
//! - **verifying a key** calls STS `GetCallerIdentity` signed with the new
//!   key and checks that it answers with the account's user. New keys take a
//!   few seconds to be accepted everywhere (IAM is eventually consistent), so
//!   refusals are retried for up to 10 s before the key is declared not
//!   working ([`ProviderError::Transient`]: keysmith revokes it and tries a
//!   new one later).
//!
//! The output Secret holds `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION` and, only when the connection names its own endpoint,
//! `AWS_ENDPOINT_URL_IAM`: the names the AWS SDKs and CLI read.
//!
//! ## Endpoints and signing
//!
//! Requests are form-encoded `POST`s (`Action=...&Version=2010-05-08`)
//! signed with AWS Signature Version 4 (service `iam`). Without a custom
//! endpoint, IAM is reached at its global endpoint for the region's
//! partition (`https://iam.amazonaws.com`, signed for `us-east-1`; China and
//! GovCloud have their own), and STS at `https://sts.<region>.amazonaws.com`.
//! With a custom endpoint, both IAM and STS (service `sts`) are called there,
//! signed for the connection's region, as IAM-compatible services (moto,
//! LocalStack) expect.
//!
//! ## Errors
//!
//! Classified from the XML error `Code`: `NoSuchEntity` → `NotFound`;
//! `EntityAlreadyExists`, `DeleteConflict` → `Conflict`; `LimitExceeded` →
//! `LimitExceeded`; `InvalidInput`, `ValidationError`,
//! `MalformedPolicyDocument` (and other malformed-request codes) → `Invalid`;
//! `AccessDenied`, `InvalidClientTokenId`, `SignatureDoesNotMatch`,
//! `ExpiredToken` → `Unauthorized`; `Throttling`, `ServiceUnavailable`,
//! `ServiceFailure`, `ConcurrentModification`, any 5xx and timeouts →
//! `Transient`, with the `Retry-After` header's delay when there is one.
//! Errors carry the action, the code and AWS's message, never a secret
//! access key (AWS never echoes one; keysmith never sends one: it only signs
//! with it).
//!
//! ## The rights the admin credential needs
//!
//! The connection's access key (Secret keys `AWS_ACCESS_KEY_ID` and
//! `AWS_SECRET_ACCESS_KEY`) needs exactly this, for the default path
//! `/keysmith/` ([`ADMIN_USER_ACTIONS`] lists the first statement's actions):
//!
//! ```json
//! {
//!   "Version": "2012-10-17",
//!   "Statement": [
//!     {
//!       "Sid": "KeysmithManagesItsUsers",
//!       "Effect": "Allow",
//!       "Action": [
//!         "iam:GetUser", "iam:CreateUser", "iam:DeleteUser",
//!         "iam:TagUser", "iam:UntagUser", "iam:ListUserTags",
//!         "iam:ListAccessKeys", "iam:CreateAccessKey", "iam:UpdateAccessKey", "iam:DeleteAccessKey",
//!         "iam:GetAccessKeyLastUsed",
//!         "iam:ListAttachedUserPolicies", "iam:AttachUserPolicy", "iam:DetachUserPolicy"
//!       ],
//!       "Resource": "arn:aws:iam::*:user/keysmith/*"
//!     },
//!     {
//!       "Sid": "KeysmithSeesWhichUsersExist",
//!       "Effect": "Allow",
//!       "Action": "iam:GetUser",
//!       "Resource": "arn:aws:iam::*:user/*"
//!     }
//!   ]
//! }
//! ```
//!
//! `CreateUser` with tags needs `TagUser` too. The second statement is
//! there because IAM authorizes a call on a user that does not exist
//! against the user's ARN *without* a path, which the first statement does
//! not cover: without it, looking for a user keysmith is about to create
//! would be `AccessDenied`, not `NoSuchEntity`. It also lets keysmith check
//! its own credential (`GetUser` without a name) and see that a user of the
//! same name elsewhere is not its own (a user outside the connection's path
//! is never keysmith's, whatever its tags). `GetUser` reads a user's
//! metadata and tags, nothing more.
//!
//! Attaching policies lets the admin hand its users any managed policy,
//! including more than it holds itself: limit which, in IAM, with a
//! condition on the first statement such as
//! `"Condition": {"ArnLike": {"iam:PolicyARN": ["arn:aws:iam::*:policy/integrations/*"]}}`
//! (the connection's `policy.allowedRoles` limits it in keysmith).
//! `sts:GetCallerIdentity`, used to verify new keys, needs no permission.

use crate::ownership;
use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use hmac::{Hmac, KeyInit, Mac};
use jiff::Timestamp;
use reqwest::{header, StatusCode, Url};
use sha2::{Digest, Sha256};

use super::{
    http::{classify_status, retry_after, transport_error},
    AccountRequest, Capabilities, IssuedKey, KeyMaterial, KeyRequest, ObservedAccount, ObservedKey, Provider,
    ProviderError, RoleGrant,
};

/// The Secret key holding the access key id.
pub const ACCESS_KEY_ID_KEY: &str = "AWS_ACCESS_KEY_ID";
/// The Secret key holding the secret access key.
pub const SECRET_ACCESS_KEY_KEY: &str = "AWS_SECRET_ACCESS_KEY";
/// The Secret key holding the region.
pub const REGION_KEY: &str = "AWS_REGION";
/// The Secret key holding the custom IAM endpoint, when there is one.
pub const ENDPOINT_KEY: &str = "AWS_ENDPOINT_URL_IAM";

/// The IAM Query API version.
pub const IAM_VERSION: &str = "2010-05-08";
/// The STS Query API version.
pub const STS_VERSION: &str = "2011-06-15";

/// The IAM actions the admin credential needs on the users under the
/// connection's path (see the module docs for the whole policy).
pub const ADMIN_USER_ACTIONS: &[&str] = &[
    "iam:GetUser",
    "iam:CreateUser",
    "iam:DeleteUser",
    "iam:TagUser",
    "iam:UntagUser",
    "iam:ListUserTags",
    "iam:ListAccessKeys",
    "iam:CreateAccessKey",
    "iam:UpdateAccessKey",
    "iam:DeleteAccessKey",
    "iam:GetAccessKeyLastUsed",
    "iam:ListAttachedUserPolicies",
    "iam:AttachUserPolicy",
    "iam:DetachUserPolicy",
];

/// How late IAM may report an access key's use. AWS states no delay for
/// GetAccessKeyLastUsed; its access reports document up to four hours, and
/// keysmith assumes the same (early revocation never waits less).
pub const LAST_USE_LAG: Duration = Duration::from_secs(4 * 3600);

/// Access keys AWS allows per user.
const MAX_KEYS_PER_USER: u32 = 2;
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new key may take to be accepted.
const VERIFY_WINDOW: Duration = Duration::from_secs(10);
/// The first pause between verification attempts (it doubles, up to 2 s).
const VERIFY_FIRST_PAUSE: Duration = Duration::from_millis(200);
/// Items per page of IAM list calls (IAM's own maximum is 1000).
const DEFAULT_PAGE_SIZE: u32 = 100;
/// Pages read at most from one list call, against a server that never stops.
const MAX_PAGES: usize = 1000;
/// Longest IAM tag value, in characters.
const MAX_TAG_VALUE_LEN: usize = 256;
/// Longest piece of a non-XML error body quoted in an error.
const MAX_QUOTED_BODY: usize = 200;

/// One signed IAM or STS Query API endpoint, with one access key.
///
/// The provider's own transport, public so that tests (and tools) can make
/// the calls keysmith does not: `call` returns the response's XML.
#[derive(Clone)]
pub struct QueryClient {
    endpoint: String,
    region: String,
    service: &'static str,
    version: &'static str,
    access_key_id: String,
    secret_access_key: String,
    http: reqwest::Client,
    timeout: Duration,
}

impl fmt::Debug for QueryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueryClient")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("service", &self.service)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// A failed call: the AWS error code, when the server sent one, and the
/// classified error.
#[derive(Debug, Clone)]
struct Failure {
    code: Option<String>,
    error: ProviderError,
}

impl Failure {
    fn is(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }
}

impl From<Failure> for ProviderError {
    fn from(failure: Failure) -> Self {
        failure.error
    }
}

impl From<ProviderError> for Failure {
    fn from(error: ProviderError) -> Self {
        Failure { code: None, error }
    }
}

impl QueryClient {
    /// An IAM client (signing service `iam`, API version 2010-05-08) at
    /// `endpoint`, signing for `region`.
    pub fn iam(
        endpoint: impl Into<String>,
        region: impl Into<String>,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
        http: reqwest::Client,
    ) -> Self {
        Self {
            endpoint: endpoint.into(),
            region: region.into(),
            service: "iam",
            version: IAM_VERSION,
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            http,
            timeout: REQUEST_TIMEOUT,
        }
    }

    /// How long one call may take (default 30 s); a call that takes longer
    /// is [`ProviderError::Transient`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// An STS client (signing service `sts`, API version 2011-06-15).
    pub fn sts(
        endpoint: impl Into<String>,
        region: impl Into<String>,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
        http: reqwest::Client,
    ) -> Self {
        Self {
            service: "sts",
            version: STS_VERSION,
            ..Self::iam(endpoint, region, access_key_id, secret_access_key, http)
        }
    }

    /// Calls `action` with `params`; the response's XML on success. Errors
    /// are classified (module docs) and carry the action, AWS's error code
    /// and message.
    pub async fn call(&self, action: &str, params: &[(&str, &str)]) -> Result<String, ProviderError> {
        self.call_raw(action, params).await.map_err(ProviderError::from)
    }

    async fn call_raw(&self, action: &str, params: &[(&str, &str)]) -> Result<String, Failure> {
        let url = endpoint_url(&self.endpoint)?;
        let host = host_header(&url)?;
        let mut body = format!("Action={}&Version={}", form_encode(action), form_encode(self.version));
        for (name, value) in params {
            body.push('&');
            body.push_str(&form_encode(name));
            body.push('=');
            body.push_str(&form_encode(value));
        }
        let amz_date = Timestamp::now().strftime("%Y%m%dT%H%M%SZ").to_string();
        let content_type = "application/x-www-form-urlencoded; charset=utf-8";
        let authorization = sign(&SigningInput {
            method: "POST",
            canonical_uri: &canonical_uri(url.path()),
            canonical_query: "",
            headers: &[("content-type", content_type), ("host", &host), ("x-amz-date", &amz_date)],
            payload: body.as_bytes(),
            region: &self.region,
            service: self.service,
            amz_date: &amz_date,
            access_key_id: &self.access_key_id,
            secret_access_key: &self.secret_access_key,
        })?;
        let response = self
            .http
            .post(url)
            .timeout(self.timeout)
            .header(header::HOST, host)
            .header(header::CONTENT_TYPE, content_type)
            .header("x-amz-date", amz_date)
            .header(header::AUTHORIZATION, authorization)
            .body(body)
            .send()
            .await
            .map_err(|e| transport_failure(action, e))?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let text = response.text().await.map_err(|e| transport_failure(action, e))?;
        if status.is_success() {
            return Ok(text);
        }
        let (code, message) = error_code_and_message(&text);
        Err(classify(action, status, code, message, retry_after))
    }
}

/// AWS IAM as the target app, reached with an admin access key.
#[derive(Clone)]
pub struct AwsIamProvider {
    iam: QueryClient,
    custom_endpoint: Option<String>,
    region: String,
    path: String,
    http: reqwest::Client,
    page_size: u32,
    verify_window: Duration,
    /// The admin policy refused iam:GetAccessKeyLastUsed: last use is not
    /// reported (said once in the log), rather than every account failing.
    last_use_refused: Arc<AtomicBool>,
}

impl fmt::Debug for AwsIamProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsIamProvider")
            .field("endpoint", &self.iam.endpoint)
            .field("region", &self.region)
            .field("path", &self.path)
            .field("access_key_id", &self.iam.access_key_id)
            .finish_non_exhaustive()
    }
}

/// An IAM user as read from GetUser or CreateUser.
#[derive(Debug, Clone, PartialEq, Eq)]
struct User {
    arn: String,
    /// The user's path (`/` when IAM does not say, as for the root user).
    path: String,
}

/// An access key as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AccessKey {
    id: String,
    active: bool,
    created_at: Option<Timestamp>,
}

impl AwsIamProvider {
    /// A provider acting with the admin access key (`access_key_id`,
    /// `secret_access_key`). `endpoint` is an IAM-compatible endpoint URL, or
    /// empty for AWS's own (see the module docs); `region` signs requests
    /// (with a custom endpoint) and goes into issued Secrets; users are
    /// created under `path` (`/keysmith/`; empty means `/`).
    pub fn new(
        endpoint: String,
        region: String,
        path: String,
        access_key_id: String,
        secret_access_key: String,
        http: reqwest::Client,
    ) -> Self {
        let endpoint = endpoint.trim().to_owned();
        let custom_endpoint = (!endpoint.is_empty()).then(|| endpoint.clone());
        let (iam_endpoint, signing_region) = match &custom_endpoint {
            Some(custom) => (custom.clone(), region.clone()),
            None => {
                let partition = Partition::of(&region);
                (partition.iam_endpoint(), partition.iam_signing_region().to_owned())
            }
        };
        let path = if path.is_empty() { "/".to_owned() } else { path };
        Self {
            iam: QueryClient::iam(iam_endpoint, signing_region, access_key_id, secret_access_key, http.clone()),
            custom_endpoint,
            region,
            path,
            http,
            page_size: DEFAULT_PAGE_SIZE,
            verify_window: VERIFY_WINDOW,
            last_use_refused: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Items asked for per page of list calls (default 100; IAM allows 1 to 1000).
    pub fn with_page_size(mut self, page_size: u32) -> Self {
        self.page_size = page_size.clamp(1, 1000);
        self
    }

    /// How long a new key may take to be accepted before verification fails
    /// (default 10 s).
    pub fn with_verify_window(mut self, window: Duration) -> Self {
        self.verify_window = window;
        self
    }

    /// How long one call to IAM or STS may take (default 30 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.iam.timeout = timeout;
        self
    }

    /// The IAM endpoint requests go to.
    pub fn endpoint(&self) -> &str {
        &self.iam.endpoint
    }

    /// Where new keys are verified: STS at the custom endpoint, or AWS's
    /// regional STS endpoint.
    fn sts_endpoint(&self) -> String {
        match &self.custom_endpoint {
            Some(endpoint) => endpoint.clone(),
            None => format!("https://sts.{}.{}/", self.region, Partition::of(&self.region).dns_suffix()),
        }
    }

    /// The user, if it exists.
    async fn get_user(&self, name: &str) -> Result<Option<User>, ProviderError> {
        match self.iam.call_raw("GetUser", &[("UserName", name)]).await {
            Ok(xml) => Ok(Some(parse_user("GetUser", &xml)?)),
            Err(failure) if failure.is("NoSuchEntity") => Ok(None),
            Err(failure) => Err(failure.error),
        }
    }

    /// The user and its tags, if it exists.
    async fn get_user_with_tags(
        &self,
        account: &AccountRequest,
    ) -> Result<Option<(User, BTreeMap<String, String>)>, ProviderError> {
        let Some(user) = self.get_user(&account.name).await? else {
            return Ok(None);
        };
        // Outside the connection's path a user is never keysmith's, and the
        // admin may not read its tags.
        if user.path != self.path {
            return Ok(Some((user, BTreeMap::new())));
        }
        match self.user_tags(&account.name).await {
            Ok(tags) => Ok(Some((user, tags))),
            Err(failure) if failure.is("NoSuchEntity") => Ok(None),
            Err(failure) => Err(failure.error),
        }
    }

    /// The user with its tags, which must exist and be ours.
    async fn owned_user(&self, account: &AccountRequest) -> Result<(User, BTreeMap<String, String>), ProviderError> {
        match self.get_user_with_tags(account).await? {
            None => Err(ProviderError::NotFound(format!("IAM user {:?} does not exist", account.name))),
            Some((_, tags)) if !is_owned(&tags, account) => Err(foreign_user(account)),
            Some(found) => Ok(found),
        }
    }

    /// Whether the user is this IntegrationAccount's (`true`) or gone
    /// (`false`); someone else's is a conflict.
    async fn ours_or_gone(&self, account: &AccountRequest) -> Result<bool, ProviderError> {
        match self.owned_user(account).await {
            Ok(_) => Ok(true),
            Err(ProviderError::NotFound(_)) => Ok(false),
            Err(error) => Err(error),
        }
    }

    async fn user_tags(&self, name: &str) -> Result<BTreeMap<String, String>, Failure> {
        let pairs = self
            .list_all("ListUserTags", &[("UserName", name)], "Tags", |member| {
                Some((child_text(member, "Key")?.to_owned(), child_text(member, "Value").unwrap_or("").to_owned()))
            })
            .await?;
        Ok(pairs.into_iter().collect())
    }

    async fn access_keys(&self, name: &str) -> Result<Vec<AccessKey>, Failure> {
        self.list_all("ListAccessKeys", &[("UserName", name)], "AccessKeyMetadata", |member| {
            Some(AccessKey {
                id: child_text(member, "AccessKeyId")?.to_owned(),
                active: child_text(member, "Status") != Some("Inactive"),
                created_at: child_text(member, "CreateDate").and_then(parse_timestamp),
            })
        })
        .await
    }

    /// When IAM last saw the access key used (none if never).
    async fn last_used(&self, id: &str) -> Result<Option<Timestamp>, Failure> {
        let xml = self.iam.call_raw("GetAccessKeyLastUsed", &[("AccessKeyId", id)]).await?;
        let doc = parse_xml("GetAccessKeyLastUsed", &xml).map_err(Failure::from)?;
        Ok(find(doc.root(), "AccessKeyLastUsed")
            .and_then(|node| child_text(node, "LastUsedDate"))
            .and_then(parse_timestamp))
    }

    async fn attached_policies(&self, name: &str) -> Result<Vec<String>, Failure> {
        self.list_all("ListAttachedUserPolicies", &[("UserName", name)], "AttachedPolicies", |member| {
            child_text(member, "PolicyArn").map(str::to_owned)
        })
        .await
    }

    /// Every item of a paginated IAM list call: the `member`s of the
    /// `list` element of each page, following `Marker` while `IsTruncated`.
    async fn list_all<T>(
        &self,
        action: &str,
        params: &[(&str, &str)],
        list: &str,
        item: impl Fn(roxmltree::Node<'_, '_>) -> Option<T>,
    ) -> Result<Vec<T>, Failure> {
        let page_size = self.page_size.to_string();
        let mut items = Vec::new();
        let mut marker: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut page_params: Vec<(&str, &str)> = params.to_vec();
            page_params.push(("MaxItems", &page_size));
            if let Some(marker) = &marker {
                page_params.push(("Marker", marker));
            }
            let xml = self.iam.call_raw(action, &page_params).await?;
            let doc = parse_xml(action, &xml)?;
            let result = find(doc.root(), &format!("{action}Result")).unwrap_or(doc.root_element());
            if let Some(list) = find(result, list) {
                items.extend(list.children().filter(|n| n.has_tag_name("member")).filter_map(&item));
            }
            let truncated = child_text(result, "IsTruncated").is_some_and(|t| t.trim() == "true");
            if !truncated {
                return Ok(items);
            }
            match child_text(result, "Marker").map(str::trim).filter(|m| !m.is_empty()) {
                Some(next) => marker = Some(next.to_owned()),
                None => return Err(garbled(action, "a truncated page without a Marker").into()),
            }
        }
        Err(garbled(action, "more pages than keysmith reads").into())
    }

    /// Sets `tags` (key → value) on the user.
    async fn tag_user(&self, name: &str, tags: &BTreeMap<String, String>) -> Result<(), ProviderError> {
        if tags.is_empty() {
            return Ok(());
        }
        let mut params = vec![("UserName".to_owned(), name.to_owned())];
        params.extend(tag_params(tags));
        self.iam.call("TagUser", &as_refs(&params)).await.map(|_| ())
    }

    /// Removes the tags named `keys` from the user.
    async fn untag_user(&self, name: &str, keys: &[&str]) -> Result<(), ProviderError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut params = vec![("UserName".to_owned(), name.to_owned())];
        for (i, key) in keys.iter().enumerate() {
            params.push((format!("TagKeys.member.{}", i + 1), (*key).to_owned()));
        }
        self.iam.call("UntagUser", &as_refs(&params)).await.map(|_| ())
    }

    async fn set_key_status(&self, name: &str, key_id: &str, status: &str) -> Result<(), ProviderError> {
        let params = [("UserName", name), ("AccessKeyId", key_id), ("Status", status)];
        let result = self.iam.call_raw("UpdateAccessKey", &params).await;
        self.unless_gone(name, result).await.map(|_| ())
    }

    /// The result of a call on the user `name`; `None` if it failed because
    /// the user (or what the call named) does not exist. IAM authorizes a
    /// call on a user that does not exist against the user's ARN without a
    /// path, which a policy scoped to the connection's path does not cover:
    /// AWS answers `AccessDenied` rather than `NoSuchEntity`. GetUser, which
    /// the admin may call on any user, tells the two apart.
    async fn unless_gone<T>(&self, name: &str, result: Result<T, Failure>) -> Result<Option<T>, ProviderError> {
        match result {
            Ok(value) => Ok(Some(value)),
            Err(failure) if failure.is("NoSuchEntity") => Ok(None),
            Err(failure) if failure.is("AccessDenied") && self.get_user(name).await?.is_none() => Ok(None),
            Err(failure) => Err(failure.error),
        }
    }

    /// What goes into the output Secret for an access key.
    fn material(&self, access_key_id: &str, secret_access_key: &str) -> KeyMaterial {
        let mut values = BTreeMap::from([
            (ACCESS_KEY_ID_KEY.to_owned(), access_key_id.to_owned()),
            (SECRET_ACCESS_KEY_KEY.to_owned(), secret_access_key.to_owned()),
            (REGION_KEY.to_owned(), self.region.clone()),
        ]);
        if let Some(endpoint) = &self.custom_endpoint {
            values.insert(ENDPOINT_KEY.to_owned(), endpoint.clone());
        }
        KeyMaterial::new(values)
    }
}

#[async_trait]
impl Provider for AwsIamProvider {
    fn name(&self) -> &'static str {
        "awsIam"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            last_use_lag: (!self.last_use_refused.load(Ordering::Relaxed)).then_some(LAST_USE_LAG),
            max_keys_per_account: Some(MAX_KEYS_PER_USER),
            key_expiry: false,
            disable: true,
        }
    }

    async fn verify_connection(&self) -> Result<(), ProviderError> {
        // GetUser without a name answers with the caller's own user.
        let xml = self.iam.call("GetUser", &[]).await?;
        parse_user("GetUser", &xml).map(|_| ())
    }

    async fn observe_account(&self, account: &AccountRequest) -> Result<Option<ObservedAccount>, ProviderError> {
        Ok(self.get_user_with_tags(account).await?.map(|(user, tags)| observed_account(&user, &tags, account)))
    }

    async fn create_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        validate_path(&self.path)?;
        let tags = desired_tags(account);
        let mut params = vec![("UserName".to_owned(), account.name.clone()), ("Path".to_owned(), self.path.clone())];
        params.extend(tag_params(&tags));
        match self.iam.call_raw("CreateUser", &as_refs(&params)).await {
            Ok(xml) => Ok(observed_account(&parse_user("CreateUser", &xml)?, &tags, account)),
            Err(failure) if failure.is("EntityAlreadyExists") => match self.get_user_with_tags(account).await? {
                Some((user, tags)) if is_owned(&tags, account) => Ok(observed_account(&user, &tags, account)),
                Some(_) => Err(foreign_user(account)),
                // Deleted in between: the next reconcile creates it.
                None => Err(ProviderError::transient(format!(
                    "IAM user {:?} already existed and is now gone",
                    account.name
                ))),
            },
            Err(failure) => Err(failure.error),
        }
    }

    async fn update_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        let (user, tags) = self.owned_user(account).await?;
        let was_disabled = tags.contains_key(ownership::DISABLED);
        if was_disabled {
            // Keys first: until the tag goes, a crash leaves it disabled and
            // the next update finishes the job.
            for key in self.access_keys(&account.name).await? {
                if !key.active {
                    self.set_key_status(&account.name, &key.id, "Active").await?;
                }
            }
        }
        let desired = desired_tags(account);
        let changed: BTreeMap<String, String> =
            desired.iter().filter(|(k, v)| tags.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect();
        self.tag_user(&account.name, &changed).await?;
        let stale: Vec<&str> = [ownership::DESCRIPTION, ownership::OWNER, ownership::DISABLED]
            .into_iter()
            .filter(|key| tags.contains_key(*key) && !desired.contains_key(*key))
            .collect();
        self.untag_user(&account.name, &stale).await?;
        Ok(observed_account(&user, &desired, account))
    }

    async fn disable_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        match self.get_user_with_tags(account).await? {
            None => Ok(()),
            Some((_, tags)) if !is_owned(&tags, account) => {
                tracing::warn!(user = %account.name, "not disabling an IAM user keysmith does not own");
                Ok(())
            }
            Some(_) => {
                // Keys first, the tag last: the tag is what observing reads
                // as disabled, so a failure in between is tried again
                // rather than taken for done.
                let keys = self.access_keys(&account.name).await;
                let Some(keys) = self.unless_gone(&account.name, keys).await? else {
                    return Ok(());
                };
                for key in keys.iter().filter(|k| k.active) {
                    self.set_key_status(&account.name, &key.id, "Inactive").await?;
                }
                let disabled = BTreeMap::from([(ownership::DISABLED.to_owned(), "true".to_owned())]);
                match self.tag_user(&account.name, &disabled).await {
                    Err(ProviderError::NotFound(_)) => Ok(()),
                    other => other,
                }
            }
        }
    }

    async fn delete_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        match self.get_user_with_tags(account).await? {
            None => return Ok(()),
            Some((_, tags)) if !is_owned(&tags, account) => {
                tracing::warn!(user = %account.name, "not deleting an IAM user keysmith does not own");
                return Ok(());
            }
            Some(_) => {}
        }
        // Keys first, so nothing can use the user while the rest goes.
        let keys = self.access_keys(&account.name).await;
        let Some(keys) = self.unless_gone(&account.name, keys).await? else {
            return Ok(());
        };
        for key in keys {
            self.revoke_key(account, &key.id).await?;
        }
        let policies = self.attached_policies(&account.name).await;
        let Some(policies) = self.unless_gone(&account.name, policies).await? else {
            return Ok(());
        };
        for policy in policies {
            self.revoke_role(account, &RoleGrant { role: policy, scope: None }).await?;
        }
        match self.iam.call_raw("DeleteUser", &[("UserName", &account.name)]).await {
            Err(failure) if failure.is("DeleteConflict") => Err(ProviderError::Conflict(format!(
                "IAM user {:?} still has something keysmith does not manage (inline policies, group \
                 memberships, a login profile, MFA devices, certificates or SSH keys): remove it; {}",
                account.name, failure.error
            ))),
            result => self.unless_gone(&account.name, result).await.map(|_| ()),
        }
    }

    async fn list_roles(&self, account: &AccountRequest) -> Result<Vec<RoleGrant>, ProviderError> {
        let policies = self.attached_policies(&account.name).await;
        let policies = self.unless_gone(&account.name, policies).await?.unwrap_or_default();
        let mut grants: Vec<RoleGrant> = policies.into_iter().map(|role| RoleGrant { role, scope: None }).collect();
        grants.sort();
        grants.dedup();
        Ok(grants)
    }

    async fn grant_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        validate_grant(grant)?;
        // IAM names the user, not its owner: attach only to a user that
        // carries this very IntegrationAccount's tag.
        self.owned_user(account).await?;
        let params = [("UserName", account.name.as_str()), ("PolicyArn", grant.role.as_str())];
        self.iam.call("AttachUserPolicy", &params).await.map(|_| ())
    }

    async fn revoke_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        if !self.ours_or_gone(account).await? {
            return Ok(());
        }
        let params = [("UserName", account.name.as_str()), ("PolicyArn", grant.role.as_str())];
        // Not attached, or no such user or policy: not granted.
        let result = self.iam.call_raw("DetachUserPolicy", &params).await;
        self.unless_gone(&account.name, result).await.map(|_| ())
    }

    async fn issue_key(&self, account: &AccountRequest, _request: &KeyRequest) -> Result<IssuedKey, ProviderError> {
        self.owned_user(account).await?;
        let xml = match self.iam.call_raw("CreateAccessKey", &[("UserName", &account.name)]).await {
            Ok(xml) => xml,
            Err(failure) if failure.is("LimitExceeded") => {
                return Err(ProviderError::LimitExceeded(format!(
                    "IAM user {:?} already holds {MAX_KEYS_PER_USER} access keys, AWS's limit: one must be \
                     revoked before another is issued ({})",
                    account.name, failure.error
                )))
            }
            Err(failure) => return Err(failure.error),
        };
        // The response holds the secret: parse errors never quote it.
        let doc = parse_xml("CreateAccessKey", &xml)?;
        let key = find(doc.root(), "AccessKey").ok_or_else(|| garbled("CreateAccessKey", "no AccessKey"))?;
        let id = child_text(key, "AccessKeyId").ok_or_else(|| garbled("CreateAccessKey", "no AccessKeyId"))?;
        let secret =
            child_text(key, "SecretAccessKey").ok_or_else(|| garbled("CreateAccessKey", "no SecretAccessKey"))?;
        Ok(IssuedKey { id: id.to_owned(), expires_at: None, material: self.material(id, secret) })
    }

    async fn list_keys(&self, account: &AccountRequest) -> Result<Vec<ObservedKey>, ProviderError> {
        let keys = self.access_keys(&account.name).await;
        let keys = self.unless_gone(&account.name, keys).await?.unwrap_or_default();
        let mut observed = Vec::with_capacity(keys.len());
        for key in keys {
            let last_used = if self.last_use_refused.load(Ordering::Relaxed) {
                None
            } else {
                match self.last_used(&key.id).await {
                    Ok(last_used) => last_used,
                    // Deleted in between.
                    Err(failure) if failure.is("NoSuchEntity") => continue,
                    Err(Failure { error: ProviderError::Unauthorized(message), .. }) => {
                        if !self.last_use_refused.swap(true, Ordering::Relaxed) {
                            tracing::warn!(
                                %message,
                                "the admin policy refuses iam:GetAccessKeyLastUsed: keysmith cannot tell when keys \
                                 were last used (dormancy is not assessed) until it is allowed and keysmith restarts"
                            );
                        }
                        None
                    }
                    Err(failure) => return Err(failure.error),
                }
            };
            observed.push(ObservedKey { id: key.id, created_at: key.created_at, last_used });
        }
        let mut keys = observed;
        keys.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
        Ok(keys)
    }

    async fn revoke_key(&self, account: &AccountRequest, key_id: &str) -> Result<(), ProviderError> {
        // Access key ids are unique across AWS: deleting by the user's name
        // cannot hit another user's key. The user must be ours, though: a
        // user of this name made for another IntegrationAccount keeps its keys.
        if !self.ours_or_gone(account).await? {
            return Ok(());
        }
        let result =
            self.iam.call_raw("DeleteAccessKey", &[("UserName", &account.name), ("AccessKeyId", key_id)]).await;
        self.unless_gone(&account.name, result).await.map(|_| ())
    }

    async fn verify_key(&self, account: &AccountRequest, key: &IssuedKey) -> Result<(), ProviderError> {
        let values = key.material.expose();
        let (Some(access_key_id), Some(secret)) = (values.get(ACCESS_KEY_ID_KEY), values.get(SECRET_ACCESS_KEY_KEY))
        else {
            return Err(ProviderError::Invalid(format!(
                "the key has no {ACCESS_KEY_ID_KEY} or no {SECRET_ACCESS_KEY_KEY}"
            )));
        };
        let sts = QueryClient::sts(self.sts_endpoint(), &self.region, access_key_id, secret, self.http.clone())
            .with_timeout(self.iam.timeout);
        let deadline = Instant::now() + self.verify_window;
        let mut pause = VERIFY_FIRST_PAUSE;
        loop {
            let refused = match sts.call_raw("GetCallerIdentity", &[]).await {
                Ok(xml) => {
                    let doc = parse_xml("GetCallerIdentity", &xml)?;
                    let arn = find(doc.root(), "Arn").and_then(|n| n.text()).unwrap_or_default().trim();
                    return if is_user_arn(arn, &account.name) {
                        Ok(())
                    } else {
                        Err(ProviderError::Conflict(format!(
                            "access key {access_key_id} authenticates as {arn:?}, not as IAM user {:?}",
                            account.name
                        )))
                    };
                }
                // Not accepted (yet), or STS is unwell: both pass.
                Err(Failure { error: ProviderError::Unauthorized(message), .. }) => message,
                Err(Failure { error: ProviderError::Transient { message, .. }, .. }) => message,
                Err(failure) => return Err(failure.error),
            };
            if Instant::now() + pause > deadline {
                return Err(ProviderError::transient(format!(
                    "the new access key {access_key_id} was not accepted within {}s: {refused}",
                    self.verify_window.as_secs()
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}

/// The AWS partition a region is in, for AWS's own endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Partition {
    Aws,
    China,
    GovCloud,
}

impl Partition {
    fn of(region: &str) -> Self {
        if region.starts_with("cn-") {
            Partition::China
        } else if region.starts_with("us-gov-") {
            Partition::GovCloud
        } else {
            Partition::Aws
        }
    }

    fn dns_suffix(self) -> &'static str {
        match self {
            Partition::China => "amazonaws.com.cn",
            Partition::Aws | Partition::GovCloud => "amazonaws.com",
        }
    }

    /// IAM is global: one endpoint per partition, signed for one region.
    fn iam_endpoint(self) -> String {
        match self {
            Partition::Aws => "https://iam.amazonaws.com/".to_owned(),
            Partition::China => "https://iam.cn-north-1.amazonaws.com.cn/".to_owned(),
            Partition::GovCloud => "https://iam.us-gov.amazonaws.com/".to_owned(),
        }
    }

    fn iam_signing_region(self) -> &'static str {
        match self {
            Partition::Aws => "us-east-1",
            Partition::China => "cn-north-1",
            Partition::GovCloud => "us-gov-west-1",
        }
    }
}

/// What SigV4 signs.
struct SigningInput<'a> {
    method: &'a str,
    /// The path, already in canonical (URI-encoded) form.
    canonical_uri: &'a str,
    canonical_query: &'a str,
    /// Lowercase names; signed in name order.
    headers: &'a [(&'a str, &'a str)],
    payload: &'a [u8],
    region: &'a str,
    service: &'a str,
    /// `YYYYMMDDTHHMMSSZ`.
    amz_date: &'a str,
    access_key_id: &'a str,
    secret_access_key: &'a str,
}

/// The canonical request of AWS Signature Version 4.
fn canonical_request(input: &SigningInput<'_>) -> (String, String) {
    let mut headers: Vec<(String, String)> = input
        .headers
        .iter()
        .map(|(name, value)| (name.to_ascii_lowercase(), value.split_whitespace().collect::<Vec<_>>().join(" ")))
        .collect();
    headers.sort();
    let canonical_headers: String = headers.iter().map(|(name, value)| format!("{name}:{value}\n")).collect();
    let signed_headers = headers.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(";");
    let request = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        input.method,
        input.canonical_uri,
        input.canonical_query,
        canonical_headers,
        signed_headers,
        hex(&Sha256::digest(input.payload))
    );
    (request, signed_headers)
}

/// The `Authorization` header of AWS Signature Version 4.
fn sign(input: &SigningInput<'_>) -> Result<String, ProviderError> {
    let (request, signed_headers) = canonical_request(input);
    let date = input.amz_date.get(..8).ok_or_else(|| ProviderError::Invalid("a malformed signing date".to_owned()))?;
    let scope = format!("{date}/{}/{}/aws4_request", input.region, input.service);
    let string_to_sign =
        format!("AWS4-HMAC-SHA256\n{}\n{scope}\n{}", input.amz_date, hex(&Sha256::digest(request.as_bytes())));
    let key = signing_key(input.secret_access_key, date, input.region, input.service)?;
    let signature = hex(&hmac_sha256(&key, string_to_sign.as_bytes())?);
    Ok(format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
        input.access_key_id
    ))
}

fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> Result<Vec<u8>, ProviderError> {
    let k_date = hmac_sha256(format!("AWS4{secret}").as_bytes(), date.as_bytes())?;
    let k_region = hmac_sha256(&k_date, region.as_bytes())?;
    let k_service = hmac_sha256(&k_region, service.as_bytes())?;
    hmac_sha256(&k_service, b"aws4_request")
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Result<Vec<u8>, ProviderError> {
    // HMAC takes keys of any length; the error is never seen.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .map_err(|_| ProviderError::Invalid("an unusable signing key".to_owned()))?;
    mac.update(data);
    Ok(mac.finalize().into_bytes().to_vec())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Percent-encodes everything but AWS's unreserved characters
/// (`A-Z a-z 0-9 - _ . ~`, RFC 3986's), and `/` unless `encode_slash`.
fn uri_encode(value: &str, encode_slash: bool) -> String {
    if encode_slash {
        super::http::percent_encode(value)
    } else {
        value.split('/').map(super::http::percent_encode).collect::<Vec<_>>().join("/")
    }
}

/// Encodes a form field as the AWS SDKs do (Python's `quote_plus`): like
/// [`uri_encode`], but a space is `+`. The signature covers the body's hash,
/// and IAM-compatible servers that re-encode the parsed form before checking
/// it (moto does) only agree on this form.
fn form_encode(value: &str) -> String {
    value.split(' ').map(|part| uri_encode(part, true)).collect::<Vec<_>>().join("+")
}

/// The canonical URI of a (percent-encoded) path: encoded once more, as
/// every service but S3 expects.
fn canonical_uri(path: &str) -> String {
    if path.is_empty() {
        "/".to_owned()
    } else {
        uri_encode(path, false)
    }
}

fn endpoint_url(endpoint: &str) -> Result<Url, ProviderError> {
    let url = Url::parse(endpoint).map_err(|e| ProviderError::Invalid(format!("endpoint {endpoint:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ProviderError::Invalid(format!("endpoint {endpoint:?} is not an http(s) URL")));
    }
    if !url.username().is_empty() || url.password().is_some() || url.query().is_some() || url.fragment().is_some() {
        return Err(ProviderError::Invalid(format!(
            "endpoint {:?} must not carry credentials, a query or a fragment",
            url.host_str().unwrap_or_default()
        )));
    }
    Ok(url)
}

/// The `Host` header a request to `url` sends, and signs.
fn host_header(url: &Url) -> Result<String, ProviderError> {
    let host = url.host_str().ok_or_else(|| ProviderError::Invalid(format!("endpoint {url} has no host")))?;
    Ok(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    })
}

/// Classifies a failed call by its AWS error code, else its HTTP status.
fn classify(
    action: &str,
    status: StatusCode,
    code: Option<String>,
    message: String,
    retry_after: Option<Duration>,
) -> Failure {
    let detail = match &code {
        Some(code) => format!("{action}: {code}: {message} (HTTP {})", status.as_u16()),
        None => format!("{action}: {message} (HTTP {})", status.as_u16()),
    };
    let error = match code.as_deref() {
        Some("NoSuchEntity") => ProviderError::NotFound(detail),
        Some("EntityAlreadyExists" | "DeleteConflict") => ProviderError::Conflict(detail),
        Some("LimitExceeded" | "LimitExceededException") => ProviderError::LimitExceeded(detail),
        Some(
            "InvalidInput"
            | "ValidationError"
            | "MalformedPolicyDocument"
            | "InvalidParameterValue"
            | "InvalidParameterCombination"
            | "MissingParameter"
            | "MissingAction"
            | "InvalidAction"
            | "InvalidQueryParameter"
            | "MalformedQueryString"
            | "IncompleteSignature"
            | "UnmodifiableEntity"
            | "PolicyNotAttachable",
        ) => ProviderError::Invalid(detail),
        Some(
            "AccessDenied"
            | "AccessDeniedException"
            | "InvalidClientTokenId"
            | "SignatureDoesNotMatch"
            | "UnrecognizedClientException"
            | "ExpiredToken"
            | "InvalidAccessKeyId"
            | "MissingAuthenticationToken"
            | "NotAuthorized"
            | "OptInRequired",
        ) => ProviderError::Unauthorized(detail),
        Some(
            "Throttling"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "TooManyRequestsException"
            | "ServiceUnavailable"
            | "ServiceUnavailableException"
            | "ServiceFailure"
            | "InternalFailure"
            | "InternalError"
            | "ConcurrentModification"
            | "EntityTemporarilyUnmodifiable"
            | "RequestExpired",
        ) => ProviderError::Transient { message: detail, retry_after },
        _ => classify_status(status, detail, retry_after),
    };
    Failure { code, error }
}

/// A request that got no HTTP answer.
fn transport_failure(action: &str, error: reqwest::Error) -> Failure {
    Failure { code: None, error: transport_error(action, error) }
}

/// The `Code` and `Message` of an AWS XML error body; for anything else,
/// the start of the body.
fn error_code_and_message(body: &str) -> (Option<String>, String) {
    if let Ok(doc) = roxmltree::Document::parse(body) {
        let error = find(doc.root(), "Error").unwrap_or(doc.root_element());
        let code = child_text(error, "Code").map(|c| c.trim().to_owned()).filter(|c| !c.is_empty());
        let message = child_text(error, "Message").map(|m| m.trim().to_owned()).unwrap_or_default();
        if code.is_some() || !message.is_empty() {
            return (code, message);
        }
    }
    let quoted: String = body.trim().chars().take(MAX_QUOTED_BODY).collect();
    (None, if quoted.is_empty() { "no details".to_owned() } else { quoted })
}

fn parse_xml<'a>(action: &str, xml: &'a str) -> Result<roxmltree::Document<'a>, ProviderError> {
    // The parser's error names a position, never the text.
    roxmltree::Document::parse(xml).map_err(|e| garbled(action, &format!("not XML: {e}")))
}

fn garbled(action: &str, what: &str) -> ProviderError {
    ProviderError::transient(format!("{action}: the response is garbled: {what}"))
}

/// The first element named `name` at or under `node`.
fn find<'a, 'input>(node: roxmltree::Node<'a, 'input>, name: &str) -> Option<roxmltree::Node<'a, 'input>> {
    node.descendants().find(|n| n.is_element() && n.tag_name().name() == name)
}

/// The text of `node`'s child element named `name`.
fn child_text<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.children().find(|n| n.is_element() && n.tag_name().name() == name).map(|n| n.text().unwrap_or(""))
}

fn parse_user(action: &str, xml: &str) -> Result<User, ProviderError> {
    let doc = parse_xml(action, xml)?;
    let user = find(doc.root(), "User").ok_or_else(|| garbled(action, "no User"))?;
    let arn = child_text(user, "Arn").ok_or_else(|| garbled(action, "no Arn"))?;
    let path = child_text(user, "Path").map(str::trim).filter(|p| !p.is_empty()).unwrap_or("/");
    Ok(User { arn: arn.trim().to_owned(), path: path.to_owned() })
}
/// An IAM timestamp (ISO 8601 with an offset or `Z`).
fn parse_timestamp(value: &str) -> Option<Timestamp> {
    value.trim().parse::<Timestamp>().ok()
}

/// Whether `arn` is the ARN of the IAM user `name` (under any path).
fn is_user_arn(arn: &str, name: &str) -> bool {
    let Some((_, resource)) = arn.split_once(":user/") else {
        return false;
    };
    arn.starts_with("arn:") && arn.contains(":iam::") && resource.rsplit('/').next() == Some(name)
}

/// IAM's rule for paths: `/`, or `/` + printable ASCII + `/`, at most 512.
fn validate_path(path: &str) -> Result<(), ProviderError> {
    let valid = path.len() <= 512
        && path.starts_with('/')
        && path.ends_with('/')
        && path.bytes().all(|b| (0x21..=0x7e).contains(&b));
    if valid {
        Ok(())
    } else {
        Err(ProviderError::Invalid(format!("{path:?} is not an IAM path (it must start and end with \"/\")")))
    }
}

/// A role must be a managed policy ARN, without a scope.
fn validate_grant(grant: &RoleGrant) -> Result<(), ProviderError> {
    if grant.scope.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ProviderError::Invalid(format!(
            "IAM managed policies have no scope, but {grant} names one: leave the RoleBinding's scope empty"
        )));
    }
    let is_policy_arn = grant.role.starts_with("arn:")
        && grant.role.split(':').nth(2) == Some("iam")
        && grant.role.split(':').nth(5).is_some_and(|r| r.starts_with("policy/"));
    if is_policy_arn {
        Ok(())
    } else {
        Err(ProviderError::Invalid(format!(
            "{:?} is not a managed policy ARN (arn:aws:iam::<account>:policy/<name>)",
            grant.role
        )))
    }
}

fn foreign_user(account: &AccountRequest) -> ProviderError {
    ProviderError::Conflict(format!(
        "IAM user {:?} exists and was not created by keysmith for this IntegrationAccount",
        account.name
    ))
}

/// A value as IAM accepts it in a tag: letters, digits, spaces and
/// `_ . : / = + - @`, at most 256 characters; anything else becomes `_`.
pub fn tag_value(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c) { c } else { '_' })
        .take(MAX_TAG_VALUE_LEN)
        .collect()
}

/// The tags keysmith keeps on the user (disabled aside).
fn desired_tags(account: &AccountRequest) -> BTreeMap<String, String> {
    let mut tags = BTreeMap::from([
        (ownership::MANAGED_BY_KEY.to_owned(), ownership::MANAGED_BY.to_owned()),
        (ownership::ACCOUNT_UID.to_owned(), tag_value(&account.owner_uid)),
        (
            ownership::INTEGRATION_ACCOUNT.to_owned(),
            tag_value(&ownership::account_reference(&account.namespace, &account.account_name)),
        ),
    ]);
    if let Some(description) = account.description.as_deref().filter(|d| !d.is_empty()) {
        tags.insert(ownership::DESCRIPTION.to_owned(), tag_value(description));
    }
    if let Some(owner) = account.owner.as_deref().filter(|o| !o.is_empty()) {
        tags.insert(ownership::OWNER.to_owned(), tag_value(owner));
    }
    tags
}

fn is_owned(tags: &BTreeMap<String, String>, account: &AccountRequest) -> bool {
    !account.owner_uid.is_empty() && tags.get(ownership::ACCOUNT_UID) == Some(&tag_value(&account.owner_uid))
}

fn observed_account(user: &User, tags: &BTreeMap<String, String>, account: &AccountRequest) -> ObservedAccount {
    let desired = desired_tags(account);
    let drifted = !desired.iter().all(|(k, v)| tags.get(k) == Some(v))
        || [ownership::DESCRIPTION, ownership::OWNER]
            .iter()
            .any(|k| tags.contains_key(*k) && !desired.contains_key(*k));
    ObservedAccount {
        id: user.arn.clone(),
        name: account.name.clone(),
        disabled: tags.get(ownership::DISABLED).is_some_and(|v| v == "true"),
        owned: is_owned(tags, account),
        drifted,
    }
}

/// `Tags.member.N.Key` / `.Value` parameters.
fn tag_params(tags: &BTreeMap<String, String>) -> Vec<(String, String)> {
    tags.iter()
        .enumerate()
        .flat_map(|(i, (key, value))| {
            [
                (format!("Tags.member.{}.Key", i + 1), key.clone()),
                (format!("Tags.member.{}.Value", i + 1), value.clone()),
            ]
        })
        .collect()
}

fn as_refs(params: &[(String, String)]) -> Vec<(&str, &str)> {
    params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// The connect step: the access key from its Secret, then the client.
pub async fn connect(
    spec: &crate::api::AwsIamSpec,
    connect: &super::Connect<'_>,
) -> Result<std::sync::Arc<dyn Provider>, ProviderError> {
    let ([id, secret], version) =
        connect.secret_values(&spec.credentials_secret_ref, [ACCESS_KEY_ID_KEY, SECRET_ACCESS_KEY_KEY]).await?;
    let key = format!("awsIam/{}/{version}", connect.connection.uid);
    connect
        .cached(key, || async {
            Ok(std::sync::Arc::new(AwsIamProvider::new(
                spec.endpoint.clone().unwrap_or_default(),
                spec.region.clone(),
                spec.path.clone(),
                id,
                secret,
                connect.http_client()?,
            )) as std::sync::Arc<dyn Provider>)
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's own worked example of Signature Version 4: IAM ListUsers,
    /// 2015-08-30, with the documentation's example key.
    #[test]
    fn signs_as_the_aws_documentation_does() {
        let input = SigningInput {
            method: "GET",
            canonical_uri: "/",
            canonical_query: "Action=ListUsers&Version=2010-05-08",
            headers: &[
                ("content-type", "application/x-www-form-urlencoded; charset=utf-8"),
                ("host", "iam.amazonaws.com"),
                ("x-amz-date", "20150830T123600Z"),
            ],
            payload: b"",
            region: "us-east-1",
            service: "iam",
            amz_date: "20150830T123600Z",
            access_key_id: "AKIDEXAMPLE",
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        };
        let (request, signed) = canonical_request(&input);
        assert_eq!(signed, "content-type;host;x-amz-date");
        assert_eq!(
            hex(&Sha256::digest(request.as_bytes())),
            "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59"
        );
        let key = signing_key(input.secret_access_key, "20150830", "us-east-1", "iam").expect("key");
        assert_eq!(hex(&key), "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9");
        assert_eq!(
            sign(&input).expect("signs"),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, \
             Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
    }

    #[test]
    fn encodes_as_sigv4_wants() {
        assert_eq!(uri_encode("a b/c~d*é", true), "a%20b%2Fc~d%2A%C3%A9");
        assert_eq!(uri_encode("/keysmith/", true), "%2Fkeysmith%2F");
        assert_eq!(form_encode("Billing sync: a+b /x~"), "Billing+sync%3A+a%2Bb+%2Fx~");
        assert_eq!(canonical_uri("/a%20b/"), "/a%2520b/");
        assert_eq!(canonical_uri(""), "/");
    }

    #[test]
    fn errors_are_classified_by_code_then_status() {
        let xml = |code: &str| {
            format!(
                "<ErrorResponse xmlns=\"https://iam.amazonaws.com/doc/2010-05-08/\"><Error><Type>Sender</Type>\
                 <Code>{code}</Code><Message>it went wrong</Message></Error><RequestId>r</RequestId></ErrorResponse>"
            )
        };
        let run = |status: u16, body: &str| {
            let (code, message) = error_code_and_message(body);
            classify("Act", StatusCode::from_u16(status).expect("status"), code, message, None).error
        };
        assert!(
            matches!(run(404, &xml("NoSuchEntity")), ProviderError::NotFound(m) if m == "Act: NoSuchEntity: it went wrong (HTTP 404)")
        );
        assert!(matches!(run(409, &xml("EntityAlreadyExists")), ProviderError::Conflict(_)));
        assert!(matches!(run(409, &xml("LimitExceeded")), ProviderError::LimitExceeded(_)));
        assert!(matches!(run(400, &xml("MalformedPolicyDocument")), ProviderError::Invalid(_)));
        assert!(matches!(run(400, &xml("ValidationError")), ProviderError::Invalid(_)));
        assert!(matches!(run(403, &xml("SignatureDoesNotMatch")), ProviderError::Unauthorized(_)));
        assert!(matches!(run(403, &xml("InvalidClientTokenId")), ProviderError::Unauthorized(_)));
        assert!(matches!(run(400, &xml("Throttling")), ProviderError::Transient { .. }));
        assert!(matches!(run(503, "<html>busy</html>"), ProviderError::Transient { .. }));
        assert!(matches!(run(403, "nope"), ProviderError::Unauthorized(m) if m == "Act: nope (HTTP 403)"));
        assert!(matches!(run(400, ""), ProviderError::Invalid(_)));
        // moto's older error shape.
        let old = "<Response><Errors><Error><Code>AccessDenied</Code><Message>no</Message></Error></Errors></Response>";
        assert!(matches!(run(403, old), ProviderError::Unauthorized(_)));
    }

    #[test]
    fn tags_are_what_iam_accepts() {
        assert_eq!(tag_value("Billing sync (payments team)!"), "Billing sync _payments team__");
        assert_eq!(tag_value("team-payments@example.com"), "team-payments@example.com");
        assert_eq!(tag_value(&"x".repeat(300)).chars().count(), MAX_TAG_VALUE_LEN);
        let params = tag_params(&BTreeMap::from([("a".to_owned(), "1".to_owned()), ("b".to_owned(), "2".to_owned())]));
        assert_eq!(
            params,
            [
                ("Tags.member.1.Key", "a"),
                ("Tags.member.1.Value", "1"),
                ("Tags.member.2.Key", "b"),
                ("Tags.member.2.Value", "2")
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
    }

    #[test]
    fn grants_and_arns() {
        let grant =
            |role: &str, scope: Option<&str>| RoleGrant { role: role.to_owned(), scope: scope.map(str::to_owned) };
        assert!(validate_grant(&grant("arn:aws:iam::aws:policy/ReadOnlyAccess", None)).is_ok());
        assert!(validate_grant(&grant("arn:aws:iam::123456789012:policy/team/x", Some(""))).is_ok());
        assert!(validate_grant(&grant("arn:aws:iam::aws:policy/ReadOnlyAccess", Some("ns"))).is_err());
        assert!(validate_grant(&grant("ReadOnlyAccess", None)).is_err());
        assert!(validate_grant(&grant("arn:aws:iam::123456789012:role/x", None)).is_err());
        assert!(is_user_arn("arn:aws:iam::123456789012:user/keysmith/ci", "ci"));
        assert!(is_user_arn("arn:aws:iam::123456789012:user/ci", "ci"));
        assert!(!is_user_arn("arn:aws:iam::123456789012:user/keysmith/ci2", "ci"));
        assert!(!is_user_arn("arn:aws:sts::123456789012:assumed-role/r/ci", "ci"));
        assert!(validate_path("/keysmith/").is_ok());
        assert!(validate_path("/").is_ok());
        assert!(validate_path("keysmith").is_err());
    }

    #[test]
    fn default_endpoints_follow_the_partition() {
        let provider = |endpoint: &str, region: &str| {
            AwsIamProvider::new(
                endpoint.to_owned(),
                region.to_owned(),
                "/keysmith/".to_owned(),
                "AKID".to_owned(),
                "secret".to_owned(),
                reqwest::Client::new(),
            )
        };
        let aws = provider("", "eu-west-1");
        assert_eq!(aws.endpoint(), "https://iam.amazonaws.com/");
        assert_eq!(aws.iam.region, "us-east-1");
        assert_eq!(aws.sts_endpoint(), "https://sts.eu-west-1.amazonaws.com/");
        assert!(!aws.material("AKID", "s").expose().contains_key(ENDPOINT_KEY));
        let china = provider("", "cn-northwest-1");
        assert_eq!(china.endpoint(), "https://iam.cn-north-1.amazonaws.com.cn/");
        assert_eq!(china.sts_endpoint(), "https://sts.cn-northwest-1.amazonaws.com.cn/");
        let custom = provider("http://127.0.0.1:5000", "eu-west-1");
        assert_eq!(custom.iam.region, "eu-west-1");
        assert_eq!(custom.sts_endpoint(), "http://127.0.0.1:5000");
        let material = custom.material("AKID", "s");
        assert_eq!(material.expose().get(ENDPOINT_KEY).map(String::as_str), Some("http://127.0.0.1:5000"));
        assert_eq!(material.expose().get(REGION_KEY).map(String::as_str), Some("eu-west-1"));
        assert!(!format!("{custom:?}").contains("secret"));
    }
}
