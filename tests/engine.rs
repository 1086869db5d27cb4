//! The reconcile engine end to end on the built-in kubernetes provider: a
//! real kube-apiserver, the operator as its own process, and every assertion
//! made on real effects (tokens that authenticate, RBAC that allows or
//! forbids, objects that exist or are gone, requests in the audit log).

mod common;

use std::time::Duration;

use common::{
    apply_yaml, control_plane, credential_reader_identity, eventually, kubernetes_connection_identity, ready_account,
    Operator, TestNamespace,
};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Event, Secret, ServiceAccount},
    rbac::v1::{ClusterRoleBinding, RoleBinding as RbacRoleBinding},
};
use keysmith::api::{IntegrationAccount, KeyState, RoleBinding};
use kube::{
    api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams},
    Client, ResourceExt,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

fn quickstart() -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/quickstart");
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect::<Vec<_>>().join("\n---\n")
}

/// The quickstart, with the RoleBinding's scope pointed at the test namespace.
async fn apply_quickstart(client: &Client, ns: &str) {
    apply_yaml(client, ns, &quickstart().replace("scope: quickstart", &format!("scope: {ns}"))).await;
}

async fn secret_value(client: &Client, ns: &str, name: &str, key: &str) -> Option<String> {
    let secret = Api::<Secret>::namespaced(client.clone(), ns).get_opt(name).await.ok()??;
    let bytes = secret.data?.get(key)?.0.clone();
    String::from_utf8(bytes).ok()
}

/// A client that authenticates with the kubeconfig keysmith wrote.
async fn client_from_secret(client: &Client, ns: &str, secret: &str) -> Client {
    let text = secret_value(client, ns, secret, "kubeconfig").await.expect("kubeconfig in the Secret");
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&text).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
    Client::try_from(config).unwrap()
}

async fn client_from_token(cp: &keysmith::controlplane::ControlPlane, token: &str) -> Client {
    cp.client_for_token(token).await.unwrap()
}

/// The HTTP status of listing ConfigMaps in `ns` with `client`: 200, 401, 403.
async fn list_configmaps(client: &Client, ns: &str) -> u16 {
    match Api::<ConfigMap>::namespaced(client.clone(), ns).list(&ListParams::default()).await {
        Ok(_) => 200,
        Err(kube::Error::Api(status)) => status.code,
        Err(other) => panic!("unexpected error: {other}"),
    }
}

async fn create_configmap(client: &Client, ns: &str, name: &str) -> u16 {
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    match Api::<ConfigMap>::namespaced(client.clone(), ns).create(&PostParams::default(), &cm).await {
        Ok(_) => 201,
        Err(kube::Error::Api(status)) => status.code,
        Err(other) => panic!("unexpected error: {other}"),
    }
}

async fn list_secrets_status(client: &Client, ns: &str) -> u16 {
    match Api::<Secret>::namespaced(client.clone(), ns).list(&ListParams::default()).await {
        Ok(_) => 200,
        Err(kube::Error::Api(status)) => status.code,
        Err(other) => panic!("unexpected error: {other}"),
    }
}

async fn anchors(client: &Client, ns: &str) -> Vec<Secret> {
    Api::<Secret>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|s| s.type_.as_deref() == Some("keysmith.dev/key-anchor"))
        .collect()
}

#[tokio::test]
async fn quickstart_becomes_ready_and_its_kubeconfig_works() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "quickstart").await;
    let operator = Operator::start(cp, &ns.name, &[]);
    apply_quickstart(&client, &ns.name).await;

    let account = ready_account(&client, &ns.name, "ci-deployer").await;
    let status = account.status.unwrap();
    assert_eq!(
        status.account.as_ref().unwrap().name.as_deref(),
        Some(&*format!("system:serviceaccount:{}:ci-deployer", ns.name))
    );
    assert!(status.next_rotation_at.is_some());
    let current = status.current_key.unwrap();

    // The Secret: keysmith's labels, owner and key annotations, and every key.
    let secret = Api::<Secret>::namespaced(client.clone(), &ns.name).get("ci-deployer-credentials").await.unwrap();
    assert_eq!(secret.labels()["app.kubernetes.io/managed-by"], "keysmith");
    assert_eq!(secret.annotations()["keysmith.dev/key-id"], current.id);
    assert_eq!(secret.owner_references()[0].uid, account.metadata.uid.unwrap());
    let data = secret.data.unwrap();
    for key in ["token", "ca.crt", "server", "namespace", "kubeconfig"] {
        assert!(data.contains_key(key), "Secret lacks {key}");
    }

    // The kubeconfig authenticates as the new ServiceAccount, with view only.
    let integration = client_from_secret(&client, &ns.name, "ci-deployer-credentials").await;
    eventually("view to take effect", WAIT, || async {
        (list_configmaps(&integration, &ns.name).await == 200).then_some(())
    })
    .await;
    assert_eq!(list_secrets_status(&integration, &ns.name).await, 403, "view must not read Secrets");
    assert_eq!(create_configmap(&integration, &ns.name, "nope").await, 403, "view must not write");
    assert_eq!(list_configmaps(&integration, "default").await, 403, "view is granted in one namespace only");

    // Every kind reports Ready.
    let binding = Api::<RoleBinding>::namespaced(client.clone(), &ns.name).get("ci-deployer-view").await.unwrap();
    assert!(binding.status.unwrap().common.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    drop(operator);
    ns.delete().await;
}

/// The connection, rotation policy and account the tests share; the
/// connection acts as ServiceAccount `keysmith` (see [`account_yaml`]).
const ACCOUNT: &str = r#"
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
spec: {rotateEvery: 24h, gracePeriod: 15s}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {name: robot}
spec:
  connectionRef: {name: cluster}
  secret: {name: robot-key}
  rotationPolicyRef: {name: policy}
"#;

/// [`ACCOUNT`] after the ServiceAccount its connection acts as, which may
/// bind `view` and `edit` in the namespace.
fn account_yaml() -> String {
    kubernetes_connection_identity(&["view", "edit"]) + ACCOUNT
}

/// Binds `edit` to the `robot` ServiceAccount with an RBAC RoleBinding
/// `by-hand`, as someone would by hand; returns the RBAC API to check on it.
async fn bind_edit_by_hand(client: &Client, ns: &str) -> Api<RbacRoleBinding> {
    let by_hand: RbacRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "by-hand"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": ns}]
    }))
    .unwrap();
    let rbac: Api<RbacRoleBinding> = Api::namespaced(client.clone(), ns);
    rbac.create(&PostParams::default(), &by_hand).await.unwrap();
    rbac
}

fn binding_yaml(ns: &str, roles: &[&str]) -> String {
    format!(
        "apiVersion: keysmith.dev/v1alpha1\nkind: RoleBinding\nmetadata: {{name: robot-roles}}\nspec:\n  accountRef: {{name: robot}}\n  roles: {roles:?}\n  scope: \"{ns}\"\n"
    )
}

#[tokio::test]
async fn roles_converge_to_exactly_the_declared_set() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "roles").await;
    let _operator = Operator::start(cp, &ns.name, &[]);
    apply_yaml(&client, &ns.name, &account_yaml()).await;
    apply_yaml(&client, &ns.name, &binding_yaml(&ns.name, &["view", "edit"])).await;
    ready_account(&client, &ns.name, "robot").await;
    let robot = client_from_secret(&client, &ns.name, "robot-key").await;
    eventually("edit to take effect", WAIT, || async {
        (create_configmap(&robot, &ns.name, "one").await == 201).then_some(())
    })
    .await;

    // Dropping edit from the RoleBinding takes the access away.
    apply_yaml(&client, &ns.name, &binding_yaml(&ns.name, &["view"])).await;
    eventually("edit to be revoked", WAIT, || async {
        (create_configmap(&robot, &ns.name, "two").await == 403).then_some(())
    })
    .await;
    assert_eq!(list_configmaps(&robot, &ns.name).await, 200, "view stays");

    // A binding made by hand for the ServiceAccount is removed on the next reconcile.
    let rbac = bind_edit_by_hand(&client, &ns.name).await;
    eventually("the hand-made grant to work", WAIT, || async {
        (create_configmap(&robot, &ns.name, "three").await == 201).then_some(())
    })
    .await;
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    accounts
        .patch("robot", &PatchParams::default(), &Patch::Merge(json!({"spec": {"description": "touched"}})))
        .await
        .unwrap();
    eventually("the hand-made binding to be removed", WAIT, || async {
        rbac.get_opt("by-hand").await.unwrap().is_none().then_some(())
    })
    .await;
    eventually("edit to be gone again", WAIT, || async {
        (create_configmap(&robot, &ns.name, "four").await == 403).then_some(())
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
async fn policy_denied_role_is_never_granted() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "denied").await;
    let _operator = Operator::start(cp, &ns.name, &[]);
    apply_yaml(&client, &ns.name, &account_yaml()).await;
    apply_yaml(&client, &ns.name, &binding_yaml(&ns.name, &["cluster-admin", "view"])).await;
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &ns.name);
    let binding = eventually("PolicyViolation", WAIT, || async {
        let b = bindings.get("robot-roles").await.ok()?;
        b.status
            .as_ref()?
            .common
            .conditions
            .iter()
            .any(|c| c.type_ == "PolicyViolation" && c.status == "True")
            .then_some(b)
    })
    .await;
    let status = binding.status.unwrap();
    assert_eq!(status.denied_roles, ["cluster-admin"]);
    let violation = status.common.conditions.iter().find(|c| c.type_ == "PolicyViolation").unwrap();
    assert!(violation.message.contains("cluster-admin"), "{}", violation.message);
    // A warning event says so.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    eventually("a PolicyViolation event", WAIT, || async {
        events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("PolicyViolation"))
            .then_some(())
    })
    .await;
    // Nothing grants cluster-admin to the ServiceAccount.
    let crbs = Api::<ClusterRoleBinding>::all(client.clone()).list(&ListParams::default()).await.unwrap();
    assert!(!crbs.items.iter().any(|b| b.role_ref.name == "cluster-admin"
        && b.subjects.iter().flatten().any(|s| s.name == "robot" && s.namespace.as_deref() == Some(&ns.name))));
    ns.delete().await;
}

#[tokio::test]
async fn manual_rotation_keeps_the_old_key_through_the_grace_period_only() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "rotate").await;
    let operator = Operator::start(cp, &ns.name, &[]);
    apply_yaml(&client, &ns.name, &account_yaml()).await;
    apply_yaml(&client, &ns.name, &binding_yaml(&ns.name, &["view"])).await;
    let before = ready_account(&client, &ns.name, "robot").await.status.unwrap().current_key.unwrap();
    let old_token = secret_value(&client, &ns.name, "robot-key", "token").await.unwrap();
    let old = client_from_token(cp, &old_token).await;
    eventually("the first token to work", WAIT, || async {
        (list_configmaps(&old, &ns.name).await == 200).then_some(())
    })
    .await;

    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    accounts
        .patch(
            "robot",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": "1"}}})),
        )
        .await
        .unwrap();
    let new_token = eventually("a new token in the Secret", WAIT, || async {
        let token = secret_value(&client, &ns.name, "robot-key", "token").await?;
        (token != old_token).then_some(token)
    })
    .await;
    let new = client_from_token(cp, &new_token).await;
    assert_eq!(list_configmaps(&new, &ns.name).await, 200, "the new token works");
    assert_eq!(list_configmaps(&old, &ns.name).await, 200, "the old token works during the grace period");
    let status = eventually("both lifecycles in status", WAIT, || async {
        let status = accounts.get("robot").await.ok()?.status?;
        let old = status.keys.iter().find(|k| k.id == before.id)?;
        (old.state == KeyState::Retiring).then_some(status)
    })
    .await;
    let current = status.current_key.clone().unwrap();
    assert_ne!(current.id, before.id);
    let new_record = status.keys.iter().find(|k| k.id == current.id).unwrap();
    assert_eq!(new_record.state, KeyState::Published);
    assert_eq!(new_record.reason.as_deref(), Some("ManualRotation"));
    assert!(status.keys.iter().find(|k| k.id == before.id).unwrap().revoke_at.is_some());
    assert_eq!(status.last_rotation_request.as_deref(), Some("1"));

    // After the grace period (15 s, plus the apiserver's ~10 s token cache)
    // the old token is refused, and status says it was revoked.
    eventually("the old token to be refused", Duration::from_secs(90), || async {
        (list_configmaps(&old, &ns.name).await == 401).then_some(())
    })
    .await;
    assert_eq!(list_configmaps(&new, &ns.name).await, 200, "the new token keeps working");
    eventually("the old key recorded as revoked", WAIT, || async {
        let status = accounts.get("robot").await.ok()?.status?;
        let old = status.keys.iter().find(|k| k.id == before.id)?;
        (old.state == KeyState::Revoked && old.reason.as_deref() == Some("GracePeriodEnded")).then_some(())
    })
    .await;
    assert_eq!(anchors(&client, &ns.name).await.len(), 1, "exactly one live key");

    // No key material in status, events or the operator's logs.
    let status_json = serde_json::to_string(&accounts.get("robot").await.unwrap()).unwrap();
    let events = serde_json::to_string(
        &Api::<Event>::namespaced(client.clone(), &ns.name).list(&ListParams::default()).await.unwrap(),
    )
    .unwrap();
    assert!(events.contains("KeyRotated"), "rotation events are published");
    let logs = operator.stop().await;
    assert!(logs.contains("published key"), "the audit log line is there");
    for token in [&old_token, &new_token] {
        let probe = &token[token.len() - 24..];
        assert!(!status_json.contains(probe), "key material in status");
        assert!(!events.contains(probe), "key material in events");
        assert!(!logs.contains(probe), "key material in logs");
    }
    ns.delete().await;
}

#[tokio::test]
async fn scheduled_rotation_publishes_a_new_working_token() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "schedule").await;
    let _operator = Operator::start(cp, &ns.name, &[]);
    apply_yaml(
        &client,
        &ns.name,
        &account_yaml().replace("{rotateEvery: 24h, gracePeriod: 15s}", "{schedule: \"* * * * *\", gracePeriod: 10s}"),
    )
    .await;
    apply_yaml(&client, &ns.name, &binding_yaml(&ns.name, &["view"])).await;
    let first = ready_account(&client, &ns.name, "robot").await.status.unwrap();
    let next = first.next_rotation_at.clone().unwrap();
    assert!(next.0 > first.current_key.as_ref().unwrap().issued_at.0);
    let old_token = secret_value(&client, &ns.name, "robot-key", "token").await.unwrap();
    let new_token = eventually("the scheduled rotation", Duration::from_secs(150), || async {
        let token = secret_value(&client, &ns.name, "robot-key", "token").await?;
        (token != old_token).then_some(token)
    })
    .await;
    let new = client_from_token(cp, &new_token).await;
    eventually("the new token to work", WAIT, || async {
        (list_configmaps(&new, &ns.name).await == 200).then_some(())
    })
    .await;
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let status = accounts.get("robot").await.unwrap().status.unwrap();
    let record = status.keys.iter().find(|k| Some(&k.id) == status.current_key.as_ref().map(|c| &c.id)).unwrap();
    assert_eq!(record.reason.as_deref(), Some("Scheduled"));
    ns.delete().await;
}

#[tokio::test]
async fn deletion_policy_delete_removes_everything_and_orphan_leaves_it() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "delete").await;
    let _operator = Operator::start(cp, &ns.name, &[]);
    apply_yaml(&client, &ns.name, &account_yaml()).await;
    apply_yaml(&client, &ns.name, &binding_yaml(&ns.name, &["view"])).await;
    apply_yaml(
        &client,
        &ns.name,
        &ACCOUNT
            .split("---")
            .nth(2)
            .unwrap()
            .replace("name: robot}", "name: kept}")
            .replace("name: robot-key", "name: kept-key")
            .replace("rotationPolicyRef", "deletionPolicy: Orphan\n  rotationPolicyRef"),
    )
    .await;
    apply_yaml(
        &client,
        &ns.name,
        &binding_yaml(&ns.name, &["view"]).replace("robot-roles", "kept-roles").replace("name: robot}", "name: kept}"),
    )
    .await;
    ready_account(&client, &ns.name, "robot").await;
    ready_account(&client, &ns.name, "kept").await;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns.name);
    let rbac: Api<RbacRoleBinding> = Api::namespaced(client.clone(), &ns.name);
    let bound_to = |name: &'static str| {
        let rbac = rbac.clone();
        async move {
            rbac.list(&ListParams::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .filter(|b| b.subjects.iter().flatten().any(|s| s.name == name))
                .count()
        }
    };
    assert_eq!(bound_to("robot").await, 1);
    assert_eq!(bound_to("kept").await, 1);
    assert_eq!(anchors(&client, &ns.name).await.len(), 2);

    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    for name in ["robot", "kept"] {
        accounts.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in ["robot", "kept"] {
        eventually(&format!("{name} to be gone"), WAIT, || async {
            accounts.get_opt(name).await.unwrap().is_none().then_some(())
        })
        .await;
    }
    assert!(sas.get_opt("robot").await.unwrap().is_none(), "Delete removes the ServiceAccount");
    assert_eq!(bound_to("robot").await, 0, "Delete removes the bindings");
    assert!(sas.get_opt("kept").await.unwrap().is_some(), "Orphan keeps the ServiceAccount");
    assert_eq!(bound_to("kept").await, 1, "Orphan keeps the bindings");
    let remaining = anchors(&client, &ns.name).await;
    assert_eq!(remaining.len(), 1, "Delete removes its key anchors, Orphan keeps its own");
    assert!(remaining[0].name_any().starts_with("kept-"));
    ns.delete().await;
}

#[tokio::test]
async fn a_crash_between_issuing_and_publishing_leaves_exactly_one_live_key() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "crash").await;
    let mut crashing = Operator::start(cp, &ns.name, &[("KEYSMITH_FAILPOINT", "after-issue")]);
    apply_yaml(&client, &ns.name, &account_yaml()).await;
    apply_yaml(&client, &ns.name, &binding_yaml(&ns.name, &["view"])).await;
    assert_eq!(crashing.wait_exit(WAIT).await, Some(86), "the failpoint stops the operator");
    // The key was issued but never published.
    assert_eq!(anchors(&client, &ns.name).await.len(), 1);
    assert!(secret_value(&client, &ns.name, "robot-key", "token").await.is_none());
    let lost = anchors(&client, &ns.name).await[0].name_any();
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let pending = accounts.get("robot").await.unwrap().status.unwrap().pending.unwrap();
    assert_eq!(pending.operation, "IssueKey");
    drop(crashing);

    let _operator = Operator::start(cp, &ns.name, &[]);
    let account = ready_account(&client, &ns.name, "robot").await;
    let status = account.status.unwrap();
    assert!(status.pending.is_none());
    let live = anchors(&client, &ns.name).await;
    assert_eq!(live.len(), 1, "exactly one live key");
    assert_ne!(live[0].name_any(), lost, "the lost key was revoked");
    let current = status.current_key.unwrap();
    assert!(live[0].name_any().ends_with(&current.id));
    let revoked = status.keys.iter().find(|k| k.id == pending.token).unwrap();
    assert_eq!(revoked.state, KeyState::Revoked);
    let robot = client_from_secret(&client, &ns.name, "robot-key").await;
    eventually("the published key to work", WAIT, || async {
        (list_configmaps(&robot, &ns.name).await == 200).then_some(())
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
async fn a_full_resync_with_nothing_changed_makes_no_writes() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "resync").await;
    let first = Operator::start(cp, &ns.name, &[]);
    apply_yaml(&client, &ns.name, &account_yaml()).await;
    apply_yaml(&client, &ns.name, &binding_yaml(&ns.name, &["view"])).await;
    ready_account(&client, &ns.name, "robot").await;
    // Let the other controllers settle their status too.
    eventually("the RoleBinding to be Ready", WAIT, || async {
        let b = Api::<RoleBinding>::namespaced(client.clone(), &ns.name).get("robot-roles").await.ok()?;
        b.status?.common.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    first.stop().await;

    let mark = cp.audit_mark().unwrap();
    let second = Operator::start(cp, &ns.name, &[]);
    eventually("the new operator to reconcile the account", WAIT, || async {
        second.logs().contains("reconciled").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let logs = second.stop().await;
    let records = cp.audit_records_since(mark).unwrap();
    let ours: Vec<_> = records
        .iter()
        .filter(|r| r.user == keysmith::controlplane::OPERATOR_USER)
        .filter(|r| r.namespace.as_deref() == Some(&ns.name) || r.namespace.is_none())
        .collect();
    let reads = ours.iter().filter(|r| !r.is_write()).count();
    let writes: Vec<String> = ours
        .iter()
        .filter(|r| r.is_write() && r.namespace.as_deref() == Some(&ns.name))
        .map(|r| format!("{} {} {:?}", r.verb, r.resource, r.name))
        .collect();
    assert!(reads > 0, "the resync read the cluster ({} records)", records.len());
    assert!(writes.is_empty(), "a resync with nothing changed wrote: {writes:?}\n{logs}");
    ns.delete().await;
}

/// Waits until the keysmith RoleBinding `name` reports Ready.
async fn binding_ready(client: &Client, ns: &str, name: &str) {
    eventually(&format!("RoleBinding {name} to be Ready"), WAIT, || async {
        let b = Api::<RoleBinding>::namespaced(client.clone(), ns).get(name).await.ok()?;
        b.status?.common.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_change_that_leaves_the_account_as_it_is_does_not_ask_the_target_app() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "unchanged").await;
    let operator = Operator::start(cp, &ns.name, &[]);
    apply_yaml(&client, &ns.name, &account_yaml()).await;
    apply_yaml(&client, &ns.name, &binding_yaml(&ns.name, &["view"])).await;
    ready_account(&client, &ns.name, "robot").await;
    binding_ready(&client, &ns.name, "robot-roles").await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // A second RoleBinding declaring a role the account already holds: the
    // account is reconciled (its bindings changed) but its target state is
    // the same, and its last look at the target app is a second old.
    let mark = cp.audit_mark().unwrap();
    let again = binding_yaml(&ns.name, &["view"]).replace("name: robot-roles", "name: robot-roles-again");
    apply_yaml(&client, &ns.name, &again).await;
    binding_ready(&client, &ns.name, "robot-roles-again").await;

    // A shorter rotation period moves the next rotation, computed from the
    // current key alone: nothing is due yet, so nothing needs the target
    // app either. (A longer one could not: the token expires a day after it
    // was issued, plus the grace period.)
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let next_rotation = |a: IntegrationAccount| a.status.and_then(|s| s.next_rotation_at).map(|t| t.0);
    let before = next_rotation(accounts.get("robot").await.unwrap()).expect("a next rotation");
    let policies: Api<keysmith::api::KeyRotationPolicy> = Api::namespaced(client.clone(), &ns.name);
    policies
        .patch("policy", &PatchParams::default(), &Patch::Merge(json!({"spec": {"rotateEvery": "12h"}})))
        .await
        .unwrap();
    let after = eventually("the next rotation to move 12 hours earlier", WAIT, || async {
        let next = next_rotation(accounts.get("robot").await.ok()?)?;
        (next != before).then_some(next)
    })
    .await;
    let robot = accounts.get("robot").await.unwrap();
    let issued = robot.status.and_then(|s| s.current_key).expect("a current key").issued_at.0;
    assert_eq!(after.duration_since(issued).as_secs(), 12 * 3600, "the policy has no jitter");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let logs = operator.stop().await;
    assert!(logs.contains("unchanged since it converged"), "the account was not reconciled:\n{logs}");
    let target: Vec<String> = cp
        .audit_records_since(mark)
        .unwrap()
        .into_iter()
        // Other tests' operators run as the same user, in their namespaces.
        .filter(|r| r.user == keysmith::controlplane::OPERATOR_USER && r.namespace.as_deref() == Some(&ns.name))
        .filter(|r| matches!(r.resource.as_str(), "serviceaccounts" | "rolebindings" | "secrets"))
        .filter(|r| r.api_group.as_deref() != Some("keysmith.dev"))
        .filter(|r| r.verb != "watch")
        .map(|r| format!("{} {}", r.verb, r.request_uri))
        .collect();
    assert!(
        target.is_empty(),
        "the target app (this namespace's ServiceAccounts, RBAC and key anchors) was asked: {target:#?}"
    );
    ns.delete().await;
}

#[tokio::test]
async fn the_drift_check_undoes_a_hand_made_grant_without_any_change_to_the_account() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "drift").await;
    let options = common::OperatorOptions { args: &["--drift-check-interval", "3s"], ..Default::default() };
    let _operator = Operator::start_with(cp, &ns.name, &options);
    apply_yaml(&client, &ns.name, &account_yaml()).await;
    apply_yaml(&client, &ns.name, &binding_yaml(&ns.name, &["view"])).await;
    ready_account(&client, &ns.name, "robot").await;

    // Someone binds `edit` to the ServiceAccount by hand; nothing in the
    // cluster tells keysmith's account controller, only its drift check.
    let rbac = bind_edit_by_hand(&client, &ns.name).await;
    eventually("the drift check to remove the hand-made binding", WAIT, || async {
        rbac.get_opt("by-hand").await.unwrap().is_none().then_some(())
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
async fn a_cluster_connection_serves_only_the_namespaces_it_admits() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let admitted = TestNamespace::create(&client, "admitted").await;
    let refused = TestNamespace::create(&client, "refused").await;
    let connection = format!("shared-{}", admitted.name);
    let yaml = format!(
        "apiVersion: keysmith.dev/v1alpha1\nkind: ClusterAppConnection\nmetadata: {{name: {connection}}}\nspec:\n  provider: {{kubernetes: {{}}}}\n  namespaceSelector: {{matchLabels: {{keysmith.dev/test: admitted}}}}\n"
    );
    for object in keysmith::manifest::parse(&yaml).unwrap() {
        keysmith::manifest::apply(&client, &object, "test").await.unwrap();
    }
    let account = ACCOUNT
        .split("---")
        .nth(2)
        .unwrap()
        .replace(
            "connectionRef: {name: cluster}",
            &format!("connectionRef: {{kind: ClusterAppConnection, name: {connection}}}"),
        )
        .replace("  rotationPolicyRef: {name: policy}\n", "");
    let _a = Operator::start(cp, &admitted.name, &[]);
    let _b = Operator::start(cp, &refused.name, &[]);
    apply_yaml(&client, &admitted.name, &account).await;
    apply_yaml(&client, &refused.name, &account).await;
    ready_account(&client, &admitted.name, "robot").await;
    let api: Api<IntegrationAccount> = Api::namespaced(client.clone(), &refused.name);
    let condition = eventually("the refused account to say why", WAIT, || async {
        let status = api.get("robot").await.ok()?.status?;
        status.common.conditions.into_iter().find(|c| c.type_ == "AccountReady" && c.reason == "ConnectionNotAdmitted")
    })
    .await;
    assert!(condition.message.contains(&refused.name), "{}", condition.message);
    assert!(Api::<ServiceAccount>::namespaced(client.clone(), &refused.name).get_opt("robot").await.unwrap().is_none());
    let _ = Api::<keysmith::api::ClusterAppConnection>::all(client.clone())
        .delete(&connection, &DeleteParams::default())
        .await;
    admitted.delete().await;
    refused.delete().await;
}

#[tokio::test]
async fn a_secret_keysmith_did_not_create_is_never_overwritten() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "foreign").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let theirs: Secret =
        serde_json::from_value(json!({"metadata": {"name": "robot-key"}, "stringData": {"token": "theirs"}})).unwrap();
    secrets.create(&PostParams::default(), &theirs).await.unwrap();
    let _operator = Operator::start(cp, &ns.name, &[]);
    apply_yaml(&client, &ns.name, &account_yaml()).await;
    let api: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let condition = eventually("SecretNotOwned", WAIT, || async {
        let status = api.get("robot").await.ok()?.status?;
        status.common.conditions.into_iter().find(|c| c.type_ == "KeyReady" && c.reason == "SecretNotOwned")
    })
    .await;
    assert!(condition.message.contains("robot-key"), "{}", condition.message);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(secret_value(&client, &ns.name, "robot-key", "token").await.as_deref(), Some("theirs"));
    assert!(anchors(&client, &ns.name).await.is_empty(), "no key is issued that could not be published");
    ns.delete().await;
}

#[tokio::test]
async fn restart_targets_are_rolled_after_a_rotation() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "restart").await;
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(client.clone(), &ns.name);
    let app: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(json!({
        "metadata": {"name": "app"},
        "spec": {"selector": {"matchLabels": {"app": "app"}},
                 "template": {"metadata": {"labels": {"app": "app"}},
                              "spec": {"containers": [{"name": "app", "image": "example.invalid/app"}]}}}
    }))
    .unwrap();
    deployments.create(&PostParams::default(), &app).await.unwrap();
    let _operator = Operator::start(cp, &ns.name, &[]);
    apply_yaml(
        &client,
        &ns.name,
        &account_yaml().replace(
            "{rotateEvery: 24h, gracePeriod: 15s}",
            "{rotateEvery: 24h, gracePeriod: 15s, restartTargets: [{kind: Deployment, name: app}]}",
        ),
    )
    .await;
    ready_account(&client, &ns.name, "robot").await;
    let restarted = |d: &k8s_openapi::api::apps::v1::Deployment| {
        d.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref()?.get("keysmith.dev/restartedAt").cloned()
    };
    assert_eq!(restarted(&deployments.get("app").await.unwrap()), None, "the first key restarts nothing");
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    accounts
        .patch(
            "robot",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": "go"}}})),
        )
        .await
        .unwrap();
    eventually("the Deployment to be rolled", WAIT, || async { restarted(&deployments.get("app").await.ok()?) }).await;
    eventually("the restart recorded on the new key", WAIT, || async {
        let status = accounts.get("robot").await.ok()?.status?;
        let current = status.current_key?;
        status.keys.iter().find(|k| k.id == current.id)?.restarted_at.clone()
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
async fn a_connection_whose_credential_is_refused_is_not_ready() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "refusedcred").await;
    let kubeconfig = serde_yaml::to_string(&cp.kubeconfig_for_token(cp.user_token(1).unwrap())).unwrap();
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "remote"}, "stringData": {"kubeconfig": kubeconfig}}))
            .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns.name).create(&PostParams::default(), &secret).await.unwrap();
    let _operator = Operator::start(cp, &ns.name, &[]);
    let connection = "apiVersion: keysmith.dev/v1alpha1\nkind: AppConnection\nmetadata: {name: remote}\nspec:\n  provider: {kubernetes: {kubeconfigSecretRef: {name: remote}}}\n  serviceAccountName: keysmith\n";
    apply_yaml(&client, &ns.name, &(credential_reader_identity("remote") + connection)).await;
    let api: Api<keysmith::api::AppConnection> = Api::namespaced(client.clone(), &ns.name);
    let ready = eventually("the connection to report its credential", WAIT, || async {
        let status = api.get("remote").await.ok()?.status?;
        status.common.conditions.into_iter().find(|c| c.type_ == "Ready")
    })
    .await;
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason, "Unauthorized", "{}", ready.message);
    assert!(!ready.message.contains(cp.user_token(1).unwrap()), "the credential never appears in status");
    ns.delete().await;
}

#[tokio::test]
async fn an_invalid_rotation_policy_is_reported_not_acted_on() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "badpolicy").await;
    let _operator = Operator::start(cp, &ns.name, &[]);
    // Passes the schema's shape check, but minute 61 does not exist.
    apply_yaml(
        &client,
        &ns.name,
        &account_yaml().replace("{rotateEvery: 24h, gracePeriod: 15s}", "{schedule: \"61 * * * *\"}"),
    )
    .await;
    let policies: Api<keysmith::api::KeyRotationPolicy> = Api::namespaced(client.clone(), &ns.name);
    let ready = eventually("the policy to report itself invalid", WAIT, || async {
        let status = policies.get("policy").await.ok()?.status?;
        status.common.conditions.into_iter().find(|c| c.type_ == "Ready" && c.status == "False")
    })
    .await;
    assert!(ready.message.contains("spec.schedule") && ready.message.contains("61"), "{}", ready.message);
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let key_ready = eventually("the account to say why it has no key", WAIT, || async {
        let status = accounts.get("robot").await.ok()?.status?;
        status.common.conditions.into_iter().find(|c| c.type_ == "KeyReady" && c.reason == "RotationPolicyInvalid")
    })
    .await;
    assert!(key_ready.message.contains("61"), "{}", key_ready.message);
    assert!(anchors(&client, &ns.name).await.is_empty(), "no key is issued under an invalid policy");
    // Fixing the policy lets the account converge.
    apply_yaml(
        &client,
        &ns.name,
        &account_yaml().replace("{rotateEvery: 24h, gracePeriod: 15s}", "{schedule: \"0 * * * *\"}"),
    )
    .await;
    ready_account(&client, &ns.name, "robot").await;
    ns.delete().await;
}

#[tokio::test]
async fn a_crash_between_publishing_and_recording_adopts_the_published_key() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "adopt").await;
    let mut crashing = Operator::start(cp, &ns.name, &[("KEYSMITH_FAILPOINT", "after-publish")]);
    apply_yaml(&client, &ns.name, &account_yaml()).await;
    apply_yaml(&client, &ns.name, &binding_yaml(&ns.name, &["view"])).await;
    assert_eq!(crashing.wait_exit(WAIT).await, Some(86), "the failpoint stops the operator");
    // The key is in the Secret, but status still calls it pending.
    let published = Api::<Secret>::namespaced(client.clone(), &ns.name).get("robot-key").await.unwrap();
    let key_id = published.annotations()["keysmith.dev/key-id"].clone();
    let token = secret_value(&client, &ns.name, "robot-key", "token").await.unwrap();
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let status = accounts.get("robot").await.unwrap().status.unwrap();
    assert_eq!(status.pending.as_ref().map(|p| p.token.as_str()), Some(key_id.as_str()));
    assert!(status.current_key.is_none());
    drop(crashing);

    let _operator = Operator::start(cp, &ns.name, &[]);
    let status = ready_account(&client, &ns.name, "robot").await.status.unwrap();
    assert!(status.pending.is_none());
    assert_eq!(status.current_key.unwrap().id, key_id, "the published key is adopted, not replaced");
    let live = anchors(&client, &ns.name).await;
    assert_eq!(live.len(), 1, "exactly one live key");
    assert_eq!(secret_value(&client, &ns.name, "robot-key", "token").await.unwrap(), token, "the Secret is unchanged");
    let robot = client_from_secret(&client, &ns.name, "robot-key").await;
    eventually("the adopted key to work", WAIT, || async {
        (list_configmaps(&robot, &ns.name).await == 200).then_some(())
    })
    .await;
    let events = Api::<Event>::namespaced(client.clone(), &ns.name).list(&ListParams::default()).await.unwrap();
    assert!(events.items.iter().any(|e| e.reason.as_deref() == Some("KeyAdopted")));
    ns.delete().await;
}
