//! The Argo CD health checks in deploy/argocd, run by a real Lua interpreter
//! (Debian's `lua5.4`) against objects whose status a real keysmith operator
//! wrote: every kind Progressing before keysmith acts and again when its
//! spec moves ahead of status, then Healthy, Degraded or Suspended as the
//! operator decides. Also checks that argocd-cm-patch.yaml carries exactly
//! the health.lua files and merges into an existing argocd-cm.

mod common;

use std::{fmt::Write as _, io::Write as _, path::PathBuf, process::Stdio, time::Duration};

use common::{apply_yaml, control_plane, eventually, kubernetes_connection_identity, Operator, TestNamespace};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use keysmith::api::{AppConnection, ClusterAppConnection, IntegrationAccount, KeyRotationPolicy, RoleBinding};
use kube::{
    api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
    Client,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(90);
const KINDS: [&str; 5] =
    ["AppConnection", "ClusterAppConnection", "IntegrationAccount", "KeyRotationPolicy", "RoleBinding"];
const WAITING: &str = "Waiting for keysmith to reconcile";

fn argocd_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy").join("argocd")
}

fn health_lua_path(kind: &str) -> PathBuf {
    argocd_dir().join("keysmith.dev").join(kind).join("health.lua")
}

// ---------------------------------------------------------------------------
// JSON → Lua, and the harness.

/// A Lua string literal holding exactly `s`: quotes, backslashes and control
/// characters escaped (`\ddd`, always three digits), everything else as is
/// (Lua strings are byte strings, so UTF-8 passes through).
fn lua_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_ascii_control() => write!(out, "\\{:03}", c as u32).unwrap(),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A Lua table constructor for a JSON value, shaped as Argo CD hands objects
/// to health checks: objects become tables with string keys, arrays become
/// sequences (from 1), numbers numbers, null nil (a null member is left out).
fn lua_literal(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("nil"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => write!(out, "{i}").unwrap(),
            (None, Some(f)) => write!(out, "{f:?}").unwrap(),
            (None, None) => panic!("number {n} fits neither i64 nor f64"),
        },
        Value::String(s) => lua_string(s, out),
        Value::Array(items) => {
            out.push('{');
            for item in items {
                lua_literal(item, out);
                out.push_str(", ");
            }
            out.push('}');
        }
        Value::Object(members) => {
            out.push('{');
            for (key, member) in members.iter().filter(|(_, v)| !v.is_null()) {
                out.push('[');
                lua_string(key, out);
                out.push_str("] = ");
                lua_literal(member, out);
                out.push_str(", ");
            }
            out.push('}');
        }
    }
}

/// Runs `script` on `obj`: the script is loaded as its own chunk, as Argo CD
/// does, with `obj` as a global and only what Argo CD's VM offers custom
/// checks (base functions, `table`, a few `os` time functions; no `string`
/// or `math` library, and no string methods). The chunk's result must be a
/// valid health table. Its `(status, message)`, or what Lua said went wrong.
/// Panics, never skips, when lua5.4 is missing.
fn try_health_script(script: &std::path::Path, obj: &Value) -> Result<(String, String), String> {
    let mut harness = String::from("local obj = ");
    lua_literal(obj, &mut harness);
    harness.push_str("\nlocal path = ");
    lua_string(&script.display().to_string(), &mut harness);
    harness.push_str(
        r#"
local env = {
  obj = obj,
  assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs, pcall = pcall,
  select = select, tonumber = tonumber, tostring = tostring, type = type, unpack = table.unpack,
  table = table, os = { time = os.time, date = os.date, clock = os.clock },
}
local chunk = assert(loadfile(path, "t", env))
-- Argo CD opens no string library for custom checks: s:find() must fail too.
local string_methods = getmetatable("").__index
getmetatable("").__index = nil
local hs = chunk()
getmetatable("").__index = string_methods
assert(type(hs) == "table", "a health check returns a table, not " .. type(hs))
local valid = { Healthy = true, Progressing = true, Degraded = true, Suspended = true, Missing = true, Unknown = true }
assert(valid[hs.status], "not an Argo CD health status: " .. tostring(hs.status))
assert(hs.message == nil or type(hs.message) == "string", "message is not a string")
io.write(hs.status, "\n", hs.message or "")
"#,
    );
    let mut child = std::process::Command::new("lua5.4")
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lua5.4 runs (Debian package lua5.4; .ci/run installs it)");
    child.stdin.take().unwrap().write_all(harness.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, message) = text.split_once('\n').unwrap();
    Ok((status.to_owned(), message.to_owned()))
}

fn run_health_script(script: &std::path::Path, obj: &Value) -> (String, String) {
    try_health_script(script, obj).unwrap_or_else(|error| {
        panic!("{} failed on {}:\n{error}", script.display(), serde_json::to_string(obj).unwrap())
    })
}

/// The verdict of the kind's health.lua on `obj`.
fn health(obj: &Value) -> (String, String) {
    let kind = obj["kind"].as_str().expect("the object has a kind");
    run_health_script(&health_lua_path(kind), obj)
}

// ---------------------------------------------------------------------------
// The argocd-cm snippet.

fn config_key(kind: &str) -> String {
    format!("resource.customizations.health.keysmith.dev_{kind}")
}

/// argocd-cm-patch.yaml as it must be: every health.lua, verbatim, under
/// its Argo CD key.
fn render_argocd_cm_patch() -> String {
    let mut out = String::from(
        "# Generated from keysmith.dev/*/health.lua by tests/argocd.rs; edit those, then run\n\
         # KEYSMITH_REGENERATE=1 cargo test --test argocd\n\
         #\n\
         # keysmith's Argo CD health checks, as argocd-cm entries. Merge them into\n\
         # the argocd-cm ConfigMap of your Argo CD installation (see README.md):\n\
         #   kubectl -n argocd patch configmap argocd-cm --patch-file argocd-cm-patch.yaml\n\
         apiVersion: v1\n\
         kind: ConfigMap\n\
         metadata:\n  name: argocd-cm\n\
         data:\n",
    );
    for kind in KINDS {
        let script = std::fs::read_to_string(health_lua_path(kind)).unwrap();
        assert!(script.ends_with('\n') && !script.ends_with("\n\n"), "{kind}/health.lua ends with one newline");
        assert!(!script.contains('\t') && !script.contains(" \n"), "{kind}/health.lua: no tabs, no trailing blanks");
        writeln!(out, "  {}: |", config_key(kind)).unwrap();
        for line in script.lines() {
            if line.is_empty() {
                out.push('\n');
            } else {
                writeln!(out, "    {line}").unwrap();
            }
        }
    }
    out
}

#[test]
fn argocd_cm_patch_carries_every_health_lua_verbatim() {
    let path = argocd_dir().join("argocd-cm-patch.yaml");
    let expected = render_argocd_cm_patch();
    if std::env::var_os("KEYSMITH_REGENERATE").is_some() {
        std::fs::write(&path, &expected).unwrap();
    }
    let actual = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        actual == expected,
        "deploy/argocd/argocd-cm-patch.yaml is out of date with the health.lua files; \
         run KEYSMITH_REGENERATE=1 cargo test --test argocd"
    );
    // And YAML reads it back as exactly those scripts.
    let parsed: Value = serde_yaml::from_str(&actual).unwrap();
    let data = parsed["data"].as_object().unwrap();
    assert_eq!(data.len(), KINDS.len());
    for kind in KINDS {
        let script = std::fs::read_to_string(health_lua_path(kind)).unwrap();
        assert_eq!(data[&config_key(kind)].as_str(), Some(script.as_str()), "{kind}");
    }
}

// ---------------------------------------------------------------------------
// The harness itself.

#[test]
fn the_lua_literal_carries_every_json_value_intact() {
    let tricky =
        "quote \" backslash \\ newline \n tab \t cr \r nul \0 bell \u{7} \u{7f} digits after escape \u{1}23 é ✓ 🦀";
    let obj = json!({
        "kind": "Probe",
        "s": tricky,
        "n": 9007199254740993_i64,
        "neg": -3,
        "f": 1.5,
        "big": 1e300,
        "t": true,
        "list": ["a", 2, false, {"k": "v"}],
        "gone": null,
        "weird key \"]=": "ok",
    });
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe.lua");
    std::fs::write(
        &probe,
        r#"
local function seq(t) local n = 0 for _ in ipairs(t) do n = n + 1 end return n end
local ok = obj.s == obj.s and obj.n == 9007199254740993 and obj.neg == -3 and obj.f == 1.5
  and obj.big == 1e300 and obj.t == true and seq(obj.list) == 4 and obj.list[1] == "a"
  and obj.list[2] == 2 and obj.list[3] == false and obj.list[4].k == "v" and obj.gone == nil
  and obj["weird key \"]="] == "ok"
return { status = ok and "Healthy" or "Degraded", message = obj.s }
"#,
    )
    .unwrap();
    let (status, message) = run_health_script(&probe, &obj);
    assert_eq!(status, "Healthy", "every member arrives as the same Lua value");
    assert_eq!(message, tricky, "strings survive byte for byte");
}

#[test]
fn the_harness_withholds_what_argo_cd_withholds() {
    let dir = tempfile::tempdir().unwrap();
    for (name, body, says) in [
        ("string_lib.lua", "return { status = string.upper(\"healthy\") }", "global 'string'"),
        ("string_method.lua", "return { status = (\"Healthy\"):sub(1) }", "attempt to index a string value"),
        ("math_lib.lua", "return { status = math.floor(1) and \"Healthy\" }", "global 'math'"),
        ("io_lib.lua", "io.write(\"x\") return { status = \"Healthy\" }", "global 'io'"),
        ("bad_status.lua", "return { status = \"Fine\" }", "not an Argo CD health status: Fine"),
        ("no_table.lua", "return \"Healthy\"", "returns a table, not string"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        let error = try_health_script(&path, &json!({"kind": "Probe"})).expect_err(name);
        assert!(error.contains(says), "{name}: {error}");
    }
}

// ---------------------------------------------------------------------------
// Status shapes the operator reaches only briefly or on outages, built from
// the conditions its controllers write (src/controller/*.rs).

fn with_status(kind: &str, generation: i64, spec: Value, conditions: Value) -> Value {
    json!({
        "apiVersion": "keysmith.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x", "namespace": "ns", "generation": generation},
        "spec": spec,
        "status": {"observedGeneration": generation, "conditions": conditions},
    })
}

fn cond(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": "2024-01-01T00:00:00Z", "observedGeneration": 1})
}

#[test]
fn transient_states_read_as_progressing_and_hidden_problems_as_degraded() {
    let account = |conditions: Value| with_status("IntegrationAccount", 1, json!({}), conditions);
    let cases = [
        (
            "a Transient target-app outage retries",
            account(json!([
                cond("AccountReady", "False", "Transient", "temporarily unavailable: 503"),
                cond("Ready", "False", "Transient", "temporarily unavailable: 503"),
            ])),
            "Progressing",
            "temporarily unavailable: 503",
        ),
        (
            "Reconciling with nothing failing",
            account(json!([
                cond("AccountReady", "True", "Created", "kubernetes account x exists"),
                cond("Ready", "False", "Reconciling", "keysmith is still working on this account"),
            ])),
            "Progressing",
            "keysmith is still working on this account",
        ),
        (
            "NoKey with nothing failing",
            account(json!([
                cond("AccountReady", "True", "Created", "created"),
                cond("KeyReady", "False", "NoKey", "no key has been published yet"),
                cond("Ready", "False", "NoKey", "no key has been published yet"),
            ])),
            "Progressing",
            "no key has been published yet",
        ),
        (
            "NoKey while a part needs someone to act",
            account(json!([
                cond("AccountReady", "True", "Created", "created"),
                cond("KeyReady", "False", "NoKey", "no key has been published yet"),
                cond("Ready", "False", "NoKey", "no key has been published yet"),
                cond("RolesSynced", "False", "RoleNotGranted", "edit: ClusterRole \"edit\" does not exist"),
            ])),
            "Degraded",
            "edit: ClusterRole \"edit\" does not exist",
        ),
        (
            "a reason keysmith may add later needs a look",
            account(json!([cond("Ready", "False", "SomethingNew", "something new")])),
            "Degraded",
            "something new",
        ),
        ("Ready Unknown", account(json!([cond("Ready", "Unknown", "Checking", "")])), "Progressing", "Checking"),
        ("status without Ready", account(json!([])), "Progressing", WAITING),
        (
            "suspend that keysmith has not seen yet",
            json!({"kind": "IntegrationAccount", "metadata": {"generation": 2}, "spec": {"suspend": true},
                   "status": {"observedGeneration": 1,
                              "conditions": [cond("Ready", "True", "Ready", "in place")]}}),
            "Progressing",
            WAITING,
        ),
        (
            "a RoleBinding whose roles are on their way",
            with_status(
                "RoleBinding",
                1,
                json!({}),
                json!([
                    cond("PolicyViolation", "False", "NoViolation", "every role is allowed"),
                    cond("Ready", "False", "Pending", "not granted yet: view"),
                ]),
            ),
            "Progressing",
            "not granted yet: view",
        ),
        (
            "a connection whose target app is down",
            with_status(
                "ClusterAppConnection",
                3,
                json!({}),
                json!([cond("Ready", "False", "Transient", "temporarily unavailable: timeout")]),
            ),
            "Progressing",
            "temporarily unavailable: timeout",
        ),
        (
            "numbers that arrive as strings still compare as numbers",
            json!({"kind": "KeyRotationPolicy", "metadata": {"generation": "10"},
                   "status": {"observedGeneration": "9", "conditions": [cond("Ready", "True", "Valid", "valid")]}}),
            "Progressing",
            WAITING,
        ),
    ];
    for (what, obj, status, message) in cases {
        assert_eq!(health(&obj), (status.to_owned(), message.to_owned()), "{what}");
    }
}

// ---------------------------------------------------------------------------
// Against the operator.

fn api_resource(kind: &str) -> ApiResource {
    match kind {
        "AppConnection" => ApiResource::erase::<AppConnection>(&()),
        "ClusterAppConnection" => ApiResource::erase::<ClusterAppConnection>(&()),
        "IntegrationAccount" => ApiResource::erase::<IntegrationAccount>(&()),
        "KeyRotationPolicy" => ApiResource::erase::<KeyRotationPolicy>(&()),
        "RoleBinding" => ApiResource::erase::<RoleBinding>(&()),
        other => panic!("not a keysmith kind: {other}"),
    }
}

fn dynamic_api(client: &Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    let resource = api_resource(kind);
    if kind == "ClusterAppConnection" {
        Api::all_with(client.clone(), &resource)
    } else {
        Api::namespaced_with(client.clone(), ns, &resource)
    }
}

/// The object as the apiserver serves it, as JSON (what Argo CD reads).
async fn fetch(client: &Client, ns: &str, kind: &str, name: &str) -> Value {
    let obj = dynamic_api(client, ns, kind).get(name).await.unwrap_or_else(|e| panic!("get {kind} {name}: {e}"));
    serde_json::to_value(&obj).unwrap()
}

fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)
}

fn observed_current(obj: &Value) -> bool {
    obj["status"]["observedGeneration"].as_i64().is_some()
        && obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
}

/// One object, what the operator must write, and what Argo CD must say.
struct Case {
    kind: &'static str,
    name: String,
    /// The condition (type, status, reason) the operator settles on.
    settles_on: (&'static str, &'static str, &'static str),
    /// The Argo CD health status.
    verdict: &'static str,
    /// The condition whose message the verdict must carry.
    message_of: &'static str,
}

fn case(
    kind: &'static str,
    name: impl Into<String>,
    settles_on: (&'static str, &'static str, &'static str),
    verdict: &'static str,
    message_of: &'static str,
) -> Case {
    Case { kind, name: name.into(), settles_on, verdict, message_of }
}

/// Waits until the operator has written the case's condition for the
/// current generation; the object as JSON.
async fn settled(client: &Client, ns: &str, case: &Case) -> Value {
    let (type_, status, reason) = case.settles_on;
    eventually(&format!("{} {} to settle on {type_}={status} ({reason})", case.kind, case.name), WAIT, || async {
        let obj = dynamic_api(client, ns, case.kind).get(&case.name).await.ok()?;
        let obj = serde_json::to_value(&obj).ok()?;
        let c = condition(&obj, type_)?;
        (observed_current(&obj) && c["status"] == status && c["reason"] == reason).then_some(obj)
    })
    .await
}

fn fixtures(ns: &str) -> String {
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
kind: AppConnection
metadata: {{name: refused}}
spec:
  provider: {{kubernetes: {{kubeconfigSecretRef: {{name: refused}}}}}}
  serviceAccountName: keysmith
---
apiVersion: keysmith.dev/v1alpha1
kind: AppConnection
metadata: {{name: unreachable}}
spec:
  provider: {{kubernetes: {{kubeconfigSecretRef: {{name: unreachable}}}}}}
  serviceAccountName: keysmith
---
apiVersion: keysmith.dev/v1alpha1
kind: AppConnection
metadata: {{name: anonymous}}
spec:
  provider: {{kubernetes: {{}}}}
---
apiVersion: keysmith.dev/v1alpha1
kind: KeyRotationPolicy
metadata: {{name: daily}}
spec: {{rotateEvery: 24h}}
---
apiVersion: keysmith.dev/v1alpha1
kind: KeyRotationPolicy
metadata: {{name: broken}}
spec: {{schedule: "61 * * * *"}}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {{name: robot}}
spec:
  connectionRef: {{name: cluster}}
  secret: {{name: robot-key}}
  rotationPolicyRef: {{name: daily}}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {{name: shared}}
spec:
  connectionRef: {{kind: ClusterAppConnection, name: argocd-open-{ns}}}
  secret: {{name: shared-key}}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {{name: lost}}
spec:
  connectionRef: {{name: missing}}
  secret: {{name: lost-key}}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {{name: outsider}}
spec:
  connectionRef: {{kind: ClusterAppConnection, name: argocd-closed-{ns}}}
  secret: {{name: outsider-key}}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {{name: late}}
spec:
  connectionRef: {{name: cluster}}
  secret: {{name: late-key}}
  rotationPolicyRef: {{name: broken}}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {{name: squatter}}
spec:
  connectionRef: {{name: cluster}}
  secret: {{name: taken}}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {{name: paused}}
spec:
  connectionRef: {{name: cluster}}
  secret: {{name: paused-key}}
  suspend: true
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
kind: RoleBinding
metadata: {{name: robot-admin}}
spec:
  accountRef: {{name: robot}}
  roles: ["cluster-admin"]
  scope: "{ns}"
---
apiVersion: keysmith.dev/v1alpha1
kind: RoleBinding
metadata: {{name: lost-view}}
spec:
  accountRef: {{name: lost}}
  roles: ["view"]
---
apiVersion: keysmith.dev/v1alpha1
kind: RoleBinding
metadata: {{name: nobody-view}}
spec:
  accountRef: {{name: nobody}}
  roles: ["view"]
"#
    )
}

fn cluster_fixtures(ns: &str) -> String {
    format!(
        r#"
apiVersion: keysmith.dev/v1alpha1
kind: ClusterAppConnection
metadata: {{name: argocd-open-{ns}}}
spec:
  provider: {{kubernetes: {{}}}}
  namespaceSelector: {{matchLabels: {{keysmith.dev/test: argocd}}}}
---
apiVersion: keysmith.dev/v1alpha1
kind: ClusterAppConnection
metadata: {{name: argocd-closed-{ns}}}
spec:
  provider: {{kubernetes: {{kubeconfigSecretRef: {{name: missing, namespace: "{ns}"}}}}}}
"#
    )
}

async fn create_secret(client: &Client, ns: &str, name: &str, key: &str, value: &str) {
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {key: value}})).unwrap();
    Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await.unwrap();
}

fn print_table(title: &str, rows: &[(String, String, String)]) {
    let width = rows.iter().map(|(object, _, _)| object.len()).max().unwrap_or(0);
    println!("\n{title}");
    for (object, verdict, message) in rows {
        println!("  {object:<width$}  {verdict:<11}  {message}");
    }
}

#[tokio::test]
async fn health_checks_judge_what_the_operator_writes() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    // The prefix labels the namespace keysmith.dev/test=argocd, which the
    // open ClusterAppConnection admits; no other test here uses it.
    let ns = TestNamespace::create(&client, "argocd").await;
    let n = ns.name.as_str();

    // Secrets the fixtures need: a credential the target refuses, one for an
    // apiserver nobody listens on, and an output Secret keysmith did not make.
    let refused = serde_yaml::to_string(&cp.kubeconfig_for_token(cp.user_token(1).unwrap())).unwrap();
    create_secret(&client, n, "refused", "kubeconfig", &refused).await;
    let mut nowhere = cp.kubeconfig_for_token(cp.admin_token());
    for cluster in &mut nowhere.clusters {
        cluster.cluster.as_mut().unwrap().server = Some("https://127.0.0.1:1".into());
    }
    create_secret(&client, n, "unreachable", "kubeconfig", &serde_yaml::to_string(&nowhere).unwrap()).await;
    create_secret(&client, n, "taken", "token", "theirs").await;

    // The kubeconfigs of the two remote connections are read as their
    // ServiceAccount, which may read exactly those.
    let kubeconfigs = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: keysmith-kubeconfigs}
rules: [{apiGroups: [""], resources: ["secrets"], resourceNames: ["refused", "unreachable"], verbs: ["get"]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: keysmith-kubeconfigs}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: keysmith-kubeconfigs}
subjects: [{kind: ServiceAccount, name: keysmith}]
---
"#;
    apply_yaml(&client, n, &(kubernetes_connection_identity(&["view", "edit"]) + kubeconfigs + &fixtures(n))).await;
    for object in keysmith::manifest::parse(&cluster_fixtures(n)).unwrap() {
        keysmith::manifest::apply(&client, &object, "test").await.unwrap();
    }
    let open = format!("argocd-open-{n}");
    let closed = format!("argocd-closed-{n}");

    let cases = [
        case("AppConnection", "cluster", ("Ready", "True", "Verified"), "Healthy", "Ready"),
        case("AppConnection", "refused", ("Ready", "False", "Unauthorized"), "Degraded", "Ready"),
        case("AppConnection", "unreachable", ("Ready", "False", "Transient"), "Progressing", "Ready"),
        case("AppConnection", "anonymous", ("Ready", "False", "ServiceAccountRequired"), "Degraded", "Ready"),
        case("ClusterAppConnection", &open, ("Ready", "True", "Verified"), "Healthy", "Ready"),
        case("ClusterAppConnection", &closed, ("Ready", "False", "Invalid"), "Degraded", "Ready"),
        case("KeyRotationPolicy", "daily", ("Ready", "True", "Valid"), "Healthy", "Ready"),
        case("KeyRotationPolicy", "broken", ("Ready", "False", "Invalid"), "Degraded", "Ready"),
        case("IntegrationAccount", "robot", ("Ready", "True", "Ready"), "Healthy", "Ready"),
        case("IntegrationAccount", "shared", ("Ready", "True", "Ready"), "Healthy", "Ready"),
        case("IntegrationAccount", "lost", ("Ready", "False", "ConnectionNotFound"), "Degraded", "Ready"),
        case("IntegrationAccount", "outsider", ("Ready", "False", "ConnectionNotAdmitted"), "Degraded", "Ready"),
        case("IntegrationAccount", "late", ("Ready", "False", "RotationPolicyInvalid"), "Degraded", "Ready"),
        case("IntegrationAccount", "squatter", ("Ready", "False", "SecretNotOwned"), "Degraded", "Ready"),
        case("IntegrationAccount", "paused", ("Ready", "False", "Suspended"), "Suspended", "Ready"),
        case("RoleBinding", "robot-view", ("Ready", "True", "Granted"), "Healthy", "Ready"),
        case("RoleBinding", "robot-admin", ("PolicyViolation", "True", "RoleDenied"), "Degraded", "PolicyViolation"),
        case("RoleBinding", "lost-view", ("Ready", "False", "ConnectionNotFound"), "Degraded", "Ready"),
        case("RoleBinding", "nobody-view", ("Ready", "False", "AccountNotFound"), "Degraded", "Ready"),
    ];
    for kind in KINDS {
        assert!(cases.iter().any(|c| c.kind == kind), "{kind} is covered");
    }

    // 1. Before keysmith runs: no status, so every object is Progressing.
    let mut table = Vec::new();
    for case in &cases {
        let obj = fetch(&client, n, case.kind, &case.name).await;
        assert!(obj.get("status").is_none_or(Value::is_null), "{} {} has no status yet", case.kind, case.name);
        assert_eq!(health(&obj), ("Progressing".to_owned(), WAITING.to_owned()), "{} {}", case.kind, case.name);
        table.push((format!("{}/{}", case.kind, case.name), "Progressing".to_owned(), WAITING.to_owned()));
    }
    print_table("before the operator runs", &table);

    // 2. What the operator settles on.
    let operator = Operator::start(cp, n, &[]);
    let mut table = Vec::new();
    for case in &cases {
        let obj = settled(&client, n, case).await;
        let message = condition(&obj, case.message_of).unwrap()["message"].as_str().unwrap().to_owned();
        let verdict = health(&obj);
        assert_eq!(
            verdict,
            (case.verdict.to_owned(), message.clone()),
            "{} {}: {}",
            case.kind,
            case.name,
            serde_json::to_string_pretty(&obj["status"]).unwrap()
        );
        table.push((format!("{}/{}", case.kind, case.name), verdict.0, verdict.1));
    }
    print_table("after the operator settles", &table);

    // 3. A spec change keysmith has not acted on yet: status still says
    // Ready, but for an older generation, so Argo CD must not call it Healthy.
    operator.stop().await;
    let bumps = [
        ("AppConnection", "cluster".to_owned(), json!({"spec": {"rateLimit": {"requestsPerSecond": 5}}})),
        ("ClusterAppConnection", open.clone(), json!({"spec": {"rateLimit": {"requestsPerSecond": 5}}})),
        ("KeyRotationPolicy", "daily".to_owned(), json!({"spec": {"rotateEvery": "48h"}})),
        ("IntegrationAccount", "robot".to_owned(), json!({"spec": {"description": "bumped"}})),
        ("RoleBinding", "robot-view".to_owned(), json!({"spec": {"roles": ["view", "edit"]}})),
    ];
    let mut table = Vec::new();
    for (kind, name, patch) in &bumps {
        dynamic_api(&client, n, kind).patch(name, &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
        let obj = fetch(&client, n, kind, name).await;
        assert!(!observed_current(&obj), "{kind} {name}: the generation moved ahead of status");
        assert_eq!(condition(&obj, "Ready").unwrap()["status"], "True", "{kind} {name}: status still says Ready");
        let verdict = health(&obj);
        assert_eq!(verdict, ("Progressing".to_owned(), WAITING.to_owned()), "{kind} {name}");
        table.push((format!("{kind}/{name} (generation ahead)"), verdict.0, verdict.1));
    }

    // 4. Once keysmith catches up they are Healthy again.
    let operator = Operator::start(cp, n, &[]);
    for (kind, name, _) in &bumps {
        let reason = cases.iter().find(|c| c.kind == *kind && &c.name == name).unwrap().settles_on.2;
        let again = case(kind, name.clone(), ("Ready", "True", reason), "Healthy", "Ready");
        let obj = settled(&client, n, &again).await;
        let verdict = health(&obj);
        assert_eq!(verdict.0, "Healthy", "{kind} {name}");
        table.push((format!("{kind}/{name} (caught up)"), verdict.0, verdict.1));
    }
    print_table("spec changed while the operator was down, then caught up", &table);

    for name in [&open, &closed] {
        let _ = Api::<ClusterAppConnection>::all(client.clone()).delete(name, &DeleteParams::default()).await;
    }
    ns.delete().await;
    drop(operator);
}

/// The snippet is a valid patch: merged into an existing argocd-cm it adds
/// the five entries and keeps what was there.
#[tokio::test]
async fn argocd_cm_patch_merges_into_an_existing_config_map() {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "argocdcm").await;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let existing: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "argocd-cm"},
        "data": {"url": "https://argocd.example.com", "resource.customizations.health.example.com_Thing": "return {}"}
    }))
    .unwrap();
    configmaps.create(&PostParams::default(), &existing).await.unwrap();
    let text = std::fs::read_to_string(argocd_dir().join("argocd-cm-patch.yaml")).unwrap();
    let patch: Value = serde_yaml::from_str(&text).unwrap();
    configmaps.patch("argocd-cm", &PatchParams::default(), &Patch::Strategic(&patch)).await.unwrap();
    let data = configmaps.get("argocd-cm").await.unwrap().data.unwrap();
    assert_eq!(data["url"], "https://argocd.example.com");
    assert_eq!(data["resource.customizations.health.example.com_Thing"], "return {}");
    for kind in KINDS {
        assert_eq!(data[&config_key(kind)], std::fs::read_to_string(health_lua_path(kind)).unwrap(), "{kind}");
    }
    ns.delete().await;
}
