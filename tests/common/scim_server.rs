//! A real SCIM 2.0 server for tests: PyPI's `scim2-server` (installed by
//! `.ci/run`), one per test on a free loopback port, started by the test and
//! killed when it is dropped. `SCIM2_SERVER` names another binary.
//!
//! scim2-server keeps passwords in memory and lets a search filter on them
//! (`password eq "..."`), which real services do not: tests use that to
//! prove which password is live, something the `scim` provider itself cannot
//! (see its module docs).
//!
//! Test files include it with `#[path = "common/scim_server.rs"] mod scim_server;`,
//! so it does not depend on the rest of `tests/common`.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keysmith::provider::scim::{self, ScimProvider};
use serde_json::{json, Value};

const STARTUP: Duration = Duration::from_secs(30);
pub const PATCH_OP: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
pub const SEARCH_REQUEST: &str = "urn:ietf:params:scim:api:messages:2.0:SearchRequest";
pub const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";

/// A scim2-server process on 127.0.0.1, killed on drop.
pub struct ScimServer {
    child: Child,
    /// `http://127.0.0.1:<port>`: what a proxy in front of the server forwards to.
    pub origin: String,
    /// The SCIM base URL: the origin and `/v2`.
    pub base_url: String,
    /// The admin bearer token the server was started with.
    pub token: String,
    log: tempfile::NamedTempFile,
    pub http: reqwest::Client,
}

impl ScimServer {
    /// Starts a server with a fresh random admin token and waits until it answers.
    pub async fn start() -> Self {
        let binary = std::env::var("SCIM2_SERVER").unwrap_or_else(|_| "scim2-server".to_owned());
        let token = format!("admin-{:032x}", rand::random::<u128>());
        let http = reqwest::Client::new();
        let mut last_log = String::new();
        // A port found free may be taken before the server binds it: try again.
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("its address").port();
            let log = tempfile::NamedTempFile::new().expect("a log file");
            let child = Command::new(&binary)
                .args(["--hostname", "127.0.0.1", "--port", &port.to_string(), "--bearer-token", &token])
                .stdin(Stdio::null())
                .stdout(log.reopen().expect("log file"))
                .stderr(log.reopen().expect("log file"))
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start {binary}: {e}; install it with `pip install scim2-server==0.8.3`")
                });
            let origin = format!("http://127.0.0.1:{port}");
            let mut server = ScimServer {
                child,
                base_url: format!("{origin}/v2"),
                origin,
                token: token.clone(),
                log,
                http: http.clone(),
            };
            let started = Instant::now();
            while started.elapsed() < STARTUP {
                if let Ok(Some(_)) = server.child.try_wait() {
                    break;
                }
                let probe = http.get(format!("{}/ServiceProviderConfig", server.base_url)).send().await;
                if probe.is_ok_and(|r| r.status().is_success()) {
                    return server;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            last_log = server.log_text();
        }
        panic!("scim2-server did not start:\n{last_log}");
    }

    /// Everything the server logged so far (wsgiref logs each request after answering it).
    pub fn log_text(&self) -> String {
        let mut text = String::new();
        let _ = self.log.reopen().and_then(|mut f| f.read_to_string(&mut text));
        text
    }

    /// The provider, with the admin token, talking to the server directly.
    pub fn provider(&self) -> ScimProvider {
        ScimProvider::new(self.base_url.clone(), self.token.clone(), self.http.clone())
    }

    /// A raw SCIM request as the admin; panics unless it succeeds.
    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.base_url)).bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.header("content-type", "application/scim+json").body(body.to_string());
        }
        let response = req.send().await.expect("scim2-server answers");
        let status = response.status();
        let text = response.text().await.expect("a body");
        assert!(status.is_success(), "{method} {path}: {status} {text}");
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).expect("JSON")
        }
    }

    /// Creates a User by hand, as someone other than keysmith; its id.
    pub async fn create_user(&self, user_name: &str, external_id: Option<&str>) -> String {
        let mut body = json!({"schemas": [USER_SCHEMA], "userName": user_name, "displayName": "someone's"});
        if let Some(id) = external_id {
            body["externalId"] = json!(id);
        }
        id_of(&self.admin(reqwest::Method::POST, "/Users", Some(body)).await)
    }

    /// The User with this id; panics when there is none.
    pub async fn user(&self, id: &str) -> Value {
        self.admin(reqwest::Method::GET, &format!("/Users/{id}"), None).await
    }

    /// The User named `user_name`, if there is one.
    pub async fn user_named(&self, user_name: &str) -> Option<Value> {
        let filter = format!("userName eq {}", scim::filter_value(user_name));
        let page = self
            .admin(
                reqwest::Method::POST,
                "/Users/.search",
                Some(json!({"schemas": [SEARCH_REQUEST], "filter": filter})),
            )
            .await;
        page["Resources"].as_array().and_then(|r| r.first()).cloned()
    }

    /// Creates a Group with no members; its id.
    pub async fn create_group(&self, name: &str) -> String {
        let body = json!({"schemas": [GROUP_SCHEMA], "displayName": name});
        id_of(&self.admin(reqwest::Method::POST, "/Groups", Some(body)).await)
    }

    /// The ids of a Group's members.
    pub async fn members(&self, group_id: &str) -> Vec<String> {
        let group = self.admin(reqwest::Method::GET, &format!("/Groups/{group_id}"), None).await;
        group["members"]
            .as_array()
            .map(|m| m.iter().filter_map(|m| m["value"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    /// Adds a member to a Group by hand.
    pub async fn add_member(&self, group_id: &str, user_id: &str) {
        let op = json!({"schemas": [PATCH_OP], "Operations": [{"op": "add", "path": "members", "value": [{"value": user_id}]}]});
        self.admin(reqwest::Method::PATCH, &format!("/Groups/{group_id}"), Some(op)).await;
    }

    /// Whether `password` is the User's password, by scim2-server's
    /// filtering on passwords (the password travels in a POST body).
    pub async fn password_is(&self, user_name: &str, password: &str) -> bool {
        let filter =
            format!("userName eq {} and password eq {}", scim::filter_value(user_name), scim::filter_value(password));
        let page = self
            .admin(
                reqwest::Method::POST,
                "/Users/.search",
                Some(json!({"schemas": [SEARCH_REQUEST], "filter": filter})),
            )
            .await;
        page["totalResults"].as_u64() == Some(1)
    }

    /// The request lines the server logged.
    pub fn requests(&self) -> Vec<String> {
        self.log_text().lines().filter_map(|l| l.split('"').nth(1).map(str::to_owned)).collect()
    }
}

impl Drop for ScimServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `id` of a SCIM resource.
pub fn id_of(resource: &Value) -> String {
    resource["id"].as_str().expect("an id").to_owned()
}
