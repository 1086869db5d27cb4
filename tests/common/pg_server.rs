//! A throwaway PostgreSQL cluster for tests: Debian's `postgresql` package
//! (`.ci/run` installs it), `initdb` into a temporary directory, `postgres`
//! on 127.0.0.1 and a free port with scram-sha-256 password authentication
//! over TCP only, every statement logged. It has a superuser (`postgres`) and
//! the admin role keysmith acts as ([`ADMIN`]), which holds only what the
//! `postgres` provider documents: `CREATEROLE` and `pg_signal_backend`.
//!
//! The binaries are found through `KEYSMITH_PG_BINDIR`, else `pg_config
//! --bindir`, else the newest `/usr/lib/postgresql/<major>/bin`. The server
//! is stopped and its directory removed when [`PgServer`] is dropped, or by a
//! small reaper process once the test binary is gone (if it was killed).
//!
//! Test files include it with `#[path = "common/pg_server.rs"] mod pg_server;`,
//! so it does not depend on the rest of `tests/common`.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keysmith::provider::postgres::PostgresProvider;
use keysmith::provider::{AccountRequest, IssuedKey};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

/// The superuser initdb creates.
pub const SUPERUSER: &str = "postgres";
/// The admin role keysmith acts as: `CREATEROLE` and `pg_signal_backend`, no more.
pub const ADMIN: &str = "keysmith_admin";
/// [`ADMIN`]'s password.
pub const ADMIN_PASSWORD: &str = "admin-password-for-tests";
const STARTUP: Duration = Duration::from_secs(60);

/// Watches `$1` (the test process); once it is gone, stops postgres (`$2`)
/// and removes the cluster's directory (`$3`). Covers a test binary that is
/// killed before it can drop its servers.
const REAPER_SCRIPT: &str = r#"
trap '' INT TERM HUP
parent=$1
pg=$2
dir=$3
while kill -0 "$parent" 2>/dev/null; do sleep 0.5; done
kill -INT "$pg" 2>/dev/null
for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
  kill -0 "$pg" 2>/dev/null || break
  sleep 0.25
done
kill -9 "$pg" 2>/dev/null
rm -rf "$dir"
"#;

/// A throwaway PostgreSQL cluster, stopped and removed on drop.
pub struct PgServer {
    child: Child,
    reaper: Option<Child>,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    superuser_password: String,
    log: PathBuf,
    // Last, so the directory goes after the processes.
    _dir: tempfile::TempDir,
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // SIGINT: fast shutdown (sessions ended, no checkpoint wait).
        let _ = Command::new("kill").arg("-INT").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        if let Some(mut reaper) = self.reaper.take() {
            let _ = reaper.kill();
            let _ = reaper.wait();
        }
    }
}

fn pg_bindir() -> PathBuf {
    let usable = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("KEYSMITH_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && usable(&dir) {
            return dir;
        }
    }
    // Debian and Ubuntu keep each major version apart.
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            usable(&bin).then_some((major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, dir)| dir).expect(
        "no PostgreSQL server binaries (initdb, postgres): install Debian's postgresql \
         package or set KEYSMITH_PG_BINDIR",
    )
}

fn id(args: &[&str]) -> Option<u32> {
    let out = Command::new("id").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().parse().ok()).flatten()
}

/// initdb and postgres refuse to run as root: then they run as the
/// `postgres` system user (or `nobody`).
fn run_as() -> Option<(u32, u32)> {
    if id(&["-u"]) != Some(0) {
        return None;
    }
    ["postgres", "nobody"]
        .into_iter()
        .find_map(|user| Some((id(&["-u", user])?, id(&["-g", user])?)))
        .or_else(|| panic!("running as root and there is no postgres or nobody user to run PostgreSQL as"))
}

fn command(program: PathBuf, owner: Option<(u32, u32)>) -> Command {
    let mut command = Command::new(program);
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
    command.env("LC_ALL", "C").stdin(Stdio::null());
    command
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().expect("local address").port()
}

/// `len` random alphanumerics.
pub fn random_string(len: usize) -> String {
    use rand::Rng;
    rand::rng().sample_iter(&rand::distr::Alphanumeric).take(len).map(char::from).collect()
}

/// A password login to 127.0.0.1:`port`, without TLS.
pub async fn connect(port: u16, user: &str, password: &str, db: &str) -> Result<Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname(db)
        .connect_timeout(Duration::from_secs(5));
    connect_with(&config).await
}

/// A connection made from `config`, its connection task spawned.
pub async fn connect_with(config: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

impl PgServer {
    /// Creates and starts a cluster, and the admin role.
    pub async fn start() -> PgServer {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let bindir = pg_bindir();
        let owner = run_as();
        let dir = tempfile::Builder::new().prefix("keysmith-pg-").tempdir().expect("temporary directory");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the cluster directory");
        }
        let data = dir.path().join("data");
        let pwfile = dir.path().join("superuser-password");
        let superuser_password = random_string(24);
        fs::write(&pwfile, &superuser_password).expect("write the password file");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).expect("chown the password file");
        }
        let out = command(bindir.join("initdb"), owner)
            .arg("-D")
            .arg(&data)
            .args(["-U", SUPERUSER, "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let _ = fs::remove_file(&pwfile);
        // Password logins over TCP only.
        fs::write(data.join("pg_hba.conf"), "host all all 127.0.0.1/32 scram-sha-256\n").expect("write pg_hba.conf");

        let log = dir.path().join("postgres.log");
        let mut last_log = String::new();
        for _attempt in 0..3 {
            let port = free_port();
            let out = fs::File::create(&log).expect("create the log");
            let err = out.try_clone().expect("clone the log handle");
            let mut child = command(bindir.join("postgres"), owner)
                .arg("-D")
                .arg(&data)
                .arg("-k")
                .arg(dir.path())
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(["-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off"])
                // Every statement is logged, so tests can check that no
                // password ever reaches the server's log.
                .args(["-c", "log_statement=all", "-c", "log_line_prefix=%m [%p] %u@%d "])
                .stdout(out)
                .stderr(err)
                .spawn()
                .expect("spawn postgres");
            let reaper = Command::new("sh")
                .arg("-c")
                .arg(REAPER_SCRIPT)
                .arg("keysmith-postgres-reaper")
                .arg(std::process::id().to_string())
                .arg(child.id().to_string())
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn the reaper");
            let start = Instant::now();
            let ready = loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break false;
                }
                if connect(port, SUPERUSER, &superuser_password, "postgres").await.is_ok() {
                    break true;
                }
                assert!(
                    start.elapsed() < STARTUP,
                    "postgres did not accept connections in {STARTUP:?}: {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            if !ready {
                let mut reaper = reaper;
                let _ = reaper.kill();
                let _ = reaper.wait();
                last_log = fs::read_to_string(&log).unwrap_or_default();
                // Another process may have taken the port: try another.
                continue;
            }
            let server = PgServer { child, reaper: Some(reaper), port, superuser_password, log, _dir: dir };
            // The admin keysmith acts as: no superuser, just what the
            // provider documents.
            server
                .superuser()
                .await
                .batch_execute(&format!(
                    "CREATE ROLE {ADMIN} LOGIN CREATEROLE PASSWORD '{ADMIN_PASSWORD}'; \
                     GRANT pg_signal_backend TO {ADMIN}"
                ))
                .await
                .expect("create the admin role");
            return server;
        }
        panic!("postgres did not start: {last_log}");
    }

    /// The `postgres` provider acting as [`ADMIN`] on database `postgres`.
    pub fn provider(&self) -> PostgresProvider {
        PostgresProvider::new("127.0.0.1", self.port, "postgres", ADMIN, ADMIN_PASSWORD)
    }

    /// A superuser session on database `postgres`.
    pub async fn superuser(&self) -> Client {
        self.superuser_on("postgres").await
    }

    /// A superuser session on `db`.
    pub async fn superuser_on(&self, db: &str) -> Client {
        connect(self.port, SUPERUSER, &self.superuser_password, db).await.expect("superuser connection")
    }

    /// A password login on database `postgres`.
    pub async fn login(&self, user: &str, password: &str) -> Result<Client, tokio_postgres::Error> {
        connect(self.port, user, password, "postgres").await
    }

    /// Logs in with an issued key, through its `uri`.
    pub async fn login_key(&self, key: &IssuedKey) -> Result<Client, tokio_postgres::Error> {
        let config: tokio_postgres::Config = key.material.expose()["uri"].parse().expect("the uri parses");
        connect_with(&config).await
    }

    /// Everything the server logged so far (every statement, too).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The role's comment, attributes and existence, as the superuser sees them.
    pub async fn role(&self, name: &str) -> Option<(Option<String>, bool, bool)> {
        let row = self
            .superuser()
            .await
            .query_opt(
                "SELECT shobj_description(oid, 'pg_authid'), rolcanlogin, rolcreatedb FROM pg_roles WHERE rolname = $1",
                &[&name],
            )
            .await
            .expect("read pg_roles");
        row.map(|row| (row.get(0), row.get(1), row.get(2)))
    }

    /// Runs `sql` built with `format()` on the server, so identifiers are
    /// quoted by PostgreSQL itself rather than by the code under test.
    pub async fn exec_formatted(&self, client: &Client, template: &str, args: &[&str]) {
        let placeholders: Vec<String> = (1..=args.len()).map(|i| format!("${i}::text")).collect();
        let sql = format!("SELECT format('{template}', {})", placeholders.join(", "));
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            args.iter().map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        let statement: String = client.query_one(&sql, &params).await.expect("format the statement").get(0);
        client.batch_execute(&statement).await.unwrap_or_else(|e| panic!("{statement}: {e}"));
    }

    /// The roles the admin is a member of (it may grant itself some for a
    /// cleanup, and must give them back).
    pub async fn admin_memberships(&self) -> BTreeSet<String> {
        self.superuser()
            .await
            .query(
                "SELECT g.rolname::text FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid \
                 JOIN pg_roles a ON a.oid = m.member WHERE a.rolname = $1",
                &[&ADMIN],
            )
            .await
            .expect("read memberships")
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    /// The roles carrying an account's ownership tag.
    pub async fn tagged_roles(&self, account: &AccountRequest) -> Vec<String> {
        self.superuser()
            .await
            .query(
                "SELECT rolname::text FROM pg_roles WHERE shobj_description(oid, 'pg_authid') LIKE $1 ORDER BY 1",
                &[&format!("keysmith:{}%", account.owner_uid)],
            )
            .await
            .expect("read pg_roles")
            .iter()
            .map(|row| row.get(0))
            .collect()
    }
}

/// Whether a login failed because the server refused the credential.
pub fn refused(result: &Result<Client, tokio_postgres::Error>) -> bool {
    match result {
        Ok(_) => false,
        Err(e) => e
            .code()
            .is_some_and(|c| *c == SqlState::INVALID_PASSWORD || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
    }
}

/// `(session_user, current_user)` of a session.
pub async fn whoami(client: &Client) -> (String, String) {
    let row = client.query_one("SELECT session_user::text, current_user::text", &[]).await.expect("whoami");
    (row.get(0), row.get(1))
}
