//! The adversarial tenancy suite: an unprivileged namespace tenant tries,
//! through keysmith, every path to a right it could not grant itself.
//!
//! Everything here runs against a real kube-apiserver with RBAC, with the
//! operator authenticated as the chart's own ServiceAccount and ClusterRole
//! (deploy/keysmith.yaml, the chart rendered with its defaults), and every
//! keysmith object written by the tenant's own identity: a user who is
//! `admin` of its namespace (keysmith's kinds reach it through the chart's
//! aggregated roles), or, where said, a user who may only manage keysmith's
//! kinds and read Secrets there. Each attempt must end refused, with a
//! condition that says why, and nothing granted: the suite checks the
//! apiserver's own state (bindings, ServiceAccounts, tokens that work or do
//! not), never only keysmith's word. Each attempt is numbered; the numbers
//! are SECURITY.md's.

mod common;

use std::{path::PathBuf, time::Duration};

use common::{
    apply_yaml, control_plane, eventually, ready_account, secret_data, Operator, OperatorOptions, TestNamespace,
};
use k8s_openapi::{
    api::{
        authentication::v1::TokenRequest,
        authorization::v1::SelfSubjectAccessReview,
        core::v1::{ConfigMap, Secret, ServiceAccount},
        events::v1::Event,
        rbac::v1::{ClusterRoleBinding, Role, RoleBinding as RbacRoleBinding},
    },
    apimachinery::pkg::apis::meta::v1::Condition,
};
use keysmith::{api::IntegrationAccount, controlplane::ControlPlane};
use kube::{
    api::{ListParams, Patch, PatchParams, PostParams},
    Api, Client, ResourceExt,
};
use serde_json::json;
use tokio::sync::OnceCell;

const WAIT: Duration = Duration::from_secs(90);

/// The operator's RBAC exactly as the chart installs it by default, applied
/// once per control plane; returns a kubeconfig for its ServiceAccount.
async fn chart_identity(cp: &'static ControlPlane, client: &Client) -> &'static PathBuf {
    static KUBECONFIG: OnceCell<(PathBuf, tempfile::TempDir)> = OnceCell::const_new();
    let (path, _dir) = KUBECONFIG
        .get_or_init(|| async {
            let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/keysmith.yaml")).unwrap();
            for object in keysmith::manifest::parse(&text).unwrap() {
                let kind = object.types.as_ref().map(|t| t.kind.clone()).unwrap_or_default();
                if ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"].contains(&kind.as_str()) {
                    keysmith::manifest::apply(client, &object, "deploy/keysmith.yaml").await.unwrap();
                }
            }
            let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "keysmith-system");
            let request: TokenRequest = serde_json::from_value(json!({"spec": {"expirationSeconds": 7200}})).unwrap();
            let token = sas
                .create_token_request("keysmith", &PostParams::default(), &request)
                .await
                .unwrap()
                .status
                .unwrap()
                .token;
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("operator.kubeconfig");
            std::fs::write(&path, serde_yaml::to_string(&cp.kubeconfig_for_token(&token)).unwrap()).unwrap();
            (path, dir)
        })
        .await;
    path
}

/// `keysmith run` for `namespace`, as the chart's ServiceAccount.
async fn operator(cp: &'static ControlPlane, client: &Client, namespace: &str) -> Operator {
    let kubeconfig = chart_identity(cp, client).await;
    Operator::start_with(cp, namespace, &OperatorOptions { kubeconfig: Some(kubeconfig), ..OperatorOptions::default() })
}

/// Makes user `user-<n>` a tenant of `ns` with the built-in `admin` role
/// (keysmith's kinds included through aggregation); returns its client once
/// the aggregation shows.
async fn admin_tenant(cp: &ControlPlane, client: &Client, n: usize, ns: &str) -> Client {
    let user = json!({"kind": "User", "name": format!("user-{n}")});
    bind(client, ns, "tenant-admin", "ClusterRole", "admin", user.clone()).await;
    // Kubernetes' built-in admin role cannot mint ServiceAccount tokens; a
    // tenant needs that to hand it to the ServiceAccount its kubernetes
    // connection acts as (README: "Tenants").
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "tenant-tokens"},
        "rules": [{"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]}],
    }))
    .unwrap();
    Api::<Role>::namespaced(client.clone(), ns).create(&PostParams::default(), &role).await.unwrap();
    bind(client, ns, "tenant-tokens", "Role", "tenant-tokens", user).await;
    let tenant = cp.client_for_token(cp.user_token(n).unwrap()).await.unwrap();
    let accounts: Api<IntegrationAccount> = Api::namespaced(tenant.clone(), ns);
    eventually("keysmith's kinds to be aggregated into admin", WAIT, || async {
        accounts.list(&ListParams::default()).await.ok().map(|_| ())
    })
    .await;
    // The apiserver's RBAC cache has caught up with the tenant's roles.
    let review: SelfSubjectAccessReview = serde_json::from_value(json!({"spec": {"resourceAttributes": {
        "namespace": ns, "verb": "create", "resource": "serviceaccounts", "subresource": "token"}}}))
    .unwrap();
    eventually("the tenant's rights to take effect", WAIT, || async {
        let answer = Api::<SelfSubjectAccessReview>::all(tenant.clone()).create(&PostParams::default(), &review).await;
        answer.ok()?.status?.allowed.then_some(())
    })
    .await;
    tenant
}

/// An RBAC RoleBinding in `ns`, made by the cluster admin.
async fn bind(client: &Client, ns: &str, name: &str, kind: &str, role: &str, subject: serde_json::Value) {
    let binding: RbacRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
        "subjects": [subject],
    }))
    .unwrap();
    Api::<RbacRoleBinding>::namespaced(client.clone(), ns).create(&PostParams::default(), &binding).await.unwrap();
}

/// A condition of a keysmith object, as the tenant reads it.
async fn condition_of(client: &Client, ns: &str, kind: &str, name: &str, type_: &str) -> Option<Condition> {
    let api = dynamic(client, ns, kind);
    let object = api.get(name).await.ok()?;
    let conditions: Vec<Condition> =
        serde_json::from_value(object.data.get("status")?.get("conditions")?.clone()).ok()?;
    conditions.into_iter().find(|c| c.type_ == type_)
}

fn dynamic(client: &Client, ns: &str, kind: &str) -> Api<kube::api::DynamicObject> {
    let plural = match kind {
        "IntegrationAccount" => "integrationaccounts",
        "RoleBinding" => "rolebindings",
        "AppConnection" => "appconnections",
        "KeyRotationPolicy" => "keyrotationpolicies",
        other => panic!("{other}"),
    };
    let resource = kube::discovery::ApiResource {
        group: "keysmith.dev".into(),
        version: "v1alpha1".into(),
        api_version: "keysmith.dev/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    Api::namespaced_with(client.clone(), ns, &resource)
}

/// Waits until a condition of `kind/name` has `status` and a reason in
/// `reasons`; returns it.
async fn settles(
    client: &Client,
    ns: &str,
    kind: &str,
    name: &str,
    type_: &str,
    status: &str,
    reasons: &[&str],
) -> Condition {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let seen = condition_of(client, ns, kind, name, type_).await;
        if let Some(c) = seen.as_ref().filter(|c| c.status == status && reasons.contains(&c.reason.as_str())) {
            return c.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{kind} {ns}/{name}: waited for {type_}={status} ({reasons:?}), last saw {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every ClusterRoleBinding and RoleBinding anywhere that names ServiceAccount `ns/name`.
async fn bindings_naming(client: &Client, ns: &str, name: &str) -> Vec<String> {
    let names = |subjects: Option<&Vec<k8s_openapi::api::rbac::v1::Subject>>, own: Option<&str>| {
        subjects
            .into_iter()
            .flatten()
            .any(|s| s.kind == "ServiceAccount" && s.name == name && s.namespace.as_deref().or(own) == Some(ns))
    };
    let mut found = Vec::new();
    for b in Api::<ClusterRoleBinding>::all(client.clone()).list(&ListParams::default()).await.unwrap() {
        if names(b.subjects.as_ref(), None) {
            found.push(format!("ClusterRoleBinding {} -> {}", b.name_any(), b.role_ref.name));
        }
    }
    for b in Api::<RbacRoleBinding>::all(client.clone()).list(&ListParams::default()).await.unwrap() {
        if names(b.subjects.as_ref(), b.metadata.namespace.as_deref()) {
            found.push(format!("RoleBinding {}/{} -> {}", b.namespace().unwrap(), b.name_any(), b.role_ref.name));
        }
    }
    found.sort();
    found
}

/// The events about `name` in `ns`, as (reason, note).
async fn events_about(client: &Client, ns: &str, name: &str) -> Vec<(String, String)> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

/// What one attempt ended in, for the table the suite prints.
struct Outcome {
    attempt: &'static str,
    refused_by: String,
}

fn report(outcomes: &[Outcome]) {
    println!("\nattempt | refused by");
    for o in outcomes {
        println!("{} | {}", o.attempt, o.refused_by);
    }
}

/// The ServiceAccount a tenant's own connection acts as, made by the tenant
/// itself with all the tenant holds: `admin` of its namespace and token
/// minting there.
const TENANT_CONNECTION_IDENTITY: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: keysmith}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: keysmith-connection}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: admin}
subjects: [{kind: ServiceAccount, name: keysmith}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: keysmith-connection-tokens}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: tenant-tokens}
subjects: [{kind: ServiceAccount, name: keysmith}]
"#;

fn account(name: &str, connection: &str, extra: &str) -> String {
    format!(
        "apiVersion: keysmith.dev/v1alpha1\nkind: IntegrationAccount\nmetadata: {{name: {name}}}\nspec:\n  connectionRef: {connection}\n  secret: {{name: {name}-key}}\n{extra}"
    )
}

fn binding(name: &str, account: &str, roles: &str, scope: &str) -> String {
    format!(
        "apiVersion: keysmith.dev/v1alpha1\nkind: RoleBinding\nmetadata: {{name: {name}}}\nspec:\n  accountRef: {{name: {account}}}\n  roles: {roles}\n  scope: \"{scope}\"\n"
    )
}

/// A tenant's own AppConnection acts as a ServiceAccount the tenant made,
/// and the tenant sets its policy as it likes (cluster scope allowed, every
/// scope allowed): the apiserver's RBAC, not keysmith, refuses everything
/// beyond that ServiceAccount's own rights.
#[tokio::test]
async fn a_tenants_own_connection_can_do_nothing_its_service_account_may_not() {
    let cp = control_plane().await;
    let admin = cp.client().await.unwrap();
    let ns = TestNamespace::create(&admin, "tenant-own").await;
    let victim = TestNamespace::create(&admin, "tenant-victim").await;
    let n = ns.name.as_str();
    let _operator = operator(cp, &admin, n).await;
    let tenant = admin_tenant(cp, &admin, 1, n).await;
    let mut outcomes = Vec::new();

    // The tenant writes everything itself.
    let connection = r#"
apiVersion: keysmith.dev/v1alpha1
kind: AppConnection
metadata: {name: mine}
spec:
  provider: {kubernetes: {allowClusterScope: true}}
  serviceAccountName: keysmith
  policy: {allowedScopes: ["*"]}
"#;
    apply_yaml(&tenant, n, &(TENANT_CONNECTION_IDENTITY.to_owned() + "---" + connection)).await;
    settles(&tenant, n, "AppConnection", "mine", "Ready", "True", &["Verified"]).await;
    let mine = "{name: mine}";
    apply_yaml(&tenant, n, &account("robot", mine, "")).await;
    ready_account(&tenant, n, "robot").await;

    // 1-6: roles beyond the ServiceAccount's own rights, one RoleBinding each.
    let attempts: [(&'static str, &str, &str); 6] = [
        ("1 cluster-admin cluster-wide (scope *)", "[cluster-admin]", "*"),
        ("2 view cluster-wide (scope *)", "[view]", "*"),
        ("3 admin in kube-system", "[admin]", "kube-system"),
        ("4 view in another tenant's namespace", "[view]", &victim.name),
        ("5 cluster-admin in its own namespace (RBAC escalation check)", "[cluster-admin]", n),
        (
            "6 a role holding escalate on ClusterRoles, in its own namespace",
            "[\"system:controller:clusterrole-aggregation-controller\"]",
            n,
        ),
    ];
    for (i, (attempt, roles, scope)) in attempts.iter().enumerate() {
        let name = format!("try-{}", i + 1);
        apply_yaml(&tenant, n, &binding(&name, "robot", roles, scope)).await;
        let refused = eventually(&format!("{attempt}: refused"), WAIT, || async {
            let c = condition_of(&tenant, n, "IntegrationAccount", "robot", "RolesSynced").await?;
            let role = roles.trim_matches(|c| c == '[' || c == ']' || c == '"');
            let grant = format!("{role} on {scope}");
            (c.status == "False" && c.reason == "RoleNotGranted" && c.message.starts_with(&grant)).then_some(c)
        })
        .await;
        assert!(refused.message.contains("forbidden"), "{attempt}: the apiserver refused: {}", refused.message);
        assert!(
            refused.message.contains(&format!("system:serviceaccount:{n}:keysmith")),
            "{attempt}: the refusal names the ServiceAccount: {}",
            refused.message
        );
        // Nothing names the account's ServiceAccount but its own view... of nothing.
        assert_eq!(bindings_naming(&admin, n, "robot").await, Vec::<String>::new(), "{attempt}");
        outcomes.push(Outcome { attempt, refused_by: format!("apiserver RBAC: {}", refused.message) });
        dynamic(&tenant, n, "RoleBinding").delete(&name, &Default::default()).await.unwrap();
    }
    let events = events_about(&admin, n, "robot").await;
    assert!(events.iter().any(|(reason, _)| reason == "RoleNotGranted"), "a Warning event says so: {events:?}");

    // The key still works, with nothing more than a ServiceAccount with no role.
    let token = secret_data(&tenant, n, "robot-key").await.unwrap()["token"].clone();
    let robot = cp.client_for_token(&token).await.unwrap();
    assert!(Api::<ConfigMap>::namespaced(robot, n).list(&ListParams::default()).await.is_err());

    // 7: the account's ServiceAccount in kube-system.
    apply_yaml(&tenant, n, &account("elsewhere", mine, "  providerOptions: {namespace: kube-system}\n")).await;
    let refused =
        settles(&tenant, n, "IntegrationAccount", "elsewhere", "AccountReady", "False", &["Unauthorized"]).await;
    assert!(refused.message.contains("kube-system") && refused.message.contains("forbidden"), "{}", refused.message);
    assert!(Api::<ServiceAccount>::namespaced(admin.clone(), "kube-system")
        .get_opt("elsewhere")
        .await
        .unwrap()
        .is_none());
    outcomes.push(Outcome { attempt: "7 the account's ServiceAccount in kube-system", refused_by: refused.message });

    // 8: adopting a ServiceAccount of its namespace that someone else made
    // (a CI robot the cluster admin bound to cluster-admin).
    let ci: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "ci-robot"}})).unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), n).create(&PostParams::default(), &ci).await.unwrap();
    let crb: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{n}-ci-robot")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "ci-robot", "namespace": n}],
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(admin.clone()).create(&PostParams::default(), &crb).await.unwrap();
    apply_yaml(&tenant, n, &account("squat", mine, "  providerOptions: {name: ci-robot}\n")).await;
    let refused =
        settles(&tenant, n, "IntegrationAccount", "squat", "AccountReady", "False", &["AccountConflict"]).await;
    assert!(secret_data(&admin, n, "squat-key").await.is_none(), "no token for someone else's ServiceAccount");
    outcomes
        .push(Outcome { attempt: "8 adopt a powerful ServiceAccount of its namespace", refused_by: refused.message });

    // 9: renaming its account onto that ServiceAccount after the fact.
    let patch = json!({"spec": {"providerOptions": {"name": "ci-robot"}}});
    dynamic(&tenant, n, "IntegrationAccount")
        .patch("robot", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let refused =
        settles(&tenant, n, "IntegrationAccount", "robot", "AccountReady", "False", &["AccountNameChanged"]).await;
    assert!(secret_data(&admin, n, "robot-key").await.unwrap()["token"] == token, "the key is kept, not replaced");
    outcomes.push(Outcome { attempt: "9 rename its account onto another ServiceAccount", refused_by: refused.message });

    // 10: the output Secret pointed at a Secret keysmith did not make.
    let theirs: Secret =
        serde_json::from_value(json!({"metadata": {"name": "database"}, "stringData": {"password": "theirs"}}))
            .unwrap();
    Api::<Secret>::namespaced(admin.clone(), n).create(&PostParams::default(), &theirs).await.unwrap();
    apply_yaml(
        &tenant,
        n,
        &account("overwrite", mine, "").replace("secret: {name: overwrite-key}", "secret: {name: database}"),
    )
    .await;
    let refused =
        settles(&tenant, n, "IntegrationAccount", "overwrite", "KeyReady", "False", &["SecretNotOwned"]).await;
    assert_eq!(secret_data(&admin, n, "database").await.unwrap()["password"], "theirs");
    outcomes.push(Outcome { attempt: "10 output Secret onto a foreign Secret", refused_by: refused.message });

    // 11: the output Secret pointed at another account's output Secret.
    apply_yaml(
        &tenant,
        n,
        &account("thief", mine, "").replace("secret: {name: thief-key}", "secret: {name: robot-key}"),
    )
    .await;
    let refused = settles(&tenant, n, "IntegrationAccount", "thief", "KeyReady", "False", &["SecretNotOwned"]).await;
    assert_eq!(secret_data(&admin, n, "robot-key").await.unwrap()["token"], token);
    outcomes.push(Outcome { attempt: "11 output Secret onto another account's Secret", refused_by: refused.message });

    report(&outcomes);
    let leaked: Vec<String> = events_about(&admin, n, "robot").await.into_iter().map(|e| e.1).collect();
    assert!(leaked.iter().all(|note| !note.contains(&token)), "no event carries the key");
    victim.delete().await;
    ns.delete().await;
}
