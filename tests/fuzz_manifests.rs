//! The operator fed arbitrary manifests: seeded random IntegrationAccounts
//! and RoleBindings (names, Secret templates with odd labels, annotations
//! and renames, provider options, policies that exist, do not, or do not
//! parse, connections that exist or not, suspension, deletion policies,
//! free text in any script). Whatever the apiserver accepts, the operator
//! (in this process, over a recording fake of the target app) must answer
//! with a Ready condition for the current generation, stay up, and never
//! issue a second key for an account it could not publish the first for.
//!
//! `KEYSMITH_FUZZ_SEED` and `KEYSMITH_FUZZ_CASES` (default 40) choose the run;
//! the seed of a failing run is printed. RELIABILITY.md has longer runs.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{
    apply_yaml, control_plane, kubernetes_connection_identity,
    recording::{fake_connection, InProcess, Recording},
    TestNamespace,
};
use keysmith::api::{IntegrationAccount, RoleBinding};
use kube::{
    api::{Api, ApiResource, DynamicObject, PostParams},
    Resource,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::{json, Value};

fn pick<'a, T>(rng: &mut StdRng, options: &'a [T]) -> &'a T {
    &options[rng.random_range(0..options.len())]
}

/// Text a user might type, valid or not for wherever it ends up.
fn text(rng: &mut StdRng) -> String {
    let pieces = [
        "robot",
        "Robot",
        "team name",
        "a.b",
        "x/y",
        "-lead",
        "trail-",
        "ünïcødé",
        "日本",
        "",
        "a_b",
        "example.com/key",
        "keysmith.dev/key-id",
        "app.kubernetes.io/managed-by",
        "a\"quote",
        "{{name}}",
        "${HOME}",
        "0",
    ];
    let n = rng.random_range(1..3);
    (0..n).map(|_| *pick(rng, &pieces)).collect::<Vec<_>>().join(if rng.random_bool(0.5) { "-" } else { "" })
}

fn map(rng: &mut StdRng) -> Value {
    let n = rng.random_range(0..3);
    Value::Object((0..n).map(|_| (text(rng), json!(text(rng)))).collect())
}

fn account(rng: &mut StdRng, i: usize) -> Value {
    let name = if rng.random_bool(0.9) { format!("fz{i}") } else { format!("fz{i}-{}", text(rng)) };
    let connection = match rng.random_range(0..10) {
        0 => json!({"name": "missing"}),
        1 => json!({"kind": "ClusterAppConnection", "name": "missing"}),
        2 => json!({"name": text(rng)}),
        _ => json!({"name": "fake"}),
    };
    let mut secret = json!({"name": if rng.random_bool(0.85) { format!("fz{i}-key") } else { text(rng) }});
    if rng.random_bool(0.3) {
        secret["labels"] = map(rng);
    }
    if rng.random_bool(0.3) {
        secret["annotations"] = map(rng);
    }
    if rng.random_bool(0.2) {
        secret["keys"] = json!({ (*pick(rng, &["token", "password", "kubeconfig"])).to_string(): text(rng) });
    }
    let mut spec = json!({"connectionRef": connection, "secret": secret});
    if rng.random_bool(0.3) {
        spec["providerOptions"] = json!({ (*pick(rng, &["name", "namespace", "other"])).to_string(): text(rng) });
    }
    if rng.random_bool(0.4) {
        spec["rotationPolicyRef"] = json!({"name": pick(rng, &["hourly", "missing", "broken"])});
    }
    if rng.random_bool(0.3) {
        spec["description"] = json!(text(rng).repeat(rng.random_range(1..200)));
    }
    if rng.random_bool(0.2) {
        spec["owner"] = json!(text(rng));
    }
    if rng.random_bool(0.3) {
        spec["deletionPolicy"] = json!(pick(rng, &["Delete", "Disable", "Orphan", "Keep"]));
    }
    if rng.random_bool(0.1) {
        spec["suspend"] = json!(true);
    }
    json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": "IntegrationAccount", "metadata": {"name": name}, "spec": spec})
}

fn binding(rng: &mut StdRng, i: usize, accounts: &[String]) -> Value {
    let target = if accounts.is_empty() || rng.random_bool(0.1) { text(rng) } else { pick(rng, accounts).clone() };
    let roles: Vec<String> = (0..rng.random_range(0..3))
        .map(|_| (*pick(rng, &["view", "edit", "admin", "cluster-admin"])).to_string())
        .collect();
    let mut spec = json!({"accountRef": {"name": target}, "roles": roles});
    if rng.random_bool(0.2) {
        spec["scope"] = json!(text(rng));
    }
    json!({"apiVersion": "keysmith.dev/v1alpha1", "kind": "RoleBinding", "metadata": {"name": format!("fz{i}-roles")}, "spec": spec})
}

#[tokio::test]
async fn every_accepted_manifest_gets_an_answer_and_no_churn() {
    // Before any thread of this process reads the environment: this binary
    // holds this one test.
    std::env::set_var(keysmith::provider::noop::ENABLE_ENV, "1");
    let seed: u64 = std::env::var("KEYSMITH_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261206);
    let cases: usize = std::env::var("KEYSMITH_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    println!("fuzz seed {seed}, {cases} accounts (KEYSMITH_FUZZ_SEED, KEYSMITH_FUZZ_CASES)");
    let mut rng = StdRng::seed_from_u64(seed);

    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "fuzz").await;
    apply_yaml(&client, &ns.name, &kubernetes_connection_identity(&["view", "edit"])).await;
    apply_yaml(
        &client,
        &ns.name,
        &(fake_connection(", policy: {deniedRoles: [admin]}")
            + r#"---
apiVersion: keysmith.dev/v1alpha1
kind: KeyRotationPolicy
metadata: {name: hourly}
spec: {rotateEvery: 1h, gracePeriod: 10m}
---
apiVersion: keysmith.dev/v1alpha1
kind: KeyRotationPolicy
metadata: {name: broken}
spec: {schedule: "61 * * * *"}
"#),
    )
    .await;

    let fake = Recording::new();
    let operator = InProcess::start(cp, &ns.name, &fake).await;

    let dynamic = |resource: ApiResource| Api::<DynamicObject>::namespaced_with(client.clone(), &ns.name, &resource);
    let account_api = dynamic(ApiResource::erase::<IntegrationAccount>(&()));
    let binding_api = dynamic(ApiResource::erase::<RoleBinding>(&()));
    let mut accepted: Vec<String> = Vec::new();
    let mut refused = 0;
    for i in 0..cases {
        let manifest = account(&mut rng, i);
        let object: DynamicObject = serde_json::from_value(manifest.clone()).unwrap();
        match account_api.create(&PostParams::default(), &object).await {
            Ok(created) => accepted.push(created.metadata.name.unwrap()),
            Err(kube::Error::Api(status)) if status.code == 422 || status.code == 400 => refused += 1,
            Err(error) => panic!("seed {seed}: creating {manifest}: {error}"),
        }
        if rng.random_bool(0.6) {
            let object: DynamicObject = serde_json::from_value(binding(&mut rng, i, &accepted)).unwrap();
            let _ = binding_api.create(&PostParams::default(), &object).await;
        }
    }
    println!("{} accepted, {refused} refused by the apiserver", accepted.len());

    // Every accepted account answered for its current generation.
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let mut answers: BTreeMap<String, (String, String)> = BTreeMap::new();
    loop {
        assert!(operator.is_running(), "seed {seed}: the operator stopped (a panic?)");
        answers.clear();
        for name in &accepted {
            let Ok(account) = accounts.get(name).await else { continue };
            let Some(status) = account.status.as_ref() else { continue };
            if status.common.observed_generation != account.meta().generation {
                continue;
            }
            if let Some(ready) = status.common.conditions.iter().find(|c| c.type_ == "Ready") {
                answers.insert(name.clone(), (ready.status.clone(), ready.reason.clone()));
            }
        }
        if answers.len() == accepted.len() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "seed {seed}: no answer for {:?}",
            accepted.iter().filter(|n| !answers.contains_key(*n)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Settled: a few more seconds change nothing in the target app.
    let before = fake.count("issue_key");
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(operator.is_running(), "seed {seed}: the operator stopped (a panic?)");
    let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
    for (name, (status, reason)) in &answers {
        *by_reason.entry(format!("{status}/{reason}")).or_default() += 1;
        let issued = fake.changes(name).iter().filter(|c| c.starts_with("issue_key ")).count();
        assert!(
            issued <= 1,
            "seed {seed}: {name} ({status}/{reason}) was issued {issued} keys: {:?}",
            fake.changes(name)
        );
        assert!(!reason.is_empty(), "seed {seed}: {name} has a Ready without a reason");
    }
    assert_eq!(
        fake.count("issue_key"),
        before,
        "seed {seed}: keys were still being issued after every account answered"
    );
    println!("answers: {by_reason:?}");

    operator.stop().await;
    ns.delete().await;
}
