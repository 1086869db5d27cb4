//! The `zabbix` provider end to end: the operator as its own process, scoped
//! to a test namespace on the real kube-apiserver, managing users, their
//! roles' API allow-lists and their API tokens in a real Zabbix 6.0
//! (`tests/common/zabbix_server.rs`, started by each test). Every assertion
//! is made on real effects: what Zabbix holds, and what it lets the token
//! in the output Secret do.

mod common;
#[path = "common/zabbix_server.rs"]
mod zabbix_server;

use std::time::Duration;

use common::{
    apply_yaml, assert_manifests_stored, control_plane, credential_reader_identity, eventually, ready_account,
    secret_data, Operator, TestNamespace,
};
use k8s_openapi::api::core::v1::Secret;
use keysmith::{
    api::{IntegrationAccount, KeyState},
    provider::{
        zabbix::{TOKEN_KEY, URL_KEY},
        IssuedKey, KeyMaterial,
    },
};
use kube::{
    api::{Api, DeleteParams, Patch, PatchParams, PostParams},
    Client, ResourceExt,
};
use serde_json::json;
use zabbix_server::ZabbixServer;

const WAIT: Duration = Duration::from_secs(120);
const ACCOUNT: &str = "alert-export";
const SECRET: &str = "alert-export-zabbix";

/// The connection, a rotation policy with `policy`, and account `account`
/// (Secret `secret`) holding `roles`.
fn manifests(zabbix: &ZabbixServer, policy: &str, account: &str, secret: &str, roles: &str) -> String {
    format!(
        r#"
apiVersion: keysmith.dev/v1alpha1
kind: AppConnection
metadata: {{name: zabbix}}
spec:
  provider:
    zabbix:
      url: "{url}"
      tokenSecretRef: {{name: zabbix-admin}}
  serviceAccountName: keysmith
---
apiVersion: keysmith.dev/v1alpha1
kind: KeyRotationPolicy
metadata: {{name: policy}}
spec: {{{policy}}}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {{name: {account}}}
spec:
  connectionRef: {{name: zabbix}}
  description: "Alert export"
  owner: team-sre
  secret: {{name: {secret}}}
  rotationPolicyRef: {{name: policy}}
  deletionPolicy: Delete
---
apiVersion: keysmith.dev/v1alpha1
kind: RoleBinding
metadata: {{name: {account}-roles}}
spec: {{accountRef: {{name: {account}}}, roles: [{roles}]}}
"#,
        url = zabbix.url
    )
}

async fn admin_secret(client: &Client, ns: &str, token: &str) {
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "zabbix-admin"}, "stringData": {"token": token}}))
            .expect("a Secret");
    Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await.expect("create");
}

fn issued(data: &std::collections::BTreeMap<String, String>) -> IssuedKey {
    IssuedKey { id: String::new(), expires_at: None, material: KeyMaterial::new(data.clone()) }
}

#[tokio::test]
async fn an_account_becomes_a_zabbix_user_whose_token_rotates() {
    let zabbix = ZabbixServer::start().await;
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "zabbix").await;
    let operator = Operator::start(cp, &ns.name, &[]);
    admin_secret(&client, &ns.name, &zabbix.operator_token).await;
    apply_yaml(
        &client,
        &ns.name,
        &(credential_reader_identity("zabbix-admin")
            + &manifests(&zabbix, "rotateEvery: 24h, gracePeriod: 5s", ACCOUNT, SECRET, "host.get, problem.get")),
    )
    .await;

    let account = ready_account(&client, &ns.name, ACCOUNT).await;
    let status = account.status.clone().expect("status");
    let external = status.account.as_ref().expect("status names the user");
    let user = zabbix.user(ACCOUNT).await.expect("the Zabbix user");
    assert_eq!((external.provider.as_str(), external.id.as_str()), ("zabbix", user["userid"].as_str().unwrap()));
    assert_eq!(user["surname"], format!("keysmith:{}", account.uid().unwrap()));
    let rules = zabbix.role_rules(ACCOUNT).await;
    assert_eq!(rules["api"], json!(["host.get", "problem.get"]), "{rules}");

    // The Secret: a token that may call exactly the declared methods.
    let first = secret_data(&client, &ns.name, SECRET).await.expect("the output Secret");
    assert_eq!(first.keys().map(String::as_str).collect::<Vec<_>>(), [TOKEN_KEY, URL_KEY]);
    zabbix.call_with_key(&issued(&first), "problem.get", json!({"limit": 1})).await.expect("a declared method");
    let refused = zabbix.call_with_key(&issued(&first), "user.get", json!({})).await;
    assert!(refused.is_err_and(|said| said.contains("No permissions to call")), "an undeclared method is refused");

    // A manual rotation: both work during the grace period, then the old
    // token is deleted.
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let patch = json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": "e2e"}}});
    accounts.patch(ACCOUNT, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("annotate");
    let second = eventually("a new token published", WAIT, || async {
        let data = secret_data(&client, &ns.name, SECRET).await?;
        (data[TOKEN_KEY] != first[TOKEN_KEY]).then_some(data)
    })
    .await;
    assert!(zabbix.key_works(&issued(&second)).await, "the new token works");
    let old = status.current_key.as_ref().expect("the first key's record").id.clone();
    eventually("the old token revoked after the grace period", WAIT, || async {
        let status = accounts.get(ACCOUNT).await.ok()?.status?;
        status.keys.iter().any(|k| k.id == old && k.state == KeyState::Revoked).then_some(())
    })
    .await;
    assert!(!zabbix.key_works(&issued(&first)).await, "the old token is refused");
    assert_eq!(zabbix.tokens(ACCOUNT).await.len(), 1, "one token left");

    // Deletion: the user (and its tokens), then its role.
    accounts.delete(ACCOUNT, &DeleteParams::default()).await.expect("delete");
    eventually("the IntegrationAccount gone", WAIT, || async {
        accounts.get_opt(ACCOUNT).await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(zabbix.user(ACCOUNT).await.is_none(), "the user is deleted");
    assert_eq!(zabbix.admin("role.get", json!({"filter": {"name": "keysmith: alert-export"}})).await, json!([]));
    assert!(!zabbix.key_works(&issued(&second)).await);

    let logs = operator.logs();
    for (what, secret) in [
        ("first token", &first[TOKEN_KEY]),
        ("second token", &second[TOKEN_KEY]),
        ("admin token", &zabbix.operator_token),
    ] {
        assert!(!logs.contains(secret.as_str()), "the {what} is in the operator's logs");
    }
    ns.delete().await;
}

/// What the example names, replaced by the test server's.
const EXAMPLE_TOKEN: &str = "REPLACE-WITH-THE-ADMIN-TOKEN";
const EXAMPLE_URL: &str = "https://zabbix.example.com/api_jsonrpc.php";

#[tokio::test]
async fn the_zabbix_example_is_accepted_and_works_against_a_real_server() {
    let text = common::example_text("zabbix");
    let objects = keysmith::manifest::parse(&text).expect("the example parses");
    let kinds: Vec<String> = objects.iter().filter_map(|o| o.types.as_ref().map(|t| t.kind.clone())).collect();
    assert_eq!(kinds, common::CREDENTIALED_EXAMPLE_KINDS, "read top to bottom");
    for object in objects.iter().skip(1) {
        assert_eq!(object.metadata.namespace.as_deref(), Some("monitoring"), "{:?}", object.metadata.name);
    }
    for placeholder in [EXAMPLE_TOKEN, EXAMPLE_URL] {
        assert!(text.contains(placeholder), "the example has {placeholder:?}, which the test replaces");
    }
    // The operator's allow-list the example documents is the one the
    // tests' operator holds.
    for method in keysmith::provider::zabbix::ADMIN_METHODS {
        assert!(text.contains(method), "the example's operator role lists {method}");
    }

    let zabbix = ZabbixServer::start().await;
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "zabbixexample").await;
    let _operator = Operator::start(cp, &ns.name, &[]);
    let text = text.replace(EXAMPLE_TOKEN, &zabbix.operator_token).replace(EXAMPLE_URL, &zabbix.url);
    apply_yaml(&client, &ns.name, &text).await;
    assert_manifests_stored(&client, &ns.name, &text).await;
    ready_account(&client, &ns.name, "alert-export").await;
    let rules = zabbix.role_rules("alert-export").await;
    assert_eq!(rules["api"], json!(["event.get", "host.get", "problem.get"]), "{rules}");
    let data = secret_data(&client, &ns.name, "alert-export-zabbix").await.expect("the output Secret");
    assert!(zabbix.key_works(&issued(&data)).await, "the example's token works");
    ns.delete().await;
}

/// Dormancy from real last-use data: Zabbix records each token's last
/// access, and keysmith reads it. A replaced token nobody uses any more is
/// revoked long before its hour of grace; an account nobody uses turns
/// Dormant and is disabled in Zabbix; the reactivate annotation enables it
/// again.
#[tokio::test]
async fn an_unused_account_turns_dormant_from_zabbixs_own_last_access_and_is_disabled() {
    const IDLE: &str = "idle-export";
    const IDLE_SECRET: &str = "idle-export-zabbix";
    let zabbix = ZabbixServer::start().await;
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "zabbixdormant").await;
    let port = common::free_port();
    let metrics_addr = format!("--metrics-addr=127.0.0.1:{port}");
    // The inventory feed, with both kinds of credential.
    let feed_port = common::free_port();
    let feed_addr = format!("--inventory-addr=127.0.0.1:{feed_port}");
    let feed_credentials = tempfile::tempdir().unwrap();
    let feed_token = format!("feed-{:032x}", rand::random::<u128>());
    std::fs::write(feed_credentials.path().join("token"), &feed_token).unwrap();
    std::fs::write(feed_credentials.path().join("client_id"), "saas-manager").unwrap();
    std::fs::write(feed_credentials.path().join("client_secret"), "client-secret-for-the-feed").unwrap();
    let feed_dir = format!("--inventory-credentials-dir={}", feed_credentials.path().display());
    let options = common::OperatorOptions {
        args: &["--drift-check-interval", "2s", &metrics_addr, &feed_addr, &feed_dir],
        ..Default::default()
    };
    let _operator = Operator::start_with(cp, &ns.name, &options);
    admin_secret(&client, &ns.name, &zabbix.operator_token).await;
    let manifests = manifests(
        &zabbix,
        "rotateEvery: 24h, gracePeriod: 1h, dormantAfter: 30s, disableDormant: true, revokeUnusedAfter: 8s",
        IDLE,
        IDLE_SECRET,
        "host.get",
    );
    apply_yaml(&client, &ns.name, &(credential_reader_identity("zabbix-admin") + &manifests)).await;
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let dormant = |account: &IntegrationAccount| {
        account.status.as_ref()?.common.conditions.iter().find(|c| c.type_ == "Dormant").cloned()
    };
    let account = ready_account(&client, &ns.name, IDLE).await;
    let condition = dormant(&account).expect("a Dormant condition");
    assert_eq!((condition.status.as_str(), condition.reason.as_str()), ("False", "InUse"), "{condition:?}");
    assert!(condition.message.contains("no key has been used yet"), "{}", condition.message);

    // The workload uses its token: Zabbix's lastaccess reaches status
    // (keysmith's own check, before publication, does not count).
    let first = secret_data(&client, &ns.name, IDLE_SECRET).await.expect("the output Secret");
    tokio::time::sleep(Duration::from_secs(11)).await;
    zabbix.call_with_key(&issued(&first), "host.get", json!({"limit": 1})).await.expect("the token works");
    let first_id = account.status.as_ref().unwrap().current_key.as_ref().unwrap().id.clone();
    let used = eventually("the token's use in status", WAIT, || async {
        let status = accounts.get(IDLE).await.ok()?.status?;
        status.keys.iter().find(|k| k.id == first_id)?.last_used_at.clone()
    })
    .await;
    let lastaccess: i64 = zabbix.tokens(IDLE).await[0]["lastaccess"].as_str().unwrap().parse().unwrap();
    assert_eq!(used.0.as_second(), lastaccess, "status says what Zabbix recorded");

    // A rotation: the workload moves to the new token and stops using the
    // old one, which goes long before its hour of grace.
    let patch = json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": "move"}}});
    accounts.patch(IDLE, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("annotate");
    let second = eventually("a new token published", WAIT, || async {
        let data = secret_data(&client, &ns.name, IDLE_SECRET).await?;
        (data[TOKEN_KEY] != first[TOKEN_KEY]).then_some(data)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    zabbix.call_with_key(&issued(&second), "host.get", json!({"limit": 1})).await.expect("the new token works");
    let revoked = eventually("the unused old token revoked early", Duration::from_secs(60), || async {
        let status = accounts.get(IDLE).await.ok()?.status?;
        status.keys.into_iter().find(|k| k.id == first_id && k.state == KeyState::Revoked)
    })
    .await;
    assert_eq!(revoked.reason.as_deref(), Some("Unused"), "{revoked:?}");
    assert!(!zabbix.key_works(&issued(&first)).await, "the old token is deleted in Zabbix");

    // Nobody uses the account for dormantAfter: Dormant, with a Warning
    // event, and disabled in Zabbix (its token refused).
    let account = eventually("the account dormant", Duration::from_secs(90), || async {
        let account = accounts.get(IDLE).await.ok()?;
        (dormant(&account)?.status == "True").then_some(account)
    })
    .await;
    let condition = dormant(&account).unwrap();
    assert_eq!(condition.reason, "Unused");
    assert!(
        condition.message.contains("its last use") && condition.message.contains("disabled"),
        "{}",
        condition.message
    );
    let disabled = zabbix.group_id("Disabled").await;
    eventually("the Zabbix user in the Disabled group", WAIT, || async {
        let user = zabbix.user(IDLE).await?;
        user["usrgrps"].as_array()?.iter().any(|g| g["usrgrpid"] == disabled.as_str()).then_some(())
    })
    .await;
    let refused = zabbix.call_with_key(&issued(&second), "host.get", json!({})).await;
    assert!(refused.is_err_and(|said| said.contains("Not authorized")), "a dormant account's token is refused");
    eventually("the rotation held: no next rotation", WAIT, || async {
        accounts.get(IDLE).await.ok()?.status?.next_rotation_at.is_none().then_some(())
    })
    .await;
    // The metrics say it too: dormant, and when it was last used.
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
    let series = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&format!("account=\"{IDLE}\"")))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse::<f64>().ok())
    };
    assert_eq!(series("keysmith_account_dormant"), Some(1.0), "{metrics}");
    let last_used = account.status.as_ref().unwrap().last_used_at.as_ref().expect("the account's last use").0;
    assert_eq!(series("keysmith_key_last_used_timestamp_seconds"), Some(last_used.as_second() as f64), "{metrics}");
    let events = common::kubectl_ok(cp, &["get", "events", "-n", &ns.name, "-o", "json"]);
    assert!(events.contains("\"reason\": \"Dormant\"") && events.contains("DormantAccountDisabled"), "{events}");

    // The system-of-record feed lists it as dormant, with Zabbix's last
    // access as its last login, over REST and SCIM; never a key.
    let feed = format!("http://127.0.0.1:{feed_port}");
    let http = reqwest::Client::new();
    let refused = http.get(format!("{feed}/api/v1/accounts")).send().await.unwrap();
    assert_eq!(refused.status(), 401, "no credential, no inventory");
    let wrong = http.get(format!("{feed}/api/v1/accounts")).bearer_auth("guess").send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let listed: serde_json::Value = http
        .get(format!("{feed}/api/v1/accounts"))
        .query(&[("filter", r#"status eq "Dormant" and provider eq "zabbix""#)])
        .bearer_auth(&feed_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let results = listed["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{listed}");
    let record = &results[0];
    assert_eq!(record["name"], format!("{}/{IDLE}", ns.name));
    assert_eq!(record["externalName"], IDLE);
    assert_eq!(record["externalId"], zabbix.user(IDLE).await.unwrap()["userid"]);
    assert_eq!(record["roles"], json!(["host.get"]));
    assert_eq!(record["lastLoginDtm"], last_used.to_string());
    // OAuth 2.0 client credentials, then the SCIM view.
    let token: serde_json::Value = http
        .post(format!("{feed}/api/v1/oauth/token"))
        .basic_auth("saas-manager", Some("client-secret-for-the-feed"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let access = token["access_token"].as_str().expect("an access token");
    let users: serde_json::Value = http
        .get(format!("{feed}/scim/v2/Users"))
        .query(&[("filter", format!(r#"userName eq "{}/{IDLE}""#, ns.name))])
        .bearer_auth(access)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(users["totalResults"], 1, "{users}");
    assert_eq!(users["Resources"][0]["active"], false, "a dormant account is not active");
    let all = format!("{listed}{users}");
    for secret in [&first[TOKEN_KEY], &second[TOKEN_KEY], &zabbix.operator_token] {
        assert!(!all.contains(secret.as_str()), "no key in the feed");
    }
    let denied = http
        .delete(format!("{feed}/scim/v2/Users/{}", record["id"].as_str().unwrap()))
        .bearer_auth(access)
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 405, "the feed is read-only");

    // Reactivated: enabled again, no longer dormant, the token works.
    let patch = json!({"metadata": {"annotations": {"keysmith.dev/reactivate": "back"}}});
    accounts.patch(IDLE, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("annotate");
    eventually("the account enabled and not dormant", WAIT, || async {
        let account = accounts.get(IDLE).await.ok()?;
        let user = zabbix.user(IDLE).await?;
        let enabled = !user["usrgrps"].as_array()?.iter().any(|g| g["usrgrpid"] == disabled.as_str());
        (enabled && dormant(&account)?.status == "False").then_some(())
    })
    .await;
    assert!(zabbix.key_works(&issued(&second)).await, "the reactivated account's token works again");
    ns.delete().await;
}
