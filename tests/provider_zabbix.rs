//! The `zabbix` provider against a real Zabbix 6.0 API (Debian's frontend
//! over a throwaway PostgreSQL, `tests/common/zabbix_server.rs`), one per
//! test. keysmith acts as a user whose role allows exactly
//! `zabbix::ADMIN_METHODS`, so every test also proves that list is enough.

mod common;
mod conformance;
#[path = "common/zabbix_server.rs"]
mod zabbix_server;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use common::fault_proxy::{Fault, FaultProxy};
use keysmith::provider::{
    zabbix::{ZabbixProvider, TOKEN_KEY, URL_KEY},
    AccountRequest, IssuedKey, KeyRequest, Provider, ProviderError, RoleGrant,
};
use serde_json::json;
use zabbix_server::ZabbixServer;

fn account(name: &str) -> AccountRequest {
    AccountRequest {
        name: name.to_owned(),
        namespace: "monitoring".to_owned(),
        account_name: name.to_owned(),
        owner_uid: format!("uid-{:016x}", rand::random::<u64>()),
        description: Some(format!("{name}: alert export")),
        owner: Some("team-sre".to_owned()),
        options: BTreeMap::new(),
    }
}

fn role(name: &str) -> RoleGrant {
    RoleGrant { role: name.to_owned(), scope: None }
}

fn key_request(id: &str) -> KeyRequest {
    KeyRequest { key_id: id.to_owned(), lifetime: Some(Duration::from_secs(3600)) }
}

/// The conformance suite's view of the server.
struct Zabbix {
    zabbix: ZabbixServer,
}

#[async_trait::async_trait]
impl conformance::Target for Zabbix {
    fn provider(&self) -> Arc<dyn Provider> {
        Arc::new(self.zabbix.provider())
    }
    fn upstream(&self) -> (String, reqwest::Client) {
        (self.zabbix.url.clone(), self.zabbix.http.clone())
    }
    async fn provider_via(&self, url: &str) -> Arc<dyn Provider> {
        Arc::new(self.zabbix.provider_via(url).with_timeout(Duration::from_secs(2)))
    }
    async fn refused_provider(&self) -> Arc<dyn Provider> {
        Arc::new(ZabbixProvider::new(&self.zabbix.url, "0f".repeat(32), "", "", self.zabbix.http.clone()).unwrap())
    }
    fn account(&self, name: &str) -> AccountRequest {
        account(&format!("conf-{name}"))
    }
    fn roles(&self) -> [RoleGrant; 2] {
        [role("host.get"), role("problem.get")]
    }
    async fn make_foreign_account(&self, name: &str) {
        self.zabbix.make_user(name).await;
    }
    async fn key_works(&self, key: &IssuedKey) -> bool {
        self.zabbix.key_works(key).await
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let target = Zabbix { zabbix: ZabbixServer::start().await };
            conformance::$name(&target).await;
        }
    )*};
}

conformance!(
    another_integration_accounts_account_is_never_taken_over,
    create_is_idempotent_and_adopts_nothing,
    delete_tolerates_not_found,
    role_sync_adds_and_removes,
    keys_issue_verify_and_revoke,
    refused_credential_is_unauthorized,
    throttling_and_outages_are_transient,
    rate_budget_is_never_exceeded,
);

/// The token can call exactly the declared methods, and with none
/// declared, none at all: Zabbix itself reads an empty allow-list as
/// "every method", so keysmith switches API access off instead.
#[tokio::test]
async fn a_token_calls_exactly_the_declared_methods_and_none_when_none_are_declared() {
    let zabbix = ZabbixServer::start().await;
    let p = zabbix.provider();
    p.verify_connection().await.expect("the least-privilege operator works");
    let acct = account("alert-export");
    p.create_account(&acct).await.unwrap();
    let key = p.issue_key(&acct, &key_request("k-1")).await.unwrap();
    assert_eq!(key.material.expose().keys().collect::<Vec<_>>(), vec![TOKEN_KEY, URL_KEY]);
    assert_eq!(key.material.expose()[URL_KEY], zabbix.url);
    p.verify_key(&acct, &key).await.expect("the token authenticates as the account");

    let denied = |result: Result<serde_json::Value, String>, method: &str| match result {
        Err(said) => assert!(said.contains(&format!("No permissions to call \"{method}\"")), "{said}"),
        Ok(found) => panic!("{method} must be refused, got {found}"),
    };
    // No methods declared: API access is off.
    assert_eq!(zabbix.role_rules("alert-export").await["api.access"], "0");
    denied(zabbix.call_with_key(&key, "host.get", json!({})).await, "host.get");

    p.grant_role(&acct, &role("host.get")).await.unwrap();
    p.grant_role(&acct, &role("problem.get")).await.unwrap();
    let rules = zabbix.role_rules("alert-export").await;
    assert_eq!((rules["api.access"].clone(), rules["api.mode"].clone()), (json!("1"), json!("1")), "{rules}");
    zabbix.call_with_key(&key, "host.get", json!({"limit": 1})).await.expect("a declared method");
    denied(zabbix.call_with_key(&key, "user.get", json!({})).await, "user.get");
    denied(zabbix.call_with_key(&key, "token.create", json!({"name": "mine"})).await, "token.create");

    // Revoking the last two: API access is off again, not "every method".
    p.revoke_role(&acct, &role("host.get")).await.unwrap();
    p.revoke_role(&acct, &role("problem.get")).await.unwrap();
    assert!(p.list_roles(&acct).await.unwrap().is_empty());
    denied(zabbix.call_with_key(&key, "host.get", json!({})).await, "host.get");
    denied(zabbix.call_with_key(&key, "user.get", json!({})).await, "user.get");
    p.delete_account(&acct).await.unwrap();
    assert!(zabbix.user("alert-export").await.is_none());
    let roles = zabbix.admin("role.get", json!({"filter": {"name": "keysmith: alert-export"}})).await;
    assert_eq!(roles, json!([]), "the account's role goes with it");
}

/// The user carries the ownership tag; an admin's edits that widen it
/// (a Super admin role, an administrators' group, a deny-list) are drift
/// an update repairs.
#[tokio::test]
async fn widening_edits_by_hand_are_drift_and_are_repaired() {
    let zabbix = ZabbixServer::start().await;
    let p = zabbix.provider();
    let acct = account("ticket-sync");
    let created = p.create_account(&acct).await.unwrap();
    assert!(created.owned && !created.drifted && !created.disabled, "{created:?}");
    let user = zabbix.user("ticket-sync").await.unwrap();
    assert_eq!(user["surname"], format!("keysmith:{}", acct.owner_uid));
    assert_eq!(user["name"], "monitoring/ticket-sync");
    assert_eq!(user["role"]["type"], "1");
    assert_eq!(user["usrgrps"][0]["name"], "No access to the frontend");
    p.grant_role(&acct, &role("host.get")).await.unwrap();

    let admins = zabbix.group_id("Zabbix administrators").await;
    let frontend = zabbix.group_id("No access to the frontend").await;
    zabbix
        .admin(
            "user.update",
            json!({"userid": user["userid"], "roleid": "3", "usrgrps": [{"usrgrpid": admins}, {"usrgrpid": frontend}]}),
        )
        .await;
    assert!(p.observe_account(&acct).await.unwrap().unwrap().drifted);
    let repaired = p.update_account(&acct).await.unwrap();
    assert!(!repaired.drifted, "{repaired:?}");
    let user = zabbix.user("ticket-sync").await.unwrap();
    assert_eq!(user["role"]["name"], "keysmith: ticket-sync");
    assert_eq!(user["usrgrps"].as_array().unwrap().len(), 1, "{user}");

    // The role turned into a deny-list (every method but one).
    zabbix
        .admin(
            "role.update",
            json!({"roleid": user["roleid"], "rules": {"api.access": 1, "api.mode": 0, "api": ["user.get"]}}),
        )
        .await;
    assert!(p.observe_account(&acct).await.unwrap().unwrap().drifted);
    // A deny-list names what is denied: none of it becomes allowed.
    assert!(p.list_roles(&acct).await.unwrap().is_empty(), "a deny-list declares nothing");
    p.update_account(&acct).await.unwrap();
    let rules = zabbix.role_rules("ticket-sync").await;
    assert_eq!(rules["api.access"], "0", "back to no API access: {rules}");
    p.grant_role(&acct, &role("host.get")).await.unwrap();
    let rules = zabbix.role_rules("ticket-sync").await;
    assert_eq!((rules["api.mode"].clone(), rules["api"].clone()), (json!("1"), json!(["host.get"])), "{rules}");
    p.delete_account(&acct).await.unwrap();
}

/// Disabling puts the user in the Disabled group: its tokens are refused
/// until an update takes it out again.
#[tokio::test]
async fn a_disabled_account_cannot_use_its_tokens_until_enabled() {
    let zabbix = ZabbixServer::start().await;
    let p = zabbix.provider();
    let acct = account("paused");
    p.create_account(&acct).await.unwrap();
    let key = p.issue_key(&acct, &key_request("k-1")).await.unwrap();
    assert!(zabbix.key_works(&key).await);
    p.disable_account(&acct).await.unwrap();
    assert!(p.observe_account(&acct).await.unwrap().unwrap().disabled);
    assert!(!zabbix.key_works(&key).await, "a disabled user's token is refused");
    let enabled = p.update_account(&acct).await.unwrap();
    assert!(!enabled.disabled && !enabled.drifted, "{enabled:?}");
    assert!(zabbix.key_works(&key).await);
    p.delete_account(&acct).await.unwrap();
    assert!(!zabbix.key_works(&key).await, "deleting the user deletes its tokens");
}

/// Tokens are named with keysmith's key id, described with the ownership
/// tag, and expire at the lifetime asked for; another user's token is
/// never revoked through this account; the admin token is never quoted.
#[tokio::test]
async fn tokens_are_tagged_expire_and_only_the_accounts_own_are_revoked() {
    let zabbix = ZabbixServer::start().await;
    let p = zabbix.provider();
    let acct = account("exporter");
    p.create_account(&acct).await.unwrap();
    let key = p
        .issue_key(&acct, &KeyRequest { key_id: "k-abc".into(), lifetime: Some(Duration::from_secs(900)) })
        .await
        .unwrap();
    let tokens = zabbix.tokens("exporter").await;
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0]["name"], "k-abc");
    assert_eq!(tokens[0]["description"], format!("keysmith:{} monitoring/exporter", acct.owner_uid));
    let expires: i64 = tokens[0]["expires_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(Some(expires), key.expires_at.map(|t| t.as_second()));
    assert!((expires - jiff::Timestamp::now().as_second() - 900).abs() <= 5);

    // Someone else's token id, through this account: left alone.
    let other = zabbix.make_user("someone").await;
    let theirs = zabbix.new_token(&other, "theirs").await;
    let their_id = zabbix.tokens("someone").await[0]["tokenid"].as_str().unwrap().to_owned();
    p.revoke_key(&acct, &their_id).await.expect("not this account's: nothing to do");
    assert_eq!(zabbix.tokens("someone").await.len(), 1, "another user's token is not revoked");
    assert!(zabbix.call(None, "user.checkAuthentication", json!({"token": theirs})).await.is_ok());

    // A refused admin token: the error never quotes it.
    let refused = ZabbixProvider::new(&zabbix.url, "ab".repeat(32), "", "", zabbix.http.clone()).unwrap();
    match refused.observe_account(&acct).await {
        Err(ProviderError::Unauthorized(message)) => assert!(!message.contains(&"ab".repeat(32)), "{message}"),
        other => panic!("a refused token must be Unauthorized, got {other:?}"),
    }
    p.revoke_key(&acct, &key.id).await.unwrap();
    assert!(zabbix.tokens("exporter").await.is_empty());
    assert!(!zabbix.key_works(&key).await);
}

/// A token whose answer was lost is listed, so keysmith finds it as
/// untracked and revokes it.
#[tokio::test]
async fn a_token_whose_answer_was_lost_is_found_and_revoked() {
    let zabbix = ZabbixServer::start().await;
    let proxy = FaultProxy::start(&zabbix.url, zabbix.http.clone()).await;
    let p = zabbix.provider_via(&proxy.url).with_timeout(Duration::from_secs(3));
    let acct = account("lost");
    p.create_account(&acct).await.unwrap();
    // user.get passes, token.create is lost.
    proxy.inject(Fault::Pass, 1);
    proxy.inject(Fault::Lost, 1);
    match p.issue_key(&acct, &key_request("k-lost")).await {
        Err(ProviderError::Transient { .. }) => {}
        other => panic!("a lost answer must be Transient, got {other:?}"),
    }
    let listed = p.list_keys(&acct).await.unwrap();
    assert_eq!(listed.len(), 1, "the token Zabbix made is listed: {listed:?}");
    assert_eq!(zabbix.tokens("lost").await[0]["name"], "k-lost");
    for key in &listed {
        p.revoke_key(&acct, &key.id).await.unwrap();
    }
    assert!(zabbix.tokens("lost").await.is_empty());
}
