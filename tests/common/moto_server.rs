//! A real IAM server for tests: PyPI's `moto[server]` (installed by
//! `.ci/run`), one per test on a free loopback port, started by the test and
//! killed when it is dropped. `MOTO_SERVER` names another binary.
//!
//! Authentication and authorization are on: the server starts with
//! `INITIAL_NO_AUTH_ACTION_COUNT` set to the number of bootstrap calls, so
//! only those (made with made-up root credentials) go unchecked. They create
//! the admin user keysmith acts as, with an inline policy granting only
//! [`aws_iam::ADMIN_USER_ACTIONS`], and its access key; a second user without
//! any policy, and its key; and three managed policies to grant
//! ([`POLICIES`]). From then on moto checks every call's SigV4 signature
//! against the key's secret and the caller's IAM policies, as AWS does.
//!
//! moto authorizes IAM actions on users against the resource `*` (its
//! `IamResponse._determine_resource` names only roles), so a policy scoped to
//! `arn:aws:iam::*:user/keysmith/*`, as the module docs recommend, denies
//! everything there: the test policy grants the documented actions on `*`.
//! moto also accepts `Inactive` keys, so disabling is checked by the keys'
//! status rather than by a refused call.
//!
//! Test files include it with `#[path = "common/moto_server.rs"] mod moto_server;`,
//! so it does not depend on the rest of `tests/common`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keysmith::provider::aws_iam::{self, AwsIamProvider, QueryClient};
use keysmith::provider::{IssuedKey, KeyMaterial, ProviderError, RoleGrant};

const STARTUP: Duration = Duration::from_secs(60);
/// The region every client signs for.
pub const REGION: &str = "eu-west-1";
/// The IAM path keysmith's users live under.
pub const PATH: &str = "/keysmith/";
/// The admin keysmith acts as.
pub const ADMIN: &str = "keysmith-admin";
/// A user with a key but without any policy.
pub const POWERLESS: &str = "powerless";
/// An admin holding the policy of a keysmith from before it read when keys
/// were last used: [`aws_iam::ADMIN_USER_ACTIONS`] without
/// `iam:GetAccessKeyLastUsed`.
pub const OLD_ADMIN: &str = "keysmith-admin-before-last-use";
/// The managed policies the bootstrap creates, to be granted.
pub const POLICIES: [&str; 3] = ["ks-read", "ks-write", "ks-audit"];
/// The calls [`MotoServer::start`] makes before authentication is switched
/// on, besides one per extra policy of [`MotoServer::start_with_policies`].
const BOOTSTRAP_CALLS: usize = 11;

/// A moto server on 127.0.0.1 with IAM authentication on, killed on drop.
pub struct MotoServer {
    child: Child,
    /// `http://127.0.0.1:<port>`: IAM and STS both answer here.
    pub endpoint: String,
    log: tempfile::NamedTempFile,
    pub http: reqwest::Client,
    /// The admin's access key id and secret access key.
    pub admin_key: (String, String),
    /// [`POWERLESS`]'s access key id and secret access key.
    pub powerless_key: (String, String),
    /// [`OLD_ADMIN`]'s access key id and secret access key.
    pub old_admin_key: (String, String),
    /// The 12-digit account id moto runs as.
    pub account_id: String,
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl MotoServer {
    /// Starts a server, bootstraps the admin, the powerless user and the
    /// policies, and checks that authentication is on.
    pub async fn start() -> Self {
        Self::start_with_policies(&[]).await
    }

    /// [`MotoServer::start`], and creates these managed policies too, each
    /// given as `<path><name>` (`/integrations/uploader`), before
    /// authentication is switched on (the admin may not create policies).
    pub async fn start_with_policies(extra_policies: &[&str]) -> Self {
        let binary = std::env::var("MOTO_SERVER").unwrap_or_else(|_| "moto_server".to_owned());
        let http = reqwest::Client::builder().no_proxy().build().expect("an HTTP client");
        let mut last_log = String::new();
        // A port found free may be taken before the server binds it: try again.
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("its address").port();
            let log = tempfile::NamedTempFile::new().expect("a log file");
            let child = Command::new(&binary)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("INITIAL_NO_AUTH_ACTION_COUNT", (BOOTSTRAP_CALLS + extra_policies.len()).to_string())
                .stdin(Stdio::null())
                .stdout(log.reopen().expect("log file"))
                .stderr(log.reopen().expect("log file"))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {binary}: {e}; install it with `pip install 'moto[server]'`"));
            let mut server = MotoServer {
                child,
                endpoint: format!("http://127.0.0.1:{port}"),
                log,
                http: http.clone(),
                admin_key: Default::default(),
                powerless_key: Default::default(),
                old_admin_key: Default::default(),
                account_id: String::new(),
            };
            let started = Instant::now();
            while started.elapsed() < STARTUP {
                if let Ok(Some(_)) = server.child.try_wait() {
                    break;
                }
                // moto's own API: not an AWS action, so it does not count
                // against INITIAL_NO_AUTH_ACTION_COUNT.
                let probe = http.get(format!("{}/moto-api/data.json", server.endpoint)).send().await;
                if probe.is_ok_and(|r| r.status().is_success()) {
                    server.bootstrap(extra_policies).await;
                    return server;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            last_log = server.log_text();
        }
        panic!("moto_server did not start:\n{last_log}");
    }

    /// Everything the server logged so far.
    pub fn log_text(&self) -> String {
        let mut text = String::new();
        let _ = self.log.reopen().and_then(|mut f| f.read_to_string(&mut text));
        text
    }

    /// The unauthenticated calls, then proof that authentication is on.
    async fn bootstrap(&mut self, extra_policies: &[&str]) {
        let root = self.iam("AKIAROOTROOTROOTROOT", "made-up root secret");
        let call = |action: &'static str, params: Vec<(&'static str, String)>| {
            let root = root.clone();
            async move {
                let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
                root.call(action, &refs).await.unwrap_or_else(|e| panic!("bootstrap {action}: {e}"))
            }
        };
        let admin_policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": aws_iam::ADMIN_USER_ACTIONS, "Resource": "*"}],
        });
        let created = call("CreateUser", vec![("UserName", ADMIN.into())]).await;
        self.account_id = text_of(&created, "Arn").split(':').nth(4).expect("an account id").to_owned();
        call(
            "PutUserPolicy",
            vec![
                ("UserName", ADMIN.into()),
                ("PolicyName", "keysmith".into()),
                ("PolicyDocument", admin_policy.to_string()),
            ],
        )
        .await;
        self.admin_key = access_key(&call("CreateAccessKey", vec![("UserName", ADMIN.into())]).await);
        let old_actions: Vec<&str> =
            aws_iam::ADMIN_USER_ACTIONS.iter().copied().filter(|a| *a != "iam:GetAccessKeyLastUsed").collect();
        let old_policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": old_actions, "Resource": "*"}],
        });
        call("CreateUser", vec![("UserName", OLD_ADMIN.into())]).await;
        call(
            "PutUserPolicy",
            vec![
                ("UserName", OLD_ADMIN.into()),
                ("PolicyName", "keysmith".into()),
                ("PolicyDocument", old_policy.to_string()),
            ],
        )
        .await;
        self.old_admin_key = access_key(&call("CreateAccessKey", vec![("UserName", OLD_ADMIN.into())]).await);
        call("CreateUser", vec![("UserName", POWERLESS.into())]).await;
        self.powerless_key = access_key(&call("CreateAccessKey", vec![("UserName", POWERLESS.into())]).await);
        let grantable = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}],
        });
        for name in POLICIES {
            call("CreatePolicy", vec![("PolicyName", name.into()), ("PolicyDocument", grantable.to_string())]).await;
        }
        for extra in extra_policies {
            let (path, name) = extra.rsplit_once('/').expect("<path><name>");
            let params = vec![
                ("Path", format!("{path}/")),
                ("PolicyName", name.to_owned()),
                ("PolicyDocument", grantable.to_string()),
            ];
            call("CreatePolicy", params).await;
        }
        // From here on every call is authenticated and authorized.
        match root.call("GetUser", &[("UserName", ADMIN)]).await {
            Err(ProviderError::Unauthorized(m)) => assert!(m.contains("InvalidClientTokenId"), "{m}"),
            other => panic!("made-up root credentials must be refused after the bootstrap, got {other:?}"),
        }
    }

    /// An IAM client signing with the given key.
    pub fn iam(&self, access_key_id: &str, secret: &str) -> QueryClient {
        QueryClient::iam(&self.endpoint, REGION, access_key_id, secret, self.http.clone())
    }

    /// An STS client signing with the given key.
    pub fn sts(&self, access_key_id: &str, secret: &str) -> QueryClient {
        QueryClient::sts(&self.endpoint, REGION, access_key_id, secret, self.http.clone())
    }

    /// Raw IAM calls as the admin keysmith acts as.
    pub fn admin(&self) -> QueryClient {
        self.iam(&self.admin_key.0, &self.admin_key.1)
    }

    /// The provider, acting with `key`, users under [`PATH`].
    pub fn provider_with(&self, key: &(String, String)) -> AwsIamProvider {
        AwsIamProvider::new(
            self.endpoint.clone(),
            REGION.to_owned(),
            PATH.to_owned(),
            key.0.clone(),
            key.1.clone(),
            self.http.clone(),
        )
    }

    /// The provider, acting as the admin.
    pub fn provider(&self) -> AwsIamProvider {
        self.provider_with(&self.admin_key)
    }

    /// The ARN of the managed policy `name` (one of [`POLICIES`]).
    pub fn policy_arn(&self, name: &str) -> String {
        format!("arn:aws:iam::{}:policy/{name}", self.account_id)
    }

    pub fn grant(&self, name: &str) -> RoleGrant {
        RoleGrant { role: self.policy_arn(name), scope: None }
    }

    /// The user's ARN (from GetUser, read by the admin), or `None` when IAM
    /// has no such user.
    pub async fn user_arn(&self, user: &str) -> Option<String> {
        match self.admin().call("GetUser", &[("UserName", user)]).await {
            Ok(xml) => Some(text_of(&xml, "Arn")),
            Err(ProviderError::NotFound(_)) => None,
            Err(e) => panic!("GetUser {user}: {e}"),
        }
    }

    /// The user's tags, read by the admin.
    pub async fn tags(&self, user: &str) -> BTreeMap<String, String> {
        let xml = self.admin().call("ListUserTags", &[("UserName", user)]).await.expect("ListUserTags");
        let doc = roxmltree::Document::parse(&xml).expect("XML");
        doc.descendants().filter(|n| n.has_tag_name("member")).map(|m| (child(m, "Key"), child(m, "Value"))).collect()
    }

    /// The user's access keys and their status, read by the admin.
    pub async fn key_status(&self, user: &str) -> BTreeMap<String, String> {
        let xml = self.admin().call("ListAccessKeys", &[("UserName", user)]).await.expect("ListAccessKeys");
        let doc = roxmltree::Document::parse(&xml).expect("XML");
        doc.descendants()
            .filter(|n| n.has_tag_name("member"))
            .map(|m| (child(m, "AccessKeyId"), child(m, "Status")))
            .collect()
    }

    /// The ARNs of the managed policies attached to the user, read by the admin.
    pub async fn attached_policies(&self, user: &str) -> BTreeSet<String> {
        let xml = self
            .admin()
            .call("ListAttachedUserPolicies", &[("UserName", user)])
            .await
            .expect("ListAttachedUserPolicies");
        roxmltree::Document::parse(&xml)
            .expect("XML")
            .descendants()
            .filter(|n| n.has_tag_name("PolicyArn"))
            .filter_map(|n| n.text().map(str::to_owned))
            .collect()
    }

    /// Who the access key authenticates as (STS GetCallerIdentity needs no
    /// permission), or the error that refused it.
    pub async fn whoami_with(&self, access_key_id: &str, secret: &str) -> Result<String, String> {
        match self.sts(access_key_id, secret).call("GetCallerIdentity", &[]).await {
            Ok(xml) => Ok(text_of(&xml, "Arn")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Who `key` authenticates as, or the error that refused it.
    pub async fn whoami(&self, key: &IssuedKey) -> Result<String, String> {
        let (id, secret) = creds(&key.material);
        self.whoami_with(&id, &secret).await
    }
}

/// The text of `node`'s child element `name` (empty when there is none).
pub fn child(node: roxmltree::Node<'_, '_>, name: &str) -> String {
    node.children().find(|n| n.has_tag_name(name)).and_then(|n| n.text()).unwrap_or_default().to_owned()
}

/// The text of the first element `name` in `xml` (empty when there is none).
pub fn text_of(xml: &str, name: &str) -> String {
    let doc = roxmltree::Document::parse(xml).expect("XML");
    doc.descendants().find(|n| n.has_tag_name(name)).and_then(|n| n.text()).unwrap_or_default().to_owned()
}

/// The access key id and secret of a CreateAccessKey response.
pub fn access_key(xml: &str) -> (String, String) {
    (text_of(xml, "AccessKeyId"), text_of(xml, "SecretAccessKey"))
}

/// The access key id and secret an issued key carries.
pub fn creds(material: &KeyMaterial) -> (String, String) {
    let values = material.expose();
    (values[aws_iam::ACCESS_KEY_ID_KEY].clone(), values[aws_iam::SECRET_ACCESS_KEY_KEY].clone())
}
