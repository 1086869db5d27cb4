//! The provider conformance suite against the `oauth2` provider and a real
//! OAuth 2.0 authorization server (npm's oidc-provider, one per test,
//! `tests/common/oidc_server.rs`).
//!
//! How the suite's notions map onto OAuth 2.0 dynamic client registration:
//! - an account is a registered client, and keysmith's ownership is its
//!   registration store: every provider of a target shares one
//!   [`InMemoryRegistrationStore`], as the operator's share the Secrets;
//! - roles are scopes (`read` and `write`);
//! - keys are the client secret, one per client (`max_keys_per_account = 1`),
//!   so the suite checks replacement: a new key makes the previous one stop
//!   working at once, and revoking the current one leaves none working;
//! - whether a key works is decided by a `client_credentials` token request
//!   at the server's token endpoint with the key's `client_id` and
//!   `client_secret`, as a workload makes it. A client without any scope has
//!   no grant type (see the provider's docs), and the server answers its
//!   token request with a `400` after authenticating it; for such a client
//!   the secret is proven at the introspection endpoint, which authenticates
//!   the client the same way (`401 invalid_client` for a wrong secret). The
//!   suite's key check runs on a client without roles, so it needs this;
//! - the refused provider carries a wrong initial access token;
//! - faults and the rate budget go through the suite's fault proxy: the
//!   proxied provider's registration, token and introspection endpoints are
//!   the proxy's, and so is every client configuration endpoint it reads
//!   (its store rewrites the server's origin to the proxy's, see
//!   [`ProxiedStore`]), with a 2 s request timeout;
//! - the foreign account is a client registered by hand, with the initial
//!   access token, under the same client name.
//!
//! Every check runs. Two need more than the suite's generic code says:
//! - `create_is_idempotent_and_adopts_nothing` cannot apply as written, and
//!   runs below in an oauth2 form that keeps its promise: its second half
//!   expects a foreign account to be visible (`observe_account` → `Some`,
//!   not owned) and creating it to be a `Conflict`. RFC 7591/7592 offer no
//!   way to list clients or find one by name (and client names are not
//!   unique), so keysmith cannot see a client it did not register: it is
//!   `None` to keysmith, creating the account registers a client of its own,
//!   and the foreign client is never read, changed or deleted.
//! - the two fault checks observe an account they never create. keysmith
//!   knows from its store that it has no client for such an account and
//!   answers without any request (ownership is the store), which would leave
//!   the proxy nothing to fault. So once a proxied provider exists,
//!   [`Target::account`] registers the account's client at once (directly,
//!   not through the proxy): observing it is then a real RFC 7592 read of
//!   the client configuration endpoint, through the proxy.

mod common;
mod conformance;
#[path = "common/oidc_server.rs"]
mod oidc_server;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use async_trait::async_trait;
use conformance::Target;
use keysmith::provider::{
    oauth2::{InMemoryRegistrationStore, OAuth2Provider, Registration, RegistrationStore},
    AccountRequest, IssuedKey, KeyRequest, Provider, ProviderError, RoleGrant,
};
use oidc_server::{HandRegistered, OidcServer};
use reqwest::StatusCode;

/// What oidc-provider says to an authenticated client that has no grant type.
const NO_GRANT: &str = "requested grant type is not allowed for this client";

/// The registrations of a proxied provider: the target's store, with every
/// client configuration endpoint moved from the server's origin to the
/// proxy's on the way out, and back on the way in. oidc-provider builds
/// `registration_client_uri` from the request's `Host`, which the proxy
/// replaces with the server's, so without this a proxied provider would
/// read and write clients around the proxy.
struct ProxiedStore {
    inner: Arc<InMemoryRegistrationStore>,
    upstream: String,
    proxy: String,
}

impl ProxiedStore {
    fn moved(registration: &Registration, from: &str, to: &str) -> Registration {
        let mut moved = registration.clone();
        if let Some(path) = registration.registration_client_uri.strip_prefix(from) {
            moved.registration_client_uri = format!("{to}{path}");
        }
        moved
    }
}

#[async_trait]
impl RegistrationStore for ProxiedStore {
    async fn get(&self, account: &AccountRequest) -> Result<Option<Registration>, ProviderError> {
        Ok(self.inner.get(account).await?.map(|r| Self::moved(&r, &self.upstream, &self.proxy)))
    }

    async fn put(&self, account: &AccountRequest, registration: &Registration) -> Result<(), ProviderError> {
        self.inner.put(account, &Self::moved(registration, &self.proxy, &self.upstream)).await
    }

    async fn delete(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        self.inner.delete(account).await
    }
}

struct OAuth2 {
    server: OidcServer,
    /// Shared by every provider of this target.
    store: Arc<InMemoryRegistrationStore>,
    /// Makes this target's owner uids its own.
    run: u64,
    /// Whether a proxied provider exists (see the module docs).
    proxied: AtomicBool,
    /// The clients registered by hand, by name.
    foreign: Mutex<BTreeMap<String, HandRegistered>>,
}

impl OAuth2 {
    fn direct(&self, http: reqwest::Client) -> OAuth2Provider {
        let info = &self.server.info;
        OAuth2Provider::new(
            info.registration_endpoint.clone(),
            info.token_endpoint.clone(),
            Some(info.introspection_endpoint.clone()),
            Some(info.initial_access_token.clone()),
            http,
            self.store.clone(),
        )
    }

    fn foreign(&self, name: &str) -> HandRegistered {
        self.foreign.lock().unwrap().get(name).cloned().expect("a client registered by hand")
    }

    /// Registers `account`'s client at once, from a synchronous caller.
    fn register_now(&self, account: &AccountRequest) {
        // Its own thread and runtime (and HTTP client, whose connections
        // belong to that runtime): the caller's runtime is busy calling us.
        let provider = self.direct(reqwest::Client::new());
        let registered = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    runtime.block_on(provider.create_account(account))
                })
                .join()
        });
        registered.expect("registering does not panic").expect("the client is registered");
    }
}

#[async_trait]
impl Target for OAuth2 {
    fn provider(&self) -> Arc<dyn Provider> {
        Arc::new(self.direct(self.server.http.clone()))
    }

    /// The server's origin: the proxy forwards `<origin><path>`, and every
    /// endpoint is a path under it.
    fn upstream(&self) -> (String, reqwest::Client) {
        (self.server.info.issuer.clone(), self.server.http.clone())
    }

    async fn provider_via(&self, url: &str) -> Arc<dyn Provider> {
        self.proxied.store(true, Ordering::SeqCst);
        let info = &self.server.info;
        let proxy = url.trim_end_matches('/').to_owned();
        let via = |endpoint: &str| {
            let path = endpoint.strip_prefix(&info.issuer).expect("every endpoint is under the issuer");
            format!("{proxy}{path}")
        };
        let store =
            Arc::new(ProxiedStore { inner: self.store.clone(), upstream: info.issuer.clone(), proxy: proxy.clone() });
        Arc::new(
            OAuth2Provider::new(
                via(&info.registration_endpoint),
                via(&info.token_endpoint),
                Some(via(&info.introspection_endpoint)),
                Some(info.initial_access_token.clone()),
                reqwest::Client::new(),
                store,
            )
            .with_timeout(Duration::from_secs(2)),
        )
    }

    async fn refused_provider(&self) -> Arc<dyn Provider> {
        let info = &self.server.info;
        Arc::new(OAuth2Provider::new(
            info.registration_endpoint.clone(),
            info.token_endpoint.clone(),
            Some(info.introspection_endpoint.clone()),
            Some(format!("not-the-token-{:016x}", rand::random::<u64>())),
            self.server.http.clone(),
            Arc::new(InMemoryRegistrationStore::new()),
        ))
    }

    fn account(&self, name: &str) -> AccountRequest {
        let account = AccountRequest {
            name: format!("conf-{name}"),
            namespace: "conformance".to_owned(),
            account_name: name.to_owned(),
            owner_uid: format!("uid-{:016x}-{name}", self.run),
            description: Some("conformance".into()),
            owner: Some("tests".into()),
            options: Default::default(),
        };
        if self.proxied.load(Ordering::SeqCst) {
            self.register_now(&account);
        }
        account
    }

    fn roles(&self) -> [RoleGrant; 2] {
        ["read", "write"].map(|scope| RoleGrant { role: scope.to_owned(), scope: None })
    }

    /// A client registered by hand under the name `name`, with the scope
    /// `read`: keysmith's store knows nothing of it.
    async fn make_foreign_account(&self, name: &str) {
        let client = self.server.register_client(name, "read").await;
        self.foreign.lock().unwrap().insert(name.to_owned(), client);
    }

    async fn key_works(&self, key: &IssuedKey) -> bool {
        let values = key.material.expose();
        let client_id = values.get("client_id").expect("the key names its client");
        let secret = values.get("client_secret").expect("the key carries a secret");
        let scope = values.get("scope").map(String::as_str).filter(|s| !s.is_empty());
        let (status, body) = self.server.token(client_id, secret, scope).await;
        match status {
            StatusCode::OK => {
                assert!(body["access_token"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
                true
            }
            StatusCode::UNAUTHORIZED => {
                assert_eq!(body["error"], "invalid_client", "{body}");
                false
            }
            // Authenticated, but a client without scopes has no grant type:
            // the introspection endpoint tells whether the secret is right.
            StatusCode::BAD_REQUEST if body["error_description"] == NO_GRANT => {
                let (status, body) = self.server.introspect(client_id, secret, "keysmith-conformance").await;
                match status {
                    StatusCode::OK => true,
                    StatusCode::UNAUTHORIZED => false,
                    other => panic!("the introspection endpoint answered {other}: {body}"),
                }
            }
            other => panic!("the token endpoint answered {other}: {body}"),
        }
    }
}

async fn target() -> OAuth2 {
    OAuth2 {
        server: OidcServer::start().await,
        store: Arc::new(InMemoryRegistrationStore::new()),
        run: rand::random(),
        proxied: AtomicBool::new(false),
        foreign: Mutex::new(BTreeMap::new()),
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let target = target().await;
            conformance::$name(&target).await;
        }
    )*};
}

conformance!(
    another_integration_accounts_account_is_never_taken_over,
    delete_tolerates_not_found,
    role_sync_adds_and_removes,
    keys_issue_verify_and_revoke,
    refused_credential_is_unauthorized,
    throttling_and_outages_are_transient,
    rate_budget_is_never_exceeded,
);

/// The suite's `create_is_idempotent_and_adopts_nothing` in its oauth2 form
/// (see the module docs): its first half as the suite has it; then a client
/// registered by hand under the account's name is invisible to keysmith, and
/// keysmith's own client for that account, its roles, keys and deletion
/// leave the foreign client exactly as it was.
#[tokio::test]
async fn create_is_idempotent_and_adopts_nothing() {
    let target = target().await;
    let p = target.provider();
    let account = target.account("idem");
    assert_eq!(p.observe_account(&account).await.unwrap(), None);
    let first = p.create_account(&account).await.unwrap();
    let second = p.create_account(&account).await.unwrap();
    assert_eq!(first.id, second.id, "create twice: same account");
    let seen = p.observe_account(&account).await.unwrap().expect("observed");
    assert!(seen.owned && !seen.drifted, "{seen:?}");

    let foreign = target.account("foreign");
    target.make_foreign_account(&foreign.name).await;
    let by_hand = target.foreign(&foreign.name);
    let (status, before) = target.server.client_config(&by_hand.registration).await;
    assert_eq!(status, StatusCode::OK, "{before}");
    assert_eq!(before["client_name"], foreign.name.as_str());

    // Not in keysmith's store: keysmith cannot see it, so cannot adopt it.
    assert_eq!(p.observe_account(&foreign).await.unwrap(), None, "a client keysmith did not register is not its own");
    assert_eq!(p.list_roles(&foreign).await.unwrap(), vec![]);
    assert_eq!(p.list_keys(&foreign).await.unwrap(), vec![]);
    let ours = p.create_account(&foreign).await.unwrap();
    assert_ne!(ours.id, by_hand.client_id, "keysmith registers a client of its own, never adopts");
    assert!(ours.owned, "{ours:?}");
    let [read, write] = target.roles();
    p.grant_role(&foreign, &write).await.unwrap();
    p.revoke_role(&foreign, &read).await.unwrap();
    let key = p.issue_key(&foreign, &KeyRequest { key_id: "k1".into(), lifetime: None }).await.unwrap();
    assert_eq!(key.material.expose()["client_id"], ours.id);
    p.revoke_key(&foreign, "k1").await.unwrap();
    p.delete_account(&foreign).await.unwrap();
    assert_eq!(p.observe_account(&foreign).await.unwrap(), None);

    // The foreign client is as it was: same metadata and scope, and its
    // registration access token and secret still work.
    let (status, after) = target.server.client_config(&by_hand.registration).await;
    assert_eq!(status, StatusCode::OK, "the foreign client still exists: {after}");
    assert_eq!(after, before, "the foreign client is unchanged");
    let (status, body) = target.server.token(&by_hand.client_id, &by_hand.client_secret, Some("read")).await;
    assert_eq!((status, body["scope"].as_str()), (StatusCode::OK, Some("read")), "{body}");

    p.delete_account(&account).await.unwrap();
}
