//! The `awsIam` provider end to end: the operator as its own process, scoped
//! to a test namespace on the real kube-apiserver, managing IAM users,
//! attached managed policies and access keys in a real moto server with
//! authentication and authorization on (started by each test,
//! `tests/common/moto_server.rs`). Every assertion is made on real effects:
//! what IAM holds, read over its API by the admin, and which access keys
//! moto accepts for a signed call (STS `GetCallerIdentity`).

mod common;
#[path = "common/moto_server.rs"]
mod moto_server;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{
    apply_yaml, assert_manifests_stored, control_plane, credential_reader_identity, eventually, ready_account,
    secret_data, Operator, TestNamespace,
};
use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::Condition};
use keysmith::api::{AppConnection, IntegrationAccount, IntegrationAccountStatus, KeyState};
use keysmith::provider::aws_iam;
use kube::{
    api::{Api, DeleteParams, Patch, PatchParams, PostParams},
    Client, ResourceExt,
};
use moto_server::MotoServer;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(120);
const GRACE: Duration = Duration::from_secs(15);
const USER: &str = "report-uploader";
const SECRET: &str = "report-uploader-aws";

/// The connection, policy and account; `{endpoint}` is moto's. The admin
/// credential Secret is created separately (it holds the live admin key).
const ACCOUNT: &str = r#"
apiVersion: keysmith.dev/v1alpha1
kind: AppConnection
metadata: {name: aws}
spec:
  provider:
    awsIam:
      region: eu-west-1
      endpoint: "{endpoint}"
      path: /keysmith/
      credentialsSecretRef: {name: aws-admin}
  serviceAccountName: keysmith
---
apiVersion: keysmith.dev/v1alpha1
kind: KeyRotationPolicy
metadata: {name: policy}
spec: {rotateEvery: 24h, gracePeriod: 15s}
---
apiVersion: keysmith.dev/v1alpha1
kind: IntegrationAccount
metadata: {name: report-uploader}
spec:
  connectionRef: {name: aws}
  description: "Nightly report upload to S3"
  owner: team-data
  secret: {name: report-uploader-aws}
  rotationPolicyRef: {name: policy}
  deletionPolicy: Delete
"#;

fn binding_yaml(roles: &[String]) -> String {
    format!(
        "apiVersion: keysmith.dev/v1alpha1\nkind: RoleBinding\nmetadata: {{name: report-uploader-policies}}\nspec:\n  accountRef: {{name: report-uploader}}\n  roles: {roles:?}\n"
    )
}

/// Creates the Secret holding the admin's access key.
async fn admin_secret(client: &Client, ns: &str, name: &str, key: &(String, String)) {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "stringData": {"AWS_ACCESS_KEY_ID": key.0, "AWS_SECRET_ACCESS_KEY": key.1},
    }))
    .expect("a Secret");
    Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await.expect("create Secret");
}

/// The access key id and secret in the output Secret.
async fn published_key(client: &Client, ns: &str) -> Option<(String, String)> {
    let mut data = secret_data(client, ns, SECRET).await?;
    Some((data.remove(aws_iam::ACCESS_KEY_ID_KEY)?, data.remove(aws_iam::SECRET_ACCESS_KEY_KEY)?))
}

async fn connection_ready(client: &Client, ns: &str, name: &str) -> Condition {
    let api: Api<AppConnection> = Api::namespaced(client.clone(), ns);
    eventually(&format!("AppConnection {ns}/{name} to report Ready"), WAIT, || async {
        let status = api.get(name).await.ok()?.status?;
        status.common.conditions.into_iter().find(|c| c.type_ == "Ready")
    })
    .await
}

/// Sets `keysmith.dev/rotate-now` to `value`.
async fn rotate_now(accounts: &Api<IntegrationAccount>, value: &str) {
    accounts
        .patch(
            USER,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"keysmith.dev/rotate-now": value}}})),
        )
        .await
        .expect("annotate");
}

/// Waits for the Secret to publish a key other than `old`; the new key.
async fn next_published(client: &Client, ns: &str, old: &(String, String)) -> (String, String) {
    eventually("a new access key in the Secret", WAIT, || async {
        published_key(client, ns).await.filter(|key| key.0 != old.0)
    })
    .await
}

/// Waits until status records `key` in `state` (and `current` as the live key).
async fn wait_for_state(
    accounts: &Api<IntegrationAccount>,
    key: &str,
    state: KeyState,
    current: &str,
) -> IntegrationAccountStatus {
    eventually(&format!("key {key} recorded as {state:?}, {current} live"), WAIT, || async {
        let status = accounts.get(USER).await.ok()?.status?;
        let record = status.keys.iter().find(|k| k.id == key)?;
        (record.state == state && status.current_key.as_ref()?.id == current).then_some(status)
    })
    .await
}

fn record<'a>(status: &'a IntegrationAccountStatus, id: &str) -> &'a keysmith::api::KeyRecord {
    status.keys.iter().find(|k| k.id == id).unwrap_or_else(|| panic!("no record of key {id}: {:#?}", status.keys))
}

/// Whether moto accepts a call signed with `key`, as the user.
async fn works(moto: &MotoServer, key: &(String, String), user_arn: &str) -> bool {
    match moto.whoami_with(&key.0, &key.1).await {
        Ok(arn) => {
            assert_eq!(arn, user_arn, "the key authenticates as the account's user");
            true
        }
        Err(e) => {
            assert!(e.contains("InvalidClientTokenId"), "a refused key is unknown to IAM: {e}");
            false
        }
    }
}

/// Samples the user's access keys every 100 ms until dropped: every set of
/// key ids IAM held, in order.
struct KeySampler {
    seen: Arc<Mutex<Vec<BTreeSet<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl KeySampler {
    fn start(moto: &MotoServer) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let admin = moto.admin();
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                loop {
                    if let Ok(xml) = admin.call("ListAccessKeys", &[("UserName", USER)]).await {
                        let ids: BTreeSet<String> = roxmltree::Document::parse(&xml)
                            .expect("XML")
                            .descendants()
                            .filter(|n| n.has_tag_name("AccessKeyId"))
                            .filter_map(|n| n.text().map(str::to_owned))
                            .collect();
                        seen.lock().expect("not poisoned").push(ids);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        Self { seen, task }
    }

    fn samples(&self) -> Vec<BTreeSet<String>> {
        self.seen.lock().expect("not poisoned").clone()
    }
}

impl Drop for KeySampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn an_account_becomes_an_iam_user_whose_access_keys_rotate_within_the_two_key_limit() {
    let moto = MotoServer::start().await;
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "awsiam").await;
    let operator = Operator::start(cp, &ns.name, &[]);
    admin_secret(&client, &ns.name, "aws-admin", &moto.admin_key).await;
    apply_yaml(
        &client,
        &ns.name,
        &(credential_reader_identity("aws-admin") + &ACCOUNT.replace("{endpoint}", &moto.endpoint)),
    )
    .await;
    apply_yaml(&client, &ns.name, &binding_yaml(&[moto.policy_arn("ks-read")])).await;
    let sampler = KeySampler::start(&moto);

    // Ready: the user exists under the path, tagged as ours, holding the policy.
    let account = ready_account(&client, &ns.name, USER).await;
    let uid = account.uid().expect("a uid");
    let status = account.status.expect("status");
    let user_arn = format!("arn:aws:iam::{}:user/keysmith/{USER}", moto.account_id);
    assert_eq!(moto.user_arn(USER).await.as_deref(), Some(user_arn.as_str()), "the user is under /keysmith/");
    let tags = moto.tags(USER).await;
    let want = BTreeMap::from([
        (keysmith::ownership::MANAGED_BY_KEY.to_owned(), keysmith::ownership::MANAGED_BY.to_owned()),
        (keysmith::ownership::ACCOUNT_UID.to_owned(), uid.clone()),
        (keysmith::ownership::INTEGRATION_ACCOUNT.to_owned(), format!("{}/{USER}", ns.name)),
        (keysmith::ownership::DESCRIPTION.to_owned(), "Nightly report upload to S3".to_owned()),
        (keysmith::ownership::OWNER.to_owned(), "team-data".to_owned()),
    ]);
    assert_eq!(tags, want);
    assert_eq!(moto.attached_policies(USER).await, BTreeSet::from([moto.policy_arn("ks-read")]));
    let external = status.account.as_ref().expect("status names the user");
    assert_eq!((external.provider.as_str(), external.id.as_str()), ("awsIam", user_arn.as_str()));

    // The Secret: what the AWS SDKs read, and a key moto accepts for a signed call.
    let data = secret_data(&client, &ns.name, SECRET).await.expect("the output Secret");
    assert_eq!(
        data.keys().map(String::as_str).collect::<Vec<_>>(),
        ["AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL_IAM", "AWS_REGION", "AWS_SECRET_ACCESS_KEY"]
    );
    assert_eq!(data["AWS_REGION"], moto_server::REGION);
    assert_eq!(data["AWS_ENDPOINT_URL_IAM"], moto.endpoint);
    let first = published_key(&client, &ns.name).await.expect("a published key");
    assert_eq!(status.current_key.as_ref().expect("a current key").id, first.0, "the key id is the access key id");
    assert!(works(&moto, &first, &user_arn).await, "the published key signs calls moto accepts");
    // It authenticates as the user, who holds no IAM rights: signed and checked, then denied.
    match moto.iam(&first.0, &first.1).call("ListUsers", &[]).await {
        Err(keysmith::provider::ProviderError::Unauthorized(m)) => assert!(m.contains("AccessDenied"), "{m}"),
        other => panic!("the user may not list users, got {other:?}"),
    }

    let ready = connection_ready(&client, &ns.name, "aws").await;
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "Verified"), "{}", ready.message);

    // Rotation 1, by hand: the new key works, and the old one keeps working
    // during the grace period, with both lifecycles in status.
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), &ns.name);
    rotate_now(&accounts, "1").await;
    let second = next_published(&client, &ns.name, &first).await;
    assert!(works(&moto, &second, &user_arn).await, "the new key works");
    assert!(works(&moto, &first, &user_arn).await, "the old key still works in its grace period");
    let status = wait_for_state(&accounts, &first.0, KeyState::Retiring, &second.0).await;
    let old = record(&status, &first.0);
    let (retiring_at, revoke_at) =
        (old.retiring_at.as_ref().expect("retiringAt").0, old.revoke_at.as_ref().expect("revokeAt").0);
    assert_eq!(revoke_at.duration_since(retiring_at).as_secs(), GRACE.as_secs() as i64, "{old:?}");
    let new = record(&status, &second.0);
    assert_eq!(new.state, KeyState::Published);
    assert_eq!(new.reason.as_deref(), Some("ManualRotation"));
    assert!(new.published_at.is_some(), "{new:?}");
    assert_eq!(moto.key_status(USER).await.len(), 2, "both keys are in IAM");

    // After the grace period the old key is deleted: moto refuses it.
    let status = wait_for_state(&accounts, &first.0, KeyState::Revoked, &second.0).await;
    assert_eq!(record(&status, &first.0).reason.as_deref(), Some("GracePeriodEnded"));
    assert!(!works(&moto, &first, &user_arn).await, "the old key is refused after its grace period");
    assert!(works(&moto, &second, &user_arn).await);
    let ids: Vec<String> = moto.key_status(USER).await.into_keys().collect();
    assert_eq!(ids, std::slice::from_ref(&second.0), "only the live key is left in IAM");

    // Rotations 2 and 3 back to back: when the third comes, the key the
    // second replaced is still in its grace period. IAM allows two keys, so the
    // retiring key is deleted first, then the new one created; the live key
    // is never deleted before its successor is published.
    rotate_now(&accounts, "2").await;
    let third = next_published(&client, &ns.name, &second).await;
    rotate_now(&accounts, "3").await;
    let fourth = next_published(&client, &ns.name, &third).await;
    let status = wait_for_state(&accounts, &third.0, KeyState::Retiring, &fourth.0).await;
    assert_eq!(record(&status, &second.0).state, KeyState::Revoked);
    assert_eq!(
        record(&status, &second.0).reason.as_deref(),
        Some("KeyLimit"),
        "revoked to make room, before its grace period ended: {:#?}",
        status.keys
    );
    assert!(!works(&moto, &second, &user_arn).await, "the key revoked for room is refused");
    assert!(works(&moto, &third, &user_arn).await, "the previous live key works in its grace period");
    assert!(works(&moto, &fourth, &user_arn).await, "the new key works");
    let samples = sampler.samples();
    assert!(samples.iter().all(|keys| keys.len() <= 2), "never more than 2 keys in IAM: {samples:?}");
    assert!(
        !samples.iter().any(|keys| keys.contains(&second.0) && keys.contains(&fourth.0)),
        "the retiring key was deleted before the new one was created: {samples:?}"
    );
    let third_seen: Vec<bool> = samples
        .iter()
        .skip_while(|keys| !keys.contains(&third.0))
        .take_while(|keys| !keys.contains(&fourth.0) || keys.contains(&third.0))
        .map(|keys| keys.contains(&third.0))
        .collect();
    assert!(!third_seen.is_empty(), "the sampler saw the third key: {samples:?}");
    assert!(third_seen.iter().all(|present| *present), "the live key was never deleted: {samples:?}");
    let status = wait_for_state(&accounts, &third.0, KeyState::Revoked, &fourth.0).await;
    assert_eq!(record(&status, &third.0).reason.as_deref(), Some("GracePeriodEnded"));
    assert!(!works(&moto, &third, &user_arn).await);
    assert!(works(&moto, &fourth, &user_arn).await);
    drop(sampler);

    // Dropping the role detaches the policy; adding another attaches it.
    apply_yaml(&client, &ns.name, &binding_yaml(&[moto.policy_arn("ks-write")])).await;
    eventually("the policies to follow the RoleBinding", WAIT, || async {
        (moto.attached_policies(USER).await == BTreeSet::from([moto.policy_arn("ks-write")])).then_some(())
    })
    .await;

    // deletionPolicy Delete: the user goes, and its key with it.
    accounts.delete(USER, &DeleteParams::default()).await.expect("delete");
    eventually("the IntegrationAccount to be gone", WAIT, || async {
        accounts.get_opt(USER).await.ok()?.is_none().then_some(())
    })
    .await;
    assert_eq!(moto.user_arn(USER).await, None, "the IAM user is deleted");
    assert!(!works(&moto, &fourth, &user_arn).await, "its key is refused");

    // Neither the admin's secret nor an issued one ever reached the logs.
    let logs = operator.stop().await;
    assert!(logs.contains(USER), "the operator logged its work");
    for secret in [&moto.admin_key.1, &first.1, &second.1, &third.1, &fourth.1] {
        assert!(!logs.contains(secret.as_str()), "a secret access key in the operator's logs");
    }
    ns.delete().await;
}

#[tokio::test]
async fn a_wrong_admin_secret_makes_the_connection_unauthorized() {
    let moto = MotoServer::start().await;
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "awsiamauth").await;
    let _operator = Operator::start(cp, &ns.name, &[]);
    let wrong = format!("not-the-secret-{:016x}", rand::random::<u64>());
    admin_secret(&client, &ns.name, "aws-admin", &(moto.admin_key.0.clone(), wrong.clone())).await;
    let connection = ACCOUNT.split("---").next().expect("the AppConnection").replace("{endpoint}", &moto.endpoint);
    apply_yaml(&client, &ns.name, &(credential_reader_identity("aws-admin") + &connection)).await;

    let ready = connection_ready(&client, &ns.name, "aws").await;
    assert_eq!(ready.status, "False", "{}", ready.message);
    assert_eq!(ready.reason, "Unauthorized", "{}", ready.message);
    assert!(ready.message.contains("SignatureDoesNotMatch"), "{}", ready.message);
    for secret in [&wrong, &moto.admin_key.1] {
        assert!(!ready.message.contains(secret.as_str()), "a secret in status: {}", ready.message);
    }
    ns.delete().await;
}

/// What the example names, replaced by the test server's.
const EXAMPLE_ACCESS_KEY_ID: &str = "REPLACE-WITH-THE-ADMIN-ACCESS-KEY-ID";
const EXAMPLE_SECRET_ACCESS_KEY: &str = "REPLACE-WITH-THE-ADMIN-SECRET-ACCESS-KEY";
const EXAMPLE_ACCOUNT_ID: &str = "123456789012";
const EXAMPLE_REGION_LINE: &str = "      region: eu-west-1\n";
const EXAMPLE_POLICY: &str = "/integrations/report-uploader-s3";

#[test]
fn the_example_admin_policy_is_the_documented_least_privilege() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/aws-iam/admin-policy.json");
    let policy: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("readable")).expect("JSON");
    let statements = policy["Statement"].as_array().expect("statements");
    assert_eq!(statements.len(), 2, "{policy:#}");
    let actions: Vec<&str> =
        statements[0]["Action"].as_array().expect("actions").iter().map(|a| a.as_str().expect("a string")).collect();
    assert_eq!(actions, aws_iam::ADMIN_USER_ACTIONS);
    assert_eq!(statements[0]["Resource"], "arn:aws:iam::*:user/keysmith/*");
    assert_eq!(statements[1]["Action"], "iam:GetUser");
    assert_eq!(statements[1]["Resource"], "arn:aws:iam::*:user/*");
}

#[tokio::test]
async fn the_aws_iam_example_is_accepted_and_works_against_moto() {
    let text = common::example_text("aws-iam");
    let objects = keysmith::manifest::parse(&text).expect("the example parses");
    let kinds: Vec<String> = objects.iter().filter_map(|o| o.types.as_ref().map(|t| t.kind.clone())).collect();
    assert_eq!(kinds, common::CREDENTIALED_EXAMPLE_KINDS, "read top to bottom");
    for object in objects.iter().skip(1) {
        assert_eq!(object.metadata.namespace.as_deref(), Some("reporting"), "{:?}", object.metadata.name);
    }
    for placeholder in [EXAMPLE_ACCESS_KEY_ID, EXAMPLE_SECRET_ACCESS_KEY, EXAMPLE_REGION_LINE, EXAMPLE_POLICY] {
        assert!(text.contains(placeholder), "the example has {placeholder:?}, which the test replaces");
    }

    // Pointed at a moto holding the policy it names, the example is accepted
    // by the apiserver as written and the account becomes Ready.
    let moto = MotoServer::start_with_policies(&[EXAMPLE_POLICY]).await;
    let cp = control_plane().await;
    let client = cp.client().await.expect("admin client");
    let ns = TestNamespace::create(&client, "awsiamexample").await;
    let _operator = Operator::start(cp, &ns.name, &[]);
    let text = text
        .replace(EXAMPLE_ACCESS_KEY_ID, &moto.admin_key.0)
        .replace(EXAMPLE_SECRET_ACCESS_KEY, &moto.admin_key.1)
        .replace(EXAMPLE_ACCOUNT_ID, &moto.account_id)
        .replace(EXAMPLE_REGION_LINE, &format!("{EXAMPLE_REGION_LINE}      endpoint: \"{}\"\n", moto.endpoint));
    apply_yaml(&client, &ns.name, &text).await;
    // Nothing was lost on the way.
    assert_manifests_stored(&client, &ns.name, &text).await;
    ready_account(&client, &ns.name, "report-uploader").await;
    let user_arn = format!("arn:aws:iam::{}:user/keysmith/report-uploader", moto.account_id);
    assert_eq!(moto.user_arn("report-uploader").await.as_deref(), Some(user_arn.as_str()));
    assert_eq!(
        moto.attached_policies("report-uploader").await,
        BTreeSet::from([format!("arn:aws:iam::{}:policy{EXAMPLE_POLICY}", moto.account_id)])
    );
    let data = secret_data(&client, &ns.name, "report-uploader-aws").await.expect("the output Secret");
    let key = (data["AWS_ACCESS_KEY_ID"].clone(), data["AWS_SECRET_ACCESS_KEY"].clone());
    assert_eq!(moto.whoami_with(&key.0, &key.1).await, Ok(user_arn));
    let ready = connection_ready(&client, &ns.name, "aws").await;
    assert_eq!(ready.status, "True", "{}", ready.message);
    ns.delete().await;
}
