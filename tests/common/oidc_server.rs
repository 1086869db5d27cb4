//! A real OAuth 2.0 authorization server for tests: npm's `oidc-provider`
//! (pinned in `tests/oidc/package.json`), run by `tests/oidc/server.js` on a
//! free loopback port, one per test, killed when it is dropped. It registers
//! clients behind an initial access token (RFC 7591), manages them (RFC 7592,
//! rotating the registration access token on every update), issues
//! client-credentials tokens and introspects them (RFC 7662). Its scopes are
//! `openid`, `offline_access`, `read`, `write` and `admin`.
//!
//! The package lives outside the work tree: in `OIDC_PROVIDER_MODULES` (a
//! `node_modules` folder; `.ci/run` installs it and sets this), else in
//! `~/.cache/keysmith/oidc-provider`, where the tests install it with
//! `npm ci` when it is missing. `NODE` names another node binary.
//!
//! Which scopes a client may use, and whether a secret still works, is
//! checked with the server's own token and introspection endpoints, as a
//! workload would.
//!
//! Test files include it with `#[path = "common/oidc_server.rs"] mod oidc_server;`,
//! so it does not depend on the rest of `tests/common`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use std::collections::BTreeSet;

use keysmith::provider::{
    oauth2::{
        store::SecretRegistrationStore, InMemoryRegistrationStore, OAuth2Provider, Registration, RegistrationStore,
    },
    AccountRequest, ProviderError,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

const STARTUP: Duration = Duration::from_secs(30);

/// Every scope the server knows.
pub const SCOPES: [&str; 5] = ["openid", "offline_access", "read", "write", "admin"];

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The oidc-provider version tests/oidc/package.json pins.
fn pinned_version() -> String {
    let path = manifest_dir().join("tests/oidc/package.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let manifest: Value = serde_json::from_str(&text).expect("package.json is JSON");
    manifest["dependencies"]["oidc-provider"].as_str().expect("oidc-provider is pinned").to_owned()
}

/// The version of oidc-provider installed in `modules`, if any.
fn installed_version(modules: &Path) -> Option<String> {
    let text = std::fs::read_to_string(modules.join("oidc-provider/package.json")).ok()?;
    let manifest: Value = serde_json::from_str(&text).ok()?;
    manifest["version"].as_str().map(str::to_owned)
}

/// The node_modules folder holding the pinned oidc-provider, installed into
/// keysmith's cache with `npm ci` if needed. Panics, saying why, when it is
/// neither there nor installable: these tests must not pass without it.
pub fn oidc_modules() -> &'static Path {
    static MODULES: OnceLock<PathBuf> = OnceLock::new();
    MODULES.get_or_init(|| match install_oidc_provider() {
        Ok(modules) => modules,
        Err(why) => panic!("oidc-provider is needed for these tests and is not available: {why}"),
    })
}

fn install_oidc_provider() -> Result<PathBuf, String> {
    let pinned = pinned_version();
    if let Some(modules) = std::env::var_os("OIDC_PROVIDER_MODULES").filter(|v| !v.is_empty()) {
        let modules = PathBuf::from(modules);
        return match installed_version(&modules) {
            Some(found) if found == pinned => Ok(modules),
            found => Err(format!(
                "OIDC_PROVIDER_MODULES={} holds oidc-provider {found:?}, the tests need {pinned} (.ci/run installs it)",
                modules.display()
            )),
        };
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .ok_or("neither OIDC_PROVIDER_MODULES, XDG_CACHE_HOME nor HOME is set")?;
    let prefix = cache.join("keysmith/oidc-provider");
    let modules = prefix.join("node_modules");
    let lock = manifest_dir().join("tests/oidc/package-lock.json");
    let same_lock = std::fs::read(&lock)
        .ok()
        .is_some_and(|ours| std::fs::read(prefix.join("package-lock.json")).ok() == Some(ours));
    if same_lock && installed_version(&modules).as_deref() == Some(pinned.as_str()) {
        return Ok(modules);
    }
    std::fs::create_dir_all(&prefix).map_err(|e| format!("creating {}: {e}", prefix.display()))?;
    for file in ["package.json", "package-lock.json"] {
        std::fs::copy(manifest_dir().join("tests/oidc").join(file), prefix.join(file))
            .map_err(|e| format!("copying tests/oidc/{file} to {}: {e}", prefix.display()))?;
    }
    let output = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error", "--prefix"])
        .arg(&prefix)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running npm ci (is npm installed?): {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "npm ci --prefix {} failed ({}):\n{}{}",
            prefix.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    match installed_version(&modules) {
        Some(found) if found == pinned => Ok(modules),
        found => Err(format!("npm ci installed oidc-provider {found:?}, not {pinned}")),
    }
}

/// What tests/oidc/server.js prints once it listens.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ServerInfo {
    /// `http://127.0.0.1:<port>`: the origin every endpoint is under.
    pub issuer: String,
    pub initial_access_token: String,
    pub registration_endpoint: String,
    pub token_endpoint: String,
    pub introspection_endpoint: String,
}

/// A client registered by hand, as the server answered its registration.
#[derive(Debug, Clone)]
pub struct HandRegistered {
    pub client_id: String,
    pub client_secret: String,
    pub registration: Registration,
    /// The registration answer: the client's metadata.
    pub metadata: Value,
}

/// An oidc-provider process on 127.0.0.1, killed on drop.
pub struct OidcServer {
    child: Child,
    pub info: ServerInfo,
    log: tempfile::NamedTempFile,
    pub http: reqwest::Client,
}

impl OidcServer {
    pub async fn start() -> Self {
        let modules = oidc_modules();
        let node = std::env::var("NODE").unwrap_or_else(|_| "node".to_owned());
        let script = manifest_dir().join("tests/oidc/server.js");
        let http = reqwest::Client::new();
        let mut last_log = String::new();
        // A port found free may be taken before the server binds it: try again.
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("its address").port();
            let log = tempfile::NamedTempFile::new().expect("a log file");
            let mut child = Command::new(&node)
                .arg(&script)
                .arg(port.to_string())
                .env("OIDC_PROVIDER_MODULES", modules)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log.reopen().expect("log file"))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {node} {}: {e}", script.display()));
            let stdout = child.stdout.take().expect("stdout is piped");
            // The first line says where the server listens; the rest (the
            // server logs to stdout too) goes to the log. stdout is read to
            // its end: node dies of EPIPE writing to a closed pipe.
            let mut rest = std::fs::OpenOptions::new().append(true).open(log.path()).expect("log file");
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stdout);
                let mut line = String::new();
                let _ = reader.read_line(&mut line);
                let _ = tx.send(line);
                let _ = std::io::copy(&mut reader, &mut rest);
            });
            let info = rx.recv_timeout(STARTUP).ok().and_then(|line| serde_json::from_str::<ServerInfo>(&line).ok());
            let Some(info) = info else {
                let _ = child.kill();
                let _ = child.wait();
                last_log = read_log(&log);
                continue;
            };
            let server = OidcServer { child, info, log, http: http.clone() };
            let discovery = format!("{}/.well-known/openid-configuration", server.info.issuer);
            let started = Instant::now();
            while started.elapsed() < STARTUP {
                let probe = http.get(&discovery).send().await;
                if probe.is_ok_and(|r| r.status().is_success()) {
                    return server;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            last_log = read_log(&server.log);
        }
        panic!("oidc-provider did not start:\n{last_log}");
    }

    /// A provider with the right initial access token and a store of its own.
    pub fn provider(&self) -> (OAuth2Provider, Arc<InMemoryRegistrationStore>) {
        let store = Arc::new(InMemoryRegistrationStore::new());
        (self.provider_with(Some(self.info.initial_access_token.clone()), store.clone()), store)
    }

    /// A provider with this initial access token (or none) and store.
    pub fn provider_with(&self, token: Option<String>, store: Arc<InMemoryRegistrationStore>) -> OAuth2Provider {
        OAuth2Provider::new(
            self.info.registration_endpoint.clone(),
            self.info.token_endpoint.clone(),
            Some(self.info.introspection_endpoint.clone()),
            token,
            self.http.clone(),
            store,
        )
    }

    /// A client-credentials token request, as a workload makes it (HTTP
    /// Basic), at `token_url` (the server's token endpoint unless given).
    pub async fn token_at(
        &self,
        token_url: &str,
        client_id: &str,
        secret: &str,
        scope: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut form = vec![("grant_type", "client_credentials")];
        if let Some(scope) = scope {
            form.push(("scope", scope));
        }
        let response = self
            .http
            .post(token_url)
            .basic_auth(client_id, Some(secret))
            .form(&form)
            .send()
            .await
            .expect("the token endpoint answers");
        let status = response.status();
        (status, response.json().await.expect("a JSON answer"))
    }

    /// A client-credentials token request at the server's token endpoint.
    pub async fn token(&self, client_id: &str, secret: &str, scope: Option<&str>) -> (StatusCode, Value) {
        self.token_at(&self.info.token_endpoint, client_id, secret, scope).await
    }

    /// Introspects `token` (RFC 7662), authenticating as the client (HTTP Basic).
    pub async fn introspect(&self, client_id: &str, secret: &str, token: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .post(&self.info.introspection_endpoint)
            .basic_auth(client_id, Some(secret))
            .form(&[("token", token)])
            .send()
            .await
            .expect("the introspection endpoint answers");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The client's configuration as the server holds it, read with the
    /// registration access token (RFC 7592 §2.1).
    pub async fn client_config(&self, registration: &Registration) -> (StatusCode, Value) {
        let response = self
            .http
            .get(&registration.registration_client_uri)
            .bearer_auth(&registration.registration_access_token)
            .send()
            .await
            .expect("the server answers");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Registers a client by hand (not through keysmith), with the initial
    /// access token: `client_credentials` for `scope`, HTTP Basic.
    pub async fn register_client(&self, name: &str, scope: &str) -> HandRegistered {
        let response = self
            .http
            .post(&self.info.registration_endpoint)
            .bearer_auth(&self.info.initial_access_token)
            .json(&json!({
                "client_name": name,
                "grant_types": ["client_credentials"],
                "response_types": [],
                "redirect_uris": [],
                "scope": scope,
                "token_endpoint_auth_method": "client_secret_basic",
            }))
            .send()
            .await
            .expect("the registration endpoint answers");
        let status = response.status();
        let metadata: Value = response.json().await.expect("a JSON answer");
        assert_eq!(status, StatusCode::CREATED, "{metadata}");
        let field =
            |name: &str| metadata[name].as_str().unwrap_or_else(|| panic!("no {name} in {metadata}")).to_owned();
        HandRegistered {
            client_id: field("client_id"),
            client_secret: field("client_secret"),
            registration: Registration {
                client_id: field("client_id"),
                registration_client_uri: field("registration_client_uri"),
                registration_access_token: field("registration_access_token"),
                current_key: None,
                update_sent_at: None,
            },
            metadata,
        }
    }

    /// Makes the next `count` registration requests answer 429 with
    /// `Retry-After: retry_after`.
    pub async fn throttle(&self, count: u32, retry_after: u64) {
        let response = self
            .http
            .post(format!("{}/__test/throttle", self.info.issuer))
            .json(&json!({"count": count, "retry_after": retry_after}))
            .send()
            .await
            .expect("the server answers");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }

    /// The ids of the clients the server holds (registered and not
    /// deleted), as its administrator sees them: RFC 7591/7592 give no way
    /// to list them, so the test server answers this for the campaigns.
    pub async fn clients(&self) -> BTreeSet<String> {
        let response = self.http.get(format!("{}/__test/clients", self.info.issuer)).send().await;
        let response = response.expect("the server answers");
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("a list of client ids")
    }

    /// Deletes a client as the server's administrator does, without its
    /// registration access token.
    pub async fn admin_delete_client(&self, client_id: &str) {
        let url = format!("{}/__test/clients/{client_id}", self.info.issuer);
        let response = self.http.delete(url).send().await.expect("the server answers");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }

    /// A provider seeing the registrations the operator keeps in Secrets
    /// (read through `client`, an apiserver admin's) and never writing
    /// them: the campaigns' view of the target app.
    pub fn operator_view(&self, client: kube::Client) -> OAuth2Provider {
        OAuth2Provider::new(
            self.info.registration_endpoint.clone(),
            self.info.token_endpoint.clone(),
            Some(self.info.introspection_endpoint.clone()),
            Some(self.info.initial_access_token.clone()),
            self.http.clone(),
            Arc::new(ReadOnlyStore(SecretRegistrationStore::new(client))),
        )
    }

    /// Everything the server logged so far.
    pub fn logs(&self) -> String {
        read_log(&self.log)
    }
}

impl Drop for OidcServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("oidc-provider's log:\n{}", read_log(&self.log));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The operator's registration records, read and never written: a test
/// checking them must not change what the operator finds.
struct ReadOnlyStore(SecretRegistrationStore);

#[async_trait::async_trait]
impl RegistrationStore for ReadOnlyStore {
    async fn get(&self, account: &AccountRequest) -> Result<Option<Registration>, ProviderError> {
        self.0.get(account).await
    }

    async fn put(&self, _account: &AccountRequest, _registration: &Registration) -> Result<(), ProviderError> {
        Ok(())
    }

    async fn delete(&self, _account: &AccountRequest) -> Result<(), ProviderError> {
        Ok(())
    }
}

fn read_log(log: &tempfile::NamedTempFile) -> String {
    let mut text = String::new();
    let _ = log.reopen().and_then(|mut f| f.read_to_string(&mut text));
    text
}
