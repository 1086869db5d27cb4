//! The `gcpIam` provider end to end: the operator as its own process, scoped
//! to a test namespace on the real kube-apiserver, managing service
//! accounts, project role bindings and keys in the contract fake of Google
//! Cloud IAM (`tests/gcp/fake_gcp.py`, started by each test), which checks
//! every request against Google's discovery documents. Every assertion is
//! made on real effects: what the fake holds, and whether the token
//! endpoint accepts the key file in the output Secret for a signed JWT.

mod common;
#[path = "common/gcp_server.rs"]
mod gcp_server;

use std::time::Duration;

use common::{
    apply_yaml, assert_manifests_stored, control_plane, credential_reader_identity, eventually, ready_account,
    secret_data, Operator, TestNamespace,
};
use gcp_server::{GcpServer, PROJECT};
use k8s_openapi::api::core::v1::Secret;
use keysmith::{
    api::{IntegrationAccount, KeyState},
    provider::{gcp_iam::CREDENTIALS_KEY, IssuedKey, KeyMaterial},
};
use kube::{
    api::{Api, DeleteParams, Patch, PatchParams, PostParams},
    Client, ResourceExt,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(120);
const ACCOUNT: &str = "report-export";
const SECRET: &str = "report-export-gcp";

fn manifests(gcp: &GcpServer) -> String {
    format!(
        r#"
apiVersion: keysmith.dev/v1alpha1
kind: AppConnection
metadata: {{name: gcp}}
spec:
  provider:
    gcpIam:
      project: {PROJECT}
      iamEndpoint: "{url}/iam"
      resourceManagerEndpoint: "{url}/crm"
      credentialsSecretRef: {{name: gcp-admin}}
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
  connectionRef: {{name: gcp}}
  description: "Weekly report export"
  owner: team-data
  secret: {{name: {SECRET}}}
  rotationPolicyRef: {{name: policy}}
  deletionPolicy: Delete
---
apiVersion: keysmith.dev/v1alpha1
kind: RoleBinding
metadata: {{name: {ACCOUNT}-roles}}
spec: {{accountRef: {{name: {ACCOUNT}}}, roles: [roles/logging.viewer]}}
"#,
        url = gcp.url
    )
}

async fn admin_secret(client: &Client, ns: &str, key_file: &str) {
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "gcp-admin"}, "stringData": {CREDENTIALS_KEY: key_file}}))
            .expect("a Secret");
    Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await.expect("create");
}

fn issued(data: &std::collections::BTreeMap<String, String>) -> IssuedKey {
    IssuedKey { id: String::new(), expires_at: None, material: KeyMaterial::new(data.clone()) }
}

fn email(name: &str) -> String {
    format!("{name}@{PROJECT}.iam.gserviceaccount.com")
}

#[tokio::test]
async fn an_account_becomes_a_service_account_whose_key_file_rotates() {
    let gcp = GcpServer::start().await;
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "gcpiam").await;
    let operator = Operator::start(cp, &ns.name, &[]);
    admin_secret(&client, &ns.name, &gcp.admin_key_file).await;
    apply_yaml(&client, &ns.name, &(credential_reader_identity("gcp-admin") + &manifests(&gcp))).await;

    let account = ready_account(&client, &ns.name, ACCOUNT).await;
    let status = account.status.clone().expect("status");
    let external = status.account.as_ref().expect("status names the service account");
    assert_eq!((external.provider.as_str(), external.id.as_str()), ("gcpIam", email(ACCOUNT).as_str()));
    let (code, found) = gcp.iam("GET", &format!("projects/{PROJECT}/serviceAccounts/{}", email(ACCOUNT)), None).await;
    assert_eq!(code, 200, "{found}");
    let description = found["description"].as_str().unwrap_or_default();
    assert!(description.starts_with(&format!("keysmith:{}\n", account.uid().unwrap())), "{description}");
    assert_eq!(gcp.roles_of(&email(ACCOUNT)).await, ["roles/logging.viewer"]);

    // The Secret: one JSON key file, which Google's token endpoint accepts.
    let first = secret_data(&client, &ns.name, SECRET).await.expect("the output Secret");
    assert_eq!(first.keys().map(String::as_str).collect::<Vec<_>>(), [CREDENTIALS_KEY]);
    let file: Value = serde_json::from_str(&first[CREDENTIALS_KEY]).expect("a key file");
    assert_eq!(file["client_email"], email(ACCOUNT));
    assert!(gcp.key_works(&issued(&first)).await, "the published key works");

    // A manual rotation: both keys work during the grace period, then the
    // old one is disabled and deleted.
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    let patch = json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": "e2e"}}});
    accounts.patch(ACCOUNT, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("annotate");
    let second = eventually("a new key file published", WAIT, || async {
        let data = secret_data(&client, &ns.name, SECRET).await?;
        (data[CREDENTIALS_KEY] != first[CREDENTIALS_KEY]).then_some(data)
    })
    .await;
    assert!(gcp.key_works(&issued(&second)).await, "the new key works");
    let old_id = file["private_key_id"].as_str().unwrap_or_default().to_owned();
    eventually("the old key revoked after the grace period", WAIT, || async {
        let status = accounts.get(ACCOUNT).await.ok()?.status?;
        status.keys.iter().any(|k| k.id == old_id && k.state == KeyState::Revoked).then_some(())
    })
    .await;
    assert!(!gcp.key_works(&issued(&first)).await, "the old key is refused");
    let record = gcp.keys().await.into_iter().find(|k| k["keyId"] == old_id.as_str()).expect("the fake's record");
    assert_eq!((record["disabled"].clone(), record["deleted"].clone()), (json!(true), json!(true)));

    // Deletion: the bindings, then the account.
    accounts.delete(ACCOUNT, &DeleteParams::default()).await.expect("delete");
    eventually("the IntegrationAccount gone", WAIT, || async {
        accounts.get_opt(ACCOUNT).await.ok()?.is_none().then_some(())
    })
    .await;
    let (code, _) = gcp.iam("GET", &format!("projects/{PROJECT}/serviceAccounts/{}", email(ACCOUNT)), None).await;
    assert_eq!(code, 404, "the service account is deleted");
    assert!(!gcp.policy().await.to_string().contains(ACCOUNT), "no binding left");
    assert!(!gcp.key_works(&issued(&second)).await);

    // No line of any private key in the operator's logs.
    let logs = operator.logs();
    let admin: Value = serde_json::from_str(&gcp.admin_key_file).unwrap();
    let mut files: Vec<Value> =
        [&first, &second].iter().map(|d| serde_json::from_str(&d[CREDENTIALS_KEY]).unwrap()).collect();
    files.push(admin);
    for file in &files {
        let pem = file["private_key"].as_str().unwrap_or_default();
        let lines: Vec<&str> = pem.lines().filter(|l| !l.starts_with("-----") && l.len() > 20).collect();
        assert!(lines.len() > 10, "a PEM key");
        for line in lines {
            assert!(!logs.contains(line), "a line of {}'s private key in the logs", file["client_email"]);
        }
    }
    let violations = gcp.violations().await;
    assert!(violations.is_empty(), "requests that break Google's API description: {violations:#?}");
    ns.delete().await;
}

/// What the example names, replaced by the test server's.
const EXAMPLE_KEY_FILE: &str = "REPLACE-WITH-THE-ADMIN-KEY-FILE";
const EXAMPLE_PROJECT: &str = "finance-prod-4711";
const EXAMPLE_PROJECT_LINE: &str = "      project: finance-prod-4711\n";

#[tokio::test]
async fn the_gcp_iam_example_is_accepted_and_works_against_the_fake() {
    let text = common::example_text("gcp-iam");
    let objects = keysmith::manifest::parse(&text).expect("the example parses");
    let kinds: Vec<String> = objects.iter().filter_map(|o| o.types.as_ref().map(|t| t.kind.clone())).collect();
    assert_eq!(kinds, common::CREDENTIALED_EXAMPLE_KINDS, "read top to bottom");
    for object in objects.iter().skip(1) {
        assert_eq!(object.metadata.namespace.as_deref(), Some("finance"), "{:?}", object.metadata.name);
    }
    for placeholder in [EXAMPLE_KEY_FILE, EXAMPLE_PROJECT_LINE] {
        assert!(text.contains(placeholder), "the example has {placeholder:?}, which the test replaces");
    }

    let gcp = GcpServer::start().await;
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "gcpiamexample").await;
    let _operator = Operator::start(cp, &ns.name, &[]);
    // The key file as one YAML string, JSON being YAML.
    let key_file = serde_json::to_string(&gcp.admin_key_file).expect("a JSON string");
    let text = text.replace(EXAMPLE_KEY_FILE, &key_file).replace(
        EXAMPLE_PROJECT_LINE,
        &format!(
            "{}      iamEndpoint: \"{url}/iam\"\n      resourceManagerEndpoint: \"{url}/crm\"\n",
            EXAMPLE_PROJECT_LINE.replace(EXAMPLE_PROJECT, PROJECT),
            url = gcp.url
        ),
    );
    apply_yaml(&client, &ns.name, &text).await;
    assert_manifests_stored(&client, &ns.name, &text).await;
    ready_account(&client, &ns.name, "billing-export").await;
    assert_eq!(gcp.roles_of(&email("billing-export")).await, ["roles/bigquery.dataEditor", "roles/bigquery.jobUser"]);
    let data = secret_data(&client, &ns.name, "billing-export-gcp").await.expect("the output Secret");
    assert!(gcp.key_works(&issued(&data)).await, "the example's key works");
    let violations = gcp.violations().await;
    assert!(violations.is_empty(), "{violations:#?}");
    ns.delete().await;
}
