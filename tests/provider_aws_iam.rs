//! The `awsIam` provider against a real IAM server: PyPI's `moto[server]`,
//! one per test, with authentication and authorization on
//! (`tests/common/moto_server.rs` says how it is started and bootstrapped).

mod common;
mod conformance;
#[path = "common/moto_server.rs"]
mod moto_server;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keysmith::provider::aws_iam::{self, AwsIamProvider};
use keysmith::provider::{AccountRequest, IssuedKey, KeyMaterial, KeyRequest, Provider, ProviderError, RoleGrant};
use moto_server::{access_key, creds, text_of, MotoServer as Moto, PATH, POLICIES, REGION};

fn account(name: &str) -> AccountRequest {
    AccountRequest {
        name: name.to_owned(),
        namespace: "payments".to_owned(),
        account_name: format!("{name}-ia"),
        owner_uid: format!("uid-{name}-{:08x}", rand::random::<u32>()),
        description: Some("Billing sync (nightly)".to_owned()),
        owner: Some("team-payments".to_owned()),
        options: BTreeMap::new(),
    }
}

fn key_request(id: &str) -> KeyRequest {
    KeyRequest { key_id: id.to_owned(), lifetime: None }
}

fn assert_unauthorized<T: std::fmt::Debug>(result: Result<T, ProviderError>, code: &str) {
    match result {
        Err(ProviderError::Unauthorized(m)) => assert!(m.contains(code), "expected {code}: {m}"),
        other => panic!("expected Unauthorized ({code}), got {other:?}"),
    }
}

#[tokio::test]
async fn create_is_idempotent_tags_the_user_and_update_fixes_tags() {
    let moto = Moto::start().await;
    let p = moto.provider();
    p.verify_connection().await.expect("the admin's credential works");
    let mut acct = account("billing-sync");

    assert_eq!(p.observe_account(&acct).await.unwrap(), None);
    let created = p.create_account(&acct).await.unwrap();
    assert_eq!(created.id, format!("arn:aws:iam::{}:user/keysmith/billing-sync", moto.account_id));
    assert!(created.owned && !created.drifted && !created.disabled, "{created:?}");
    let again = p.create_account(&acct).await.expect("create is idempotent");
    assert_eq!(again.id, created.id);
    assert_eq!(p.observe_account(&acct).await.unwrap(), Some(created.clone()));

    let want = BTreeMap::from([
        ("app.kubernetes.io/managed-by".to_owned(), "keysmith".to_owned()),
        (keysmith::ownership::ACCOUNT_UID.to_owned(), acct.owner_uid.clone()),
        (keysmith::ownership::INTEGRATION_ACCOUNT.to_owned(), "payments/billing-sync-ia".to_owned()),
        (keysmith::ownership::DESCRIPTION.to_owned(), "Billing sync _nightly_".to_owned()),
        (keysmith::ownership::OWNER.to_owned(), "team-payments".to_owned()),
    ]);
    assert_eq!(moto.tags("billing-sync").await, want);

    // Someone edits the audit tags by hand: observed as drift, fixed by update.
    moto.admin()
        .call(
            "TagUser",
            &[
                ("UserName", "billing-sync"),
                ("Tags.member.1.Key", keysmith::ownership::DESCRIPTION),
                ("Tags.member.1.Value", "hijacked"),
            ],
        )
        .await
        .unwrap();
    moto.admin()
        .call("UntagUser", &[("UserName", "billing-sync"), ("TagKeys.member.1", keysmith::ownership::OWNER)])
        .await
        .unwrap();
    let seen = p.observe_account(&acct).await.unwrap().expect("still there");
    assert!(seen.owned && seen.drifted, "{seen:?}");
    let updated = p.update_account(&acct).await.unwrap();
    assert!(!updated.drifted);
    assert_eq!(moto.tags("billing-sync").await, want);
    assert!(!p.observe_account(&acct).await.unwrap().unwrap().drifted);

    // A description and owner dropped from the spec are dropped from IAM.
    acct.description = None;
    acct.owner = None;
    assert!(p.observe_account(&acct).await.unwrap().unwrap().drifted);
    p.update_account(&acct).await.unwrap();
    let tags = moto.tags("billing-sync").await;
    assert!(
        !tags.contains_key(keysmith::ownership::DESCRIPTION) && !tags.contains_key(keysmith::ownership::OWNER),
        "{tags:?}"
    );
    assert!(!p.observe_account(&acct).await.unwrap().unwrap().drifted);
}

#[tokio::test]
async fn a_user_keysmith_did_not_tag_is_never_adopted() {
    let moto = Moto::start().await;
    let p = moto.provider();
    let acct = account("someone-elses");
    // Made by hand, under keysmith's path, without keysmith's tags.
    moto.admin().call("CreateUser", &[("UserName", "someone-elses"), ("Path", PATH)]).await.unwrap();
    let key = access_key(&moto.admin().call("CreateAccessKey", &[("UserName", "someone-elses")]).await.unwrap());

    let seen = p.observe_account(&acct).await.unwrap().expect("visible");
    assert!(!seen.owned, "{seen:?}");
    for result in [p.create_account(&acct).await, p.update_account(&acct).await] {
        match result {
            Err(ProviderError::Conflict(m)) => assert!(m.contains("someone-elses"), "{m}"),
            other => panic!("adopting a foreign user must be a Conflict, got {other:?}"),
        }
    }
    assert!(matches!(p.issue_key(&acct, &key_request("k")).await, Err(ProviderError::Conflict(_))));
    // Disabling or deleting it leaves it alone.
    p.disable_account(&acct).await.unwrap();
    p.delete_account(&acct).await.unwrap();
    assert!(p.observe_account(&acct).await.unwrap().is_some());
    assert_eq!(moto.key_status("someone-elses").await, BTreeMap::from([(key.0, "Active".to_owned())]));
    assert!(moto.tags("someone-elses").await.is_empty());

    // Nor is a user of that name outside keysmith's path, whatever its tags.
    let elsewhere = account("elsewhere");
    let tags = [
        ("UserName", "elsewhere"),
        ("Path", "/other/"),
        ("Tags.member.1.Key", keysmith::ownership::ACCOUNT_UID),
        ("Tags.member.1.Value", elsewhere.owner_uid.as_str()),
    ];
    moto.admin().call("CreateUser", &tags).await.unwrap();
    assert!(!p.observe_account(&elsewhere).await.unwrap().expect("visible").owned);
    assert!(matches!(p.create_account(&elsewhere).await, Err(ProviderError::Conflict(_))));
    p.delete_account(&elsewhere).await.unwrap();
    assert!(p.observe_account(&elsewhere).await.unwrap().is_some(), "left alone");

    // A user tagged for another IntegrationAccount is not ours either.
    let other = account("billing-sync");
    p.create_account(&other).await.unwrap();
    p.grant_role(&other, &moto.grant("ks-read")).await.unwrap();
    let key = p.issue_key(&other, &key_request("theirs")).await.unwrap();
    let impostor = AccountRequest { owner_uid: "uid-of-someone-else".to_owned(), ..other.clone() };
    assert!(!p.observe_account(&impostor).await.unwrap().unwrap().owned);
    assert!(matches!(p.create_account(&impostor).await, Err(ProviderError::Conflict(_))));
    // Nothing done for the impostor touches the account, its roles or its key.
    assert!(p.update_account(&impostor).await.is_err());
    assert!(p.grant_role(&impostor, &moto.grant("ks-write")).await.is_err());
    assert!(p.issue_key(&impostor, &key_request("mine")).await.is_err());
    let _ = p.revoke_key(&impostor, &key.id).await;
    let _ = p.revoke_role(&impostor, &moto.grant("ks-read")).await;
    let _ = p.disable_account(&impostor).await;
    let _ = p.delete_account(&impostor).await;
    let seen = p.observe_account(&other).await.unwrap().expect("still there");
    assert!(seen.owned && !seen.disabled, "{seen:?}");
    assert_eq!(p.list_roles(&other).await.unwrap(), vec![moto.grant("ks-read")]);
    assert_eq!(moto.key_status("billing-sync").await, BTreeMap::from([(key.id.clone(), "Active".to_owned())]));
}

#[tokio::test]
async fn roles_are_attached_managed_policies() {
    let moto = Moto::start().await;
    // One item per page, so lists follow IAM's Marker (moto pages
    // ListAttachedUserPolicies; it answers ListUserTags and ListAccessKeys
    // in one page whatever MaxItems says).
    let p = moto.provider().with_page_size(1);
    let acct = account("roles");
    p.create_account(&acct).await.unwrap();
    let seen = p.observe_account(&acct).await.unwrap().expect("created");
    assert!(seen.owned && !seen.drifted, "{seen:?}");
    assert!(p.list_roles(&acct).await.unwrap().is_empty());

    for name in POLICIES {
        p.grant_role(&acct, &moto.grant(name)).await.unwrap();
    }
    p.grant_role(&acct, &moto.grant("ks-read")).await.expect("granting twice is fine");
    let page =
        moto.admin().call("ListAttachedUserPolicies", &[("UserName", "roles"), ("MaxItems", "1")]).await.unwrap();
    assert_eq!(text_of(&page, "IsTruncated"), "true", "the server really pages");
    let mut want: Vec<RoleGrant> = POLICIES.iter().map(|n| moto.grant(n)).collect();
    want.sort();
    assert_eq!(p.list_roles(&acct).await.unwrap(), want);

    p.revoke_role(&acct, &moto.grant("ks-write")).await.unwrap();
    p.revoke_role(&acct, &moto.grant("ks-write")).await.expect("revoking twice is fine");
    let held = p.list_roles(&acct).await.unwrap();
    assert_eq!(held, vec![moto.grant("ks-audit"), moto.grant("ks-read")]);
    // The admin's own view agrees.
    let xml = moto.admin().call("ListAttachedUserPolicies", &[("UserName", "roles")]).await.unwrap();
    let arns: BTreeSet<String> = roxmltree::Document::parse(&xml)
        .unwrap()
        .descendants()
        .filter(|n| n.has_tag_name("PolicyArn"))
        .filter_map(|n| n.text().map(str::to_owned))
        .collect();
    assert_eq!(arns, held.iter().map(|g| g.role.clone()).collect());

    match p.grant_role(&acct, &moto.grant("no-such-policy")).await {
        Err(ProviderError::NotFound(m)) => assert!(m.contains("no-such-policy"), "{m}"),
        other => panic!("a missing policy must be NotFound, got {other:?}"),
    }
    let not_an_arn = RoleGrant { role: "ReadOnlyAccess".to_owned(), scope: None };
    assert!(matches!(p.grant_role(&acct, &not_an_arn).await, Err(ProviderError::Invalid(_))));
    let scoped = RoleGrant { scope: Some("somewhere".to_owned()), ..moto.grant("ks-read") };
    assert!(matches!(p.grant_role(&acct, &scoped).await, Err(ProviderError::Invalid(_))));
    assert_eq!(p.list_roles(&account("never-created")).await.unwrap(), vec![]);

    let a = p.issue_key(&acct, &key_request("a")).await.unwrap();
    let b = p.issue_key(&acct, &key_request("b")).await.unwrap();
    let mut ids: Vec<String> = p.list_keys(&acct).await.unwrap().into_iter().map(|k| k.id).collect();
    ids.sort();
    let mut want = vec![a.id, b.id];
    want.sort();
    assert_eq!(ids, want);
}

#[tokio::test]
async fn two_keys_at_most_and_a_revoked_key_is_refused() {
    let moto = Moto::start().await;
    let p = moto.provider();
    assert_eq!(p.capabilities().max_keys_per_account, Some(2));
    let acct = account("keys");
    p.create_account(&acct).await.unwrap();
    let user_arn = format!("arn:aws:iam::{}:user/keysmith/keys", moto.account_id);

    let first = p.issue_key(&acct, &key_request("k1")).await.unwrap();
    p.verify_key(&acct, &first).await.expect("the first key authenticates");
    let second = p.issue_key(&acct, &key_request("k2")).await.unwrap();
    p.verify_key(&acct, &second).await.expect("the second key authenticates");
    assert_ne!(first.id, second.id);
    assert!(first.id.starts_with("AKIA"), "the key id is the access key id: {}", first.id);
    assert_eq!(first.expires_at, None);

    let values = first.material.expose();
    assert_eq!(
        values.keys().map(String::as_str).collect::<Vec<_>>(),
        ["AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL_IAM", "AWS_REGION", "AWS_SECRET_ACCESS_KEY"]
    );
    assert_eq!(values["AWS_ACCESS_KEY_ID"], first.id);
    assert_eq!(values["AWS_REGION"], REGION);
    assert_eq!(values["AWS_ENDPOINT_URL_IAM"], moto.endpoint);
    assert!(!format!("{first:?}").contains(&values["AWS_SECRET_ACCESS_KEY"]), "Debug hides the secret");

    match p.issue_key(&acct, &key_request("k3")).await {
        Err(ProviderError::LimitExceeded(m)) => assert!(m.contains("2 access keys"), "{m}"),
        other => panic!("a third key must be LimitExceeded, got {other:?}"),
    }
    // Nothing was deleted to make room.
    let mut ids: Vec<String> = p.list_keys(&acct).await.unwrap().into_iter().map(|k| k.id).collect();
    ids.sort();
    let mut want = vec![first.id.clone(), second.id.clone()];
    want.sort();
    assert_eq!(ids, want);
    assert!(p.list_keys(&acct).await.unwrap().iter().all(|k| k.created_at.is_some()));

    assert_eq!(moto.whoami(&first).await, Ok(user_arn.clone()));
    p.revoke_key(&acct, &first.id).await.unwrap();
    p.revoke_key(&acct, &first.id).await.expect("revoking twice is fine");
    let refused = moto.whoami(&first).await.expect_err("a revoked key is refused");
    assert!(refused.contains("InvalidClientTokenId"), "{refused}");
    assert_eq!(moto.whoami(&second).await, Ok(user_arn));
    // The user holds no IAM rights: its key authenticates, then is denied.
    let (id, secret) = creds(&second.material);
    assert_unauthorized(moto.iam(&id, &secret).call("ListUsers", &[]).await, "AccessDenied");

    let third = p.issue_key(&acct, &key_request("k3")).await.expect("room again after a revocation");
    p.verify_key(&acct, &third).await.unwrap();
    assert_eq!(p.list_keys(&acct).await.unwrap().len(), 2);
    assert!(p.list_keys(&account("never-created")).await.unwrap().is_empty());
}

#[tokio::test]
async fn verify_key_really_authenticates() {
    let moto = Moto::start().await;
    let p = moto.provider().with_verify_window(Duration::from_secs(1));
    let acct = account("verified");
    let other = account("other");
    p.create_account(&acct).await.unwrap();
    p.create_account(&other).await.unwrap();
    let key = p.issue_key(&acct, &key_request("k1")).await.unwrap();
    p.verify_key(&acct, &key).await.unwrap();

    let tampered = |key: &IssuedKey, name: &str, value: &str| {
        let mut values = key.material.expose().clone();
        values.insert(name.to_owned(), value.to_owned());
        IssuedKey { material: KeyMaterial::new(values), ..key.clone() }
    };
    let started = Instant::now();
    let bogus_secret = tampered(&key, aws_iam::SECRET_ACCESS_KEY_KEY, "bogus-secret-bogus-secret-bogus-secret1");
    match p.verify_key(&acct, &bogus_secret).await {
        Err(ProviderError::Transient { message, .. }) => {
            assert!(message.contains("SignatureDoesNotMatch"), "{message}");
            assert!(!message.contains("bogus-secret"), "the secret never shows: {message}");
        }
        other => panic!("a bogus secret must fail verification, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(500), "refusals are retried for a while");
    let bogus_id = tampered(&key, aws_iam::ACCESS_KEY_ID_KEY, "AKIAIOSFODNN7BOGUSXX");
    assert!(p.verify_key(&acct, &bogus_id).await.is_err());
    // A working key of another user does not verify as this one's.
    let others = p.issue_key(&other, &key_request("k1")).await.unwrap();
    assert!(matches!(p.verify_key(&acct, &others).await, Err(ProviderError::Conflict(_))));
    let no_secret = IssuedKey { material: KeyMaterial::default(), ..key.clone() };
    assert!(matches!(p.verify_key(&acct, &no_secret).await, Err(ProviderError::Invalid(_))));
}

#[tokio::test]
async fn disable_deactivates_every_key_and_update_brings_them_back() {
    let moto = Moto::start().await;
    let p = moto.provider();
    assert!(p.capabilities().disable);
    let acct = account("paused");
    p.create_account(&acct).await.unwrap();
    let a = p.issue_key(&acct, &key_request("a")).await.unwrap();
    let b = p.issue_key(&acct, &key_request("b")).await.unwrap();

    p.disable_account(&acct).await.unwrap();
    p.disable_account(&acct).await.expect("disabling twice is fine");
    let seen = p.observe_account(&acct).await.unwrap().unwrap();
    assert!(seen.disabled && seen.owned, "{seen:?}");
    let inactive = BTreeMap::from([(a.id.clone(), "Inactive".to_owned()), (b.id.clone(), "Inactive".to_owned())]);
    assert_eq!(moto.key_status("paused").await, inactive);

    p.update_account(&acct).await.unwrap();
    let seen = p.observe_account(&acct).await.unwrap().unwrap();
    assert!(!seen.disabled && !seen.drifted, "{seen:?}");
    let active = BTreeMap::from([(a.id.clone(), "Active".to_owned()), (b.id.clone(), "Active".to_owned())]);
    assert_eq!(moto.key_status("paused").await, active);
    assert!(!moto.tags("paused").await.contains_key(keysmith::ownership::DISABLED));

    p.disable_account(&account("never-created")).await.expect("disabling what is gone is fine");
}

#[tokio::test]
async fn delete_removes_keys_policies_and_the_user() {
    let moto = Moto::start().await;
    let p = moto.provider();
    let acct = account("doomed");
    p.create_account(&acct).await.unwrap();
    p.grant_role(&acct, &moto.grant("ks-read")).await.unwrap();
    p.grant_role(&acct, &moto.grant("ks-write")).await.unwrap();
    let a = p.issue_key(&acct, &key_request("a")).await.unwrap();
    let b = p.issue_key(&acct, &key_request("b")).await.unwrap();

    p.delete_account(&acct).await.unwrap();
    assert_eq!(p.observe_account(&acct).await.unwrap(), None);
    match moto.admin().call("GetUser", &[("UserName", "doomed")]).await {
        Err(ProviderError::NotFound(m)) => assert!(m.contains("NoSuchEntity"), "{m}"),
        other => panic!("the user must be gone, got {other:?}"),
    }
    for key in [&a, &b] {
        let refused = moto.whoami(key).await.expect_err("keys of a deleted user are refused");
        assert!(refused.contains("InvalidClientTokenId"), "{refused}");
    }
    p.delete_account(&acct).await.expect("deleting twice is fine");

    // The policies were detached, not deleted: another user can hold them.
    let next = account("next");
    p.create_account(&next).await.unwrap();
    p.grant_role(&next, &moto.grant("ks-read")).await.unwrap();
    assert_eq!(p.list_roles(&next).await.unwrap(), vec![moto.grant("ks-read")]);
}

#[tokio::test]
async fn refused_or_powerless_credentials_are_unauthorized() {
    let moto = Moto::start().await;
    let acct = account("anyone");

    // A user without any policy: authenticated, then denied everything.
    let powerless = moto.provider_with(&moto.powerless_key);
    assert_unauthorized(powerless.verify_connection().await, "AccessDenied");
    assert_unauthorized(powerless.create_account(&acct).await, "AccessDenied");
    assert_unauthorized(powerless.observe_account(&acct).await, "AccessDenied");

    // The admin's key with a wrong secret: the signature does not match.
    let wrong_secret = moto.provider_with(&(moto.admin_key.0.clone(), "not-the-secret".to_owned()));
    match wrong_secret.verify_connection().await {
        Err(ProviderError::Unauthorized(m)) => {
            assert!(m.contains("SignatureDoesNotMatch"), "{m}");
            assert!(!m.contains("not-the-secret") && !m.contains(&moto.admin_key.1), "no secret in errors: {m}");
        }
        other => panic!("a wrong secret must be Unauthorized, got {other:?}"),
    }
    // A key id IAM never issued.
    let unknown = moto.provider_with(&("AKIAIOSFODNN7UNKNOWN".to_owned(), "whatever".to_owned()));
    assert_unauthorized(unknown.verify_connection().await, "InvalidClientTokenId");

    // The admin itself holds only what keysmith needs.
    moto.provider().verify_connection().await.unwrap();
    assert_unauthorized(moto.admin().call("ListUsers", &[]).await, "AccessDenied");
    assert_unauthorized(
        moto.admin().call("PutUserPolicy", &[("UserName", "x"), ("PolicyName", "p"), ("PolicyDocument", "{}")]).await,
        "AccessDenied",
    );
}

/// The conformance suite's view of moto.
struct MotoTarget {
    moto: Moto,
}

#[async_trait::async_trait]
impl conformance::Target for MotoTarget {
    fn provider(&self) -> Arc<dyn Provider> {
        Arc::new(self.moto.provider())
    }
    fn upstream(&self) -> (String, reqwest::Client) {
        (self.moto.endpoint.clone(), self.moto.http.clone())
    }
    async fn provider_via(&self, url: &str) -> Arc<dyn Provider> {
        // An HTTP proxy in the true sense: requests still name (and sign)
        // moto's host, which SigV4 covers; the proxy only relays them.
        let http = reqwest::Client::builder().proxy(reqwest::Proxy::http(url).unwrap()).build().unwrap();
        let provider = AwsIamProvider::new(
            self.moto.endpoint.clone(),
            REGION.to_owned(),
            PATH.to_owned(),
            self.moto.admin_key.0.clone(),
            self.moto.admin_key.1.clone(),
            http,
        );
        Arc::new(provider.with_request_timeout(Duration::from_secs(2)))
    }
    async fn refused_provider(&self) -> Arc<dyn Provider> {
        Arc::new(self.moto.provider_with(&(self.moto.admin_key.0.clone(), "wrong".to_owned())))
    }
    fn account(&self, name: &str) -> AccountRequest {
        account(&format!("conf-{name}"))
    }
    fn roles(&self) -> [RoleGrant; 2] {
        [self.moto.grant("ks-read"), self.moto.grant("ks-write")]
    }
    async fn make_foreign_account(&self, name: &str) {
        self.moto.admin().call("CreateUser", &[("UserName", name), ("Path", PATH)]).await.unwrap();
    }
    async fn key_works(&self, key: &IssuedKey) -> bool {
        self.moto.whoami(key).await.is_ok()
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let target = MotoTarget { moto: Moto::start().await };
            conformance::$name(&target).await;
        }
    )*};
}

conformance!(
    another_integration_accounts_account_is_never_taken_over,
    create_is_idempotent_and_adopts_nothing,
    delete_tolerates_not_found,
    role_sync_adds_and_removes,
    refused_credential_is_unauthorized,
    throttling_and_outages_are_transient,
    rate_budget_is_never_exceeded,
);

/// The suite's key test: issue, verify, list, the two-key limit, revoke.
#[tokio::test]
async fn keys_issue_verify_and_revoke() {
    let target = MotoTarget { moto: Moto::start().await };
    conformance::keys_issue_verify_and_revoke(&target).await;
}

/// IAM says when each access key was last used; keysmith reports it per
/// key. moto records a use whenever a request is signed with the key, as
/// AWS does.
#[tokio::test]
async fn list_keys_reports_when_each_access_key_was_last_used() {
    let moto = Moto::start().await;
    let p = moto.provider();
    let acct = account("last-used");
    p.create_account(&acct).await.unwrap();
    let used = p.issue_key(&acct, &key_request("k-used")).await.unwrap();
    let idle = p.issue_key(&acct, &key_request("k-idle")).await.unwrap();
    assert_eq!(p.capabilities().last_use_lag, Some(aws_iam::LAST_USE_LAG));
    let listed = p.list_keys(&acct).await.unwrap();
    assert!(listed.iter().all(|k| k.last_used.is_none()), "nothing used yet: {listed:?}");

    let before = jiff::Timestamp::now().as_second();
    moto.whoami(&used).await.expect("the key signs a request");
    let listed = p.list_keys(&acct).await.unwrap();
    let of = |id: &str| listed.iter().find(|k| k.id == id).unwrap().last_used;
    let at = of(&used.id).expect("the used key's last use").as_second();
    assert!((before - 2..=jiff::Timestamp::now().as_second() + 2).contains(&at), "used at {at}, asked at {before}");
    assert_eq!(of(&idle.id), None, "the other key was never used");
    p.delete_account(&acct).await.unwrap();
}

/// An admin policy from before keysmith read last use (no
/// iam:GetAccessKeyLastUsed) keeps every account working: last use is then
/// not reported, rather than every observation failing.
#[tokio::test]
async fn an_admin_policy_without_last_use_keeps_accounts_working() {
    let moto = Moto::start().await;
    let p = moto.provider_with(&moto.old_admin_key);
    let acct = account("old-policy");
    p.create_account(&acct).await.unwrap();
    let key = p.issue_key(&acct, &key_request("k-old")).await.unwrap();
    moto.whoami(&key).await.expect("the key signs a request");
    let listed = p.list_keys(&acct).await.expect("listing keys still works");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].last_used, None, "not known, not reported");
    assert_eq!(p.capabilities().last_use_lag, None, "and the provider says it cannot tell");
    p.delete_account(&acct).await.unwrap();
}
