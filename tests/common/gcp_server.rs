//! The contract fake of Google Cloud IAM for tests (`tests/gcp/fake_gcp.py`,
//! see its README): one per test on a free loopback port, started by the
//! test and killed when it is dropped. It checks every request against
//! Google's discovery documents (from PyPI's google-api-python-client,
//! installed by `.ci/run`) and records violations; [`GcpServer::violations`]
//! reads them, and every test should end with none.
//!
//! It starts with `--admin-key-file`: the service account `keysmith-admin`
//! holding the three roles a connection needs, whose JSON key file keysmith
//! exchanges for access tokens, as against Google. `PYTHON` names another
//! interpreter.
//!
//! Test files include it with `#[path = "common/gcp_server.rs"] mod gcp_server;`,
//! so it does not depend on the rest of `tests/common`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use keysmith::provider::gcp_iam::{GcpIamProvider, CREDENTIALS_KEY};
use keysmith::provider::IssuedKey;
use serde_json::{json, Value};

/// The project the fake serves.
pub const PROJECT: &str = "demo-project";
/// Its static admin token, for the test's own calls.
pub const ADMIN_TOKEN: &str = "fake-gcp-admin-token";

/// A running fake, killed on drop.
pub struct GcpServer {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// The connection's credential: keysmith-admin's JSON key file.
    pub admin_key_file: String,
    _dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

impl Drop for GcpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl GcpServer {
    pub async fn start() -> Self {
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gcp/fake_gcp.py");
        let dir = tempfile::tempdir().expect("a directory");
        let key_path = dir.path().join("admin.json");
        let mut child = Command::new(&python)
            .arg(&script)
            .args(["--port", "0", "--project", PROJECT, "--admin-token", ADMIN_TOKEN, "--admin-key-file"])
            .arg(&key_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {python} {}: {e}", script.display()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            line
        })
        .await
        .expect("reading the fake's first line");
        let url = line.strip_prefix("listening ").map(|u| u.trim().to_owned()).unwrap_or_else(|| {
            let _ = child.kill();
            panic!(
                "fake_gcp did not start ({line:?}); it needs `pip install google-api-python-client==2.202.0 cryptography==48.0.0`"
            )
        });
        let admin_key_file = std::fs::read_to_string(&key_path).expect("the admin key file");
        let http = reqwest::Client::builder().no_proxy().build().expect("an HTTP client");
        GcpServer { child, url, admin_key_file, _dir: dir, http }
    }

    /// A provider acting as keysmith-admin, straight to the fake.
    pub fn provider(&self) -> GcpIamProvider {
        self.provider_via(&self.url)
    }

    /// A provider whose IAM and Resource Manager calls go to `base` (a
    /// proxy in front of the fake); tokens are exchanged at the fake itself.
    pub fn provider_via(&self, base: &str) -> GcpIamProvider {
        GcpIamProvider::new(
            PROJECT.to_owned(),
            format!("{base}/iam"),
            format!("{base}/crm"),
            &self.admin_key_file,
            self.http.clone(),
        )
        .expect("the admin key file parses")
        .with_verify_window(Duration::from_secs(5))
    }

    /// What the fake recorded as breaking Google's published API description.
    pub async fn violations(&self) -> Vec<Value> {
        self.fake("GET", "violations", None).await.as_array().cloned().unwrap_or_default()
    }

    /// A `/_fake/` hook.
    pub async fn fake(&self, method: &str, what: &str, body: Option<Value>) -> Value {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let mut request = self.http.request(method, format!("{}/_fake/{what}", self.url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.expect("the fake answers").json().await.expect("JSON")
    }

    /// An IAM API call with the static admin token: `(status, body)`.
    pub async fn iam(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let mut request = self.http.request(method, format!("{}/iam/v1/{path}", self.url)).bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the fake answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The project policy as stored (version 3).
    pub async fn policy(&self) -> Value {
        self.fake("GET", "policy", None).await
    }

    /// The roles `email` holds in unconditional bindings.
    pub async fn roles_of(&self, email: &str) -> Vec<String> {
        let member = format!("serviceAccount:{email}");
        let policy = self.policy().await;
        let mut roles: Vec<String> = policy["bindings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b.get("condition").is_none())
            .filter(|b| b["members"].as_array().is_some_and(|m| m.iter().any(|m| m == &json!(member))))
            .filter_map(|b| b["role"].as_str().map(str::to_owned))
            .collect();
        roles.sort();
        roles
    }

    /// Creates a service account by hand, as someone other than keysmith.
    pub async fn make_account(&self, account_id: &str, description: &str) {
        let (status, body) = self
            .iam(
                "POST",
                &format!("projects/{PROJECT}/serviceAccounts"),
                Some(json!({"accountId": account_id, "serviceAccount": {"description": description}})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    /// Whether the fake's token endpoint accepts `key` (its JSON key file)
    /// now: a JWT-bearer exchange signed with it, as a workload makes one.
    pub async fn key_works(&self, key: &IssuedKey) -> bool {
        let Some(text) = key.material.expose().get(CREDENTIALS_KEY) else { return false };
        let Ok(file) = serde_json::from_str::<Value>(text) else { return false };
        let assertion = match sign(&file) {
            Some(assertion) => assertion,
            None => return false,
        };
        let form = [("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), ("assertion", assertion.as_str())];
        let token_uri = file["token_uri"].as_str().unwrap_or_default();
        self.http.post(token_uri).form(&form).send().await.is_ok_and(|r| r.status().is_success())
    }

    /// The fake's record of each key: `keyId`, `exchangeCount`, `lastUsed`...
    pub async fn keys(&self) -> Vec<Value> {
        self.fake("GET", "keys", None).await.as_array().cloned().unwrap_or_default()
    }
}

/// A JWT-bearer assertion signed with the key file's private key (RS256),
/// made independently of keysmith's own signing.
fn sign(file: &Value) -> Option<String> {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = jiff::Timestamp::now().as_second();
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": file["private_key_id"]});
    let claims = json!({"iss": file["client_email"], "scope": "https://www.googleapis.com/auth/cloud-platform",
                        "aud": file["token_uri"], "iat": now, "exp": now + 600});
    let input = format!("{}.{}", engine.encode(header.to_string()), engine.encode(claims.to_string()));
    let pem = file["private_key"].as_str()?;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(body).ok()?;
    let pair = ring::signature::RsaKeyPair::from_pkcs8(&der).ok()?;
    let mut signature = vec![0; pair.public().modulus_len()];
    pair.sign(&ring::signature::RSA_PKCS1_SHA256, &ring::rand::SystemRandom::new(), input.as_bytes(), &mut signature)
        .ok()?;
    Some(format!("{input}.{}", engine.encode(signature)))
}
