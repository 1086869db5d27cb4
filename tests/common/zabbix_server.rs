//! A real Zabbix 6.0 API for tests: Debian's `zabbix-frontend-php` served by
//! `php -S` on a free loopback port, over a throwaway PostgreSQL holding
//! Zabbix's own schema and data (`zabbix-server-pgsql`), both installed by
//! `.ci/run`. `tests/zabbix/start.sh` starts one per test (about 1 s once a
//! loaded database is cached under `~/.cache/keysmith/zabbix-golden`, 5 s
//! to build that); dropping it stops both and removes its files.
//!
//! [`ZabbixServer::start`] logs in as the built-in `Admin` and makes the
//! least-privilege user keysmith acts as: `keysmith-operator`, whose role is
//! a Super admin type (Zabbix lets no other type create users, roles, or
//! tokens for others) with an API allow-list of exactly
//! [`zabbix::ADMIN_METHODS`], and an API token for it. Every test therefore
//! also proves that allow-list is enough.
//!
//! Test files include it with `#[path = "common/zabbix_server.rs"] mod zabbix_server;`,
//! so it does not depend on the rest of `tests/common`.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use keysmith::provider::zabbix::{self, ZabbixProvider, TOKEN_KEY};
use keysmith::provider::IssuedKey;
use serde_json::{json, Value};

/// The user keysmith acts as.
pub const OPERATOR: &str = "keysmith-operator";

/// A Zabbix API on 127.0.0.1, stopped and removed on drop.
pub struct ZabbixServer {
    dir: tempfile::TempDir,
    /// `http://127.0.0.1:<port>/api_jsonrpc.php`.
    pub url: String,
    pub http: reqwest::Client,
    /// A session of the built-in `Admin` (the test's own administrator).
    pub admin_session: String,
    /// The API token keysmith acts with.
    pub operator_token: String,
}

impl Drop for ZabbixServer {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(self.dir.path().join("w/stop.sh")).arg("--rm").status();
    }
}

fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
    base.join("keysmith")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("its address").port()
}

impl ZabbixServer {
    /// Starts an instance and makes the operator (see the module docs).
    pub async fn start() -> Self {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/zabbix/start.sh");
        let mut last = String::new();
        // A port found free may be taken before the server binds it: try again.
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let (pg, http_port) = (free_port(), free_port());
            let output = tokio::process::Command::new("bash")
                .arg(&script)
                .arg(dir.path().join("w"))
                .arg(pg.to_string())
                .arg(http_port.to_string())
                .env("ZBX_GOLDEN", cache_dir().join("zabbix-golden"))
                .output()
                .await
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            if !output.status.success() {
                last =
                    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
                continue;
            }
            let http = reqwest::Client::builder().no_proxy().build().expect("an HTTP client");
            let mut server = ZabbixServer {
                dir,
                url: format!("http://127.0.0.1:{http_port}/api_jsonrpc.php"),
                http,
                admin_session: String::new(),
                operator_token: String::new(),
            };
            server.bootstrap().await;
            return server;
        }
        panic!(
            "Zabbix did not start (install Debian's zabbix-frontend-php zabbix-server-pgsql php-pgsql php-cli postgresql):\n{last}"
        );
    }

    async fn bootstrap(&mut self) {
        let session = self.call(None, "user.login", json!({"username": "Admin", "password": "zabbix"})).await;
        self.admin_session = session.expect("Admin logs in").as_str().expect("a session id").to_owned();
        let role = self
            .admin(
                "role.create",
                json!({"name": "keysmith-operator", "type": 3, "rules": {
                    "api.access": 1, "api.mode": 1, "api": zabbix::ADMIN_METHODS,
                }}),
            )
            .await;
        let group = self.group_id(zabbix::DEFAULT_USER_GROUP).await;
        let user = self
            .admin(
                "user.create",
                json!({"username": OPERATOR, "roleid": role["roleids"][0], "usrgrps": [{"usrgrpid": group}]}),
            )
            .await;
        self.operator_token = self.new_token(user["userids"][0].as_str().expect("a user id"), "keysmith").await;
    }

    /// A JSON-RPC call; the result, or the error's `data`.
    pub async fn call(&self, auth: Option<&str>, method: &str, params: Value) -> Result<Value, String> {
        let mut body = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 1});
        if let Some(auth) = auth {
            body["auth"] = json!(auth);
        }
        let answer: Value = self
            .http
            .post(&self.url)
            .header("Content-Type", "application/json-rpc")
            .json(&body)
            .send()
            .await
            .expect("Zabbix answers")
            .json()
            .await
            .expect("a JSON-RPC answer");
        match answer.get("error") {
            Some(error) => Err(error["data"].as_str().unwrap_or_default().to_owned()),
            None => Ok(answer["result"].clone()),
        }
    }

    /// A call as `Admin`, which must succeed.
    pub async fn admin(&self, method: &str, params: Value) -> Value {
        self.call(Some(&self.admin_session), method, params.clone())
            .await
            .unwrap_or_else(|e| panic!("{method} {params}: {e}"))
    }

    /// A user group's id by name.
    pub async fn group_id(&self, name: &str) -> String {
        let groups = self.admin("usergroup.get", json!({"output": ["usrgrpid"], "filter": {"name": name}})).await;
        groups[0]["usrgrpid"].as_str().unwrap_or_else(|| panic!("no user group {name}")).to_owned()
    }

    /// A new API token for `userid`, made by `Admin`.
    pub async fn new_token(&self, userid: &str, name: &str) -> String {
        let token = self.admin("token.create", json!({"name": name, "userid": userid})).await;
        let generated = self.admin("token.generate", json!([token["tokenids"][0]])).await;
        generated[0]["token"].as_str().expect("a token").to_owned()
    }

    /// The provider, acting as the operator.
    pub fn provider(&self) -> ZabbixProvider {
        self.provider_via(&self.url)
    }

    /// The provider, reaching the API at `url` (a proxy's).
    pub fn provider_via(&self, url: &str) -> ZabbixProvider {
        ZabbixProvider::new(url, self.operator_token.clone(), "", "", self.http.clone())
            .expect("a provider")
            .with_verify_window(Duration::from_secs(2))
    }

    /// A user made by hand, as a Zabbix admin would, not by keysmith.
    pub async fn make_user(&self, name: &str) -> String {
        let group = self.group_id(zabbix::DEFAULT_USER_GROUP).await;
        let user = self
            .admin(
                "user.create",
                json!({"username": name, "roleid": "1", "usrgrps": [{"usrgrpid": group}], "surname": "made by hand"}),
            )
            .await;
        user["userids"][0].as_str().expect("a user id").to_owned()
    }

    /// A user by name, with its groups and role.
    pub async fn user(&self, name: &str) -> Option<Value> {
        let found = self
            .admin(
                "user.get",
                json!({"output": "extend", "selectUsrgrps": ["usrgrpid", "name"], "selectRole": ["roleid", "name", "type"], "filter": {"username": name}}),
            )
            .await;
        found.as_array().and_then(|a| a.first().cloned())
    }

    /// The API methods the role of user `name` allows, and the role's API
    /// access and mode.
    pub async fn role_rules(&self, name: &str) -> Value {
        let user = self.user(name).await.expect("the user");
        let role = self.admin("role.get", json!({"roleids": user["roleid"], "selectRules": "extend"})).await;
        role[0]["rules"].clone()
    }

    /// The tokens of user `name`, as Zabbix reports them.
    pub async fn tokens(&self, name: &str) -> Vec<Value> {
        let Some(user) = self.user(name).await else { return Vec::new() };
        let found = self.admin("token.get", json!({"output": "extend", "userids": [user["userid"]]})).await;
        found.as_array().cloned().unwrap_or_default()
    }

    /// Calls `method` with a key's token: the result, or what Zabbix said.
    pub async fn call_with_key(&self, key: &IssuedKey, method: &str, params: Value) -> Result<Value, String> {
        let token = key.material.expose().get(TOKEN_KEY).expect("a token").clone();
        self.call(Some(&token), method, params).await
    }

    /// Whether Zabbix accepts the key right now (a call any user may make:
    /// the user's own record).
    pub async fn key_works(&self, key: &IssuedKey) -> bool {
        let token = key.material.expose().get(TOKEN_KEY).expect("a token").clone();
        self.call(None, "user.checkAuthentication", json!({"token": token})).await.is_ok()
    }
}
