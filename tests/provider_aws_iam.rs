//! The `awsIam` provider against a real IAM server: PyPI's `moto[server]`
//! (installed by `.ci/run`), one per test on a free loopback port, started by
//! the test and killed when it ends. `MOTO_SERVER` names another binary.
//!
//! Authentication and authorization are on: the server starts with
//! `INITIAL_NO_AUTH_ACTION_COUNT` set to the number of bootstrap calls, so
//! only those (made with made-up root credentials) go unchecked. They create
//! the admin user keysmith acts as, with an inline policy granting only
//! [`aws_iam::ADMIN_USER_ACTIONS`], and its access key; a second user without
//! any policy, and its key; and three managed policies to grant. From then
//! on moto checks every call's SigV4 signature against the key's secret and
//! the caller's IAM policies, as AWS does.
//!
//! moto authorizes IAM actions on users against the resource `*` (its
//! `IamResponse._determine_resource` names only roles), so a policy scoped to
//! `arn:aws:iam::*:user/keysmith/*`, as the module docs recommend, denies
//! everything there: the test policy grants the documented actions on `*`.
//! moto also accepts `Inactive` keys, so disabling is checked by the keys'
//! status rather than by a refused call.

mod common;
mod conformance;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keysmith::provider::aws_iam::{self, AwsIamProvider, QueryClient};
use keysmith::provider::{AccountRequest, IssuedKey, KeyMaterial, KeyRequest, Provider, ProviderError, RoleGrant};

const STARTUP: Duration = Duration::from_secs(60);
const REGION: &str = "eu-west-1";
const PATH: &str = "/keysmith/";
const ADMIN: &str = "keysmith-admin";
const POWERLESS: &str = "powerless";
const POLICIES: [&str; 3] = ["ks-read", "ks-write", "ks-audit"];
/// The calls [`Moto::start`] makes before authentication is switched on.
const BOOTSTRAP_CALLS: usize = 8;

/// A moto server on 127.0.0.1 with IAM authentication on, killed on drop.
struct Moto {
    child: Child,
    endpoint: String,
    log: tempfile::NamedTempFile,
    http: reqwest::Client,
    admin_key: (String, String),
    powerless_key: (String, String),
    account_id: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    async fn start() -> Self {
        let binary = std::env::var("MOTO_SERVER").unwrap_or_else(|_| "moto_server".to_owned());
        let http = reqwest::Client::builder().no_proxy().build().expect("an HTTP client");
        let mut last_log = String::new();
        // A port found free may be taken before the server binds it: try again.
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("its address").port();
            let log = tempfile::NamedTempFile::new().expect("a log file");
            let child = Command::new(&binary)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("INITIAL_NO_AUTH_ACTION_COUNT", BOOTSTRAP_CALLS.to_string())
                .stdin(Stdio::null())
                .stdout(log.reopen().expect("log file"))
                .stderr(log.reopen().expect("log file"))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {binary}: {e}; install it with `pip install 'moto[server]'`"));
            let mut server = Moto {
                child,
                endpoint: format!("http://127.0.0.1:{port}"),
                log,
                http: http.clone(),
                admin_key: Default::default(),
                powerless_key: Default::default(),
                account_id: String::new(),
            };
            let started = Instant::now();
            while started.elapsed() < STARTUP {
                if let Ok(Some(_)) = server.child.try_wait() {
                    break;
                }
                // moto's own API: not an AWS action, so it does not count
                // against INITIAL_NO_AUTH_ACTION_COUNT.
                let probe = http.get(format!("{}/moto-api/data.json", server.endpoint)).send().await;
                if probe.is_ok_and(|r| r.status().is_success()) {
                    server.bootstrap().await;
                    return server;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            last_log = server.log_text();
        }
        panic!("moto_server did not start:\n{last_log}");
    }

    fn log_text(&self) -> String {
        let mut text = String::new();
        let _ = self.log.reopen().and_then(|mut f| f.read_to_string(&mut text));
        text
    }

    /// The [`BOOTSTRAP_CALLS`] unauthenticated calls, then proof that
    /// authentication is on.
    async fn bootstrap(&mut self) {
        let root = self.iam("AKIAROOTROOTROOTROOT", "made-up root secret");
        let call = |action: &'static str, params: Vec<(&'static str, String)>| {
            let root = root.clone();
            async move {
                let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
                root.call(action, &refs).await.unwrap_or_else(|e| panic!("bootstrap {action}: {e}"))
            }
        };
        let admin_policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": aws_iam::ADMIN_USER_ACTIONS, "Resource": "*"}],
        });
        let created = call("CreateUser", vec![("UserName", ADMIN.into())]).await;
        self.account_id = text_of(&created, "Arn").split(':').nth(4).expect("an account id").to_owned();
        call(
            "PutUserPolicy",
            vec![
                ("UserName", ADMIN.into()),
                ("PolicyName", "keysmith".into()),
                ("PolicyDocument", admin_policy.to_string()),
            ],
        )
        .await;
        self.admin_key = access_key(&call("CreateAccessKey", vec![("UserName", ADMIN.into())]).await);
        call("CreateUser", vec![("UserName", POWERLESS.into())]).await;
        self.powerless_key = access_key(&call("CreateAccessKey", vec![("UserName", POWERLESS.into())]).await);
        let grantable = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}],
        });
        for name in POLICIES {
            call("CreatePolicy", vec![("PolicyName", name.into()), ("PolicyDocument", grantable.to_string())]).await;
        }
        // From here on every call is authenticated and authorized.
        match root.call("GetUser", &[("UserName", ADMIN)]).await {
            Err(ProviderError::Unauthorized(m)) => assert!(m.contains("InvalidClientTokenId"), "{m}"),
            other => panic!("made-up root credentials must be refused after the bootstrap, got {other:?}"),
        }
    }

    fn iam(&self, access_key_id: &str, secret: &str) -> QueryClient {
        QueryClient::iam(&self.endpoint, REGION, access_key_id, secret, self.http.clone())
    }

    fn sts(&self, access_key_id: &str, secret: &str) -> QueryClient {
        QueryClient::sts(&self.endpoint, REGION, access_key_id, secret, self.http.clone())
    }

    /// Raw IAM calls as the admin keysmith acts as.
    fn admin(&self) -> QueryClient {
        self.iam(&self.admin_key.0, &self.admin_key.1)
    }

    fn provider_with(&self, key: &(String, String)) -> AwsIamProvider {
        AwsIamProvider::new(
            self.endpoint.clone(),
            REGION.to_owned(),
            PATH.to_owned(),
            key.0.clone(),
            key.1.clone(),
            self.http.clone(),
        )
    }

    fn provider(&self) -> AwsIamProvider {
        self.provider_with(&self.admin_key)
    }

    fn policy_arn(&self, name: &str) -> String {
        format!("arn:aws:iam::{}:policy/{name}", self.account_id)
    }

    fn grant(&self, name: &str) -> RoleGrant {
        RoleGrant { role: self.policy_arn(name), scope: None }
    }

    /// The user's tags, read by the admin.
    async fn tags(&self, user: &str) -> BTreeMap<String, String> {
        let xml = self.admin().call("ListUserTags", &[("UserName", user)]).await.expect("ListUserTags");
        let doc = roxmltree::Document::parse(&xml).expect("XML");
        doc.descendants().filter(|n| n.has_tag_name("member")).map(|m| (child(m, "Key"), child(m, "Value"))).collect()
    }

    /// The user's access keys and their status, read by the admin.
    async fn key_status(&self, user: &str) -> BTreeMap<String, String> {
        let xml = self.admin().call("ListAccessKeys", &[("UserName", user)]).await.expect("ListAccessKeys");
        let doc = roxmltree::Document::parse(&xml).expect("XML");
        doc.descendants()
            .filter(|n| n.has_tag_name("member"))
            .map(|m| (child(m, "AccessKeyId"), child(m, "Status")))
            .collect()
    }

    /// Who `key` authenticates as (STS GetCallerIdentity needs no
    /// permission), or the error code that refused it.
    async fn whoami(&self, key: &IssuedKey) -> Result<String, String> {
        let (id, secret) = creds(&key.material);
        match self.sts(&id, &secret).call("GetCallerIdentity", &[]).await {
            Ok(xml) => Ok(text_of(&xml, "Arn")),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn child(node: roxmltree::Node<'_, '_>, name: &str) -> String {
    node.children().find(|n| n.has_tag_name(name)).and_then(|n| n.text()).unwrap_or_default().to_owned()
}

fn text_of(xml: &str, name: &str) -> String {
    let doc = roxmltree::Document::parse(xml).expect("XML");
    doc.descendants().find(|n| n.has_tag_name(name)).and_then(|n| n.text()).unwrap_or_default().to_owned()
}

fn access_key(xml: &str) -> (String, String) {
    (text_of(xml, "AccessKeyId"), text_of(xml, "SecretAccessKey"))
}

fn creds(material: &KeyMaterial) -> (String, String) {
    let values = material.expose();
    (values[aws_iam::ACCESS_KEY_ID_KEY].clone(), values[aws_iam::SECRET_ACCESS_KEY_KEY].clone())
}

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
        (aws_iam::ACCOUNT_UID_TAG.to_owned(), acct.owner_uid.clone()),
        (aws_iam::INTEGRATION_ACCOUNT_TAG.to_owned(), "payments/billing-sync-ia".to_owned()),
        (aws_iam::DESCRIPTION_TAG.to_owned(), "Billing sync _nightly_".to_owned()),
        (aws_iam::OWNER_TAG.to_owned(), "team-payments".to_owned()),
    ]);
    assert_eq!(moto.tags("billing-sync").await, want);

    // Someone edits the audit tags by hand: observed as drift, fixed by update.
    moto.admin()
        .call(
            "TagUser",
            &[
                ("UserName", "billing-sync"),
                ("Tags.member.1.Key", aws_iam::DESCRIPTION_TAG),
                ("Tags.member.1.Value", "hijacked"),
            ],
        )
        .await
        .unwrap();
    moto.admin()
        .call("UntagUser", &[("UserName", "billing-sync"), ("TagKeys.member.1", aws_iam::OWNER_TAG)])
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
    assert!(!tags.contains_key(aws_iam::DESCRIPTION_TAG) && !tags.contains_key(aws_iam::OWNER_TAG), "{tags:?}");
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
        ("Tags.member.1.Key", aws_iam::ACCOUNT_UID_TAG),
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
    let impostor = AccountRequest { owner_uid: "uid-of-someone-else".to_owned(), ..other.clone() };
    assert!(!p.observe_account(&impostor).await.unwrap().unwrap().owned);
    assert!(matches!(p.create_account(&impostor).await, Err(ProviderError::Conflict(_))));
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
    assert!(!moto.tags("paused").await.contains_key(aws_iam::DISABLED_TAG));

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
