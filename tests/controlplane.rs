//! Integration tests of the local control plane (`keysmith::controlplane`):
//! a real etcd + kube-apiserver + kube-controller-manager, shared by all
//! tests of this binary.

use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Pod, PodSpec, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use keysmith::controlplane::{self, AuditRecord, ControlPlane, OPERATOR_USER};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::Client;

const TIMEOUT: Duration = Duration::from_secs(30);

async fn admin() -> (&'static ControlPlane, Client) {
    // `RUST_LOG=keysmith=debug` shows the control plane's progress.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cp = controlplane::shared().await.expect("control plane starts");
    let client = cp.client().await.expect("admin client");
    (cp, client)
}

/// Create a namespace for one test (names must be unique per test).
async fn namespace(client: &Client, name: &str) {
    let ns = Namespace {
        metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
}

fn expect_status(result: Result<impl std::fmt::Debug, kube::Error>, code: u16) -> String {
    match result {
        Err(kube::Error::Api(status)) if status.code == code => status.message,
        other => panic!("expected HTTP {code}, got {other:?}"),
    }
}

/// Poll `check` until it returns true or TIMEOUT passes.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn default_namespace_exists_and_version_is_the_pinned_release() {
    let (cp, client) = admin().await;
    assert!(cp.server_url().starts_with("https://127.0.0.1:"));
    assert!(cp.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));

    let names: Vec<String> = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list namespaces")
        .items
        .into_iter()
        .filter_map(|ns| ns.metadata.name)
        .collect();
    assert!(names.iter().any(|n| n == "default"), "namespaces: {names:?}");

    let version = client.apiserver_version().await.expect("GET /version");
    let minor: u32 = version.minor.trim_end_matches('+').parse().expect("a numeric minor version");
    assert!((version.major.as_str(), minor) >= ("1", keysmith::install::OLDEST_SUPPORTED_KUBERNETES.1), "{version:?}");
    // Unless KUBEBUILDER_ASSETS names other binaries: exactly the pinned release.
    if let Some(pinned) = controlplane::pinned_kubernetes_version() {
        assert_eq!(version.git_version, format!("v{pinned}"));
    }
}

/// A client from a kubeconfig file, after checking the file is private.
async fn client_from_private_kubeconfig(path: &std::path::Path) -> Client {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path).expect("kubeconfig exists").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", path.display());

    let kubeconfig = kube::config::Kubeconfig::read_from(path).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.expect("kubeconfig loads");
    Client::try_from(config).expect("client")
}

#[tokio::test]
async fn admin_kubeconfig_file_is_private_and_works() {
    let (cp, _) = admin().await;
    let client = client_from_private_kubeconfig(cp.kubeconfig_path()).await;
    Api::<Namespace>::all(client).get("default").await.expect("admin from the kubeconfig file can read namespaces");
}

/// The audit records of `user` in namespace `ns` since `mark`.
fn audit_of(cp: &ControlPlane, mark: usize, user: &str, ns: &str) -> Vec<AuditRecord> {
    cp.audit_records_since(mark)
        .expect("audit log readable")
        .into_iter()
        .filter(|r| r.user == user && r.namespace.as_deref() == Some(ns))
        .collect()
}

#[tokio::test]
async fn operator_kubeconfig_file_is_private_and_authenticates_as_the_operator() {
    let (cp, admin_client) = admin().await;
    assert_ne!(cp.operator_token(), cp.admin_token());
    assert_ne!(cp.operator_kubeconfig_path(), cp.kubeconfig_path());
    let ns = "cp-test-operator-kubeconfig";
    namespace(&admin_client, ns).await;

    let mark = cp.audit_mark().expect("audit mark");
    let client = client_from_private_kubeconfig(cp.operator_kubeconfig_path()).await;
    // system:masters: may read secrets anywhere.
    Api::<Secret>::namespaced(client, ns)
        .list(&ListParams::default())
        .await
        .expect("the operator from its kubeconfig file can list secrets");

    let records = audit_of(cp, mark, OPERATOR_USER, ns);
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0].verb, "list");
    assert_eq!(records[0].resource, "secrets");
    assert_eq!(records[0].code, Some(200));
}

#[tokio::test]
async fn audit_log_records_the_operators_requests() {
    let (cp, admin_client) = admin().await;
    let ns = "cp-test-audit";
    namespace(&admin_client, ns).await;
    let started = SystemTime::now();
    let mark = cp.audit_mark().expect("audit mark");
    assert!(mark > 0, "the readiness checks alone are audited");

    let cms = Api::<ConfigMap>::namespaced(cp.operator_client().await.expect("client"), ns);
    let cm = ConfigMap {
        metadata: ObjectMeta { name: Some("audited".to_owned()), ..ObjectMeta::default() },
        ..ConfigMap::default()
    };
    cms.create(&PostParams::default(), &cm).await.expect("create");
    cms.patch("audited", &PatchParams::default(), &Patch::Merge(serde_json::json!({ "data": { "k": "v" } })))
        .await
        .expect("patch");
    cms.get("audited").await.expect("get");
    cms.list(&ListParams::default()).await.expect("list");
    // The admin's traffic in the same namespace is someone else's.
    Api::<ConfigMap>::namespaced(admin_client, ns).get("audited").await.expect("admin get");

    // Records are written before responses complete: no waiting needed.
    let records = audit_of(cp, mark, OPERATOR_USER, ns);
    let summary: Vec<(&str, &str, Option<&str>, Option<u16>)> =
        records.iter().map(|r| (r.verb.as_str(), r.resource.as_str(), r.name.as_deref(), r.code)).collect();
    assert_eq!(
        summary,
        [
            ("create", "configmaps", Some("audited"), Some(201)),
            ("patch", "configmaps", Some("audited"), Some(200)),
            ("get", "configmaps", Some("audited"), Some(200)),
            ("list", "configmaps", None, Some(200)),
        ],
        "{records:#?}"
    );
    assert_eq!(records.iter().filter(|r| r.is_write()).count(), 2);
    for record in &records {
        assert_eq!(record.api_group, None, "core group");
        assert_eq!(record.subresource, None);
        assert!(
            record.request_uri.starts_with(&format!("/api/v1/namespaces/{ns}/configmaps")),
            "{}",
            record.request_uri
        );
        // Allow for clock granularity between us and the apiserver.
        let slack = Duration::from_secs(1);
        assert!(record.at + slack >= started, "{record:?}");
        assert!(record.at <= SystemTime::now() + slack, "{record:?}");
    }

    let admin_records = audit_of(cp, mark, "admin", ns);
    assert_eq!(admin_records.len(), 1, "{admin_records:#?}");
    assert!(!admin_records[0].is_write());

    // Marks and "since" agree with the full log.
    let all = cp.audit_records().expect("all records");
    assert!(all.len() >= mark + 5);
    assert_eq!(cp.audit_records_since(mark).expect("since"), all[mark..]);
    let later = cp.audit_mark().expect("later mark");
    assert!(later >= all.len());
    assert!(cp.audit_records_since(later).expect("since later").iter().all(|r| r.namespace.as_deref() != Some(ns)));
    assert!(cp.audit_records_since(usize::MAX).expect("past the end").is_empty());
}

#[tokio::test]
async fn unprivileged_user_is_authenticated_but_forbidden() {
    let (cp, _) = admin().await;
    assert!(cp.user_token(0).is_none());
    assert!(cp.user_token(6).is_none());
    let token = cp.user_token(1).expect("user-1 exists");
    assert_ne!(token, cp.admin_token());

    let client = cp.client_for_token(token).await.expect("user-1 client");
    let message = expect_status(Api::<Namespace>::all(client).list(&ListParams::default()).await, 403);
    assert!(message.contains("\"user-1\""), "{message}");

    let anonymous = cp.client_for_token("not-a-token").await.expect("client");
    expect_status(Api::<Namespace>::all(anonymous).list(&ListParams::default()).await, 401);
}

#[tokio::test]
async fn service_account_token_request_authenticates_as_the_service_account() {
    let (cp, client) = admin().await;
    let ns = "cp-test-token-request";
    namespace(&client, ns).await;

    let sas = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    let sa = ServiceAccount {
        metadata: ObjectMeta { name: Some("robot".to_owned()), ..ObjectMeta::default() },
        ..ServiceAccount::default()
    };
    sas.create(&PostParams::default(), &sa).await.expect("create SA");

    let request = TokenRequest {
        spec: TokenRequestSpec { expiration_seconds: Some(600), ..TokenRequestSpec::default() },
        ..TokenRequest::default()
    };
    let issued = sas.create_token_request("robot", &PostParams::default(), &request).await.expect("TokenRequest");
    let token = issued.status.expect("token status").token;
    let expected_user = format!("system:serviceaccount:{ns}:robot");

    // The apiserver resolves the token to the service account.
    let review = Api::<TokenReview>::all(client.clone())
        .create(
            &PostParams::default(),
            &TokenReview {
                spec: TokenReviewSpec { token: Some(token.clone()), ..TokenReviewSpec::default() },
                ..TokenReview::default()
            },
        )
        .await
        .expect("TokenReview");
    let status = review.status.expect("review status");
    assert_eq!(status.authenticated, Some(true), "{:?}", status.error);
    assert_eq!(status.user.and_then(|u| u.username).as_deref(), Some(expected_user.as_str()));

    // A client with that token is authenticated (403, not 401) and has no rights.
    let sa_client = cp.client_for_token(&token).await.expect("SA client");
    let review = Api::<SelfSubjectAccessReview>::all(sa_client.clone())
        .create(
            &PostParams::default(),
            &SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        namespace: Some(ns.to_owned()),
                        verb: Some("list".to_owned()),
                        resource: Some("secrets".to_owned()),
                        ..ResourceAttributes::default()
                    }),
                    ..SelfSubjectAccessReviewSpec::default()
                },
                ..SelfSubjectAccessReview::default()
            },
        )
        .await
        .expect("SelfSubjectAccessReview");
    assert!(!review.status.expect("access review status").allowed);

    let message = expect_status(Api::<Secret>::namespaced(sa_client, ns).list(&ListParams::default()).await, 403);
    assert!(message.contains(&expected_user), "{message}");
}

#[tokio::test]
async fn garbage_collector_deletes_dependents() {
    let (_, client) = admin().await;
    let ns = "cp-test-gc";
    namespace(&client, ns).await;
    let cms = Api::<ConfigMap>::namespaced(client, ns);

    let owner = cms
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta { name: Some("owner".to_owned()), ..ObjectMeta::default() },
                ..ConfigMap::default()
            },
        )
        .await
        .expect("create owner");
    let dependent = ConfigMap {
        metadata: ObjectMeta {
            name: Some("dependent".to_owned()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".to_owned(),
                kind: "ConfigMap".to_owned(),
                name: "owner".to_owned(),
                uid: owner.metadata.uid.expect("owner uid"),
                ..OwnerReference::default()
            }]),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    };
    cms.create(&PostParams::default(), &dependent).await.expect("create dependent");

    cms.delete("owner", &DeleteParams::background()).await.expect("delete owner");
    eventually("the dependent to be garbage-collected", TIMEOUT, || async {
        matches!(cms.get_opt("dependent").await, Ok(None))
    })
    .await;
}

#[tokio::test]
async fn namespace_deletion_completes() {
    let (_, client) = admin().await;
    let ns = "cp-test-ns-deletion";
    namespace(&client, ns).await;
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta { name: Some("content".to_owned()), ..ObjectMeta::default() },
                ..ConfigMap::default()
            },
        )
        .await
        .expect("create configmap");

    let namespaces = Api::<Namespace>::all(client);
    namespaces.delete(ns, &DeleteParams::default()).await.expect("delete namespace");
    eventually("the namespace to be finalized", Duration::from_secs(60), || async {
        matches!(namespaces.get_opt(ns).await, Ok(None))
    })
    .await;
}

#[tokio::test]
async fn pods_are_admitted_with_service_account_tokens() {
    let (_, client) = admin().await;
    let ns = "cp-test-pod-admission";
    namespace(&client, ns).await;
    // The serviceaccount controller creates `default` in the new namespace;
    // admission needs it. It gets no token Secret: pods get bound tokens.
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    eventually("the default service account", TIMEOUT, || async {
        matches!(sas.get_opt("default").await, Ok(Some(_)))
    })
    .await;
    let pod = Pod {
        metadata: ObjectMeta { name: Some("sleeper".to_owned()), ..ObjectMeta::default() },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "main".to_owned(),
                image: Some("registry.invalid/sleeper:1".to_owned()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    let created =
        Api::<Pod>::namespaced(client.clone(), ns).create(&PostParams::default(), &pod).await.expect("pod admitted");
    let spec = created.spec.expect("pod spec");
    assert_eq!(spec.service_account_name.as_deref(), Some("default"));
    // A bound, expiring token through a projected volume, never a Secret.
    let volumes = spec.volumes.unwrap_or_default();
    let token = volumes
        .iter()
        .filter_map(|v| v.projected.as_ref())
        .flat_map(|p| p.sources.iter().flatten())
        .find_map(|s| s.service_account_token.as_ref())
        .expect("a projected service account token volume");
    assert!(token.expiration_seconds.is_some_and(|s| s > 0), "{token:?}");
    assert!(volumes.iter().all(|v| v.secret.is_none()), "{volumes:?}");
    let sa = sas.get("default").await.expect("default service account");
    assert!(sa.secrets.unwrap_or_default().is_empty(), "no legacy token Secret");
    let secrets = Api::<Secret>::namespaced(client, ns).list(&ListParams::default()).await.expect("list secrets");
    assert!(secrets.items.is_empty(), "{:?}", secrets.items.iter().map(|s| &s.metadata.name).collect::<Vec<_>>());
}

#[tokio::test]
async fn server_side_apply_works() {
    let (_, client) = admin().await;
    let ns = "cp-test-apply";
    namespace(&client, ns).await;
    let cms = Api::<ConfigMap>::namespaced(client, ns);
    let params = PatchParams::apply("keysmith-test").force();

    let manifest = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": "applied" },
        "data": { "a": "1" },
    });
    cms.patch("applied", &params, &Patch::Apply(&manifest)).await.expect("first apply creates");

    let manifest = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": "applied" },
        "data": { "b": "2" },
    });
    let applied = cms.patch("applied", &params, &Patch::Apply(&manifest)).await.expect("second apply updates");

    // Fields no longer applied by the sole manager are removed.
    let data = applied.data.expect("data");
    assert_eq!(data.get("b").map(String::as_str), Some("2"));
    assert!(!data.contains_key("a"), "{data:?}");
    let managers: Vec<String> =
        applied.metadata.managed_fields.unwrap_or_default().into_iter().filter_map(|m| m.manager).collect();
    assert!(managers.iter().any(|m| m == "keysmith-test"), "{managers:?}");
}

#[tokio::test]
async fn a_private_control_plane_stops_cleanly() {
    let cp = ControlPlane::start().await.expect("private control plane starts");
    let client = cp.client().await.expect("admin client");
    Api::<Namespace>::all(client.clone()).get("default").await.expect("default namespace");
    let dir = cp.kubeconfig_path().parent().expect("kubeconfig in the temp dir").to_path_buf();
    assert!(dir.is_dir());

    cp.stop();
    assert!(!dir.exists(), "{} is left behind", dir.display());
    assert!(client.apiserver_version().await.is_err(), "the apiserver still answers after stop()");
}

/// tests/bin/kube-assets.sh with a stand-in `go` (the real build takes
/// minutes): it says what it builds and that it is still working, caches by
/// pin, builds nothing when the pin is unchanged, rebuilds when it changes
/// (naming, not deleting, the other pin's build), and returns as soon as the
/// build is done (its progress watcher holds no pipe open).
#[test]
fn the_assets_script_shows_progress_and_rebuilds_only_on_a_new_pin() {
    use std::os::unix::fs::PermissionsExt as _;
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tree = tempfile::tempdir().unwrap();
    let tests = tree.path().join("tests");
    std::fs::create_dir_all(tests.join("bin")).unwrap();
    std::fs::copy(repo.join("tests/bin/kube-assets.sh"), tests.join("bin/kube-assets.sh")).unwrap();
    for (dir, files) in [("kube/1.37", &["go.mod", "go.sum"][..]), ("kube/etcd", &["go.mod", "go.sum", "main.go"][..])]
    {
        std::fs::create_dir_all(tests.join(dir)).unwrap();
        for file in files {
            std::fs::copy(repo.join("tests").join(dir).join(file), tests.join(dir).join(file)).unwrap();
        }
    }
    // A `go` that is new enough, takes 3 s per build and writes empty
    // programs where `-o` says, counting its builds.
    let bin = tree.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fake_go = bin.join("go");
    std::fs::write(
        &fake_go,
        format!(
            r#"#!/bin/sh
case "$1" in
  env) echo go1.99.0 ;;
  version) echo "go version go1.99.0 linux/amd64" ;;
  build)
    echo build >> "{count}"
    sleep 3
    while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done
    case "$out" in
      */) for b in kube-apiserver kube-controller-manager kubectl; do printf '#!/bin/sh\n' > "$out$b"; chmod +x "$out$b"; done ;;
      *) printf '#!/bin/sh\n' > "$out"; chmod +x "$out" ;;
    esac ;;
esac
"#,
            count = tree.path().join("builds").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake_go, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cache = tree.path().join("cache");
    let run = |progress_seconds: &str| {
        let out = std::process::Command::new("bash")
            .arg(tests.join("bin/kube-assets.sh"))
            .env_remove("KUBEBUILDER_ASSETS")
            .env_remove("KEYSMITH_KUBE_VERSION")
            .env("XDG_CACHE_HOME", &cache)
            .env("KEYSMITH_PROGRESS_SECONDS", progress_seconds)
            .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()))
            .output()
            .unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(out.status.success(), "{stderr}");
        let dir = String::from_utf8(out.stdout).unwrap().lines().last().unwrap().to_owned();
        (std::path::PathBuf::from(dir), stderr)
    };
    let builds = || std::fs::read_to_string(tree.path().join("builds")).unwrap_or_default().lines().count();

    let (first, stderr) = run("1");
    let prefix = cache.join("keysmith/kube-1.37.").display().to_string();
    assert!(first.display().to_string().starts_with(&prefix), "{}", first.display());
    for binary in ["kube-apiserver", "kube-controller-manager", "kubectl", "etcd"] {
        assert!(first.join(binary).is_file(), "{binary}");
    }
    assert!(stderr.contains("building Kubernetes 1.37."), "says what it builds:\n{stderr}");
    assert!(stderr.contains("still building kube-apiserver"), "says it is still working:\n{stderr}");
    assert_eq!(builds(), 2, "kube binaries, then etcd");

    let (again, stderr) = run("1");
    assert_eq!(again, first);
    assert!(!stderr.contains("building"), "nothing built for an unchanged pin:\n{stderr}");
    assert_eq!(builds(), 2);

    // A new pin is a new build; the other pin's build is named, and kept.
    let go_sum = tests.join("kube/1.37/go.sum");
    let mut sum = std::fs::read_to_string(&go_sum).unwrap();
    sum.push_str("example.invalid/new v1.0.0 h1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n");
    std::fs::write(&go_sum, sum).unwrap();
    // With a 60 s progress interval: a watcher left holding stdout would keep
    // the caller waiting a minute after the two 3 s builds.
    let started = std::time::Instant::now();
    let (rebuilt, stderr) = run("60");
    assert_ne!(rebuilt, first);
    assert!(rebuilt.join("kube-apiserver").is_file());
    assert!(first.join("kube-apiserver").is_file(), "another checkout may still use it");
    assert!(
        stderr.contains(&format!("still cached (remove it if no checkout uses it): {}", first.display())),
        "{stderr}"
    );
    assert_eq!(builds(), 4);
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(45), "{took:?}: the progress watcher held the output open");
}
