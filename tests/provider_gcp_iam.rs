//! The `gcpIam` provider against the contract fake of Google Cloud IAM
//! (`tests/gcp/fake_gcp.py`, started per test by `tests/common/gcp_server.rs`):
//! no real Google Cloud can run here. The fake checks every request keysmith
//! sends against Google's own discovery documents (`iam.v1`,
//! `cloudresourcemanager.v1`), and each test ends by asserting it recorded
//! no violation. keysmith authenticates as Google's client libraries do: the
//! connection's service-account key file, exchanged for access tokens with
//! a signed JWT the fake verifies with the key's public half.

mod common;
mod conformance;
#[path = "common/gcp_server.rs"]
mod gcp_server;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use gcp_server::{GcpServer, PROJECT};
use keysmith::provider::{
    gcp_iam::{GcpIamProvider, CREDENTIALS_KEY},
    AccountRequest, IssuedKey, KeyRequest, Provider, ProviderError, RoleGrant,
};
use serde_json::{json, Value};

fn account(name: &str) -> AccountRequest {
    AccountRequest {
        name: name.to_owned(),
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
    KeyRequest { key_id: id.to_owned(), lifetime: None }
}

fn email(name: &str) -> String {
    format!("{name}@{PROJECT}.iam.gserviceaccount.com")
}

async fn no_violations(gcp: &GcpServer) {
    let violations = gcp.violations().await;
    assert!(violations.is_empty(), "requests that break Google's API description: {violations:#?}");
}

/// The conformance suite's view of the fake.
struct Fake {
    gcp: GcpServer,
}

#[async_trait::async_trait]
impl conformance::Target for Fake {
    fn provider(&self) -> Arc<dyn Provider> {
        Arc::new(self.gcp.provider())
    }
    fn upstream(&self) -> (String, reqwest::Client) {
        (self.gcp.url.clone(), self.gcp.http.clone())
    }
    async fn provider_via(&self, url: &str) -> Arc<dyn Provider> {
        Arc::new(self.gcp.provider_via(url.trim_end_matches('/')).with_timeout(Duration::from_secs(2)))
    }
    async fn refused_provider(&self) -> Arc<dyn Provider> {
        // A key id the fake never issued: the token exchange is refused.
        let mut file: Value = serde_json::from_str(&self.gcp.admin_key_file).unwrap();
        file["private_key_id"] = json!("0000000000000000000000000000000000000000");
        let provider = GcpIamProvider::new(
            PROJECT.to_owned(),
            format!("{}/iam", self.gcp.url),
            format!("{}/crm", self.gcp.url),
            &file.to_string(),
            self.gcp.http.clone(),
        )
        .unwrap();
        Arc::new(provider)
    }
    fn account(&self, name: &str) -> AccountRequest {
        account(&format!("conf-{}", name.replace('_', "-")))
    }
    fn roles(&self) -> [RoleGrant; 2] {
        [role("roles/logging.viewer"), role("roles/monitoring.viewer")]
    }
    async fn make_foreign_account(&self, name: &str) {
        self.gcp.make_account(name, "made by hand").await;
    }
    async fn key_works(&self, key: &IssuedKey) -> bool {
        self.gcp.key_works(key).await
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let target = Fake { gcp: GcpServer::start().await };
            conformance::$name(&target).await;
            no_violations(&target.gcp).await;
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

/// The service account carries keysmith's ownership tag and who it is for;
/// drift is repaired; a disabled account is enabled by an update.
#[tokio::test]
async fn the_account_says_whose_it_is_and_drift_is_repaired() {
    let gcp = GcpServer::start().await;
    let p = gcp.provider();
    let acct = account("billing-export");
    let created = p.create_account(&acct).await.expect("create");
    assert_eq!(created.id, email("billing-export"));
    let (status, found) = gcp.iam("GET", &format!("projects/{PROJECT}/serviceAccounts/{}", created.id), None).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["displayName"], "payments/billing-export");
    let description = found["description"].as_str().unwrap();
    assert!(description.starts_with(&format!("keysmith:{}\n", acct.owner_uid)), "{description}");
    assert!(description.contains("owner: team-payments"), "{description}");

    // Google's limits are in bytes: a long description in German fits.
    let german = AccountRequest {
        name: "abrechnung-export".to_owned(),
        description: Some("Abrechnungsexport für Zürich, täglich ".repeat(12)),
        ..account("abrechnung-export")
    };
    p.create_account(&german).await.expect("cut to 256 bytes, not 256 characters");
    assert!(!p.observe_account(&german).await.unwrap().unwrap().drifted);

    let changed = AccountRequest { owner: Some("team-finance".to_owned()), ..acct.clone() };
    assert!(p.observe_account(&changed).await.unwrap().unwrap().drifted);
    p.disable_account(&changed).await.expect("disable");
    assert!(p.observe_account(&changed).await.unwrap().unwrap().disabled);
    let updated = p.update_account(&changed).await.expect("update");
    assert!(!updated.drifted && !updated.disabled, "{updated:?}");
    let seen = p.observe_account(&changed).await.unwrap().unwrap();
    assert!(!seen.drifted && !seen.disabled && seen.owned, "{seen:?}");
    no_violations(&gcp).await;
}

/// A name Google refuses is a readable Invalid before any call.
#[tokio::test]
async fn a_name_google_refuses_is_invalid_and_says_what_to_set() {
    let gcp = GcpServer::start().await;
    let p = gcp.provider();
    for name in ["payments.billing", "short", "Billing-export"] {
        let err = p.create_account(&account(name)).await.expect_err(name);
        assert!(matches!(&err, ProviderError::Invalid(m) if m.contains("providerOptions.name")), "{name}: {err}");
    }
    assert!(gcp.fake("GET", "service-accounts", None).await.as_array().unwrap().len() == 1, "only the admin");
    no_violations(&gcp).await;
}

/// Roles are the project policy's unconditional bindings: read at version
/// 3, written with the etag read, conditions and audit configs kept, and a
/// concurrent writer's change is read again, not overwritten.
#[tokio::test]
async fn roles_keep_the_rest_of_the_policy_and_survive_a_concurrent_writer() {
    let gcp = GcpServer::start().await;
    let p = gcp.provider();
    let acct = account("policy-keeper");
    p.create_account(&acct).await.unwrap();
    let before = gcp.policy().await;

    gcp.fake("POST", "config", Some(json!({"concurrent_change": true}))).await;
    p.grant_role(&acct, &role("roles/logging.viewer")).await.expect("grant, after one ABORTED");
    let after = gcp.policy().await;
    assert_eq!(after["version"], 3);
    assert_eq!(after["auditConfigs"], before["auditConfigs"], "audit configs kept");
    let conditional: Vec<&Value> =
        after["bindings"].as_array().unwrap().iter().filter(|b| b.get("condition").is_some()).collect();
    assert_eq!(conditional.len(), 1, "the conditional binding is kept: {after}");
    let browser = after["bindings"].as_array().unwrap().iter().find(|b| b["role"] == "roles/browser");
    assert!(browser.is_some(), "the other writer's binding is kept: {after}");
    assert_eq!(gcp.roles_of(&email("policy-keeper")).await, ["roles/logging.viewer"]);

    p.grant_role(&acct, &role("roles/monitoring.viewer")).await.unwrap();
    p.revoke_role(&acct, &role("roles/logging.viewer")).await.unwrap();
    assert_eq!(gcp.roles_of(&email("policy-keeper")).await, ["roles/monitoring.viewer"]);

    let err = p.grant_role(&acct, &role("viewer")).await.expect_err("not a role name");
    assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");

    // Deletion takes the account's bindings with it.
    p.delete_account(&acct).await.unwrap();
    let text = gcp.policy().await.to_string();
    assert!(!text.contains("policy-keeper"), "no binding left, not even deleted:serviceAccount: {text}");
    no_violations(&gcp).await;
}

/// The key file is the Secret's value; it works; the tenth key is the last;
/// an organization policy forbidding keys is Invalid and says so; revoking
/// disables, then deletes.
#[tokio::test]
async fn keys_are_key_files_within_googles_limit() {
    let gcp = GcpServer::start().await;
    let p = gcp.provider();
    let acct = account("key-holder");
    p.create_account(&acct).await.unwrap();
    let first = p.issue_key(&acct, &key_request("k0")).await.expect("a key");
    assert_eq!(first.material.expose().keys().collect::<Vec<_>>(), [CREDENTIALS_KEY]);
    let file: Value = serde_json::from_str(&first.material.expose()[CREDENTIALS_KEY]).unwrap();
    assert_eq!(file["type"], "service_account");
    assert_eq!(file["client_email"], email("key-holder"));
    assert_eq!(file["private_key_id"], first.id.as_str());
    assert!(!format!("{first:?}").contains("PRIVATE KEY"), "Debug shows the key");
    p.verify_key(&acct, &first).await.expect("verified by a token exchange");
    assert!(gcp.key_works(&first).await);

    for i in 1..10 {
        p.issue_key(&acct, &key_request(&format!("k{i}"))).await.expect("within the limit");
    }
    let err = p.issue_key(&acct, &key_request("k10")).await.expect_err("the eleventh");
    assert!(matches!(&err, ProviderError::LimitExceeded(m) if m.contains("10 keys")), "{err:?}");
    assert_eq!(p.list_keys(&acct).await.unwrap().len(), 10);

    p.revoke_key(&acct, &first.id).await.expect("revoke");
    assert!(!gcp.key_works(&first).await, "refused once revoked");
    let record = gcp.keys().await.into_iter().find(|k| k["keyId"] == first.id.as_str()).expect("the fake's record");
    assert_eq!((record["disabled"].clone(), record["deleted"].clone()), (json!(true), json!(true)), "{record}");
    p.revoke_key(&acct, &first.id).await.expect("revoking twice is fine");

    gcp.fake("POST", "config", Some(json!({"disable_key_creation": true}))).await;
    let err = p.issue_key(&acct, &key_request("blocked")).await.expect_err("forbidden");
    assert!(
        matches!(&err, ProviderError::Invalid(m) if m.contains("constraints/iam.disableServiceAccountKeyCreation")),
        "{err:?}"
    );

    // A key of another account is not this account's.
    let other = account("other-holder");
    p.create_account(&other).await.unwrap();
    gcp.fake("POST", "config", Some(json!({"disable_key_creation": false}))).await;
    let foreign = p.issue_key(&other, &key_request("o1")).await.unwrap();
    let err = p.verify_key(&acct, &foreign).await.expect_err("not its key");
    assert!(matches!(err, ProviderError::Conflict(_)), "{err:?}");
    no_violations(&gcp).await;
}

/// Google's reads lag its writes: a new account may be answered 404 for a
/// while. Creating again is then a wait, not a second account or an error.
#[tokio::test]
async fn a_new_account_not_yet_visible_is_waited_for() {
    let gcp = GcpServer::start().await;
    gcp.fake("POST", "config", Some(json!({"consistency_delay": 4.0}))).await;
    let p = gcp.provider();
    let acct = account("slow-to-show");
    p.create_account(&acct).await.expect("create");
    assert_eq!(p.observe_account(&acct).await.unwrap(), None, "not visible yet");
    let err = p.create_account(&acct).await.expect_err("exists, not visible");
    assert!(matches!(err, ProviderError::Transient { .. }), "{err:?}");
    for result in [
        p.grant_role(&acct, &role("roles/logging.viewer")).await,
        p.issue_key(&acct, &key_request("early")).await.map(|_| ()),
    ] {
        let err = result.expect_err("not yet");
        assert!(matches!(err, ProviderError::Transient { .. }), "waited for, not a change to wait on: {err:?}");
    }
    tokio::time::sleep(Duration::from_millis(4200)).await;
    assert!(p.observe_account(&acct).await.unwrap().is_some_and(|a| a.owned));
    p.grant_role(&acct, &role("roles/logging.viewer")).await.expect("now");
    no_violations(&gcp).await;
}

/// Quota errors come without Retry-After: transient all the same. A refused
/// admin key is Unauthorized, and no message shows a private key or token.
#[tokio::test]
async fn quota_is_transient_and_a_refused_credential_is_unauthorized_without_secrets() {
    let gcp = GcpServer::start().await;
    let p = gcp.provider();
    gcp.fake("POST", "config", Some(json!({"quota_exhausted_next": 1}))).await;
    let err = p.observe_account(&account("quota-check")).await.expect_err("429");
    assert!(matches!(err, ProviderError::Transient { retry_after: None, .. }), "{err:?}");
    p.verify_connection().await.expect("the admin's key file works");

    let mut file: Value = serde_json::from_str(&gcp.admin_key_file).unwrap();
    let private_key = file["private_key"].as_str().unwrap().to_owned();
    file["client_email"] = json!(email("nobody-here"));
    let refused = GcpIamProvider::new(
        PROJECT.to_owned(),
        format!("{}/iam", gcp.url),
        format!("{}/crm", gcp.url),
        &file.to_string(),
        gcp.http.clone(),
    )
    .unwrap();
    let err = refused.verify_connection().await.expect_err("refused");
    assert!(matches!(err, ProviderError::Unauthorized(_)), "{err:?}");
    let body: String = private_key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!err.to_string().contains(&body[..40]), "{err}");
    assert!(!format!("{refused:?}").contains(&body[..40]));

    let broken = GcpIamProvider::new(PROJECT.to_owned(), String::new(), String::new(), "{}", gcp.http.clone());
    assert!(matches!(broken, Err(ProviderError::Invalid(_))));
    no_violations(&gcp).await;
}
