//! The `openBao` provider end to end: the operator as its own process,
//! scoped to a test namespace on the real kube-apiserver, managing AppRole
//! roles, their policies and secret-ids in a real OpenBao server
//! (`tests/common/bao_server.rs`, started by each test). Every assertion is
//! made on real effects: what OpenBao holds, and whether it accepts a login
//! with the role_id and secret_id in the output Secret.

#[path = "common/bao_server.rs"]
mod bao_server;
mod common;

use std::time::Duration;

use bao_server::{BaoServer, POLICIES};
use common::{
    apply_yaml, assert_manifests_stored, control_plane, credential_reader_identity, eventually, ready_account,
    secret_data, Operator, TestNamespace,
};
use k8s_openapi::api::core::v1::Secret;
use keysmith::{
    api::{IntegrationAccount, KeyState},
    provider::{
        openbao::{ROLE_ID_KEY, SECRET_ID_KEY},
        IssuedKey, KeyMaterial,
    },
};
use kube::{
    api::{Api, DeleteParams, Patch, PatchParams, PostParams},
    Client, ResourceExt,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);
const ACCOUNT: &str = "ledger-sync";
const ROLE: &str = "ks-ledger-sync";
const SECRET: &str = "ledger-sync-openbao";

fn manifests(bao: &BaoServer) -> String {
    format!(
        r#"
apiVersion: keysmith.dev/v1alpha1
kind: AppConnection
metadata: {{name: openbao}}
spec:
  provider:
    openBao:
      address: "{address}"
      tokenMaxTtlSeconds: 600
      tokenSecretRef: {{name: openbao-admin}}
  serviceAccountName: keysmith
---
apiVersion: keysmith.dev/v1alpha1
kind: KeyRotationPolicy
metadata: {{name: policy}}
spec: {{rotateEvery: 24h, gracePeriod: 5s}}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {{name: {ACCOUNT}}}
spec:
  connectionRef: {{name: openbao}}
  description: "Ledger sync"
  owner: team-payments
  providerOptions: {{name: {ROLE}}}
  secret: {{name: {SECRET}}}
  rotationPolicyRef: {{name: policy}}
  deletionPolicy: Delete
---
apiVersion: keysmith.dev/v1alpha1
kind: RoleBinding
metadata: {{name: {ACCOUNT}-roles}}
spec: {{accountRef: {{name: {ACCOUNT}}}, roles: [{read}, {write}]}}
"#,
        address = bao.address,
        read = POLICIES[0],
        write = POLICIES[1],
    )
}

async fn admin_secret(client: &Client, ns: &str, token: &str) {
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "openbao-admin"}, "stringData": {"token": token}}))
            .expect("a Secret");
    Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await.expect("create");
}

fn issued(data: &std::collections::BTreeMap<String, String>) -> IssuedKey {
    IssuedKey { id: String::new(), expires_at: None, material: KeyMaterial::new(data.clone()) }
}

#[tokio::test]
async fn an_account_becomes_an_approle_whose_secret_id_rotates() {
    let bao = BaoServer::start().await;
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "openbao").await;
    let operator = Operator::start(cp, &ns.name, &[]);
    admin_secret(&client, &ns.name, &bao.admin_token).await;
    apply_yaml(&client, &ns.name, &(credential_reader_identity("openbao-admin") + &manifests(&bao))).await;

    let account = ready_account(&client, &ns.name, ACCOUNT).await;
    let status = account.status.clone().expect("status");
    let external = status.account.as_ref().expect("status names the role");
    assert_eq!(
        (external.provider.as_str(), external.id.as_str()),
        ("openBao", format!("auth/approle/role/{ROLE}").as_str())
    );
    let role = bao.role(ROLE).await.expect("the role exists");
    assert_eq!(role["token_max_ttl"], 600, "{role}");
    let mut policies: Vec<String> =
        role["token_policies"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_owned()).collect();
    policies.sort();
    assert_eq!(policies, [POLICIES[0], POLICIES[1]]);

    // The Secret: role_id and secret_id, which log in with exactly the
    // declared policies; the role_id carries the ownership tag.
    let first = secret_data(&client, &ns.name, SECRET).await.expect("the output Secret");
    assert_eq!(first.keys().map(String::as_str).collect::<Vec<_>>(), [ROLE_ID_KEY, SECRET_ID_KEY]);
    assert!(first[ROLE_ID_KEY].starts_with(&format!("keysmith-{}-", account.uid().unwrap())), "{first:?}");
    let (_, held) = bao.login(&issued(&first)).await.expect("the published secret-id logs in");
    assert_eq!(held, [POLICIES[0], POLICIES[1]]);

    // A manual rotation: both work during the grace period, then the old
    // secret-id is destroyed.
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let patch = json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": "e2e"}}});
    accounts.patch(ACCOUNT, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("annotate");
    let second = eventually("a new secret-id published", WAIT, || async {
        let data = secret_data(&client, &ns.name, SECRET).await?;
        (data[SECRET_ID_KEY] != first[SECRET_ID_KEY]).then_some(data)
    })
    .await;
    assert!(bao.key_works(&issued(&second)).await, "the new secret-id works");
    let old = status.current_key.as_ref().expect("the first key's record").id.clone();
    eventually("the old secret-id revoked after the grace period", WAIT, || async {
        let status = accounts.get(ACCOUNT).await.ok()?.status?;
        status.keys.iter().any(|k| k.id == old && k.state == KeyState::Revoked).then_some(())
    })
    .await;
    assert!(!bao.key_works(&issued(&first)).await, "the old secret-id is refused");
    assert_eq!(bao.accessors(ROLE).await.len(), 1, "one secret-id left");

    // Deletion: the role, and its secret-ids with it.
    accounts.delete(ACCOUNT, &DeleteParams::default()).await.expect("delete");
    eventually("the IntegrationAccount gone", WAIT, || async {
        accounts.get_opt(ACCOUNT).await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(bao.role(ROLE).await.is_none(), "the role is deleted");
    assert!(!bao.key_works(&issued(&second)).await);

    // No secret-id and no admin token in the operator's logs.
    let logs = operator.logs();
    for (what, secret) in [
        ("first secret_id", &first[SECRET_ID_KEY]),
        ("second secret_id", &second[SECRET_ID_KEY]),
        ("admin token", &bao.admin_token),
    ] {
        assert!(!logs.contains(secret.as_str()), "the {what} is in the operator's logs");
    }
    ns.delete().await;
}

/// What the example names, replaced by the test server's.
const EXAMPLE_TOKEN: &str = "REPLACE-WITH-THE-ADMIN-TOKEN";
const EXAMPLE_ADDRESS: &str = "https://bao.example.com:8200";

#[tokio::test]
async fn the_openbao_example_is_accepted_and_works_against_a_real_server() {
    let text = common::example_text("openbao");
    let objects = keysmith::manifest::parse(&text).expect("the example parses");
    let kinds: Vec<String> = objects.iter().filter_map(|o| o.types.as_ref().map(|t| t.kind.clone())).collect();
    assert_eq!(kinds, common::CREDENTIALED_EXAMPLE_KINDS, "read top to bottom");
    for object in objects.iter().skip(1) {
        assert_eq!(object.metadata.namespace.as_deref(), Some("payments"), "{:?}", object.metadata.name);
    }
    for placeholder in [EXAMPLE_TOKEN, EXAMPLE_ADDRESS] {
        assert!(text.contains(placeholder), "the example has {placeholder:?}, which the test replaces");
    }
    // The admin policy the example documents is the one the tests' admin
    // token holds.
    for line in bao_server::ADMIN_POLICY.lines().filter(|l| l.starts_with("path") || l.contains("capabilities")) {
        assert!(text.contains(&format!("#   {line}")), "the example's admin policy has {line:?}");
    }

    let bao = BaoServer::start().await;
    for name in ["payments-read", "payments-write"] {
        bao.write_policy(name, "path \"secret/data/payments/*\" { capabilities = [\"read\"] }").await;
    }
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "openbaoexample").await;
    let _operator = Operator::start(cp, &ns.name, &[]);
    let text = text.replace(EXAMPLE_TOKEN, &bao.admin_token).replace(EXAMPLE_ADDRESS, &bao.address);
    apply_yaml(&client, &ns.name, &text).await;
    assert_manifests_stored(&client, &ns.name, &text).await;
    ready_account(&client, &ns.name, "ledger-sync").await;
    let role = bao.role("ks-payments.ledger-sync").await.expect("the example's role");
    let mut policies: Vec<&str> =
        role["token_policies"].as_array().unwrap().iter().filter_map(|p| p.as_str()).collect();
    policies.sort();
    assert_eq!(policies, ["payments-read", "payments-write"]);
    let data = secret_data(&client, &ns.name, "ledger-sync-openbao").await.expect("the output Secret");
    assert!(bao.key_works(&issued(&data)).await, "the example's secret-id works");
    ns.delete().await;
}
