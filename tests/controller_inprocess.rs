//! The controllers in this test's own process (`controller::run_with`), over
//! a fake target app (the no-op provider, enabled for this process only), on
//! the real apiserver: the calls the account controller makes to the target
//! app, counted by the provider guard, and the status it writes. Beside the
//! end-to-end tests, which run the operator binary.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{apply_yaml, control_plane, eventually, kubernetes_connection_identity, ready_account, TestNamespace};
use keysmith::{
    api::IntegrationAccount,
    controller::{self, RunOptions, Telemetry},
};
use kube::api::{Api, Patch, PatchParams};

/// `keysmith_provider_requests_total` of the no-op provider, by operation
/// and outcome.
fn calls(telemetry: &Telemetry) -> BTreeMap<String, u64> {
    let text = telemetry.metrics.encode(false).expect("metrics encode");
    text.lines()
        .filter_map(|line| line.strip_prefix("keysmith_provider_requests_total{"))
        .filter_map(|rest| {
            let (labels, value) = rest.split_once("} ")?;
            let labels: BTreeMap<&str, &str> = labels
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k, v.trim_matches('"')))
                .collect();
            (labels.get("provider") == Some(&"noop")).then(|| {
                (format!("{}/{}", labels["operation"], labels["outcome"]), value.trim().parse::<u64>().unwrap_or(0))
            })
        })
        .collect()
}

#[tokio::test]
async fn the_account_controller_makes_the_calls_it_needs_and_writes_what_it_did() {
    // Before any thread of this process reads the environment: this binary
    // holds this one test.
    std::env::set_var(keysmith::provider::noop::ENABLE_ENV, "1");
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "inproc").await;
    apply_yaml(&client, &ns.name, &kubernetes_connection_identity(&["view"])).await;
    apply_yaml(
        &client,
        &ns.name,
        &format!(
            r#"
apiVersion: keysmith.dev/v1alpha1
kind: AppConnection
metadata: {{name: fake, annotations: {{"{annotation}": "true"}}}}
spec: {{provider: {{kubernetes: {{}}}}, serviceAccountName: keysmith}}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {{name: robot}}
spec: {{connectionRef: {{name: fake}}, secret: {{name: robot-key}}}}
---
apiVersion: keysmith.dev/v1alpha1
kind: RoleBinding
metadata: {{name: robot-view}}
spec: {{accountRef: {{name: robot}}, roles: [view]}}
"#,
            annotation = keysmith::provider::noop::ANNOTATION
        ),
    )
    .await;

    let telemetry = Telemetry::default();
    let config = kube::Config::from_custom_kubeconfig(cp.kubeconfig(), &Default::default()).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = RunOptions { namespace: Some(ns.name.clone()), ..RunOptions::default() };
    let operator = tokio::spawn(controller::run_with(
        client.clone(),
        config,
        options,
        telemetry.clone(),
        std::future::ready(()),
        async {
            let _ = stopped.await;
        },
    ));

    // To Ready: the account created, its role granted, one key issued,
    // verified and published; nothing revoked or deleted.
    let account = ready_account(&client, &ns.name, "robot").await;
    let status = account.status.expect("status");
    let current = status.current_key.expect("a current key");
    assert!(status.keys.iter().any(|k| k.id == current.id && k.published_at.is_some()), "{:?}", status.keys);
    let made = calls(&telemetry);
    for call in ["create_account/ok", "grant_role/ok", "issue_key/ok", "verify_key/ok"] {
        assert_eq!(made.get(call), Some(&1), "{call} once: {made:?}");
    }
    for call in made.keys() {
        assert!(
            !call.starts_with("revoke_") && !call.starts_with("delete_") && !call.starts_with("disable_"),
            "{call}: {made:?}"
        );
        assert!(call.ends_with("/ok"), "{call} failed: {made:?}");
    }

    // A manual rotation: exactly one more key issued and verified, the old
    // one kept for its grace period; status records both.
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let rotate = serde_json::json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": "in-process"}}});
    accounts.patch("robot", &PatchParams::default(), &Patch::Merge(&rotate)).await.unwrap();
    let rotated = eventually("the rotation to be recorded", Duration::from_secs(60), || async {
        let status = accounts.get("robot").await.ok()?.status?;
        (status.current_key.as_ref()?.id != current.id).then_some(status)
    })
    .await;
    let made = calls(&telemetry);
    assert_eq!(made.get("issue_key/ok"), Some(&2), "{made:?}");
    assert_eq!(made.get("verify_key/ok"), Some(&2), "{made:?}");
    assert_eq!(made.get("create_account/ok"), Some(&1), "{made:?}");
    assert!(!made.contains_key("revoke_key/ok"), "the old key stays through its grace period: {made:?}");
    let old = rotated.keys.iter().find(|k| k.id == current.id).expect("the old key's record");
    assert!(old.revoke_at.is_some(), "{old:?}");
    assert_eq!(rotated.last_rotation_request.as_deref(), Some("in-process"));

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), operator).await;
    ns.delete().await;
}
