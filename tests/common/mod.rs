//! Helpers shared by the integration tests: one real control plane per test
//! binary, a fresh namespace per test, kubectl against the control plane.
#![allow(dead_code)]

pub mod fault_proxy;
pub mod recording;

use std::{path::Path, process::Output, time::Duration};

use k8s_openapi::api::core::v1::Namespace;
use keysmith::controlplane::{self, ControlPlane};
use kube::{
    api::{Api, DeleteParams, PostParams},
    Client,
};

/// The shared control plane, with keysmith's CRDs installed and Established.
pub async fn control_plane() -> &'static ControlPlane {
    let cp = controlplane::shared().await.expect("control plane starts");
    let client = cp.client().await.expect("admin client");
    keysmith::install::install_crds(&client, Duration::from_secs(60)).await.expect("CRDs install");
    cp
}

/// A namespace of its own for one test, named after it.
pub struct TestNamespace {
    pub name: String,
    client: Client,
}

impl TestNamespace {
    pub async fn create(client: &Client, prefix: &str) -> Self {
        let suffix: u32 = rand_suffix();
        let name = format!("{prefix}-{suffix:08x}");
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"keysmith.dev/test": prefix}}
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
        Self { name, client: client.clone() }
    }

    /// Deletes the namespace (the controller-manager removes what is in it).
    pub async fn delete(self) {
        let _ = Api::<Namespace>::all(self.client.clone()).delete(&self.name, &DeleteParams::background()).await;
    }
}

fn rand_suffix() -> u32 {
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    nanos ^ (std::process::id() << 16) ^ COUNTER.fetch_add(0x9e37, std::sync::atomic::Ordering::Relaxed)
}

/// Runs kubectl against the control plane as admin.
pub fn kubectl(cp: &ControlPlane, args: &[&str]) -> Output {
    let out = cp
        .kubectl()
        .arg("--kubeconfig")
        .arg(cp.kubeconfig_path())
        .args(args)
        .output()
        .expect("kubectl runs (tests/bin/kube-assets.sh builds it with the control plane)");
    out
}

/// kubectl, asserting success, returning stdout.
pub fn kubectl_ok(cp: &ControlPlane, args: &[&str]) -> String {
    let out = kubectl(cp, args);
    assert!(out.status.success(), "kubectl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The manifests of an examples/ file, as JSON values.
pub fn example(path: &str) -> Vec<serde_json::Value> {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(path);
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect()
}

/// A keysmith operator running as its own process against the control
/// plane, authenticated as the operator user, watching one namespace. Killed
/// when dropped.
pub struct Operator {
    child: std::process::Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// How to start an [`Operator`] beyond its namespace.
#[derive(Default)]
pub struct OperatorOptions<'a> {
    /// Extra environment variables.
    pub env: &'a [(&'a str, &'a str)],
    /// Extra arguments to `keysmith run`. Without `--metrics-addr`, the
    /// endpoints listen on a free loopback port (so operators never collide).
    pub args: &'a [&'a str],
    /// Another kubeconfig than the operator user's.
    pub kubeconfig: Option<&'a Path>,
}

impl Operator {
    /// Starts `keysmith run` for `namespace`, with extra environment variables.
    pub fn start(cp: &ControlPlane, namespace: &str, env: &[(&str, &str)]) -> Operator {
        Self::start_with(cp, namespace, &OperatorOptions { env, ..OperatorOptions::default() })
    }

    /// Starts `keysmith run` for `namespace` with extra arguments, environment
    /// or another kubeconfig.
    pub fn start_with(cp: &ControlPlane, namespace: &str, options: &OperatorOptions) -> Operator {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("operator.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_keysmith"));
        command
            .args(["run", "--namespace", namespace, "--kubeconfig"])
            .arg(options.kubeconfig.unwrap_or(cp.operator_kubeconfig_path()))
            .env("KEYSMITH_LOG", "info,keysmith=debug")
            .env_remove("KEYSMITH_FAILPOINT")
            .env_remove("KEYSMITH_METRICS_ADDR")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .stdout(std::process::Stdio::null())
            .stderr(file);
        if !options.args.iter().any(|a| a.starts_with("--metrics-addr")) {
            command.args(["--metrics-addr", "127.0.0.1:0"]);
        }
        command.args(options.args);
        for (k, v) in options.env {
            command.env(k, v);
        }
        let child = command.spawn().expect("start keysmith run");
        Operator { child, log, _dir: dir }
    }

    /// SIGKILL, as a crash or a lost node would: no cleanup at all.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        let _ = std::process::Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
    }

    /// Everything the operator logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the operator exits by itself; its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }

    /// How the operator ended, if it has (an exit or a signal); does not wait.
    pub fn ended(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The log file's path.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Waits until the operator ends by itself (an exit or a signal).
    pub async fn wait_end(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// SIGTERM, then waits for a graceful exit (SIGKILL after 10 s).
    pub async fn stop(mut self) -> String {
        self.terminate();
        if self.wait_exit(Duration::from_secs(10)).await.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.logs()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `check` every 250 ms until it returns Some, or panics after `timeout`
/// saying what was awaited.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(std::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Applies the objects of a YAML text into `namespace` (server-side apply).
pub async fn apply_yaml(client: &Client, namespace: &str, yaml: &str) {
    for mut object in keysmith::manifest::parse(yaml).expect("valid YAML") {
        if object.types.as_ref().is_some_and(|t| t.kind == "Namespace") {
            continue;
        }
        object.metadata.namespace = Some(namespace.to_owned());
        keysmith::manifest::apply(client, &object, "test").await.expect("apply");
    }
}

/// An object's spec as the apiserver stored it, read back through keysmith's types.
pub async fn stored_spec<K>(client: &Client, ns: &str, name: &str) -> serde_json::Value
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let object = Api::<K>::namespaced(client.clone(), ns).get(name).await.expect("stored");
    serde_json::to_value(&object).expect("JSON")["spec"].clone()
}

/// Every field of `written` is in `stored`, with the same value (the
/// apiserver may add defaults).
pub fn assert_subset(written: &serde_json::Value, stored: &serde_json::Value, at: &str) {
    use serde_json::Value;
    match (written, stored) {
        (Value::Object(written), Value::Object(stored)) => {
            for (key, value) in written {
                let at = format!("{at}.{key}");
                assert_subset(value, stored.get(key).unwrap_or_else(|| panic!("{at} was dropped")), &at);
            }
        }
        // 2 in YAML, 2.0 in a Rust f64.
        (Value::Number(written), Value::Number(stored)) => assert_eq!(written.as_f64(), stored.as_f64(), "{at}"),
        _ => assert_eq!(written, stored, "{at}"),
    }
}

/// Every field each keysmith object in the manifests `text` writes is
/// stored, and reads back through keysmith's own types with the value
/// written (the apiserver may add defaults).
pub async fn assert_manifests_stored(client: &Client, ns: &str, text: &str) {
    use keysmith::api::{AppConnection, IntegrationAccount, KeyRotationPolicy, RoleBinding};
    for object in keysmith::manifest::parse(text).expect("the manifests parse") {
        let (Some(types), Some(name)) = (&object.types, &object.metadata.name) else { continue };
        if !types.api_version.starts_with("keysmith.dev/") {
            continue;
        }
        let written = serde_json::to_value(&object).expect("JSON");
        let stored = match types.kind.as_str() {
            "AppConnection" => stored_spec::<AppConnection>(client, ns, name).await,
            "KeyRotationPolicy" => stored_spec::<KeyRotationPolicy>(client, ns, name).await,
            "IntegrationAccount" => stored_spec::<IntegrationAccount>(client, ns, name).await,
            "RoleBinding" => stored_spec::<RoleBinding>(client, ns, name).await,
            _ => continue,
        };
        assert_subset(&written["spec"], &stored, &format!("{}/{name}.spec", types.kind));
    }
}

/// Waits (up to two minutes) until the IntegrationAccount has acted on its
/// current generation and is Ready; returns it.
pub async fn ready_account(client: &Client, ns: &str, name: &str) -> keysmith::api::IntegrationAccount {
    let api: Api<keysmith::api::IntegrationAccount> = Api::namespaced(client.clone(), ns);
    eventually(&format!("IntegrationAccount {ns}/{name} Ready"), Duration::from_secs(120), || async {
        let account = api.get(name).await.ok()?;
        let status = account.status.as_ref()?;
        (status.common.observed_generation == account.metadata.generation
            && status.common.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        .then_some(account)
    })
    .await
}

/// A Secret's data as text, if the Secret exists.
pub async fn secret_data(client: &Client, ns: &str, name: &str) -> Option<std::collections::BTreeMap<String, String>> {
    let secret =
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns).get_opt(name).await.ok()??;
    secret.data?.into_iter().map(|(k, v)| String::from_utf8(v.0).ok().map(|v| (k, v))).collect()
}

/// The ServiceAccount `keysmith` that a test's namespaced `kubernetes`
/// AppConnection acts as (`serviceAccountName: keysmith`), with what the
/// provider needs in the namespace and `bind` on the ClusterRoles
/// `bindable`, as examples/quickstart sets it up. Namespaces are left out:
/// [`apply_yaml`] puts everything in the test's namespace.
pub fn kubernetes_connection_identity(bindable: &[&str]) -> String {
    connection_identity(&format!(
        r#"
  - {{apiGroups: [""], resources: ["serviceaccounts"], verbs: ["get", "create", "patch", "delete"]}}
  - {{apiGroups: [""], resources: ["serviceaccounts/token"], verbs: ["create"]}}
  - {{apiGroups: [""], resources: ["secrets"], verbs: ["create", "delete"]}}
  - {{apiGroups: ["rbac.authorization.k8s.io"], resources: ["rolebindings"], verbs: ["get", "list", "create", "patch", "delete"]}}
  - {{apiGroups: ["apps"], resources: ["deployments", "statefulsets", "daemonsets"], verbs: ["patch"]}}
  - {{apiGroups: ["rbac.authorization.k8s.io"], resources: ["clusterroles"], resourceNames: {bindable:?}, verbs: ["bind"]}}"#
    ))
}

/// The ServiceAccount `keysmith` that a test's credentialed AppConnection
/// acts as, allowed to read exactly the credential Secret `secret`.
pub fn credential_reader_identity(secret: &str) -> String {
    connection_identity(&format!(
        r#"
  - {{apiGroups: [""], resources: ["secrets"], resourceNames: ["{secret}"], verbs: ["get"]}}"#
    ))
}

/// ServiceAccount `keysmith`, a Role `keysmith-connection` with `rules` (YAML
/// list items), and the RoleBinding between them, followed by `---`.
fn connection_identity(rules: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: ServiceAccount
metadata: {{name: keysmith}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: keysmith-connection}}
rules:{rules}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: keysmith-connection}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: keysmith-connection}}
subjects: [{{kind: ServiceAccount, name: keysmith}}]
---
"#
    )
}

/// The YAML files of `examples/<dir>`, in file order, as one text.
pub fn example_text(dir: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("examples/{dir}: {e}"))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files.iter().map(|f| std::fs::read_to_string(f).expect("readable")).collect::<Vec<_>>().join("\n---\n")
}

/// The kinds of a credentialed provider's example, top to bottom: the
/// namespace, the admin credential and the ServiceAccount that reads it, then
/// keysmith's objects.
pub const CREDENTIALED_EXAMPLE_KINDS: [&str; 9] = [
    "Namespace",
    "Secret",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "AppConnection",
    "KeyRotationPolicy",
    "IntegrationAccount",
    "RoleBinding",
];
