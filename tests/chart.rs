//! The Helm chart (charts/keysmith) and the manifest rendered from it
//! (deploy/keysmith.yaml): lint, schema, the CRD templates against the Rust
//! types, the alert rules against promtool, a server-side dry-run, and a
//! real `helm install` into a real kube-apiserver, after which the operator
//! runs with the chart's ServiceAccount, RBAC and Deployment arguments.
//!
//! Needs helm (`HELM`, else `helm` on PATH) and promtool (`PROMTOOL`, else
//! PATH); .ci/run installs both. A missing tool fails the tests.
//!
//! This binary's control plane gets keysmith's CRDs from `helm install`, not
//! from `keysmith::install::install_crds` (as the other test binaries do):
//! helm refuses to adopt objects it did not create. The install test then
//! runs `install_crds` over the helm-installed CRDs, to show both paths
//! coexist.

mod common;

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::{
    apply_yaml, eventually, kubernetes_connection_identity, ready_account, Operator, OperatorOptions, TestNamespace,
};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        authentication::v1::{TokenRequest, TokenRequestSpec},
        coordination::v1::Lease,
        core::v1::{ConfigMap, Secret, ServiceAccount},
        events::v1::Event,
        rbac::v1::RoleBinding as RbacRoleBinding,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use keysmith::{api::IntegrationAccount, controlplane::ControlPlane};
use kube::{
    api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams},
    Client, ResourceExt,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(120);

/// How deploy/keysmith.yaml is regenerated (its header comment says so too).
const REGENERATE_DEPLOY: &str = "sed -i '/^---$/,$d' deploy/keysmith.yaml && helm template keysmith charts/keysmith \
                                 --kube-version 1.33.0 --namespace keysmith-system --set createNamespace=true \
                                 >> deploy/keysmith.yaml";

/// Every optional part of the chart switched on.
const EVERY_OPTION: &str = "serviceMonitor.enabled=true,prometheusRule.enabled=true,\
                            podDisruptionBudget.enabled=true,createNamespace=true,\
                            rbac.bindableClusterRoles={view,edit},watchNamespace=team,\
                            tenancy.serviceAccountNames={keysmith,connector},\
                            tenancy.defaultServiceAccount=keysmith,\
                            tenancy.denyNamespacedProviders={kubernetes,awsIam},\
                            inventory.enabled=true,inventory.existingSecret=keysmith-inventory";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart_dir() -> PathBuf {
    repo().join("charts/keysmith")
}

/// A tool from its environment variable, else from PATH; missing fails.
fn tool(var: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "{var}={} does not exist", path.display());
        return path;
    }
    // Where .ci/run installs helm, outside the work tree.
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .map(|cache| cache.join("keysmith/helm/node_modules/.bin"));
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain(cache)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{name} is needed: set {var} or put it on PATH (.ci/run installs it)"))
}

/// Runs helm; its output, or the failure's stderr.
fn helm(args: &[&str]) -> Result<String, String> {
    let out = Command::new(tool("HELM", "helm")).args(args).output().expect("helm runs");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

fn helm_ok(args: &[&str]) -> String {
    helm(args).unwrap_or_else(|e| panic!("helm {args:?} failed:\n{e}"))
}

/// `helm template RELEASE charts/keysmith ARGS...` as text; for the oldest
/// supported Kubernetes unless ARGS name a `--kube-version`.
fn template_text(release: &str, args: &[&str]) -> String {
    template_text_result(release, args).unwrap_or_else(|e| panic!("helm template {args:?} failed:\n{e}"))
}

/// `helm template`, or what helm said when it refused.
fn template_text_result(release: &str, args: &[&str]) -> Result<String, String> {
    let chart = chart_dir();
    let mut all = vec!["template", release, chart.to_str().unwrap()];
    let oldest = oldest_supported();
    if !args.contains(&"--kube-version") {
        all.extend_from_slice(&["--kube-version", &oldest]);
    }
    all.extend_from_slice(args);
    helm(&all)
}

/// `1.33.0` for [`keysmith::install::OLDEST_SUPPORTED_KUBERNETES`] (1, 33).
fn oldest_supported() -> String {
    let (major, minor) = keysmith::install::OLDEST_SUPPORTED_KUBERNETES;
    format!("{major}.{minor}.0")
}

#[test]
fn the_chart_refuses_kubernetes_older_than_the_oldest_supported() {
    let (major, minor) = keysmith::install::OLDEST_SUPPORTED_KUBERNETES;
    let chart = chart_dir();
    let older = format!("{major}.{}.9", minor - 1);
    let refused = helm(&["template", "old", chart.to_str().unwrap(), "--kube-version", &older])
        .expect_err("helm renders the chart for a release keysmith does not support");
    assert!(refused.contains("kubeVersion"), "{refused}");
    helm_ok(&["template", "new", chart.to_str().unwrap(), "--kube-version", &oldest_supported()]);
}

/// The supported releases are stated in one voice: the chart's kubeVersion,
/// k8s-openapi's feature, the pins CI builds and runs, and the README.
#[test]
fn supported_kubernetes_versions_are_stated_consistently() {
    let (major, minor) = keysmith::install::OLDEST_SUPPORTED_KUBERNETES;
    let read = |path: &str| std::fs::read_to_string(repo().join(path)).unwrap();
    let chart = read("charts/keysmith/Chart.yaml");
    assert!(chart.contains(&format!("kubeVersion: \">={major}.{minor}.0-0\"")), "Chart.yaml kubeVersion");
    let cargo = read("Cargo.toml");
    assert!(cargo.contains(&format!("features = [\"v{major}_{minor}\"")), "k8s-openapi feature v{major}_{minor}");
    let pins: Vec<String> = std::fs::read_dir(repo().join("tests/kube"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&format!("{major}.")))
        .collect();
    let newest = pins.iter().max_by_key(|p| p[2..].parse::<u32>().unwrap()).unwrap().clone();
    let oldest = format!("{major}.{minor}");
    assert!(pins.contains(&oldest), "tests/kube/{oldest} pins the oldest supported release: {pins:?}");
    let go_mod = read(&format!("tests/kube/{oldest}/go.mod"));
    assert!(go_mod.contains(&format!("k8s.io/kubernetes v{oldest}.")), "tests/kube/{oldest}/go.mod");
    let script = read("tests/bin/kube-assets.sh");
    assert!(script.contains(&format!("NEWEST={newest}\n")), "kube-assets.sh builds {newest} by default");
    let ci = read(".ci/run");
    assert!(
        ci.contains(&format!("\noldest={oldest}\n")) && ci.contains("KEYSMITH_KUBE_VERSION=$oldest cargo test"),
        ".ci/run runs the compatibility tests on {oldest}"
    );
    let readme = read("README.md");
    assert!(
        readme.contains(&format!("Kubernetes {oldest} to {newest}")),
        "README states Kubernetes {oldest} to {newest}"
    );
}

fn parse_documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// `helm template` as objects.
fn render(release: &str, args: &[&str]) -> Vec<Value> {
    parse_documents(&template_text(release, args))
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

/// The kube-apiserver's version, as helm's --kube-version takes it.
async fn server_version(client: &Client) -> String {
    let info = client.apiserver_version().await.unwrap();
    info.git_version.trim_start_matches('v').to_owned()
}

#[test]
fn the_chart_lints_with_defaults_and_with_every_option() {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    helm_ok(&["lint", "--strict", chart]);
    helm_ok(&["lint", "--strict", chart, "--set", EVERY_OPTION]);
    helm_ok(&["lint", "--strict", chart, "--set", "replicas=1,leaderElection.enabled=false,crds.enabled=false"]);
}

#[test]
fn values_are_checked() {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    let version = oldest_supported();
    let template = |set: &str| helm(&["template", "x", chart, "--kube-version", &version, "--set", set]);
    let err = template("logFormat=xml").unwrap_err();
    assert!(err.contains("logFormat"), "{err}");
    let err = template("leaderElection.enable=false").unwrap_err();
    assert!(err.contains("Additional property enable is not allowed"), "a misspelt value is refused: {err}");
    let err = template("leaderElection.enabled=false").unwrap_err();
    assert!(err.contains("replicas > 1 needs leaderElection.enabled"), "{err}");
}

/// The Deployment's pod runs `keysmith run` hardened, with probes on the
/// metrics port and its identity from the downward API.
#[test]
fn the_deployment_runs_keysmith_hardened() {
    let objects = render("keysmith", &["--namespace", "ops"]);
    let deployment = of_kind(&objects, "Deployment")[0];
    assert_eq!(deployment["metadata"]["namespace"], "ops");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        container["args"],
        json!([
            "run",
            "--log-level=info",
            "--log-format=json",
            "--metrics-addr=0.0.0.0:8080",
            "--drift-check-interval=10m",
            "--leader-elect",
            "--leader-election-namespace=ops"
        ])
    );
    assert_eq!(container["ports"][0], json!({"name": "http-metrics", "containerPort": 8080, "protocol": "TCP"}));
    assert_eq!(container["livenessProbe"]["httpGet"], json!({"path": "/healthz", "port": "http-metrics"}));
    assert_eq!(container["readinessProbe"]["httpGet"], json!({"path": "/readyz", "port": "http-metrics"}));
    let env: Vec<(&str, &str)> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap()))
        .collect();
    assert_eq!(env, [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")]);
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());

    // The values that shape the arguments.
    let objects = render(
        "keysmith",
        &[
            "--set",
            "watchNamespace=team,logLevel=debug,logFormat=text,leaderElection.enabled=false,replicas=1,driftCheckInterval=1h",
        ],
    );
    let args = &of_kind(&objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(
        *args,
        json!([
            "run",
            "--log-level=debug",
            "--log-format=text",
            "--metrics-addr=0.0.0.0:8080",
            "--drift-check-interval=1h",
            "--namespace=team"
        ])
    );
    assert!(of_kind(&objects, "Role").is_empty(), "no Lease rights without leader election");

    // The tenancy lockdown values.
    let objects = render(
        "keysmith",
        &["--set", "tenancy.defaultServiceAccount=keysmith,tenancy.denyNamespacedProviders={kubernetes,awsIam}"],
    );
    let args = &of_kind(&objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"];
    let args: Vec<&str> = args.as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(
        args[args.len() - 2..],
        ["--default-service-account=keysmith", "--deny-namespaced-provider=kubernetes,awsIam"]
    );
}

/// No wildcard anywhere in the operator's rights; rbac.bindableClusterRoles
/// names the only ClusterRoles it may bind (by default the two that cannot
/// change RBAC), and tenancy.serviceAccountNames the only ServiceAccounts it
/// may impersonate.
#[test]
fn the_rbac_names_every_right() {
    let objects = render("keysmith", &[]);
    let rules: Vec<&Value> = of_kind(&objects, "ClusterRole")
        .into_iter()
        .chain(of_kind(&objects, "Role"))
        .flat_map(|role| role["rules"].as_array().unwrap())
        .collect();
    for rule in &rules {
        for field in ["apiGroups", "resources", "verbs"] {
            assert!(!rule[field].as_array().unwrap().contains(&json!("*")), "a wildcard in {rule}");
        }
    }
    let rule = |objects: &[Value], verb: &str| -> Value {
        let role = of_kind(objects, "ClusterRole")[0];
        role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["verbs"].as_array().unwrap().contains(&json!(verb)))
            .unwrap()
            .clone()
    };
    assert_eq!(rule(&objects, "bind")["resourceNames"], json!(["view", "edit"]), "a short safe list by default");
    assert_eq!(rule(&objects, "impersonate")["resources"], json!(["serviceaccounts"]), "never users or groups");
    assert_eq!(rule(&objects, "impersonate")["resourceNames"], json!(["keysmith"]));
    let any = render("keysmith", &["--set", "rbac.bindableClusterRoles=null,tenancy.serviceAccountNames=null"]);
    assert!(rule(&any, "bind").get("resourceNames").is_none(), "any ClusterRole when asked for");
    assert!(rule(&any, "impersonate").get("resourceNames").is_none());
    let limited = render("keysmith", &["--set", "rbac.bindableClusterRoles={view}"]);
    assert_eq!(rule(&limited, "bind")["resourceNames"], json!(["view"]));

    // Namespace owners get keysmith's namespaced kinds through aggregation;
    // status and ClusterAppConnections stay the operator's and the admins'.
    let aggregated: Vec<&Value> = of_kind(&objects, "ClusterRole")
        .into_iter()
        .filter(|r| r["metadata"]["labels"].as_object().unwrap().keys().any(|k| k.contains("aggregate-to-")))
        .collect();
    assert_eq!(aggregated.len(), 2);
    for role in aggregated {
        let text = role["rules"].to_string();
        assert!(!text.contains("status") && !text.contains("clusterappconnections"), "{text}");
    }
}

/// The inventory feed is off by default, refuses to render without a
/// credential Secret, and when on mounts that Secret read-only where its
/// argument points, with a port and a Service of its own.
#[test]
fn the_inventory_feed_is_off_by_default_and_never_without_a_credential() {
    let default = render("keysmith", &[]);
    let text = serde_json::to_string(&default).unwrap();
    assert!(!text.contains("inventory"), "off by default");
    let refused = template_text_result("keysmith", &["--set", "inventory.enabled=true"]).expect_err("no Secret named");
    assert!(refused.contains("needs inventory.existingSecret"), "{refused}");

    let objects = render("keysmith", &["--set", "inventory.enabled=true,inventory.existingSecret=feed-credential"]);
    let pod = &of_kind(&objects, "Deployment")[0]["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(args.contains(&"--inventory-addr=0.0.0.0:8081"), "{args:?}");
    let dir = args.iter().find_map(|a| a.strip_prefix("--inventory-credentials-dir=")).expect("a credentials dir");
    let mount = container["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == dir).expect("mounted");
    assert_eq!(mount["readOnly"], true);
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    assert_eq!(volume["secret"]["secretName"], "feed-credential");
    // Readable by the non-root process through its group, by no one else.
    assert_eq!(volume["secret"]["defaultMode"], 0o440);
    assert_eq!(pod["securityContext"]["fsGroup"], pod["securityContext"]["runAsGroup"]);
    assert!(container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "http-inventory" && p["containerPort"] == 8081));
    let services = of_kind(&objects, "Service");
    let feed = services.iter().find(|s| s["metadata"]["name"] == "keysmith-inventory").expect("a feed Service");
    assert_eq!(feed["spec"]["ports"][0]["targetPort"], "http-inventory");
}

/// The Deployment's arguments are ones `keysmith run` takes: clap refuses
/// an unknown flag before it prints the help.
#[test]
fn keysmith_run_understands_the_deployment_arguments() {
    let objects = render("keysmith", &["--set", EVERY_OPTION]);
    let args = &of_kind(&objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"];
    let args: Vec<&str> = args.as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_keysmith")).args(&args).arg("--help").output().unwrap();
    assert!(out.status.success(), "keysmith {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn crd_templates_are_generated_from_the_rust_types() {
    let generated = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keysmith"))
        .args(["crd", "--helm", "--output-dir"])
        .arg(generated.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let in_chart = chart_dir().join("templates/crds");
    let names = |dir: &Path| {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    };
    assert_eq!(names(&in_chart), names(generated.path()), "charts/keysmith/templates/crds holds other files");
    for name in names(generated.path()) {
        let want = std::fs::read_to_string(generated.path().join(&name)).unwrap();
        let have = std::fs::read_to_string(in_chart.join(&name)).unwrap_or_default();
        assert!(
            have == want,
            "charts/keysmith/templates/crds/{name} is out of date; regenerate with \
             `cargo run -- crd --helm --output-dir charts/keysmith/templates/crds`"
        );
    }
}

/// What a rendered CRD says apart from the chart's labels and annotations.
fn without_chart_metadata(crd: &Value) -> Value {
    let mut crd = crd.clone();
    let metadata = crd["metadata"].as_object_mut().unwrap();
    metadata.remove("labels");
    metadata.remove("annotations");
    crd
}

#[test]
fn rendered_crds_are_the_rust_types_with_their_cel_rules() {
    let expected: Vec<Value> =
        keysmith::api::crds().into_iter().map(|crd| serde_json::to_value(crd).unwrap()).collect();
    for version in ["1.33.0", "1.37.2"] {
        let objects = render("keysmith", &["--kube-version", version]);
        let crds: Vec<Value> = of_kind(&objects, "CustomResourceDefinition").into_iter().cloned().collect();
        let bare: Vec<Value> = crds.iter().map(without_chart_metadata).collect();
        assert!(bare == expected, "Kubernetes {version}: the chart's CRDs differ from `keysmith crd`");
        assert!(crds.iter().any(|crd| crd.to_string().contains("x-kubernetes-validations")), "Kubernetes {version}");
        for crd in &crds {
            assert_eq!(crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
            assert_eq!(crd["metadata"]["labels"]["app.kubernetes.io/name"], "keysmith");
        }
    }
    let objects = render("keysmith", &["--set", "crds.keep=false"]);
    for crd in of_kind(&objects, "CustomResourceDefinition") {
        assert!(crd["metadata"].get("annotations").is_none(), "crds.keep=false: no keep annotation");
    }
    let objects = render("keysmith", &["--set", "crds.enabled=false"]);
    assert!(of_kind(&objects, "CustomResourceDefinition").is_empty());
}

#[test]
fn deploy_manifest_is_the_chart_rendered_with_default_values() {
    let path = repo().join("deploy/keysmith.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let body_at = text.find("\n---\n").map(|i| i + 1).expect("deploy/keysmith.yaml: a header comment, then ---");
    let (header, body) = text.split_at(body_at);
    assert!(header.lines().all(|l| l.starts_with('#')), "deploy/keysmith.yaml starts with comment lines only");
    assert!(header.contains(REGENERATE_DEPLOY), "the header says how to regenerate it: {REGENERATE_DEPLOY}");
    let rendered = template_text("keysmith", &["--namespace", "keysmith-system", "--set", "createNamespace=true"]);
    assert!(body == rendered, "deploy/keysmith.yaml is out of date; regenerate it with\n  {REGENERATE_DEPLOY}");
    // What `kubectl apply -f` users get: the namespace first, then the rest in it.
    let objects = parse_documents(body);
    assert_eq!(objects[0]["kind"], "Namespace");
    assert_eq!(objects[0]["metadata"]["name"], "keysmith-system");
    for object in &objects[1..] {
        let kind = object["kind"].as_str().unwrap();
        let cluster_scoped = ["CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"].contains(&kind);
        assert_eq!(
            object["metadata"]["namespace"].as_str(),
            (!cluster_scoped).then_some("keysmith-system"),
            "{kind} {}",
            object["metadata"]["name"]
        );
    }
}

/// Minimal stand-ins for the Prometheus Operator's CRDs, so that the
/// optional ServiceMonitor and PrometheusRule can be applied.
async fn install_monitoring_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (kind, plural) in [("ServiceMonitor", "servicemonitors"), ("PrometheusRule", "prometheusrules")] {
        let name = format!("{plural}.monitoring.coreos.com");
        let crd: CustomResourceDefinition = serde_json::from_value(json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": name},
            "spec": {
                "group": "monitoring.coreos.com",
                "names": {"kind": kind, "plural": plural, "listKind": format!("{kind}List"),
                          "singular": kind.to_lowercase()},
                "scope": "Namespaced",
                "versions": [{"name": "v1", "served": true, "storage": true,
                              "schema": {"openAPIV3Schema": {"type": "object",
                                                             "x-kubernetes-preserve-unknown-fields": true}}}]
            }
        }))
        .unwrap();
        api.patch(&name, &PatchParams::apply("keysmith-chart-test").force(), &Patch::Apply(&crd)).await.unwrap();
        let established = kube::runtime::wait::await_condition(
            api.clone(),
            &name,
            kube::runtime::wait::conditions::is_crd_established(),
        );
        tokio::time::timeout(WAIT, established).await.expect("stand-in CRD Established").unwrap();
    }
}

/// `kubectl apply --server-side --dry-run=server` of a manifest, as admin.
fn server_dry_run(cp: &ControlPlane, manifest: &str) -> String {
    let mut child = cp
        .kubectl()
        .arg("--kubeconfig")
        .arg(cp.kubeconfig_path())
        .args([
            "apply",
            "--server-side",
            "--dry-run=server",
            "--force-conflicts",
            "--field-manager=keysmith-chart-test",
            "-f",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl is installed");
    child.stdin.take().unwrap().write_all(manifest.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the apiserver refused the chart:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn the_rendered_chart_passes_a_server_side_dry_run() {
    let cp = keysmith::controlplane::shared().await.expect("control plane starts");
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "chart-dryrun").await;
    let version = server_version(&client).await;

    let defaults = template_text("dry", &["--namespace", &ns.name, "--kube-version", &version]);
    let out = server_dry_run(cp, &defaults);
    for object in [
        "customresourcedefinition.apiextensions.k8s.io/integrationaccounts.keysmith.dev",
        "deployment.apps/dry-keysmith",
    ] {
        assert!(out.contains(object), "{object} missing from:\n{out}");
    }

    install_monitoring_crds(&client).await;
    let everything =
        template_text("dry", &["--namespace", &ns.name, "--kube-version", &version, "--set", EVERY_OPTION]);
    let out = server_dry_run(cp, &everything);
    for object in [
        "servicemonitor.monitoring.coreos.com/dry-keysmith",
        "prometheusrule.monitoring.coreos.com/dry-keysmith",
        "poddisruptionbudget.policy/dry-keysmith",
    ] {
        assert!(out.contains(object), "{object} missing from:\n{out}");
    }
    ns.delete().await;
}

/// Rules and promtool unit tests for the alerts: each fires on the series
/// that should raise it, with its labels and texts, and not on healthy ones.
const ALERT_TESTS: &str = r#"
rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: keysmith_key_age_seconds{namespace="team", account="old", instance="a"}
        values: 2591000+60x60
      - series: keysmith_key_age_seconds{namespace="team", account="fresh", instance="a"}
        values: 100+60x60
    alert_rule_test:
      - {alertname: KeysmithKeyTooOld, eval_time: 20m, exp_alerts: []}
      - alertname: KeysmithKeyTooOld
        eval_time: 40m
        exp_alerts:
          - exp_labels: {severity: warning, namespace: team, account: old}
            exp_annotations:
              summary: The live key of IntegrationAccount team/old is older than allowed
              description: "Its key is 30d 0h 23m 20s old; the limit is 2592000 seconds. Check its Ready and KeyReady conditions: kubectl -n team describe integrationaccount old"
  - interval: 1m
    input_series:
      - series: keysmith_next_rotation_timestamp_seconds{namespace="team", account="late", instance="a"}
        values: 0x80
      - series: keysmith_next_rotation_timestamp_seconds{namespace="team", account="ontime", instance="a"}
        values: 100000x80
    alert_rule_test:
      - {alertname: KeysmithRotationOverdue, eval_time: 62m, exp_alerts: []}
      - alertname: KeysmithRotationOverdue
        eval_time: 70m
        exp_alerts:
          - exp_labels: {severity: warning, namespace: team, account: late}
            exp_annotations:
              summary: The key rotation of IntegrationAccount team/late is overdue
              description: "It was due 1h 10m 0s ago. Check its KeyReady condition and events: kubectl -n team describe integrationaccount late"
  - interval: 1m
    input_series:
      - series: keysmith_rotations_total{result="failure", reason="Scheduled", instance="a"}
        values: 0+1x40
      - series: keysmith_rotations_total{result="failure", reason="ManualRotation", instance="a"}
        values: 0 1 1x40
      - series: keysmith_rotations_total{result="success", reason="Scheduled", instance="a"}
        values: 0+5x40
    alert_rule_test:
      - alertname: KeysmithRotationFailing
        eval_time: 30m
        exp_alerts:
          - exp_labels: {severity: warning, reason: Scheduled}
            exp_annotations:
              summary: keysmith key rotations keep failing (Scheduled)
              description: "Rotations have failed for 15 minutes or more. Accounts whose KeyReady is False say why: kubectl get integrationaccounts -A"
  - interval: 1m
    input_series:
      - series: keysmith_connection_ready{namespace="team", connection="crm", provider="scim", instance="a"}
        values: 0x30
      - series: keysmith_connection_ready{namespace="team", connection="crm", provider="scim", instance="b"}
        values: 0x30
      - series: keysmith_connection_ready{namespace="team", connection="hr", provider="scim", instance="a"}
        values: 0x30
      - series: keysmith_connection_ready{namespace="team", connection="hr", provider="scim", instance="b"}
        values: 1x30
    alert_rule_test:
      - alertname: KeysmithConnectionNotReady
        eval_time: 20m
        exp_alerts:
          - exp_labels: {severity: critical, namespace: team, connection: crm, provider: scim}
            exp_annotations:
              summary: keysmith cannot use connection crm (scim)
              description: "No account behind it can be provisioned or rotated. Its Ready condition says why: kubectl get appconnections,clusterappconnections -A"
  - interval: 1m
    input_series:
      - series: keysmith_accounts{connection="AppConnection/team/crm", ready="false", instance="a"}
        values: 2x30
      - series: keysmith_accounts{connection="AppConnection/team/crm", ready="true", instance="a"}
        values: 5x30
      - series: keysmith_accounts{connection="AppConnection/team/hr", ready="false", instance="a"}
        values: 0x30
    alert_rule_test:
      - alertname: KeysmithAccountsNotReady
        eval_time: 20m
        exp_alerts:
          - exp_labels: {severity: warning, connection: AppConnection/team/crm}
            exp_annotations:
              summary: 2 IntegrationAccounts of AppConnection/team/crm are not Ready
              description: "Their conditions say why: kubectl get integrationaccounts -A"
  - interval: 1m
    input_series:
      - series: keysmith_account_dormant{namespace="team", account="idle", instance="a"}
        values: 0x10 1x30
      - series: keysmith_account_dormant{namespace="team", account="busy", instance="a"}
        values: 0x40
    alert_rule_test:
      - {alertname: KeysmithAccountDormant, eval_time: 20m, exp_alerts: []}
      - alertname: KeysmithAccountDormant
        eval_time: 30m
        exp_alerts:
          - exp_labels: {severity: info, namespace: team, account: idle}
            exp_annotations:
              summary: IntegrationAccount team/idle is dormant
              description: "No key of it was used for its rotation policy's dormantAfter. Delete it if the integration is gone; its Dormant condition says since when: kubectl -n team describe integrationaccount idle"
  - interval: 1m
    input_series:
      - series: keysmith_leader{instance="a"}
        values: 0x10
      - series: keysmith_leader{instance="b"}
        values: 0x10
    alert_rule_test:
      - alertname: KeysmithNoLeader
        eval_time: 10m
        exp_alerts:
          - exp_labels: {severity: critical}
            exp_annotations:
              summary: keysmith is not running its controllers
              description: "No replica of keysmith in ops holds the leader Lease (or none is scraped): no account is provisioned or rotated. Check its pods and logs."
  - interval: 1m
    input_series:
      - series: keysmith_leader{instance="a"}
        values: 1x10
      - series: keysmith_leader{instance="b"}
        values: 0x10
    alert_rule_test:
      - {alertname: KeysmithNoLeader, eval_time: 10m, exp_alerts: []}
      - {alertname: KeysmithKeyTooOld, eval_time: 10m, exp_alerts: []}
      - {alertname: KeysmithRotationOverdue, eval_time: 10m, exp_alerts: []}
      - {alertname: KeysmithRotationFailing, eval_time: 10m, exp_alerts: []}
      - {alertname: KeysmithConnectionNotReady, eval_time: 10m, exp_alerts: []}
      - {alertname: KeysmithAccountsNotReady, eval_time: 10m, exp_alerts: []}
      - {alertname: KeysmithAccountDormant, eval_time: 10m, exp_alerts: []}
"#;

#[test]
fn the_alerts_fire_when_they_should() {
    let objects = render("keysmith", &["--namespace", "ops", "--set", "prometheusRule.enabled=true"]);
    let rule = of_kind(&objects, "PrometheusRule")[0];
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
    std::fs::write(dir.path().join("tests.yaml"), ALERT_TESTS).unwrap();
    let promtool = tool("PROMTOOL", "promtool");
    for args in [&["check", "rules", "rules.yaml"][..], &["test", "rules", "tests.yaml"][..]] {
        let out = Command::new(&promtool).args(args).current_dir(dir.path()).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let alerts: Vec<&str> =
        rule["spec"]["groups"][0]["rules"].as_array().unwrap().iter().map(|r| r["alert"].as_str().unwrap()).collect();
    for alert in &alerts {
        assert!(ALERT_TESTS.contains(&format!("alertname: {alert}\n")), "{alert} has no firing test");
    }
}

/// A kubeconfig file that authenticates as a ServiceAccount, through a
/// TokenRequest (as a pod's projected token would).
async fn service_account_kubeconfig(cp: &ControlPlane, client: &Client, ns: &str, name: &str, dir: &Path) -> PathBuf {
    let request = TokenRequest {
        spec: TokenRequestSpec { expiration_seconds: Some(3600), ..TokenRequestSpec::default() },
        ..TokenRequest::default()
    };
    let issued = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .expect("a token for the chart's ServiceAccount");
    let token = issued.status.expect("token").token;
    let path = dir.join("keysmith-sa.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&cp.kubeconfig_for_token(&token)).unwrap()).unwrap();
    path
}

/// The kubeconfig keysmith wrote into an output Secret.
async fn kubeconfig_text(client: &Client, ns: &str, secret: &str) -> String {
    let secret = Api::<Secret>::namespaced(client.clone(), ns).get(secret).await.unwrap();
    String::from_utf8(secret.data.unwrap()["kubeconfig"].0.clone()).unwrap()
}

/// A client that authenticates with the kubeconfig keysmith wrote.
async fn client_from_secret(client: &Client, ns: &str, secret: &str) -> Client {
    let text = kubeconfig_text(client, ns, secret).await;
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&text).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
    Client::try_from(config).unwrap()
}

/// The claims of the bearer token in the kubeconfig keysmith wrote (the JWT
/// payload; its signature is the apiserver's business).
async fn token_claims(client: &Client, ns: &str, secret: &str) -> Value {
    let text = kubeconfig_text(client, ns, secret).await;
    let kubeconfig: Value = serde_yaml::from_str(&text).unwrap();
    let token = kubeconfig["users"][0]["user"]["token"].as_str().expect("a bearer token");
    let payload = token.split('.').nth(1).expect("a JWT");
    use base64::Engine as _;
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

async fn list_configmaps(client: &Client, ns: &str) -> u16 {
    match Api::<ConfigMap>::namespaced(client.clone(), ns).list(&ListParams::default()).await {
        Ok(_) => 200,
        Err(kube::Error::Api(status)) => status.code,
        Err(other) => panic!("unexpected error: {other}"),
    }
}

const RELEASE: &str = "keysmith-it";

fn flow(ns: &str, connection: &str) -> String {
    format!(
        r#"
apiVersion: keysmith.dev/v1alpha1
kind: AppConnection
metadata: {{name: cluster}}
spec:
  provider: {{kubernetes: {{}}}}
  serviceAccountName: keysmith
  policy: {{deniedRoles: ["cluster-admin"]}}
---
apiVersion: keysmith.dev/v1alpha1
kind: ClusterAppConnection
metadata: {{name: {connection}}}
spec:
  provider: {{kubernetes: {{}}}}
  namespaceSelector: {{matchLabels: {{keysmith.dev/test: chart-app}}}}
---
apiVersion: keysmith.dev/v1alpha1
kind: KeyRotationPolicy
metadata: {{name: policy}}
spec: {{rotateEvery: 24h, gracePeriod: 15s, restartTargets: [{{kind: Deployment, name: app}}]}}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {{name: robot}}
spec:
  connectionRef: {{name: cluster}}
  secret: {{name: robot-key}}
  rotationPolicyRef: {{name: policy}}
---
apiVersion: keysmith.dev/v1alpha1
kind: RoleBinding
metadata: {{name: robot-view}}
spec:
  accountRef: {{name: robot}}
  roles: ["view"]
  scope: "{ns}"
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {{name: shared-robot}}
spec:
  connectionRef: {{kind: ClusterAppConnection, name: {connection}}}
  secret: {{name: shared-robot-key}}
"#
    )
}

/// The chart installed by helm gives the operator every right it uses: the
/// operator runs with the chart's ServiceAccount token and its Deployment's
/// arguments (leader election included), and the kubernetes-provider flow
/// works end to end without a single refused request.
#[tokio::test]
async fn helm_install_gives_the_operator_every_right_it_needs() {
    let cp = keysmith::controlplane::shared().await.expect("control plane starts");
    let client = cp.client().await.unwrap();
    let release_ns = TestNamespace::create(&client, "chart-release").await;
    let app_ns = TestNamespace::create(&client, "chart-app").await;
    install_monitoring_crds(&client).await;

    let chart = chart_dir();
    let kubeconfig = cp.kubeconfig_path().to_str().unwrap().to_owned();
    let install = [
        "install",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        &release_ns.name,
        "--kubeconfig",
        &kubeconfig,
        "--set",
        "serviceMonitor.enabled=true,prometheusRule.enabled=true,podDisruptionBudget.enabled=true",
        // The narrowest RBAC the flow below can work with (the default
        // differs only in allowing every ClusterRole).
        "--set",
        "rbac.bindableClusterRoles={view}",
    ];
    let notes = helm_ok(&install);
    assert!(notes.contains("kubectl get keysmith -A"), "NOTES.txt says what to do next:\n{notes}");
    keysmith::install::wait_for_crds(&client, WAIT).await.expect("the chart's CRDs are Established");
    // The chart installed them with their CEL rules, which the apiserver enforces.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = crds.get("integrationaccounts.keysmith.dev").await.unwrap();
    assert_eq!(crd.annotations().get("meta.helm.sh/release-name").map(String::as_str), Some(RELEASE));
    assert!(serde_json::to_string(&crd).unwrap().contains("connectionRef is immutable"));
    // The harness's path (server-side apply, field manager keysmith) works over them.
    keysmith::install::install_crds(&client, WAIT).await.expect("install_crds over helm's CRDs");

    // A Deployment whose restart keysmith triggers after a rotation.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &app_ns.name);
    let app: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "app"},
        "spec": {"selector": {"matchLabels": {"app": "app"}},
                 "template": {"metadata": {"labels": {"app": "app"}},
                              "spec": {"containers": [{"name": "app", "image": "example.invalid/app"}]}}}
    }))
    .unwrap();
    deployments.create(&PostParams::default(), &app).await.unwrap();

    // The operator, as the chart's Deployment would run it.
    let dir = tempfile::tempdir().unwrap();
    let sa_kubeconfig = service_account_kubeconfig(cp, &client, &release_ns.name, RELEASE, dir.path()).await;
    let deployment = Api::<Deployment>::namespaced(client.clone(), &release_ns.name).get(RELEASE).await.unwrap();
    let container = &deployment.spec.unwrap().template.spec.unwrap().containers[0];
    let args: Vec<String> = container
        .args
        .clone()
        .unwrap()
        .into_iter()
        .skip(1) // `run`: Operator adds it
        .filter(|a| !a.starts_with("--metrics-addr")) // a free loopback port instead
        .collect();
    assert!(args.contains(&"--leader-elect".to_owned()), "{args:?}");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let pod_name = format!("{RELEASE}-0");
    let env = [("POD_NAME", pod_name.as_str()), ("POD_NAMESPACE", release_ns.name.as_str())];
    let operator = Operator::start_with(
        cp,
        &app_ns.name,
        &OperatorOptions { env: &env, args: &args, kubeconfig: Some(&sa_kubeconfig) },
    );

    let cluster_connection = format!("chart-{}", app_ns.name);
    apply_yaml(
        &client,
        &app_ns.name,
        &(kubernetes_connection_identity(&["view"]) + &flow(&app_ns.name, &cluster_connection)),
    )
    .await;
    let account = ready_account(&client, &app_ns.name, "robot").await;
    ready_account(&client, &app_ns.name, "shared-robot").await;

    // It leads through the chart's Lease rights.
    let lease = Api::<Lease>::namespaced(client.clone(), &release_ns.name).get("keysmith-leader").await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some(pod_name.as_str()));

    // The account's kubeconfig works, with view only.
    let robot = client_from_secret(&client, &app_ns.name, "robot-key").await;
    eventually("view to take effect", WAIT, || async {
        (list_configmaps(&robot, &app_ns.name).await == 200).then_some(())
    })
    .await;
    assert!(Api::<Secret>::namespaced(robot.clone(), &app_ns.name).list(&ListParams::default()).await.is_err());

    // A manual rotation: a new key, published, and the Deployment rolled.
    let first = account.status.unwrap().current_key.unwrap().id;
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &app_ns.name);
    let rotate = json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": "chart-test"}}});
    accounts.patch("robot", &PatchParams::default(), &Patch::Merge(&rotate)).await.unwrap();
    let second = eventually("a new key", WAIT, || async {
        let id = accounts.get("robot").await.ok()?.status?.current_key?.id;
        (id != first).then_some(id)
    })
    .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &app_ns.name);
    eventually("the new key in the Secret", WAIT, || async {
        let secret = secrets.get("robot-key").await.ok()?;
        (secret.annotations().get("keysmith.dev/key-id") == Some(&second)).then_some(())
    })
    .await;
    let rotated = client_from_secret(&client, &app_ns.name, "robot-key").await;
    assert_eq!(list_configmaps(&rotated, &app_ns.name).await, 200, "the new key works");
    // The key is a bound token that expires, and no long-lived token Secret
    // exists beside it for any ServiceAccount keysmith made.
    let claims = token_claims(&client, &app_ns.name, "robot-key").await;
    assert!(claims["exp"].as_i64().is_some(), "{claims}");
    assert_eq!(claims["kubernetes.io"]["serviceaccount"]["name"], "robot", "{claims}");
    assert!(claims["kubernetes.io"]["secret"]["name"].is_string(), "bound to its key anchor: {claims}");
    let robot_sa = Api::<ServiceAccount>::namespaced(client.clone(), &app_ns.name).get("robot").await.unwrap();
    assert!(robot_sa.secrets.unwrap_or_default().is_empty(), "no token Secret listed on the ServiceAccount");
    let token_secrets =
        secrets.list(&ListParams::default().fields("type=kubernetes.io/service-account-token")).await.unwrap();
    assert!(
        token_secrets.items.is_empty(),
        "{:?}",
        token_secrets.items.iter().map(|s| s.name_any()).collect::<Vec<_>>()
    );
    eventually("the Deployment to be rolled", WAIT, || async {
        let app = deployments.get("app").await.ok()?;
        app.spec?.template.metadata?.annotations?.get("keysmith.dev/restartedAt").cloned()
    })
    .await;

    // Events were recorded (events.k8s.io).
    let events = Api::<Event>::namespaced(client.clone(), &app_ns.name).list(&ListParams::default()).await.unwrap();
    assert!(
        events.items.iter().any(|e| e.reporting_controller.as_deref() == Some("keysmith")),
        "keysmith published events"
    );

    // Deleting the account deprovisions it.
    accounts.delete("robot", &DeleteParams::default()).await.unwrap();
    eventually("the IntegrationAccount to be gone", WAIT, || async {
        accounts.get_opt("robot").await.ok()?.is_none().then_some(())
    })
    .await;
    let service_accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &app_ns.name);
    assert!(service_accounts.get_opt("robot").await.unwrap().is_none(), "the ServiceAccount is deleted");
    let bindings = Api::<RbacRoleBinding>::namespaced(client.clone(), &app_ns.name)
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=keysmith"))
        .await
        .unwrap();
    assert!(bindings.items.iter().all(|b| !b.name_any().starts_with("keysmith-robot-")), "its RoleBinding is gone");

    let logs = operator.stop().await;
    assert!(!logs.to_lowercase().contains("forbidden"), "a request was refused: the chart's RBAC falls short:\n{logs}");

    // Upgrading updates the release (CRDs included); uninstalling keeps the CRDs.
    let mut upgrade = install;
    upgrade[0] = "upgrade";
    helm_ok(&upgrade);
    helm_ok(&["uninstall", RELEASE, "--namespace", &release_ns.name, "--kubeconfig", &kubeconfig]);
    assert!(crds.get_opt("integrationaccounts.keysmith.dev").await.unwrap().is_some(), "crds.keep keeps the CRDs");
    let sa = Api::<ServiceAccount>::namespaced(client.clone(), &release_ns.name).get_opt(RELEASE).await.unwrap();
    assert!(sa.is_none(), "the rest of the release is gone");

    let _ = Api::<keysmith::api::ClusterAppConnection>::all(client.clone())
        .delete(&cluster_connection, &DeleteParams::default())
        .await;
    app_ns.delete().await;
    release_ns.delete().await;
}
