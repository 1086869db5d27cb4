//! The provider conformance suite against the `scim` provider and a real
//! SCIM 2.0 server (scim2-server, one per test, `tests/common/scim_server.rs`).
//!
//! Every check of the suite applies to SCIM and runs here:
//! - accounts are Users, ownership is the `externalId` tag, a User made by
//!   hand is the foreign account;
//! - roles are Group memberships: two Groups are created in the server first;
//! - keys are the User's password, one per account (`max_keys_per_account =
//!   1`), so the suite checks replacement: a new key makes the previous one
//!   stop working at once. Whether a key "works" is decided with
//!   scim2-server's `password eq` filter, as SCIM has no way to log in as a
//!   User (the provider's own `verify_key` only checks the key-id marker);
//! - faults and the rate budget go through the suite's fault proxy, in front
//!   of the server's origin, with the same `/v2` path prefix.

mod common;
mod conformance;
#[path = "common/scim_server.rs"]
mod scim_server;

use std::{sync::Arc, time::Duration};

use conformance::Target;
use keysmith::provider::{scim::ScimProvider, AccountRequest, IssuedKey, Provider, RoleGrant};
use scim_server::ScimServer;

/// The two Groups every target has, for `role_sync_adds_and_removes`.
const GROUPS: [&str; 2] = ["Billing Readers", "Billing Writers"];

struct Scim {
    server: ScimServer,
}

#[async_trait::async_trait]
impl Target for Scim {
    fn provider(&self) -> Arc<dyn Provider> {
        Arc::new(self.server.provider())
    }

    /// The origin (no path): the proxy forwards `<origin><path>`, and the
    /// provider behind it asks for `/v2/...`.
    fn upstream(&self) -> (String, reqwest::Client) {
        (self.server.origin.clone(), self.server.http.clone())
    }

    async fn provider_via(&self, url: &str) -> Arc<dyn Provider> {
        let base_url = format!("{}/v2", url.trim_end_matches('/'));
        Arc::new(
            ScimProvider::new(base_url, self.server.token.clone(), reqwest::Client::new())
                .with_timeout(Duration::from_secs(2)),
        )
    }

    async fn refused_provider(&self) -> Arc<dyn Provider> {
        Arc::new(ScimProvider::new(
            self.server.base_url.clone(),
            format!("not-the-token-{:016x}", rand::random::<u64>()),
            self.server.http.clone(),
        ))
    }

    fn account(&self, name: &str) -> AccountRequest {
        AccountRequest {
            name: format!("conf-{name}"),
            namespace: "conformance".to_owned(),
            account_name: name.to_owned(),
            owner_uid: format!("uid-{:016x}", rand::random::<u64>()),
            description: Some("conformance".into()),
            owner: Some("tests".into()),
            options: Default::default(),
        }
    }

    fn roles(&self) -> [RoleGrant; 2] {
        GROUPS.map(|group| RoleGrant { role: group.to_owned(), scope: None })
    }

    /// A User keysmith did not create: no `externalId` at all.
    async fn make_foreign_account(&self, name: &str) {
        self.server.create_user(name, None).await;
    }

    async fn key_works(&self, key: &IssuedKey) -> bool {
        let values = key.material.expose();
        let user_name = values.get("username").expect("the key names its user");
        let password = values.get("password").expect("the key carries a password");
        self.server.password_is(user_name, password).await
    }
}

async fn target() -> Scim {
    let server = ScimServer::start().await;
    for group in GROUPS {
        server.create_group(group).await;
    }
    Scim { server }
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
    create_is_idempotent_and_adopts_nothing,
    another_integration_accounts_account_is_never_taken_over,
    delete_tolerates_not_found,
    role_sync_adds_and_removes,
    keys_issue_verify_and_revoke,
    refused_credential_is_unauthorized,
    throttling_and_outages_are_transient,
    rate_budget_is_never_exceeded,
);
