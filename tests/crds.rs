//! The CRD files in crds/ are generated from the Rust types; these tests fail
//! when they drift, and check the CEL rules with kube's CEL evaluator (tests/api.rs
//! proves the apiserver enforces them).

use std::path::Path;

use kube::core::cel::Validator;
use serde_json::{json, Value};

fn crd_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/crds"))
}

#[test]
fn crds_dir_matches_the_rust_types() {
    let crds = keysmith::api::crds();
    let mut expected_files: Vec<String> = crds.iter().map(keysmith::api::crd_file_name).collect();
    for crd in &crds {
        let path = crd_dir().join(keysmith::api::crd_file_name(crd));
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        let generated = keysmith::api::crd_yaml(crd).unwrap();
        assert!(
            on_disk == generated,
            "{} is out of date; regenerate with `cargo run -- crd --output-dir crds`",
            path.display()
        );
    }
    let mut on_disk: Vec<String> =
        std::fs::read_dir(crd_dir()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    on_disk.sort();
    expected_files.sort();
    assert_eq!(on_disk, expected_files, "crds/ holds files no type generates");
}

#[test]
fn crd_command_prints_every_crd() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keysmith")).arg("crd").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut kinds: Vec<String> = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = Value::deserialize(doc).unwrap();
        assert_eq!(value["kind"], "CustomResourceDefinition");
        kinds.push(value["spec"]["names"]["kind"].as_str().unwrap().to_owned());
    }
    kinds.sort();
    assert_eq!(
        kinds,
        ["AppConnection", "ClusterAppConnection", "IntegrationAccount", "KeyRotationPolicy", "RoleBinding"]
    );
}

use serde::Deserialize;

#[test]
fn every_kind_has_short_names_category_status_and_docs() {
    for crd in keysmith::api::crds() {
        let names = &crd.spec.names;
        assert_eq!(crd.spec.group, "keysmith.dev");
        assert_eq!(names.categories.as_deref(), Some(&["keysmith".to_owned()][..]), "{}", names.kind);
        let short = names.short_names.clone().unwrap_or_default();
        assert!(!short.is_empty(), "{} has no short name", names.kind);
        assert!(!short.contains(&"rb".to_owned()), "short names must not collide with RBAC");
        let version = &crd.spec.versions[0];
        assert!(version.subresources.as_ref().unwrap().status.is_some(), "{}", names.kind);
        let columns: Vec<String> =
            version.additional_printer_columns.iter().flatten().map(|c| c.name.clone()).collect();
        assert!(columns.contains(&"Ready".to_owned()), "{}: {columns:?}", names.kind);
        let schema =
            serde_json::to_value(version.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap();
        assert_documented(&names.kind, "", &schema);
    }
}

/// Every property in a schema has a description: it is what `kubectl explain` shows.
fn assert_documented(kind: &str, path: &str, schema: &Value) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            let here = format!("{path}.{name}");
            if here == ".metadata" || here == ".apiVersion" || here == ".kind" {
                continue;
            }
            let doc = prop.get("description").and_then(Value::as_str).unwrap_or("");
            assert!(!doc.trim().is_empty(), "{kind}{here} has no doc comment");
            assert_documented(kind, &here, prop);
        }
    }
    if let Some(items) = schema.get("items") {
        assert_documented(kind, &format!("{path}[]"), items);
    }
}

fn schema_of(kind: &str) -> Value {
    let crd = keysmith::api::crds().into_iter().find(|c| c.spec.names.kind == kind).unwrap();
    serde_json::to_value(crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap()
}

fn messages(result: Result<(), kube::core::cel::ValidationErrors>) -> Vec<String> {
    match result {
        Ok(()) => Vec::new(),
        Err(errs) => errs.into_vec().into_iter().map(|e| e.to_string()).collect(),
    }
}

fn account(connection: &str) -> Value {
    json!({
        "apiVersion": "keysmith.dev/v1alpha1", "kind": "IntegrationAccount",
        "metadata": {"name": "a", "namespace": "n"},
        "spec": {"connectionRef": {"kind": "AppConnection", "name": connection}, "secret": {"name": "s"}, "deletionPolicy": "Delete", "suspend": false}
    })
}

#[test]
fn connection_ref_is_immutable() {
    let schema = schema_of("IntegrationAccount");
    let v = Validator::new();
    assert!(messages(v.validate(&schema, &account("one"), None)).is_empty());
    assert!(messages(v.validate(&schema, &account("one"), Some(&account("one")))).is_empty());
    let errs = messages(v.validate(&schema, &account("two"), Some(&account("one"))));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("connectionRef is immutable"), "{errs:?}");
    // Other fields stay editable.
    let mut edited = account("one");
    edited["spec"]["description"] = json!("now documented");
    assert!(messages(v.validate(&schema, &edited, Some(&account("one")))).is_empty());
}

#[test]
fn account_ref_is_immutable() {
    let schema = schema_of("RoleBinding");
    let binding = |account: &str| {
        json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": "RoleBinding", "metadata": {"name": "b"},
               "spec": {"accountRef": {"name": account}, "roles": ["view"]}})
    };
    let v = Validator::new();
    assert!(messages(v.validate(&schema, &binding("a"), Some(&binding("a")))).is_empty());
    let errs = messages(v.validate(&schema, &binding("b"), Some(&binding("a"))));
    assert!(errs.iter().any(|e| e.contains("accountRef is immutable")), "{errs:?}");
    let mut more_roles = binding("a");
    more_roles["spec"]["roles"] = json!(["view", "edit"]);
    assert!(messages(v.validate(&schema, &more_roles, Some(&binding("a")))).is_empty());
}

#[test]
fn exactly_one_provider_rule() {
    for kind in ["AppConnection", "ClusterAppConnection"] {
        let schema = schema_of(kind);
        let conn = |provider: Value| {
            json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": kind, "metadata": {"name": "c"},
                   "spec": {"provider": provider, "maxKeysPerAccount": 2}})
        };
        let v = Validator::new();
        assert!(messages(v.validate(&schema, &conn(json!({"kubernetes": {}})), None)).is_empty());
        let two = conn(json!({"kubernetes": {}, "scim": {"baseUrl": "https://x", "tokenSecretRef": {"name": "t"}}}));
        let errs = messages(v.validate(&schema, &two, None));
        assert!(errs.iter().any(|e| e.contains("set exactly one provider")), "{kind}: {errs:?}");
    }
}

/// The exactly-one-provider rule lists the providers (the apiserver has no
/// `size()` for objects), so a new provider must be added to it.
#[test]
fn the_provider_rule_names_every_provider() {
    for kind in ["AppConnection", "ClusterAppConnection"] {
        let provider = &schema_of(kind)["properties"]["spec"]["properties"]["provider"];
        let rule = provider["x-kubernetes-validations"][0]["rule"].as_str().unwrap();
        let names: Vec<&String> = provider["properties"].as_object().unwrap().keys().collect();
        assert_eq!(names.len(), 8, "{names:?}");
        for name in names {
            assert!(rule.contains(&format!("has(self.{name})")), "{kind}: {rule} leaves out {name}");
        }
    }
}

#[test]
fn rotation_policy_needs_an_interval_or_a_schedule() {
    let schema = schema_of("KeyRotationPolicy");
    let policy = |spec: Value| json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": "KeyRotationPolicy", "metadata": {"name": "p"}, "spec": spec});
    let v = Validator::new();
    for ok in [
        json!({"rotateEvery": "24h"}),
        json!({"schedule": "0 3 * * *"}),
        json!({"rotateEvery": "1h", "schedule": "@daily"}),
    ] {
        assert!(messages(v.validate(&schema, &policy(ok.clone()), None)).is_empty(), "{ok}");
    }
    let errs = messages(v.validate(&schema, &policy(json!({"gracePeriod": "1h"})), None));
    assert!(errs.iter().any(|e| e.contains("set rotateEvery, schedule, or both")), "{errs:?}");
}

#[test]
fn cron_pattern_accepts_cron_and_refuses_prose() {
    let pattern = regex::Regex::new(keysmith::api::CRON_PATTERN).unwrap();
    for ok in ["0 3 * * SUN", "*/15 * * * *", "0 0 1 1-6/2 MON-FRI", "@daily", "@hourly", "0 3 ? * 1,3,5"] {
        assert!(pattern.is_match(ok), "{ok}");
    }
    for bad in ["every sunday", "0 3 * *", "0 3 * * * *", "@often", "", "0 3 * * SUN;rm"] {
        assert!(!pattern.is_match(bad), "{bad}");
    }
}
