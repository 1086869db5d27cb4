//! The crash campaign (RELIABILITY.md): the operator binary is stopped with
//! SIGKILL at a step where it writes to the outside world (before or after a
//! provider call, the output Secret, a status write, the finalizer, a
//! restart), chosen at random with a seed, for the kubernetes provider (the
//! real apiserver), the postgres provider (a real PostgreSQL server), scim,
//! aws_iam and oauth2 (their tests' servers). It
//! is then restarted without the crash point, and once the account has
//! converged the invariants are checked against the target app itself:
//!
//! - every key the target holds is tracked in status (current or
//!   retiring), and every key status calls live is in the target;
//! - no more keys than the connection's limit;
//! - the Secret holds the current key, and the key works against the target;
//! - nothing pending is left in status;
//! - deletion leaves what its deletionPolicy says: nothing (`Delete`), a
//!   disabled account without keys (`Disable`), the account (`Orphan`).
//!
//! For oauth2, the test reads the registration records the operator keeps
//! in Secrets (as the apiserver's admin, never writing them), and asks the
//! server which clients it holds: the trial must leave exactly the
//! account's client (none after `Delete`), so a client registered and then
//! lost track of is found. OAuth 2.0 clients cannot be disabled, so its
//! deletions draw `Delete` or `Orphan`.
//!
//! `KEYSMITH_CRASH_SEED`, `KEYSMITH_CRASH_TRIALS` (default 6) and
//! `KEYSMITH_CRASH_PROVIDERS` (default `kubernetes,postgres,oauth2`, oauth2
//! on oidc-provider; also `scim` on a real SCIM server and `aws_iam` on
//! moto) choose the run.
//! Each trial prints one line; the last line sums them up.

mod common;
#[path = "common/invariants.rs"]
mod invariants;
#[path = "common/moto_server.rs"]
mod moto_server;
#[path = "common/oidc_server.rs"]
mod oidc_server;
#[path = "common/pg_server.rs"]
mod pg_server;
#[path = "common/scim_server.rs"]
mod scim_server;

use std::{collections::BTreeSet, os::unix::process::ExitStatusExt, sync::Arc, time::Duration};

use common::{apply_yaml, control_plane, kubernetes_connection_identity, Operator, TestNamespace};
use k8s_openapi::api::apps::v1::Deployment;
use keysmith::{
    api::IntegrationAccount,
    controlplane::ControlPlane,
    provider::{kubernetes::KubernetesProvider, Provider},
};
use kube::{
    api::{Api, DeleteParams, Patch, PatchParams, PostParams},
    Client,
};
use moto_server::MotoServer;
use oidc_server::OidcServer;
use pg_server::{PgServer, ADMIN, ADMIN_PASSWORD};
use rand::{rngs::StdRng, Rng, SeedableRng};
use scim_server::ScimServer;
use serde_json::json;

const CONVERGE: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Create,
    Rotate,
    /// The account's description changes (oauth2: its authentication
    /// method): the account is updated in the target.
    Update,
    Delete(&'static str),
}

/// The steps each scenario passes, as `KEYSMITH_FAILPOINT` names them.
fn steps(scenario: Scenario) -> Vec<String> {
    let whats: &[&str] = match scenario {
        Scenario::Create => {
            &["finalizer", "create_account", "grant_role", "issue_key", "verify_key", "publish", "status"]
        }
        Scenario::Rotate => &["issue_key", "verify_key", "publish", "status", "restart", "revoke_key"],
        Scenario::Update => &["update_account", "status"],
        Scenario::Delete("Disable") => &["revoke_key", "disable_account", "finalizer"],
        Scenario::Delete("Orphan") => &["finalizer"],
        Scenario::Delete(_) => &["revoke_key", "revoke_role", "delete_account", "finalizer"],
    };
    whats.iter().flat_map(|w| [format!("before:{w}"), format!("after:{w}")]).collect()
}

struct Target {
    provider: Arc<dyn Provider>,
    connection: String,
    /// The role the account's RoleBinding declares.
    role: String,
}

fn kubernetes_target(cp: &ControlPlane, client: &Client) -> Target {
    let provider =
        KubernetesProvider::new(client.clone(), cp.server_url().to_owned(), Some(cp.ca_pem().to_owned()), false);
    Target {
        provider: Arc::new(provider),
        connection: format!(
            "{}---\napiVersion: keysmith.dev/v1alpha1\nkind: AppConnection\nmetadata: {{name: target}}\nspec: {{provider: {{kubernetes: {{}}}}, serviceAccountName: keysmith}}\n",
            kubernetes_connection_identity(&["view"])
        ),
        role: "view".into(),
    }
}

/// A connection named `target` whose admin credential is the Secret
/// `secret` (`string_data`, YAML), read by the connection's ServiceAccount.
fn credentialed(secret: &str, string_data: &str, provider: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {secret}}}\nstringData: {string_data}\n---\n{}---\napiVersion: keysmith.dev/v1alpha1\nkind: AppConnection\nmetadata: {{name: target}}\nspec:\n  provider: {provider}\n  serviceAccountName: keysmith\n",
        common::credential_reader_identity(secret)
    )
}

fn postgres_target(pg: &PgServer) -> Target {
    let provider = format!(
        "{{postgres: {{host: 127.0.0.1, port: {}, database: postgres, sslMode: disable, credentialsSecretRef: {{name: pg-admin}}}}}}",
        pg.port
    );
    Target {
        provider: Arc::new(pg.provider()),
        connection: credentialed("pg-admin", &format!("{{username: {ADMIN}, password: {ADMIN_PASSWORD}}}"), &provider),
        role: "crash_reader".into(),
    }
}

fn scim_target(scim: &ScimServer) -> Target {
    let provider = format!("{{scim: {{baseUrl: \"{}\", tokenSecretRef: {{name: scim-admin}}}}}}", scim.base_url);
    Target {
        provider: Arc::new(scim.provider()),
        connection: credentialed("scim-admin", &format!("{{token: \"{}\"}}", scim.token), &provider),
        role: "Crash Readers".into(),
    }
}

fn aws_target(moto: &MotoServer) -> Target {
    let provider = format!(
        "{{awsIam: {{region: eu-west-1, endpoint: \"{}\", path: /keysmith/, credentialsSecretRef: {{name: aws-admin}}}}}}",
        moto.endpoint
    );
    let key =
        format!("{{AWS_ACCESS_KEY_ID: \"{}\", AWS_SECRET_ACCESS_KEY: \"{}\"}}", moto.admin_key.0, moto.admin_key.1);
    Target {
        provider: Arc::new(moto.provider()),
        connection: credentialed("aws-admin", &key, &provider),
        role: moto.policy_arn("ks-read"),
    }
}

fn oauth2_target(oidc: &OidcServer, client: &Client) -> Target {
    let provider = format!(
        "{{oauth2: {{registrationEndpoint: \"{}\", tokenEndpoint: \"{}\", introspectionEndpoint: \"{}\", initialAccessTokenSecretRef: {{name: oauth2-admin}}}}}}",
        oidc.info.registration_endpoint, oidc.info.token_endpoint, oidc.info.introspection_endpoint
    );
    Target {
        provider: Arc::new(oidc.operator_view(client.clone())),
        connection: credentialed(
            "oauth2-admin",
            &format!("{{token: \"{}\"}}", oidc.info.initial_access_token),
            &provider,
        ),
        role: "read".into(),
    }
}

/// For oauth2: the clients the server holds beyond `before` must be
/// exactly the account's (`expected`); a violation for each other one.
async fn oauth2_clients(oidc: &OidcServer, before: &BTreeSet<String>, expected: Option<String>) -> Vec<String> {
    let now: BTreeSet<String> = oidc.clients().await.difference(before).cloned().collect();
    let expected: BTreeSet<String> = expected.into_iter().collect();
    let mut violations: Vec<String> =
        now.difference(&expected).map(|id| format!("client {id} is at the server and nobody tracks it")).collect();
    violations.extend(expected.difference(&now).map(|id| format!("client {id} is tracked but not at the server")));
    violations
}

fn account_yaml(role: &str, deletion_policy: &str, name: &str) -> String {
    format!(
        r#"
apiVersion: keysmith.dev/v1alpha1
kind: KeyRotationPolicy
metadata: {{name: daily}}
spec: {{rotateEvery: 24h, gracePeriod: 2s, restartTargets: [{{kind: Deployment, name: app}}]}}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {{name: {name}}}
spec:
  connectionRef: {{name: target}}
  secret: {{name: robot-key}}
  rotationPolicyRef: {{name: daily}}
  deletionPolicy: {deletion_policy}
---
apiVersion: keysmith.dev/v1alpha1
kind: RoleBinding
metadata: {{name: robot-roles}}
spec: {{accountRef: {{name: {name}}}, roles: ["{role}"]}}
"#
    )
}

async fn ready(accounts: &Api<IntegrationAccount>, name: &str, rotation: Option<&str>) -> Option<IntegrationAccount> {
    let account = accounts.get(name).await.ok()?;
    let status = account.status.as_ref()?;
    let ready = status.common.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
    let rotated = rotation.is_none_or(|r| status.last_rotation_request.as_deref() == Some(r));
    (ready && rotated && status.common.observed_generation == account.metadata.generation).then_some(account)
}

async fn wait_for<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Some(value) = check().await {
            return Some(value);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    None
}

#[tokio::test]
async fn the_operator_killed_at_any_step_loses_no_key() {
    let seed: u64 = std::env::var("KEYSMITH_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(13);
    let trials: usize = std::env::var("KEYSMITH_CRASH_TRIALS").ok().and_then(|s| s.parse().ok()).unwrap_or(6);
    let providers: Vec<String> = std::env::var("KEYSMITH_CRASH_PROVIDERS")
        .unwrap_or_else(|_| "kubernetes,postgres,oauth2".into())
        .split(',')
        .map(str::to_owned)
        .collect();
    let replay = std::env::var("KEYSMITH_CRASH_REPLAY").ok().map(|r| {
        let parts: Vec<&str> = r.split_whitespace().collect();
        let scenario = match parts.get(1).copied() {
            Some("Rotate") => Scenario::Rotate,
            Some("Update") => Scenario::Update,
            Some(s) if s.starts_with("Delete") => Scenario::Delete(if s.contains("Disable") {
                "Disable"
            } else if s.contains("Orphan") {
                "Orphan"
            } else {
                "Delete"
            }),
            _ => Scenario::Create,
        };
        (parts[0].to_owned(), scenario, parts.get(2).copied().unwrap_or_default().to_owned())
    });
    let providers: Vec<String> = match &replay {
        Some((p, _, _)) => vec![p.clone()],
        None => providers,
    };
    println!("crash campaign: seed {seed}, {trials} trials, providers {providers:?}");
    let mut rng = StdRng::seed_from_u64(seed);
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let pg = if providers.iter().any(|p| p == "postgres") {
        let pg = PgServer::start().await;
        pg.superuser().await.batch_execute("CREATE ROLE crash_reader NOLOGIN").await.expect("the role");
        Some(pg)
    } else {
        None
    };
    let scim = if providers.iter().any(|p| p == "scim") {
        let scim = ScimServer::start().await;
        scim.create_group("Crash Readers").await;
        Some(scim)
    } else {
        None
    };
    let moto = if providers.iter().any(|p| p == "aws_iam") { Some(MotoServer::start().await) } else { None };
    let oidc = if providers.iter().any(|p| p == "oauth2") { Some(OidcServer::start().await) } else { None };

    let mut violations: Vec<String> = Vec::new();
    let mut hit: BTreeSet<String> = BTreeSet::new();
    let mut not_reached = 0;
    for trial in 0..trials {
        let provider = providers[rng.random_range(0..providers.len())].clone();
        let scenario = match rng.random_range(0..5) {
            0 | 1 => Scenario::Create,
            2 => Scenario::Rotate,
            3 => Scenario::Update,
            _ if provider == "oauth2" => Scenario::Delete(["Delete", "Orphan"][rng.random_range(0..2)]),
            _ => Scenario::Delete(["Delete", "Disable", "Orphan"][rng.random_range(0..3)]),
        };
        let candidates = steps(scenario);
        let mut step = candidates[rng.random_range(0..candidates.len())].clone();
        if step.ends_with(":status") {
            step = format!("{step}@{}", rng.random_range(1..=2));
        }
        // KEYSMITH_CRASH_REPLAY="PROVIDER SCENARIO STEP" (as a trial line
        // prints them) runs that trial instead.
        let (provider, scenario, step) = match &replay {
            Some((p, sc, st)) => (p.clone(), *sc, st.clone()),
            None => (provider, scenario, step),
        };
        // A name of its own: a postgres role is server-wide.
        let name = format!("robot{trial}");
        let target = match provider.as_str() {
            "postgres" => postgres_target(pg.as_ref().expect("postgres started")),
            "scim" => scim_target(scim.as_ref().expect("the SCIM server started")),
            "aws_iam" => aws_target(moto.as_ref().expect("moto started")),
            "oauth2" => oauth2_target(oidc.as_ref().expect("oidc-provider started"), &client),
            _ => kubernetes_target(cp, &client),
        };
        let clients_before = match &oidc {
            Some(oidc) if provider == "oauth2" => oidc.clients().await,
            _ => BTreeSet::new(),
        };
        let ns = TestNamespace::create(&client, "crash").await;
        apply_yaml(&client, &ns.name, &target.connection).await;
        let app: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "app"},
            "spec": {"selector": {"matchLabels": {"app": "app"}},
                     "template": {"metadata": {"labels": {"app": "app"}},
                                  "spec": {"containers": [{"name": "app", "image": "example.invalid/app"}]}}}
        }))
        .unwrap();
        Api::<Deployment>::namespaced(client.clone(), &ns.name).create(&PostParams::default(), &app).await.unwrap();
        let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
        let deletion_policy = match scenario {
            Scenario::Delete(policy) => policy,
            _ => "Delete",
        };

        // Before the crash: for rotation and deletion, a Ready account.
        if scenario != Scenario::Create {
            let clean = Operator::start(cp, &ns.name, &[]);
            apply_yaml(&client, &ns.name, &account_yaml(&target.role, deletion_policy, &name)).await;
            if wait_for(CONVERGE, || ready(&accounts, &name, None)).await.is_none() {
                violations.push(format!("trial {trial}: never Ready before the crash"));
                ns.delete().await;
                continue;
            }
            clean.stop().await;
        }
        let before = accounts.get_opt(&name).await.unwrap();

        let mut crashing = Operator::start(cp, &ns.name, &[("KEYSMITH_FAILPOINT", &step)]);
        match scenario {
            Scenario::Create => {
                apply_yaml(&client, &ns.name, &account_yaml(&target.role, deletion_policy, &name)).await
            }
            Scenario::Rotate => {
                let patch = json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": "crash"}}});
                accounts.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
            }
            Scenario::Update => {
                // An OAuth 2.0 client has no description: it takes a new
                // authentication method instead.
                let patch = if provider == "oauth2" {
                    json!({"spec": {"providerOptions": {"tokenEndpointAuthMethod": "client_secret_post"}}})
                } else {
                    json!({"spec": {"description": "changed during the crash campaign"}})
                };
                accounts.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
            }
            Scenario::Delete(_) => {
                accounts.delete(&name, &DeleteParams::default()).await.unwrap();
            }
        }
        let ended = crashing.wait_end(Duration::from_secs(30)).await;
        let killed = ended.is_some_and(|s| s.signal() == Some(9));
        if killed {
            hit.insert(format!("{provider} {scenario:?} {step}"));
        } else {
            not_reached += 1;
        }
        drop(crashing);

        // Restarted without the crash point: converge, then the invariants.
        let operator = Operator::start(cp, &ns.name, &[]);
        let found = match scenario {
            Scenario::Delete(policy) => {
                let request = invariants::request(before.as_ref().expect("the account existed"));
                match wait_for(CONVERGE, || async { accounts.get_opt(&name).await.ok()?.is_none().then_some(()) }).await
                {
                    None => vec!["the IntegrationAccount was never deleted".to_owned()],
                    // The registration record goes with the account: what
                    // is left is asked of the server.
                    Some(()) if provider == "oauth2" => {
                        let oidc = oidc.as_ref().expect("oidc-provider started");
                        let now: BTreeSet<String> = oidc.clients().await.difference(&clients_before).cloned().collect();
                        match (policy, now.len()) {
                            ("Delete", 0) | ("Orphan", 1) => vec![],
                            _ => vec![format!("after deletion ({policy}): clients {now:?} at the server")],
                        }
                    }
                    Some(()) => invariants::deleted(target.provider.as_ref(), &request, policy).await,
                }
            }
            _ => {
                let rotation = (scenario == Scenario::Rotate).then_some("crash");
                match wait_for(CONVERGE, || ready(&accounts, &name, rotation)).await {
                    None => vec!["never converged".to_owned()],
                    Some(_) => {
                        // A reconcile may be finishing: the invariants must
                        // hold within a few seconds, and stay.
                        let mut last = Vec::new();
                        for _ in 0..10 {
                            let account = accounts.get(&name).await.unwrap();
                            last = invariants::converged(&client, target.provider.as_ref(), &account, 2).await;
                            if let (Some(oidc), "oauth2") = (&oidc, provider.as_str()) {
                                let observed = target.provider.observe_account(&invariants::request(&account)).await;
                                let id = observed.ok().flatten().map(|a| a.id);
                                last.extend(oauth2_clients(oidc, &clients_before, id).await);
                            }
                            if last.is_empty() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        last
                    }
                }
            }
        };
        println!(
            "trial {trial:3}: {provider:10} {:18} {step:24} {} {}",
            format!("{scenario:?}"),
            if killed { "killed" } else { "not reached" },
            if found.is_empty() { "ok".to_owned() } else { format!("VIOLATIONS: {found:?}") }
        );
        if !found.is_empty() && std::env::var_os("KEYSMITH_CRASH_LOGS").is_some() {
            println!("--- operator log after the restart ---\n{}", operator.logs());
        }
        drop(operator);
        violations.extend(found.into_iter().map(|v| format!("trial {trial} ({provider} {scenario:?} {step}): {v}")));
        ns.delete().await;
    }
    println!(
        "crash campaign: seed {seed}: {trials} trials, {} killed at a step ({} distinct steps), {not_reached} not reached, {} violations",
        trials - not_reached,
        hit.len(),
        violations.len()
    );
    assert!(violations.is_empty(), "seed {seed}: {violations:#?}");
}
