//! The `oauth2` provider end to end: the operator as its own process, scoped
//! to a test namespace on the real kube-apiserver, registering and managing
//! OAuth 2.0 clients in a real authorization server (npm's oidc-provider,
//! started by each test, `tests/common/oidc_server.rs`). Every assertion is
//! made on real effects: tokens the server issues (or refuses) to the
//! credentials in the output Secret, the client configuration the server
//! holds (read with the registration access token keysmith stored), and
//! what is in the apiserver.
//!
//! This server has **no grace period**: a client has exactly one secret, so
//! the rotation that sets a new one ends the old one at the same instant,
//! whatever the rotation policy's `gracePeriod` says (the test's says 1h).

mod common;
#[path = "common/oidc_server.rs"]
mod oidc_server;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{
    apply_yaml, control_plane, credential_reader_identity, eventually, fault_proxy, ready_account, secret_data,
    Operator, TestNamespace,
};
use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{Event, Secret},
    apimachinery::pkg::apis::meta::v1::Condition,
};
use keysmith::{
    api::{AppConnection, IntegrationAccount, KeyState},
    provider::oauth2::store::REGISTRATION_SECRET_TYPE,
    provider::oauth2::{Registration, STORE_REGISTRATION_ACCESS_TOKEN},
};
use kube::{
    api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{watcher, WatchStreamExt},
    Client, ResourceExt,
};
use oidc_server::{OidcServer, SCOPES};
use reqwest::StatusCode;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);
const ACCOUNT_NAME: &str = "ledger-sync";
const OUTPUT_SECRET: &str = "ledger-sync-credentials";
const REGISTRATION_SECRET: &str = "ledger-sync-oauth2-registration";

/// The connection, policy and account; `{registration}`, `{token}` and
/// `{introspection}` are the server's endpoints. The initial access token's
/// Secret is created separately (it holds the live token).
const ACCOUNT: &str = r#"
apiVersion: keysmith.dev/v1alpha1
kind: AppConnection
metadata: {name: auth}
spec:
  provider:
    oauth2:
      registrationEndpoint: "{registration}"
      tokenEndpoint: "{token}"
      introspectionEndpoint: "{introspection}"
      initialAccessTokenSecretRef: {name: oauth2-admin}
  serviceAccountName: keysmith
---
apiVersion: keysmith.dev/v1alpha1
kind: KeyRotationPolicy
metadata: {name: policy}
spec: {rotateEvery: 24h, gracePeriod: 1h}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {name: ledger-sync}
spec:
  connectionRef: {name: auth}
  description: "Ledger sync, hourly"
  owner: team-ledger
  secret: {name: ledger-sync-credentials}
  rotationPolicyRef: {name: policy}
  deletionPolicy: Delete
"#;

fn account_yaml(server: &OidcServer) -> String {
    credential_reader_identity("oauth2-admin")
        + &ACCOUNT
            .replace("{registration}", &server.info.registration_endpoint)
            .replace("{token}", &server.info.token_endpoint)
            .replace("{introspection}", &server.info.introspection_endpoint)
}

fn binding_yaml(scopes: &[&str]) -> String {
    format!(
        "apiVersion: keysmith.dev/v1alpha1\nkind: RoleBinding\nmetadata: {{name: ledger-sync-scopes}}\nspec:\n  accountRef: {{name: {ACCOUNT_NAME}}}\n  roles: {scopes:?}\n"
    )
}

/// Creates the Secret holding the initial access token, under the default key `token`.
async fn token_secret(client: &Client, ns: &str, name: &str, token: &str) {
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {"token": token}})).expect("a Secret");
    Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await.expect("create Secret");
}

/// The registration keysmith keeps in the registration Secret.
async fn registration(client: &Client, ns: &str) -> Registration {
    let data = secret_data(client, ns, REGISTRATION_SECRET).await.expect("the registration Secret");
    Registration::from_secret_data(&data).expect("a complete registration")
}

async fn connection_ready(client: &Client, ns: &str, name: &str) -> Condition {
    let api: Api<AppConnection> = Api::namespaced(client.clone(), ns);
    eventually(&format!("AppConnection {ns}/{name} to report Ready"), WAIT, || async {
        let status = api.get(name).await.ok()?.status?;
        status.common.conditions.into_iter().find(|c| c.type_ == "Ready")
    })
    .await
}

/// Every registration access token the registration Secret ever holds while
/// the test runs, from a watch (the server rotates the token on every
/// update, so there are many).
struct RegistrationTokens {
    seen: Arc<Mutex<BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RegistrationTokens {
    fn watch(client: &Client, ns: &str) -> Self {
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        let config = watcher::Config::default().fields(&format!("metadata.name={REGISTRATION_SECRET}"));
        let seen: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let into = seen.clone();
        let task = tokio::spawn(async move {
            let mut secrets = watcher(api, config).default_backoff().applied_objects().boxed();
            while let Some(event) = secrets.next().await {
                let token = event.ok().and_then(|s| s.data).and_then(|mut d| d.remove(STORE_REGISTRATION_ACCESS_TOKEN));
                if let Some(token) = token.and_then(|t| String::from_utf8(t.0).ok()) {
                    into.lock().unwrap().insert(token);
                }
            }
        });
        Self { seen, task }
    }

    fn all(&self) -> BTreeSet<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for RegistrationTokens {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The output Secret's credentials get a token for exactly `scopes` from
/// its `token_url`, as a workload would; the server confirms them by
/// introspection; every other scope the server knows is refused.
async fn assert_exact_scopes(server: &OidcServer, data: &BTreeMap<String, String>, scopes: &[&str]) {
    let (token_url, id, secret) = (&data["token_url"], &data["client_id"], &data["client_secret"]);
    let wanted = scopes.join(" ");
    let (status, body) = server.token_at(token_url, id, secret, Some(&wanted)).await;
    assert_eq!((status, body["scope"].as_str()), (StatusCode::OK, Some(wanted.as_str())), "{body}");
    let token = body["access_token"].as_str().expect("an access token");
    let (status, body) = server.introspect(id, secret, token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active"], true, "{body}");
    assert_eq!(body["client_id"], id.as_str(), "{body}");
    let granted: BTreeSet<&str> = body["scope"].as_str().unwrap_or_default().split(' ').collect();
    assert_eq!(granted, scopes.iter().copied().collect(), "{body}");
    for other in SCOPES.iter().filter(|s| !scopes.contains(s)) {
        let (status, body) = server.token_at(token_url, id, secret, Some(other)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_scope")),
            "{other}: {body}"
        );
    }
}

/// Whether the server refuses the secret: `401 invalid_client`.
async fn refused(server: &OidcServer, id: &str, secret: &str) -> bool {
    let (status, body) = server.token(id, secret, Some("read")).await;
    status == StatusCode::UNAUTHORIZED && body["error"] == "invalid_client"
}

#[tokio::test]
async fn an_account_becomes_an_oauth2_client_with_its_scopes_and_its_secret_rotates() {
    let server = OidcServer::start().await;
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "oauth2").await;
    let tokens = RegistrationTokens::watch(&client, &ns.name);
    let operator = Operator::start(cp, &ns.name, &[]);
    token_secret(&client, &ns.name, "oauth2-admin", &server.info.initial_access_token).await;
    apply_yaml(&client, &ns.name, &account_yaml(&server)).await;
    apply_yaml(&client, &ns.name, &binding_yaml(&["read", "write"])).await;

    // Ready: a client of keysmith's, with both scopes.
    let account = ready_account(&client, &ns.name, ACCOUNT_NAME).await;
    let uid = account.uid().expect("a uid");
    let status = account.status.expect("status");
    let first_key = status.current_key.expect("a current key");
    let external = status.account.expect("status names the client");
    assert_eq!(external.provider, "oauth2");
    let client_id = external.id.clone();
    let mut roles: Vec<&str> = status.roles.iter().map(|r| r.role.as_str()).collect();
    roles.sort_unstable();
    assert_eq!(roles, ["read", "write"]);
    let ready = connection_ready(&client, &ns.name, "auth").await;
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "Verified"), "{}", ready.message);

    // The output Secret: the provider's four keys, for this client and server.
    let data = secret_data(&client, &ns.name, OUTPUT_SECRET).await.expect("the output Secret");
    assert_eq!(
        data.keys().map(String::as_str).collect::<Vec<_>>(),
        ["client_id", "client_secret", "scope", "token_url"]
    );
    assert_eq!(data["client_id"], client_id);
    assert_eq!(data["token_url"], server.info.token_endpoint);
    assert_exact_scopes(&server, &data, &["read", "write"]).await;
    let old_secret = data["client_secret"].clone();

    // The registration Secret: keysmith's record of the client, owned by the
    // account, and the only place its registration access token is kept.
    let record = Api::<Secret>::namespaced(client.clone(), &ns.name).get(REGISTRATION_SECRET).await.expect("record");
    assert_eq!(record.type_.as_deref(), Some(REGISTRATION_SECRET_TYPE));
    assert_eq!(record.labels().get(keysmith::ownership::ACCOUNT_UID), Some(&uid));
    let owner = &record.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
        ("IntegrationAccount", ACCOUNT_NAME, uid.as_str())
    );
    let keys: Vec<String> = record.data.clone().unwrap_or_default().into_keys().collect();
    assert_eq!(keys, ["client_id", "key_id", "key_issued_at", "registration_access_token", "registration_client_uri"]);
    let stored = registration(&client, &ns.name).await;
    assert_eq!(stored.client_id, client_id);
    assert_eq!(stored.current_key.as_ref().map(|k| k.id.as_str()), Some(first_key.id.as_str()));
    let (status, config) = server.client_config(&stored).await;
    assert_eq!(status, StatusCode::OK, "the stored registration access token manages the client: {config}");
    assert_eq!(config["client_name"], ACCOUNT_NAME);
    assert_eq!(config["software_id"], "keysmith");
    assert_eq!(config["grant_types"], json!(["client_credentials"]));
    assert_eq!(config["scope"], "read write");

    // A manual rotation: an RFC 7592 update without client_secret, which
    // makes the server issue a new one. No grace period on this server (the
    // policy's 1h does not apply): by the time the Secret holds the new
    // secret, the old one is refused.
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    accounts
        .patch(
            ACCOUNT_NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": "1"}}})),
        )
        .await
        .expect("annotate");
    let data = eventually("a new client secret in the Secret", WAIT, || async {
        let data = secret_data(&client, &ns.name, OUTPUT_SECRET).await?;
        (data.get("client_secret")? != &old_secret).then_some(data)
    })
    .await;
    let new_secret = data["client_secret"].clone();
    assert_eq!(data["client_id"], client_id, "rotation keeps the client");
    assert_eq!(data["scope"], "read write", "the Secret names the client's scopes");
    assert!(refused(&server, &client_id, &old_secret).await, "the old secret stopped working at once");
    assert_exact_scopes(&server, &data, &["read", "write"]).await;
    let status = eventually("the old key recorded as revoked", WAIT, || async {
        let status = accounts.get(ACCOUNT_NAME).await.ok()?.status?;
        let old = status.keys.iter().find(|k| k.id == first_key.id)?;
        (old.state == KeyState::Revoked && status.current_key.as_ref()?.id != first_key.id).then_some(status)
    })
    .await;
    let new_key = status.current_key.expect("a current key");
    let new_record = status.keys.iter().find(|k| k.id == new_key.id).expect("the new key's record");
    assert_eq!(new_record.state, KeyState::Published);
    assert_eq!(new_record.reason.as_deref(), Some("ManualRotation"));
    assert_eq!(registration(&client, &ns.name).await.current_key.map(|k| k.id), Some(new_key.id.clone()));

    // Dropping a scope from the RoleBinding drops it from the client, and
    // keeps the secret.
    apply_yaml(&client, &ns.name, &binding_yaml(&["read"])).await;
    eventually("the write scope to be removed from the client", WAIT, || async {
        let (status, body) = server.token(&client_id, &new_secret, Some("write")).await;
        (status == StatusCode::BAD_REQUEST && body["error"] == "invalid_scope").then_some(())
    })
    .await;
    assert_exact_scopes(&server, &data, &["read"]).await;
    let config = eventually("the client configuration to show only read", WAIT, || async {
        let (status, config) = server.client_config(&registration(&client, &ns.name).await).await;
        (status == StatusCode::OK && config["scope"] == "read").then_some(config)
    })
    .await;
    assert_eq!(config["client_id"], client_id.as_str());
    eventually("status to show only read", WAIT, || async {
        let status = accounts.get(ACCOUNT_NAME).await.ok()?.status?;
        (status.roles.iter().map(|r| r.role.as_str()).collect::<Vec<_>>() == ["read"]).then_some(())
    })
    .await;

    // The registration access token lives only in the registration Secret:
    // not in another Secret, the account's status, events, or the logs.
    let rats = tokens.all();
    assert!(rats.len() >= 3, "the server rotated the registration access token on each update: saw {}", rats.len());
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns.name).list(&ListParams::default()).await.expect("list");
    for secret in &secrets.items {
        let text = serde_json::to_string(&secret_texts(secret)).expect("JSON");
        let holds = rats.iter().any(|rat| text.contains(rat.as_str()));
        assert_eq!(holds, secret.name_any() == REGISTRATION_SECRET, "Secret {}", secret.name_any());
    }
    let status_json = serde_json::to_string(&accounts.get(ACCOUNT_NAME).await.expect("account")).expect("JSON");
    let connection_json = serde_json::to_string(
        &Api::<AppConnection>::namespaced(client.clone(), &ns.name).get("auth").await.expect("connection"),
    )
    .expect("JSON");

    // deletionPolicy Delete: the client is deleted, and so is the
    // registration Secret.
    let last = registration(&client, &ns.name).await;
    accounts.delete(ACCOUNT_NAME, &DeleteParams::default()).await.expect("delete");
    eventually("the IntegrationAccount to be gone", WAIT, || async {
        accounts.get_opt(ACCOUNT_NAME).await.ok()?.is_none().then_some(())
    })
    .await;
    // keysmith deleted it before letting the account go (the garbage
    // collector would only act after the account is gone).
    assert!(secret_data(&client, &ns.name, REGISTRATION_SECRET).await.is_none(), "the registration Secret is deleted");
    let (status, body) = server.client_config(&last).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the server forgot the client and its token: {body}");
    assert!(refused(&server, &client_id, &new_secret).await, "the deleted client's secret is refused");

    let events = serde_json::to_string(
        &Api::<Event>::namespaced(client.clone(), &ns.name).list(&ListParams::default()).await.expect("events"),
    )
    .expect("JSON");
    assert!(events.contains("KeyRotated"), "rotation events are published");
    let logs = operator.stop().await;
    assert!(logs.contains(ACCOUNT_NAME), "the operator logged its work");
    let rats = tokens.all();
    for (what, text) in [("status", &status_json), ("events", &events), ("the operator's logs", &logs)] {
        for rat in &rats {
            assert!(!text.contains(rat.as_str()), "a registration access token in {what}");
        }
        for secret in [&old_secret, &new_secret] {
            assert!(!text.contains(secret.as_str()), "a client secret in {what}");
        }
        assert!(!text.contains(&server.info.initial_access_token), "the initial access token in {what}");
    }
    assert!(!connection_json.contains(&server.info.initial_access_token), "the initial access token in status");
    ns.delete().await;
}

/// A Secret's data and string data, as text.
fn secret_texts(secret: &Secret) -> Vec<String> {
    let data = secret.data.iter().flatten().map(|(_, v)| String::from_utf8_lossy(&v.0).into_owned());
    let strings = secret.string_data.iter().flatten().map(|(_, v)| v.clone());
    let annotations = secret.metadata.annotations.iter().flatten().map(|(_, v)| v.clone());
    data.chain(strings).chain(annotations).collect()
}

#[tokio::test]
async fn a_refused_initial_access_token_makes_the_connection_unauthorized() {
    let server = OidcServer::start().await;
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "oauth2token").await;
    let _operator = Operator::start(cp, &ns.name, &[]);
    let wrong = format!("not-the-token-{:016x}", rand::random::<u64>());
    token_secret(&client, &ns.name, "oauth2-admin", &wrong).await;
    apply_yaml(&client, &ns.name, &account_yaml(&server)).await;

    let ready = connection_ready(&client, &ns.name, "auth").await;
    assert_eq!(ready.status, "False", "{}", ready.message);
    assert_eq!(ready.reason, "Unauthorized", "{}", ready.message);
    assert!(ready.message.contains("401"), "{}", ready.message);
    assert!(!ready.message.contains(&wrong), "the token never appears in status");

    // The account behind it registers nothing.
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let condition = eventually("the account to report not Ready", WAIT, || async {
        let status = accounts.get(ACCOUNT_NAME).await.ok()?.status?;
        status.common.conditions.into_iter().find(|c| c.type_ == "Ready" && c.status == "False")
    })
    .await;
    assert_eq!(condition.reason, "Unauthorized", "{}", condition.message);
    assert!(!condition.message.contains(&wrong), "{}", condition.message);
    assert!(secret_data(&client, &ns.name, REGISTRATION_SECRET).await.is_none(), "no client was registered");
    assert!(secret_data(&client, &ns.name, OUTPUT_SECRET).await.is_none(), "no key was published");
    ns.delete().await;
}

/// Where the example points, replaced by the test server's origin and token.
const EXAMPLE_ORIGIN: &str = "https://auth.example.com";
const EXAMPLE_TOKEN: &str = "REPLACE-WITH-THE-INITIAL-ACCESS-TOKEN";

#[tokio::test]
async fn the_oauth2_example_is_accepted_and_works_against_a_real_server() {
    let text = common::example_text("oauth2");
    let objects = keysmith::manifest::parse(&text).expect("the example parses");
    let kinds: Vec<String> = objects.iter().filter_map(|o| o.types.as_ref().map(|t| t.kind.clone())).collect();
    assert_eq!(kinds, common::CREDENTIALED_EXAMPLE_KINDS, "read top to bottom");
    for object in objects.iter().skip(1) {
        assert_eq!(object.metadata.namespace.as_deref(), Some("metering"), "{:?}", object.metadata.name);
    }
    assert!(text.contains(EXAMPLE_ORIGIN) && text.contains(EXAMPLE_TOKEN), "the placeholders the test replaces");

    // Pointed at a real server, the example is accepted by the apiserver as
    // written and the account becomes Ready with the scope it names.
    let server = OidcServer::start().await;
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "oauth2example").await;
    let _operator = Operator::start(cp, &ns.name, &[]);
    let pointed =
        text.replace(EXAMPLE_ORIGIN, &server.info.issuer).replace(EXAMPLE_TOKEN, &server.info.initial_access_token);
    for endpoint in
        [&server.info.registration_endpoint, &server.info.token_endpoint, &server.info.introspection_endpoint]
    {
        assert!(pointed.contains(endpoint.as_str()), "the example's endpoints are the server's paths: {endpoint}");
    }
    apply_yaml(&client, &ns.name, &pointed).await;
    ready_account(&client, &ns.name, "usage-report").await;
    let data = secret_data(&client, &ns.name, "usage-report-credentials").await.expect("the output Secret");
    assert_eq!(
        data.keys().map(String::as_str).collect::<Vec<_>>(),
        ["METERING_CLIENT_ID", "METERING_CLIENT_SECRET", "METERING_SCOPE", "METERING_TOKEN_URL"]
    );
    let renamed = BTreeMap::from([
        ("client_id".to_owned(), data["METERING_CLIENT_ID"].clone()),
        ("client_secret".to_owned(), data["METERING_CLIENT_SECRET"].clone()),
        ("token_url".to_owned(), data["METERING_TOKEN_URL"].clone()),
    ]);
    assert_exact_scopes(&server, &renamed, &["read"]).await;
    let ready = connection_ready(&client, &ns.name, "auth").await;
    assert_eq!(ready.status, "True", "{}", ready.message);
    ns.delete().await;
}

/// oidc-provider cannot disable a client, so deletionPolicy Disable revokes
/// the key (a secret nobody holds) and keeps the client, for audit.
#[tokio::test]
async fn disable_keeps_the_client_without_a_usable_secret() {
    let cp = control_plane().await;
    let client = cp.client().await.expect("client");
    let ns = TestNamespace::create(&client, "oauth2-disable").await;
    let server = OidcServer::start().await;
    token_secret(&client, &ns.name, "oauth2-admin", &server.info.initial_access_token).await;
    let tokens = RegistrationTokens::watch(&client, &ns.name);
    let _operator = Operator::start(cp, &ns.name, &[]);
    apply_yaml(&client, &ns.name, &account_yaml(&server).replace("deletionPolicy: Delete", "deletionPolicy: Disable"))
        .await;
    apply_yaml(&client, &ns.name, &binding_yaml(&["read"])).await;
    ready_account(&client, &ns.name, ACCOUNT_NAME).await;
    let data = secret_data(&client, &ns.name, OUTPUT_SECRET).await.expect("the output Secret");
    let (client_id, secret) = (data["client_id"].clone(), data["client_secret"].clone());
    assert!(!refused(&server, &client_id, &secret).await, "the published secret works");
    let stale = registration(&client, &ns.name).await;

    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    accounts.delete(ACCOUNT_NAME, &DeleteParams::default()).await.expect("delete");
    eventually("the IntegrationAccount to be gone", WAIT, || async {
        accounts.get_opt(ACCOUNT_NAME).await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(refused(&server, &client_id, &secret).await, "the published secret is revoked");
    // The client is still registered: one of the registration access tokens
    // keysmith held (the last, rotated by the revoking update) still reads it.
    let mut found = false;
    for token in tokens.all() {
        let registration = Registration { registration_access_token: token, ..stale.clone() };
        if server.client_config(&registration).await.0 == StatusCode::OK {
            found = true;
        }
    }
    assert!(found, "the client is kept on the server");
    let events = Api::<Event>::namespaced(client.clone(), &ns.name).list(&ListParams::default()).await.expect("events");
    assert!(events.items.iter().any(|e| e.reason.as_deref() == Some("AccountKeptWithoutKeys")));
    ns.delete().await;
}

/// An update's answer lost after the server acted (it replaced the
/// registration access token): the account says keysmith lost control of
/// the client, naming it, with an event; nothing more is registered or
/// issued while it waits; once the server's admin deletes the client and
/// the registration Secret is deleted, a new client is registered and
/// published. Without the mark, the refused token would read as a deleted
/// client and a second client would be registered beside the first.
#[tokio::test]
async fn a_lost_update_answer_waits_for_the_admin_and_registers_nothing_meanwhile() {
    let cp = control_plane().await;
    let client = cp.client().await.expect("client");
    let ns = TestNamespace::create(&client, "oauth2-lost").await;
    let server = OidcServer::start().await;
    // The server builds client configuration endpoints from the Host: the
    // proxy's, so every request goes through it.
    let proxy = fault_proxy::FaultProxy::start_keeping_host(&server.info.issuer, server.http.clone()).await;
    token_secret(&client, &ns.name, "oauth2-admin", &server.info.initial_access_token).await;
    let _operator = Operator::start(cp, &ns.name, &[]);
    apply_yaml(&client, &ns.name, &account_yaml(&server).replace(&server.info.issuer, &proxy.url)).await;
    apply_yaml(&client, &ns.name, &binding_yaml(&["read"])).await;
    ready_account(&client, &ns.name, ACCOUNT_NAME).await;
    let data = secret_data(&client, &ns.name, OUTPUT_SECRET).await.expect("the output Secret");
    let (client_id, secret) = (data["client_id"].clone(), data["client_secret"].clone());
    assert_eq!(server.clients().await, BTreeSet::from([client_id.clone()]));

    // The grant's update reaches the server; its answer does not.
    proxy.inject_next("PUT", fault_proxy::Fault::Lost);
    apply_yaml(&client, &ns.name, &binding_yaml(&["read", "write"])).await;
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let message = eventually("the account to say keysmith lost control", WAIT, || async {
        let status = accounts.get(ACCOUNT_NAME).await.ok()?.status?;
        let ready = status.common.conditions.into_iter().find(|c| c.type_ == "Ready" && c.status == "False")?;
        (ready.reason == "Conflict" && ready.message.contains("lost control")).then_some(ready.message)
    })
    .await;
    assert!(message.contains(&format!("lost control of OAuth2 client {client_id}")), "{message}");
    assert!(message.contains(&format!("the Secret {}/{REGISTRATION_SECRET}", ns.name)), "{message}");
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    eventually("an event saying so", WAIT, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items.iter().any(|e| e.message.as_deref().is_some_and(|m| m.contains("lost control"))).then_some(())
    })
    .await;
    // It waits: no second client, no new secret, for a while.
    let requests = proxy.requests().len();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(server.clients().await, BTreeSet::from([client_id.clone()]), "nothing else was registered");
    let writes = proxy.requests()[requests..]
        .iter()
        .filter(|r| r.method == "PUT" || (r.method == "POST" && r.path == "/reg"))
        .count();
    assert_eq!(writes, 0, "no update or registration was sent while waiting");
    assert!(!refused(&server, &client_id, &secret).await, "the published secret still works");
    let text = serde_json::to_string(&accounts.get(ACCOUNT_NAME).await.expect("account")).expect("json");
    let registration = registration(&client, &ns.name).await;
    assert!(!text.contains(&registration.registration_access_token) && !text.contains(&secret));

    // The admin deletes the client, then the registration Secret.
    server.admin_delete_client(&client_id).await;
    Api::<Secret>::namespaced(client.clone(), &ns.name)
        .delete(REGISTRATION_SECRET, &DeleteParams::default())
        .await
        .expect("delete the registration Secret");
    let data = eventually("a new client published", WAIT, || async {
        let data = secret_data(&client, &ns.name, OUTPUT_SECRET).await?;
        (data["client_id"] != client_id).then_some(data)
    })
    .await;
    ready_account(&client, &ns.name, ACCOUNT_NAME).await;
    assert_eq!(server.clients().await, BTreeSet::from([data["client_id"].clone()]));
    assert!(!refused(&server, &data["client_id"], &data["client_secret"]).await, "the new secret works");
    ns.delete().await;
}

/// Behind a ClusterAppConnection the registration record lives in the
/// cluster admin's namespace (the initial access token's), never in the
/// tenant's: whoever holds a client's registration access token can change
/// its scopes past the connection's allowedRoles. It goes with the client.
#[tokio::test]
async fn a_cluster_connection_keeps_registrations_out_of_the_tenants_namespace() {
    let server = OidcServer::start().await;
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let platform = TestNamespace::create(&client, "oauth2-platform").await;
    let ns = TestNamespace::create(&client, "oauth2-tenant").await;
    let _operator = Operator::start(cp, &ns.name, &[]);
    token_secret(&client, &platform.name, "oauth2-admin", &server.info.initial_access_token).await;
    let connection = format!(
        r#"
apiVersion: keysmith.dev/v1alpha1
kind: ClusterAppConnection
metadata: {{name: {p}}}
spec:
  provider:
    oauth2:
      registrationEndpoint: "{registration}"
      tokenEndpoint: "{token}"
      initialAccessTokenSecretRef: {{name: oauth2-admin, namespace: {p}}}
  namespaceSelector: {{matchLabels: {{keysmith.dev/test: oauth2-tenant}}}}
  policy: {{allowedRoles: ["read"]}}
"#,
        p = platform.name,
        registration = server.info.registration_endpoint,
        token = server.info.token_endpoint,
    );
    for object in keysmith::manifest::parse(&connection).expect("parses") {
        keysmith::manifest::apply(&client, &object, "test").await.expect("apply");
    }
    let account = format!(
        "apiVersion: keysmith.dev/v1alpha1\nkind: IntegrationAccount\nmetadata: {{name: {ACCOUNT_NAME}}}\nspec:\n  connectionRef: {{kind: ClusterAppConnection, name: {}}}\n  secret: {{name: {OUTPUT_SECRET}}}\n",
        platform.name
    );
    apply_yaml(&client, &ns.name, &account).await;
    apply_yaml(&client, &ns.name, &binding_yaml(&["read"])).await;
    let ready = ready_account(&client, &ns.name, ACCOUNT_NAME).await;
    let uid = ready.uid().expect("a uid");
    let external = ready.status.expect("status").account.expect("the client");
    assert_eq!(external.account_name.as_deref(), Some(format!("{}.{ACCOUNT_NAME}", ns.name).as_str()));

    let tenant_secrets = Api::<Secret>::namespaced(client.clone(), &ns.name);
    assert!(
        tenant_secrets.get_opt(REGISTRATION_SECRET).await.expect("read").is_none(),
        "nothing in the tenant's namespace"
    );
    let records = Api::<Secret>::namespaced(client.clone(), &platform.name);
    let name = format!("keysmith-oauth2-{uid}");
    let record = records.get(&name).await.expect("the record, in the admin's namespace");
    assert_eq!(record.type_.as_deref(), Some(REGISTRATION_SECRET_TYPE));
    assert_eq!(record.labels().get(keysmith::ownership::ACCOUNT_UID), Some(&uid));
    let data = secret_data(&client, &ns.name, OUTPUT_SECRET).await.expect("the output Secret");
    assert_exact_scopes(&server, &data, &["read"]).await;

    // Deleting the account deletes the client and its record.
    Api::<IntegrationAccount>::namespaced(client.clone(), &ns.name)
        .delete(ACCOUNT_NAME, &DeleteParams::default())
        .await
        .expect("delete");
    eventually("the record to go with the client", WAIT, || async {
        records.get_opt(&name).await.ok()?.is_none().then_some(())
    })
    .await;
    let _ = Api::<keysmith::api::ClusterAppConnection>::all(client.clone())
        .delete(&platform.name, &DeleteParams::default())
        .await;
    ns.delete().await;
    platform.delete().await;
}
