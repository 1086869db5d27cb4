//! keysmith's API on a real kube-apiserver: the CRDs install, valid objects
//! are accepted with defaults applied, invalid ones are refused with a
//! message a user can act on, and kubectl shows what users need.

mod common;

use common::{control_plane, example, kubectl_ok, TestNamespace};
use keysmith::api::{
    AppConnection, ClusterAppConnection, DeletionPolicy, IntegrationAccount, KeyRotationPolicy, RoleBinding,
};
use kube::{
    api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams},
    Client, Resource,
};
use serde_json::{json, Value};

fn dynamic_api<K: Resource<DynamicType = ()>>(client: &Client, ns: Option<&str>) -> Api<DynamicObject> {
    let ar = ApiResource::erase::<K>(&());
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

/// Creates a raw object; returns the stored object or the apiserver's message.
async fn create_raw(client: &Client, ns: Option<&str>, mut obj: Value) -> Result<Value, String> {
    if let Some(ns) = ns {
        obj["metadata"]["namespace"] = json!(ns);
    }
    let kind = obj["kind"].as_str().unwrap().to_owned();
    let dynamic: DynamicObject = serde_json::from_value(obj).unwrap();
    let api = match kind.as_str() {
        "IntegrationAccount" => dynamic_api::<IntegrationAccount>(client, ns),
        "RoleBinding" => dynamic_api::<RoleBinding>(client, ns),
        "KeyRotationPolicy" => dynamic_api::<KeyRotationPolicy>(client, ns),
        "AppConnection" => dynamic_api::<AppConnection>(client, ns),
        "ClusterAppConnection" => dynamic_api::<ClusterAppConnection>(client, None),
        other => panic!("unexpected kind {other}"),
    };
    match api.create(&PostParams::default(), &dynamic).await {
        Ok(created) => Ok(serde_json::to_value(created).unwrap()),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "expected a validation error: {status:?}");
            Err(status.message)
        }
        Err(other) => panic!("unexpected error: {other}"),
    }
}

#[tokio::test]
async fn crds_are_established_and_discoverable() {
    let cp = control_plane().await;
    // `kubectl get keysmith` lists every kind through the category.
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "discover").await;
    for doc in example("kinds/appconnection.yaml") {
        create_raw(&client, Some(&ns.name), doc).await.unwrap();
    }
    let listed = kubectl_ok(cp, &["get", "keysmith", "-n", &ns.name, "-o", "name"]);
    assert!(listed.contains("appconnection.keysmith.dev/this-cluster"), "{listed}");
    // Short names resolve, and ours never shadows RBAC's RoleBinding.
    for short in ["ia", "ksrb", "krp", "appconn", "cappconn"] {
        kubectl_ok(cp, &["get", short, "-A"]);
    }
    let rbac = kubectl_ok(cp, &["api-resources", "--api-group=rbac.authorization.k8s.io", "-o", "name"]);
    assert!(rbac.contains("rolebindings.rbac.authorization.k8s.io"));
    ns.delete().await;
}

#[tokio::test]
async fn kubectl_explain_shows_the_field_docs() {
    let cp = control_plane().await;
    // The apiserver publishes each new CRD's OpenAPI a few seconds after the
    // CRD is Established, one CRD at a time; kubectl explain reads that.
    let explain = |path: &'static str| async move {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let out = common::kubectl(cp, &["explain", path]);
            if out.status.success() {
                return String::from_utf8(out.stdout).unwrap();
            }
            assert!(std::time::Instant::now() < deadline, "the OpenAPI for {path} was never published");
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    };
    let out = explain("integrationaccounts.spec").await;
    assert!(out.contains("connectionRef"), "{out}");
    assert!(out.contains("The connection to the target app the account lives in"), "{out}");
    assert!(out.contains("deletionPolicy"), "{out}");
    let out = explain("keyrotationpolicies.spec.gracePeriod").await;
    assert!(out.contains("How long a replaced key stays valid"), "{out}");
    let out = explain("integrationaccounts").await;
    assert!(out.contains("A dedicated account that one integration uses"), "{out}");
}

#[tokio::test]
async fn examples_are_accepted() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "examples").await;
    for file in [
        "kinds/appconnection.yaml",
        "kinds/keyrotationpolicy.yaml",
        "kinds/integrationaccount.yaml",
        "kinds/rolebinding.yaml",
    ] {
        for doc in example(file) {
            let stored = create_raw(&client, Some(&ns.name), doc.clone()).await;
            let stored = stored.unwrap_or_else(|msg| panic!("{file} refused: {msg}"));
            assert_eq!(stored["spec"]["metadata"], doc["spec"]["metadata"]);
        }
    }
    for doc in example("kinds/clusterappconnection.yaml") {
        let mut doc = doc;
        doc["metadata"]["name"] = json!(format!("{}-crm", ns.name));
        create_raw(&client, None, doc).await.expect("clusterappconnection accepted");
    }
    // The typed API reads them back.
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let account = accounts.get("billing-sync").await.unwrap();
    assert_eq!(account.spec.secret.keys.get("token").map(String::as_str), Some("BILLING_API_TOKEN"));
    // Printer columns answer the first questions.
    let table = kubectl_ok(cp, &["get", "ia", "-n", &ns.name]);
    let header = table.lines().next().unwrap();
    for column in ["NAME", "CONNECTION", "READY", "KEY AGE", "NEXT ROTATION", "AGE"] {
        assert!(header.contains(column), "{header}");
    }
    assert!(table.contains("this-cluster"), "{table}");
    let table = kubectl_ok(cp, &["get", "ksrb", "-n", &ns.name]);
    assert!(table.lines().next().unwrap().contains("ACCOUNT"), "{table}");
    assert!(table.contains("billing-sync") && table.contains("view"), "{table}");
    let table = kubectl_ok(cp, &["get", "appconn", "-n", &ns.name]);
    assert!(table.lines().next().unwrap().contains("PROVIDER"), "{table}");
    ns.delete().await;
}

#[tokio::test]
async fn defaults_are_applied() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "defaults").await;
    let minimal = [
        json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": "AppConnection", "metadata": {"name": "c"},
               "spec": {"provider": {"kubernetes": {}}}}),
        json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": "KeyRotationPolicy", "metadata": {"name": "p"},
               "spec": {"schedule": "0 3 * * SUN"}}),
        json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": "IntegrationAccount", "metadata": {"name": "a"},
               "spec": {"connectionRef": {"name": "c"}, "secret": {"name": "a-key"}}}),
        json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": "RoleBinding", "metadata": {"name": "b"},
               "spec": {"accountRef": {"name": "a"}, "roles": ["view"]}}),
    ];
    for obj in minimal {
        create_raw(&client, Some(&ns.name), obj).await.unwrap();
    }
    let account = Api::<IntegrationAccount>::namespaced(client.clone(), &ns.name).get("a").await.unwrap();
    assert_eq!(account.spec.deletion_policy, DeletionPolicy::Delete);
    assert!(!account.spec.suspend);
    assert_eq!(account.spec.connection_ref.kind, keysmith::api::ConnectionKind::AppConnection);
    let policy = Api::<KeyRotationPolicy>::namespaced(client.clone(), &ns.name).get("p").await.unwrap();
    assert_eq!(policy.spec.time_zone, "UTC");
    assert_eq!(policy.spec.grace_period, "1h");
    let conn = Api::<AppConnection>::namespaced(client.clone(), &ns.name).get("c").await.unwrap();
    assert_eq!(conn.spec.connection.max_keys_per_account, 2);
    let binding = Api::<RoleBinding>::namespaced(client.clone(), &ns.name).get("b").await.unwrap();
    assert_eq!(binding.spec.roles, ["view"]);
    ns.delete().await;
}

#[tokio::test]
async fn status_is_a_subresource() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "status").await;
    create_raw(
        &client,
        Some(&ns.name),
        json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": "AppConnection",
        "metadata": {"name": "c"}, "spec": {"provider": {"kubernetes": {}}}}),
    )
    .await
    .unwrap();
    let api: Api<AppConnection> = Api::namespaced(client.clone(), &ns.name);
    // A status sent with the main resource is ignored...
    let mut obj = api.get("c").await.unwrap();
    obj.status = Some(keysmith::api::AppConnectionStatus { provider: Some("x".into()), ..Default::default() });
    let replaced = api.replace("c", &PostParams::default(), &obj).await.unwrap();
    assert!(replaced.status.is_none());
    // ...and written through /status, which leaves the generation alone.
    let patch = json!({"status": {"provider": "kubernetes", "observedGeneration": 1,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Verified", "message": "ok",
                        "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]}});
    let patched =
        api.patch_status("c", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.unwrap();
    assert_eq!(patched.metadata.generation, Some(1));
    assert_eq!(patched.status.unwrap().provider.as_deref(), Some("kubernetes"));
    let table = kubectl_ok(cp, &["get", "appconn", "-n", &ns.name, "c"]);
    assert!(table.contains("kubernetes") && table.contains("True"), "{table}");
    ns.delete().await;
}

/// Each case: a manifest, and words its refusal must contain.
#[tokio::test]
async fn invalid_objects_are_refused_with_readable_messages() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "invalid").await;
    let account = |spec: Value| json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": "IntegrationAccount", "metadata": {"name": "a"}, "spec": spec});
    let policy = |spec: Value| json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": "KeyRotationPolicy", "metadata": {"name": "p"}, "spec": spec});
    let connection = |provider: Value| json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": "AppConnection", "metadata": {"name": "c"}, "spec": {"provider": provider}});
    let binding = |spec: Value| json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": "RoleBinding", "metadata": {"name": "b"}, "spec": spec});
    let cases: Vec<(&str, Value, Vec<&str>)> = vec![
        (
            "bad enum",
            account(json!({"connectionRef": {"name": "c"}, "secret": {"name": "s"}, "deletionPolicy": "Destroy"})),
            vec!["spec.deletionPolicy", "Unsupported value", "\"Delete\", \"Disable\", \"Orphan\""],
        ),
        (
            "missing required field",
            account(json!({"connectionRef": {"name": "c"}})),
            vec!["spec.secret", "Required value"],
        ),
        (
            "bad connection kind",
            account(json!({"connectionRef": {"kind": "Cluster", "name": "c"}, "secret": {"name": "s"}})),
            vec!["spec.connectionRef.kind", "Unsupported value"],
        ),
        (
            "bad secret name",
            account(json!({"connectionRef": {"name": "c"}, "secret": {"name": "My_Secret"}})),
            vec!["spec.secret.name", "should match"],
        ),
        (
            "bad secret key rename",
            account(json!({"connectionRef": {"name": "c"}, "secret": {"name": "s", "keys": {"token": "has space"}}})),
            vec!["spec.secret.keys.token", "should match"],
        ),
        (
            "two providers",
            connection(
                json!({"kubernetes": {}, "scim": {"baseUrl": "https://scim.example.com", "tokenSecretRef": {"name": "t"}}}),
            ),
            vec!["spec.provider", "set exactly one provider"],
        ),
        ("no provider", connection(json!({})), vec!["spec.provider", "set exactly one provider"]),
        (
            "scim without url",
            connection(json!({"scim": {"tokenSecretRef": {"name": "t"}}})),
            vec!["spec.provider.scim.baseUrl", "Required value"],
        ),
        ("malformed duration", policy(json!({"rotateEvery": "30 days"})), vec!["spec.rotateEvery", "should match"]),
        (
            "malformed grace period",
            policy(json!({"rotateEvery": "720h", "gracePeriod": "1d"})),
            vec!["spec.gracePeriod", "should match"],
        ),
        ("malformed cron", policy(json!({"schedule": "every sunday at 3"})), vec!["spec.schedule", "should match"]),
        (
            "neither interval nor schedule",
            policy(json!({"gracePeriod": "1h"})),
            vec!["spec", "set rotateEvery, schedule, or both"],
        ),
        (
            "bad restart target kind",
            policy(json!({"rotateEvery": "24h", "restartTargets": [{"kind": "Pod", "name": "x"}]})),
            vec!["spec.restartTargets[0].kind", "Unsupported value", "\"Deployment\""],
        ),
        (
            "no roles",
            binding(json!({"accountRef": {"name": "a"}, "roles": []})),
            vec!["spec.roles", "should have at least 1 items"],
        ),
        (
            "duplicate roles",
            binding(json!({"accountRef": {"name": "a"}, "roles": ["view", "view"]})),
            vec!["spec.roles[1]", "Duplicate value"],
        ),
        (
            "too many keys",
            json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": "AppConnection", "metadata": {"name": "c"},
                "spec": {"provider": {"kubernetes": {}}, "maxKeysPerAccount": 50}}),
            vec!["spec.maxKeysPerAccount", "less than or equal to 10"],
        ),
    ];
    let mut failures = Vec::new();
    for (what, obj, words) in cases {
        match create_raw(&client, Some(&ns.name), obj).await {
            Ok(_) => failures.push(format!("{what}: accepted")),
            Err(message) => {
                for word in &words {
                    if !message.contains(word) {
                        failures.push(format!("{what}: {message:?} lacks {word:?}"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    ns.delete().await;
}

/// Patches an object: the stored object, or the apiserver's message.
async fn write(
    api: &Api<DynamicObject>,
    name: &str,
    patch: Patch<Value>,
    params: PatchParams,
) -> Result<Value, String> {
    api.patch(name, &params, &patch).await.map(|o| serde_json::to_value(o).unwrap()).map_err(|e| e.to_string())
}

/// Every `message` of every CEL rule (`x-kubernetes-validations`) the types declare.
fn cel_rule_messages() -> Vec<String> {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for rule in map.get("x-kubernetes-validations").and_then(Value::as_array).into_iter().flatten() {
                    out.push(rule["message"].as_str().expect("every rule has a message").to_owned());
                }
                map.values().for_each(|v| walk(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for crd in keysmith::api::crds() {
        walk(&serde_json::to_value(crd).unwrap(), &mut out);
    }
    out.sort();
    out.dedup();
    out
}

/// The CEL rules hold on the real apiserver: no keysmith runs in this test
/// binary, so every refusal below is the apiserver's own. Each rule the
/// types declare has a case that breaks it, and a change it must still allow.
#[tokio::test]
async fn the_apiserver_itself_enforces_every_cel_rule() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "cel").await;
    let mut covered = Vec::new();
    let mut failures = Vec::new();
    let mut refused = |what: &str, result: Result<Value, String>, message: &str| {
        covered.push(message.to_owned());
        match result {
            Ok(_) => failures.push(format!("{what}: accepted")),
            Err(e) if !e.contains(message) => failures.push(format!("{what}: {e:?} lacks {message:?}")),
            Err(_) => {}
        }
    };

    // connectionRef is immutable, whichever way the change is written.
    let accounts = dynamic_api::<IntegrationAccount>(&client, Some(&ns.name));
    let account = json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": "IntegrationAccount", "metadata": {"name": "a"},
        "spec": {"connectionRef": {"name": "one"}, "secret": {"name": "s"}}});
    create_raw(&client, Some(&ns.name), account.clone()).await.expect("a valid account");
    let merge = |patch: Value| write(&accounts, "a", Patch::Merge(patch), PatchParams::default());
    let immutable = "connectionRef is immutable; create a new IntegrationAccount instead";
    refused("another connection", merge(json!({"spec": {"connectionRef": {"name": "two"}}})).await, immutable);
    refused(
        "another connection kind",
        merge(json!({"spec": {"connectionRef": {"kind": "ClusterAppConnection"}}})).await,
        immutable,
    );
    let mut applied = account.clone();
    applied["spec"]["connectionRef"]["name"] = json!("two");
    let ssa = write(&accounts, "a", Patch::Apply(applied), PatchParams::apply("tenant").force()).await;
    refused("another connection, server-side applied", ssa, immutable);
    let mut replaced = serde_json::to_value(accounts.get("a").await.unwrap()).unwrap();
    replaced["spec"]["connectionRef"]["name"] = json!("two");
    let put = accounts
        .replace("a", &PostParams::default(), &serde_json::from_value(replaced).unwrap())
        .await
        .map(|o| serde_json::to_value(o).unwrap())
        .map_err(|e| e.to_string());
    refused("another connection, replaced", put, immutable);
    let stored = accounts.get("a").await.unwrap();
    assert_eq!(stored.data["spec"]["connectionRef"]["name"], "one", "the stored connectionRef never changed");
    merge(json!({"spec": {"description": "now documented"}})).await.expect("other fields stay editable");

    // accountRef is immutable.
    let bindings = dynamic_api::<RoleBinding>(&client, Some(&ns.name));
    create_raw(
        &client,
        Some(&ns.name),
        json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": "RoleBinding", "metadata": {"name": "b"},
            "spec": {"accountRef": {"name": "a"}, "roles": ["view"]}}),
    )
    .await
    .expect("a valid binding");
    let patch_binding = |patch: Value| write(&bindings, "b", Patch::Merge(patch), PatchParams::default());
    refused(
        "another account",
        patch_binding(json!({"spec": {"accountRef": {"name": "other"}}})).await,
        "accountRef is immutable; create a new RoleBinding instead",
    );
    patch_binding(json!({"spec": {"roles": ["view", "edit"]}})).await.expect("roles stay editable");

    // Exactly one provider, on both connection kinds.
    for kind in ["AppConnection", "ClusterAppConnection"] {
        let namespace = (kind == "AppConnection").then_some(ns.name.as_str());
        let name = format!("{}-two-providers", ns.name);
        let two = json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": kind, "metadata": {"name": name},
            "spec": {"provider": {"kubernetes": {}, "scim": {"baseUrl": "https://scim.example.com", "tokenSecretRef": {"name": "t"}}}}});
        refused(
            &format!("{kind} with two providers"),
            create_raw(&client, namespace, two).await,
            "set exactly one provider",
        );
    }

    // rotateEvery, schedule, or both.
    let policy = |spec: Value| json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": "KeyRotationPolicy", "metadata": {"name": "p"}, "spec": spec});
    refused(
        "a policy without interval or schedule",
        create_raw(&client, Some(&ns.name), policy(json!({"gracePeriod": "1h"}))).await,
        "set rotateEvery, schedule, or both",
    );
    create_raw(&client, Some(&ns.name), policy(json!({"schedule": "0 3 * * *"}))).await.expect("a schedule alone");

    assert!(failures.is_empty(), "{}", failures.join("\n"));
    covered.sort();
    covered.dedup();
    assert_eq!(covered, cel_rule_messages(), "a CEL rule of the types has no case here");
    ns.delete().await;
}
