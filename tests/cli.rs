//! keysmith's command line against the real apiserver and a running
//! operator: inventory, rotate, plan, and the kubectl plugin.

mod common;

use std::{process::Command, time::Duration};

use common::{apply_yaml, control_plane, kubernetes_connection_identity, Operator, TestNamespace};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use keysmith::api::IntegrationAccount;
use kube::Api;

const WAIT: Duration = Duration::from_secs(120);

const SETUP: &str = r#"
apiVersion: keysmith.dev/v1alpha1
kind: AppConnection
metadata: {name: cluster}
spec:
  provider: {kubernetes: {}}
  serviceAccountName: keysmith
  policy: {deniedRoles: ["cluster-admin"]}
---
apiVersion: keysmith.dev/v1alpha1
kind: KeyRotationPolicy
metadata: {name: policy}
spec: {rotateEvery: 24h, gracePeriod: 30s}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {name: robot}
spec:
  connectionRef: {name: cluster}
  secret: {name: robot-key}
  rotationPolicyRef: {name: policy}
"#;

fn binding(ns: &str, name: &str, account: &str, roles: &str) -> String {
    format!(
        "apiVersion: keysmith.dev/v1alpha1\nkind: RoleBinding\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  accountRef: {{name: {account}}}\n  roles: {roles}\n  scope: {ns}\n"
    )
}

fn keysmith(cp: &keysmith::controlplane::ControlPlane, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keysmith"))
        .args(args)
        .arg("--kubeconfig")
        .arg(cp.kubeconfig_path())
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

/// Waits for Ready; on timeout, says what the account and operator said.
async fn ready(client: &kube::Client, ns: &str, name: &str, operator: &Operator) -> IntegrationAccount {
    let api: Api<IntegrationAccount> = Api::namespaced(client.clone(), ns);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let account = api.get(name).await.ok();
        if let Some(a) = &account {
            let ready = a.status.as_ref().is_some_and(|s| {
                s.common.observed_generation == a.metadata.generation
                    && s.common.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
            });
            if ready {
                return a.clone();
            }
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "{ns}/{name} not Ready after {WAIT:?}\nstatus: {}\noperator log:\n{}",
                serde_json::to_string_pretty(&account.and_then(|a| a.status)).unwrap(),
                operator.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn inventory_rotate_and_the_kubectl_plugin() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "cli").await;
    let operator = Operator::start(cp, &ns.name, &[]);
    apply_yaml(&client, &ns.name, &(kubernetes_connection_identity(&["view"]) + SETUP)).await;
    apply_yaml(&client, &ns.name, &binding(&ns.name, "robot-view", "robot", "[view]")).await;
    let before = ready(&client, &ns.name, "robot", &operator).await.status.unwrap().current_key.unwrap();

    let (ok, json, err) = keysmith(cp, &["inventory", "-n", &ns.name, "-o", "json"]);
    assert!(ok, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1);
    let row = &rows[0];
    assert_eq!(row["name"], "robot");
    assert_eq!(row["provider"], "kubernetes");
    assert_eq!(row["connection"], "AppConnection/cluster");
    assert_eq!(row["roles"], serde_json::json!([format!("view@{}", ns.name)]));
    assert_eq!(row["ready"], "True");
    assert!(row["keyAgeSeconds"].as_i64().unwrap() >= 0);
    assert!(row["nextRotation"].is_string());
    let (ok, table, _) = keysmith(cp, &["inventory", "-n", &ns.name]);
    assert!(ok);
    assert!(table.lines().next().unwrap().contains("KEY AGE"), "{table}");
    assert!(table.contains("robot") && table.contains("kubernetes"), "{table}");

    let target = format!("{}/robot", ns.name);
    let (ok, progress, err) = keysmith(cp, &["rotate", &target, "--timeout", "60s"]);
    assert!(ok, "{err}");
    assert!(progress.contains("rotation of"), "{progress}");
    assert!(progress.contains("published in Secret robot-key"), "{progress}");
    assert!(progress.contains(&format!("previous key {} stays valid until", before.id)), "{progress}");
    let secret = Api::<Secret>::namespaced(client.clone(), &ns.name).get("robot-key").await.unwrap();
    assert_ne!(secret.metadata.annotations.unwrap()["keysmith.dev/key-id"], before.id);

    let (ok, _, err) = keysmith(cp, &["rotate", &format!("{}/nobody", ns.name)]);
    assert!(!ok);
    assert!(err.contains("does not exist"), "{err}");
    let (ok, _, err) = keysmith(cp, &["rotate", "robot"]);
    assert!(!ok);
    assert!(err.contains("NAMESPACE/NAME"), "{err}");

    // Installed as kubectl-keysmith, the same binary is a kubectl plugin.
    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_keysmith"), bin.path().join("kubectl-keysmith")).unwrap();
    let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap());
    let out = cp
        .kubectl()
        .args(["keysmith", "inventory", "-n", &ns.name])
        .env("PATH", path)
        .env("KUBECONFIG", cp.kubeconfig_path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("robot"), "{stdout}");
    ns.delete().await;
}

#[tokio::test]
async fn plan_shows_changes_without_making_them() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "plan").await;
    let operator = Operator::start(cp, &ns.name, &[]);
    apply_yaml(&client, &ns.name, &(kubernetes_connection_identity(&["view"]) + SETUP)).await;
    apply_yaml(&client, &ns.name, &binding(&ns.name, "robot-view", "robot", "[view]")).await;
    ready(&client, &ns.name, "robot", &operator).await;

    // A new account and a changed binding for the existing one.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("change.yaml");
    // A ClusterAppConnection only in the file, which would send a
    // kube-system Secret to a server of the file's choosing.
    let exfil = format!(
            "apiVersion: keysmith.dev/v1alpha1\nkind: ClusterAppConnection\nmetadata: {{name: exfil-{ns}}}\nspec:\n  provider: {{scim: {{baseUrl: \"http://127.0.0.1:9/scim\", tokenSecretRef: {{name: x, namespace: kube-system}}}}}}\n  namespaceSelector: {{}}\n---\napiVersion: keysmith.dev/v1alpha1\nkind: IntegrationAccount\nmetadata: {{name: exfil, namespace: {ns}}}\nspec:\n  connectionRef: {{kind: ClusterAppConnection, name: exfil-{ns}}}\n  secret: {{name: exfil-key}}\n",
            ns = ns.name
    );
    let manifests = format!(
        "apiVersion: keysmith.dev/v1alpha1\nkind: IntegrationAccount\nmetadata: {{name: newbie, namespace: {ns}}}\nspec:\n  connectionRef: {{name: cluster}}\n  secret: {{name: newbie-key}}\n---\n{}---\n{}---\napiVersion: keysmith.dev/v1alpha1\nkind: IntegrationAccount\nmetadata: {{name: robot, namespace: {ns}}}\nspec:\n  connectionRef: {{name: cluster}}\n  secret: {{name: robot-key}}\n  rotationPolicyRef: {{name: policy}}\n---\n{}",
        binding(&ns.name, "newbie-roles", "newbie", "[view, cluster-admin]"),
        binding(&ns.name, "robot-view", "robot", "[view, edit]"),
        exfil,
        ns = ns.name
    );
    std::fs::write(&file, manifests).unwrap();
    let mark = cp.audit_mark().unwrap();
    let (ok, text, err) = keysmith(cp, &["plan", "-f", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    let newbie = text.split("IntegrationAccount").find(|s| s.contains("/newbie:")).unwrap();
    assert!(newbie.contains("+ create kubernetes account newbie"), "{text}");
    assert!(newbie.contains(&format!("+ grant view on {}", ns.name)), "{text}");
    assert!(newbie.contains("! role cluster-admin is denied"), "{text}");
    assert!(!newbie.contains("grant cluster-admin"), "{text}");
    assert!(newbie.contains("+ issue and publish a new key (Initial)"), "{text}");
    let robot = text.split("IntegrationAccount").find(|s| s.contains("/robot:")).unwrap();
    assert_eq!(
        robot.trim().lines().skip(1).map(str::trim).collect::<Vec<_>>(),
        [format!("+ grant edit on {}", ns.name)],
        "{text}"
    );

    let exfil = text.split("IntegrationAccount").find(|s| s.contains("/exfil:")).unwrap();
    assert!(exfil.contains("is only in the file"), "{text}");

    // Nothing changed: no ServiceAccount, no account object, no writes at all.
    assert!(Api::<ServiceAccount>::namespaced(client.clone(), &ns.name).get_opt("newbie").await.unwrap().is_none());
    assert!(Api::<IntegrationAccount>::namespaced(client.clone(), &ns.name).get_opt("newbie").await.unwrap().is_none());
    let writes: Vec<_> = cp
        .audit_records_since(mark)
        .unwrap()
        .into_iter()
        .filter(|r| r.user == "admin" && r.is_write() && r.namespace.as_deref() == Some(&ns.name))
        .collect();
    assert!(writes.is_empty(), "plan wrote: {writes:?}");

    let (ok, json, _) = keysmith(cp, &["plan", "-f", file.to_str().unwrap(), "-o", "json"]);
    assert!(ok);
    let plans: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(plans.as_array().unwrap().len(), 3);

    // plan observes through the operator's own observe step, so a
    // suspended account plans what the operator would do: nothing.
    let paused = dir.path().join("paused.yaml");
    std::fs::write(
        &paused,
        format!(
            "apiVersion: keysmith.dev/v1alpha1\nkind: IntegrationAccount\nmetadata: {{name: paused, namespace: {ns}}}\nspec:\n  connectionRef: {{name: cluster}}\n  secret: {{name: paused-key}}\n  suspend: true\n",
            ns = ns.name
        ),
    )
    .unwrap();
    let (ok, text, err) = keysmith(cp, &["plan", "-f", paused.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(text.contains("! spec.suspend is true: keysmith makes no changes in the target app"), "{text}");
    assert!(!text.contains("+ create"), "{text}");
    ns.delete().await;
}
