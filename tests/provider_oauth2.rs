//! The `oauth2` provider against a real OAuth 2.0 authorization server:
//! npm's `oidc-provider` (pinned in `tests/oidc/package.json`), run by
//! `tests/oidc/server.js` on a free loopback port, one per test, killed when
//! the test ends (`tests/common/oidc_server.rs` starts it and says where the
//! package comes from). It registers clients behind an initial access token
//! (RFC 7591), manages them (RFC 7592, rotating the registration access token
//! on every update), issues client-credentials tokens and introspects them.
//!
//! Which scopes a client may use, and whether a secret still works, is
//! checked with the server's own token endpoint, as a workload would.

#[path = "common/fault_proxy.rs"]
#[allow(dead_code)]
mod fault_proxy;
#[path = "common/oidc_server.rs"]
mod oidc_server;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use keysmith::provider::oauth2::{
    self, InMemoryRegistrationStore, OAuth2Provider, Registration, RegistrationStore, AUTH_METHOD_OPTION,
};
use keysmith::provider::{AccountRequest, IssuedKey, KeyMaterial, KeyRequest, Provider, ProviderError, RoleGrant};
use oidc_server::OidcServer;
use reqwest::StatusCode;
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

fn secret_of(key: &IssuedKey) -> &str {
    &key.material.expose()["client_secret"]
}

fn client_id_of(key: &IssuedKey) -> &str {
    &key.material.expose()["client_id"]
}

/// The answer of the token endpoint to an authenticated client without a
/// grant type. RFC 6749 §5.2 says `unauthorized_client`; oidc-provider says
/// `invalid_request`.
fn assert_no_grant(status: StatusCode, body: &Value) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_request", "{body}");
    assert_eq!(body["error_description"], "requested grant type is not allowed for this client", "{body}");
    assert_eq!(body.get("access_token"), None, "{body}");
}

/// The key with another secret.
fn with_secret(key: &IssuedKey, secret: &str) -> IssuedKey {
    let mut values = key.material.expose().clone();
    values.insert("client_secret".to_owned(), secret.to_owned());
    IssuedKey { material: KeyMaterial::new(values), ..key.clone() }
}

async fn stored(store: &InMemoryRegistrationStore, account: &AccountRequest) -> Registration {
    store.get(account).await.expect("store").expect("a registration is stored")
}

#[tokio::test]
async fn register_is_idempotent_and_keeps_the_registration_in_the_store() {
    let server = OidcServer::start().await;
    let (provider, store) = server.provider();
    let acct = account("billing-sync");

    assert_eq!(provider.observe_account(&acct).await.expect("observe"), None);
    let created = provider.create_account(&acct).await.expect("register");
    assert!(created.owned && !created.drifted && !created.disabled, "{created:?}");
    assert_eq!(created.name, "billing-sync");
    let registration = stored(&store, &acct).await;
    assert_eq!(registration.client_id, created.id);
    assert!(registration.registration_client_uri.starts_with(&server.info.registration_endpoint));
    assert_eq!(registration.current_key, None);

    let (status, config) = server.client_config(&registration).await;
    assert_eq!(status, StatusCode::OK, "{config}");
    assert_eq!(config["client_name"], "billing-sync");
    assert_eq!(config["software_id"], oauth2::SOFTWARE_ID);
    assert_eq!(config["token_endpoint_auth_method"], "client_secret_basic");
    // No role yet: no grant, so no token for anything.
    assert_eq!(config["grant_types"], json!([]));
    assert_eq!(config.get("scope"), None);

    let again = provider.create_account(&acct).await.expect("register again");
    assert_eq!(again, created);
    assert_eq!(stored(&store, &acct).await, registration, "the second create changed nothing");
    assert_eq!(provider.observe_account(&acct).await.expect("observe"), Some(created.clone()));
    // Nothing drifted: update does not touch the client (its token would rotate).
    assert_eq!(provider.update_account(&acct).await.expect("update"), created);
    assert_eq!(stored(&store, &acct).await, registration);

    // Another IntegrationAccount of the same name gets a client of its own.
    let twin = account("billing-sync");
    let other = provider.create_account(&twin).await.expect("register twin");
    assert_ne!(other.id, created.id);

    // A client that vanished (deleted by the server's admin, say) is
    // registered anew.
    let response = server
        .http
        .delete(&registration.registration_client_uri)
        .bearer_auth(&registration.registration_access_token)
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(provider.observe_account(&acct).await.expect("observe"), None);
    let renewed = provider.create_account(&acct).await.expect("register anew");
    assert_ne!(renewed.id, created.id);
    assert_eq!(stored(&store, &acct).await.client_id, renewed.id);
}

#[tokio::test]
async fn tokens_carry_the_granted_scopes_only() {
    let server = OidcServer::start().await;
    let (provider, store) = server.provider();
    let acct = account("reporting");
    provider.create_account(&acct).await.expect("register");

    // Without roles the secret authenticates but gets no token at all, not
    // even for a scope nobody granted (oidc-provider lets a client without
    // `scope` metadata ask for any scope).
    let bare = provider.issue_key(&acct, &key("k0")).await.expect("issue");
    assert_eq!(bare.material.expose()["scope"], "");
    provider.verify_key(&acct, &bare).await.expect("the secret authenticates");
    for scope in [Some("admin"), None] {
        let (status, body) = server.token(client_id_of(&bare), secret_of(&bare), scope).await;
        assert_no_grant(status, &body);
    }
    // A wrong secret fails verification, with or without introspection.
    let wrong = with_secret(&bare, "not-the-secret");
    let err = provider.verify_key(&acct, &wrong).await.expect_err("wrong secret");
    assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");
    let plain = OAuth2Provider::new(
        server.info.registration_endpoint.clone(),
        server.info.token_endpoint.clone(),
        None,
        None,
        server.http.clone(),
        store.clone(),
    );
    plain.verify_key(&acct, &bare).await.expect("the secret authenticates, without introspection");
    let err = plain.verify_key(&acct, &wrong).await.expect_err("wrong secret, without introspection");
    assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");

    provider.grant_role(&acct, &role("read")).await.expect("grant read");
    provider.grant_role(&acct, &role("write")).await.expect("grant write");
    provider.grant_role(&acct, &role("write")).await.expect("granting twice is fine");
    assert_eq!(roles(provider.list_roles(&acct).await.expect("list")), set(&["read", "write"]));

    let issued = provider.issue_key(&acct, &key("k1")).await.expect("issue");
    assert_eq!(issued.id, "k1");
    assert_eq!(issued.expires_at, None);
    let material = issued.material.expose();
    assert_eq!(
        material.keys().map(String::as_str).collect::<Vec<_>>(),
        ["client_id", "client_secret", "scope", "token_url"]
    );
    assert_eq!(material["scope"], "read write");
    assert_eq!(material["token_url"], server.info.token_endpoint);
    provider.verify_key(&acct, &issued).await.expect("the new key works, and its token introspects as active");

    let (status, body) = server.token(client_id_of(&issued), secret_of(&issued), Some("read write")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["scope"], "read write");
    let (status, body) = server.token(client_id_of(&issued), secret_of(&issued), Some("read")).await;
    assert_eq!((status, body["scope"].as_str()), (StatusCode::OK, Some("read")), "{body}");
    let (status, body) = server.token(client_id_of(&issued), secret_of(&issued), Some("read admin")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_scope");
}

#[tokio::test]
async fn grant_and_revoke_change_what_a_token_may_carry() {
    let server = OidcServer::start().await;
    let (provider, store) = server.provider();
    let acct = account("deployer");
    provider.create_account(&acct).await.expect("register");
    provider.grant_role(&acct, &role("read")).await.expect("grant read");
    let issued = provider.issue_key(&acct, &key("k1")).await.expect("issue");
    let (id, secret) = (client_id_of(&issued).to_owned(), secret_of(&issued).to_owned());

    let (status, _) = server.token(&id, &secret, Some("admin")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let before = stored(&store, &acct).await;
    provider.grant_role(&acct, &role("admin")).await.expect("grant admin");
    let (status, body) = server.token(&id, &secret, Some("admin")).await;
    assert_eq!((status, body["scope"].as_str()), (StatusCode::OK, Some("admin")), "{body}");

    // Every update rotated the registration access token: keysmith stored
    // the new one, and the server refuses the old one.
    let after = stored(&store, &acct).await;
    assert_ne!(after.registration_access_token, before.registration_access_token);
    let (status, _) = server.client_config(&before).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The role changes kept the secret, and the key.
    assert_eq!(after.current_key.as_ref().map(|k| k.id.as_str()), Some("k1"));

    provider.revoke_role(&acct, &role("admin")).await.expect("revoke admin");
    provider.revoke_role(&acct, &role("admin")).await.expect("revoking twice is fine");
    let (status, body) = server.token(&id, &secret, Some("admin")).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_scope")), "{body}");
    let (status, _) = server.token(&id, &secret, Some("read")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(roles(provider.list_roles(&acct).await.expect("list")), set(&["read"]));

    // The last role goes: no grant is left, and the client cannot ask for
    // whatever it likes.
    provider.revoke_role(&acct, &role("read")).await.expect("revoke read");
    assert_eq!(roles(provider.list_roles(&acct).await.expect("list")), set(&[]));
    for scope in [Some("read"), Some("admin"), None] {
        let (status, body) = server.token(&id, &secret, scope).await;
        assert_no_grant(status, &body);
    }
    let observed = provider.observe_account(&acct).await.expect("observe").expect("exists");
    assert!(!observed.drifted, "{observed:?}");

    // Scopes the server does not know, and roles that are no scope.
    let err = provider.grant_role(&acct, &role("superuser")).await.expect_err("unknown scope");
    assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");
    assert!(err.to_string().contains("invalid_client_metadata"), "{err}");
    let err = provider.grant_role(&acct, &role("read write")).await.expect_err("two scopes");
    assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");
    let scoped = RoleGrant { role: "read".to_owned(), scope: Some("db".to_owned()) };
    let err = provider.grant_role(&acct, &scoped).await.expect_err("scoped role");
    assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");
    assert_eq!(roles(provider.list_roles(&acct).await.expect("list")), set(&[]));
}

#[tokio::test]
async fn issue_key_rotates_the_secret_at_once() {
    let server = OidcServer::start().await;
    let (provider, store) = server.provider();
    let acct = account("ci-bot");
    provider.create_account(&acct).await.expect("register");
    provider.grant_role(&acct, &role("read")).await.expect("grant");
    assert_eq!(provider.list_keys(&acct).await.expect("list"), vec![]);

    let first = provider.issue_key(&acct, &key("k1")).await.expect("issue k1");
    let keys = provider.list_keys(&acct).await.expect("list");
    assert_eq!(keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), ["k1"]);
    assert!(keys[0].created_at.is_some());

    let second = provider.issue_key(&acct, &key("k2")).await.expect("issue k2");
    assert_eq!(client_id_of(&second), client_id_of(&first));
    assert_ne!(secret_of(&second), secret_of(&first));
    provider.verify_key(&acct, &second).await.expect("the new secret works");
    let (status, body) = server.token(client_id_of(&second), secret_of(&second), Some("read")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // No grace period: the old secret is refused at once.
    let (status, body) = server.token(client_id_of(&first), secret_of(&first), Some("read")).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_client")), "{body}");
    let err = provider.verify_key(&acct, &first).await.expect_err("the old secret");
    assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");
    assert_eq!(provider.list_keys(&acct).await.expect("list").iter().map(|k| k.id.clone()).collect::<Vec<_>>(), ["k2"]);

    // Revoking the replaced key changes nothing; revoking the current one
    // rotates the secret to one nobody holds.
    provider.revoke_key(&acct, "k1").await.expect("revoke k1");
    let (status, _) = server.token(client_id_of(&second), secret_of(&second), Some("read")).await;
    assert_eq!(status, StatusCode::OK);
    provider.revoke_key(&acct, "k2").await.expect("revoke k2");
    let (status, _) = server.token(client_id_of(&second), secret_of(&second), Some("read")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(provider.list_keys(&acct).await.expect("list"), vec![]);
    provider.revoke_key(&acct, "k2").await.expect("revoking twice is fine");
    assert_eq!(stored(&store, &acct).await.current_key, None);

    let third = provider.issue_key(&acct, &key("k3")).await.expect("issue k3");
    provider.verify_key(&acct, &third).await.expect("k3 works");

    let err = provider.issue_key(&acct, &key("")).await.expect_err("empty key id");
    assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");
    let nobody = account("nobody");
    let err = provider.issue_key(&nobody, &key("k1")).await.expect_err("no client");
    assert!(matches!(err, ProviderError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn client_secret_post_clients_and_auth_method_changes() {
    let server = OidcServer::start().await;
    let (provider, store) = server.provider();
    let basic = account("poster");
    provider.create_account(&basic).await.expect("register");
    provider.grant_role(&basic, &role("write")).await.expect("grant");
    let issued = provider.issue_key(&basic, &key("k1")).await.expect("issue");

    // Switching to client_secret_post is drift, which update repairs
    // keeping the secret.
    let mut post = basic.clone();
    post.options.insert(AUTH_METHOD_OPTION.to_owned(), "client_secret_post".to_owned());
    let seen = provider.observe_account(&post).await.expect("observe").expect("exists");
    assert!(seen.drifted, "{seen:?}");
    let updated = provider.update_account(&post).await.expect("update");
    assert!(!updated.drifted, "{updated:?}");
    let (_, config) = server.client_config(&stored(&store, &basic).await).await;
    assert_eq!(config["token_endpoint_auth_method"], "client_secret_post");
    assert_eq!(config["scope"], "write");
    provider.verify_key(&post, &issued).await.expect("the same secret works, in the form body");

    let mut odd = basic.clone();
    odd.options.insert(AUTH_METHOD_OPTION.to_owned(), "private_key_jwt".to_owned());
    let err = provider.update_account(&odd).await.expect_err("unsupported method");
    assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");
}

#[tokio::test]
async fn delete_removes_the_client() {
    let server = OidcServer::start().await;
    let (provider, store) = server.provider();
    let acct = account("leaver");
    provider.create_account(&acct).await.expect("register");
    provider.grant_role(&acct, &role("read")).await.expect("grant");
    let issued = provider.issue_key(&acct, &key("k1")).await.expect("issue");
    let registration = stored(&store, &acct).await;

    provider.delete_account(&acct).await.expect("delete");
    let (status, body) = server.token(client_id_of(&issued), secret_of(&issued), Some("read")).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_client")), "{body}");
    let (status, _) = server.client_config(&registration).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(store.get(&acct).await.expect("store"), None);
    assert_eq!(provider.observe_account(&acct).await.expect("observe"), None);

    provider.delete_account(&acct).await.expect("a second delete is fine");
    assert_eq!(provider.list_keys(&acct).await.expect("list"), vec![]);
    assert_eq!(provider.list_roles(&acct).await.expect("list"), vec![]);
    provider.revoke_role(&acct, &role("read")).await.expect("revoking from nothing is fine");
    provider.revoke_key(&acct, "k1").await.expect("revoking from nothing is fine");
    let err = provider.grant_role(&acct, &role("read")).await.expect_err("no client");
    assert!(matches!(err, ProviderError::NotFound(_)), "{err:?}");
    let err = provider.update_account(&acct).await.expect_err("no client");
    assert!(matches!(err, ProviderError::NotFound(_)), "{err:?}");

    // A client the server already forgot (its token with it) counts as deleted.
    provider.create_account(&acct).await.expect("register again");
    let registration = stored(&store, &acct).await;
    let response = server
        .http
        .delete(&registration.registration_client_uri)
        .bearer_auth(&registration.registration_access_token)
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    provider.delete_account(&acct).await.expect("delete what is gone");
    assert_eq!(store.get(&acct).await.expect("store"), None);
}

/// The proxied provider's request timeout; a read clears an update's mark
/// only twice this long after the update was sent.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A provider reaching the server only through a fault proxy that keeps the
/// `Host` header, so the server's client configuration endpoints are the
/// proxy's too; and its store.
async fn proxied(server: &OidcServer) -> (fault_proxy::FaultProxy, OAuth2Provider, Arc<InMemoryRegistrationStore>) {
    let proxy = fault_proxy::FaultProxy::start_keeping_host(&server.info.issuer, server.http.clone()).await;
    let store = Arc::new(InMemoryRegistrationStore::new());
    let provider = OAuth2Provider::new(
        format!("{}/reg", proxy.url),
        format!("{}/token", proxy.url),
        Some(format!("{}/token/introspection", proxy.url)),
        Some(server.info.initial_access_token.clone()),
        reqwest::Client::new(),
        store.clone(),
    )
    .with_timeout(REQUEST_TIMEOUT);
    (proxy, provider, store)
}

/// The server rotates the registration access token on every update
/// (RFC 7592 §2.2). When an update's answer is lost after the server acted,
/// the new token is lost with it: keysmith must not take the refused token
/// for a deleted client (and register another, or finish a deletion,
/// leaving this one behind with its scopes and secret), but say it lost
/// control, name the client, and wait until its record is deleted.
#[tokio::test]
async fn a_lost_update_answer_is_lost_control_not_a_deleted_client() {
    let server = OidcServer::start().await;
    let (proxy, provider, store) = proxied(&server).await;
    let acct = account("lost-answer");
    provider.create_account(&acct).await.expect("register");
    provider.grant_role(&acct, &role("read")).await.expect("grant");
    let issued = provider.issue_key(&acct, &key("k1")).await.expect("issue");
    let client_id = client_id_of(&issued).to_owned();

    // A request that never reached the server: a read the old token passes
    // clears the mark, once the update cannot be running at the server any
    // more (twice the request timeout), and nothing is lost.
    // (A grant reads the client, then updates it: the second request.)
    proxy.inject(fault_proxy::Fault::Delay(Duration::ZERO), 1);
    proxy.inject(fault_proxy::Fault::Reset, 1);
    provider.grant_role(&acct, &role("write")).await.expect_err("the connection was reset");
    assert!(stored(&store, &acct).await.update_sent_at.is_some(), "the update is marked in flight");
    assert!(provider.observe_account(&acct).await.expect("observe").is_some());
    assert!(stored(&store, &acct).await.update_sent_at.is_some(), "too soon to clear the mark");
    tokio::time::sleep(REQUEST_TIMEOUT * 2 + Duration::from_millis(200)).await;
    assert!(provider.observe_account(&acct).await.expect("observe").is_some());
    assert_eq!(stored(&store, &acct).await.update_sent_at, None, "the read cleared the mark");

    // A client error is an answer from a server that did not act: no mark.
    proxy.inject(fault_proxy::Fault::Delay(Duration::ZERO), 1);
    proxy.inject(fault_proxy::Fault::Status(400, None), 1);
    provider.grant_role(&acct, &role("write")).await.expect_err("refused");
    assert_eq!(stored(&store, &acct).await.update_sent_at, None, "a 400 clears the mark");

    // The server acts and the answer is lost: the scope is granted, the
    // token replaced, and keysmith never sees the new one.
    proxy.inject(fault_proxy::Fault::Delay(Duration::ZERO), 1);
    proxy.inject(fault_proxy::Fault::Lost, 1);
    provider.grant_role(&acct, &role("write")).await.expect_err("the answer was lost");
    assert!(server.clients().await.contains(&client_id), "the client lives on at the server");
    for (what, result) in [
        ("observe", provider.observe_account(&acct).await.map(|_| ())),
        ("create", provider.create_account(&acct).await.map(|_| ())),
        ("revoke a role", provider.revoke_role(&acct, &role("read")).await),
        ("issue a key", provider.issue_key(&acct, &key("k2")).await.map(|_| ())),
        ("delete", provider.delete_account(&acct).await),
    ] {
        let err = result.expect_err(what);
        let ProviderError::Conflict(message) = &err else { panic!("{what}: {err:?}") };
        assert!(message.contains(&format!("lost control of OAuth2 client {client_id}")), "{what}: {message}");
        assert!(message.contains("delete keysmith's registration record"), "{what}: {message}");
        let registration = stored(&store, &acct).await;
        assert!(!message.contains(&registration.registration_access_token), "{what}: the token in {message}");
        assert!(!message.contains(secret_of(&issued)), "{what}: the secret in {message}");
    }
    assert_eq!(server.clients().await, BTreeSet::from([client_id.clone()]), "no client was registered");
    let (status, body) = server.token(&client_id, secret_of(&issued), Some("read write")).await;
    assert_eq!(status, StatusCode::OK, "the client kept its secret and both scopes: {body}");

    // The admin deletes the record: keysmith registers a new client.
    store.delete(&acct).await.expect("forget");
    let observed = provider.create_account(&acct).await.expect("a new client");
    assert_ne!(observed.id, client_id);
    assert_eq!(server.clients().await, BTreeSet::from([client_id.clone(), observed.id.clone()]));

    // A gateway's 502 after the server acted is no proof that it did not:
    // the mark stays, and the refused token is lost control again.
    proxy.inject(fault_proxy::Fault::Delay(Duration::ZERO), 1);
    proxy.inject(fault_proxy::Fault::ActedThen(502), 1);
    let err = provider.grant_role(&acct, &role("read")).await.expect_err("a 502");
    assert!(matches!(err, ProviderError::Transient { .. }), "{err:?}");
    let err = provider.observe_account(&acct).await.expect_err("lost control");
    assert!(err.to_string().contains(&format!("lost control of OAuth2 client {}", observed.id)), "{err}");
}

#[tokio::test]
async fn the_initial_access_token_is_required() {
    let server = OidcServer::start().await;
    let (good, _) = server.provider();
    good.verify_connection().await.expect("the right initial access token is accepted");

    for token in [None, Some("not-the-token".to_owned())] {
        let store = Arc::new(InMemoryRegistrationStore::new());
        let provider = server.provider_with(token.clone(), store.clone());
        let acct = account("intruder");
        let err = provider.create_account(&acct).await.expect_err("registration without a valid token");
        assert!(matches!(err, ProviderError::Unauthorized(_)), "{token:?}: {err:?}");
        assert!(err.to_string().contains("invalid_token"), "{err}");
        assert_eq!(store.get(&acct).await.expect("store"), None);
        let err = provider.verify_connection().await.expect_err("verify without a valid token");
        assert!(matches!(err, ProviderError::Unauthorized(_)), "{token:?}: {err:?}");
    }

    // Wrong endpoints are spec errors, not outages.
    let wrong = OAuth2Provider::new(
        format!("{}/nowhere", server.info.issuer),
        server.info.token_endpoint.clone(),
        None,
        Some(server.info.initial_access_token.clone()),
        server.http.clone(),
        Arc::new(InMemoryRegistrationStore::new()),
    );
    let err = wrong.verify_connection().await.expect_err("no registration endpoint there");
    assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");
    let wrong = OAuth2Provider::new(
        server.info.registration_endpoint.clone(),
        format!("{}/nowhere", server.info.issuer),
        None,
        Some(server.info.initial_access_token.clone()),
        server.http.clone(),
        Arc::new(InMemoryRegistrationStore::new()),
    );
    let err = wrong.verify_connection().await.expect_err("no token endpoint there");
    assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");

    // Nothing answering at all: transient.
    let port = TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("address").port();
    let down = OAuth2Provider::new(
        format!("http://127.0.0.1:{port}/reg"),
        format!("http://127.0.0.1:{port}/token"),
        None,
        None,
        server.http.clone(),
        Arc::new(InMemoryRegistrationStore::new()),
    );
    let err = down.verify_connection().await.expect_err("nothing listens");
    assert!(matches!(err, ProviderError::Transient { .. }), "{err:?}");
}

#[tokio::test]
async fn throttling_is_transient_and_honours_retry_after() {
    let server = OidcServer::start().await;
    let (provider, store) = server.provider();
    let acct = account("patient");
    server.throttle(1, 7).await;
    let err = provider.create_account(&acct).await.expect_err("throttled");
    match &err {
        ProviderError::Transient { retry_after, .. } => assert_eq!(*retry_after, Some(Duration::from_secs(7))),
        other => panic!("expected Transient, got {other:?}"),
    }
    assert_eq!(store.get(&acct).await.expect("store"), None);
    provider.create_account(&acct).await.expect("registers once the server lets it");
}

#[tokio::test]
async fn credentials_never_show_in_debug_output_or_errors() {
    let server = OidcServer::start().await;
    let (provider, store) = server.provider();
    let acct = account("discreet");
    let created = provider.create_account(&acct).await.expect("register");
    provider.grant_role(&acct, &role("read")).await.expect("grant");
    let issued = provider.issue_key(&acct, &key("k1")).await.expect("issue");
    let registration = stored(&store, &acct).await;
    let rat = registration.registration_access_token.clone();
    let secret = secret_of(&issued).to_owned();
    let iat = server.info.initial_access_token.clone();

    let mut shown = vec![
        format!("{provider:?}"),
        format!("{store:?}"),
        format!("{registration:?}"),
        format!("{issued:?}"),
        format!("{:?}", issued.material),
        format!("{created:?}"),
        format!("{:?}", provider.list_keys(&acct).await),
        format!("{:?}", provider.observe_account(&acct).await),
    ];
    // Errors from calls that carry each credential.
    let wrong = with_secret(&issued, &format!("{secret}x"));
    shown.push(format!("{:?}", provider.verify_key(&acct, &wrong).await));
    shown.push(format!("{:?}", provider.grant_role(&acct, &role("superuser")).await));
    let stale = OAuth2Provider::new(
        server.info.registration_endpoint.clone(),
        server.info.token_endpoint.clone(),
        None,
        Some(format!("{iat}x")),
        server.http.clone(),
        Arc::new(InMemoryRegistrationStore::new()),
    );
    shown.push(format!("{stale:?}"));
    shown.push(format!("{:?}", stale.create_account(&acct).await));
    shown.push(format!("{:?}", stale.verify_connection().await));

    for text in &shown {
        for (name, value) in
            [("registration access token", &rat), ("client secret", &secret), ("initial access token", &iat)]
        {
            assert!(!text.contains(value.as_str()), "the {name} shows in {text}");
        }
    }
    assert!(shown[2].contains("<redacted>"), "{}", shown[2]);
}
