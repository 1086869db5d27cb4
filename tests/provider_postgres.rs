//! The `postgres` provider against a real PostgreSQL server: each test
//! starts its own throwaway cluster (`tests/common/pg_server.rs`: Debian's
//! `postgresql` package, `initdb` into a temporary directory, `postgres` on
//! 127.0.0.1 with scram-sha-256 password authentication), acts through an
//! admin role that has only CREATEROLE and pg_signal_backend, and checks
//! every change by logging in with the issued keys.
//!
//! The binaries are found through `KEYSMITH_PG_BINDIR`, else `pg_config
//! --bindir`, else the newest `/usr/lib/postgresql/<major>/bin`.

#[path = "common/pg_server.rs"]
mod pg_server;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use keysmith::api::PostgresSslMode;
use keysmith::provider::postgres::{PostgresProvider, MATERIAL_KEYS};
use keysmith::provider::{AccountRequest, KeyRequest, Provider, ProviderError, RoleGrant};
use pg_server::{connect, free_port, refused, whoami, PgServer, ADMIN, ADMIN_PASSWORD};
use tokio_postgres::error::SqlState;

fn account(name: &str) -> AccountRequest {
    AccountRequest {
        name: name.to_owned(),
        namespace: "payments".to_owned(),
        account_name: name.to_owned(),
        owner_uid: format!("{:08x}-uid", rand::random::<u32>()),
        description: Some("Billing sync job: reads invoices every night".to_owned()),
        owner: Some("team-payments".to_owned()),
        options: BTreeMap::new(),
    }
}

fn key_request(id: &str) -> KeyRequest {
    KeyRequest { key_id: id.to_owned(), lifetime: None }
}

fn grant(role: &str) -> RoleGrant {
    RoleGrant { role: role.to_owned(), scope: None }
}

async fn key_ids(provider: &PostgresProvider, account: &AccountRequest) -> BTreeSet<String> {
    provider.list_keys(account).await.expect("list keys").into_iter().map(|k| k.id).collect()
}

#[tokio::test]
async fn create_is_idempotent_and_never_adopts_foreign_roles() {
    let server = PgServer::start().await;
    let provider = server.provider();
    provider.verify_connection().await.expect("the admin credential works");

    let billing = account("billing-sync");
    assert_eq!(provider.observe_account(&billing).await.expect("observe"), None);
    let created = provider.create_account(&billing).await.expect("create");
    assert!(created.owned && !created.disabled && !created.drifted, "{created:?}");
    assert_eq!(created.name, "billing-sync");
    let again = provider.create_account(&billing).await.expect("create again");
    assert_eq!(again, created);
    assert_eq!(provider.observe_account(&billing).await.expect("observe"), Some(created));
    let (comment, can_login, _) = server.role("billing-sync").await.expect("the role exists");
    let comment = comment.expect("a comment");
    assert!(comment.starts_with(&format!("keysmith:{}\n", billing.owner_uid)), "{comment}");
    assert!(comment.contains("description: Billing sync job: reads invoices every night"), "{comment}");
    assert!(comment.contains("owner: team-payments"), "{comment}");
    assert!(!can_login, "the account role is a group role: only keys log in");

    // A role someone else made, untagged or tagged for another account.
    let su = server.superuser().await;
    su.batch_execute("CREATE ROLE taken LOGIN; CREATE ROLE tagged; COMMENT ON ROLE tagged IS 'keysmith:another-uid'")
        .await
        .expect("foreign roles");
    for name in ["taken", "tagged"] {
        let foreign = account(name);
        assert!(
            matches!(provider.create_account(&foreign).await, Err(ProviderError::Conflict(_))),
            "{name}: create must refuse to adopt"
        );
        let observed = provider.observe_account(&foreign).await.expect("observe").expect("exists");
        assert!(!observed.owned);
        assert!(matches!(provider.update_account(&foreign).await, Err(ProviderError::Conflict(_))));
        assert!(matches!(provider.grant_role(&foreign, &grant("pg_monitor")).await, Err(ProviderError::Conflict(_))));
        assert!(matches!(provider.issue_key(&foreign, &key_request("k1")).await, Err(ProviderError::Conflict(_))));
        // Deleting and disabling leave it alone.
        provider.disable_account(&foreign).await.expect("disable skips a foreign role");
        provider.delete_account(&foreign).await.expect("delete skips a foreign role");
        assert!(server.role(name).await.is_some(), "{name} must survive");
    }
    assert_eq!(server.role("taken").await.map(|r| r.1), Some(true), "taken keeps LOGIN");
}

#[tokio::test]
async fn update_fixes_the_comment_and_attributes() {
    let server = PgServer::start().await;
    let provider = server.provider();
    let mut billing = account("billing-sync");
    provider.create_account(&billing).await.expect("create");

    // Someone edits the role by hand, keeping the tag.
    server
        .superuser()
        .await
        .batch_execute(&format!(
            "COMMENT ON ROLE \"billing-sync\" IS 'keysmith:{}\nowner: mallory'; ALTER ROLE \"billing-sync\" LOGIN CREATEDB",
            billing.owner_uid
        ))
        .await
        .expect("hand edit");
    let observed = provider.observe_account(&billing).await.expect("observe").expect("exists");
    assert!(observed.owned && observed.drifted, "{observed:?}");
    let updated = provider.update_account(&billing).await.expect("update");
    assert!(updated.owned && !updated.drifted, "{updated:?}");
    let (comment, can_login, create_db) = server.role("billing-sync").await.expect("exists");
    let comment = comment.expect("comment");
    assert!(comment.contains("owner: team-payments") && !comment.contains("mallory"), "{comment}");
    assert!(!can_login && !create_db);

    // The spec changes.
    billing.description = Some("Now also refunds".to_owned());
    billing.owner = None;
    assert!(provider.observe_account(&billing).await.expect("observe").expect("exists").drifted);
    assert!(!provider.update_account(&billing).await.expect("update").drifted);
    let comment = server.role("billing-sync").await.and_then(|r| r.0).expect("comment");
    assert!(comment.contains("description: Now also refunds") && !comment.contains("owner:"), "{comment}");

    // Not there: NotFound.
    assert!(matches!(provider.update_account(&account("nobody-here")).await, Err(ProviderError::NotFound(_))));
}

#[tokio::test]
async fn granted_roles_are_exactly_what_list_roles_shows_and_what_keys_get() {
    let server = PgServer::start().await;
    let provider = server.provider();
    let su = server.superuser().await;
    su.batch_execute(
        "CREATE TABLE ledger (id int); INSERT INTO ledger VALUES (42); REVOKE ALL ON ledger FROM PUBLIC; \
         CREATE ROLE ledger_reader NOLOGIN; GRANT SELECT ON ledger TO ledger_reader; \
         CREATE ROLE auditor NOLOGIN",
    )
    .await
    .expect("fixtures");

    let billing = account("billing-sync");
    provider.create_account(&billing).await.expect("create");
    assert!(provider.list_roles(&billing).await.expect("list").is_empty());
    let key = provider.issue_key(&billing, &key_request("k1")).await.expect("issue");
    let session = server.login_key(&key).await.expect("the key logs in");
    let denied = session.query("SELECT id FROM ledger", &[]).await.expect_err("no access before the grant");
    assert_eq!(denied.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));

    provider.grant_role(&billing, &grant("ledger_reader")).await.expect("grant");
    provider.grant_role(&billing, &grant("ledger_reader")).await.expect("grant again");
    assert_eq!(provider.list_roles(&billing).await.expect("list"), vec![grant("ledger_reader")]);
    // Membership is checked on every statement: the open session has it too.
    for client in [&session, &server.login_key(&key).await.expect("login")] {
        let row = client.query_one("SELECT id FROM ledger", &[]).await.expect("readable through the granted role");
        assert_eq!(row.get::<_, i32>(0), 42);
    }

    // A role granted by hand straight to a key role counts, and goes.
    su.batch_execute("GRANT auditor TO \"billing-sync_k_k1\"").await.expect("hand grant");
    assert_eq!(provider.list_roles(&billing).await.expect("list"), vec![grant("auditor"), grant("ledger_reader")]);
    provider.revoke_role(&billing, &grant("auditor")).await.expect("revoke the hand grant");
    assert_eq!(provider.list_roles(&billing).await.expect("list"), vec![grant("ledger_reader")]);

    provider.revoke_role(&billing, &grant("ledger_reader")).await.expect("revoke");
    provider.revoke_role(&billing, &grant("ledger_reader")).await.expect("revoke again");
    provider.revoke_role(&billing, &grant("never-existed")).await.expect("revoking a missing role");
    assert!(provider.list_roles(&billing).await.expect("list").is_empty());
    let denied = session.query("SELECT id FROM ledger", &[]).await.expect_err("revoked");
    assert_eq!(denied.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));

    // Errors.
    assert!(matches!(provider.grant_role(&billing, &grant("no_such_role")).await, Err(ProviderError::NotFound(_))));
    let scoped = RoleGrant { role: "ledger_reader".to_owned(), scope: Some("postgres".to_owned()) };
    assert!(matches!(provider.grant_role(&billing, &scoped).await, Err(ProviderError::Invalid(_))));
    assert_eq!(provider.default_scope(&billing), None);
    assert!(matches!(
        provider.grant_role(&account("not-created"), &grant("ledger_reader")).await,
        Err(ProviderError::NotFound(_))
    ));
    // A key of the account itself cannot be granted to it (a loop).
    assert!(matches!(provider.grant_role(&billing, &grant("billing-sync_k_k1")).await, Err(ProviderError::Invalid(_))));
}

#[tokio::test]
async fn keys_overlap_and_revoking_one_leaves_the_other() {
    let server = PgServer::start().await;
    let provider = server.provider();
    let billing = account("billing-sync");
    provider.create_account(&billing).await.expect("create");

    let k1 = provider.issue_key(&billing, &key_request("k1")).await.expect("issue k1");
    let k2 = provider.issue_key(&billing, &key_request("k2")).await.expect("issue k2");
    assert_eq!(k1.id, "k1");
    assert_eq!(k1.expires_at, None);
    let values = k1.material.expose();
    assert_eq!(values.keys().map(String::as_str).collect::<BTreeSet<_>>(), MATERIAL_KEYS.into_iter().collect());
    assert_eq!(values["username"], "billing-sync_k_k1");
    assert_eq!(values["host"], "127.0.0.1");
    assert_eq!(values["port"], server.port.to_string());
    assert_eq!(values["dbname"], "postgres");
    assert_ne!(values["password"], k2.material.expose()["password"]);
    provider.verify_key(&billing, &k1).await.expect("k1 verifies");
    provider.verify_key(&billing, &k2).await.expect("k2 verifies");

    // Both work at once: the grace period.
    let s1 = server.login_key(&k1).await.expect("k1 logs in");
    let s2 = server.login(&k2.material.expose()["username"], &k2.material.expose()["password"]).await.expect("k2");
    assert_eq!(whoami(&s1).await, ("billing-sync_k_k1".to_owned(), "billing-sync".to_owned()));
    assert_eq!(whoami(&s2).await, ("billing-sync_k_k2".to_owned(), "billing-sync".to_owned()));
    // RESET ROLE (as poolers' DISCARD ALL does) returns to the key's own
    // default: still acting as the account.
    s2.batch_execute("RESET ROLE").await.expect("reset role");
    assert_eq!(whoami(&s2).await.1, "billing-sync");
    assert_eq!(key_ids(&provider, &billing).await, BTreeSet::from(["k1".to_owned(), "k2".to_owned()]));
    let listed = provider.list_keys(&billing).await.expect("list");
    assert!(listed.iter().all(|k| k.created_at.is_some()), "{listed:?}");

    // Revoke k1: its open session ends, its logins fail, k2 is untouched.
    provider.revoke_key(&billing, "k1").await.expect("revoke k1");
    assert!(s1.simple_query("SELECT 1").await.is_err(), "k1's session was ended");
    assert!(refused(&server.login_key(&k1).await), "k1 is refused");
    assert!(matches!(provider.verify_key(&billing, &k1).await, Err(ProviderError::Invalid(_))));
    assert_eq!(whoami(&s2).await.0, "billing-sync_k_k2");
    assert!(server.login_key(&k2).await.is_ok(), "k2 still logs in");
    assert_eq!(key_ids(&provider, &billing).await, BTreeSet::from(["k2".to_owned()]));
    provider.revoke_key(&billing, "k1").await.expect("revoking again");
    provider.revoke_key(&billing, "never-issued").await.expect("revoking an unknown key");

    // Issuing the same key id again (a retry) gives a working new password.
    let k2_again = provider.issue_key(&billing, &key_request("k2")).await.expect("reissue k2");
    assert!(server.login_key(&k2_again).await.is_ok());
    assert!(refused(&server.login_key(&k2).await), "the earlier password of k2 is replaced");
    assert_eq!(key_ids(&provider, &billing).await, BTreeSet::from(["k2".to_owned()]));

    // A role with the key's name that is not ours is not overwritten.
    server.superuser().await.batch_execute("CREATE ROLE \"billing-sync_k_k3\"").await.expect("squatter");
    assert!(matches!(provider.issue_key(&billing, &key_request("k3")).await, Err(ProviderError::Conflict(_))));

    // No password reached the server's log (log_statement = all).
    let log = server.log();
    assert!(log.contains("CREATE ROLE \"billing-sync_k_k1\""), "statements are logged");
    for key in [&k1, &k2, &k2_again] {
        assert!(!log.contains(key.material.expose()["password"].as_str()), "a password is in the server log");
    }
    // Nor into errors or Debug output.
    assert!(!format!("{k1:?}").contains(k1.material.expose()["password"].as_str()));
    // The admin was not left holding memberships.
    assert_eq!(server.admin_memberships().await, BTreeSet::from(["pg_signal_backend".to_owned()]));
}

#[tokio::test]
async fn keys_expire_at_their_lifetime() {
    let server = PgServer::start().await;
    let provider = server.provider();
    let billing = account("billing-sync");
    provider.create_account(&billing).await.expect("create");
    let request = KeyRequest { key_id: "short".to_owned(), lifetime: Some(Duration::from_secs(3)) };
    let key = provider.issue_key(&billing, &request).await.expect("issue");
    let expires_at = key.expires_at.expect("an expiry");
    assert!(server.login_key(&key).await.is_ok(), "valid now");
    let wait = expires_at.duration_since(jiff::Timestamp::now()).unsigned_abs() + Duration::from_millis(1500);
    tokio::time::sleep(wait).await;
    assert!(refused(&server.login_key(&key).await), "VALID UNTIL has passed");
}

#[tokio::test]
async fn disable_blocks_logins_until_update_enables_them() {
    let server = PgServer::start().await;
    let provider = server.provider();
    let billing = account("billing-sync");
    provider.create_account(&billing).await.expect("create");
    let key = provider.issue_key(&billing, &key_request("k1")).await.expect("issue");
    let session = server.login_key(&key).await.expect("login");

    provider.disable_account(&billing).await.expect("disable");
    provider.disable_account(&billing).await.expect("disable again");
    assert!(session.simple_query("SELECT 1").await.is_err(), "the open session was ended");
    assert!(refused(&server.login_key(&key).await), "a disabled account's key is refused");
    let observed = provider.observe_account(&billing).await.expect("observe").expect("exists");
    assert!(observed.disabled && observed.owned && !observed.drifted, "{observed:?}");
    assert!(matches!(provider.issue_key(&billing, &key_request("k2")).await, Err(ProviderError::Conflict(_))));

    let updated = provider.update_account(&billing).await.expect("update re-enables");
    assert!(!updated.disabled && !updated.drifted, "{updated:?}");
    assert!(server.login_key(&key).await.is_ok(), "the key works again");

    // A key disabled by hand is drift, and update fixes it.
    server.superuser().await.batch_execute("ALTER ROLE \"billing-sync_k_k1\" NOLOGIN").await.expect("hand edit");
    assert!(provider.observe_account(&billing).await.expect("observe").expect("exists").drifted);
    provider.update_account(&billing).await.expect("update");
    assert!(server.login_key(&key).await.is_ok());

    provider.disable_account(&account("never-created")).await.expect("disabling what is gone");
}

#[tokio::test]
async fn delete_removes_everything_and_never_drops_data() {
    let server = PgServer::start().await;
    let provider = server.provider();
    let su = server.superuser().await;
    su.batch_execute(&format!(
        "CREATE ROLE ledger_reader NOLOGIN; CREATE SCHEMA integration AUTHORIZATION {ADMIN}; \
         CREATE TABLE ledger (id int)"
    ))
    .await
    .expect("fixtures");
    su.batch_execute(&format!("CREATE DATABASE other OWNER {ADMIN}")).await.expect("another database");
    let billing = account("billing-sync");
    provider.create_account(&billing).await.expect("create");
    provider.grant_role(&billing, &grant("ledger_reader")).await.expect("grant");
    // Privileges the admin granted the account on its own objects, here and
    // in another database: delete revokes them.
    connect(server.port, ADMIN, ADMIN_PASSWORD, "postgres")
        .await
        .expect("admin")
        .batch_execute("GRANT USAGE, CREATE ON SCHEMA integration TO \"billing-sync\"")
        .await
        .expect("schema privilege");
    connect(server.port, ADMIN, ADMIN_PASSWORD, "other")
        .await
        .expect("admin on other")
        .batch_execute("CREATE TABLE elsewhere (x int); GRANT SELECT ON elsewhere TO \"billing-sync\"")
        .await
        .expect("privilege in another database");
    let k1 = provider.issue_key(&billing, &key_request("k1")).await.expect("issue k1");
    let k2 = provider.issue_key(&billing, &key_request("k2")).await.expect("issue k2");

    // What a key creates belongs to the account, not to the key.
    let session = server.login_key(&k1).await.expect("login");
    session.batch_execute("CREATE TABLE integration.integration_data (x int)").await.expect("create a table");
    let owner_of = |table: &'static str| {
        let su = &su;
        async move {
            let row = su.query_one("SELECT tableowner::text FROM pg_tables WHERE tablename = $1", &[&table]).await;
            row.expect("the table exists").get::<_, String>(0)
        }
    };
    assert_eq!(owner_of("integration_data").await, "billing-sync");
    // Unless the session switches to the key role itself: revoking that key
    // hands its objects to the account.
    session.batch_execute("SET ROLE NONE; CREATE TABLE integration.key_made (x int)").await.expect("create as the key");
    assert_eq!(owner_of("key_made").await, "billing-sync_k_k1");
    provider.revoke_key(&billing, "k1").await.expect("revoke a key that owns a table");
    assert_eq!(owner_of("key_made").await, "billing-sync");
    assert_eq!(server.admin_memberships().await, BTreeSet::from(["pg_signal_backend".to_owned()]));

    // The account owns tables: deleting would drop data, so it refuses.
    match provider.delete_account(&billing).await {
        Err(ProviderError::Conflict(message)) => {
            assert!(message.contains("REASSIGN OWNED") && message.contains("postgres"), "{message}")
        }
        other => panic!("expected a Conflict, got {other:?}"),
    }
    assert!(refused(&server.login_key(&k2).await), "the keys were revoked before the refusal");
    assert!(provider.list_keys(&billing).await.expect("list").is_empty());
    assert!(server.role("billing-sync").await.is_some(), "the account and its data stay");
    su.batch_execute("DROP TABLE integration.integration_data, integration.key_made").await.expect("drop the tables");

    // A privilege someone else granted on their own object: the admin
    // cannot revoke it, so the role cannot go, and delete says why.
    su.batch_execute("GRANT SELECT ON ledger TO \"billing-sync\"").await.expect("a DBA's grant");
    match provider.delete_account(&billing).await {
        Err(ProviderError::Conflict(message)) => {
            assert!(message.contains("cannot revoke") && message.contains("table ledger"), "{message}")
        }
        other => panic!("expected a Conflict, got {other:?}"),
    }
    assert_eq!(server.admin_memberships().await, BTreeSet::from(["pg_signal_backend".to_owned()]));
    su.batch_execute("REVOKE SELECT ON ledger FROM \"billing-sync\"").await.expect("the DBA revokes it");

    // Now delete finishes, revoking the admin's grants in both databases.
    provider.delete_account(&billing).await.expect("delete");
    assert!(server.tagged_roles(&billing).await.is_empty(), "every role keysmith made is gone");
    assert!(server.role("billing-sync").await.is_none());
    assert!(server.role("ledger_reader").await.is_some(), "granted roles are not ours to drop");
    assert_eq!(provider.observe_account(&billing).await.expect("observe"), None);
    assert!(provider.list_roles(&billing).await.expect("list").is_empty());
    provider.delete_account(&billing).await.expect("a second delete");
    assert_eq!(server.admin_memberships().await, BTreeSet::from(["pg_signal_backend".to_owned()]));
}

#[tokio::test]
async fn verify_connection_classifies_refusals_and_outages() {
    let server = PgServer::start().await;
    server.provider().verify_connection().await.expect("the admin works");

    let wrong = PostgresProvider::new("127.0.0.1", server.port, "postgres", ADMIN, "not-the-password");
    assert!(matches!(wrong.verify_connection().await, Err(ProviderError::Unauthorized(_))));
    let unknown = PostgresProvider::new("127.0.0.1", server.port, "postgres", "no_such_admin", "x");
    assert!(matches!(unknown.verify_connection().await, Err(ProviderError::Unauthorized(_))));

    server
        .superuser()
        .await
        .batch_execute(
            "CREATE ROLE weak LOGIN PASSWORD 'weak-password'; \
             CREATE ROLE no_signal LOGIN CREATEROLE PASSWORD 'no-signal-password'",
        )
        .await
        .expect("fixtures");
    let weak = PostgresProvider::new("127.0.0.1", server.port, "postgres", "weak", "weak-password");
    match weak.verify_connection().await {
        Err(ProviderError::Unauthorized(message)) => assert!(message.contains("CREATEROLE"), "{message}"),
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    let no_signal = PostgresProvider::new("127.0.0.1", server.port, "postgres", "no_signal", "no-signal-password");
    match no_signal.verify_connection().await {
        Err(ProviderError::Unauthorized(message)) => assert!(message.contains("pg_signal_backend"), "{message}"),
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    // A weak admin's refusals on real calls are Unauthorized too.
    assert!(matches!(weak.create_account(&account("billing-sync")).await, Err(ProviderError::Unauthorized(_))));
    // No error message carries the password.
    let error = wrong.verify_connection().await.expect_err("refused").to_string();
    assert!(!error.contains("not-the-password"), "{error}");

    let nothing = PostgresProvider::new("127.0.0.1", free_port(), "postgres", ADMIN, ADMIN_PASSWORD);
    assert!(matches!(nothing.verify_connection().await, Err(ProviderError::Transient { .. })));
    let missing_db = PostgresProvider::new("127.0.0.1", server.port, "no_such_db", ADMIN, ADMIN_PASSWORD);
    assert!(matches!(missing_db.verify_connection().await, Err(ProviderError::Invalid(_))));
    let tls = server.provider().with_ssl_mode(PostgresSslMode::VerifyFull);
    assert!(matches!(tls.verify_connection().await, Err(ProviderError::Invalid(_))));
    server.provider().with_ssl_mode(PostgresSslMode::Prefer).verify_connection().await.expect("prefer: plain TCP");
}

#[tokio::test]
async fn hostile_identifiers_are_quoted() {
    let server = PgServer::start().await;
    let provider = server.provider();
    let su = server.superuser().await;
    su.batch_execute("CREATE ROLE victim").await.expect("victim");
    let evil_role = "Robert'); DROP ROLE victim;--";
    let mixed_role = "ReadOnly \"Quoted\"";
    server.exec_formatted(&su, "CREATE ROLE %I NOLOGIN", &[evil_role]).await;
    server.exec_formatted(&su, "CREATE ROLE %I NOLOGIN", &[mixed_role]).await;

    let mut evil = account("evil\"; DROP ROLE victim; --");
    evil.description = Some("'; DROP ROLE victim; -- \\ and \\' and \"quotes\"\nsecond line".to_owned());
    evil.owner = Some("O'Brien".to_owned());
    let created = provider.create_account(&evil).await.expect("create");
    assert_eq!(created.name, "evil\"; DROP ROLE victim; --");
    assert!(!created.drifted, "the comment round-trips exactly");
    let comment = server.role(&evil.name).await.and_then(|r| r.0).expect("comment");
    assert!(
        comment.contains("description: '; DROP ROLE victim; -- \\ and \\' and \"quotes\" second line"),
        "{comment}"
    );
    assert!(comment.contains("owner: O'Brien"), "{comment}");

    provider.grant_role(&evil, &grant(evil_role)).await.expect("grant the evil role");
    provider.grant_role(&evil, &grant(mixed_role)).await.expect("grant the mixed-case role");
    assert!(matches!(provider.grant_role(&evil, &grant("readonly \"quoted\"")).await, Err(ProviderError::NotFound(_))));
    assert_eq!(provider.list_roles(&evil).await.expect("list"), vec![grant(mixed_role), grant(evil_role)]);

    let key = provider.issue_key(&evil, &key_request("k1")).await.expect("issue");
    assert_eq!(key.material.expose()["username"], "evil\"; DROP ROLE victim; --_k_k1");
    provider.verify_key(&evil, &key).await.expect("verify");
    let session = server.login_key(&key).await.expect("login through the percent-encoded uri");
    assert_eq!(whoami(&session).await, ("evil\"; DROP ROLE victim; --_k_k1".to_owned(), evil.name.clone()));

    // Case is kept: "BillingSync" and "billingsync" are two roles.
    let upper = account("BillingSync");
    provider.create_account(&upper).await.expect("create BillingSync");
    assert!(server.role("BillingSync").await.is_some());
    assert!(server.role("billingsync").await.is_none());

    // Longer than PostgreSQL keeps: refused rather than truncated.
    assert!(matches!(provider.create_account(&account(&"x".repeat(64))).await, Err(ProviderError::Invalid(_))));
    // Long names still give distinct key roles that fit.
    let long = account(&"l".repeat(63));
    provider.create_account(&long).await.expect("create a 63-byte name");
    let a = provider.issue_key(&long, &key_request("aaaaaaaaaa")).await.expect("issue");
    let b = provider.issue_key(&long, &key_request("aaaaaaaaab")).await.expect("issue");
    assert_ne!(a.material.expose()["username"], b.material.expose()["username"]);
    assert!(server.login_key(&a).await.is_ok() && server.login_key(&b).await.is_ok());
    assert_eq!(key_ids(&provider, &long).await, BTreeSet::from(["aaaaaaaaaa".to_owned(), "aaaaaaaaab".to_owned()]));

    for account in [&evil, &upper, &long] {
        provider.delete_account(account).await.expect("delete");
        assert!(server.tagged_roles(account).await.is_empty());
    }
    assert!(server.role("victim").await.is_some(), "nothing was injected");
    assert!(server.role(evil_role).await.is_some() && server.role(mixed_role).await.is_some());
}
