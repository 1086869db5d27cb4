//! The `scim` provider against a real SCIM 2.0 server: PyPI's `scim2-server`
//! (installed by `.ci/run`), one per test on a free loopback port, started
//! by the test and killed when it ends (`tests/common/scim_server.rs`).
//! `SCIM2_SERVER` names another binary.
//!
//! What the provider does is checked with the server's own view, read over
//! the SCIM API. scim2-server keeps passwords in memory and lets a search
//! filter on them (`password eq "..."`), which real services do not: the
//! tests use that to prove which password is live, something the provider
//! itself cannot (see its module docs).

#[path = "common/scim_server.rs"]
mod scim_server;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use keysmith::provider::scim::{self, ScimProvider};
use keysmith::provider::{AccountRequest, KeyRequest, Provider, ProviderError, RoleGrant};
use scim_server::{ScimServer, PATCH_OP};
use serde_json::{json, Value};

fn account(name: &str) -> AccountRequest {
    AccountRequest {
        name: name.to_owned(),
        namespace: "payments".to_owned(),
        account_name: name.to_owned(),
        owner_uid: format!("uid-{:016x}", rand::random::<u64>()),
        description: Some(format!("{name}: nightly sync")),
        owner: Some("team-payments".to_owned()),
        options: BTreeMap::new(),
    }
}

fn role(name: &str) -> RoleGrant {
    RoleGrant { role: name.to_owned(), scope: None }
}

fn key(id: &str) -> KeyRequest {
    KeyRequest { key_id: id.to_owned(), lifetime: None }
}

fn roles(grants: Vec<RoleGrant>) -> BTreeSet<String> {
    grants.into_iter().map(|g| g.role).collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn create_is_idempotent_and_observe_reports_ownership_and_drift() {
    let server = ScimServer::start().await;
    let scim = server.provider();
    let acct = account("billing-sync");

    assert_eq!(scim.observe_account(&acct).await.expect("observe"), None);
    let created = scim.create_account(&acct).await.expect("create");
    assert!(created.owned && !created.drifted && !created.disabled, "{created:?}");
    assert_eq!(created.name, "billing-sync");
    let user = server.user(&created.id).await;
    assert_eq!(user["userName"], "billing-sync");
    assert_eq!(user["displayName"], "billing-sync: nightly sync");
    assert_eq!(user["active"], true);
    assert_eq!(user["externalId"], format!("keysmith:{}", acct.owner_uid));

    let again = scim.create_account(&acct).await.expect("create again adopts our own user");
    assert_eq!(again.id, created.id);
    assert_eq!(scim.observe_account(&acct).await.expect("observe"), Some(created.clone()));

    // userName is case-insensitive in SCIM: the same account.
    let shouting = AccountRequest { name: "BILLING-SYNC".to_owned(), ..acct.clone() };
    assert_eq!(scim.observe_account(&shouting).await.expect("observe").map(|a| a.id), Some(created.id.clone()));

    // A new description is drift; update fixes it.
    let described = AccountRequest { description: Some("Billing sync, reads invoices".to_owned()), ..acct.clone() };
    let seen = scim.observe_account(&described).await.expect("observe").expect("exists");
    assert!(seen.owned && seen.drifted, "{seen:?}");
    let updated = scim.update_account(&described).await.expect("update");
    assert!(updated.owned && !updated.drifted, "{updated:?}");
    assert_eq!(server.user(&created.id).await["displayName"], "Billing sync, reads invoices");
    // No description: the displayName is the name.
    let plain = AccountRequest { description: None, ..acct.clone() };
    scim.update_account(&plain).await.expect("update");
    assert_eq!(server.user(&created.id).await["displayName"], "billing-sync");

    // Disabled by hand: drifted and disabled; update re-enables.
    let op = json!({"schemas": [PATCH_OP], "Operations": [{"op": "replace", "path": "active", "value": false}]});
    server.admin(reqwest::Method::PATCH, &format!("/Users/{}", created.id), Some(op)).await;
    let seen = scim.observe_account(&plain).await.expect("observe").expect("exists");
    assert!(seen.disabled && seen.drifted, "{seen:?}");
    let updated = scim.update_account(&plain).await.expect("update");
    assert!(!updated.disabled && !updated.drifted, "{updated:?}");
    assert_eq!(server.user(&created.id).await["active"], true);

    // Nothing to change: no write, the version stays.
    let version = server.user(&created.id).await["meta"]["version"].clone();
    scim.update_account(&plain).await.expect("update");
    assert_eq!(server.user(&created.id).await["meta"]["version"], version);

    // Names with quotes are escaped in filters.
    let quoted = account("o\"brien\\ops");
    let made = scim.create_account(&quoted).await.expect("create quoted");
    assert_eq!(scim.observe_account(&quoted).await.expect("observe").map(|a| a.id), Some(made.id));
}

#[tokio::test]
async fn create_refuses_to_adopt_someone_elses_user() {
    let server = ScimServer::start().await;
    let scim = server.provider();
    let theirs = server.create_user("shared-bot", Some("keysmith:another-integration-account")).await;
    let manual = server.create_user("hand-made", None).await;

    for (name, id) in [("shared-bot", &theirs), ("hand-made", &manual)] {
        let acct = account(name);
        let err = scim.create_account(&acct).await.expect_err("not ours");
        assert!(
            matches!(&err, ProviderError::Conflict(m) if m.contains(name) && m.contains("not created by keysmith")),
            "{err:?}"
        );
        let seen = scim.observe_account(&acct).await.expect("observe").expect("exists");
        assert!(!seen.owned, "{seen:?}");
        assert_eq!(&seen.id, id);
        // Nothing else touches it either.
        for result in [
            scim.update_account(&acct).await.map(|_| ()),
            scim.disable_account(&acct).await,
            scim.delete_account(&acct).await,
            scim.issue_key(&acct, &key("k1")).await.map(|_| ()),
            scim.grant_role(&acct, &role("anything")).await,
        ] {
            assert!(matches!(result, Err(ProviderError::Conflict(_))), "{result:?}");
        }
        assert_eq!(scim.list_keys(&acct).await.expect("list keys"), vec![]);
        let user = server.user(id).await;
        assert_eq!(user["displayName"], "someone's");
        assert_eq!(user["active"], Value::Null);
        assert_eq!(user.get("nickName"), None);
    }
}

#[tokio::test]
async fn disable_sets_active_false_and_tolerates_a_missing_user() {
    let server = ScimServer::start().await;
    let scim = server.provider();
    let acct = account("ci-deployer");
    scim.disable_account(&acct).await.expect("nothing to disable is fine");

    let created = scim.create_account(&acct).await.expect("create");
    scim.disable_account(&acct).await.expect("disable");
    assert_eq!(server.user(&created.id).await["active"], false);
    let seen = scim.observe_account(&acct).await.expect("observe").expect("kept");
    assert!(seen.disabled && seen.owned, "{seen:?}");
    let version = server.user(&created.id).await["meta"]["version"].clone();
    scim.disable_account(&acct).await.expect("disable again");
    assert_eq!(server.user(&created.id).await["meta"]["version"], version, "no second write");
}

#[tokio::test]
async fn roles_are_group_memberships() {
    let server = ScimServer::start().await;
    let scim = server.provider();
    let acct = account("reporting");
    let user_id = scim.create_account(&acct).await.expect("create").id;
    let readers = server.create_group("Billing Readers").await;
    let writers = server.create_group("Billing Writers").await;
    let admins = server.create_group("Admins").await;
    // Someone else in a group keysmith touches keeps their membership.
    let colleague = server.create_user("colleague", None).await;
    server.add_member(&readers, &colleague).await;

    assert_eq!(scim.list_roles(&acct).await.expect("list"), vec![]);
    scim.grant_role(&acct, &role("Billing Readers")).await.expect("grant readers");
    scim.grant_role(&acct, &role("Billing Writers")).await.expect("grant writers");
    scim.grant_role(&acct, &role("Billing Writers")).await.expect("granting twice is fine");
    assert_eq!(roles(scim.list_roles(&acct).await.expect("list")), set(&["Billing Readers", "Billing Writers"]));
    assert_eq!(server.members(&writers).await, vec![user_id.clone()], "added once");
    assert_eq!(server.members(&admins).await, Vec::<String>::new());

    scim.revoke_role(&acct, &role("Billing Writers")).await.expect("revoke");
    scim.revoke_role(&acct, &role("Billing Writers")).await.expect("revoking twice is fine");
    assert_eq!(roles(scim.list_roles(&acct).await.expect("list")), set(&["Billing Readers"]));
    assert_eq!(server.members(&writers).await, Vec::<String>::new());
    let mut members = server.members(&readers).await;
    members.sort();
    let mut expected = vec![user_id.clone(), colleague.clone()];
    expected.sort();
    assert_eq!(members, expected);

    // A group that does not exist, or exists in another case.
    let err = scim.grant_role(&acct, &role("Billing Auditors")).await.expect_err("missing group");
    assert!(
        matches!(&err, ProviderError::NotFound(m) if m.contains("SCIM group \"Billing Auditors\" does not exist")),
        "{err:?}"
    );
    let err = scim.grant_role(&acct, &role("admins")).await.expect_err("names are exact");
    assert!(matches!(&err, ProviderError::NotFound(m) if m.contains("did you mean \"Admins\"")), "{err:?}");
    assert_eq!(server.members(&admins).await, Vec::<String>::new());
    // Two groups of one name: ambiguous.
    server.create_group("Twins").await;
    server.create_group("Twins").await;
    let err = scim.grant_role(&acct, &role("Twins")).await.expect_err("ambiguous");
    assert!(matches!(err, ProviderError::Conflict(_)), "{err:?}");
    // No scopes in SCIM.
    let scoped = RoleGrant { role: "Admins".to_owned(), scope: Some("payments".to_owned()) };
    let err = scim.grant_role(&acct, &scoped).await.expect_err("scoped");
    assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");
    scim.revoke_role(&acct, &scoped).await.expect("a scoped role is never held");
    assert_eq!(scim.default_scope(&acct), None);

    // Memberships made by hand are reported (and so revoked by the controller).
    server.add_member(&admins, &user_id).await;
    assert_eq!(roles(scim.list_roles(&acct).await.expect("list")), set(&["Admins", "Billing Readers"]));
    scim.revoke_role(&acct, &role("Admins")).await.expect("revoke");
    assert_eq!(roles(scim.list_roles(&acct).await.expect("list")), set(&["Billing Readers"]));

    // The same, listing every group instead of filtering on members.
    let unfiltered = server.provider().with_member_filter(false);
    assert_eq!(roles(unfiltered.list_roles(&acct).await.expect("list")), set(&["Billing Readers"]));
}

#[tokio::test]
async fn a_key_is_the_users_password_and_rotation_replaces_it() {
    let server = ScimServer::start().await;
    let scim = server.provider();
    assert_eq!(scim.capabilities().max_keys_per_account, Some(1));
    let acct = account("invoice-export");
    let err = scim.issue_key(&acct, &key("k1")).await.expect_err("no user yet");
    assert!(matches!(err, ProviderError::NotFound(_)), "{err:?}");
    let user_id = scim.create_account(&acct).await.expect("create").id;
    assert_eq!(scim.list_keys(&acct).await.expect("list"), vec![]);

    let first = scim.issue_key(&acct, &key("k1")).await.expect("issue k1");
    assert_eq!(first.id, "k1");
    assert_eq!(first.expires_at, None);
    let values = first.material.expose();
    assert_eq!(values.keys().map(String::as_str).collect::<Vec<_>>(), ["password", "scim_base_url", "username"]);
    assert_eq!(values["username"], "invoice-export");
    assert_eq!(values["scim_base_url"], server.base_url);
    let password1 = values["password"].clone();
    assert_eq!(password1.chars().count(), scim::PASSWORD_LENGTH);
    assert!(!format!("{first:?}").contains(&password1), "Debug hides the password");
    assert!(server.password_is("invoice-export", &password1).await, "the server holds the password");
    assert!(!server.password_is("invoice-export", "not-it").await);
    assert_eq!(server.user(&user_id).await["nickName"], "keysmith-key:k1");
    assert!(server.user(&user_id).await.get("password").is_none(), "SCIM never returns passwords");
    scim.verify_key(&acct, &first).await.expect("verify k1");
    assert_eq!(scim.list_keys(&acct).await.expect("list").iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), ["k1"]);

    // A second key replaces the first at once.
    let second = scim.issue_key(&acct, &key("k2")).await.expect("issue k2");
    let password2 = second.material.expose()["password"].clone();
    assert_ne!(password1, password2);
    assert!(server.password_is("invoice-export", &password2).await);
    assert!(!server.password_is("invoice-export", &password1).await, "the old password stops working at once");
    assert_eq!(scim.list_keys(&acct).await.expect("list").iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), ["k2"]);
    scim.verify_key(&acct, &second).await.expect("verify k2");
    let err = scim.verify_key(&acct, &first).await.expect_err("k1 was replaced");
    assert!(matches!(err, ProviderError::Conflict(_)), "{err:?}");

    // Revoking the replaced key leaves the live one alone.
    scim.revoke_key(&acct, "k1").await.expect("revoke k1");
    assert!(server.password_is("invoice-export", &password2).await, "k2 still works");
    assert_eq!(scim.list_keys(&acct).await.expect("list").len(), 1);

    // Revoking the live key sets a password nobody knows.
    scim.revoke_key(&acct, "k2").await.expect("revoke k2");
    assert!(!server.password_is("invoice-export", &password2).await, "k2 stops working");
    assert_eq!(scim.list_keys(&acct).await.expect("list"), vec![]);
    assert_eq!(server.user(&user_id).await.get("nickName"), None);
    scim.revoke_key(&acct, "k2").await.expect("revoking twice is fine");
    let err = scim.verify_key(&acct, &second).await.expect_err("revoked");
    assert!(matches!(err, ProviderError::Conflict(_)), "{err:?}");

    // A disabled account's password is not verified.
    let third = scim.issue_key(&acct, &key("k3")).await.expect("issue k3");
    scim.disable_account(&acct).await.expect("disable");
    let err = scim.verify_key(&acct, &third).await.expect_err("disabled");
    assert!(matches!(err, ProviderError::Conflict(_)), "{err:?}");

    // A gone account has no keys, and revoking is fine.
    scim.delete_account(&acct).await.expect("delete");
    assert_eq!(scim.list_keys(&acct).await.expect("list"), vec![]);
    scim.revoke_key(&acct, "k3").await.expect("gone is fine");
}

#[tokio::test]
async fn delete_removes_the_user_and_its_memberships() {
    let server = ScimServer::start().await;
    let scim = server.provider();
    let acct = account("legacy-sync");
    let user_id = scim.create_account(&acct).await.expect("create").id;
    let group = server.create_group("Legacy").await;
    scim.grant_role(&acct, &role("Legacy")).await.expect("grant");
    assert_eq!(server.members(&group).await, vec![user_id.clone()]);

    scim.delete_account(&acct).await.expect("delete");
    assert_eq!(scim.observe_account(&acct).await.expect("observe"), None);
    assert!(server.user_named("legacy-sync").await.is_none());
    assert_eq!(server.members(&group).await, Vec::<String>::new(), "no dangling member");
    scim.delete_account(&acct).await.expect("a second delete is fine");
    assert_eq!(scim.list_roles(&acct).await.expect("list"), vec![]);
    scim.revoke_role(&acct, &role("Legacy")).await.expect("revoking on a gone user is fine");
    let err = scim.update_account(&acct).await.expect_err("gone");
    assert!(matches!(err, ProviderError::NotFound(_)), "{err:?}");

    // And it can be made again.
    let again = scim.create_account(&acct).await.expect("recreate");
    assert_ne!(again.id, user_id);
}

#[tokio::test]
async fn verify_connection_checks_the_bearer_token() {
    let server = ScimServer::start().await;
    server.provider().verify_connection().await.expect("the right token");

    let wrong = ScimProvider::new(server.base_url.clone(), "not-the-token".to_owned(), server.http.clone());
    let err = wrong.verify_connection().await.expect_err("a wrong token");
    assert!(matches!(&err, ProviderError::Unauthorized(m) if m.contains("401")), "{err:?}");
    assert!(!err.to_string().contains("not-the-token"));
    let err = wrong.observe_account(&account("x")).await.expect_err("every call");
    assert!(matches!(err, ProviderError::Unauthorized(_)), "{err:?}");
    assert!(!format!("{wrong:?}").contains("not-the-token"), "Debug hides the token");

    // Nothing listening: transient.
    let port = TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let nowhere = ScimProvider::new(format!("http://127.0.0.1:{port}/v2"), "t".to_owned(), server.http.clone());
    let err = nowhere.verify_connection().await.expect_err("no server");
    assert!(matches!(err, ProviderError::Transient { .. }), "{err:?}");
    // A malformed base URL: invalid.
    let bad = ScimProvider::new("not a url".to_owned(), "t".to_owned(), server.http.clone());
    let err = bad.verify_connection().await.expect_err("bad url");
    assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");
    // The wrong path under the right server: 404.
    let lost = ScimProvider::new(format!("{}/nowhere", server.base_url), server.token.clone(), server.http.clone());
    let err = lost.verify_connection().await.expect_err("wrong path");
    assert!(matches!(err, ProviderError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn group_searches_follow_every_page() {
    let server = ScimServer::start().await;
    let acct = account("paged");
    let scim = server.provider().with_page_size(10);
    let user_id = scim.create_account(&acct).await.expect("create").id;
    let mut expected = BTreeSet::new();
    for i in 0..25 {
        let name = format!("team-{i:02}");
        let id = server.create_group(&name).await;
        // 13 of the 25, on every page.
        if i % 2 == 0 {
            server.add_member(&id, &user_id).await;
            expected.insert(name);
        }
    }

    // The members filter: 13 matches, two pages of 10.
    assert_eq!(roles(scim.list_roles(&acct).await.expect("list")), expected);
    // Every group: three pages of 10.
    let unfiltered = server.provider().with_page_size(10).with_member_filter(false);
    assert_eq!(roles(unfiltered.list_roles(&acct).await.expect("list")), expected);

    // wsgiref logs a request after it has answered it: wait for the log to
    // catch up, then count the pages exactly.
    let group_pages = |server: &ScimServer| -> Vec<String> {
        server.requests().into_iter().filter(|r| r.starts_with("GET /v2/Groups?")).collect()
    };
    let waited = Instant::now();
    while group_pages(&server).len() < 5 && waited.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pages = group_pages(&server);
    let filtered: Vec<&String> = pages.iter().filter(|r| r.contains("filter=members.value")).collect();
    let listed: Vec<&String> = pages.iter().filter(|r| !r.contains("filter=")).collect();
    assert_eq!(filtered.len(), 2, "{pages:#?}");
    assert!(filtered[1].contains("startIndex=11&count=10"), "{pages:#?}");
    assert_eq!(listed.len(), 3, "{pages:#?}");
    assert!(listed[2].contains("startIndex=21&count=10"), "{pages:#?}");

    // Deleting takes the user out of all 13 groups.
    scim.delete_account(&acct).await.expect("delete");
    let everyone = server.admin(reqwest::Method::GET, "/Groups?count=100", None).await;
    let dangling: Vec<&Value> = everyone["Resources"]
        .as_array()
        .expect("groups")
        .iter()
        .filter(|g| g["members"].as_array().is_some_and(|m| m.iter().any(|m| m["value"] == user_id.as_str())))
        .collect();
    assert!(dangling.is_empty(), "{dangling:#?}");
}
