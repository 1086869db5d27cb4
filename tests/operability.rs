//! Running keysmith in production: its HTTP endpoints and metrics, and
//! leader election between replicas, each replica its own `keysmith run`
//! process against a real kube-apiserver.

mod common;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use common::{
    apply_yaml, control_plane, eventually, free_port, kubernetes_connection_identity, ready_account, Operator,
    OperatorOptions, TestNamespace,
};
use k8s_openapi::api::{coordination::v1::Lease, rbac::v1::ClusterRoleBinding};
use keysmith::{api::IntegrationAccount, controlplane::ControlPlane};
use kube::{
    api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams},
    Client,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

const ACCOUNT: &str = r#"
apiVersion: keysmith.dev/v1alpha1
kind: AppConnection
metadata: {name: cluster}
spec:
  provider: {kubernetes: {}}
  serviceAccountName: keysmith
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

/// Another IntegrationAccount on the same connection and policy.
fn account_yaml(name: &str) -> String {
    format!(
        "apiVersion: keysmith.dev/v1alpha1\nkind: IntegrationAccount\nmetadata: {{name: {name}}}\nspec:\n  connectionRef: {{name: cluster}}\n  secret: {{name: {name}-key}}\n  rotationPolicyRef: {{name: policy}}\n"
    )
}

/// GET `http://127.0.0.1:<port><path>`: status and body, or None if nothing answers.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let response = reqwest::get(format!("http://127.0.0.1:{port}{path}")).await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

async fn scrape(port: u16) -> String {
    let (status, body) = get(port, "/metrics").await.expect("/metrics answers");
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the sample of `name` whose labels include all of `labels`.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, label_text) = match series.split_once('{') {
            Some((metric, rest)) => (metric, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        if metric != name {
            return None;
        }
        let found: BTreeMap<&str, &str> = label_text
            .split("\",")
            .filter(|pair| !pair.is_empty())
            .filter_map(|pair| {
                let (k, v) = pair.split_once("=\"")?;
                Some((k, v.trim_end_matches('"')))
            })
            .collect();
        labels.iter().all(|(k, v)| found.get(k) == Some(v)).then(|| value.parse().ok()).flatten()
    })
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64()
}

#[tokio::test]
async fn endpoints_report_health_readiness_and_metrics() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "metrics").await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let operator =
        Operator::start_with(cp, &ns.name, &OperatorOptions { args: &["--metrics-addr", &addr], ..Default::default() });

    let (status, body) = eventually("/healthz to answer", WAIT, || get(port, "/healthz")).await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let body = eventually("/readyz to be 200 with the controllers running", WAIT, || async {
        get(port, "/readyz").await.filter(|(status, body)| *status == 200 && body.contains("running")).map(|r| r.1)
    })
    .await;
    assert!(body.starts_with("ok"), "{body}");
    assert_eq!(get(port, "/nope").await.map(|r| r.0), Some(404));

    apply_yaml(&client, &ns.name, &(kubernetes_connection_identity(&["view"]) + ACCOUNT)).await;
    let status = ready_account(&client, &ns.name, "robot").await.status.unwrap();
    let next_rotation = status.next_rotation_at.expect("a next rotation").0.as_second() as f64;
    let robot = [("account", "robot"), ("namespace", ns.name.as_str())];

    let metrics = eventually("the key age of robot", WAIT, || async {
        let metrics = scrape(port).await;
        sample(&metrics, "keysmith_key_age_seconds", &robot).is_some().then_some(metrics)
    })
    .await;
    let age = sample(&metrics, "keysmith_key_age_seconds", &robot).unwrap();
    assert!((0.0..120.0).contains(&age), "a fresh key is young: {age}");
    assert_eq!(sample(&metrics, "keysmith_next_rotation_timestamp_seconds", &robot), Some(next_rotation));
    assert!(next_rotation > unix_now());
    assert!(
        sample(&metrics, "keysmith_key_expiry_timestamp_seconds", &robot).is_some_and(|t| t > unix_now()),
        "TokenRequest tokens expire, in the future"
    );
    let count = |name: &str, labels: &[(&str, &str)]| sample(&metrics, name, labels).unwrap_or(0.0);
    assert!(count("keysmith_reconcile_duration_seconds_count", &[("controller", "IntegrationAccount")]) >= 1.0);
    assert!(count("keysmith_reconcile_duration_seconds_count", &[("controller", "AppConnection")]) >= 1.0);
    assert!(metrics.contains("keysmith_reconcile_duration_seconds_bucket{controller=\"IntegrationAccount\",le=\""));
    for operation in ["verify_connection", "observe_account", "create_account", "issue_key", "verify_key"] {
        let labels = [("provider", "kubernetes"), ("operation", operation), ("outcome", "ok")];
        assert!(count("keysmith_provider_requests_total", &labels) >= 1.0, "{operation} is counted:\n{metrics}");
        assert!(count("keysmith_provider_request_duration_seconds_count", &labels[..2]) >= 1.0, "{operation} is timed");
    }
    assert!(count("keysmith_rotations_total", &[("result", "success"), ("reason", "Initial")]) >= 1.0);
    let connection = format!("AppConnection/{}/cluster", ns.name);
    assert_eq!(count("keysmith_accounts", &[("connection", &connection), ("ready", "true")]), 1.0);
    let conn = [("namespace", ns.name.as_str()), ("connection", "cluster"), ("provider", "kubernetes")];
    assert_eq!(sample(&metrics, "keysmith_connection_ready", &conn), Some(1.0));
    assert_eq!(sample(&metrics, "keysmith_leader", &[]), Some(1.0));

    // The age is computed at scrape time: it grows with no reconcile in between.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = sample(&scrape(port).await, "keysmith_key_age_seconds", &robot).unwrap();
    assert!(later >= age + 1.5, "the age grows between scrapes: {age} then {later}");

    // An account's series go away with it.
    Api::<IntegrationAccount>::namespaced(client.clone(), &ns.name)
        .delete("robot", &DeleteParams::default())
        .await
        .unwrap();
    eventually("robot's series to disappear", WAIT, || async {
        let metrics = scrape(port).await;
        (sample(&metrics, "keysmith_key_age_seconds", &robot).is_none()
            && sample(&metrics, "keysmith_next_rotation_timestamp_seconds", &robot).is_none())
        .then_some(())
    })
    .await;
    let logs = operator.stop().await;
    assert!(logs.contains("trace_id"), "reconciles log a trace id");
    ns.delete().await;
}

/// The holder of the test namespace's `keysmith-leader` Lease.
async fn holder(client: &Client, ns: &str) -> Option<String> {
    let lease = Api::<Lease>::namespaced(client.clone(), ns).get_opt("keysmith-leader").await.ok()??;
    lease.spec?.holder_identity.filter(|h| !h.is_empty())
}

async fn await_holder(client: &Client, ns: &str, identity: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    eventually(&format!("{identity} to hold the lease"), timeout, || async {
        (holder(client, ns).await.as_deref() == Some(identity)).then_some(())
    })
    .await;
    started.elapsed()
}

/// A replica of the operator with leader election on, its Lease in `ns`.
fn replica(cp: &ControlPlane, ns: &str, identity: &str, kubeconfig: Option<&std::path::Path>) -> (Operator, u16) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let args = ["--leader-elect", "--leader-election-namespace", ns, "--metrics-addr", &addr];
    let env = [("POD_NAME", identity)];
    let operator = Operator::start_with(cp, ns, &OperatorOptions { env: &env, args: &args, kubeconfig });
    (operator, port)
}

/// A kubeconfig for the pre-provisioned `user-<n>`, made cluster-admin, so
/// that a replica's requests carry a user name of its own in the audit log.
async fn admin_user(cp: &ControlPlane, client: &Client, n: usize, dir: &std::path::Path) -> PathBuf {
    let user = format!("user-{n}");
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("keysmith-test-{user}-admin")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
    }))
    .unwrap();
    match Api::<ClusterRoleBinding>::all(client.clone()).create(&PostParams::default(), &binding).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => panic!("binding {user}: {error}"),
    }
    let token = cp.user_token(n).unwrap();
    let as_user = cp.client_for_token(token).await.unwrap();
    eventually(&format!("{user} to be cluster-admin"), WAIT, || async {
        Api::<Lease>::all(as_user.clone()).list(&ListParams::default()).await.ok().map(|_| ())
    })
    .await;
    let path = dir.join(format!("{user}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&cp.kubeconfig_for_token(token)).unwrap()).unwrap();
    path
}

#[tokio::test]
async fn a_follower_takes_over_when_the_leader_dies_and_never_acts_before() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "failover").await;
    // Each replica runs as a user of its own, so the apiserver's audit log
    // tells their requests apart exactly (user-4: replica a, user-5: b).
    let dir = tempfile::tempdir().unwrap();
    let (user_a, user_b) = ("user-4", "user-5");
    let kubeconfig_a = admin_user(cp, &client, 4, dir.path()).await;
    let kubeconfig_b = admin_user(cp, &client, 5, dir.path()).await;
    let mark = cp.audit_mark().unwrap();

    let (mut a, port_a) = replica(cp, &ns.name, "replica-a", Some(&kubeconfig_a));
    await_holder(&client, &ns.name, "replica-a", WAIT).await;
    let (b, port_b) = replica(cp, &ns.name, "replica-b", Some(&kubeconfig_b));

    // The leader acts.
    apply_yaml(&client, &ns.name, &(kubernetes_connection_identity(&["view"]) + ACCOUNT)).await;
    ready_account(&client, &ns.name, "robot").await;
    // The follower is synced, ready and not leading.
    let (status, body) = eventually("the follower to be ready", WAIT, || async {
        get(port_b, "/readyz").await.filter(|(status, _)| *status == 200)
    })
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("waiting for leadership"), "{body}");
    assert_eq!(sample(&scrape(port_b).await, "keysmith_leader", &[]), Some(0.0));
    assert_eq!(sample(&scrape(port_a).await, "keysmith_leader", &[]), Some(1.0));
    assert_eq!(holder(&client, &ns.name).await.as_deref(), Some("replica-a"), "exactly one holder");
    assert!(b.logs().contains("waiting for leadership") && !b.logs().contains("acquired leadership"));

    // The leader dies without a word; the follower takes over once the
    // lease runs out (15 s after it last saw a renewal, plus a retry).
    a.kill();
    let killed = SystemTime::now();
    let took = await_holder(&client, &ns.name, "replica-b", Duration::from_secs(25)).await;
    eprintln!("replica-b took over {took:?} after replica-a was killed");
    assert!(took >= Duration::from_secs(10), "not before the lease ran out: {took:?}");

    // The new leader acts.
    apply_yaml(&client, &ns.name, &account_yaml("robot2")).await;
    ready_account(&client, &ns.name, "robot2").await;
    assert!(b.logs().contains("acquired leadership"));

    // Who wrote what, from the apiserver's audit log.
    let records = cp.audit_records_since(mark).unwrap();
    let writes = |user: &str| records.iter().filter(|r| r.user == user && r.is_write()).collect::<Vec<_>>();
    let takeover = writes(user_b)
        .into_iter()
        .find(|r| r.resource == "leases" && r.code == Some(200))
        .expect("replica-b's write that took the lease")
        .at;
    let early: Vec<_> = writes(user_b).into_iter().filter(|r| r.at < takeover).collect();
    assert!(early.is_empty(), "the follower wrote nothing before it led: {early:#?}");
    let acted = |user: &str, resource: &str| {
        writes(user).iter().any(|r| r.resource == resource && r.namespace.as_deref() == Some(&*ns.name))
    };
    assert!(acted(user_a, "serviceaccounts"), "replica-a created robot's ServiceAccount");
    assert!(acted(user_b, "serviceaccounts"), "replica-b created robot2's ServiceAccount");
    let robot2_by_a = writes(user_a).into_iter().filter(|r| r.name.as_deref() == Some("robot2")).count();
    assert_eq!(robot2_by_a, 0, "the dead leader did not act on robot2");
    // (A request already in flight when it died may complete a moment later.)
    let late: Vec<_> = writes(user_a).into_iter().filter(|r| r.at > killed + Duration::from_secs(1)).collect();
    assert!(late.is_empty(), "nothing from replica-a after it was killed: {late:#?}");
    drop(b);
    ns.delete().await;
}

#[tokio::test]
async fn a_leader_stopped_gracefully_hands_over_at_once() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "handover").await;
    let (mut a, _) = replica(cp, &ns.name, "replica-a", None);
    await_holder(&client, &ns.name, "replica-a", WAIT).await;
    let (b, _) = replica(cp, &ns.name, "replica-b", None);
    eventually("the follower to wait for the lease", WAIT, || async {
        b.logs().contains("waiting for leadership").then_some(())
    })
    .await;
    // Let the follower observe a renewal or two.
    tokio::time::sleep(Duration::from_secs(3)).await;

    a.terminate();
    let took = await_holder(&client, &ns.name, "replica-b", Duration::from_secs(10)).await;
    eprintln!("replica-b took over {took:?} after replica-a got SIGTERM");
    assert!(took < Duration::from_secs(5), "the released lease is taken at once, not after 15 s: {took:?}");
    assert_eq!(a.wait_exit(Duration::from_secs(10)).await, Some(0), "a graceful stop exits 0");
    assert!(a.logs().contains("released the leader lease"), "{}", a.logs());

    apply_yaml(&client, &ns.name, &(kubernetes_connection_identity(&["view"]) + ACCOUNT)).await;
    ready_account(&client, &ns.name, "robot").await;
    drop(b);
    ns.delete().await;
}

#[tokio::test]
async fn a_leader_that_loses_its_lease_exits_at_once() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "lostlease").await;
    let (mut a, _) = replica(cp, &ns.name, "replica-a", None);
    await_holder(&client, &ns.name, "replica-a", WAIT).await;
    eventually("the controllers to start", WAIT, || async { a.logs().contains("controllers started").then_some(()) })
        .await;

    // Someone else takes the lease (as a replica that judged it expired would).
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(jiff::Timestamp::now());
    Api::<Lease>::namespaced(client.clone(), &ns.name)
        .patch(
            "keysmith-leader",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": "intruder", "renewTime": now, "acquireTime": now}})),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let code = a.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(1), "losing the lease exits non-zero; logs:\n{}", a.logs());
    assert!(started.elapsed() < Duration::from_secs(5), "at its next renewal: {:?}", started.elapsed());
    assert!(a.logs().contains("lost leadership"));
    assert_eq!(holder(&client, &ns.name).await.as_deref(), Some("intruder"), "and leaves the lease alone");
    ns.delete().await;
}

/// The inventory feed never runs open: asked for without a credential, or
/// with a credentials directory that holds none, `keysmith run` refuses to
/// start and says why.
#[tokio::test]
async fn the_inventory_feed_refuses_to_start_without_a_credential() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "feedcred").await;
    let empty = tempfile::tempdir().unwrap();
    let empty_dir = format!("--inventory-credentials-dir={}", empty.path().display());
    for (args, says) in [
        (vec!["--inventory-addr=127.0.0.1:0"], "needs --inventory-credentials-dir"),
        (vec!["--inventory-addr=127.0.0.1:0", empty_dir.as_str()], "needs a credential"),
    ] {
        let mut operator = Operator::start_with(cp, &ns.name, &OperatorOptions { args: &args, ..Default::default() });
        let code = operator.wait_exit(Duration::from_secs(60)).await;
        assert!(code.is_some_and(|c| c != 0), "{args:?}: exits with an error, got {code:?}");
        let logs = operator.logs();
        assert!(logs.contains(says), "{args:?}: {logs}");
    }
    ns.delete().await;
}
