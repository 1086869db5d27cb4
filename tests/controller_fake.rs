//! The account controller in this test's own process (`controller::run_with`)
//! on the real apiserver, over a recording fake of the target app: every
//! call it makes, with its arguments, in order, and faults the test injects.
//! What each case checks is the calls made and the status written: denied
//! roles never reach the target, a failure in the middle of a rotation
//! leaves the published key in place and does not churn, and each
//! deletionPolicy makes exactly its calls.

mod common;

use std::time::Duration;

use common::{
    apply_yaml, control_plane, eventually, kubernetes_connection_identity, ready_account,
    recording::{fake_connection, InProcess, Recording},
    TestNamespace,
};
use k8s_openapi::api::core::v1::Secret;
use keysmith::api::{IntegrationAccount, KeyState};
use kube::api::{Api, DeleteParams, Patch, PatchParams};

fn account_yaml(name: &str, deletion_policy: &str) -> String {
    format!(
        r#"
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {{name: {name}}}
spec: {{connectionRef: {{name: fake}}, secret: {{name: {name}-key}}, deletionPolicy: {deletion_policy}}}
---
apiVersion: keysmith.dev/v1alpha1
kind: RoleBinding
metadata: {{name: {name}-roles}}
spec: {{accountRef: {{name: {name}}}, roles: [view, edit]}}
"#
    )
}

fn condition(account: &IntegrationAccount, type_: &str) -> Option<(String, String, String)> {
    let c = account.status.as_ref()?.common.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn the_account_controller_makes_exactly_the_calls_each_case_needs() {
    // Before any thread of this process reads the environment: this binary
    // holds this one test.
    std::env::set_var(keysmith::provider::noop::ENABLE_ENV, "1");
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "fake").await;
    apply_yaml(&client, &ns.name, &kubernetes_connection_identity(&["view"])).await;
    apply_yaml(&client, &ns.name, &fake_connection(", policy: {deniedRoles: [edit]}")).await;
    for (name, policy) in [("robot", "Delete"), ("keeper", "Orphan"), ("retired", "Disable")] {
        apply_yaml(&client, &ns.name, &account_yaml(name, policy)).await;
    }

    let fake = Recording::new();
    let operator = InProcess::start(cp, &ns.name, &fake).await;
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);

    // To Ready, each with exactly: create, grant of the one allowed role,
    // issue and verify of one key. The denied role never reaches the target.
    for name in ["robot", "keeper", "retired"] {
        let account = ready_account(&client, &ns.name, name).await;
        let status = account.status.clone().unwrap();
        let key = status.current_key.unwrap().id;
        let requested = fake
            .changes(name)
            .iter()
            .find_map(|c| c.strip_prefix(&format!("issue_key {name} ")).map(str::to_owned))
            .expect("an issue_key call");
        assert_eq!(
            fake.changes(name),
            [
                format!("create_account {name} name={name}"),
                format!("grant_role {name} view"),
                format!("issue_key {name} {requested}"),
                format!("verify_key {name} {key}"),
            ],
            "{name}"
        );
        let roles: Vec<&str> = status.roles.iter().map(|r| r.role.as_str()).collect();
        assert_eq!(roles, ["view"], "{name}");
        assert_eq!(condition(&account, "RolesSynced").unwrap().0, "True", "{name}");
    }
    assert_eq!(fake.count("grant_role"), 3, "edit is denied by the connection's policy");

    // A failure in the middle of a rotation: the new key fails verification.
    // It is revoked; the published key stays current and in the Secret;
    // KeyReady says why; and nothing is issued again until something changes.
    let before = ready_account(&client, &ns.name, "robot").await.status.unwrap().current_key.unwrap().id;
    fake.fail_next("verify_key", "the target refused the new key");
    let rotate = |value: &str| serde_json::json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": value}}});
    accounts.patch("robot", &PatchParams::default(), &Patch::Merge(&rotate("one"))).await.unwrap();
    let failed = eventually("KeyReady to say the verification failed", Duration::from_secs(60), || async {
        let account = accounts.get("robot").await.ok()?;
        (condition(&account, "KeyReady")?.1 == "Invalid").then_some(account)
    })
    .await;
    let (_, _, message) = condition(&failed, "KeyReady").unwrap();
    assert!(message.contains("the target refused the new key"), "{message}");
    let status = failed.status.clone().unwrap();
    assert_eq!(status.current_key.as_ref().unwrap().id, before, "the published key stays current");
    assert!(status.pending.is_none(), "{:?}", status.pending);
    let changes = fake.changes("robot");
    let tail: Vec<&str> = changes[4..].iter().map(|c| c.split(' ').next().unwrap()).collect();
    assert_eq!(tail, ["issue_key", "verify_key", "revoke_key"], "{changes:?}");
    let rejected = changes[5].rsplit(' ').next().unwrap().to_owned();
    assert_eq!(changes[6], format!("revoke_key robot {rejected}"));
    let record = status.keys.iter().find(|k| k.id == rejected).expect("the rejected key's record");
    assert_eq!((record.state, record.reason.as_deref()), (KeyState::Revoked, Some("VerificationFailed")));
    let secret = secrets.get("robot-key").await.unwrap();
    assert_eq!(secret.metadata.annotations.unwrap()["keysmith.dev/key-id"], before);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(fake.changes("robot").len(), 7, "no churn after the failure: {:?}", fake.changes("robot"));

    // A new request, the fault gone: one more key, the old one retiring.
    accounts.patch("robot", &PatchParams::default(), &Patch::Merge(&rotate("two"))).await.unwrap();
    let rotated = eventually("the second request to rotate", Duration::from_secs(60), || async {
        let status = accounts.get("robot").await.ok()?.status?;
        (status.last_rotation_request.as_deref() == Some("two")).then_some(status)
    })
    .await;
    let current = rotated.current_key.unwrap().id;
    assert_ne!(current, before);
    let retiring = rotated.keys.iter().find(|k| k.id == before).unwrap();
    assert_eq!(retiring.state, KeyState::Retiring);

    // deletionPolicy, each exactly its calls.
    let journal_before = |name: &str| fake.changes(name).len();
    let (robot_at, keeper_at, retired_at) =
        (journal_before("robot"), journal_before("keeper"), journal_before("retired"));
    for name in ["robot", "keeper", "retired"] {
        accounts.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in ["robot", "keeper", "retired"] {
        eventually(&format!("{name} to be gone"), Duration::from_secs(60), || async {
            accounts.get_opt(name).await.ok()?.is_none().then_some(())
        })
        .await;
    }
    let mut robot: Vec<String> = fake.changes("robot")[robot_at..].to_vec();
    robot[..2].sort();
    let mut keys = [format!("revoke_key robot {before}"), format!("revoke_key robot {current}")];
    keys.sort();
    assert_eq!(
        robot,
        [keys[0].clone(), keys[1].clone(), "revoke_role robot view".into(), "delete_account robot".into()],
        "Delete: every key revoked, every role revoked, the account deleted"
    );
    assert!(fake.changes("keeper")[keeper_at..].is_empty(), "Orphan: {:?}", fake.changes("keeper"));
    let retired = fake.changes("retired")[retired_at..].to_vec();
    let retired_key = retired.first().cloned().unwrap_or_default();
    assert!(retired_key.starts_with("revoke_key retired "), "{retired:?}");
    assert_eq!(retired[1..], ["disable_account retired".to_string()], "Disable: keys revoked, account kept, disabled");

    operator.stop().await;
    ns.delete().await;
}
