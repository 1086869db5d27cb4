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
#[path = "common/pg_server.rs"]
mod pg_server;

use std::{path::PathBuf, time::Duration};

use common::{
    apply_yaml, control_plane, eventually, ready_account, secret_data, Operator, OperatorOptions, TestNamespace,
};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        authentication::v1::TokenRequest,
        authorization::v1::SelfSubjectAccessReview,
        core::v1::{ConfigMap, Namespace, Secret, ServiceAccount},
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
use pg_server::{PgServer, ADMIN, ADMIN_PASSWORD};
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

    // 33: forged ownership: a binding the tenant labels as the account's own
    // (its uid) gives the account nothing and is not counted as its role.
    let uid = dynamic(&tenant, n, "IntegrationAccount").get("robot").await.unwrap().uid().unwrap();
    let forged: RbacRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "forged", "labels": {"app.kubernetes.io/managed-by": "keysmith", "keysmith.dev/account-uid": uid}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"kind": "User", "name": "user-1"}],
    }))
    .unwrap();
    Api::<RbacRoleBinding>::namespaced(tenant.clone(), n).create(&PostParams::default(), &forged).await.unwrap();
    let patch = json!({"spec": {"providerOptions": null, "description": "after the forgery"}});
    dynamic(&tenant, n, "IntegrationAccount")
        .patch("robot", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let robot = ready_account(&tenant, n, "robot").await;
    let roles = robot.status.unwrap().roles;
    assert!(roles.is_empty(), "a forged label makes no role the account's: {roles:?}");
    assert_eq!(bindings_naming(&admin, n, "robot").await, Vec::<String>::new());
    outcomes.push(Outcome {
        attempt: "33 forge keysmith's ownership label on a binding",
        refused_by: "roles are read from subjects only: the account holds none".to_owned(),
    });

    // 34-35: a kubeconfig that makes keysmith read one of its own files (its
    // ServiceAccount token, say) or run a command, sent to a server of the
    // tenant's own.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let server = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let marker = tempfile::tempdir().unwrap();
    let ran = marker.path().join("ran");
    let users = [
        ("34 a kubeconfig whose token is a file of keysmith's", "tokenfile", format!("tokenFile: {}", chart_identity(cp, &admin).await.display()), "tokenFile"),
        ("35 a kubeconfig that runs a command", "exec", format!("exec: {{apiVersion: client.authentication.k8s.io/v1beta1, command: /bin/sh, args: [-c, \"touch {}\"]}}", ran.display()), "exec"),
    ];
    for (attempt, name, user, what) in users {
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"{server}\", insecure-skip-tls-verify: true}}}}]\nusers: [{{name: u, user: {{{user}}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
        );
        let secret: Secret =
            serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {"kubeconfig": kubeconfig}}))
                .unwrap();
        Api::<Secret>::namespaced(tenant.clone(), n).create(&PostParams::default(), &secret).await.unwrap();
        let connection = format!(
            "apiVersion: keysmith.dev/v1alpha1\nkind: AppConnection\nmetadata: {{name: {name}}}\nspec:\n  provider: {{kubernetes: {{kubeconfigSecretRef: {{name: {name}}}}}}}\n  serviceAccountName: keysmith\n"
        );
        apply_yaml(&tenant, n, &connection).await;
        let refused = settles(&tenant, n, "AppConnection", name, "Ready", "False", &["Invalid"]).await;
        assert!(refused.message.contains(what), "{attempt}: {}", refused.message);
        outcomes.push(Outcome { attempt, refused_by: refused.message });
    }
    assert!(listener.accept().is_err(), "nothing ever connected to the tenant's server");
    assert!(!ran.exists(), "no command ran");

    report(&outcomes);
    let leaked: Vec<String> = events_about(&admin, n, "robot").await.into_iter().map(|e| e.1).collect();
    assert!(leaked.iter().all(|note| !note.contains(&token)), "no event carries the key");
    victim.delete().await;
    ns.delete().await;
}

/// A ClusterAppConnection acts with keysmith's own rights, so its policy is
/// all that stands between a tenant and those rights: the scopes, roles,
/// namespaces and names it allows, and nothing a tenant can edit.
#[tokio::test]
async fn a_cluster_connection_reaches_only_what_its_policy_allows() {
    let cp = control_plane().await;
    let admin = cp.client().await.unwrap();
    let ns = TestNamespace::create(&admin, "tenant-shared").await;
    let victim = TestNamespace::create(&admin, "tenant-victim").await;
    let n = ns.name.as_str();
    let _operator = operator(cp, &admin, n).await;
    let tenant = admin_tenant(cp, &admin, 2, n).await;
    let mut outcomes = Vec::new();

    // The cluster admin's connections: one admitting the tenant and allowing
    // view, one admitting it and allowing nothing, one not admitting it.
    let label = format!("keysmith-tenancy-{n}");
    let patch = json!({"metadata": {"labels": {label.clone(): "yes"}}});
    Api::<Namespace>::all(admin.clone()).patch(n, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let connections = format!(
        r#"
apiVersion: keysmith.dev/v1alpha1
kind: ClusterAppConnection
metadata: {{name: shared-{n}}}
spec:
  provider: {{kubernetes: {{allowClusterScope: true}}}}
  namespaceSelector: {{matchLabels: {{{label}: "yes"}}}}
  policy: {{allowedRoles: ["view"]}}
---
apiVersion: keysmith.dev/v1alpha1
kind: ClusterAppConnection
metadata: {{name: silent-{n}}}
spec:
  provider: {{kubernetes: {{}}}}
  namespaceSelector: {{matchLabels: {{{label}: "yes"}}}}
---
apiVersion: keysmith.dev/v1alpha1
kind: ClusterAppConnection
metadata: {{name: closed-{n}}}
spec:
  provider: {{kubernetes: {{}}}}
  namespaceSelector: {{matchLabels: {{{label}: "no"}}}}
  policy: {{allowedRoles: ["*"]}}
"#
    );
    for object in keysmith::manifest::parse(&connections).unwrap() {
        keysmith::manifest::apply(&admin, &object, "test").await.unwrap();
    }
    let shared = format!("{{kind: ClusterAppConnection, name: shared-{n}}}");

    // What the connection allows works: view, in the account's own namespace.
    apply_yaml(&tenant, n, &account("robot", &shared, "")).await;
    apply_yaml(&tenant, n, &binding("robot-view", "robot", "[view]", "")).await;
    let robot = ready_account(&tenant, n, "robot").await;
    assert_eq!(bindings_naming(&admin, n, "robot").await.len(), 1, "view in its namespace, nothing else");
    let token = secret_data(&tenant, n, "robot-key").await.unwrap()["token"].clone();
    let as_robot = cp.client_for_token(&token).await.unwrap();
    eventually("view to take effect", WAIT, || async {
        Api::<ConfigMap>::namespaced(as_robot.clone(), n).list(&ListParams::default()).await.ok().map(|_| ())
    })
    .await;

    // 12-14: scopes and roles the policy does not allow.
    let attempts: [(&'static str, &str, &str, &str); 3] = [
        ("12 view in kube-system through a cluster connection", "[view]", "kube-system", "kube-system"),
        ("13 view cluster-wide (scope *) through a cluster connection", "[view]", "*", "cluster-wide"),
        ("14 edit, which allowedRoles does not name", "[edit]", "", "not in allowedRoles"),
    ];
    for (i, (attempt, roles, scope, says)) in attempts.iter().enumerate() {
        let name = format!("try-{}", i + 12);
        apply_yaml(&tenant, n, &binding(&name, "robot", roles, scope)).await;
        let violation = settles(&tenant, n, "RoleBinding", &name, "PolicyViolation", "True", &["RoleDenied"]).await;
        assert!(violation.message.contains(says), "{attempt}: {}", violation.message);
        outcomes.push(Outcome { attempt, refused_by: format!("connection policy: {}", violation.message) });
    }
    let events = events_about(&admin, n, "try-12").await;
    assert!(events.iter().any(|(reason, _)| reason == "PolicyViolation"), "{events:?}");
    assert_eq!(bindings_naming(&admin, n, "robot").await.len(), 1, "still view in its namespace only");
    assert_eq!(bindings_naming(&admin, "kube-system", "robot").await, Vec::<String>::new());

    // 15: a cluster connection that names no allowedRoles grants nothing.
    let silent = format!("{{kind: ClusterAppConnection, name: silent-{n}}}");
    apply_yaml(&tenant, n, &account("quiet", &silent, "")).await;
    apply_yaml(&tenant, n, &binding("quiet-view", "quiet", "[view]", "")).await;
    let violation = settles(&tenant, n, "RoleBinding", "quiet-view", "PolicyViolation", "True", &["RoleDenied"]).await;
    assert!(violation.message.contains("grants no role until"), "{}", violation.message);
    ready_account(&tenant, n, "quiet").await;
    assert_eq!(bindings_naming(&admin, n, "quiet").await, Vec::<String>::new());
    outcomes.push(Outcome {
        attempt: "15 any role through a connection with no allowedRoles",
        refused_by: violation.message,
    });

    // 16: the account's ServiceAccount in another tenant's namespace.
    apply_yaml(
        &tenant,
        n,
        &account("visitor", &shared, &format!("  providerOptions: {{namespace: {}}}\n", victim.name)),
    )
    .await;
    let refused =
        settles(&tenant, n, "IntegrationAccount", "visitor", "AccountReady", "False", &["NamespaceNotAllowed"]).await;
    assert!(Api::<ServiceAccount>::namespaced(admin.clone(), &victim.name).get_opt("visitor").await.unwrap().is_none());
    outcomes
        .push(Outcome { attempt: "16 the account's ServiceAccount in another namespace", refused_by: refused.message });

    // 17: a connection whose namespaceSelector does not admit the namespace.
    let closed = format!("{{kind: ClusterAppConnection, name: closed-{n}}}");
    apply_yaml(&tenant, n, &account("outsider", &closed, "")).await;
    let refused =
        settles(&tenant, n, "IntegrationAccount", "outsider", "AccountReady", "False", &["ConnectionNotAdmitted"])
            .await;
    assert!(Api::<ServiceAccount>::namespaced(admin.clone(), n).get_opt("outsider").await.unwrap().is_none());
    outcomes.push(Outcome {
        attempt: "17 a cluster connection that does not admit the namespace",
        refused_by: refused.message,
    });

    // 18-21: what the tenant would have to change itself; the apiserver refuses.
    let forbidden = |result: Result<(), kube::Error>| match result {
        Err(kube::Error::Api(status)) if status.code == 403 => status.message,
        other => panic!("expected 403 Forbidden, got {other:?}"),
    };
    let relabel = json!({"metadata": {"labels": {label.clone(): "no"}}});
    let message = forbidden(
        Api::<Namespace>::all(tenant.clone())
            .patch(n, &PatchParams::default(), &Patch::Merge(&relabel))
            .await
            .map(|_| ()),
    );
    outcomes.push(Outcome { attempt: "18 relabel its namespace to be admitted elsewhere", refused_by: message });
    let own: keysmith::api::ClusterAppConnection = serde_json::from_value(json!({
        "metadata": {"name": format!("mine-{n}")},
        "spec": {"provider": {"kubernetes": {"allowClusterScope": true}}, "namespaceSelector": {},
                 "policy": {"allowedRoles": ["*"], "allowedScopes": ["*"]}},
    }))
    .unwrap();
    let message = forbidden(
        Api::<keysmith::api::ClusterAppConnection>::all(tenant.clone())
            .create(&PostParams::default(), &own)
            .await
            .map(|_| ()),
    );
    outcomes.push(Outcome { attempt: "19 create its own ClusterAppConnection", refused_by: message });
    let widen = json!({"spec": {"policy": {"allowedRoles": ["*"], "allowedScopes": ["*"]}}});
    let message = forbidden(
        Api::<keysmith::api::ClusterAppConnection>::all(tenant.clone())
            .patch(&format!("shared-{n}"), &PatchParams::default(), &Patch::Merge(&widen))
            .await
            .map(|_| ()),
    );
    outcomes.push(Outcome { attempt: "20 widen the cluster connection's policy", refused_by: message });
    let redirect = json!({"status": {"account": {"provider": "kubernetes", "id": "x", "accountName": "ci-robot"}}});
    let message = forbidden(
        Api::<IntegrationAccount>::namespaced(tenant.clone(), n)
            .patch_status("robot", &PatchParams::default(), &Patch::Merge(&redirect))
            .await
            .map(|_| ()),
    );
    outcomes.push(Outcome {
        attempt: "21 rewrite its account's status (where keysmith keeps the name)",
        refused_by: message,
    });

    assert_eq!(
        robot.status.and_then(|s| s.account).and_then(|a| a.account_name).as_deref(),
        Some("robot"),
        "the name the account was created under is recorded"
    );
    report(&outcomes);
    for name in ["shared", "silent", "closed"] {
        let _ = Api::<keysmith::api::ClusterAppConnection>::all(admin.clone())
            .delete(&format!("{name}-{n}"), &Default::default())
            .await;
    }
    victim.delete().await;
    ns.delete().await;
}

/// A tenant who may only manage keysmith's kinds in its namespace (no
/// Secrets, no RBAC) cannot borrow a more powerful ServiceAccount, another
/// namespace's objects, or a Secret it may not read.
#[tokio::test]
async fn a_tenant_cannot_borrow_identities_or_secrets_through_keysmith() {
    let cp = control_plane().await;
    let admin = cp.client().await.unwrap();
    let ns = TestNamespace::create(&admin, "tenant-narrow").await;
    let victim = TestNamespace::create(&admin, "tenant-victim").await;
    let n = ns.name.as_str();
    let _operator = operator(cp, &admin, n).await;
    bind(&admin, n, "tenant-keysmith", "ClusterRole", "keysmith-edit", json!({"kind": "User", "name": "user-3"})).await;
    let tenant = cp.client_for_token(cp.user_token(3).unwrap()).await.unwrap();
    eventually("the tenant's rights to take effect", WAIT, || async {
        Api::<IntegrationAccount>::namespaced(tenant.clone(), n).list(&ListParams::default()).await.ok().map(|_| ())
    })
    .await;
    let mut outcomes = Vec::new();

    // What the cluster admin set up in the namespace: the ServiceAccount
    // connections act as, with what a kubernetes connection needs and one
    // credential to read; a CI robot bound to cluster-admin; a Secret the
    // tenant may not read.
    let setup = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: keysmith}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: keysmith-connection}
rules:
  # What a kubernetes connection needs (examples/quickstart): never reading Secrets...
  - {apiGroups: [""], resources: ["serviceaccounts"], verbs: ["get", "create", "patch", "delete"]}
  - {apiGroups: [""], resources: ["serviceaccounts/token"], verbs: ["create"]}
  - {apiGroups: [""], resources: ["secrets"], verbs: ["create", "delete"]}
  - {apiGroups: ["rbac.authorization.k8s.io"], resources: ["rolebindings"], verbs: ["get", "list", "create", "patch", "delete"]}
  - {apiGroups: ["rbac.authorization.k8s.io"], resources: ["clusterroles"], resourceNames: ["view"], verbs: ["bind"]}
  # ...and what a SCIM connection needs: exactly its credential.
  - {apiGroups: [""], resources: ["secrets"], resourceNames: ["crm-token"], verbs: ["get"]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: keysmith-connection}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: keysmith-connection}
subjects: [{kind: ServiceAccount, name: keysmith}]
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: ci-robot}
---
apiVersion: v1
kind: Secret
metadata: {name: db-password}
stringData: {token: crown-jewels}
---
apiVersion: v1
kind: Secret
metadata: {name: crm-token}
stringData: {token: crm}
"#;
    apply_yaml(&admin, n, setup).await;
    let crb: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{n}-ci-robot")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "ci-robot", "namespace": n}],
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(admin.clone()).create(&PostParams::default(), &crb).await.unwrap();
    assert!(
        Api::<Secret>::namespaced(tenant.clone(), n).get("db-password").await.is_err(),
        "the tenant may not read it"
    );

    // 22: a kubernetes connection naming no ServiceAccount does nothing.
    let connection = |name: &str, extra: &str| {
        format!(
            "apiVersion: keysmith.dev/v1alpha1\nkind: AppConnection\nmetadata: {{name: {name}}}\nspec:\n  provider: {{kubernetes: {{allowClusterScope: true}}}}\n  policy: {{allowedScopes: [\"*\"]}}\n{extra}"
        )
    };
    apply_yaml(&tenant, n, &connection("anonymous", "")).await;
    apply_yaml(&tenant, n, &account("nobody", "{name: anonymous}", "")).await;
    let refused =
        settles(&tenant, n, "AppConnection", "anonymous", "Ready", "False", &["ServiceAccountRequired"]).await;
    settles(&tenant, n, "IntegrationAccount", "nobody", "AccountReady", "False", &["ServiceAccountRequired"]).await;
    assert!(Api::<ServiceAccount>::namespaced(admin.clone(), n).get_opt("nobody").await.unwrap().is_none());
    outcomes.push(Outcome {
        attempt: "22 a connection that names no ServiceAccount (keysmith's own rights)",
        refused_by: refused.message,
    });

    // 23: borrowing the cluster-admin robot of its namespace.
    apply_yaml(&tenant, n, &connection("borrowed", "  serviceAccountName: ci-robot\n")).await;
    apply_yaml(&tenant, n, &account("thief", "{name: borrowed}", "")).await;
    apply_yaml(&tenant, n, &binding("thief-admin", "thief", "[cluster-admin]", "*")).await;
    let refused = settles(&tenant, n, "AppConnection", "borrowed", "Ready", "False", &["Unauthorized"]).await;
    assert!(refused.message.contains("impersonate"), "{}", refused.message);
    settles(&tenant, n, "IntegrationAccount", "thief", "AccountReady", "False", &["Unauthorized"]).await;
    assert!(Api::<ServiceAccount>::namespaced(admin.clone(), n).get_opt("thief").await.unwrap().is_none());
    assert_eq!(bindings_naming(&admin, n, "thief").await, Vec::<String>::new());
    outcomes.push(Outcome {
        attempt: "23 act as a cluster-admin ServiceAccount of its namespace",
        refused_by: refused.message,
    });

    // 24: a ServiceAccount of another namespace, written into the name.
    let sneaky = connection("sneaky", "  serviceAccountName: \"system:serviceaccount:kube-system:default\"\n");
    let object = keysmith::manifest::parse(&sneaky).unwrap().remove(0);
    let mut object = object;
    object.metadata.namespace = Some(n.to_owned());
    let refused = keysmith::manifest::apply(&tenant, &object, "test").await.expect_err("the apiserver refuses it");
    assert!(refused.to_string().contains("serviceAccountName"), "{refused}");
    outcomes
        .push(Outcome { attempt: "24 a ServiceAccount of another namespace by name", refused_by: refused.to_string() });

    // 25: exfiltrating a Secret it may not read, as a SCIM token sent to a
    // server of its own.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let exfil = format!(
        "apiVersion: keysmith.dev/v1alpha1\nkind: AppConnection\nmetadata: {{name: exfil}}\nspec:\n  provider: {{scim: {{baseUrl: \"http://127.0.0.1:{port}/scim/v2\", tokenSecretRef: {{name: db-password}}}}}}\n  serviceAccountName: keysmith\n"
    );
    apply_yaml(&tenant, n, &exfil).await;
    apply_yaml(&tenant, n, &account("leak", "{name: exfil}", "")).await;
    let refused = settles(&tenant, n, "AppConnection", "exfil", "Ready", "False", &["Unauthorized"]).await;
    assert!(refused.message.contains("db-password") && refused.message.contains("forbidden"), "{}", refused.message);
    settles(&tenant, n, "IntegrationAccount", "leak", "AccountReady", "False", &["Unauthorized"]).await;
    assert!(listener.accept().is_err(), "nothing ever connected to the tenant's server");
    outcomes.push(Outcome {
        attempt: "25 send a Secret it may not read to a server of its own",
        refused_by: refused.message,
    });

    // 26: a credential Secret in another namespace.
    let remote = "apiVersion: keysmith.dev/v1alpha1\nkind: AppConnection\nmetadata: {name: remote}\nspec:\n  provider: {kubernetes: {kubeconfigSecretRef: {name: admin-kubeconfig, namespace: kube-system}}}\n  serviceAccountName: keysmith\n";
    apply_yaml(&tenant, n, remote).await;
    let refused = settles(&tenant, n, "AppConnection", "remote", "Ready", "False", &["Invalid"]).await;
    assert!(refused.message.contains("own namespace"), "{}", refused.message);
    outcomes.push(Outcome { attempt: "26 a credential Secret in another namespace", refused_by: refused.message });

    // 27-29: references that would reach another namespace's objects: the
    // schema has no namespace for them.
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "payments"},
        "spec": {"selector": {"matchLabels": {"app": "p"}},
                 "template": {"metadata": {"labels": {"app": "p"}},
                              "spec": {"containers": [{"name": "p", "image": "example.invalid/p"}]}}}
    }))
    .unwrap();
    Api::<Deployment>::namespaced(admin.clone(), &victim.name)
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let cross = [
        ("27 a RoleBinding for another namespace's account", format!(
            "apiVersion: keysmith.dev/v1alpha1\nkind: RoleBinding\nmetadata: {{name: cross}}\nspec:\n  accountRef: {{name: robot, namespace: {v}}}\n  roles: [view]\n", v = victim.name)),
        ("28 restart another namespace's Deployment", format!(
            "apiVersion: keysmith.dev/v1alpha1\nkind: KeyRotationPolicy\nmetadata: {{name: cross}}\nspec:\n  rotateEvery: 1h\n  restartTargets: [{{kind: Deployment, name: payments, namespace: {v}}}]\n", v = victim.name)),
        ("29 another namespace's rotation policy", format!(
            "apiVersion: keysmith.dev/v1alpha1\nkind: IntegrationAccount\nmetadata: {{name: cross}}\nspec:\n  connectionRef: {{name: anonymous}}\n  secret: {{name: cross-key}}\n  rotationPolicyRef: {{name: daily, namespace: {v}}}\n", v = victim.name)),
    ];
    for (attempt, yaml) in cross {
        let mut object = keysmith::manifest::parse(&yaml).unwrap().remove(0);
        object.metadata.namespace = Some(n.to_owned());
        // Server-side apply (kubectl apply --server-side, Argo CD, keysmith
        // itself) is refused outright: the field does not exist.
        let refused_by = match keysmith::manifest::apply(&tenant, &object, "test").await {
            Err(error) if error.to_string().contains("field not declared in schema") => {
                "apiserver schema: field not declared (apply); pruned (create)".to_owned()
            }
            other => panic!("{attempt}: server-side apply of a cross-namespace reference: {other:?}"),
        };
        // A plain create is stored without it (the apiserver prunes unknown fields).
        let kind = object.types.as_ref().unwrap().kind.clone();
        let api = dynamic(&tenant, n, &kind);
        api.create(&PostParams::default(), &object).await.unwrap_or_else(|e| panic!("{attempt}: create: {e}"));
        let stored = api.get(object.metadata.name.as_deref().unwrap()).await.unwrap();
        assert!(!serde_json::to_string(&stored.data).unwrap().contains(&victim.name), "{attempt}: stored");
        outcomes.push(Outcome { attempt, refused_by });
    }
    let payments = Api::<Deployment>::namespaced(admin.clone(), &victim.name).get("payments").await.unwrap();
    assert!(payments.spec.unwrap().template.metadata.unwrap().annotations.is_none(), "never restarted");

    // 36: rolling a workload of its own namespace that it may not touch,
    // through a rotation policy's restartTargets: keysmith restarts as the
    // connection's ServiceAccount, which may not either.
    Api::<Deployment>::namespaced(admin.clone(), n).create(&PostParams::default(), &deployment).await.unwrap();
    let rolling = "apiVersion: keysmith.dev/v1alpha1\nkind: AppConnection\nmetadata: {name: local}\nspec:\n  provider: {kubernetes: {}}\n  serviceAccountName: keysmith\n---\napiVersion: keysmith.dev/v1alpha1\nkind: KeyRotationPolicy\nmetadata: {name: roll}\nspec:\n  rotateEvery: 24h\n  restartTargets: [{kind: Deployment, name: payments}]\n";
    apply_yaml(&tenant, n, rolling).await;
    apply_yaml(&tenant, n, &account("roller", "{name: local}", "  rotationPolicyRef: {name: roll}\n")).await;
    ready_account(&tenant, n, "roller").await;
    let rotate = json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": "1"}}});
    dynamic(&tenant, n, "IntegrationAccount")
        .patch("roller", &PatchParams::default(), &Patch::Merge(&rotate))
        .await
        .unwrap();
    let failed = eventually("a WorkloadRestartFailed event", WAIT, || async {
        events_about(&admin, n, "roller").await.into_iter().find(|(reason, _)| reason == "WorkloadRestartFailed")
    })
    .await;
    assert!(failed.1.contains("forbidden"), "{}", failed.1);
    let payments = Api::<Deployment>::namespaced(admin.clone(), n).get("payments").await.unwrap();
    assert!(payments.spec.unwrap().template.metadata.unwrap().annotations.is_none(), "never restarted");
    outcomes
        .push(Outcome { attempt: "36 roll a workload of its namespace through restartTargets", refused_by: failed.1 });

    // 37: the output Secret pointed at a connection's credential Secret.
    apply_yaml(
        &tenant,
        n,
        &account("grabber", "{name: local}", "").replace("{name: grabber-key}", "{name: crm-token}"),
    )
    .await;
    let refused = settles(&tenant, n, "IntegrationAccount", "grabber", "KeyReady", "False", &["SecretNotOwned"]).await;
    assert_eq!(secret_data(&admin, n, "crm-token").await.unwrap()["token"], "crm");
    outcomes.push(Outcome {
        attempt: "37 output Secret onto a connection's credential Secret",
        refused_by: refused.message,
    });

    // 38: a deletion race: an account orphaned in the target, then an
    // IntegrationAccount of the same name made again to take it over.
    let orphan = account("phoenix", "{name: local}", "  deletionPolicy: Orphan\n");
    apply_yaml(&tenant, n, &orphan).await;
    let first = ready_account(&tenant, n, "phoenix").await;
    dynamic(&tenant, n, "IntegrationAccount").delete("phoenix", &Default::default()).await.unwrap();
    eventually("the IntegrationAccount to go", WAIT, || async {
        dynamic(&tenant, n, "IntegrationAccount").get_opt("phoenix").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(
        Api::<ServiceAccount>::namespaced(admin.clone(), n).get_opt("phoenix").await.unwrap().is_some(),
        "orphaned"
    );
    apply_yaml(&tenant, n, &orphan.replace("phoenix-key", "phoenix-again")).await;
    let refused =
        settles(&tenant, n, "IntegrationAccount", "phoenix", "AccountReady", "False", &["AccountConflict"]).await;
    assert_ne!(dynamic(&tenant, n, "IntegrationAccount").get("phoenix").await.unwrap().uid(), first.uid());
    assert!(secret_data(&admin, n, "phoenix-again").await.is_none(), "no token for the orphaned account");
    outcomes.push(Outcome {
        attempt: "38 re-create a deleted account to take over what it orphaned",
        refused_by: refused.message,
    });

    report(&outcomes);
    let _ = Api::<ClusterRoleBinding>::all(admin.clone()).delete(&format!("{n}-ci-robot"), &Default::default()).await;
    victim.delete().await;
    ns.delete().await;
}

/// In a target app every admitted namespace shares (a PostgreSQL server
/// behind a ClusterAppConnection), accounts are named after their
/// namespace, so no tenant can take, squat or reach another's account.
#[tokio::test]
async fn tenants_of_a_shared_target_can_neither_collide_nor_squat() {
    let server = PgServer::start().await;
    let cp = control_plane().await;
    let admin = cp.client().await.unwrap();
    let platform = TestNamespace::create(&admin, "pgp").await;
    let a = TestNamespace::create(&admin, "pga").await;
    let b = TestNamespace::create(&admin, "pgb").await;
    let _operator_a = operator(cp, &admin, &a.name).await;
    let _operator_b = operator(cp, &admin, &b.name).await;
    let tenant_a = admin_tenant(cp, &admin, 4, &a.name).await;
    let tenant_b = admin_tenant(cp, &admin, 5, &b.name).await;
    let mut outcomes = Vec::new();

    // The platform team's connection: the admin credential lives in its own
    // namespace, which no tenant can read.
    let label = format!("keysmith-pg-{}", platform.name);
    for ns in [&a.name, &b.name] {
        let patch = json!({"metadata": {"labels": {label.clone(): "yes"}}});
        Api::<Namespace>::all(admin.clone()).patch(ns, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }
    let credential: Secret = serde_json::from_value(
        json!({"metadata": {"name": "pg-admin"}, "stringData": {"username": ADMIN, "password": ADMIN_PASSWORD}}),
    )
    .unwrap();
    Api::<Secret>::namespaced(admin.clone(), &platform.name).create(&PostParams::default(), &credential).await.unwrap();
    let connection = format!(
        r#"
apiVersion: keysmith.dev/v1alpha1
kind: ClusterAppConnection
metadata: {{name: {p}}}
spec:
  provider:
    postgres: {{host: 127.0.0.1, port: {port}, sslMode: disable, credentialsSecretRef: {{name: pg-admin, namespace: {p}}}}}
  namespaceSelector: {{matchLabels: {{{label}: "yes"}}}}
  policy: {{allowedRoles: ["*"], deniedRoles: ["pg_*"]}}
"#,
        p = platform.name,
        port = server.port
    );
    for object in keysmith::manifest::parse(&connection).unwrap() {
        keysmith::manifest::apply(&admin, &object, "test").await.unwrap();
    }
    let shared = format!("{{kind: ClusterAppConnection, name: {}}}", platform.name);

    apply_yaml(&tenant_a, &a.name, &account("billing", &shared, "")).await;
    let first = ready_account(&tenant_a, &a.name, "billing").await;
    let a_role = format!("{}.billing", a.name);
    assert_eq!(first.status.unwrap().account.unwrap().account_name.as_deref(), Some(a_role.as_str()));
    let a_password = secret_data(&tenant_a, &a.name, "billing-key").await.unwrap()["password"].clone();
    let a_user = secret_data(&tenant_a, &a.name, "billing-key").await.unwrap()["username"].clone();

    // 30: the same name in another namespace is another account.
    apply_yaml(&tenant_b, &b.name, &account("billing", &shared, "")).await;
    let second = ready_account(&tenant_b, &b.name, "billing").await;
    let b_role = second.status.unwrap().account.unwrap().account_name.unwrap();
    assert_eq!(b_role, format!("{}.billing", b.name));
    outcomes.push(Outcome {
        attempt: "30 the same account name from another namespace",
        refused_by: format!("naming template: {a_role} and {b_role} are different roles"),
    });

    // 31: naming another tenant's account outright.
    apply_yaml(&tenant_b, &b.name, &account("impostor", &shared, &format!("  providerOptions: {{name: {a_role}}}\n")))
        .await;
    let third = ready_account(&tenant_b, &b.name, "impostor").await;
    let c_role = third.status.unwrap().account.unwrap().account_name.unwrap();
    assert_eq!(c_role, format!("{}.{a_role}", b.name), "the template keeps its namespace prefix");
    outcomes.push(Outcome {
        attempt: "31 providerOptions.name set to another tenant's account",
        refused_by: format!("naming template: it became {c_role}"),
    });

    // 32: a role of the tenant's own prefix that the DBA made by hand.
    let dba = server.superuser().await;
    dba.batch_execute(&format!("CREATE ROLE \"{}.legacy\" NOLOGIN", b.name)).await.unwrap();
    apply_yaml(&tenant_b, &b.name, &account("legacy", &shared, "")).await;
    let refused =
        settles(&tenant_b, &b.name, "IntegrationAccount", "legacy", "AccountReady", "False", &["AccountConflict"])
            .await;
    assert!(secret_data(&admin, &b.name, "legacy-key").await.is_none());
    outcomes
        .push(Outcome { attempt: "32 adopt a role the DBA made under its own prefix", refused_by: refused.message });

    // Tenant A's account is untouched by all of it: its key still logs in.
    assert!(server.login(&a_user, &a_password).await.is_ok(), "tenant A's key still works");
    let (comment, _, _) = server.role(&a_role).await.unwrap();
    assert!(comment.unwrap().contains(&format!("{}/billing", a.name)), "still tenant A's");

    report(&outcomes);
    let _ = Api::<keysmith::api::ClusterAppConnection>::all(admin.clone())
        .delete(&platform.name, &Default::default())
        .await;
    for ns in [a, b, platform] {
        ns.delete().await;
    }
}

/// The upgrade path: an AppConnection that names no ServiceAccount (as every
/// one did before keysmith acted as one) stops changing anything and says
/// why, and loses no key: the published token keeps working, and naming a
/// ServiceAccount picks up where it left off, with the same key.
/// `--default-service-account` names one for every such connection.
#[tokio::test]
async fn a_connection_without_a_service_account_waits_and_keeps_its_keys() {
    let cp = control_plane().await;
    let admin = cp.client().await.unwrap();
    let ns = TestNamespace::create(&admin, "upgrade").await;
    let n = ns.name.as_str();
    let operator_ = operator(cp, &admin, n).await;
    let connection = "apiVersion: keysmith.dev/v1alpha1\nkind: AppConnection\nmetadata: {name: cluster}\nspec:\n  provider: {kubernetes: {}}\n  serviceAccountName: keysmith\n";
    apply_yaml(&admin, n, &(common::kubernetes_connection_identity(&["view"]) + connection)).await;
    apply_yaml(&admin, n, &account("robot", "{name: cluster}", "")).await;
    apply_yaml(&admin, n, &binding("robot-view", "robot", "[view]", "")).await;
    let before = ready_account(&admin, n, "robot").await.status.unwrap().current_key.unwrap().id;
    let token = secret_data(&admin, n, "robot-key").await.unwrap()["token"].clone();

    // As an AppConnection written before serviceAccountName existed.
    let connections: Api<keysmith::api::AppConnection> = Api::namespaced(admin.clone(), n);
    let unset = json!({"spec": {"serviceAccountName": null}});
    connections.patch("cluster", &PatchParams::default(), &Patch::Merge(&unset)).await.unwrap();
    let waiting =
        settles(&admin, n, "IntegrationAccount", "robot", "AccountReady", "False", &["ServiceAccountRequired"]).await;
    assert!(waiting.message.contains("no issued key is revoked"), "{}", waiting.message);
    settles(&admin, n, "AppConnection", "cluster", "Ready", "False", &["ServiceAccountRequired"]).await;
    let robot = cp.client_for_token(&token).await.unwrap();
    eventually("the published key to keep working", WAIT, || async {
        Api::<ConfigMap>::namespaced(robot.clone(), n).list(&ListParams::default()).await.ok().map(|_| ())
    })
    .await;
    assert_eq!(bindings_naming(&admin, n, "robot").await.len(), 1, "its role is kept too");

    // The operator run with --default-service-account picks it up as is.
    drop(operator_);
    let kubeconfig = chart_identity(cp, &admin).await;
    let _defaulted = Operator::start_with(
        cp,
        n,
        &OperatorOptions {
            kubeconfig: Some(kubeconfig),
            args: &["--default-service-account", "keysmith"],
            ..OperatorOptions::default()
        },
    );
    settles(&admin, n, "IntegrationAccount", "robot", "Ready", "True", &["Ready"]).await;
    let after = ready_account(&admin, n, "robot").await.status.unwrap().current_key.unwrap().id;
    assert_eq!(after, before, "the same key: nothing was lost or reissued");
    assert_eq!(secret_data(&admin, n, "robot-key").await.unwrap()["token"], token);
    ns.delete().await;
}
