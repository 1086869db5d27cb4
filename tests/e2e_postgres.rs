//! The `postgres` provider end to end: a real PostgreSQL server (one per
//! test, `tests/common/pg_server.rs`), the real kube-apiserver, and the
//! operator as its own process watching a test namespace. Every assertion is
//! made on real effects: the published `uri` logs in and reads a table, an
//! old credential is accepted during its grace period and refused after it,
//! roles exist in `pg_roles` or are gone.
//!
//! Also: a refused admin password is the connection's `Unauthorized`, and
//! `examples/postgres/` is accepted by the apiserver without a field pruned.

mod common;
#[path = "common/pg_server.rs"]
mod pg_server;

use std::{path::Path, time::Duration};

use common::{
    apply_yaml, control_plane, credential_reader_identity, eventually, ready_account, Operator, TestNamespace,
};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Secret;
use keysmith::api::{AppConnection, IntegrationAccount, KeyRotationPolicy, KeyState, RoleBinding};
use kube::{
    api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
    core::GroupVersionKind,
    discovery::{self, Scope},
    Client, ResourceExt,
};
use pg_server::{connect_with, refused, whoami, PgServer, ADMIN, ADMIN_PASSWORD};
use serde_json::{json, Value};
use tokio_postgres::error::SqlState;

const WAIT: Duration = Duration::from_secs(120);
/// The rotation policy's grace period.
const GRACE: Duration = Duration::from_secs(15);

/// The objects of one integration: the admin credential, the connection to
/// the server on `port`, a rotation policy, the account (whose keys are for
/// database `ledger`) and its role.
fn manifests(port: u16, admin_password: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: pg-admin}}
stringData: {{username: {ADMIN}, password: {admin_password}}}
---
apiVersion: keysmith.dev/v1alpha1
kind: AppConnection
metadata: {{name: ledger-db}}
spec:
  provider:
    postgres:
      host: 127.0.0.1
      port: {port}
      database: postgres
      sslMode: disable
      credentialsSecretRef: {{name: pg-admin}}
  serviceAccountName: keysmith
  policy: {{deniedRoles: ["pg_*"]}}
---
apiVersion: keysmith.dev/v1alpha1
kind: KeyRotationPolicy
metadata: {{name: daily}}
spec: {{rotateEvery: 24h, gracePeriod: {grace}s}}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {{name: billing-sync}}
spec:
  connectionRef: {{name: ledger-db}}
  description: "Billing sync job: reads invoices every night"
  owner: team-payments
  secret: {{name: billing-sync-db}}
  rotationPolicyRef: {{name: daily}}
  providerOptions: {{database: ledger}}
---
apiVersion: keysmith.dev/v1alpha1
kind: RoleBinding
metadata: {{name: billing-sync-read}}
spec:
  accountRef: {{name: billing-sync}}
  roles: ["ledger_reader"]
"#,
        grace = GRACE.as_secs()
    )
}

/// A database `ledger` with a table only `ledger_reader` may read, and one
/// nobody but its owner may.
async fn ledger_fixtures(server: &PgServer) {
    let su = server.superuser().await;
    // One statement per call: CREATE DATABASE refuses to run in the implicit
    // transaction of a multi-statement query.
    su.batch_execute("CREATE DATABASE ledger").await.expect("the database");
    su.batch_execute("CREATE ROLE ledger_reader NOLOGIN").await.expect("the role");
    server
        .superuser_on("ledger")
        .await
        .batch_execute(
            "CREATE TABLE invoices (id int PRIMARY KEY, amount numeric); \
             INSERT INTO invoices VALUES (1, 10.50), (2, 99.00), (3, 7.25); \
             REVOKE ALL ON invoices FROM PUBLIC; GRANT SELECT ON invoices TO ledger_reader; \
             CREATE TABLE payroll (id int); REVOKE ALL ON payroll FROM PUBLIC",
        )
        .await
        .expect("tables");
}

async fn secret_value(client: &Client, ns: &str, name: &str, key: &str) -> Option<String> {
    let secret = Api::<Secret>::namespaced(client.clone(), ns).get_opt(name).await.ok()??;
    let bytes = secret.data?.get(key)?.0.clone();
    String::from_utf8(bytes).ok()
}

/// Logs in with a published `uri`, as a workload would.
async fn login(uri: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let config: tokio_postgres::Config = uri.parse().expect("the uri parses as a libpq URI");
    connect_with(&config).await
}

/// Whether the server accepts the credential in `uri` right now.
async fn accepted(uri: &str) -> bool {
    let result = login(uri).await;
    if refused(&result) {
        return false;
    }
    match result {
        Ok(_) => true,
        Err(e) => panic!("logging in failed, and not as a refusal: {e}"),
    }
}

/// What the credential in `uri` reads from the ledger: the invoice count.
async fn invoices(uri: &str) -> i64 {
    let session = login(uri).await.expect("the uri logs in");
    session.query_one("SELECT count(*) FROM invoices", &[]).await.expect("read the invoices").get(0)
}

/// The roles in `pg_roles` carrying the IntegrationAccount's ownership tag, sorted.
async fn tagged_roles(server: &PgServer, uid: &str) -> Vec<String> {
    let mut roles: Vec<String> = server
        .superuser()
        .await
        .query(
            "SELECT rolname::text FROM pg_roles WHERE shobj_description(oid, 'pg_authid') LIKE $1",
            &[&format!("keysmith:{uid}\n%")],
        )
        .await
        .expect("read pg_roles")
        .iter()
        .map(|row| row.get(0))
        .collect();
    roles.sort();
    roles
}

#[tokio::test]
async fn an_account_is_provisioned_rotated_with_a_grace_period_and_removed() {
    let server = PgServer::start().await;
    ledger_fixtures(&server).await;
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "pg-e2e").await;
    let operator = Operator::start(cp, &ns.name, &[]);
    apply_yaml(&client, &ns.name, &(credential_reader_identity("pg-admin") + &manifests(server.port, ADMIN_PASSWORD)))
        .await;

    // Ready, and every object says so.
    let account = ready_account(&client, &ns.name, "billing-sync").await;
    let uid = account.uid().expect("a uid");
    let status = account.status.expect("status");
    let external = status.account.as_ref().expect("the account in status");
    assert_eq!((external.provider.as_str(), external.name.as_deref()), ("postgres", Some("billing-sync")));
    let first = status.current_key.clone().expect("a current key");
    let connections: Api<AppConnection> = Api::namespaced(client.clone(), &ns.name);
    let connection = connections.get("ledger-db").await.expect("the connection").status.expect("status");
    assert_eq!(connection.provider.as_deref(), Some("postgres"));
    assert!(connection.common.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &ns.name);
    eventually("the RoleBinding to be Ready", WAIT, || async {
        let binding = bindings.get("billing-sync-read").await.ok()?;
        binding.status?.common.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
    })
    .await;

    // In the server: a NOLOGIN group role tagged with the account, holding
    // ledger_reader, and one LOGIN role per key.
    let first_user = format!("billing-sync_k_{}", first.id);
    assert_eq!(tagged_roles(&server, &uid).await, ["billing-sync".to_owned(), first_user.clone()]);
    let (comment, can_login, _) = server.role("billing-sync").await.expect("the account role");
    let comment = comment.expect("a comment");
    assert!(comment.contains(&format!("integration-account: {}/billing-sync", ns.name)), "{comment}");
    assert!(comment.contains("owner: team-payments"), "{comment}");
    assert!(!can_login, "only key roles log in");

    // The Secret: what a workload needs, and the uri logs in and reads.
    let secret = Api::<Secret>::namespaced(client.clone(), &ns.name).get("billing-sync-db").await.expect("the Secret");
    assert_eq!(secret.annotations()["keysmith.dev/key-id"], first.id);
    let data = secret.data.expect("data");
    for key in ["username", "password", "host", "port", "dbname", "uri"] {
        assert!(data.contains_key(key), "the Secret lacks {key}");
    }
    let value = |key: &str| String::from_utf8(data[key].0.clone()).expect("UTF-8");
    assert_eq!(value("username"), first_user);
    assert_eq!(
        (value("host"), value("port"), value("dbname")),
        ("127.0.0.1".into(), server.port.to_string(), "ledger".into())
    );
    let old_uri = value("uri");
    assert_eq!(invoices(&old_uri).await, 3);
    let old_session = login(&old_uri).await.expect("the first key logs in");
    assert_eq!(whoami(&old_session).await, (first_user.clone(), "billing-sync".to_owned()));
    // Least privilege: only what ledger_reader may.
    let denied = old_session.query("SELECT count(*) FROM payroll", &[]).await.expect_err("payroll is not granted");
    assert_eq!(denied.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    let denied = old_session.batch_execute("DELETE FROM invoices").await.expect_err("read only");
    assert_eq!(denied.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));

    // A manual rotation publishes a new credential.
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let patch = json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": "1"}}});
    accounts.patch("billing-sync", &PatchParams::default(), &Patch::Merge(patch)).await.expect("annotate");
    let new_uri = eventually("a new uri in the Secret", WAIT, || async {
        let uri = secret_value(&client, &ns.name, "billing-sync-db", "uri").await?;
        (uri != old_uri).then_some(uri)
    })
    .await;
    assert_eq!(invoices(&new_uri).await, 3, "the new credential reads the ledger");
    let status = eventually("both lifecycles in status", WAIT, || async {
        let status = accounts.get("billing-sync").await.ok()?.status?;
        let old = status.keys.iter().find(|k| k.id == first.id)?;
        (old.state == KeyState::Retiring).then_some(status)
    })
    .await;
    let current = status.current_key.clone().expect("a current key");
    assert_ne!(current.id, first.id);
    let new_record = status.keys.iter().find(|k| k.id == current.id).expect("the new key's record");
    assert_eq!(new_record.state, KeyState::Published);
    assert_eq!(new_record.reason.as_deref(), Some("ManualRotation"));
    assert!(new_record.published_at.is_some());
    let old_record = status.keys.iter().find(|k| k.id == first.id).expect("the old key's record");
    assert!(old_record.retiring_at.is_some());
    let revoke_at = old_record.revoke_at.clone().expect("the end of the grace period").0;
    assert_eq!(status.last_rotation_request.as_deref(), Some("1"));
    let new_user = format!("billing-sync_k_{}", current.id);
    let mut both = vec!["billing-sync".to_owned(), first_user.clone(), new_user.clone()];
    both.sort();
    assert_eq!(tagged_roles(&server, &uid).await, both, "both keys are live");

    // The old credential works through the grace period, both for new
    // logins and for the open session, and is refused after it.
    let mut logins = 0;
    let refused_at = loop {
        let now = Timestamp::now();
        if !accepted(&old_uri).await || old_session.simple_query("SELECT 1").await.is_err() {
            break now;
        }
        logins += 1;
        assert!(now < revoke_at + SignedDuration::from_secs(60), "the old key still works a minute after {revoke_at}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(logins > 0, "the old key was never seen working after the rotation");
    assert!(
        refused_at >= revoke_at - SignedDuration::from_secs(1),
        "the old key stopped working at {refused_at}, before its grace period ended at {revoke_at}"
    );
    eventually("the old key to be refused", Duration::from_secs(30), || async {
        (!accepted(&old_uri).await).then_some(())
    })
    .await;
    assert!(old_session.simple_query("SELECT 1").await.is_err(), "revoking ended the old key's session");
    assert_eq!(invoices(&new_uri).await, 3, "the new credential keeps working");
    eventually("the old key recorded as revoked", WAIT, || async {
        let status = accounts.get("billing-sync").await.ok()?.status?;
        let old = status.keys.iter().find(|k| k.id == first.id)?;
        (old.state == KeyState::Revoked
            && old.reason.as_deref() == Some("GracePeriodEnded")
            && old.revoked_at.is_some())
        .then_some(())
    })
    .await;
    assert_eq!(
        tagged_roles(&server, &uid).await,
        ["billing-sync".to_owned(), new_user.clone()],
        "the old key role is dropped"
    );

    // No password in status, the operator's logs or the server's statement log.
    let status_json = serde_json::to_string(&accounts.get("billing-sync").await.expect("account")).expect("JSON");
    let passwords: Vec<String> = [&old_uri, &new_uri]
        .iter()
        .map(|uri| {
            uri.parse::<tokio_postgres::Config>()
                .expect("uri")
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .expect("a password")
        })
        .collect();
    let (operator_logs, server_log) = (operator.logs(), server.log());
    assert!(server_log.contains("CREATE ROLE"), "the server logs statements");
    for password in &passwords {
        assert!(!status_json.contains(password.as_str()), "a password in status");
        assert!(!operator_logs.contains(password.as_str()), "a password in the operator's logs");
        assert!(!server_log.contains(password.as_str()), "a password in the server's log");
    }

    // Deleting the IntegrationAccount removes its roles; the granted role stays.
    accounts.delete("billing-sync", &DeleteParams::default()).await.expect("delete");
    eventually("the IntegrationAccount to be gone", WAIT, || async {
        accounts.get_opt("billing-sync").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(tagged_roles(&server, &uid).await.is_empty(), "every role keysmith made is gone");
    assert!(server.role("billing-sync").await.is_none());
    assert!(server.role("ledger_reader").await.is_some(), "a granted role is not keysmith's to drop");
    assert!(!accepted(&new_uri).await, "the last key is refused");
    drop(operator);
    ns.delete().await;
}

#[tokio::test]
async fn a_wrong_admin_password_makes_the_connection_unauthorized() {
    let server = PgServer::start().await;
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "pg-refused").await;
    let _operator = Operator::start(cp, &ns.name, &[]);
    let wrong = "not-the-admin-password";
    let yaml = manifests(server.port, wrong);
    // The Secret and the connection only.
    let objects: Vec<&str> = yaml.split("\n---\n").take(2).collect();
    apply_yaml(&client, &ns.name, &(credential_reader_identity("pg-admin") + &objects.join("\n---\n"))).await;
    let connections: Api<AppConnection> = Api::namespaced(client.clone(), &ns.name);
    let ready = eventually("the connection to report its credential", WAIT, || async {
        let status = connections.get("ledger-db").await.ok()?.status?;
        status.common.conditions.into_iter().find(|c| c.type_ == "Ready")
    })
    .await;
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason, "Unauthorized", "{}", ready.message);
    assert!(ready.message.contains("28P01") || ready.message.contains("password"), "{}", ready.message);
    assert!(!ready.message.contains(wrong), "the credential never appears in status");
    // The server saw a failed password login for the admin.
    assert!(server.log().contains(&format!("password authentication failed for user \"{ADMIN}\"")), "{}", server.log());
    ns.delete().await;
}

/// Adds to `lost` every field of `submitted` that `stored` lacks or holds
/// another value for (the apiserver prunes fields its schema does not
/// know, silently).
fn kept(submitted: &Value, stored: &Value, path: &str, lost: &mut Vec<String>) {
    match (submitted, stored) {
        (Value::Object(fields), Value::Object(stored)) => {
            for (name, value) in fields {
                match stored.get(name) {
                    Some(found) => kept(value, found, &format!("{path}.{name}"), lost),
                    None => lost.push(format!("{path}.{name}")),
                }
            }
        }
        (Value::Array(items), Value::Array(stored)) if items.len() == stored.len() => {
            for (i, (item, found)) in items.iter().zip(stored).enumerate() {
                kept(item, found, &format!("{path}[{i}]"), lost);
            }
        }
        (a, b) if a == b => {}
        (a, b) => lost.push(format!("{path}: {a} became {b}")),
    }
}

/// The objects of `examples/postgres/*.yaml`, in file order, moved into
/// `namespace`, with the file each came from. The Namespace is left out.
fn example_objects(namespace: &str) -> Vec<(String, DynamicObject)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/postgres");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/postgres")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut objects = Vec::new();
    for file in &files {
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        for mut object in keysmith::manifest::read(file).expect("the example parses") {
            if object.types.as_ref().is_some_and(|t| t.kind == "Namespace") {
                continue;
            }
            object.metadata.namespace = Some(namespace.to_owned());
            objects.push((name.clone(), object));
        }
    }
    objects
}

fn kind(object: &DynamicObject) -> String {
    object.types.as_ref().map(|t| t.kind.clone()).unwrap_or_default()
}

#[tokio::test]
async fn the_postgres_examples_are_accepted_by_the_apiserver() {
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "pg-examples").await;
    let objects = example_objects(&ns.name);
    for (file, object) in &objects {
        let types = object.types.clone().expect("apiVersion and kind");
        let gvk = GroupVersionKind::try_from(&types).expect("a group/version/kind");
        let (resource, capabilities) =
            discovery::pinned_kind(&client, &gvk).await.expect("a kind the apiserver serves");
        assert_eq!(capabilities.scope, Scope::Namespaced, "{file}: {}", types.kind);
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &resource);
        let params = PostParams { dry_run: true, ..PostParams::default() };
        let stored =
            api.create(&params, object).await.unwrap_or_else(|e| panic!("{file} {}: refused: {e}", types.kind));
        // Nothing was dropped on the way (a Secret's stringData becomes data).
        if types.kind != "Secret" {
            let mut lost = Vec::new();
            let submitted = serde_json::to_value(object).expect("JSON");
            let stored = serde_json::to_value(&stored).expect("JSON");
            kept(&submitted["spec"], &stored["spec"], "spec", &mut lost);
            assert!(lost.is_empty(), "{file} {}: pruned or changed: {lost:?}", types.kind);
        }
        // And keysmith reads its own kinds.
        if gvk.group == "keysmith.dev" {
            let value = serde_json::to_value(object).expect("JSON");
            let parsed = match types.kind.as_str() {
                "AppConnection" => serde_json::from_value::<AppConnection>(value).map(|_| ()),
                "IntegrationAccount" => serde_json::from_value::<IntegrationAccount>(value).map(|_| ()),
                "RoleBinding" => serde_json::from_value::<RoleBinding>(value).map(|_| ()),
                "KeyRotationPolicy" => serde_json::from_value::<KeyRotationPolicy>(value).map(|_| ()),
                other => panic!("unexpected kind {other}"),
            };
            parsed.unwrap_or_else(|e| panic!("{file} {}: {e}", types.kind));
        }
    }
    let mut kinds: Vec<String> = objects.iter().map(|(_, o)| kind(o)).collect();
    kinds.sort();
    kinds.dedup();
    assert_eq!(
        kinds,
        [
            "AppConnection",
            "Deployment",
            "IntegrationAccount",
            "KeyRotationPolicy",
            "Role",
            "RoleBinding",
            "Secret",
            "ServiceAccount"
        ]
    );
    ns.delete().await;
}

/// The example as a newcomer would run it: `00-setup.sql` in a real server,
/// the manifests applied (the connection pointed at that server), and the
/// workload's DATABASE_URL reads the invoices.
#[tokio::test]
async fn the_postgres_example_works_against_a_real_server() {
    let server = PgServer::start().await;
    // The example creates its own admin role.
    let su = server.superuser().await;
    su.batch_execute(&format!("DROP ROLE {ADMIN}")).await.expect("drop the test's admin role");
    su.batch_execute("CREATE DATABASE billing").await.expect("the database");
    let billing = server.superuser_on("billing").await;
    billing
        .batch_execute("CREATE TABLE invoices (id int PRIMARY KEY, amount numeric); INSERT INTO invoices VALUES (1, 10.50), (2, 99.00), (3, 7.25)")
        .await
        .expect("the table");
    let setup = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/postgres/00-setup.sql");
    let setup = std::fs::read_to_string(setup).expect("00-setup.sql");
    billing.batch_execute(&setup).await.expect("00-setup.sql runs");
    let (comment, can_login, _) = server.role("invoices_reader").await.expect("00-setup.sql creates invoices_reader");
    assert!(comment.is_none() && !can_login);

    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "pg-example").await;
    let _operator = Operator::start(cp, &ns.name, &[]);
    for (file, mut object) in example_objects(&ns.name) {
        if kind(&object) == "AppConnection" {
            object.data["spec"]["provider"]["postgres"]["host"] = json!("127.0.0.1");
            object.data["spec"]["provider"]["postgres"]["port"] = json!(server.port);
        }
        keysmith::manifest::apply(&client, &object, &file).await.unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    let account = ready_account(&client, &ns.name, "billing-sync").await;
    let key = account.status.and_then(|s| s.current_key).expect("a current key");
    let uri = secret_value(&client, &ns.name, "billing-sync-db", "uri").await.expect("the uri");
    let session = login(&uri).await.expect("DATABASE_URL logs in");
    assert_eq!(whoami(&session).await, (format!("billing-sync_k_{}", key.id), "billing-sync".to_owned()));
    let count: i64 = session.query_one("SELECT count(*) FROM invoices", &[]).await.expect("read").get(0);
    assert_eq!(count, 3);
    let denied = session.batch_execute("DELETE FROM invoices").await.expect_err("read only");
    assert_eq!(denied.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    ns.delete().await;
}
