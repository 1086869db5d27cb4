//! The `scim` provider end to end: the operator as its own process, scoped to
//! a test namespace on the real kube-apiserver, managing Users and Group
//! memberships in a real SCIM 2.0 server (scim2-server, started by each test,
//! `tests/common/scim_server.rs`). Every assertion is made on real effects:
//! what the SCIM server holds, read over its API, and which password it
//! accepts (scim2-server's `password eq` filter, which real services lack).

mod common;
#[path = "common/scim_server.rs"]
mod scim_server;

use std::time::Duration;

use common::{
    apply_yaml, assert_manifests_stored, control_plane, credential_reader_identity, eventually, ready_account,
    secret_data, Operator, TestNamespace,
};
use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::Condition};
use keysmith::api::{AppConnection, IntegrationAccount, KeyState};
use kube::{
    api::{Api, DeleteParams, Patch, PatchParams, PostParams},
    Client, ResourceExt,
};
use scim_server::ScimServer;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(120);
const READERS: &str = "Billing Readers";
const WRITERS: &str = "Billing Writers";

/// The connection, policy and account; `{base_url}` is the SCIM server's.
/// The token Secret is created separately (it holds the live admin token).
const ACCOUNT: &str = r#"
apiVersion: keysmith.dev/v1alpha1
kind: AppConnection
metadata: {name: crm}
spec:
  serviceAccountName: keysmith
  provider:
    scim:
      baseUrl: "{base_url}"
      tokenSecretRef: {name: scim-admin}
---
apiVersion: keysmith.dev/v1alpha1
kind: KeyRotationPolicy
metadata: {name: policy}
spec: {rotateEvery: 24h}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {name: invoice-bot}
spec:
  connectionRef: {name: crm}
  description: "Invoice export, nightly"
  owner: team-billing
  secret: {name: invoice-bot-credentials}
  rotationPolicyRef: {name: policy}
  deletionPolicy: Delete
"#;

/// The ServiceAccount the connection acts as, which may read its token Secret.
fn identity() -> String {
    credential_reader_identity("scim-admin")
}

fn binding_yaml(roles: &[&str]) -> String {
    format!(
        "apiVersion: keysmith.dev/v1alpha1\nkind: RoleBinding\nmetadata: {{name: invoice-bot-groups}}\nspec:\n  accountRef: {{name: invoice-bot}}\n  roles: {roles:?}\n"
    )
}

/// Creates the Secret holding the SCIM admin bearer token, under the default key `token`.
async fn token_secret(client: &Client, ns: &str, name: &str, token: &str) {
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {"token": token}})).expect("a Secret");
    Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await.expect("create Secret");
}

async fn connection_ready(client: &Client, ns: &str, name: &str) -> Condition {
    let api: Api<AppConnection> = Api::namespaced(client.clone(), ns);
    eventually(&format!("AppConnection {ns}/{name} to report Ready"), WAIT, || async {
        let status = api.get(name).await.ok()?.status?;
        status.common.conditions.into_iter().find(|c| c.type_ == "Ready")
    })
    .await
}

fn user_id(user: &Value) -> String {
    user["id"].as_str().expect("a User id").to_owned()
}

#[tokio::test]
async fn an_account_becomes_a_scim_user_in_its_groups_and_its_password_rotates() {
    let server = ScimServer::start().await;
    let readers = server.create_group(READERS).await;
    let writers = server.create_group(WRITERS).await;
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "scim").await;
    let operator = Operator::start(cp, &ns.name, &[]);
    token_secret(&client, &ns.name, "scim-admin", &server.token).await;
    apply_yaml(&client, &ns.name, &(identity() + &ACCOUNT.replace("{base_url}", &server.base_url))).await;
    apply_yaml(&client, &ns.name, &binding_yaml(&[READERS, WRITERS])).await;

    // Ready: the User exists, tagged as ours, in both Groups.
    let account = ready_account(&client, &ns.name, "invoice-bot").await;
    let uid = account.uid().expect("a uid");
    let status = account.status.expect("status");
    let current = status.current_key.expect("a current key");
    let user = server.user_named("invoice-bot").await.expect("the SCIM User exists");
    let id = user_id(&user);
    assert_eq!(user["externalId"], format!("keysmith:{uid}"), "{user:#}");
    assert_eq!(user["displayName"], "Invoice export, nightly");
    assert_eq!(user["active"], true);
    assert_eq!(user["nickName"], format!("keysmith-key:{}", current.id), "the live key's id is on the User");
    let external = status.account.expect("status names the User");
    assert_eq!((external.provider.as_str(), external.id.as_str()), ("scim", id.as_str()));
    assert!(server.members(&readers).await.contains(&id), "in {READERS}");
    assert!(server.members(&writers).await.contains(&id), "in {WRITERS}");

    // The Secret: exactly the provider's three keys; its password is the live one.
    let data = secret_data(&client, &ns.name, "invoice-bot-credentials").await.expect("the output Secret");
    assert_eq!(data.keys().map(String::as_str).collect::<Vec<_>>(), ["password", "scim_base_url", "username"]);
    assert_eq!(data["username"], "invoice-bot");
    assert_eq!(data["scim_base_url"], server.base_url);
    let old_password = data["password"].clone();
    assert!(server.password_is("invoice-bot", &old_password).await, "the Secret holds the live password");

    let ready = connection_ready(&client, &ns.name, "crm").await;
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "Verified"), "{}", ready.message);

    // A manual rotation. SCIM has no grace period: a User has exactly one
    // password, so setting the new one ends the old one at the same instant.
    // By the time the Secret shows the new password, the old one is refused.
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    accounts
        .patch(
            "invoice-bot",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": "1"}}})),
        )
        .await
        .expect("annotate");
    let new_password = eventually("a new password in the Secret", WAIT, || async {
        let password = secret_data(&client, &ns.name, "invoice-bot-credentials").await?.remove("password")?;
        (password != old_password).then_some(password)
    })
    .await;
    assert!(server.password_is("invoice-bot", &new_password).await, "the new password is live");
    assert!(!server.password_is("invoice-bot", &old_password).await, "the old password stopped working at once");
    let status = eventually("the old key recorded as revoked", WAIT, || async {
        let status = accounts.get("invoice-bot").await.ok()?.status?;
        let old = status.keys.iter().find(|k| k.id == current.id)?;
        (old.state == KeyState::Revoked && status.current_key.as_ref()?.id != current.id).then_some(status)
    })
    .await;
    let new_key = status.current_key.expect("a current key");
    let new_record = status.keys.iter().find(|k| k.id == new_key.id).expect("the new key's record");
    assert_eq!(new_record.state, KeyState::Published);
    assert_eq!(new_record.reason.as_deref(), Some("ManualRotation"));
    let user = server.user_named("invoice-bot").await.expect("the User");
    assert_eq!(user_id(&user), id, "rotation keeps the User");
    assert_eq!(user["nickName"], format!("keysmith-key:{}", new_key.id));

    // Dropping a role from the RoleBinding drops the membership, and only that one.
    apply_yaml(&client, &ns.name, &binding_yaml(&[READERS])).await;
    eventually(&format!("the membership of {WRITERS} to be removed"), WAIT, || async {
        (!server.members(&writers).await.contains(&id)).then_some(())
    })
    .await;
    assert!(server.members(&readers).await.contains(&id), "still in {READERS}");

    // deletionPolicy Delete: the User goes, and leaves no membership behind.
    accounts.delete("invoice-bot", &DeleteParams::default()).await.expect("delete");
    eventually("the IntegrationAccount to be gone", WAIT, || async {
        accounts.get_opt("invoice-bot").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(server.user_named("invoice-bot").await.is_none(), "the SCIM User is deleted");
    assert!(server.members(&readers).await.is_empty(), "no dangling member");

    // Neither the admin token nor a password ever reached the logs.
    let logs = operator.stop().await;
    assert!(logs.contains("invoice-bot"), "the operator logged its work");
    for secret in [&server.token, &old_password, &new_password] {
        assert!(!logs.contains(secret.as_str()), "a credential in the operator's logs");
    }
    ns.delete().await;
}

#[tokio::test]
async fn a_refused_bearer_token_makes_the_connection_unauthorized() {
    let server = ScimServer::start().await;
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "scimtoken").await;
    let _operator = Operator::start(cp, &ns.name, &[]);
    let wrong = format!("not-the-token-{:016x}", rand::random::<u64>());
    token_secret(&client, &ns.name, "scim-admin", &wrong).await;
    let connection = ACCOUNT.split("---").next().expect("the AppConnection").replace("{base_url}", &server.base_url);
    apply_yaml(&client, &ns.name, &(identity() + &connection)).await;

    let ready = connection_ready(&client, &ns.name, "crm").await;
    assert_eq!(ready.status, "False", "{}", ready.message);
    assert_eq!(ready.reason, "Unauthorized", "{}", ready.message);
    assert!(ready.message.contains("401"), "{}", ready.message);
    assert!(!ready.message.contains(&wrong), "the token never appears in status");
    ns.delete().await;
}

/// Where the example points, replaced by the test server's URL and token.
const EXAMPLE_BASE_URL: &str = "https://crm.example.com/scim/v2";
const EXAMPLE_TOKEN: &str = "REPLACE-WITH-THE-SCIM-ADMIN-TOKEN";

#[tokio::test]
async fn the_scim_example_is_accepted_and_works_against_a_real_server() {
    let text = common::example_text("scim");
    let objects = keysmith::manifest::parse(&text).expect("the example parses");
    let kinds: Vec<String> = objects.iter().filter_map(|o| o.types.as_ref().map(|t| t.kind.clone())).collect();
    assert_eq!(kinds, common::CREDENTIALED_EXAMPLE_KINDS, "read top to bottom");
    for object in objects.iter().skip(1) {
        assert_eq!(object.metadata.namespace.as_deref(), Some("crm-sync"), "{:?}", object.metadata.name);
    }
    assert!(text.contains(EXAMPLE_BASE_URL) && text.contains(EXAMPLE_TOKEN), "the placeholders the test replaces");

    // Pointed at a real server holding the Group it names, the example is
    // accepted by the apiserver as written and the account becomes Ready.
    let server = ScimServer::start().await;
    let group = server.create_group("CRM Invoice Readers").await;
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "scimexample").await;
    let _operator = Operator::start(cp, &ns.name, &[]);
    let text = text.replace(EXAMPLE_BASE_URL, &server.base_url).replace(EXAMPLE_TOKEN, &server.token);
    apply_yaml(&client, &ns.name, &text).await;
    // Nothing was lost on the way.
    assert_manifests_stored(&client, &ns.name, &text).await;
    ready_account(&client, &ns.name, "invoice-export").await;
    let user = server.user_named("invoice-export").await.expect("the SCIM User");
    assert_eq!(server.members(&group).await, vec![user_id(&user)]);
    let data = secret_data(&client, &ns.name, "invoice-export-credentials").await.expect("the output Secret");
    assert_eq!(data.keys().map(String::as_str).collect::<Vec<_>>(), ["CRM_PASSWORD", "CRM_SCIM_URL", "CRM_USERNAME"]);
    assert!(server.password_is("invoice-export", &data["CRM_PASSWORD"]).await);
    let ready = connection_ready(&client, &ns.name, "crm").await;
    assert_eq!(ready.status, "True", "{}", ready.message);
    ns.delete().await;
}
