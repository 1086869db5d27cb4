//! Confirmed rollover: the replaced key is revoked only once the restart
//! targets have rolled out with the new key, never before the grace period,
//! and at the latest `confirmRollout.maxWait` after publication, when the
//! stuck rollout shows as a condition and an event. The controllers run in
//! this process over a recording fake of the target app (every revocation
//! counted), on the real apiserver and controller-manager, whose Deployment
//! controller rolls the workload; the test plays the kubelet by marking the
//! Deployment's pods ready.

mod common;

use std::time::Duration;

use common::{
    apply_yaml, control_plane, eventually, kubernetes_connection_identity, ready_account,
    recording::{fake_connection, InProcess, Recording},
    TestNamespace,
};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod, events::v1::Event};
use keysmith::api::{IntegrationAccount, KeyState};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// Marks every pod of the Deployment `app` ready, as a kubelet would once
/// its containers started.
async fn play_kubelet(pods: &Api<Pod>) {
    for pod in pods.list(&ListParams::default().labels("app=app")).await.unwrap() {
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let now = jiff::Timestamp::now().to_string();
        let status = json!({"status": {
            "phase": "Running",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                {"type": "Ready", "status": "True", "lastTransitionTime": now}
            ]
        }});
        let name = pod.metadata.name.unwrap();
        let _ = pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await;
    }
}

fn rollout_condition(account: &IntegrationAccount) -> Option<(String, String, String)> {
    let c = account.status.as_ref()?.common.conditions.iter().find(|c| c.type_ == "RolloutConfirmed")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn the_old_key_is_revoked_once_the_workloads_rolled_out_or_at_max_wait() {
    // Before any thread of this process reads the environment: this binary
    // holds this one test.
    std::env::set_var(keysmith::provider::noop::ENABLE_ENV, "1");
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "rollover").await;
    apply_yaml(&client, &ns.name, &kubernetes_connection_identity(&[])).await;
    apply_yaml(
        &client,
        &ns.name,
        &format!(
            r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: keysmith-rollouts}}
rules: [{{apiGroups: ["apps"], resources: ["deployments"], verbs: ["get"]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: keysmith-rollouts}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: keysmith-rollouts}}
subjects: [{{kind: ServiceAccount, name: keysmith}}]
---
{}---
apiVersion: keysmith.dev/v1alpha1
kind: KeyRotationPolicy
metadata: {{name: confirmed}}
spec:
  rotateEvery: 24h
  gracePeriod: 3s
  restartTargets: [{{kind: Deployment, name: app}}]
  confirmRollout: {{maxWait: 10m}}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {{name: robot}}
spec: {{connectionRef: {{name: fake}}, secret: {{name: robot-key}}, rotationPolicyRef: {{name: confirmed}}}}
"#,
            fake_connection("")
        ),
    )
    .await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let app: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "app"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "app"}},
                 "template": {"metadata": {"labels": {"app": "app"}},
                              "spec": {"containers": [{"name": "app", "image": "example.invalid/app"}]}}}
    }))
    .unwrap();
    deployments.create(&PostParams::default(), &app).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    let fake = Recording::new();
    let operator = InProcess::start(cp, &ns.name, &fake).await;
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let first = ready_account(&client, &ns.name, "robot").await.status.unwrap().current_key.unwrap().id;
    let revocations = || fake.changes("robot").into_iter().filter(|c| c.starts_with("revoke_key ")).collect::<Vec<_>>();
    let rotate = |value: &'static str| {
        let accounts = accounts.clone();
        async move {
            let patch = json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": value}}});
            accounts.patch("robot", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        }
    };

    // Rotation one: the Deployment is rolled; its new pod is not ready, so
    // past the 3 s grace period the first key stays, and status says why.
    rotate("one").await;
    let waiting = eventually("RolloutConfirmed to say it waits", Duration::from_secs(60), || async {
        let (status, reason, message) = rollout_condition(&accounts.get("robot").await.ok()?)?;
        (status == "False" && reason == "WaitingForRollout").then_some(message)
    })
    .await;
    assert!(waiting.contains(&format!("key {first} stays valid")), "{waiting}");
    assert!(waiting.contains("Deployment/app: 0 of 1 updated replicas available"), "{waiting}");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(revocations().is_empty(), "revoked before the rollout: {:?}", revocations());
    let status = accounts.get("robot").await.unwrap().status.unwrap();
    let second = status.current_key.unwrap().id;
    let old = status.keys.iter().find(|k| k.id == first).unwrap();
    assert_eq!(old.state, KeyState::Retiring, "past its grace period, still valid");

    // The kubelet starts the new pod: the rollout completes, and only then
    // is the first key revoked.
    let confirmed = eventually("the rollout to be confirmed", Duration::from_secs(60), || async {
        play_kubelet(&pods).await;
        let account = accounts.get("robot").await.ok()?;
        let (status, reason, _) = rollout_condition(&account)?;
        (status == "True" && reason == "RolloutConfirmed").then_some(account)
    })
    .await;
    assert_eq!(revocations(), [format!("revoke_key robot {first}")]);
    let record = confirmed.status.as_ref().unwrap().keys.iter().find(|k| k.id == first).unwrap().clone();
    assert_eq!((record.state, record.reason.as_deref()), (KeyState::Revoked, Some("RolloutConfirmed")));
    let app = deployments.get("app").await.unwrap();
    let app_status = app.status.unwrap();
    assert_eq!(
        (app_status.updated_replicas, app_status.available_replicas, app_status.replicas),
        (Some(1), Some(1), Some(1)),
        "revoked only with the rollout complete"
    );

    // Rotation two, with a rollout that never completes and a 6 s maxWait:
    // revoked at maxWait, shown as RolloutStuck and a Warning event.
    let policy = json!({"spec": {"confirmRollout": {"maxWait": "6s"}}});
    Api::<keysmith::api::KeyRotationPolicy>::namespaced(client.clone(), &ns.name)
        .patch("confirmed", &PatchParams::default(), &Patch::Merge(&policy))
        .await
        .unwrap();
    rotate("two").await;
    let stuck = eventually("RolloutStuck", Duration::from_secs(60), || async {
        let (status, reason, message) = rollout_condition(&accounts.get("robot").await.ok()?)?;
        (status == "False" && reason == "RolloutStuck").then_some(message)
    })
    .await;
    assert!(stuck.contains(&format!("key {second} was revoked at confirmRollout.maxWait")), "{stuck}");
    assert!(stuck.contains("Deployment/app"), "{stuck}");
    assert_eq!(revocations().last(), Some(&format!("revoke_key robot {second}")));
    let events = Api::<Event>::namespaced(client.clone(), &ns.name).list(&ListParams::default()).await.unwrap();
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("RolloutStuck") && e.type_.as_deref() == Some("Warning")),
        "a RolloutStuck Warning event"
    );
    let status = accounts.get("robot").await.unwrap().status.unwrap();
    let record = status.keys.iter().find(|k| k.id == second).unwrap();
    assert_eq!(record.reason.as_deref(), Some("RolloutTimedOut"));
    let revoked_at = record.revoked_at.as_ref().unwrap().0;
    let retiring_at = record.retiring_at.as_ref().unwrap().0;
    let waited = revoked_at.duration_since(retiring_at).as_secs();
    assert!((6..=20).contains(&waited), "revoked {waited} s after publication; maxWait is 6 s");
    assert!(
        status.common.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"),
        "a stuck rollout does not make the account not Ready"
    );

    // Rotation three, whose pass outlasts the grace period (a verification
    // that takes 5 s; the grace period is 3 s): the replaced key's
    // revocation is still due, so the rollout is looked at and the key
    // revoked once it completes, not at the next drift check.
    let policy = json!({"spec": {"confirmRollout": {"maxWait": "10m"}}});
    Api::<keysmith::api::KeyRotationPolicy>::namespaced(client.clone(), &ns.name)
        .patch("confirmed", &PatchParams::default(), &Patch::Merge(&policy))
        .await
        .unwrap();
    let third = accounts.get("robot").await.unwrap().status.unwrap().current_key.unwrap().id;
    fake.slow_next("verify_key", Duration::from_secs(5));
    rotate("three").await;
    let revoked = eventually("the third key revoked after the rollout", Duration::from_secs(60), || async {
        play_kubelet(&pods).await;
        let status = accounts.get("robot").await.ok()?.status?;
        let record = status.keys.iter().find(|k| k.id == third && k.state == KeyState::Revoked)?;
        Some(record.clone())
    })
    .await;
    assert_eq!(revoked.reason.as_deref(), Some("RolloutConfirmed"));
    let waited = revoked.revoked_at.unwrap().0.duration_since(revoked.retiring_at.unwrap().0).as_secs();
    assert!(waited <= 30, "revoked {waited} s after publication");

    operator.stop().await;
    ns.delete().await;
}
