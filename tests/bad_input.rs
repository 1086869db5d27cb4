//! Bad input never churns the target app. An IntegrationAccount the
//! apiserver accepts but whose output Secret keysmith cannot write once had
//! the operator issue a key, fail to publish it, revoke it as untracked and
//! start again, every few seconds, forever. Here each such input, as a new
//! user would write it, with the controllers in this process over a
//! recording fake of the target app: the exact number of keys issued, the
//! condition and event naming the cause, and recovery once it is fixed.
//!
//! - a Secret the apiserver refuses (an invalid label; a ResourceQuota):
//!   caught by a dry run before any key is issued;
//! - a Secret refused only for real (an admission policy that lets dry runs
//!   through): the key issued is kept and published once the cause is gone;
//! - a rename of a data key the provider does not write (knowable only from
//!   the issued key): the key is kept and published once the spec is fixed.

mod common;

use std::time::Duration;

use common::{
    apply_yaml, control_plane, eventually, kubectl_ok, kubernetes_connection_identity, ready_account,
    recording::{fake_connection, InProcess, Recording},
    TestNamespace,
};
use k8s_openapi::api::{core::v1::Secret, events::v1::Event};
use keysmith::api::IntegrationAccount;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};

fn key_ready(account: &IntegrationAccount) -> Option<(String, String)> {
    let c = account.status.as_ref()?.common.conditions.iter().find(|c| c.type_ == "KeyReady")?;
    Some((c.reason.clone(), c.message.clone()))
}

async fn waiting_on(accounts: &Api<IntegrationAccount>, name: &str, reason: &str) -> String {
    for _ in 0..120 {
        if let Some((got, message)) = accounts.get(name).await.ok().as_ref().and_then(key_ready) {
            if got == reason {
                return message;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let last = accounts.get(name).await.ok().and_then(|a| a.status);
    panic!("{name}: KeyReady never {reason}; status: {last:#?}");
}

async fn event_notes(client: &kube::Client, ns: &str, reason: &str) -> Vec<String> {
    let events = Api::<Event>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap();
    events.items.into_iter().filter(|e| e.reason.as_deref() == Some(reason)).filter_map(|e| e.note).collect()
}

/// Waits until the apiserver refuses to create the Secret `name` (as a dry
/// run, or for real): admission policies and quotas take a moment to apply.
async fn refused_from_now_on(client: &kube::Client, ns: &str, name: &str, dry_run: bool) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret: Secret = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    let params = kube::api::PostParams { dry_run, ..Default::default() };
    eventually(&format!("Secret {name} to be refused"), Duration::from_secs(30), || async {
        match secrets.create(&params, &secret).await {
            Ok(_) => {
                if !dry_run {
                    let _ = secrets.delete(name, &DeleteParams::default()).await;
                }
                None
            }
            Err(_) => Some(()),
        }
    })
    .await;
}

fn account(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: keysmith.dev/v1alpha1\nkind: IntegrationAccount\nmetadata: {{name: {name}}}\nspec:\n  connectionRef: {{name: fake}}\n  secret:\n    name: {name}-key\n{extra}"
    )
}

#[tokio::test]
async fn inputs_keysmith_cannot_act_on_never_cost_a_second_key() {
    // Before any thread of this process reads the environment: this binary
    // holds this one test.
    std::env::set_var(keysmith::provider::noop::ENABLE_ENV, "1");
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "badinput").await;
    apply_yaml(&client, &ns.name, &kubernetes_connection_identity(&[])).await;
    apply_yaml(&client, &ns.name, &fake_connection("")).await;
    // Refused only for real: dry runs pass, so keysmith issues, then cannot publish.
    let gate = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        gate.path(),
        format!(
            r#"
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: gate-{ns}}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - {{apiGroups: [""], apiVersions: ["v1"], operations: ["CREATE", "UPDATE"], resources: ["secrets"]}}
  validations:
  - expression: "request.dryRun == true || object.metadata.name != 'gated-key'"
    message: "gated-key may not be written yet"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: gate-{ns}}}
spec:
  policyName: gate-{ns}
  validationActions: [Deny]
  matchResources:
    namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}
"#,
            ns = ns.name
        ),
    )
    .unwrap();
    kubectl_ok(cp, &["apply", "-f", gate.path().to_str().unwrap()]);
    refused_from_now_on(&client, &ns.name, "gated-key", false).await;

    let fake = Recording::new();
    let operator = InProcess::start(cp, &ns.name, &fake).await;
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let issued = |name: &str| fake.changes(name).iter().filter(|c| c.starts_with("issue_key ")).count();
    let revoked = |name: &str| fake.changes(name).iter().filter(|c| c.starts_with("revoke_key ")).count();

    // An invalid label key: the schema cannot say (labels are free-form),
    // the apiserver refuses the Secret.
    apply_yaml(&client, &ns.name, &account("labelled", "    labels: {\"team name\": payments}\n")).await;
    let message = waiting_on(&accounts, "labelled", "SecretNotWritable").await;
    assert!(message.contains("Secret labelled-key cannot be written"), "{message}");
    assert!(message.contains("team name"), "names the label: {message}");
    assert!(message.contains("no key is issued until it can be"), "{message}");
    // A real rename of a data key the provider does not write.
    apply_yaml(&client, &ns.name, &account("renamed", "    keys: {password: PASSWORD}\n")).await;
    // The gated Secret.
    apply_yaml(&client, &ns.name, &account("gated", "")).await;
    let message = waiting_on(&accounts, "gated", "SecretNotWritable").await;
    assert!(message.contains("gated-key may not be written yet"), "{message}");
    let gated_key = fake
        .changes("gated")
        .iter()
        .find_map(|c| c.strip_prefix("verify_key gated ").map(str::to_owned))
        .expect("the gated key was verified");
    assert!(message.contains(&format!("key {gated_key} is kept until it can be published")), "{message}");
    let message = waiting_on(&accounts, "renamed", "InvalidSecretSpec").await;
    assert!(message.contains("the provider writes no key named password"), "{message}");

    // Long enough for several retries: nothing more is issued or revoked.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!((issued("labelled"), revoked("labelled")), (0, 0), "{:?}", fake.changes("labelled"));
    assert_eq!((issued("gated"), revoked("gated")), (1, 0), "{:?}", fake.changes("gated"));
    assert_eq!((issued("renamed"), revoked("renamed")), (1, 0), "{:?}", fake.changes("renamed"));
    let verified = fake.changes("renamed").iter().filter(|c| c.starts_with("verify_key ")).count();
    assert_eq!(verified, 1, "the held key is not verified again and again: {:?}", fake.changes("renamed"));
    let notes = event_notes(&client, &ns.name, "SecretNotWritable").await;
    assert!(notes.iter().any(|n| n.contains("labelled-key")), "{notes:?}");
    assert!(notes.iter().any(|n| n.contains("gated-key")), "{notes:?}");

    // A quota on Secrets: refused by the dry run too.
    apply_yaml(
        &client,
        &ns.name,
        "apiVersion: v1\nkind: ResourceQuota\nmetadata: {name: no-secrets}\nspec: {hard: {secrets: \"0\"}}\n",
    )
    .await;
    refused_from_now_on(&client, &ns.name, "quota-key", true).await;
    apply_yaml(&client, &ns.name, &account("quota", "")).await;
    let message = waiting_on(&accounts, "quota", "SecretNotWritable").await;
    assert!(message.contains("exceeded quota"), "{message}");
    assert_eq!(issued("quota"), 0, "{:?}", fake.changes("quota"));

    // Each fixed: published, with the key already issued where there was one.
    let fix = |name: &str, spec: serde_json::Value| {
        let accounts = accounts.clone();
        let name = name.to_owned();
        async move {
            let patch = serde_json::json!({"spec": {"secret": spec}});
            accounts.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        }
    };
    fix("labelled", serde_json::json!({"labels": {"team name": null, "team": "payments"}})).await;
    fix("renamed", serde_json::json!({"keys": {"password": null, "token": "PASSWORD"}})).await;
    Api::<k8s_openapi::api::core::v1::ResourceQuota>::namespaced(client.clone(), &ns.name)
        .delete("no-secrets", &DeleteParams::default())
        .await
        .unwrap();
    kubectl_ok(cp, &["delete", "validatingadmissionpolicybinding", &format!("gate-{}", ns.name)]);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    for name in ["labelled", "renamed", "gated", "quota"] {
        let ready = ready_account(&client, &ns.name, name).await;
        let current = ready.status.unwrap().current_key.unwrap().id;
        assert_eq!(issued(name), 1, "{name}: exactly one key ever issued: {:?}", fake.changes(name));
        assert_eq!(revoked(name), 0, "{name}: {:?}", fake.changes(name));
        let secret = secrets.get(&format!("{name}-key")).await.unwrap();
        assert_eq!(secret.metadata.annotations.unwrap()["keysmith.dev/key-id"], current, "{name}");
        if name == "gated" {
            assert_eq!(current, gated_key, "the held key itself was published");
            // The key it held through the failures never showed anywhere.
            let token = String::from_utf8(secret.data.clone().unwrap()["token"].0.clone()).unwrap();
            for note in event_notes(&client, &ns.name, "SecretNotWritable").await {
                assert!(!note.contains(&token), "no key material in events: {note}");
            }
            let status = serde_json::to_string(&accounts.get(name).await.unwrap().status).unwrap();
            assert!(!status.contains(&token), "no key material in status");
        }
        if name == "renamed" {
            assert!(secret.data.unwrap().contains_key("PASSWORD"), "the fixed rename applies");
        }
    }

    operator.stop().await;
    kubectl_ok(cp, &["delete", "validatingadmissionpolicy", &format!("gate-{}", ns.name)]);
    ns.delete().await;
}
