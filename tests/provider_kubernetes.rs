//! The `kubernetes` provider against a real kube-apiserver (the shared local
//! control plane): ServiceAccounts, RBAC bindings and TokenRequest keys, with
//! every access change checked by using the issued kubeconfig.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject};
use keysmith::controlplane::{self, ControlPlane};
use keysmith::provider::kubernetes::{self, KubernetesProvider};
use keysmith::provider::{AccountRequest, IssuedKey, KeyRequest, Provider, ProviderError, RoleGrant};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::response::StatusDetails;
use kube::core::Status;
use kube::Client;

/// How long an access change may take to show. RBAC changes are immediate,
/// but the apiserver caches successful token authentications for 10s.
const SETTLE: Duration = Duration::from_secs(20);
/// How long the clusterrole-aggregation controller may take after startup.
const AGGREGATION: Duration = Duration::from_secs(60);

async fn admin() -> (&'static ControlPlane, Client) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cp = controlplane::shared().await.expect("control plane starts");
    let client = cp.client().await.expect("admin client");
    await_aggregation(&client).await;
    (cp, client)
}

/// The built-in `view` and `edit` ClusterRoles are aggregated: their rules
/// are filled in by kube-controller-manager's clusterrole-aggregation
/// controller, which the local control plane runs. Right after startup it
/// may not have got to them yet.
async fn await_aggregation(client: &Client) {
    let roles = Api::<ClusterRole>::all(client.clone());
    let start = Instant::now();
    for name in ["view", "edit"] {
        loop {
            let role = roles.get(name).await.expect("the built-in ClusterRole");
            if role.rules.as_ref().is_some_and(|r| !r.is_empty()) {
                break;
            }
            assert!(
                start.elapsed() < AGGREGATION,
                "the {name} ClusterRole has no rules after {AGGREGATION:?}: \
                 is kube-controller-manager running?"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// A fresh namespace with a random suffix.
async fn namespace(client: &Client, prefix: &str) -> String {
    let name = format!("{prefix}-{:08x}", rand::random::<u32>());
    let ns = Namespace {
        metadata: ObjectMeta { name: Some(name.clone()), ..ObjectMeta::default() },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
    name
}

async fn drop_namespace(client: &Client, name: &str) {
    let _ = Api::<Namespace>::all(client.clone()).delete(name, &DeleteParams::background()).await;
}

fn provider(cp: &ControlPlane, client: &Client, allow_cluster_scope: bool) -> KubernetesProvider {
    KubernetesProvider::new(
        client.clone(),
        cp.server_url().to_owned(),
        Some(cp.ca_pem().to_owned()),
        allow_cluster_scope,
    )
}

fn account(namespace: &str, name: &str) -> AccountRequest {
    AccountRequest {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        account_name: name.to_owned(),
        owner_uid: format!("{:08x}-0000-4000-8000-{:012x}", rand::random::<u32>(), rand::random::<u64>() >> 16),
        description: Some("CI deployer (platform team)".to_owned()),
        owner: Some("team-platform".to_owned()),
        options: BTreeMap::new(),
    }
}

fn key_request(id: &str) -> KeyRequest {
    KeyRequest { key_id: id.to_owned(), lifetime: Some(Duration::from_secs(3600)) }
}

fn grant(role: &str, scope: Option<&str>) -> RoleGrant {
    RoleGrant { role: role.to_owned(), scope: scope.map(str::to_owned) }
}

/// A ServiceAccount subject; `namespace: None` leaves it out, which in a
/// RoleBinding means the binding's namespace.
fn sa_subject(namespace: Option<&str>, name: &str) -> Subject {
    Subject {
        kind: "ServiceAccount".to_owned(),
        name: name.to_owned(),
        namespace: namespace.map(str::to_owned),
        ..Subject::default()
    }
}

fn other_subject(kind: &str, name: &str) -> Subject {
    Subject {
        kind: kind.to_owned(),
        name: name.to_owned(),
        api_group: Some("rbac.authorization.k8s.io".to_owned()),
        ..Subject::default()
    }
}

fn role_ref(kind: &str, name: &str) -> RoleRef {
    RoleRef { api_group: "rbac.authorization.k8s.io".to_owned(), kind: kind.to_owned(), name: name.to_owned() }
}

/// A RoleBinding made by hand (no keysmith labels), to a `kind` (`Role` or
/// `ClusterRole`) named `role`.
async fn hand_made_binding(
    client: &Client,
    ns: &str,
    name: &str,
    kind: &str,
    role: &str,
    subjects: Vec<Subject>,
) -> RoleBinding {
    let binding = RoleBinding {
        metadata: ObjectMeta { name: Some(name.to_owned()), namespace: Some(ns.to_owned()), ..ObjectMeta::default() },
        role_ref: role_ref(kind, role),
        subjects: Some(subjects),
    };
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .expect("create the hand-made RoleBinding")
}

/// A ClusterRoleBinding made by hand, with a random name (cluster objects
/// outlive the tests' namespaces: delete it at the end).
async fn hand_made_cluster_binding(client: &Client, prefix: &str, role: &str, subjects: Vec<Subject>) -> String {
    let name = format!("{prefix}-{:08x}", rand::random::<u32>());
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta { name: Some(name.clone()), ..ObjectMeta::default() },
        role_ref: role_ref("ClusterRole", role),
        subjects: Some(subjects),
    };
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .expect("create the hand-made ClusterRoleBinding");
    name
}

async fn get_binding(client: &Client, ns: &str, name: &str) -> Option<RoleBinding> {
    Api::<RoleBinding>::namespaced(client.clone(), ns).get_opt(name).await.expect("get RoleBinding")
}

async fn get_cluster_binding(client: &Client, name: &str) -> Option<ClusterRoleBinding> {
    Api::<ClusterRoleBinding>::all(client.clone()).get_opt(name).await.expect("get ClusterRoleBinding")
}

async fn drop_cluster_binding(client: &Client, name: &str) {
    let _ = Api::<ClusterRoleBinding>::all(client.clone()).delete(name, &DeleteParams::background()).await;
}

/// `Kind/namespace/name` of each subject (namespace empty when absent).
fn subject_names(subjects: Option<&[Subject]>) -> Vec<String> {
    subjects
        .unwrap_or_default()
        .iter()
        .map(|s| format!("{}/{}/{}", s.kind, s.namespace.as_deref().unwrap_or_default(), s.name))
        .collect()
}

/// A client built the way a user would: from the issued `kubeconfig` alone.
async fn key_client(key: &IssuedKey) -> Client {
    let yaml = key.material.expose().get("kubeconfig").expect("kubeconfig in material");
    let kubeconfig = Kubeconfig::from_yaml(yaml).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig loads");
    Client::try_from(config).expect("client from kubeconfig")
}

/// Runs kubectl with the issued kubeconfig; returns success and stderr.
fn kubectl(cp: &ControlPlane, key: &IssuedKey, args: &[&str]) -> (bool, String) {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    std::io::Write::write_all(&mut file, key.material.expose()["kubeconfig"].as_bytes()).expect("write kubeconfig");
    let out = cp.kubectl().arg("--kubeconfig").arg(file.path()).args(args).output().expect("kubectl runs");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The HTTP status of listing pods in `ns` (200 on success).
async fn list_pods(client: &Client, ns: &str) -> u16 {
    status_of(Api::<Pod>::namespaced(client.clone(), ns).list(&ListParams::default()).await)
}

async fn list_secrets(client: &Client, ns: &str) -> u16 {
    status_of(Api::<Secret>::namespaced(client.clone(), ns).list(&ListParams::default()).await)
}

/// The HTTP status of a SelfSubjectAccessReview, which any authenticated
/// user may make: 201 when the token is accepted, 401 when not.
async fn authenticate(client: &Client) -> u16 {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some("get".to_owned()),
                resource: Some("pods".to_owned()),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    match Api::<SelfSubjectAccessReview>::all(client.clone()).create(&PostParams::default(), &review).await {
        Ok(_) => 201,
        Err(kube::Error::Api(status)) => status.code,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn status_of<T>(result: Result<T, kube::Error>) -> u16 {
    match result {
        Ok(_) => 200,
        Err(kube::Error::Api(status)) => status.code,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// Polls `probe` until it yields `want` or [`SETTLE`] passes; returns how long it took.
async fn eventually<F, Fut>(what: &str, want: u16, mut probe: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = u16>,
{
    let start = Instant::now();
    loop {
        let got = probe().await;
        if got == want {
            return start.elapsed();
        }
        assert!(start.elapsed() < SETTLE, "{what}: wanted HTTP {want}, still {got} after {SETTLE:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn create_is_idempotent_and_never_adopts_a_foreign_service_account() {
    let (cp, client) = admin().await;
    let ns = namespace(&client, "kp-create").await;
    let provider = provider(cp, &client, false);
    let acct = account(&ns, "deployer");

    assert_eq!(provider.observe_account(&acct).await.unwrap(), None);
    let first = provider.create_account(&acct).await.expect("create");
    assert!(first.owned && !first.drifted && !first.disabled, "{first:?}");
    assert_eq!(first.name, format!("system:serviceaccount:{ns}:deployer"));
    let second = provider.create_account(&acct).await.expect("create again");
    assert_eq!(first, second);
    assert_eq!(provider.observe_account(&acct).await.unwrap(), Some(first.clone()));

    let sa = Api::<ServiceAccount>::namespaced(client.clone(), &ns).get("deployer").await.unwrap();
    let labels = sa.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("app.kubernetes.io/managed-by").map(String::as_str), Some("keysmith"));
    assert_eq!(labels.get(keysmith::ownership::ACCOUNT_UID), Some(&acct.owner_uid));
    let annotations = sa.metadata.annotations.unwrap_or_default();
    assert_eq!(annotations.get("keysmith.dev/integration-account"), Some(&format!("{ns}/deployer")));
    assert_eq!(annotations.get("keysmith.dev/owner").map(String::as_str), Some("team-platform"));

    // Same name, another IntegrationAccount (another uid): not ours.
    let intruder = AccountRequest { owner_uid: "someone-else".to_owned(), ..acct.clone() };
    let err = provider.create_account(&intruder).await.unwrap_err();
    assert!(matches!(err, ProviderError::Conflict(_)), "{err:?}");

    // A ServiceAccount made by hand is never adopted, updated or deleted.
    let manual = ServiceAccount {
        metadata: ObjectMeta { name: Some("handmade".to_owned()), ..ObjectMeta::default() },
        ..ServiceAccount::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), &ns).create(&PostParams::default(), &manual).await.unwrap();
    let foreign = account(&ns, "handmade");
    match provider.create_account(&foreign).await {
        Err(ProviderError::Conflict(message)) => assert_eq!(
            message,
            format!("ServiceAccount {ns}/handmade exists and was not created by keysmith for this IntegrationAccount")
        ),
        other => panic!("expected Conflict, got {other:?}"),
    }
    let observed = provider.observe_account(&foreign).await.unwrap().expect("observed");
    assert!(!observed.owned);
    assert!(matches!(provider.update_account(&foreign).await, Err(ProviderError::Conflict(_))));
    assert!(matches!(provider.issue_key(&foreign, &key_request("k1")).await, Err(ProviderError::Conflict(_))));
    provider.delete_account(&foreign).await.expect("delete of a foreign account is a no-op");
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .get("handmade")
        .await
        .expect("the handmade ServiceAccount is still there");

    // providerOptions.namespace puts the ServiceAccount elsewhere.
    let elsewhere_ns = namespace(&client, "kp-create-opt").await;
    let mut elsewhere = account(&ns, "remote");
    elsewhere.options.insert("namespace".to_owned(), elsewhere_ns.clone());
    let created = provider.create_account(&elsewhere).await.unwrap();
    assert_eq!(created.name, format!("system:serviceaccount:{elsewhere_ns}:remote"));
    Api::<ServiceAccount>::namespaced(client.clone(), &elsewhere_ns).get("remote").await.unwrap();

    drop_namespace(&client, &ns).await;
    drop_namespace(&client, &elsewhere_ns).await;
}

#[tokio::test]
async fn update_fixes_drift_and_re_enables() {
    let (cp, client) = admin().await;
    let ns = namespace(&client, "kp-drift").await;
    let provider = provider(cp, &client, false);
    let mut acct = account(&ns, "syncer");
    provider.create_account(&acct).await.unwrap();

    // Someone edits our annotations by hand.
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), &ns);
    let patch = serde_json::json!({"metadata": {"annotations": {
        "keysmith.dev/owner": "mallory",
        "keysmith.dev/description": null,
    }}});
    sas.patch("syncer", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let observed = provider.observe_account(&acct).await.unwrap().unwrap();
    assert!(observed.owned && observed.drifted, "{observed:?}");
    let fixed = provider.update_account(&acct).await.unwrap();
    assert!(!fixed.drifted, "{fixed:?}");
    let annotations = sas.get("syncer").await.unwrap().metadata.annotations.unwrap_or_default();
    assert_eq!(annotations.get("keysmith.dev/owner").map(String::as_str), Some("team-platform"));
    assert_eq!(annotations.get("keysmith.dev/description").map(String::as_str), Some("CI deployer (platform team)"));

    // The spec changes: no description any more, a new owner.
    acct.description = None;
    acct.owner = Some("team-payments".to_owned());
    assert!(provider.observe_account(&acct).await.unwrap().unwrap().drifted);
    provider.update_account(&acct).await.unwrap();
    assert!(!provider.observe_account(&acct).await.unwrap().unwrap().drifted);
    let annotations = sas.get("syncer").await.unwrap().metadata.annotations.unwrap_or_default();
    assert_eq!(annotations.get("keysmith.dev/description"), None);
    assert_eq!(annotations.get("keysmith.dev/owner").map(String::as_str), Some("team-payments"));

    // Disable, then update re-enables.
    provider.disable_account(&acct).await.unwrap();
    assert!(provider.observe_account(&acct).await.unwrap().unwrap().disabled);
    let enabled = provider.update_account(&acct).await.unwrap();
    assert!(!enabled.disabled && !enabled.drifted, "{enabled:?}");

    // Updating what is not there is NotFound.
    let missing = account(&ns, "missing");
    assert!(matches!(provider.update_account(&missing).await, Err(ProviderError::NotFound(_))));

    drop_namespace(&client, &ns).await;
}

#[tokio::test]
async fn a_namespace_grant_allows_exactly_that_role_in_that_namespace() {
    let (cp, client) = admin().await;
    let ns = namespace(&client, "kp-roles").await;
    let other = namespace(&client, "kp-roles-other").await;
    let provider = provider(cp, &client, false);
    let acct = account(&ns, "viewer");
    provider.create_account(&acct).await.unwrap();
    let key = provider.issue_key(&acct, &key_request("k1")).await.expect("issue");
    let sa = key_client(&key).await;

    assert_eq!(list_pods(&sa, &ns).await, 403, "no roles yet");
    // No scope means the ServiceAccount's namespace, and is reported as such.
    let view = grant("view", None);
    let view_here = grant("view", Some(&ns));
    assert_eq!(provider.default_scope(&acct), Some(ns.clone()));
    provider.grant_role(&acct, &view).await.expect("grant");
    provider.grant_role(&acct, &view).await.expect("grant is idempotent");
    provider.grant_role(&acct, &view_here).await.expect("the same grant, spelt out");
    assert_eq!(provider.list_roles(&acct).await.unwrap(), vec![view_here.clone()]);

    eventually("pods in the granted namespace", 200, || list_pods(&sa, &ns)).await;
    // kubectl takes the kubeconfig as is, namespace included.
    let (ok, stderr) = kubectl(cp, &key, &["get", "pods"]);
    assert!(ok, "kubectl get pods: {stderr}");
    let (ok, stderr) = kubectl(cp, &key, &["get", "secrets"]);
    assert!(!ok && stderr.contains("forbidden"), "kubectl get secrets: {stderr}");
    assert_eq!(list_secrets(&sa, &ns).await, 403, "view does not read secrets");
    assert_eq!(list_pods(&sa, &other).await, 403, "nothing in another namespace");

    // A second grant on an explicit namespace, and a role name with a colon.
    let view_other = grant("view", Some(&other));
    let aggregate = grant("system:aggregate-to-view", Some(&other));
    provider.grant_role(&acct, &view_other).await.unwrap();
    provider.grant_role(&acct, &aggregate).await.unwrap();
    let mut expected = vec![view_here.clone(), view_other.clone(), aggregate.clone()];
    expected.sort();
    assert_eq!(provider.list_roles(&acct).await.unwrap(), expected);
    eventually("pods in the second namespace", 200, || list_pods(&sa, &other)).await;
    let bindings = Api::<RoleBinding>::namespaced(client.clone(), &other)
        .list(&ListParams::default().labels(&format!("{}={}", keysmith::ownership::ACCOUNT_UID, acct.owner_uid)))
        .await
        .unwrap();
    for binding in &bindings.items {
        let name = binding.metadata.name.clone().unwrap();
        assert!(name.starts_with("keysmith-viewer-"), "{name}");
        assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'), "{name}");
    }

    // Revoke: access goes, and revoking again is fine.
    provider.revoke_role(&acct, &view).await.unwrap();
    provider.revoke_role(&acct, &view).await.expect("revoke is idempotent");
    eventually("pods after revoke", 403, || list_pods(&sa, &ns)).await;
    assert_eq!(list_pods(&sa, &other).await, 200, "the other grant stays");
    provider.revoke_role(&acct, &view_other).await.unwrap();
    provider.revoke_role(&acct, &aggregate).await.unwrap();
    eventually("pods in the second namespace after revoke", 403, || list_pods(&sa, &other)).await;
    assert_eq!(provider.list_roles(&acct).await.unwrap(), vec![]);

    // A ClusterRole that does not exist is reported, not silently bound.
    let typo = provider.grant_role(&acct, &grant("veiw", None)).await.unwrap_err();
    assert!(matches!(typo, ProviderError::NotFound(_)), "{typo:?}");

    drop_namespace(&client, &ns).await;
    drop_namespace(&client, &other).await;
}

#[tokio::test]
async fn cluster_scope_needs_the_connections_permission() {
    let (cp, client) = admin().await;
    let ns = namespace(&client, "kp-cluster").await;
    let other = namespace(&client, "kp-cluster-other").await;
    let acct = account(&ns, "watcher");
    let strict = provider(cp, &client, false);
    strict.create_account(&acct).await.unwrap();
    let everywhere = grant("view", Some("*"));
    match strict.grant_role(&acct, &everywhere).await {
        Err(ProviderError::Invalid(message)) => {
            assert_eq!(message, "cluster-wide scope \"*\" is not allowed by this connection")
        }
        other => panic!("expected Invalid, got {other:?}"),
    }

    let permissive = provider(cp, &client, true);
    permissive.grant_role(&acct, &everywhere).await.expect("cluster-wide grant");
    permissive.grant_role(&acct, &everywhere).await.expect("idempotent");
    assert_eq!(permissive.list_roles(&acct).await.unwrap(), vec![everywhere.clone()]);
    let crbs = Api::<ClusterRoleBinding>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{}={}", keysmith::ownership::ACCOUNT_UID, acct.owner_uid)))
        .await
        .unwrap();
    assert_eq!(crbs.items.len(), 1);

    let key = permissive.issue_key(&acct, &key_request("k1")).await.unwrap();
    let sa = key_client(&key).await;
    eventually("pods anywhere", 200, || list_pods(&sa, &other)).await;

    // Revoking works even where granting is no longer allowed.
    strict.revoke_role(&acct, &everywhere).await.unwrap();
    eventually("pods anywhere after revoke", 403, || list_pods(&sa, &other)).await;
    assert_eq!(strict.list_roles(&acct).await.unwrap(), vec![]);

    drop_namespace(&client, &ns).await;
    drop_namespace(&client, &other).await;
}

#[tokio::test]
async fn keys_are_independent_and_revoked_at_once() {
    let (cp, client) = admin().await;
    let ns = namespace(&client, "kp-keys").await;
    let provider = provider(cp, &client, false);
    let acct = account(&ns, "rotator");
    provider.create_account(&acct).await.unwrap();
    assert_eq!(provider.list_keys(&acct).await.unwrap(), vec![]);

    let before = jiff::Timestamp::now();
    let one = provider.issue_key(&acct, &key_request("key-1")).await.expect("first key");
    let two = provider
        .issue_key(&acct, &KeyRequest { key_id: "key-2".to_owned(), lifetime: None })
        .await
        .expect("second key");
    assert_eq!(one.id, "key-1");
    assert_eq!(two.id, "key-2");

    // Lifetimes: as asked, and 24h by default.
    let lifetime = |key: &IssuedKey| key.expires_at.expect("expires").duration_since(before).as_secs();
    assert!((3590..=3660).contains(&lifetime(&one)), "{}", lifetime(&one));
    assert!((86_390..=86_460).contains(&lifetime(&two)), "{}", lifetime(&two));

    // Material: everything an integration needs, consistent with itself.
    let values = one.material.expose();
    for name in ["token", "ca.crt", "server", "namespace", "kubeconfig"] {
        assert!(values.contains_key(name), "material lacks {name}");
    }
    assert_eq!(values["server"], cp.server_url());
    assert_eq!(values["namespace"], ns);
    assert_eq!(values["ca.crt"], cp.ca_pem());
    assert_ne!(one.material.expose()["token"], two.material.expose()["token"]);
    let kubeconfig = Kubeconfig::from_yaml(&values["kubeconfig"]).unwrap();
    let context = kubeconfig.contexts[0].context.clone().unwrap();
    assert_eq!(context.namespace.as_deref(), Some(ns.as_str()));
    assert_eq!(kubeconfig.current_context.as_deref(), Some(kubeconfig.contexts[0].name.as_str()));

    // The token never shows in Debug output.
    for key in [&one, &two] {
        let debug = format!("{key:?} {:?}", key.material);
        assert!(!debug.contains(&key.material.expose()["token"]), "Debug leaks the token");
    }

    let anchors = Api::<Secret>::namespaced(client.clone(), &ns).get("rotator-key-key-1").await.unwrap();
    assert_eq!(anchors.type_.as_deref(), Some("keysmith.dev/key-anchor"));
    assert_eq!(anchors.data, None);

    provider.verify_key(&acct, &one).await.expect("first key verifies");
    provider.verify_key(&acct, &two).await.expect("second key verifies");
    let client_one = key_client(&one).await;
    let client_two = key_client(&two).await;
    assert_eq!(authenticate(&client_one).await, 201);
    assert_eq!(authenticate(&client_two).await, 201);

    let ids = |keys: Vec<keysmith::provider::ObservedKey>| keys.into_iter().map(|k| k.id).collect::<Vec<_>>();
    let listed = provider.list_keys(&acct).await.unwrap();
    assert!(listed.iter().all(|k| k.created_at.is_some()));
    assert_eq!(ids(listed), vec!["key-1", "key-2"]);

    provider.revoke_key(&acct, "key-1").await.expect("revoke");
    provider.revoke_key(&acct, "key-1").await.expect("revoke is idempotent");
    let took = eventually("revoked token", 401, || authenticate(&client_one)).await;
    eprintln!("revoked token refused after {took:?}");
    assert_eq!(authenticate(&client_two).await, 201, "the other key still works");
    assert_eq!(ids(provider.list_keys(&acct).await.unwrap()), vec!["key-2"]);

    match provider.verify_key(&acct, &one).await {
        Err(ProviderError::Invalid(message)) => {
            assert_eq!(message, "the new token was not accepted");
            assert!(!message.contains(&one.material.expose()["token"]));
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    provider.verify_key(&acct, &two).await.expect("second key still verifies");

    // Lifetimes below the API's minimum are raised to 10 minutes.
    let short = provider
        .issue_key(&acct, &KeyRequest { key_id: "short".to_owned(), lifetime: Some(Duration::from_secs(5)) })
        .await
        .unwrap();
    let secs = short.expires_at.unwrap().duration_since(jiff::Timestamp::now()).as_secs();
    assert!((590..=610).contains(&secs), "{secs}");

    // A key for an account that does not exist is NotFound, and leaves no anchor.
    let ghost = account(&ns, "ghost");
    assert!(matches!(provider.issue_key(&ghost, &key_request("k")).await, Err(ProviderError::NotFound(_))));
    assert_eq!(provider.list_keys(&ghost).await.unwrap(), vec![]);

    drop_namespace(&client, &ns).await;
}

#[tokio::test]
async fn disable_revokes_every_key_but_keeps_the_account() {
    let (cp, client) = admin().await;
    let ns = namespace(&client, "kp-disable").await;
    let provider = provider(cp, &client, false);
    let acct = account(&ns, "paused");
    provider.create_account(&acct).await.unwrap();
    provider.grant_role(&acct, &grant("view", None)).await.unwrap();
    hand_made_binding(&client, &ns, "hand-edit", "ClusterRole", "edit", vec![sa_subject(Some(&ns), "paused")]).await;
    let key = provider.issue_key(&acct, &key_request("k1")).await.unwrap();
    let sa = key_client(&key).await;
    eventually("access before disable", 200, || list_pods(&sa, &ns)).await;

    provider.disable_account(&acct).await.expect("disable");
    provider.disable_account(&acct).await.expect("disable again");
    let observed = provider.observe_account(&acct).await.unwrap().unwrap();
    assert!(observed.disabled && observed.owned, "{observed:?}");
    eventually("key after disable", 401, || authenticate(&sa)).await;
    assert_eq!(provider.list_keys(&acct).await.unwrap(), vec![]);
    // Bindings are kept for when the account is enabled again, whoever made them.
    assert_eq!(provider.list_roles(&acct).await.unwrap(), vec![grant("edit", Some(&ns)), grant("view", Some(&ns))]);
    assert!(get_binding(&client, &ns, "hand-edit").await.is_some());

    let gone = account(&ns, "never-created");
    provider.disable_account(&gone).await.expect("disabling what is gone is fine");

    drop_namespace(&client, &ns).await;
}

#[tokio::test]
async fn delete_removes_everything_keysmith_made_and_is_idempotent() {
    let (cp, client) = admin().await;
    let ns = namespace(&client, "kp-delete").await;
    let other = namespace(&client, "kp-delete-other").await;
    let provider = provider(cp, &client, true);
    let acct = account(&ns, "leaver");
    provider.create_account(&acct).await.unwrap();
    provider.grant_role(&acct, &grant("view", None)).await.unwrap();
    provider.grant_role(&acct, &grant("edit", Some(&other))).await.unwrap();
    provider.grant_role(&acct, &grant("view", Some("*"))).await.unwrap();
    // Bindings someone made by hand: the ServiceAccount goes from them too.
    hand_made_binding(&client, &other, "hand-alone", "ClusterRole", "view", vec![sa_subject(Some(&ns), "leaver")])
        .await;
    hand_made_binding(
        &client,
        &other,
        "hand-shared",
        "ClusterRole",
        "view",
        vec![sa_subject(Some(&ns), "leaver"), other_subject("User", "jane")],
    )
    .await;
    let hand_cluster = hand_made_cluster_binding(
        &client,
        "kp-delete-hand",
        "view",
        vec![other_subject("User", "jane"), sa_subject(Some(&ns), "leaver")],
    )
    .await;
    let key = provider.issue_key(&acct, &key_request("k1")).await.unwrap();
    provider.issue_key(&acct, &key_request("k2")).await.unwrap();
    let sa = key_client(&key).await;
    assert_eq!(authenticate(&sa).await, 201);

    provider.delete_account(&acct).await.expect("delete");
    assert!(get_binding(&client, &other, "hand-alone").await.is_none());
    let shared = get_binding(&client, &other, "hand-shared").await.expect("a binding with other subjects stays");
    assert_eq!(subject_names(shared.subjects.as_deref()), vec!["User//jane"]);
    let shared =
        get_cluster_binding(&client, &hand_cluster).await.expect("a ClusterRoleBinding with other subjects stays");
    assert_eq!(subject_names(shared.subjects.as_deref()), vec!["User//jane"]);
    assert_eq!(provider.observe_account(&acct).await.unwrap(), None);
    assert_eq!(provider.list_roles(&acct).await.unwrap(), vec![]);
    assert_eq!(provider.list_keys(&acct).await.unwrap(), vec![]);
    let selector = format!("{}={}", keysmith::ownership::ACCOUNT_UID, acct.owner_uid);
    let params = ListParams::default().labels(&selector);
    assert!(Api::<RoleBinding>::all(client.clone()).list(&params).await.unwrap().items.is_empty());
    assert!(Api::<ClusterRoleBinding>::all(client.clone()).list(&params).await.unwrap().items.is_empty());
    assert!(Api::<Secret>::all(client.clone()).list(&params).await.unwrap().items.is_empty());
    eventually("key after delete", 401, || authenticate(&sa)).await;

    provider.delete_account(&acct).await.expect("second delete is Ok");

    drop_cluster_binding(&client, &hand_cluster).await;
    drop_namespace(&client, &ns).await;
    drop_namespace(&client, &other).await;
}

#[tokio::test]
async fn a_hand_made_binding_is_reported_and_revoked() {
    let (cp, client) = admin().await;
    let ns = namespace(&client, "kp-hand").await;
    let other = namespace(&client, "kp-hand-other").await;
    let provider = provider(cp, &client, false);
    let acct = account(&ns, "deployer");
    provider.create_account(&acct).await.unwrap();
    let key = provider.issue_key(&acct, &key_request("k1")).await.unwrap();
    let sa = key_client(&key).await;
    assert_eq!(list_pods(&sa, &other).await, 403, "no roles yet");

    // Someone grants `edit` in another namespace by hand: the account holds it.
    hand_made_binding(&client, &other, "hand-edit", "ClusterRole", "edit", vec![sa_subject(Some(&ns), "deployer")])
        .await;
    let edit_other = grant("edit", Some(&other));
    assert_eq!(provider.list_roles(&acct).await.unwrap(), vec![edit_other.clone()]);
    eventually("pods through the hand-made binding", 200, || list_pods(&sa, &other)).await;

    // Revoking it deletes the binding: the ServiceAccount was its only subject.
    provider.revoke_role(&acct, &edit_other).await.unwrap();
    assert!(get_binding(&client, &other, "hand-edit").await.is_none());
    assert_eq!(provider.list_roles(&acct).await.unwrap(), vec![]);
    eventually("pods after revoke", 403, || list_pods(&sa, &other)).await;
    provider.revoke_role(&acct, &edit_other).await.expect("revoke is idempotent");

    // keysmith's binding and a hand-made one for the same grant: one grant,
    // and revoking it removes both.
    let view = grant("view", None);
    provider.grant_role(&acct, &view).await.unwrap();
    hand_made_binding(&client, &ns, "hand-view", "ClusterRole", "view", vec![sa_subject(Some(&ns), "deployer")]).await;
    assert_eq!(provider.list_roles(&acct).await.unwrap(), vec![grant("view", Some(&ns))]);
    provider.revoke_role(&acct, &view).await.unwrap();
    assert!(get_binding(&client, &ns, "hand-view").await.is_none());
    assert_eq!(provider.list_roles(&acct).await.unwrap(), vec![]);

    // A hand-made ClusterRoleBinding: revoked even where the connection
    // may not grant cluster-wide.
    let hand_cluster =
        hand_made_cluster_binding(&client, "kp-hand-view", "view", vec![sa_subject(Some(&ns), "deployer")]).await;
    let everywhere = grant("view", Some("*"));
    // Someone else's change reaches the provider through its watch.
    roles_eventually(&provider, &acct, vec![everywhere.clone()]).await;
    eventually("pods through the ClusterRoleBinding", 200, || list_pods(&sa, &other)).await;
    provider.revoke_role(&acct, &everywhere).await.unwrap();
    assert!(get_cluster_binding(&client, &hand_cluster).await.is_none());
    assert_eq!(provider.list_roles(&acct).await.unwrap(), vec![]);
    eventually("pods after the ClusterRoleBinding goes", 403, || list_pods(&sa, &other)).await;

    drop_cluster_binding(&client, &hand_cluster).await;
    drop_namespace(&client, &ns).await;
    drop_namespace(&client, &other).await;
}

#[tokio::test]
async fn revoking_from_a_shared_binding_keeps_the_other_subjects() {
    let (cp, client) = admin().await;
    let ns = namespace(&client, "kp-shared").await;
    let provider = provider(cp, &client, false);
    let acct = account(&ns, "deployer");
    provider.create_account(&acct).await.unwrap();
    let key = provider.issue_key(&acct, &key_request("k1")).await.unwrap();
    let sa = key_client(&key).await;

    hand_made_binding(
        &client,
        &ns,
        "shared-view",
        "ClusterRole",
        "view",
        vec![other_subject("User", "jane"), sa_subject(Some(&ns), "deployer"), sa_subject(Some(&ns), "builder")],
    )
    .await;
    // A ServiceAccount subject without a namespace is in the RoleBinding's.
    hand_made_binding(
        &client,
        &ns,
        "shared-edit",
        "ClusterRole",
        "edit",
        vec![sa_subject(None, "deployer"), other_subject("Group", "qa")],
    )
    .await;
    let hand_cluster = hand_made_cluster_binding(
        &client,
        "kp-shared-view",
        "view",
        vec![sa_subject(Some(&ns), "deployer"), other_subject("User", "jane")],
    )
    .await;
    assert_eq!(
        provider.list_roles(&acct).await.unwrap(),
        vec![grant("edit", Some(&ns)), grant("view", Some("*")), grant("view", Some(&ns)),]
    );
    eventually("pods through the shared bindings", 200, || list_pods(&sa, &ns)).await;

    // No scope is the ServiceAccount's namespace, as for keysmith's grants.
    provider.revoke_role(&acct, &grant("view", None)).await.unwrap();
    let view = get_binding(&client, &ns, "shared-view").await.expect("the binding stays for its other subjects");
    assert_eq!(
        subject_names(view.subjects.as_deref()),
        vec!["User//jane".to_owned(), format!("ServiceAccount/{ns}/builder")]
    );
    provider.revoke_role(&acct, &grant("edit", Some(&ns))).await.unwrap();
    let edit = get_binding(&client, &ns, "shared-edit").await.expect("the binding stays for its other subjects");
    assert_eq!(subject_names(edit.subjects.as_deref()), vec!["Group//qa"]);
    provider.revoke_role(&acct, &grant("view", Some("*"))).await.unwrap();
    let cluster =
        get_cluster_binding(&client, &hand_cluster).await.expect("the ClusterRoleBinding stays for its other subject");
    assert_eq!(subject_names(cluster.subjects.as_deref()), vec!["User//jane"]);

    assert_eq!(provider.list_roles(&acct).await.unwrap(), vec![]);
    eventually("pods after revoke", 403, || list_pods(&sa, &ns)).await;

    drop_cluster_binding(&client, &hand_cluster).await;
    drop_namespace(&client, &ns).await;
}

#[tokio::test]
async fn a_binding_to_a_namespaced_role_is_reported_and_revocable() {
    let (cp, client) = admin().await;
    let ns = namespace(&client, "kp-role").await;
    let provider = provider(cp, &client, false);
    let acct = account(&ns, "reader");
    provider.create_account(&acct).await.unwrap();
    let key = provider.issue_key(&acct, &key_request("k1")).await.unwrap();
    let sa = key_client(&key).await;

    let role = Role {
        metadata: ObjectMeta {
            name: Some("pod-reader".to_owned()),
            namespace: Some(ns.clone()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["pods".to_owned()]),
            verbs: vec!["get".to_owned(), "list".to_owned()],
            ..PolicyRule::default()
        }]),
    };
    Api::<Role>::namespaced(client.clone(), &ns).create(&PostParams::default(), &role).await.unwrap();
    hand_made_binding(&client, &ns, "read-pods", "Role", "pod-reader", vec![sa_subject(Some(&ns), "reader")]).await;
    let reader = grant("Role/pod-reader", Some(&ns));
    assert_eq!(provider.list_roles(&acct).await.unwrap(), vec![reader.clone()]);
    eventually("pods through the Role", 200, || list_pods(&sa, &ns)).await;

    // keysmith grants ClusterRoles only.
    match provider.grant_role(&acct, &reader).await {
        Err(ProviderError::Invalid(message)) => {
            assert!(message.contains("not a ClusterRole name"), "{message}")
        }
        other => panic!("expected Invalid, got {other:?}"),
    }

    provider.revoke_role(&acct, &reader).await.unwrap();
    assert!(get_binding(&client, &ns, "read-pods").await.is_none());
    assert_eq!(provider.list_roles(&acct).await.unwrap(), vec![]);
    eventually("pods after revoke", 403, || list_pods(&sa, &ns)).await;
    Api::<Role>::namespaced(client.clone(), &ns).get("pod-reader").await.expect("the Role itself is left alone");

    drop_namespace(&client, &ns).await;
}

#[tokio::test]
async fn bindings_for_a_same_named_service_account_elsewhere_are_not_the_accounts() {
    let (cp, client) = admin().await;
    let ns = namespace(&client, "kp-twin").await;
    let elsewhere = namespace(&client, "kp-twin-other").await;
    let provider = provider(cp, &client, true);
    let acct = account(&ns, "deployer");
    provider.create_account(&acct).await.unwrap();

    // A ServiceAccount of the same name in another namespace, made by hand,
    // and bindings for it: in its namespace (explicitly and implicitly), in
    // ours, and cluster-wide.
    let twin = ServiceAccount {
        metadata: ObjectMeta { name: Some("deployer".to_owned()), ..ObjectMeta::default() },
        ..ServiceAccount::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), &elsewhere).create(&PostParams::default(), &twin).await.unwrap();
    let theirs = vec![
        hand_made_binding(
            &client,
            &elsewhere,
            "theirs",
            "ClusterRole",
            "edit",
            vec![sa_subject(Some(&elsewhere), "deployer")],
        )
        .await,
        hand_made_binding(
            &client,
            &elsewhere,
            "theirs-implicit",
            "ClusterRole",
            "view",
            vec![sa_subject(None, "deployer")],
        )
        .await,
        hand_made_binding(
            &client,
            &ns,
            "theirs-here",
            "ClusterRole",
            "view",
            vec![sa_subject(Some(&elsewhere), "deployer")],
        )
        .await,
    ];
    let their_cluster =
        hand_made_cluster_binding(&client, "kp-twin-view", "view", vec![sa_subject(Some(&elsewhere), "deployer")])
            .await;
    let their_cluster_version =
        get_cluster_binding(&client, &their_cluster).await.expect("created").metadata.resource_version;

    assert_eq!(provider.list_roles(&acct).await.unwrap(), vec![]);

    // Revoking those grants, or deleting the account, leaves them be.
    for grant in [
        grant("edit", Some(&elsewhere)),
        grant("view", Some(&elsewhere)),
        grant("view", Some(&ns)),
        grant("view", Some("*")),
    ] {
        provider.revoke_role(&acct, &grant).await.unwrap();
    }
    provider.delete_account(&acct).await.unwrap();
    for binding in &theirs {
        let ns = binding.metadata.namespace.as_deref().unwrap();
        let name = binding.metadata.name.as_deref().unwrap();
        let now = get_binding(&client, ns, name).await.expect("untouched");
        assert_eq!(now.metadata.resource_version, binding.metadata.resource_version, "{ns}/{name} was edited");
    }
    assert_eq!(
        get_cluster_binding(&client, &their_cluster).await.expect("untouched").metadata.resource_version,
        their_cluster_version
    );

    // The twin's own IntegrationAccount (another uid) does not own it: its
    // roles can be read, but keysmith edits no binding for it.
    let foreign = account(&elsewhere, "deployer");
    let mut expected = vec![
        grant("edit", Some(&elsewhere)),
        grant("view", Some("*")),
        grant("view", Some(&elsewhere)),
        grant("view", Some(&ns)),
    ];
    expected.sort();
    assert_eq!(provider.list_roles(&foreign).await.unwrap(), expected);
    let err = provider.revoke_role(&foreign, &grant("edit", Some(&elsewhere))).await.unwrap_err();
    assert!(matches!(err, ProviderError::Conflict(_)), "{err:?}");
    provider.delete_account(&foreign).await.expect("delete of a foreign account is a no-op");
    assert!(get_binding(&client, &elsewhere, "theirs").await.is_some());

    drop_cluster_binding(&client, &their_cluster).await;
    drop_namespace(&client, &ns).await;
    drop_namespace(&client, &elsewhere).await;
}

/// The ids of the account's keys, as the provider lists them.
async fn key_ids(provider: &KubernetesProvider, acct: &AccountRequest) -> Vec<String> {
    provider.list_keys(acct).await.expect("list_keys").into_iter().map(|k| k.id).collect()
}

/// Polls `list_roles` until it says `expected`: bindings someone else makes
/// reach the provider through its watch, within milliseconds.
async fn roles_eventually(provider: &KubernetesProvider, acct: &AccountRequest, expected: Vec<RoleGrant>) {
    let start = Instant::now();
    loop {
        let roles = provider.list_roles(acct).await.expect("list_roles");
        if roles == expected {
            return;
        }
        assert!(start.elapsed() < SETTLE, "roles {roles:?}, expected {expected:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn reading_roles_and_keys_costs_no_request_per_account() {
    // Its own user, so that the audit log tells its requests apart from the
    // other tests'.
    let (cp, admin_client) = admin().await;
    let user = "user-5";
    let rights = hand_made_cluster_binding(
        &admin_client,
        "kp-index-admin",
        "cluster-admin",
        vec![Subject {
            kind: "User".to_owned(),
            name: user.to_owned(),
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            ..Subject::default()
        }],
    )
    .await;
    let client = cp.client_for_token(cp.user_token(5).unwrap()).await.unwrap();
    let start = Instant::now();
    while Api::<Namespace>::all(client.clone()).list(&ListParams::default().limit(1)).await.is_err() {
        assert!(start.elapsed() < SETTLE, "{user} never got cluster-admin");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ns = namespace(&admin_client, "kp-index").await;
    let provider = provider(cp, &client, false);
    let accounts: Vec<AccountRequest> = (0..20).map(|i| account(&ns, &format!("robot-{i}"))).collect();
    // One account's key is issued before the watches start (as by an
    // earlier process), the others' after.
    provider.create_account(&accounts[0]).await.unwrap();
    provider.issue_key(&accounts[0], &key_request("early")).await.unwrap();
    assert_eq!(key_ids(&provider, &accounts[0]).await, vec!["early"]);
    for acct in &accounts {
        provider.create_account(acct).await.unwrap();
        provider.grant_role(acct, &grant("view", None)).await.unwrap();
    }
    for acct in &accounts[1..] {
        // Its own key reads back at once, without waiting for the watch.
        provider.issue_key(acct, &key_request("k1")).await.unwrap();
        assert_eq!(key_ids(&provider, acct).await, vec!["k1"]);
    }

    // The first read of roles starts the binding watches (one paged list each).
    provider.list_roles(&accounts[0]).await.unwrap();
    let mark = cp.audit_mark().unwrap();
    for _ in 0..3 {
        for acct in &accounts {
            // Its own grant reads back at once, without waiting for the watch.
            assert_eq!(provider.list_roles(acct).await.unwrap(), vec![grant("view", Some(&ns))]);
            assert_eq!(provider.list_keys(acct).await.unwrap().len(), 1);
        }
    }
    let reads: Vec<String> = cp
        .audit_records_since(mark)
        .unwrap()
        .into_iter()
        .filter(|r| r.user == user && matches!(r.resource.as_str(), "rolebindings" | "clusterrolebindings" | "secrets"))
        .filter(|r| r.verb != "watch")
        .map(|r| format!("{} {}", r.verb, r.request_uri))
        .collect();
    // The watches started before the mark; 60 reads of 20 accounts' roles
    // and keys used to be 120 cluster-wide binding lists and 60 Secret lists.
    assert!(reads.is_empty(), "{reads:#?}");

    // Revoking updates what the provider reads at once, too.
    provider.revoke_role(&accounts[0], &grant("view", None)).await.unwrap();
    assert_eq!(provider.list_roles(&accounts[0]).await.unwrap(), vec![]);
    provider.revoke_key(&accounts[1], "k1").await.unwrap();
    assert_eq!(key_ids(&provider, &accounts[1]).await, Vec::<String>::new());

    drop_cluster_binding(&admin_client, &rights).await;
    drop_namespace(&admin_client, &ns).await;
}

#[tokio::test]
async fn reading_roles_with_a_credential_that_may_not_list_bindings_is_unauthorized() {
    let (cp, _) = admin().await;
    let user = cp.client_for_token(cp.user_token(2).unwrap()).await.unwrap();
    let started = Instant::now();
    let err = provider(cp, &user, false).list_roles(&account("default", "nobody")).await.unwrap_err();
    assert!(matches!(err, ProviderError::Unauthorized(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(15), "reported at once, not after a timeout");
}

#[tokio::test]
async fn verify_connection_tells_a_working_admin_from_a_refused_one() {
    let (cp, client) = admin().await;
    provider(cp, &client, false).verify_connection().await.expect("admin works");

    // An authenticated user without rights.
    let user = cp.client_for_token(cp.user_token(1).unwrap()).await.unwrap();
    let err = provider(cp, &user, false).verify_connection().await.unwrap_err();
    assert!(matches!(err, ProviderError::Unauthorized(_)), "{err:?}");

    // A token the apiserver does not know (401).
    let stranger = cp.client_for_token("not-a-real-token").await.unwrap();
    let err = provider(cp, &stranger, false).verify_connection().await.unwrap_err();
    assert!(matches!(err, ProviderError::Unauthorized(_)), "{err:?}");
    // Admin calls with a refused credential are Unauthorized too.
    let acct = account("default", "nobody");
    let err = provider(cp, &stranger, false).observe_account(&acct).await.unwrap_err();
    assert!(matches!(err, ProviderError::Unauthorized(_)), "{err:?}");
}

#[tokio::test]
async fn from_config_carries_server_and_ca_into_issued_kubeconfigs() {
    let (cp, client) = admin().await;
    let ns = namespace(&client, "kp-config").await;
    let config = kube::Config::from_custom_kubeconfig(cp.kubeconfig(), &KubeConfigOptions::default()).await.unwrap();
    let provider = KubernetesProvider::from_config(config, false).expect("from_config");
    assert_eq!(provider.server_url(), cp.server_url());
    let acct = account(&ns, "configured");
    provider.create_account(&acct).await.unwrap();
    let key = provider.issue_key(&acct, &key_request("k1")).await.unwrap();
    assert_eq!(key.material.expose()["server"], cp.server_url());
    assert_eq!(key.material.expose()["ca.crt"].trim(), cp.ca_pem().trim());
    provider.verify_key(&acct, &key).await.expect("verifies");
    assert_eq!(authenticate(&key_client(&key).await).await, 201);
    drop_namespace(&client, &ns).await;
}

#[test]
fn classify_maps_http_statuses() {
    let api = |code: u16| kube::Error::Api(Status::failure("boom", "Reason").with_code(code).boxed());
    assert!(matches!(kubernetes::classify(api(401)), ProviderError::Unauthorized(_)));
    assert!(matches!(kubernetes::classify(api(403)), ProviderError::Unauthorized(_)));
    assert!(matches!(kubernetes::classify(api(404)), ProviderError::NotFound(_)));
    assert!(matches!(kubernetes::classify(api(409)), ProviderError::Conflict(_)));
    assert!(matches!(kubernetes::classify(api(400)), ProviderError::Invalid(_)));
    assert!(matches!(kubernetes::classify(api(422)), ProviderError::Invalid(_)));
    assert_eq!(
        kubernetes::classify(api(503)),
        ProviderError::Transient { message: "boom (HTTP 503 Reason)".to_owned(), retry_after: None }
    );
    let throttled = Status::failure("slow down", "TooManyRequests").with_code(429).with_details(StatusDetails {
        name: String::new(),
        group: String::new(),
        kind: String::new(),
        uid: String::new(),
        causes: Vec::new(),
        retry_after_seconds: 7,
    });
    match kubernetes::classify(kube::Error::Api(throttled.boxed())) {
        ProviderError::Transient { retry_after, .. } => {
            assert_eq!(retry_after, Some(Duration::from_secs(7)))
        }
        other => panic!("expected Transient, got {other:?}"),
    }
}

#[tokio::test]
async fn connection_failures_are_transient() {
    // Nothing listens on port 9 of 127.0.0.1 (discard): connection refused.
    let config = kube::Config::new("https://127.0.0.1:9".parse().unwrap());
    let provider = KubernetesProvider::from_config(config, false).unwrap();
    let err = provider.verify_connection().await.unwrap_err();
    assert!(matches!(err, ProviderError::Transient { .. }), "{err:?}");
}
