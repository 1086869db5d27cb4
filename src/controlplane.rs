//! A throwaway local Kubernetes control plane: etcd, kube-apiserver and
//! (when available) kube-controller-manager, all listening on 127.0.0.1.
//!
//! It is meant for integration tests and for `keysmith dev`. Everything lives
//! in a fresh temporary directory (certificates, etcd data, component logs),
//! which is removed together with the processes when the [`ControlPlane`] is
//! dropped. Because a `static` (see [`shared`]) is never dropped and a test
//! binary may also be killed, a tiny reaper process watches this process and
//! tears everything down once it is gone.
//!
//! The binaries are found like envtest does: `KUBEBUILDER_ASSETS` names a
//! directory holding `kube-apiserver` and `etcd` (and optionally
//! `kube-controller-manager`); without it, `tests/bin/kube-assets.sh` from
//! this crate's source tree builds (once) and prints such a directory.
//!
//! Authentication uses static bearer tokens: an admin (group
//! `system:masters`), the operator user `keysmith-operator` (also
//! `system:masters`, so that the operator under test is told apart from the
//! tests' own admin traffic) and a handful of unprivileged users `user-1` ..
//! `user-5`, so that tests can exercise RBAC. Tokens are secrets: they are
//! never logged nor put into errors.
//!
//! The apiserver writes an audit log (level `Metadata`, one JSON event per
//! line, written before each response completes); [`ControlPlane::audit_records`]
//! and friends read it back so tests can count the requests a user made.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read as _, Seek as _, Write as _};
use std::net::TcpListener;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use kube::config::{
    AuthInfo, Cluster, Context, KubeConfigOptions, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext,
};

/// Number of pre-provisioned unprivileged users (`user-1` ..= `user-N`).
pub const USER_COUNT: usize = 5;

/// How long [`ControlPlane::start`] waits for the components to get ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often readiness is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How many times the whole start is attempted when a port was taken.
const START_ATTEMPTS: usize = 3;
/// Lines of a component log quoted in startup errors.
const LOG_TAIL_LINES: usize = 20;
/// The service CIDR handed to the apiserver.
const SERVICE_CLUSTER_IP_RANGE: &str = "10.0.0.0/24";
/// Issuer of service account tokens.
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Name of the cluster, context and admin user in generated kubeconfigs.
const KUBECONFIG_NAME: &str = "keysmith-dev";
/// User name of the pre-provisioned operator identity.
pub const OPERATOR_USER: &str = "keysmith-operator";

/// Audit policy: every request at level `Metadata` (who, what, response
/// code; no bodies), without the `RequestReceived` stage.
const AUDIT_POLICY: &str = "\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages:
  - RequestReceived
rules:
  - level: Metadata
";
/// `--audit-log-maxsize` in MiB: large enough that the log never rotates
/// (rotation would invalidate [`ControlPlane::audit_mark`] marks).
const AUDIT_LOG_MAX_SIZE_MB: u32 = 1024 * 1024;

/// Controllers run by kube-controller-manager: the ones a cluster's own
/// objects depend on (garbage collection, namespaces, ServiceAccounts and
/// their CA bundle, workloads). clusterrole-aggregation fills the built-in
/// `view`, `edit` and `admin` ClusterRoles. As on any cluster since 1.24, no
/// ServiceAccount gets a long-lived token Secret: tokens are requested.
const CONTROLLERS: &str = "garbage-collector-controller,namespace-controller,serviceaccount-controller,\
                           serviceaccount-token-controller,root-ca-certificate-publisher-controller,\
                           legacy-serviceaccount-token-cleaner-controller,clusterrole-aggregation-controller,\
                           deployment-controller,replicaset-controller,statefulset-controller,daemonset-controller,\
                           resourcequota-controller";

/// Watches `$1` (our pid); once it is gone, kills every pid listed in
/// `$2/pids` and removes the directory `$2`.
const REAPER_SCRIPT: &str = r#"
trap '' INT TERM HUP
parent=$1
dir=$2
while kill -0 "$parent" 2>/dev/null; do sleep 0.5; done
pids=$(cat "$dir/pids" 2>/dev/null)
if [ -n "$pids" ]; then
  kill $pids 2>/dev/null
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    alive=
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && break
    sleep 0.2
  done
  kill -9 $pids 2>/dev/null
fi
rm -rf "$dir"
"#;

/// Errors from starting or talking to the local control plane.
///
/// Messages never contain tokens or key material.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// The kube-apiserver / etcd binaries could not be located or built.
    #[error("cannot locate the control-plane binaries: {0}")]
    Assets(String),
    /// A filesystem or process-spawning operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Generating the CA, serving certificate or signing key failed.
    #[error("generating certificates and keys: {0}")]
    Certificates(#[source] rcgen::Error),
    /// A component exited while the control plane was starting.
    #[error("{component} exited during startup ({status}); last lines of its log:\n{log_tail}")]
    ComponentExited {
        /// `etcd`, `kube-apiserver` or `kube-controller-manager`.
        component: &'static str,
        /// How it exited.
        status: String,
        /// The tail of its log file.
        log_tail: String,
    },
    /// The control plane did not get ready in time.
    #[error(
        "timed out after {}s waiting for {what}; last lines of the {component} log:\n{log_tail}",
        timeout.as_secs()
    )]
    Timeout {
        /// The condition that was awaited.
        what: String,
        /// How long it was awaited.
        timeout: Duration,
        /// The component most likely at fault.
        component: &'static str,
        /// The tail of its log file.
        log_tail: String,
    },
    /// Building an HTTP client for readiness checks failed.
    #[error("building the readiness HTTP client: {0}")]
    Http(#[source] reqwest::Error),
    /// Serializing a kubeconfig failed.
    #[error("serializing a kubeconfig: {0}")]
    Kubeconfig(#[source] serde_yaml::Error),
    /// Turning a kubeconfig into a client configuration failed.
    #[error("loading a kubeconfig: {0}")]
    KubeconfigLoad(#[source] kube::config::KubeconfigError),
    /// Building a [`kube::Client`] failed.
    #[error("building a kube client: {0}")]
    Client(#[source] kube::Error),
    /// The apiserver audit log could not be parsed.
    #[error("reading the apiserver audit log: {0}")]
    Audit(String),
    /// [`ControlPlane::restart_apiserver`] found no apiserver it started.
    #[error("cannot restart the apiserver: {0}")]
    NoApiserver(&'static str),
    /// The process-wide control plane of [`shared`] failed to start earlier.
    #[error("the shared control plane failed to start: {0}")]
    SharedStartFailed(String),
}

impl ControlPlaneError {
    fn io(what: impl Into<String>, source: io::Error) -> Self {
        ControlPlaneError::Io { what: what.into(), source }
    }

    /// Whether the failure looks like a lost race for a free port.
    fn is_port_race(&self) -> bool {
        match self {
            ControlPlaneError::ComponentExited { log_tail, .. } => {
                let log = log_tail.to_ascii_lowercase();
                log.contains("address already in use") || log.contains("failed to listen")
            }
            _ => false,
        }
    }
}

/// A spawned component process and where its output goes.
#[derive(Debug)]
struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// A running local control plane. Dropping it (or calling
/// [`ControlPlane::stop`]) kills the processes and removes its directory.
pub struct ControlPlane {
    server_url: String,
    ca_pem: String,
    admin_token: String,
    operator_token: String,
    user_tokens: Vec<String>,
    kubeconfig_path: PathBuf,
    operator_kubeconfig_path: PathBuf,
    audit_log_path: PathBuf,
    /// The kubectl built with the control plane, if the assets hold one.
    kubectl: Option<PathBuf>,
    /// What has been parsed of the audit log so far.
    audit: Mutex<AuditCache>,
    /// Components in start order; killed in reverse order. Behind a lock
    /// so that [`ControlPlane::restart_apiserver`] can replace one.
    components: Mutex<Vec<Component>>,
    /// The apiserver's program and flags, to start it again the same way.
    apiserver_argv: Vec<std::ffi::OsString>,
    reaper: Option<Child>,
    /// Removed on drop, after the components are gone.
    dir: tempfile::TempDir,
}

/// Material written into the temp dir before anything is started.
struct Pki {
    ca_pem: String,
    ca_file: PathBuf,
    serving_cert_file: PathBuf,
    serving_key_file: PathBuf,
    sa_key_file: PathBuf,
    sa_pub_file: PathBuf,
}

impl ControlPlane {
    /// Start etcd + apiserver (+ controller-manager), wait until /readyz is
    /// ok and the `default` namespace exists.
    ///
    /// When kube-controller-manager runs, this also waits until the
    /// `default` namespace has its `default` ServiceAccount and CA bundle,
    /// so that pods can be admitted right away. A start that fails because
    /// a just-picked port was taken is retried (up to 3 attempts).
    pub async fn start() -> Result<ControlPlane, ControlPlaneError> {
        let started = Instant::now();
        let assets = locate_assets().await?;
        let mut attempt = 1;
        loop {
            match Self::start_once(&assets).await {
                Ok(cp) => {
                    tracing::info!(
                        server = %cp.server_url,
                        dir = %cp.dir.path().display(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "local control plane ready"
                    );
                    return Ok(cp);
                }
                Err(err) if attempt < START_ATTEMPTS && err.is_port_race() => {
                    tracing::warn!(attempt, error = %err, "port race while starting the control plane; retrying");
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn start_once(assets: &Assets) -> Result<ControlPlane, ControlPlaneError> {
        let attempt_started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("keysmith-controlplane-")
            .tempdir()
            .map_err(|e| ControlPlaneError::io("creating the control-plane temp dir", e))?;
        let [etcd_port, etcd_peer_port, apiserver_port] = free_ports()?;
        let server_url = format!("https://127.0.0.1:{apiserver_port}");

        let pki = write_pki(dir.path())?;
        let admin_token = random_token()?;
        let operator_token = random_token()?;
        let controller_manager_token = random_token()?;
        let user_tokens = (0..USER_COUNT).map(|_| random_token()).collect::<Result<Vec<_>, _>>()?;

        let mut cp = ControlPlane {
            server_url,
            ca_pem: pki.ca_pem.clone(),
            admin_token,
            operator_token,
            user_tokens,
            kubeconfig_path: dir.path().join("admin.kubeconfig"),
            operator_kubeconfig_path: dir.path().join("operator.kubeconfig"),
            audit_log_path: dir.path().join("audit.log"),
            kubectl: assets.kubectl.clone(),
            audit: Mutex::new(AuditCache::default()),
            components: Mutex::new(Vec::new()),
            apiserver_argv: Vec::new(),
            reaper: None,
            dir,
        };
        // From here on, dropping `cp` on an error cleans up what was started.
        cp.spawn_reaper()?;
        cp.write_token_file(&controller_manager_token)?;
        write_private(&cp.kubeconfig_path, &serialize_kubeconfig(&cp.kubeconfig())?)?;
        write_private(
            &cp.operator_kubeconfig_path,
            &serialize_kubeconfig(&cp.kubeconfig_for_token(&cp.operator_token))?,
        )?;
        let audit_policy_file = cp.dir.path().join("audit-policy.yaml");
        write_private(&audit_policy_file, AUDIT_POLICY)?;

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let etcd_peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        let etcd_data = cp.dir.path().join("etcd");
        let mut etcd = Command::new(&assets.etcd);
        etcd.arg("--name=default")
            .arg(arg("--data-dir", &etcd_data))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={etcd_peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={etcd_peer_url}"))
            .arg(format!("--initial-cluster=default={etcd_peer_url}"))
            .arg("--logger=zap");
        cp.spawn("etcd", etcd)?;

        let dir_path = cp.dir.path().to_path_buf();
        let mut apiserver = Command::new(&assets.apiserver);
        apiserver
            .arg(format!("--etcd-servers={etcd_url}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={apiserver_port}"))
            .arg(arg("--cert-dir", &dir_path.join("apiserver-certs")))
            .arg(arg("--tls-cert-file", &pki.serving_cert_file))
            .arg(arg("--tls-private-key-file", &pki.serving_key_file))
            .arg(arg("--token-auth-file", &dir_path.join("tokens.csv")))
            .arg("--authorization-mode=RBAC")
            .arg(format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"))
            .arg(arg("--service-account-key-file", &pki.sa_pub_file))
            .arg(arg("--service-account-signing-key-file", &pki.sa_key_file))
            .arg("--endpoint-reconciler-type=none")
            .arg(format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"))
            .arg("--allow-privileged=true")
            .arg(arg("--audit-policy-file", &audit_policy_file))
            .arg(arg("--audit-log-path", &cp.audit_log_path))
            .arg("--audit-log-format=json")
            .arg("--audit-log-version=audit.k8s.io/v1")
            // Each event is written before its response completes.
            .arg("--audit-log-mode=blocking")
            .arg(format!("--audit-log-maxsize={AUDIT_LOG_MAX_SIZE_MB}"));
        cp.apiserver_argv =
            std::iter::once(apiserver.get_program()).chain(apiserver.get_args()).map(ToOwned::to_owned).collect();
        cp.spawn("kube-apiserver", apiserver)?;

        let http = cp.readiness_client()?;
        let deadline = Instant::now() + READY_TIMEOUT;

        cp.wait_for(&http, deadline, "kube-apiserver", "/readyz", |_| true).await?;
        cp.wait_for(&http, deadline, "kube-apiserver", "/api/v1/namespaces/default", |_| true).await?;
        tracing::debug!(elapsed_ms = attempt_started.elapsed().as_millis() as u64, "kube-apiserver ready");

        match &assets.controller_manager {
            Some(binary) => {
                let kubeconfig = cp.kubeconfig_for_token(&controller_manager_token);
                let kubeconfig_file = dir_path.join("controller-manager.kubeconfig");
                write_private(&kubeconfig_file, &serialize_kubeconfig(&kubeconfig)?)?;
                let mut cm = Command::new(binary);
                cm.arg(arg("--kubeconfig", &kubeconfig_file))
                    .arg(format!("--controllers={CONTROLLERS}"))
                    .arg(arg("--service-account-private-key-file", &pki.sa_key_file))
                    .arg(arg("--root-ca-file", &pki.ca_file))
                    .arg("--leader-elect=false")
                    .arg("--secure-port=0")
                    .arg("--use-service-account-credentials=false");
                cp.spawn("kube-controller-manager", cm)?;
                // Pods are admitted once their namespace's `default`
                // ServiceAccount and CA bundle exist.
                cp.wait_for(
                    &http,
                    deadline,
                    "kube-controller-manager",
                    "/api/v1/namespaces/default/serviceaccounts/default",
                    |_| true,
                )
                .await?;
                cp.wait_for(
                    &http,
                    deadline,
                    "kube-controller-manager",
                    "/api/v1/namespaces/default/configmaps/kube-root-ca.crt",
                    |_| true,
                )
                .await?;
                tracing::debug!(
                    elapsed_ms = attempt_started.elapsed().as_millis() as u64,
                    "kube-controller-manager ready"
                );
            }
            None => tracing::warn!(
                "no kube-controller-manager in KUBEBUILDER_ASSETS: no garbage collection, \
                 namespace deletion or ServiceAccounts"
            ),
        }
        Ok(cp)
    }

    /// The apiserver URL, `https://127.0.0.1:PORT`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// PEM of the CA that signed the apiserver's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Bearer token of `admin` (group `system:masters`). A secret: never log it.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Bearer token of [`OPERATOR_USER`] (`keysmith-operator`, group
    /// `system:masters`), the identity the operator under test runs as, so
    /// that its requests are told apart in the audit log. A secret: never
    /// log it.
    pub fn operator_token(&self) -> &str {
        &self.operator_token
    }

    /// Bearer token of the unprivileged user `user-<n>`, for `n` in
    /// `1..=USER_COUNT`. These users have no RBAC bindings at all.
    pub fn user_token(&self, n: usize) -> Option<&str> {
        n.checked_sub(1).and_then(|i| self.user_tokens.get(i)).map(String::as_str)
    }

    /// A kubeconfig for the admin user.
    pub fn kubeconfig(&self) -> Kubeconfig {
        self.kubeconfig_for_token(&self.admin_token)
    }

    /// A kubeconfig that authenticates with the given bearer token (e.g. one
    /// of the pre-provisioned users, or a service account token).
    pub fn kubeconfig_for_token(&self, token: &str) -> Kubeconfig {
        Kubeconfig {
            api_version: Some("v1".to_owned()),
            kind: Some("Config".to_owned()),
            clusters: vec![NamedCluster {
                name: KUBECONFIG_NAME.to_owned(),
                cluster: Some(Cluster {
                    server: Some(self.server_url.clone()),
                    certificate_authority_data: Some(base64(self.ca_pem.as_bytes())),
                    ..Cluster::default()
                }),
                ..NamedCluster::default()
            }],
            auth_infos: vec![NamedAuthInfo {
                name: KUBECONFIG_NAME.to_owned(),
                auth_info: Some(AuthInfo { token: Some(token.to_owned().into()), ..AuthInfo::default() }),
                ..NamedAuthInfo::default()
            }],
            contexts: vec![NamedContext {
                name: KUBECONFIG_NAME.to_owned(),
                context: Some(Context {
                    cluster: KUBECONFIG_NAME.to_owned(),
                    user: Some(KUBECONFIG_NAME.to_owned()),
                    namespace: Some("default".to_owned()),
                    ..Context::default()
                }),
                ..NamedContext::default()
            }],
            current_context: Some(KUBECONFIG_NAME.to_owned()),
            ..Kubeconfig::default()
        }
    }

    /// The kubectl built with the control plane, if the assets hold one.
    pub fn kubectl_path(&self) -> Option<&Path> {
        self.kubectl.as_deref()
    }

    /// A `kubectl` command of this control plane's release (built with it,
    /// like envtest's assets), else `kubectl` from PATH. No arguments yet:
    /// add `--kubeconfig`.
    pub fn kubectl(&self) -> Command {
        Command::new(self.kubectl.as_deref().unwrap_or(Path::new("kubectl")))
    }

    /// Path of the admin kubeconfig, a file (mode 0600) in the control
    /// plane's temp dir; usable with `KUBECONFIG=... kubectl`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// Path of a kubeconfig (mode 0600) for [`OPERATOR_USER`], in the
    /// control plane's temp dir.
    pub fn operator_kubeconfig_path(&self) -> &Path {
        &self.operator_kubeconfig_path
    }

    /// A new client authenticating as [`OPERATOR_USER`] (one per async
    /// runtime, like [`ControlPlane::client`]).
    pub async fn operator_client(&self) -> Result<kube::Client, ControlPlaneError> {
        self.client_for_token(&self.operator_token).await
    }

    /// Every audit record so far, oldest first: one per completed request
    /// (stage `ResponseComplete`), from every user. Watches appear once they
    /// end. Requests rejected before authentication (401) have no such
    /// record. The shared control plane serves many tests at once: filter
    /// by [`AuditRecord::user`] and [`AuditRecord::namespace`].
    ///
    /// A request's record is written before its response completes, so a
    /// request whose response has been read is already here.
    pub fn audit_records(&self) -> Result<Vec<AuditRecord>, ControlPlaneError> {
        self.audit_records_since(0)
    }

    /// The number of audit records so far: pass it to
    /// [`ControlPlane::audit_records_since`] to read only later records.
    pub fn audit_mark(&self) -> Result<usize, ControlPlaneError> {
        self.with_audit(|records| records.len())
    }

    /// The audit records after `mark` (from [`ControlPlane::audit_mark`]),
    /// oldest first.
    pub fn audit_records_since(&self, mark: usize) -> Result<Vec<AuditRecord>, ControlPlaneError> {
        self.with_audit(|records| records.get(mark..).map(<[_]>::to_vec).unwrap_or_default())
    }

    /// Parse what was appended to the audit log since the last call, then
    /// hand all records parsed so far to `f`.
    fn with_audit<T>(&self, f: impl FnOnce(&[AuditRecord]) -> T) -> Result<T, ControlPlaneError> {
        // The cache is only updated once a read fully succeeded, so a
        // poisoned lock still guards consistent data.
        let mut cache = self.audit.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = &self.audit_log_path;
        let io_err = |e| ControlPlaneError::io(format!("reading {}", path.display()), e);
        let mut bytes = Vec::new();
        match fs::File::open(path) {
            Ok(mut file) => {
                let len = file.metadata().map_err(io_err)?.len();
                if len < cache.offset {
                    return Err(ControlPlaneError::Audit(format!(
                        "{} shrank from {} to {len} bytes (rotated?)",
                        path.display(),
                        cache.offset
                    )));
                }
                file.seek(io::SeekFrom::Start(cache.offset)).map_err(io_err)?;
                file.read_to_end(&mut bytes).map_err(io_err)?;
            }
            // The apiserver creates the log with its first event.
            Err(e) if e.kind() == io::ErrorKind::NotFound && cache.offset == 0 => {}
            Err(e) => return Err(io_err(e)),
        }
        let (complete, mut parsed) = parse_audit_log(&bytes)
            .map_err(|e| ControlPlaneError::Audit(format!("{} (after byte {}): {e}", path.display(), cache.offset)))?;
        cache.offset += complete as u64;
        cache.records.append(&mut parsed);
        Ok(f(&cache.records))
    }

    /// A new admin client. Build one per async runtime (each `#[tokio::test]`
    /// has its own): a client must not outlive the runtime that built it.
    pub async fn client(&self) -> Result<kube::Client, ControlPlaneError> {
        self.client_for_token(&self.admin_token).await
    }

    /// A new client that authenticates with the given bearer token.
    pub async fn client_for_token(&self, token: &str) -> Result<kube::Client, ControlPlaneError> {
        let config =
            kube::Config::from_custom_kubeconfig(self.kubeconfig_for_token(token), &KubeConfigOptions::default())
                .await
                .map_err(ControlPlaneError::KubeconfigLoad)?;
        kube::Client::try_from(config).map_err(ControlPlaneError::Client)
    }

    /// Kill the processes and remove the temp dir (as dropping does).
    pub fn stop(self) {
        drop(self);
    }

    /// Kills kube-apiserver with SIGKILL, as a crashed or evicted apiserver
    /// goes, waits `down`, then starts it again with the same flags on the
    /// same port, and returns once `/readyz` is ok. Every client connection
    /// is cut and every watch ends; what is stored in etcd stays. Every
    /// user of this control plane sees the outage, so tests that restart it
    /// keep a control plane (a test binary) of their own, and restart it
    /// from one task at a time.
    pub async fn restart_apiserver(&self, down: Duration) -> Result<(), ControlPlaneError> {
        let (program, args) = self
            .apiserver_argv
            .split_first()
            .ok_or_else(|| ControlPlaneError::NoApiserver("this control plane did not start it"))?;
        let log = {
            let mut components = self.components.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let component = components
                .iter_mut()
                .find(|c| c.name == "kube-apiserver")
                .ok_or_else(|| ControlPlaneError::NoApiserver("no kube-apiserver process"))?;
            let _ = component.child.kill();
            let _ = component.child.wait();
            component.log.clone()
        };
        // The kill may have cut an audit event in half (its request never
        // completed): drop that part, so what the new process appends parses.
        if let Ok(log) = fs::read(&self.audit_log_path) {
            if log.last().is_some_and(|b| *b != b'\n') {
                let complete = log.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                fs::OpenOptions::new()
                    .write(true)
                    .open(&self.audit_log_path)
                    .and_then(|f| f.set_len(complete as u64))
                    .map_err(|e| ControlPlaneError::io("dropping a cut audit event", e))?;
            }
        }
        tokio::time::sleep(down).await;
        let out = fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .map_err(|e| ControlPlaneError::io(format!("opening {}", log.display()), e))?;
        let err = out.try_clone().map_err(|e| ControlPlaneError::io(format!("opening {}", log.display()), e))?;
        let child = Command::new(program)
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| ControlPlaneError::io("spawning kube-apiserver again", e))?;
        let pid = child.id();
        {
            let mut components = self.components.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(component) = components.iter_mut().find(|c| c.name == "kube-apiserver") {
                component.child = child;
            }
        }
        self.record_pid(pid)?;
        let http = self.readiness_client()?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = format!("{}/readyz", self.server_url);
        loop {
            let ready = http.get(&url).bearer_auth(&self.admin_token).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            let exited = {
                let mut components = self.components.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                components
                    .iter_mut()
                    .find(|c| c.name == "kube-apiserver")
                    .and_then(|c| c.child.try_wait().ok().flatten())
            };
            if let Some(status) = exited {
                return Err(ControlPlaneError::ComponentExited {
                    component: "kube-apiserver",
                    status: describe_status(status),
                    log_tail: log_tail(&log),
                });
            }
            if Instant::now() >= deadline {
                return Err(ControlPlaneError::Timeout {
                    what: "GET /readyz after a restart".into(),
                    timeout: READY_TIMEOUT,
                    component: "kube-apiserver",
                    log_tail: log_tail(&log),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Start a process that cleans up if this process dies without dropping us.
    fn spawn_reaper(&mut self) -> Result<(), ControlPlaneError> {
        let child = Command::new("sh")
            .arg("-c")
            .arg(REAPER_SCRIPT)
            .arg("keysmith-controlplane-reaper")
            .arg(std::process::id().to_string())
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| ControlPlaneError::io("spawning the control-plane reaper (sh)", e))?;
        self.reaper = Some(child);
        Ok(())
    }

    fn write_token_file(&self, controller_manager_token: &str) -> Result<(), ControlPlaneError> {
        let mut csv = String::new();
        let mut line = |token: &str, user: &str, groups: &str| {
            let _ = writeln!(csv, "{token},{user},{user},\"{groups}\"");
        };
        line(&self.admin_token, "admin", "system:masters");
        line(&self.operator_token, OPERATOR_USER, "system:masters");
        line(controller_manager_token, "keysmith:kube-controller-manager", "system:masters");
        for (i, token) in self.user_tokens.iter().enumerate() {
            line(token, &format!("user-{}", i + 1), "");
        }
        write_private(&self.dir.path().join("tokens.csv"), &csv)
    }

    /// Spawn a component with its output going to `<dir>/<name>.log`, and
    /// record its pid for the reaper.
    fn spawn(&mut self, name: &'static str, mut command: Command) -> Result<(), ControlPlaneError> {
        let log = self.dir.path().join(format!("{name}.log"));
        let out =
            fs::File::create(&log).map_err(|e| ControlPlaneError::io(format!("creating {}", log.display()), e))?;
        let err = out.try_clone().map_err(|e| ControlPlaneError::io(format!("opening {}", log.display()), e))?;
        let child = command
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| ControlPlaneError::io(format!("spawning {name}"), e))?;
        tracing::debug!(component = name, pid = child.id(), log = %log.display(), "spawned");
        let pid = child.id();
        self.components.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner).push(Component {
            name,
            child,
            log,
        });
        self.record_pid(pid)
    }

    /// Adds `pid` to the list the reaper kills should this process die.
    fn record_pid(&self, pid: u32) -> Result<(), ControlPlaneError> {
        let pids = self.dir.path().join("pids");
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&pids)
            .and_then(|mut f| writeln!(f, "{pid}"))
            .map_err(|e| ControlPlaneError::io(format!("writing {}", pids.display()), e))
    }

    /// An HTTPS client trusting the control plane's CA, for readiness checks.
    fn readiness_client(&self) -> Result<reqwest::Client, ControlPlaneError> {
        reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).map_err(ControlPlaneError::Http)?,
            )
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(ControlPlaneError::Http)
    }

    /// Fail if any component has exited.
    fn check_components(&mut self) -> Result<(), ControlPlaneError> {
        for component in self.components.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner).iter_mut() {
            let status = component
                .child
                .try_wait()
                .map_err(|e| ControlPlaneError::io(format!("checking {}", component.name), e))?;
            if let Some(status) = status {
                return Err(ControlPlaneError::ComponentExited {
                    component: component.name,
                    status: describe_status(status),
                    log_tail: log_tail(&component.log),
                });
            }
        }
        Ok(())
    }

    /// Poll `path` on the apiserver (as admin) until it answers 200 with a
    /// body accepted by `accept`, a component exits, or `deadline` passes.
    async fn wait_for(
        &mut self,
        http: &reqwest::Client,
        deadline: Instant,
        blame: &'static str,
        path: &str,
        accept: impl Fn(&str) -> bool,
    ) -> Result<(), ControlPlaneError> {
        let url = format!("{}{}", self.server_url, path);
        loop {
            self.check_components()?;
            let response = http.get(&url).bearer_auth(&self.admin_token).send().await;
            if let Ok(response) = response {
                if response.status().is_success() {
                    if let Ok(body) = response.text().await {
                        if accept(&body) {
                            return Ok(());
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                let log_tail = self
                    .components
                    .get_mut()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                    .find(|c| c.name == blame)
                    .map(|c| log_tail(&c.log))
                    .unwrap_or_default();
                return Err(ControlPlaneError::Timeout {
                    what: format!("GET {path}"),
                    timeout: READY_TIMEOUT,
                    component: blame,
                    log_tail,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl std::fmt::Debug for ControlPlane {
    /// Leaves out the tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server_url", &self.server_url)
            .field("dir", &self.dir.path())
            .field("components", &*self.components.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
            .finish_non_exhaustive()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for component in self.components.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner).iter_mut().rev() {
            let _ = component.child.kill();
            let _ = component.child.wait();
        }
        if let Some(mut reaper) = self.reaper.take() {
            let _ = reaper.kill();
            let _ = reaper.wait();
        }
        tracing::debug!(dir = %self.dir.path().display(), "local control plane stopped");
        // `self.dir` is removed when the field is dropped, right after this.
    }
}

/// One completed apiserver request, from the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// The authenticated user name, e.g. [`OPERATOR_USER`] or `admin`.
    pub user: String,
    /// The Kubernetes verb: `get`, `list`, `watch`, `create`, `update`,
    /// `patch`, `delete`, `deletecollection`; for non-resource URLs
    /// (`/version`, discovery) the lower-case HTTP method.
    pub verb: String,
    /// API group of the resource; `None` for the core group and for
    /// non-resource URLs.
    pub api_group: Option<String>,
    /// Resource (plural, e.g. `configmaps`); empty for non-resource URLs.
    pub resource: String,
    /// Subresource, e.g. `status`.
    pub subresource: Option<String>,
    /// Namespace of the object or collection; `None` when cluster-scoped.
    pub namespace: Option<String>,
    /// Object name; for `create`, taken from the submitted object.
    pub name: Option<String>,
    /// HTTP status code of the response.
    pub code: Option<u16>,
    /// When the response completed (the event's `stageTimestamp`).
    pub at: SystemTime,
    /// Path and query of the request.
    pub request_uri: String,
}

impl AuditRecord {
    /// Whether the request asked to change state: `create`, `update`,
    /// `patch`, `delete` or `deletecollection` (whether or not it succeeded).
    pub fn is_write(&self) -> bool {
        matches!(self.verb.as_str(), "create" | "update" | "patch" | "delete" | "deletecollection")
    }
}

/// The audit log as parsed so far.
#[derive(Debug, Default)]
struct AuditCache {
    /// Bytes of the log consumed (always at a line boundary).
    offset: u64,
    /// Records of the `ResponseComplete` stage, in log order.
    records: Vec<AuditRecord>,
}

/// The fields of an `audit.k8s.io/v1` `Event` that [`AuditRecord`] needs.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuditEvent {
    stage: String,
    #[serde(default, rename = "requestURI")]
    request_uri: String,
    #[serde(default)]
    verb: String,
    #[serde(default)]
    user: AuditUser,
    object_ref: Option<AuditObjectRef>,
    response_status: Option<AuditStatus>,
    stage_timestamp: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct AuditUser {
    #[serde(default)]
    username: String,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuditObjectRef {
    resource: Option<String>,
    subresource: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    api_group: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
struct AuditStatus {
    code: Option<u16>,
}

impl AuditEvent {
    /// The record of a `ResponseComplete` event; `None` for other stages.
    fn into_record(self) -> Option<AuditRecord> {
        if self.stage != "ResponseComplete" {
            return None;
        }
        let (api_group, resource, subresource, namespace, name) = match self.object_ref {
            Some(o) => (
                o.api_group.filter(|g| !g.is_empty()),
                o.resource.unwrap_or_default(),
                o.subresource.filter(|s| !s.is_empty()),
                o.namespace.filter(|n| !n.is_empty()),
                o.name.filter(|n| !n.is_empty()),
            ),
            None => (None, String::new(), None, None, None),
        };
        Some(AuditRecord {
            user: self.user.username,
            verb: self.verb,
            api_group,
            resource,
            subresource,
            namespace,
            name,
            code: self.response_status.and_then(|s| s.code),
            at: self.stage_timestamp.into(),
            request_uri: self.request_uri,
        })
    }
}

/// Parse the complete lines of a chunk of audit log (the last line may
/// still be being written): how many bytes they span, and their
/// `ResponseComplete` records.
fn parse_audit_log(bytes: &[u8]) -> Result<(usize, Vec<AuditRecord>), String> {
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut records = Vec::new();
    for (i, line) in bytes[..complete].split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let event: AuditEvent = serde_json::from_slice(line).map_err(|e| format!("line {}: {e}", i + 1))?;
        records.extend(event.into_record());
    }
    Ok((complete, records))
}

static SHARED: tokio::sync::OnceCell<Result<ControlPlane, String>> = tokio::sync::OnceCell::const_new();

/// The process-wide control plane, started on first use and shared by every
/// caller (e.g. all tests of one test binary). It is never dropped: the
/// reaper removes it when the process exits. If starting it failed, every
/// call returns that failure rather than trying again.
///
/// Do not cache a [`kube::Client`] across tests: each `#[tokio::test]` has
/// its own runtime; call [`ControlPlane::client`] in each test instead.
pub async fn shared() -> Result<&'static ControlPlane, ControlPlaneError> {
    let started = SHARED.get_or_init(|| async { ControlPlane::start().await.map_err(|e| error_chain(&e)) }).await;
    started.as_ref().map_err(|e| ControlPlaneError::SharedStartFailed(e.clone()))
}

/// The Kubernetes release the local control plane runs when built by
/// `tests/bin/kube-assets.sh`, e.g. `1.37.2`: the `k8s.io/kubernetes` pin of
/// `tests/kube/<minor>/go.mod`, for `KEYSMITH_KUBE_VERSION` (a minor such as
/// `1.33`) or else the script's newest. `None` when `KUBEBUILDER_ASSETS`
/// names other binaries, or the pin cannot be read.
pub fn pinned_kubernetes_version() -> Option<String> {
    if std::env::var_os("KUBEBUILDER_ASSETS").is_some_and(|v| !v.is_empty()) {
        return None;
    }
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let minor = match std::env::var("KEYSMITH_KUBE_VERSION").ok().filter(|v| !v.is_empty()) {
        Some(minor) => minor,
        None => {
            let script = fs::read_to_string(tests.join("bin/kube-assets.sh")).ok()?;
            script.lines().find_map(|l| l.strip_prefix("NEWEST="))?.trim().to_owned()
        }
    };
    let go_mod = fs::read_to_string(tests.join("kube").join(minor).join("go.mod")).ok()?;
    go_mod.lines().find_map(|line| {
        let line = line.trim().trim_start_matches("require").trim();
        let version = line.strip_prefix("k8s.io/kubernetes v")?;
        Some(version.split_whitespace().next()?.to_owned())
    })
}

/// Where the component binaries are.
#[derive(Debug)]
struct Assets {
    apiserver: PathBuf,
    etcd: PathBuf,
    controller_manager: Option<PathBuf>,
    kubectl: Option<PathBuf>,
}

/// Find the binaries: `KUBEBUILDER_ASSETS`, else the output of
/// `tests/bin/kube-assets.sh` (which may build them first; its progress goes
/// to our stderr).
async fn locate_assets() -> Result<Assets, ControlPlaneError> {
    let from_env = std::env::var_os("KUBEBUILDER_ASSETS").filter(|v| !v.is_empty());
    let dir = match from_env {
        Some(dir) => PathBuf::from(dir),
        None => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bin/kube-assets.sh");
            tracing::info!(script = %script.display(), "locating kube binaries");
            let output = tokio::process::Command::new("bash")
                .arg(&script)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .output()
                .await
                .map_err(|e| ControlPlaneError::io(format!("running {}", script.display()), e))?;
            if !output.status.success() {
                return Err(ControlPlaneError::Assets(format!(
                    "{} {} (see its output above)",
                    script.display(),
                    describe_status(output.status)
                )));
            }
            let stdout = String::from_utf8_lossy(&output.stdout);
            let last = stdout.lines().map(str::trim).rfind(|l| !l.is_empty());
            match last {
                Some(line) => PathBuf::from(line),
                None => return Err(ControlPlaneError::Assets(format!("{} printed no directory", script.display()))),
            }
        }
    };
    let apiserver = dir.join("kube-apiserver");
    let etcd = dir.join("etcd");
    for binary in [&apiserver, &etcd] {
        if !binary.is_file() {
            return Err(ControlPlaneError::Assets(format!("{} does not exist", binary.display())));
        }
    }
    let controller_manager = Some(dir.join("kube-controller-manager")).filter(|p| p.is_file());
    let kubectl = Some(dir.join("kubectl")).filter(|p| p.is_file());
    Ok(Assets { apiserver, etcd, controller_manager, kubectl })
}

/// Generate the CA, the apiserver serving certificate and the service
/// account signing key, and write them into `dir`.
fn write_pki(dir: &Path) -> Result<Pki, ControlPlaneError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let cert_err = ControlPlaneError::Certificates;

    let ca_key = KeyPair::generate().map_err(cert_err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params.distinguished_name.push(DnType::CommonName, "keysmith local control plane CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages =
        vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(cert_err)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let serving_key = KeyPair::generate().map_err(cert_err)?;
    let mut serving_params = CertificateParams::new(vec![
        "127.0.0.1".to_owned(),
        "localhost".to_owned(),
        "10.0.0.1".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "kubernetes.default.svc.cluster.local".to_owned(),
    ])
    .map_err(cert_err)?;
    serving_params.distinguished_name = rcgen::DistinguishedName::new();
    serving_params.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    serving_params.use_authority_key_identifier_extension = true;
    serving_params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    serving_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_cert = serving_params.signed_by(&serving_key, &issuer).map_err(cert_err)?;

    let sa_key = KeyPair::generate().map_err(cert_err)?;

    let pki = Pki {
        ca_pem: ca_cert.pem(),
        ca_file: dir.join("ca.crt"),
        serving_cert_file: dir.join("apiserver.crt"),
        serving_key_file: dir.join("apiserver.key"),
        sa_key_file: dir.join("sa.key"),
        sa_pub_file: dir.join("sa.pub"),
    };
    write_private(&pki.ca_file, &pki.ca_pem)?;
    write_private(&pki.serving_cert_file, &serving_cert.pem())?;
    write_private(&pki.serving_key_file, &serving_key.serialize_pem())?;
    write_private(&pki.sa_key_file, &sa_key.serialize_pem())?;
    write_private(&pki.sa_pub_file, &sa_key.public_key_pem())?;
    Ok(pki)
}

/// Three distinct free ports on 127.0.0.1 (free when this returns; another
/// process may still grab one before our component binds it).
fn free_ports() -> Result<[u16; 3], ControlPlaneError> {
    let bind = || {
        TcpListener::bind(("127.0.0.1", 0)).map_err(|e| ControlPlaneError::io("picking a free port on 127.0.0.1", e))
    };
    // Keep all three bound at once so they differ.
    let listeners = [bind()?, bind()?, bind()?];
    let mut ports = [0u16; 3];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr().map_err(|e| ControlPlaneError::io("reading a bound port", e))?.port();
    }
    Ok(ports)
}

/// A random 256-bit bearer token, hex encoded.
fn random_token() -> Result<String, ControlPlaneError> {
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| ControlPlaneError::io("reading random bytes", e))?;
    Ok(bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

/// Write a file only its owner can read (mode 0600).
fn write_private(path: &Path, contents: &str) -> Result<(), ControlPlaneError> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(|e| ControlPlaneError::io(format!("writing {}", path.display()), e))
}

fn serialize_kubeconfig(kubeconfig: &Kubeconfig) -> Result<String, ControlPlaneError> {
    serde_yaml::to_string(kubeconfig).map_err(ControlPlaneError::Kubeconfig)
}

/// `--flag=<path>`.
fn arg(flag: &str, path: &Path) -> std::ffi::OsString {
    let mut s = std::ffi::OsString::from(flag);
    s.push("=");
    s.push(path);
    s
}

fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// The last [`LOG_TAIL_LINES`] lines of a log file.
fn log_tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(LOG_TAIL_LINES);
            lines[start..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// An error with its sources, on one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let _ = write!(s, ": {e}");
        source = e.source();
    }
    s
}

/// Standard base64 with padding (for kubeconfig `*-data` fields).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in cases {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    /// Events as kube-apiserver writes them: the first verbatim from 1.37.2,
    /// the others with some fields trimmed.
    const AUDIT_SAMPLE: &str = concat!(
        r#"{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"83185cef-acb5-4b4d-9ba8-d5066b0935f9","stage":"ResponseComplete","requestURI":"/apis/flowcontrol.apiserver.k8s.io/v1/flowschemas/system-nodes/status?fieldManager=api-priority-and-fairness-config-consumer-v1\u0026force=true","verb":"patch","user":{"username":"system:apiserver","uid":"73a4e946-4167-47b6-be04-c961259aeda2","groups":["system:authenticated","system:masters"]},"sourceIPs":["127.0.0.1"],"userAgent":"kube-apiserver/v1.37.2 (linux/amd64) kubernetes/$Format","objectRef":{"resource":"flowschemas","name":"system-nodes","apiGroup":"flowcontrol.apiserver.k8s.io","apiVersion":"v1","subresource":"status"},"responseStatus":{"metadata":{},"code":200},"requestReceivedTimestamp":"2026-12-06T18:53:07.014057Z","stageTimestamp":"2026-12-06T18:53:07.016570Z","annotations":{"authorization.k8s.io/decision":"allow","authorization.k8s.io/reason":""}}"#,
        "\n",
        r#"{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"a1","stage":"ResponseStarted","requestURI":"/api/v1/namespaces/ns1/configmaps?watch=true","verb":"watch","user":{"username":"keysmith-operator","groups":["system:masters","system:authenticated"]},"sourceIPs":["127.0.0.1"],"objectRef":{"resource":"configmaps","namespace":"ns1","apiVersion":"v1"},"responseStatus":{"metadata":{},"code":200},"requestReceivedTimestamp":"2021-11-30T06:46:05.000000Z","stageTimestamp":"2021-11-30T06:46:05.000100Z"}"#,
        "\n",
        r#"{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"a2","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/ns1/secrets/s","verb":"get","user":{"username":"user-1","groups":["system:authenticated"]},"sourceIPs":["127.0.0.1"],"objectRef":{"resource":"secrets","namespace":"ns1","name":"s","apiVersion":"v1"},"responseStatus":{"metadata":{},"status":"Failure","reason":"Forbidden","code":403},"requestReceivedTimestamp":"2021-11-30T06:46:45.398299Z","stageTimestamp":"2021-11-30T06:46:45.398445Z","annotations":{"authorization.k8s.io/decision":"forbid","authorization.k8s.io/reason":""}}"#,
        "\n",
        r#"{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"a3","stage":"ResponseComplete","requestURI":"/version","verb":"get","user":{"username":"admin","groups":["system:masters","system:authenticated"]},"sourceIPs":["127.0.0.1"],"responseStatus":{"metadata":{},"code":200},"requestReceivedTimestamp":"2021-11-30T06:46:46.000000Z","stageTimestamp":"2021-11-30T06:46:46.000000Z"}"#,
        "\n",
    );

    #[test]
    fn audit_log_yields_response_complete_records() {
        let (consumed, records) = parse_audit_log(AUDIT_SAMPLE.as_bytes()).expect("parses");
        assert_eq!(consumed, AUDIT_SAMPLE.len());
        assert_eq!(records.len(), 3, "the watch's ResponseStarted is skipped");

        let status_patch = &records[0];
        assert_eq!(status_patch.user, "system:apiserver");
        assert_eq!(status_patch.verb, "patch");
        assert_eq!(status_patch.api_group.as_deref(), Some("flowcontrol.apiserver.k8s.io"));
        assert_eq!(status_patch.resource, "flowschemas");
        assert_eq!(status_patch.subresource.as_deref(), Some("status"));
        assert_eq!(status_patch.namespace, None);
        assert_eq!(status_patch.name.as_deref(), Some("system-nodes"));
        assert_eq!(status_patch.code, Some(200));
        assert_eq!(status_patch.at, SystemTime::UNIX_EPOCH + Duration::new(1_796_583_187, 16_570_000));
        assert!(status_patch.request_uri.starts_with("/apis/flowcontrol"));
        assert!(status_patch.is_write());

        let forbidden = &records[1];
        assert_eq!(forbidden.user, "user-1");
        assert_eq!(forbidden.namespace.as_deref(), Some("ns1"));
        assert_eq!(forbidden.api_group, None);
        assert_eq!(forbidden.code, Some(403));
        assert!(!forbidden.is_write());

        let non_resource = &records[2];
        assert_eq!(non_resource.resource, "");
        assert_eq!(non_resource.name, None);
        assert_eq!(non_resource.request_uri, "/version");
    }

    #[test]
    fn a_partly_written_audit_line_is_left_for_later() {
        let first_line = AUDIT_SAMPLE.find('\n').expect("a line") + 1;
        let partial = &AUDIT_SAMPLE.as_bytes()[..first_line + 40];
        let (consumed, records) = parse_audit_log(partial).expect("parses");
        assert_eq!(consumed, first_line);
        assert_eq!(records.len(), 1);

        assert_eq!(parse_audit_log(b"{\"stage\":").expect("parses"), (0, vec![]));
        let err = parse_audit_log(b"{}\nnot json\n").expect_err("garbage is an error");
        assert!(err.starts_with("line 1:"), "{err}");
    }

    #[test]
    fn writes_are_the_mutating_verbs() {
        let record = |verb: &str| AuditRecord {
            user: "u".to_owned(),
            verb: verb.to_owned(),
            api_group: None,
            resource: "configmaps".to_owned(),
            subresource: None,
            namespace: None,
            name: None,
            code: Some(200),
            at: SystemTime::UNIX_EPOCH,
            request_uri: "/".to_owned(),
        };
        for verb in ["create", "update", "patch", "delete", "deletecollection"] {
            assert!(record(verb).is_write(), "{verb}");
        }
        for verb in ["get", "list", "watch", "post"] {
            assert!(!record(verb).is_write(), "{verb}");
        }
    }

    #[test]
    fn port_race_is_detected_from_the_log() {
        let err = ControlPlaneError::ComponentExited {
            component: "etcd",
            status: "exit code 1".to_owned(),
            log_tail: "listen tcp 127.0.0.1:1234: bind: address already in use".to_owned(),
        };
        assert!(err.is_port_race());
    }
}
