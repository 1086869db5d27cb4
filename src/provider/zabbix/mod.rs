//! The `zabbix` provider: the target app is a Zabbix server's API (6.0,
//! JSON-RPC at `api_jsonrpc.php`), the pattern of a SaaS-style app with a
//! dedicated integration user and named API tokens.
//!
//! - **account** → a Zabbix user whose `username` is the account's name, in
//!   the connection's user group (by default "No access to the frontend":
//!   API only, and no host permissions until an admin grants the group
//!   some). Users carry no tags or description, so keysmith's ownership tag
//!   is the `surname`, `keysmith:<IntegrationAccount uid>`; `name` is
//!   `<namespace>/<name>`. A user without the tag is never changed, keyed or
//!   deleted. The user gets a random password nobody knows (Zabbix lets
//!   only users with one into the "Disabled" group), and logs in only with
//!   its tokens.
//! - **roles** → the API methods the user may call (`host.get`,
//!   `problem.get`, `history.*`...): each account has its own user role,
//!   `keysmith: <username>`, of type User, whose API allow-list is exactly
//!   the declared methods; with none declared, API access is off (Zabbix
//!   reads an empty allow-list as "every method"). The role's UI elements
//!   and actions are off but the one UI element Zabbix insists on; the
//!   User type also bounds what any method may do.
//! - **key** → a named API token (`token.create`, then `token.generate`),
//!   named with keysmith's key id and described with the ownership tag,
//!   expiring at the lifetime keysmith asks for. The output Secret holds
//!   [`TOKEN_KEY`] and [`URL_KEY`]. Several tokens live at once, so a
//!   rotation overlaps; revoking deletes the token. Zabbix records each
//!   token's `lastaccess` (any request it authenticates, a refused one
//!   included), which keysmith reports as the key's last use.
//! - **verifying** a key → `user.checkAuthentication` with the new token,
//!   which must name this user.
//! - **disabling** → the user joins the connection's disabled group
//!   ("Disabled" by default, `users_status` 1): its tokens are refused until
//!   an update takes it out again.
//! - **the connection's credential** → an API token of a Zabbix user whose
//!   role is of type Super admin (Zabbix lets no other type create users,
//!   roles, or tokens for others) with an API allow-list of exactly
//!   [`ADMIN_METHODS`] and the `manage_api_tokens` action.
//!
//! Errors quote Zabbix's `data`, never a token.

use std::{collections::BTreeSet, fmt, sync::Mutex, time::Duration};

use async_trait::async_trait;
use jiff::Timestamp;
use reqwest::{header, StatusCode};
use serde_json::{json, Value};

use super::{
    http::{classify_status, retry_after, scrub, transport_error},
    AccountRequest, Capabilities, Check, IssuedKey, KeyMaterial, KeyRequest, ObservedAccount, ObservedKey, Provider,
    ProviderError, RoleGrant,
};
use crate::ownership;

/// Output Secret key: the API token.
pub const TOKEN_KEY: &str = "token";
/// Output Secret key: the API's URL.
pub const URL_KEY: &str = "url";
/// The methods the connection's user must be allowed to call.
pub const ADMIN_METHODS: [&str; 13] = [
    "user.get",
    "user.create",
    "user.update",
    "user.delete",
    "role.get",
    "role.create",
    "role.update",
    "role.delete",
    "token.get",
    "token.create",
    "token.generate",
    "token.delete",
    "usergroup.get",
];
/// The user group accounts join by default: API only, no host rights.
pub const DEFAULT_USER_GROUP: &str = "No access to the frontend";
/// The user group that disables its members, by default.
pub const DEFAULT_DISABLED_GROUP: &str = "Disabled";
/// Zabbix's limit on a user name, name and surname (characters).
pub const MAX_TEXT: usize = 100;
/// The prefix of the user role keysmith makes for each account.
pub const ROLE_PREFIX: &str = "keysmith: ";
/// How long a new token may take to be accepted.
pub const VERIFY_WINDOW: Duration = Duration::from_secs(10);

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_QUOTED: usize = 300;
/// The UI elements of a User-type role (Zabbix 6.0); one must stay on.
const USER_UI: [&str; 11] = [
    "inventory.hosts",
    "inventory.overview",
    "monitoring.dashboard",
    "monitoring.hosts",
    "monitoring.latest_data",
    "monitoring.maps",
    "monitoring.problems",
    "reports.availability_report",
    "reports.top_triggers",
    "services.services",
    "services.sla_report",
];
/// The UI element left on (Zabbix insists on one; the user group keeps
/// the user out of the frontend anyway).
const UI_KEPT: &str = "monitoring.dashboard";
/// The actions of a User-type role (Zabbix 6.0), all off.
const USER_ACTIONS: [&str; 8] = [
    "edit_dashboards",
    "edit_maps",
    "acknowledge_problems",
    "close_problems",
    "change_severity",
    "add_problem_comments",
    "execute_scripts",
    "manage_api_tokens",
];

/// Users, their roles' API allow-lists and their API tokens in one Zabbix.
pub struct ZabbixProvider {
    url: String,
    token: String,
    user_group: String,
    disabled_group: String,
    http: reqwest::Client,
    timeout: Duration,
    verify_window: Duration,
    /// The ids of the two user groups, once looked up.
    groups: Mutex<Option<(String, String)>>,
}

impl fmt::Debug for ZabbixProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZabbixProvider")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .field("user_group", &self.user_group)
            .field("disabled_group", &self.disabled_group)
            .finish()
    }
}

/// A user as keysmith reads it.
#[derive(Debug, Clone)]
struct User {
    id: String,
    name: String,
    surname: String,
    role_id: String,
    groups: BTreeSet<String>,
}

impl ZabbixProvider {
    /// A provider for the API at `url` (`.../api_jsonrpc.php`), acting with
    /// the API token `token`; accounts join `user_group` and are disabled by
    /// joining `disabled_group` (names; empty: the defaults).
    pub fn new(
        url: &str,
        token: String,
        user_group: &str,
        disabled_group: &str,
        http: reqwest::Client,
    ) -> Result<Self, ProviderError> {
        let token = token.trim().to_owned();
        if token.len() != 64 || !token.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ProviderError::Invalid(
                "the connection's Zabbix API token is not 64 hexadecimal characters (an API token, not a password)"
                    .to_owned(),
            ));
        }
        let or = |text: &str, default: &str| if text.is_empty() { default.to_owned() } else { text.to_owned() };
        Ok(Self {
            url: url.to_owned(),
            token,
            user_group: or(user_group, DEFAULT_USER_GROUP),
            disabled_group: or(disabled_group, DEFAULT_DISABLED_GROUP),
            http,
            timeout: REQUEST_TIMEOUT,
            verify_window: VERIFY_WINDOW,
            groups: Mutex::new(None),
        })
    }

    /// Sets how long one request may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets how long a new token may take to be accepted.
    pub fn with_verify_window(mut self, window: Duration) -> Self {
        self.verify_window = window;
        self
    }

    /// One JSON-RPC call, authenticated with `auth` (the admin's token
    /// unless `None` is asked for); `secrets` are cut out of anything quoted.
    async fn rpc_with(
        &self,
        auth: Option<&str>,
        method: &str,
        params: Value,
        secrets: &[&str],
    ) -> Result<Value, ProviderError> {
        let mut body = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 1});
        if let Some(auth) = auth {
            body["auth"] = json!(auth);
        }
        let response = self
            .http
            .post(&self.url)
            .timeout(self.timeout)
            .header(header::CONTENT_TYPE, "application/json-rpc")
            .json(&body)
            .send()
            .await
            .map_err(|e| transport_error(method, e))?;
        let status = response.status();
        let hint = retry_after(response.headers());
        let text = response.text().await.map_err(|e| transport_error(method, e))?;
        let mut all_secrets = vec![self.token.as_str()];
        all_secrets.extend_from_slice(secrets);
        if status != StatusCode::OK {
            let quoted = scrub(text.trim(), &all_secrets, MAX_QUOTED);
            return Err(classify_status(status, format!("{method}: HTTP {}: {quoted}", status.as_u16()), hint));
        }
        let answer: Value = serde_json::from_str(&text)
            .map_err(|_| ProviderError::transient(format!("{method}: the answer is not JSON-RPC")))?;
        if let Some(error) = answer.get("error") {
            let code = error.get("code").and_then(Value::as_i64).unwrap_or(0);
            let data = error.get("data").and_then(Value::as_str).unwrap_or_default();
            let message = error.get("message").and_then(Value::as_str).unwrap_or_default();
            let said = scrub(if data.is_empty() { message } else { data }, &all_secrets, MAX_QUOTED);
            return Err(classify(method, code, &said, auth == Some(self.token.as_str())));
        }
        answer
            .get("result")
            .cloned()
            .ok_or_else(|| ProviderError::transient(format!("{method}: the answer has neither result nor error")))
    }

    async fn rpc(&self, method: &str, params: Value) -> Result<Value, ProviderError> {
        self.rpc_with(Some(&self.token), method, params, &[]).await
    }

    /// The ids of the accounts' group and of the disabling group.
    async fn group_ids(&self) -> Result<(String, String), ProviderError> {
        if let Some(found) = self.groups.lock().ok().and_then(|g| g.clone()) {
            return Ok(found);
        }
        let groups = self
            .rpc(
                "usergroup.get",
                json!({"output": ["usrgrpid", "name", "users_status"], "filter": {"name": [self.user_group, self.disabled_group]}}),
            )
            .await?;
        let find = |name: &str, disabled: bool| {
            let group = groups.as_array().into_iter().flatten().find(|g| g["name"] == name).ok_or_else(|| {
                ProviderError::Invalid(format!("Zabbix has no user group {name:?} (see the connection's spec)"))
            })?;
            if (text(group, "users_status") == "1") != disabled {
                return Err(ProviderError::Invalid(format!(
                    "Zabbix user group {name:?} {} its users, so it cannot be the {} group",
                    if disabled { "does not disable" } else { "disables" },
                    if disabled { "disabled" } else { "accounts'" }
                )));
            }
            Ok(text(group, "usrgrpid"))
        };
        let found = (find(&self.user_group, false)?, find(&self.disabled_group, true)?);
        if let Ok(mut cached) = self.groups.lock() {
            *cached = Some(found.clone());
        }
        Ok(found)
    }

    async fn get_user(&self, account: &AccountRequest) -> Result<Option<User>, ProviderError> {
        check_name(account)?;
        let found = self
            .rpc(
                "user.get",
                json!({
                    "output": ["userid", "username", "name", "surname", "roleid"],
                    "selectUsrgrps": ["usrgrpid"],
                    "filter": {"username": account.name},
                }),
            )
            .await?;
        // Zabbix matches usernames case-insensitively in some databases:
        // only the exact name counts.
        Ok(found.as_array().into_iter().flatten().find(|u| u["username"] == account.name.as_str()).map(|u| User {
            id: text(u, "userid"),
            name: text(u, "name"),
            surname: text(u, "surname"),
            role_id: text(u, "roleid"),
            groups: u["usrgrps"].as_array().into_iter().flatten().map(|g| text(g, "usrgrpid")).collect(),
        }))
    }

    async fn owned_user(&self, account: &AccountRequest) -> Result<User, ProviderError> {
        match self.get_user(account).await? {
            None => Err(ProviderError::NotFound(format!("Zabbix user {} does not exist", account.name))),
            Some(user) if !is_owned(&user, account) => Err(self.foreign(account)),
            Some(user) => Ok(user),
        }
    }

    async fn ours_or_gone(&self, account: &AccountRequest) -> Result<Option<User>, ProviderError> {
        match self.owned_user(account).await {
            Ok(user) => Ok(Some(user)),
            Err(ProviderError::NotFound(_)) => Ok(None),
            Err(error) => Err(error),
        }
    }

    fn foreign(&self, account: &AccountRequest) -> ProviderError {
        ProviderError::Conflict(format!(
            "Zabbix user {} exists and was not created by keysmith for this IntegrationAccount",
            account.name
        ))
    }

    /// The account's own user role (by name), with its rules and users.
    async fn get_role(&self, account: &AccountRequest) -> Result<Option<Value>, ProviderError> {
        let found = self
            .rpc(
                "role.get",
                json!({
                    "output": ["roleid", "name", "type"],
                    "selectRules": ["api.access", "api.mode", "api"],
                    "selectUsers": ["userid"],
                    "filter": {"name": role_name(account)},
                }),
            )
            .await?;
        Ok(found.as_array().into_iter().flatten().find(|r| r["name"] == role_name(account).as_str()).cloned())
    }

    /// The role's id and declared methods, the role made if missing; one
    /// another user holds is a conflict.
    async fn ensure_role(
        &self,
        account: &AccountRequest,
        user: Option<&str>,
    ) -> Result<(String, BTreeSet<String>), ProviderError> {
        if let Some(role) = self.get_role(account).await? {
            let holders: Vec<String> =
                role["users"].as_array().into_iter().flatten().map(|u| text(u, "userid")).collect();
            if holders.iter().any(|h| Some(h.as_str()) != user) {
                return Err(ProviderError::Conflict(format!(
                    "Zabbix user role {:?} exists and is held by another user",
                    role_name(account)
                )));
            }
            let id = text(&role, "roleid");
            if holders.is_empty() {
                // Left by a create that did not finish, or made by hand:
                // back to keysmith's kind, with no method, before any user
                // holds it.
                self.rpc("role.update", json!({"roleid": id, "type": 1, "rules": base_rules(&BTreeSet::new())}))
                    .await?;
                return Ok((id, BTreeSet::new()));
            }
            return Ok((id, methods_of(&role)));
        }
        let created = self
            .rpc("role.create", json!({"name": role_name(account), "type": 1, "rules": base_rules(&BTreeSet::new())}))
            .await?;
        let id = created["roleids"][0]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ProviderError::transient("role.create answered without a role id"))?;
        Ok((id, BTreeSet::new()))
    }

    async fn set_methods(&self, role_id: &str, methods: &BTreeSet<String>) -> Result<(), ProviderError> {
        let mut rules = json!({"api.access": 0});
        if !methods.is_empty() {
            rules = json!({"api.access": 1, "api.mode": 1, "api": methods.iter().collect::<Vec<_>>()});
        }
        self.rpc("role.update", json!({"roleid": role_id, "rules": rules})).await?;
        Ok(())
    }

    /// The declared methods of the account's role.
    async fn methods(&self, account: &AccountRequest) -> Result<(String, BTreeSet<String>), ProviderError> {
        let role = self.get_role(account).await?.ok_or_else(|| {
            ProviderError::NotFound(format!("Zabbix user role {:?} does not exist", role_name(account)))
        })?;
        Ok((text(&role, "roleid"), methods_of(&role)))
    }
}

/// The class of a Zabbix JSON-RPC error. `admin`: the call carried the
/// connection's own token.
fn classify(method: &str, code: i64, said: &str, admin: bool) -> ProviderError {
    let message = format!("{method}: {said}");
    if said.contains("Not authorized") || said.contains("Session terminated") || said.contains("API token expired") {
        return ProviderError::Unauthorized(message);
    }
    if said.contains("No permissions to call") {
        let hint = if admin { " (allow it in the connection user's role)" } else { "" };
        return ProviderError::Unauthorized(format!("{message}{hint}"));
    }
    if said.contains("already exists") {
        return ProviderError::Conflict(message);
    }
    if said.contains("does not exist") || said.contains("is not available") {
        return ProviderError::NotFound(message);
    }
    match code {
        // Invalid params and unknown methods: the request as written.
        -32602 | -32601 | -32600 | -32700 => ProviderError::Invalid(message),
        // Application errors the text does not explain: the database, say.
        _ => ProviderError::transient(message),
    }
}

fn text(value: &Value, field: &str) -> String {
    match &value[field] {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

fn role_name(account: &AccountRequest) -> String {
    format!("{ROLE_PREFIX}{}", account.name)
}

fn tag(account: &AccountRequest) -> String {
    ownership::uid_tag(&account.owner_uid)
}

fn display_name(account: &AccountRequest) -> String {
    cut(format!("{}/{}", account.namespace, account.account_name))
}

fn cut(text: String) -> String {
    text.chars().take(MAX_TEXT).collect()
}

fn is_owned(user: &User, account: &AccountRequest) -> bool {
    !account.owner_uid.is_empty() && user.surname == tag(account)
}

/// The declared methods of a role: its allow-list. A deny-list (someone
/// else's edit) declares nothing: its methods are the ones denied.
fn methods_of(role: &Value) -> BTreeSet<String> {
    let rules = &role["rules"];
    if text(rules, "api.access") != "1" || text(rules, "api.mode") != "1" {
        return BTreeSet::new();
    }
    rules["api"].as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect()
}

/// The rules of an account's role: API access to exactly `methods` (off
/// when there are none), the UI and actions off.
fn base_rules(methods: &BTreeSet<String>) -> Value {
    let ui: Vec<Value> =
        USER_UI.iter().map(|name| json!({"name": name, "status": i32::from(*name == UI_KEPT)})).collect();
    let actions: Vec<Value> = USER_ACTIONS.iter().map(|name| json!({"name": name, "status": 0})).collect();
    let mut rules = json!({
        "ui": ui,
        "ui.default_access": 0,
        "modules.default_access": 0,
        "services.read.mode": 0,
        "services.write.mode": 0,
        "actions": actions,
        "actions.default_access": 0,
        "api.access": 0,
    });
    if !methods.is_empty() {
        rules["api.access"] = json!(1);
        rules["api.mode"] = json!(1);
        rules["api"] = json!(methods.iter().collect::<Vec<_>>());
    }
    rules
}

/// A Zabbix username: at most 100 characters, no control characters or
/// surrounding spaces.
fn check_name(account: &AccountRequest) -> Result<(), ProviderError> {
    let name = &account.name;
    if name.is_empty() || name.chars().count() > MAX_TEXT || name.trim() != name || name.chars().any(char::is_control) {
        return Err(ProviderError::Invalid(format!(
            "{name:?} is not a Zabbix username: at most {MAX_TEXT} characters, no surrounding spaces \
             (set providerOptions.name)"
        )));
    }
    Ok(())
}

/// Methods a User-type user may call on itself that would take it out of
/// keysmith's hands: change its own groups, ownership tag or password, or
/// mint tokens for itself.
const SELF_SERVICE: [&str; 5] = ["user.update", "token.create", "token.generate", "token.update", "token.delete"];

/// Whether a method pattern (`host.*`, `*.get`, `user.update`) covers
/// `method`.
fn covers(pattern: &str, method: &str) -> bool {
    match (pattern.split_once('.'), method.split_once('.')) {
        (Some((ps, pm)), Some((s, m))) => {
            (ps == "*" || ps.eq_ignore_ascii_case(s)) && (pm == "*" || pm.eq_ignore_ascii_case(m))
        }
        _ => false,
    }
}

/// A role: an API method (`host.get`) or a Zabbix method pattern
/// (`host.*`, `*.get`), without a scope, that covers none of
/// [`SELF_SERVICE`].
fn check_role(grant: &RoleGrant) -> Result<(), ProviderError> {
    if let Some(scope) = &grant.scope {
        return Err(ProviderError::Invalid(format!(
            "Zabbix API methods have no scope; remove scope {scope:?} from role {}",
            grant.role
        )));
    }
    let part = |p: &str| p == "*" || (!p.is_empty() && p.len() <= 64 && p.chars().all(|c| c.is_ascii_alphanumeric()));
    let ok = match grant.role.split_once('.') {
        Some((service, method)) => part(service) && part(method) && !(service == "*" && method == "*"),
        None => false,
    };
    if !ok {
        return Err(ProviderError::Invalid(format!(
            "{:?} is not a Zabbix API method: name one such as host.get, or a pattern such as host.* or *.get \
             (*.* would allow every method)",
            grant.role
        )));
    }
    if let Some(method) = SELF_SERVICE.iter().find(|m| covers(&grant.role, m)) {
        return Err(ProviderError::Invalid(format!(
            "{} covers {method}, with which the account could change its own groups, ownership tag, password or \
             tokens and leave keysmith's control: name the methods it needs instead",
            grant.role
        )));
    }
    Ok(())
}

fn check_token_id(id: &str) -> Result<(), ProviderError> {
    if id.is_empty() || id.len() > 20 || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(ProviderError::Invalid(format!("{id:?} is not a Zabbix API token id")));
    }
    Ok(())
}

/// A unix time in Zabbix's answer (a string of digits), if set.
fn unix_time(value: &Value, field: &str) -> Option<Timestamp> {
    text(value, field).parse::<i64>().ok().filter(|t| *t > 0).and_then(|t| Timestamp::from_second(t).ok())
}

impl ZabbixProvider {
    fn observed(
        &self,
        user: &User,
        role_id: Option<&str>,
        groups: &(String, String),
        account: &AccountRequest,
    ) -> ObservedAccount {
        let disabled = user.groups.contains(&groups.1);
        let expected_groups: BTreeSet<String> =
            if disabled { [groups.0.clone(), groups.1.clone()].into() } else { [groups.0.clone()].into() };
        let drifted = user.name != display_name(account)
            || role_id != Some(user.role_id.as_str())
            || user.groups != expected_groups;
        ObservedAccount {
            id: user.id.clone(),
            name: account.name.clone(),
            disabled,
            owned: is_owned(user, account),
            drifted,
        }
    }

    async fn observe(&self, account: &AccountRequest, user: &User) -> Result<ObservedAccount, ProviderError> {
        let groups = self.group_ids().await?;
        let role = self.get_role(account).await?;
        // The role must be keysmith's kind: a User-type role in allow-list
        // mode (or without API access).
        let role_id = role
            .as_ref()
            .filter(|r| text(r, "type") == "1")
            .filter(|r| text(&r["rules"], "api.access") != "1" || text(&r["rules"], "api.mode") == "1")
            .map(|r| text(r, "roleid"));
        Ok(self.observed(user, role_id.as_deref(), &groups, account))
    }
}

#[async_trait]
impl Provider for ZabbixProvider {
    fn name(&self) -> &'static str {
        "zabbix"
    }

    fn capabilities(&self) -> Capabilities {
        // Zabbix writes lastaccess with the request it authenticates.
        Capabilities { last_use_lag: Some(Duration::ZERO), max_keys_per_account: None, key_expiry: true, disable: true }
    }

    /// The token reads the two user groups: a refused token, a missing
    /// method or a missing group each say so.
    async fn verify_connection(&self) -> Result<(), ProviderError> {
        if let Ok(mut cached) = self.groups.lock() {
            *cached = None;
        }
        self.group_ids().await.map(|_| ())
    }

    async fn observe_account(&self, account: &AccountRequest) -> Result<Option<ObservedAccount>, ProviderError> {
        match self.get_user(account).await? {
            None => Ok(None),
            Some(user) if !is_owned(&user, account) => Ok(Some(ObservedAccount {
                id: user.id,
                name: account.name.clone(),
                disabled: false,
                owned: false,
                drifted: false,
            })),
            Some(user) => Ok(Some(self.observe(account, &user).await?)),
        }
    }

    async fn create_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        check_name(account)?;
        if let Some(user) = self.get_user(account).await? {
            if !is_owned(&user, account) {
                return Err(self.foreign(account));
            }
            return self.observe(account, &user).await;
        }
        let groups = self.group_ids().await?;
        let (role_id, _) = self.ensure_role(account, None).await?;
        // A password nobody knows: Zabbix puts only users with one in the
        // disabling group. The account logs in with its tokens.
        let password = format!("{:032x}{:032x}", rand::random::<u128>(), rand::random::<u128>());
        let created = self
            .rpc_with(
                Some(&self.token),
                "user.create",
                json!({
                    "username": account.name,
                    "name": display_name(account),
                    "surname": tag(account),
                    "roleid": role_id,
                    "usrgrps": [{"usrgrpid": groups.0}],
                    "passwd": password,
                }),
                &[&password],
            )
            .await;
        match created {
            Ok(_) => {}
            // Created in between, by a lost answer or someone else.
            Err(ProviderError::Conflict(_)) => {}
            Err(error) => return Err(error),
        }
        let user = self.owned_user(account).await.map_err(|e| match e {
            ProviderError::NotFound(m) => ProviderError::transient(format!("{m} (yet)")),
            other => other,
        })?;
        self.observe(account, &user).await
    }

    async fn update_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        let user = self.owned_user(account).await?;
        let groups = self.group_ids().await?;
        let (role_id, _) = self.ensure_role(account, Some(&user.id)).await?;
        let role = self.get_role(account).await?;
        let kind_ok = role.as_ref().is_some_and(|r| {
            text(r, "type") == "1" && (text(&r["rules"], "api.access") != "1" || text(&r["rules"], "api.mode") == "1")
        });
        if !kind_ok {
            // Someone changed the role's type or made its list a deny-list:
            // back to a User role with exactly the declared methods.
            let methods = role.as_ref().map(methods_of).unwrap_or_default();
            self.rpc("role.update", json!({"roleid": role_id, "type": 1, "rules": base_rules(&methods)})).await?;
        }
        self.rpc(
            "user.update",
            json!({
                "userid": user.id,
                "name": display_name(account),
                "roleid": role_id,
                "usrgrps": [{"usrgrpid": groups.0}],
            }),
        )
        .await?;
        let user = self.owned_user(account).await?;
        self.observe(account, &user).await
    }

    async fn disable_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        let user = match self.owned_user(account).await {
            Ok(user) => user,
            Err(ProviderError::NotFound(_)) => return Ok(()),
            Err(ProviderError::Conflict(message)) => {
                tracing::warn!(%message, "not disabling a Zabbix user keysmith does not own");
                return Ok(());
            }
            Err(error) => return Err(error),
        };
        let groups = self.group_ids().await?;
        self.rpc(
            "user.update",
            json!({"userid": user.id, "usrgrps": [{"usrgrpid": groups.0}, {"usrgrpid": groups.1}]}),
        )
        .await?;
        Ok(())
    }

    async fn delete_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        match self.owned_user(account).await {
            Ok(user) => match self.rpc("user.delete", json!([user.id])).await {
                // Deleting a user deletes its tokens.
                Ok(_) | Err(ProviderError::NotFound(_)) => {}
                Err(error) => return Err(error),
            },
            Err(ProviderError::NotFound(_)) => {}
            Err(ProviderError::Conflict(message)) => {
                tracing::warn!(%message, "not deleting a Zabbix user keysmith does not own");
                return Ok(());
            }
            Err(error) => return Err(error),
        }
        // The account's role, once no user holds it (a deletion that failed
        // half-way is finished here).
        if let Some(role) = self.get_role(account).await? {
            if role["users"].as_array().is_none_or(Vec::is_empty) {
                match self.rpc("role.delete", json!([text(&role, "roleid")])).await {
                    Ok(_) | Err(ProviderError::NotFound(_)) => {}
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(())
    }

    async fn list_roles(&self, account: &AccountRequest) -> Result<Vec<RoleGrant>, ProviderError> {
        self.owned_user(account).await?;
        let methods = match self.methods(account).await {
            Ok((_, methods)) => methods,
            Err(ProviderError::NotFound(_)) => BTreeSet::new(),
            Err(error) => return Err(error),
        };
        Ok(methods.into_iter().map(|role| RoleGrant { role, scope: None }).collect())
    }

    async fn grant_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        check_role(grant)?;
        let user = self.owned_user(account).await?;
        let (role_id, mut methods) = self.ensure_role(account, Some(&user.id)).await?;
        if methods.insert(grant.role.clone()) {
            self.set_methods(&role_id, &methods).await?;
        }
        Ok(())
    }

    async fn revoke_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        if self.ours_or_gone(account).await?.is_none() {
            return Ok(());
        }
        let (role_id, mut methods) = match self.methods(account).await {
            Ok(found) => found,
            Err(ProviderError::NotFound(_)) => return Ok(()),
            Err(error) => return Err(error),
        };
        if methods.remove(&grant.role) {
            self.set_methods(&role_id, &methods).await?;
        }
        Ok(())
    }

    async fn issue_key(&self, account: &AccountRequest, request: &KeyRequest) -> Result<IssuedKey, ProviderError> {
        let user = self.owned_user(account).await?;
        let expires_at = request
            .lifetime
            .and_then(|l| Timestamp::now().checked_add(jiff::SignedDuration::from_secs(l.as_secs() as i64)).ok());
        let created = self
            .rpc(
                "token.create",
                json!({
                    "name": request.key_id.chars().take(64).collect::<String>(),
                    "userid": user.id,
                    "description": format!("{} {}/{}", tag(account), account.namespace, account.account_name),
                    "expires_at": expires_at.map_or(0, |t| t.as_second()),
                    "status": 0,
                }),
            )
            .await?;
        let id = created["tokenids"][0]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ProviderError::transient("token.create answered without a token id"))?;
        let generated = self.rpc("token.generate", json!([id])).await?;
        // Never quoted: it is the key.
        let token = generated[0]["token"].as_str().unwrap_or_default().to_owned();
        if token.is_empty() {
            return Err(ProviderError::transient(format!(
                "token.generate answered without a token for token {id}; it is left for keysmith to revoke"
            )));
        }
        Ok(IssuedKey {
            id,
            expires_at,
            material: KeyMaterial::new(
                [(TOKEN_KEY.to_owned(), token), (URL_KEY.to_owned(), self.url.clone())].into_iter().collect(),
            ),
        })
    }

    async fn list_keys(&self, account: &AccountRequest) -> Result<Vec<ObservedKey>, ProviderError> {
        let Some(user) = self.ours_or_gone(account).await? else {
            return Ok(Vec::new());
        };
        let found = self
            .rpc("token.get", json!({"output": ["tokenid", "created_at", "lastaccess"], "userids": [user.id]}))
            .await?;
        let mut keys: Vec<ObservedKey> = found
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| ObservedKey {
                id: text(t, "tokenid"),
                created_at: unix_time(t, "created_at"),
                last_used: unix_time(t, "lastaccess"),
            })
            .collect();
        keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(keys)
    }

    async fn revoke_key(&self, account: &AccountRequest, key_id: &str) -> Result<(), ProviderError> {
        check_token_id(key_id)?;
        let Some(user) = self.ours_or_gone(account).await? else {
            return Ok(());
        };
        // Only a token of this user.
        let found =
            self.rpc("token.get", json!({"output": ["tokenid"], "tokenids": [key_id], "userids": [user.id]})).await?;
        if found.as_array().is_none_or(Vec::is_empty) {
            return Ok(());
        }
        match self.rpc("token.delete", json!([key_id])).await {
            Ok(_) | Err(ProviderError::NotFound(_)) => Ok(()),
            Err(error) => Err(error),
        }
    }

    async fn verify_key(&self, account: &AccountRequest, key: &IssuedKey) -> Result<(), ProviderError> {
        let token = key
            .material
            .expose()
            .get(TOKEN_KEY)
            .ok_or_else(|| ProviderError::Invalid(format!("the key has no {TOKEN_KEY}")))?;
        let what = format!("the new token {}", key.id);
        super::until_accepted(&what, self.verify_window, || async {
            match self.rpc_with(None, "user.checkAuthentication", json!({"token": token}), &[token]).await {
                Ok(user) if user["username"] == account.name.as_str() => Ok(Check::Accepted),
                Ok(user) => Err(ProviderError::Conflict(format!(
                    "the new token authenticates as Zabbix user {:?}, not {}",
                    text(&user, "username"),
                    account.name
                ))),
                Err(ProviderError::Unauthorized(message)) | Err(ProviderError::Transient { message, .. }) => {
                    Ok(Check::Refused(message))
                }
                Err(error) => Err(error),
            }
        })
        .await
    }
}

/// The connect step: the admin token from its Secret, then the client.
pub async fn connect(
    spec: &crate::api::ZabbixSpec,
    connect: &super::Connect<'_>,
) -> Result<std::sync::Arc<dyn Provider>, ProviderError> {
    let (token, version) = connect.secret_value(&spec.token_secret_ref, TOKEN_KEY).await?;
    let key = format!("zabbix/{}/{version}", connect.connection.uid);
    connect
        .cached(key, || async {
            Ok(std::sync::Arc::new(ZabbixProvider::new(
                &spec.url,
                token,
                &spec.user_group,
                &spec.disabled_user_group,
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
            namespace: "monitoring".to_owned(),
            account_name: "alert-export".to_owned(),
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
    fn no_method_lets_the_account_change_itself() {
        for bad in
            ["user.update", "User.Update", "user.*", "*.update", "token.create", "token.*", "*.generate", "*.delete"]
        {
            let err = check_role(&grant(bad)).expect_err(bad);
            assert!(
                matches!(err, ProviderError::Invalid(ref m) if m.contains("leave keysmith's control")),
                "{bad}: {err}"
            );
        }
        for good in ["user.get", "*.get", "host.update", "problem.*"] {
            check_role(&grant(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
    }

    #[test]
    fn methods_are_method_names_or_zabbix_patterns_but_never_everything() {
        for good in ["host.get", "problem.get", "history.*", "*.get", "hostgroup.get"] {
            check_role(&grant(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in ["*.*", "*", "host", "host.get.x", "host.g et", "", ".get", "host."] {
            assert!(matches!(check_role(&grant(bad)), Err(ProviderError::Invalid(_))), "{bad}");
        }
        assert!(check_role(&RoleGrant { role: "host.get".into(), scope: Some("x".into()) }).is_err());
    }

    #[test]
    fn an_empty_method_list_switches_api_access_off() {
        // Zabbix reads an allow-list without methods as "every method".
        let rules = base_rules(&BTreeSet::new());
        assert_eq!(rules["api.access"], 0);
        assert!(rules.get("api").is_none() && rules.get("api.mode").is_none());
        let rules = base_rules(&["host.get".to_owned()].into());
        assert_eq!((rules["api.access"].clone(), rules["api.mode"].clone()), (json!(1), json!(1)));
        assert_eq!(rules["api"], json!(["host.get"]));
        let on: Vec<&Value> = rules["ui"].as_array().unwrap().iter().filter(|u| u["status"] == 1).collect();
        assert_eq!(on.len(), 1, "one UI element, as Zabbix insists");
        assert!(rules["actions"].as_array().unwrap().iter().all(|a| a["status"] == 0));
    }

    #[test]
    fn errors_are_classified_by_what_zabbix_said() {
        let c = |code, said| classify("user.get", code, said, true);
        assert!(matches!(c(-32602, "Not authorized."), ProviderError::Unauthorized(_)));
        assert!(matches!(c(-32500, "API token expired."), ProviderError::Unauthorized(_)));
        assert!(
            matches!(c(-32602, "No permissions to call \"user.get\"."), ProviderError::Unauthorized(m) if m.contains("connection user's role"))
        );
        assert!(matches!(c(-32602, "User with username \"x\" already exists."), ProviderError::Conflict(_)));
        assert!(matches!(
            c(-32500, "No permissions to referred object or it does not exist!"),
            ProviderError::NotFound(_)
        ));
        assert!(matches!(c(-32602, "Invalid parameter \"/1/surname\": value is too long."), ProviderError::Invalid(_)));
        assert!(matches!(c(-32500, "SQL statement execution has failed"), ProviderError::Transient { .. }));
    }

    #[test]
    fn usernames_and_token_ids_are_checked() {
        check_name(&account("alert-export")).unwrap();
        for bad in ["", " x", "x ", "a\nb", &"a".repeat(MAX_TEXT + 1)] {
            assert!(check_name(&account(bad)).is_err(), "{bad:?}");
        }
        check_token_id("42").unwrap();
        for bad in ["", "4a", "../1", "1 OR 1"] {
            assert!(check_token_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_an_api_token_is_accepted_and_it_never_shows_in_debug() {
        let http = reqwest::Client::new();
        let token = "ab".repeat(32);
        let p = ZabbixProvider::new("http://127.0.0.1:1/api_jsonrpc.php", token.clone(), "", "", http.clone()).unwrap();
        assert!(!format!("{p:?}").contains(&token));
        assert!(ZabbixProvider::new("http://x", "zabbix".into(), "", "", http).is_err(), "a password is not a token");
    }
}
