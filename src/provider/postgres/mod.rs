//! The `postgres` provider: the target app is a PostgreSQL server (14 or
//! later), reached with an admin role that has `CREATEROLE` and the
//! privileges of `pg_signal_backend` (or is a superuser).
//!
//! # Model
//!
//! - **account** → a `NOLOGIN` *group* role named [`AccountRequest::name`].
//!   It holds the granted roles, owns whatever the integration creates, and
//!   carries keysmith's ownership tag in its comment (`COMMENT ON ROLE`):
//!
//!   ```text
//!   keysmith:<IntegrationAccount uid>
//!   integration-account: <namespace>/<name>
//!   description: <spec.description>
//!   owner: <spec.owner>
//!   ```
//!
//!   A role is ours when the comment's first line is `keysmith:<our uid>`;
//!   keysmith never adopts, alters or drops any other role. Disabling adds a
//!   `disabled: true` line (see below).
//! - **roles** → role memberships: `GRANT <role> TO <account>`. Names are
//!   the server's own role names, used verbatim (always quoted, so case and
//!   punctuation are kept). There is no scope: database- and object-level
//!   privileges are out of scope, and a grant with a scope is
//!   [`ProviderError::Invalid`]. The roles an account holds are read from
//!   `pg_auth_members`: those granted to the account role, plus any granted
//!   by hand straight to one of its key roles (so that they are revoked too).
//! - **key** → a password, with zero-downtime rotation. PostgreSQL has one
//!   password per role, so a rotation cannot give one role two passwords.
//!   Instead every key is its own `LOGIN` role, `<name>_k_<key id>`, a member
//!   (`INHERIT`) of the account role, with its own password and `VALID UNTIL`
//!   = issue time + the requested lifetime. Several keys are live at once, so
//!   the old key keeps working through the grace period while workloads pick
//!   up the new one. The Secret's `username` is the key role's name, which is
//!   what the server's log shows (`%u` in `log_line_prefix`, `session_user`);
//!   its name and its comment (`keysmith:<uid>`, `key-id: <id>`, `account:
//!   <name>`) trace it back to the integration.
//!
//!   Each key role has `ALTER ROLE … SET role = '<account>'`, so its
//!   sessions act as the account (`current_user` is the account, `RESET
//!   ROLE` keeps it): whatever the integration creates is owned by the
//!   account, not by a key that a rotation will drop. Should a session
//!   switch to the key role itself (`SET ROLE NONE`) and create something,
//!   revoking the key reassigns it to the account (`REASSIGN OWNED`).
//!
//!   Revoking a key sets `NOLOGIN` (and marks the comment `revoked: true`,
//!   so nothing re-enables it), ends the key's sessions
//!   (`pg_terminate_backend`, which is why the admin needs
//!   `pg_signal_backend`: a session that already switched to the account
//!   role would otherwise keep its privileges), then drops the role.
//!   `VALID UNTIL` only refuses new password logins: it ends no session.
//!
//!   Passwords never travel as plain text: keysmith sends the SCRAM-SHA-256
//!   verifier (`PASSWORD 'SCRAM-SHA-256$4096:…'`, as psql's `\password`
//!   does), so the server's statement log, `pg_stat_activity` and
//!   `pg_stat_statements` never see the password. It is 40 random
//!   alphanumerics, so it needs no quoting in any client's configuration.
//! - **disable** → every key role `NOLOGIN` (sessions ended) and
//!   `disabled: true` in the account's comment. Updating the account
//!   re-enables the keys that were not revoked.
//! - **delete** → revokes every key (as above), then drops the account role.
//!   keysmith never drops data: if the account owns objects (tables the
//!   integration created), deleting is a [`ProviderError::Conflict`] naming
//!   the databases, to be resolved by a person (`REASSIGN OWNED BY` or
//!   `DROP OWNED BY`). When it owns nothing, `DROP OWNED BY` runs in each
//!   database where it holds privileges (that only revokes them, which
//!   `DROP ROLE` requires), then `DROP ROLE IF EXISTS`. Memberships, in
//!   either direction, go with the role. `DROP OWNED` run by a
//!   non-superuser admin revokes only privileges the admin could revoke
//!   itself (as their grantor, or as the object's owner); a privilege that
//!   someone else granted on their own objects (a DBA's `GRANT SELECT ON t
//!   TO <account>`) keeps the role alive, and deleting is a `Conflict`
//!   naming it. Privileges belong on roles that accounts are granted, which
//!   keysmith manages, not on the account itself.
//!
//! The Secret holds `username`, `password`, `host`, `port`, `dbname` and
//! `uri` (`postgresql://user:password@host:port/dbname`, percent-encoded).
//! `dbname` is the connection's database, or the account's
//! `providerOptions.database`.
//!
//! # The admin role
//!
//! `CREATEROLE` (to create, alter, comment on and drop roles and grant
//! memberships; on PostgreSQL 16 and later also `ADMIN OPTION` on the
//! roles it grants, which it has on roles it created), and the privileges of
//! `pg_signal_backend` to end revoked keys' sessions. `DROP OWNED` and
//! `REASSIGN OWNED` need the privileges of the roles involved: an admin that
//! lacks them grants itself membership of a role keysmith owns for the
//! duration of the cleanup. On PostgreSQL 16 and later, `REVOKE` only
//! removes memberships the admin granted.
//!
//! # TLS
//!
//! Connections are plain TCP for now: `sslMode` `disable` is supported, and
//! `prefer` connects without TLS, as libpq does when a server offers none.
//! `require` and `verify-full` are refused with [`ProviderError::Invalid`]
//! rather than silently downgraded; they need a TLS connector for
//! tokio-postgres (`tokio-postgres-rustls` on the rustls already in the
//! tree) and, for `verify-full`, a CA bundle in the connection spec.

use crate::ownership;
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    time::Duration,
};

use async_trait::async_trait;
use jiff::Timestamp;
use rand::{distr::Alphanumeric, Rng};
use tokio_postgres::{config::SslMode, Client, NoTls};

use super::{
    http::percent_encode, AccountRequest, Capabilities, IssuedKey, KeyMaterial, KeyRequest, ObservedAccount,
    ObservedKey, Provider, ProviderError, RoleGrant,
};
use crate::api::PostgresSslMode;

/// Between the account's name and the key id in a key role's name.
pub const KEY_ROLE_INFIX: &str = "_k_";
/// The longest role name PostgreSQL keeps (NAMEDATALEN - 1 bytes); it
/// silently truncates longer identifiers, which could make two names one.
pub const MAX_ROLE_NAME_LEN: usize = 63;
/// The Secret keys of an issued key.
pub const MATERIAL_KEYS: [&str; 6] = ["username", "password", "host", "port", "dbname", "uri"];

/// Comment fields (`<field>: <value>` lines after the ownership tag).
const FIELD_INTEGRATION_ACCOUNT: &str = "integration-account";
const FIELD_DESCRIPTION: &str = "description";
const FIELD_OWNER: &str = "owner";
const FIELD_DISABLED: &str = "disabled";
const FIELD_KEY_ID: &str = "key-id";
const FIELD_ACCOUNT: &str = "account";
const FIELD_ISSUED_AT: &str = "issued-at";
const FIELD_REVOKED: &str = "revoked";

/// Length of generated passwords (alphanumerics, about 238 bits).
const PASSWORD_LEN: usize = 40;
/// Hex digits of the hash in key role names that had to be shortened.
const HASH_LEN: usize = 12;
/// How long to wait for the server to accept a connection.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Session settings of every connection keysmith opens: no statement may
/// hang on a lock or run away.
const SESSION_OPTIONS: &str = "-c statement_timeout=30000 -c lock_timeout=10000";
/// How long `pg_terminate_backend` waits for a session to end, in ms.
const TERMINATE_WAIT_MS: i64 = 5000;
/// `pg_terminate_backend(pid, timeout)` arrived in PostgreSQL 14.
const MIN_SERVER_VERSION: i32 = 140_000;
/// The `application_name` of keysmith's sessions.
const APPLICATION_NAME: &str = "keysmith";
/// The role attributes that grant more than membership can, all of which
/// keysmith keeps off on the roles it creates.
const PRIVILEGED_ATTRIBUTES: [&str; 5] = ["SUPERUSER", "CREATEROLE", "CREATEDB", "REPLICATION", "BYPASSRLS"];

/// A PostgreSQL server as the target app, reached with an admin role.
///
/// Every operation opens its own admin connection (and closes it), so no
/// connection goes stale between reconciles and accounts are handled in
/// parallel; the connection's rate budget bounds how many that can be.
#[derive(Clone)]
pub struct PostgresProvider {
    host: String,
    port: u16,
    database: String,
    admin_user: String,
    admin_password: String,
    ssl_mode: PostgresSslMode,
    connect_timeout: Duration,
}

impl fmt::Debug for PostgresProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresProvider")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("admin_user", &self.admin_user)
            .field("ssl_mode", &self.ssl_mode)
            .finish_non_exhaustive()
    }
}

/// A role as read from `pg_roles`.
#[derive(Debug, Clone)]
struct RoleRow {
    oid: u32,
    name: String,
    can_login: bool,
    /// Which of [`PRIVILEGED_ATTRIBUTES`] it has, in that order.
    privileged: [bool; 5],
    comment: Option<String>,
}

impl RoleRow {
    fn owner_uid(&self) -> Option<&str> {
        self.comment.as_deref().and_then(tag_uid)
    }
    fn is_owned_by(&self, account: &AccountRequest) -> bool {
        self.owner_uid() == Some(account.owner_uid.as_str())
    }
    fn field(&self, name: &str) -> Option<&str> {
        self.comment.as_deref().and_then(|c| tag_field(c, name))
    }
    fn key_id(&self) -> Option<&str> {
        self.field(FIELD_KEY_ID)
    }
    fn flagged(&self, name: &str) -> bool {
        self.field(name) == Some("true")
    }
}

const ROLE_COLUMNS: &str = "r.oid, r.rolname::text, r.rolcanlogin, r.rolsuper, r.rolcreaterole, r.rolcreatedb, \
                            r.rolreplication, r.rolbypassrls, shobj_description(r.oid, 'pg_authid')";

fn role_row(row: &tokio_postgres::Row) -> Result<RoleRow, ProviderError> {
    let get_bool = |i: usize| row.try_get::<_, bool>(i).map_err(admin_error);
    Ok(RoleRow {
        oid: row.try_get(0).map_err(admin_error)?,
        name: row.try_get(1).map_err(admin_error)?,
        can_login: get_bool(2)?,
        privileged: [get_bool(3)?, get_bool(4)?, get_bool(5)?, get_bool(6)?, get_bool(7)?],
        comment: row.try_get(8).map_err(admin_error)?,
    })
}

/// Who a connection authenticates as: failed logins mean different things.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Principal {
    /// The connection's admin credential: a refusal is `Unauthorized`.
    Admin,
    /// A freshly issued key: a refusal means the key does not work.
    Key,
}

impl PostgresProvider {
    /// A provider acting as `admin_user` on `database` at `host:port`, with
    /// `sslMode: disable`. `host` may also be a Unix socket directory (an
    /// absolute path). The host, port and database also go into issued keys,
    /// so they must be how the integration reaches the same server.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        database: impl Into<String>,
        admin_user: impl Into<String>,
        admin_password: impl Into<String>,
    ) -> Self {
        Self {
            host: host.into(),
            port,
            database: database.into(),
            admin_user: admin_user.into(),
            admin_password: admin_password.into(),
            ssl_mode: PostgresSslMode::Disable,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// The connection's `sslMode`. Only `disable` and `prefer` (which
    /// connects without TLS) work for now; see the module documentation.
    pub fn with_ssl_mode(mut self, ssl_mode: PostgresSslMode) -> Self {
        self.ssl_mode = ssl_mode;
        self
    }

    /// How long to wait for the server to accept a connection and complete
    /// the handshake (default 10 s).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The server's host, as written into issued keys.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The admin connection's database.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The name of the login role behind key `key_id` of account role
    /// `account`: `<account>_k_<key id>`, or, when that would be longer than
    /// PostgreSQL keeps, a shortened account name and a hash of both.
    pub fn key_role_name(account: &str, key_id: &str) -> String {
        let plain = format!("{account}{KEY_ROLE_INFIX}{key_id}");
        if plain.len() <= MAX_ROLE_NAME_LEN {
            return plain;
        }
        let hash = fnv1a_hex(&format!("{account}\n{key_id}"));
        let room = MAX_ROLE_NAME_LEN - KEY_ROLE_INFIX.len() - hash.len();
        format!("{}{KEY_ROLE_INFIX}{hash}", truncate_at_char_boundary(account, room))
    }

    fn check_ssl_mode(&self) -> Result<(), ProviderError> {
        match self.ssl_mode {
            PostgresSslMode::Disable | PostgresSslMode::Prefer => Ok(()),
            PostgresSslMode::Require | PostgresSslMode::VerifyFull => Err(ProviderError::Invalid(format!(
                "sslMode {:?} is not supported yet: keysmith connects to PostgreSQL without TLS \
                 (use sslMode disable or prefer)",
                self.ssl_mode
            ))),
        }
    }

    /// Opens a connection as `user`. The connect timeout bounds the whole
    /// handshake (tokio-postgres applies it to the TCP connect only), so a
    /// server that accepts and then says nothing is Transient, not a hang.
    async fn connect(&self, user: &str, password: &str, dbname: &str, who: Principal) -> Result<Client, ProviderError> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .dbname(dbname)
            .user(user)
            .password(password)
            .application_name(APPLICATION_NAME)
            .options(SESSION_OPTIONS)
            .connect_timeout(self.connect_timeout)
            .ssl_mode(SslMode::Disable);
        let (client, connection) = match tokio::time::timeout(self.connect_timeout, config.connect(NoTls)).await {
            Ok(connected) => connected.map_err(|e| classify(&e, who))?,
            Err(_) => {
                return Err(ProviderError::transient(format!(
                    "the server at {}:{} did not complete the connection handshake within {:?}",
                    self.host, self.port, self.connect_timeout
                )))
            }
        };
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "PostgreSQL connection ended with an error");
            }
        });
        Ok(client)
    }

    /// An admin connection to the connection's database.
    async fn admin(&self) -> Result<Client, ProviderError> {
        self.admin_on(&self.database).await
    }

    /// An admin connection to `dbname`.
    async fn admin_on(&self, dbname: &str) -> Result<Client, ProviderError> {
        self.check_ssl_mode()?;
        self.connect(&self.admin_user, &self.admin_password, dbname, Principal::Admin).await
    }

    /// The database issued keys are for.
    fn dbname_for<'a>(&'a self, account: &'a AccountRequest) -> &'a str {
        account.options.get("database").map(String::as_str).filter(|db| !db.is_empty()).unwrap_or(&self.database)
    }

    fn material(&self, account: &AccountRequest, username: &str, password: &str) -> KeyMaterial {
        let dbname = self.dbname_for(account);
        let uri = if self.host.starts_with('/') {
            format!(
                "postgresql://{}:{}@/{}?host={}&port={}",
                percent_encode(username),
                percent_encode(password),
                percent_encode(dbname),
                percent_encode(&self.host),
                self.port
            )
        } else {
            let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
            format!(
                "postgresql://{}:{}@{host}:{}/{}",
                percent_encode(username),
                percent_encode(password),
                self.port,
                percent_encode(dbname)
            )
        };
        KeyMaterial::new(BTreeMap::from([
            ("username".to_owned(), username.to_owned()),
            ("password".to_owned(), password.to_owned()),
            ("host".to_owned(), self.host.clone()),
            ("port".to_owned(), self.port.to_string()),
            ("dbname".to_owned(), dbname.to_owned()),
            ("uri".to_owned(), uri),
        ]))
    }
}

// ---------------------------------------------------------------------------
// Catalog reads and the building blocks of the operations.

/// The role named `name`, if it exists.
async fn find_role(client: &Client, name: &str) -> Result<Option<RoleRow>, ProviderError> {
    let sql = format!("SELECT {ROLE_COLUMNS} FROM pg_roles r WHERE r.rolname = $1");
    let row = client.query_opt(&sql, &[&name]).await.map_err(admin_error)?;
    row.as_ref().map(role_row).transpose()
}

/// The account role, which must exist and be ours.
async fn owned_account(client: &Client, account: &AccountRequest) -> Result<RoleRow, ProviderError> {
    match find_role(client, &account.name).await? {
        None => Err(ProviderError::NotFound(format!("role {:?} does not exist", account.name))),
        Some(role) if !role.is_owned_by(account) => Err(foreign_account(account)),
        Some(role) => Ok(role),
    }
}

/// The key roles keysmith created for the account (found by their
/// ownership tag, whatever their names), revoked or not.
async fn owned_keys(client: &Client, account: &AccountRequest) -> Result<Vec<RoleRow>, ProviderError> {
    let sql = format!(
        "SELECT {ROLE_COLUMNS} FROM pg_roles r \
         WHERE split_part(shobj_description(r.oid, 'pg_authid'), E'\\n', 1) = $1 ORDER BY r.rolname"
    );
    let tag = ownership::uid_tag(&account.owner_uid);
    let rows = client.query(&sql, &[&tag]).await.map_err(admin_error)?;
    let mut keys = Vec::new();
    for row in &rows {
        let role = role_row(row)?;
        if role.key_id().is_some() && role.name != account.name {
            keys.push(role);
        }
    }
    Ok(keys)
}

/// Ends every session of the given roles, waiting for them to go.
async fn terminate_sessions(client: &Client, oids: &[u32]) -> Result<(), ProviderError> {
    if oids.is_empty() {
        return Ok(());
    }
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE NOT pg_terminate_backend(pid, $2)) FROM pg_stat_activity \
             WHERE usesysid = ANY($1) AND pid <> pg_backend_pid()",
            &[&oids, &TERMINATE_WAIT_MS],
        )
        .await
        .map_err(admin_error)?;
    let lingering: i64 = row.try_get(0).map_err(admin_error)?;
    if lingering > 0 {
        return Err(ProviderError::transient(format!(
            "{lingering} session(s) did not end within {TERMINATE_WAIT_MS} ms"
        )));
    }
    Ok(())
}

/// Makes sure the admin has the privileges of each role (as `DROP OWNED`
/// and `REASSIGN OWNED` require), granting itself membership where it has
/// not. Returns the roles it granted itself, to be revoked afterwards
/// unless the role is dropped anyway.
async fn assume_privileges_of(client: &Client, roles: &[&RoleRow]) -> Result<Vec<String>, ProviderError> {
    let mut granted = Vec::new();
    for role in roles {
        let row = client.query_one("SELECT pg_has_role($1::oid, 'USAGE')", &[&role.oid]).await.map_err(admin_error)?;
        let has: bool = row.try_get(0).map_err(admin_error)?;
        if !has {
            client
                .batch_execute(&format!("GRANT {} TO CURRENT_USER", quote_ident(&role.name)))
                .await
                .map_err(admin_error)?;
            granted.push(role.name.clone());
        }
    }
    Ok(granted)
}

/// Drops a role keysmith owns, after clearing what `DROP ROLE` refuses to
/// leave behind: objects it owns are reassigned to `reassign_to` (or, with
/// none, make this a `Conflict`: keysmith never drops data) and privileges
/// granted to it are revoked (`DROP OWNED BY`, in every database where it
/// holds some).
async fn drop_role(
    provider: &PostgresProvider,
    client: &Client,
    role: &RoleRow,
    reassign_to: Option<&RoleRow>,
) -> Result<(), ProviderError> {
    let rows = client
        .query(
            "SELECT d.datname::text, bool_or(s.deptype = 'o') FROM pg_shdepend s \
             LEFT JOIN pg_database d ON d.oid = s.dbid \
             WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = $1 GROUP BY d.datname",
            &[&role.oid],
        )
        .await
        .map_err(admin_error)?;
    // (database, owns objects there); objects shared by every database
    // (databases, tablespaces) are handled from the admin's own.
    let mut databases: BTreeMap<String, bool> = BTreeMap::new();
    for row in &rows {
        let db: Option<String> = row.try_get(0).map_err(admin_error)?;
        let owns: bool = row.try_get(1).map_err(admin_error)?;
        let entry = databases.entry(db.unwrap_or_else(|| provider.database.clone())).or_insert(false);
        *entry |= owns;
    }
    let owning: Vec<&str> = databases.iter().filter(|(_, owns)| **owns).map(|(db, _)| db.as_str()).collect();
    if !owning.is_empty() && reassign_to.is_none() {
        return Err(ProviderError::Conflict(format!(
            "role {:?} owns objects in database(s) {}; keysmith never drops data: reassign them \
             (REASSIGN OWNED BY {} TO ...) or drop them, and keysmith deletes the role on its next attempt",
            role.name,
            owning.join(", "),
            quote_ident(&role.name)
        )));
    }

    let mut need = Vec::new();
    if !databases.is_empty() {
        need.push(role);
        if let (Some(target), false) = (reassign_to, owning.is_empty()) {
            need.push(target);
        }
    }
    let self_granted = assume_privileges_of(client, &need).await?;
    let result = clear_and_drop(provider, client, role, reassign_to, &databases).await;
    // Give back the memberships the admin took, but for one in a role that
    // is gone (and took its memberships with it).
    for name in self_granted.iter().filter(|name| result.is_err() || **name != role.name) {
        let revoked = client.batch_execute(&format!("REVOKE {} FROM CURRENT_USER", quote_ident(name))).await;
        if let (Err(e), Ok(())) = (revoked, &result) {
            return Err(admin_error(e));
        }
    }
    result
}

/// The second half of [`drop_role`]: reassign and revoke in each database
/// (`databases`: name → whether the role owns objects there), then drop.
async fn clear_and_drop(
    provider: &PostgresProvider,
    client: &Client,
    role: &RoleRow,
    reassign_to: Option<&RoleRow>,
    databases: &BTreeMap<String, bool>,
) -> Result<(), ProviderError> {
    for (db, owns) in databases {
        let mut sql = String::new();
        if let (Some(target), true) = (reassign_to, *owns) {
            sql.push_str(&format!("REASSIGN OWNED BY {} TO {}; ", quote_ident(&role.name), quote_ident(&target.name)));
        }
        // The role owns nothing here (any more): this only revokes the
        // privileges granted to it, as far as the admin may revoke them.
        sql.push_str(&format!("DROP OWNED BY {}", quote_ident(&role.name)));
        if *db == provider.database {
            client.batch_execute(&sql).await.map_err(admin_error)?;
        } else {
            let other = provider.admin_on(db).await?;
            other.batch_execute(&sql).await.map_err(admin_error)?;
        }
    }
    match client.batch_execute(&format!("DROP ROLE IF EXISTS {}", quote_ident(&role.name))).await.map_err(admin_error) {
        // DROP OWNED only revokes what the admin could have granted (as a
        // grantor, the object's owner or a member of either): privileges
        // someone else granted on their own objects stay, and keep the
        // role alive.
        Err(ProviderError::Conflict(message)) => Err(ProviderError::Conflict(format!(
            "role {:?} still holds privileges that the admin role cannot revoke (granted by another role on \
             objects the admin neither owns nor may act as the owner of); revoke them as their grantor or a \
             superuser (DROP OWNED BY {} in each database named): {message}",
            role.name,
            quote_ident(&role.name)
        ))),
        other => other,
    }
}

/// Revokes one key role: no new logins, its sessions ended, the role gone.
async fn revoke_key_role(
    provider: &PostgresProvider,
    client: &Client,
    account: &AccountRequest,
    key: &RoleRow,
) -> Result<(), ProviderError> {
    if !key.flagged(FIELD_REVOKED) || key.can_login {
        let comment = with_field(key.comment.as_deref().unwrap_or_default(), FIELD_REVOKED, "true");
        client
            .batch_execute(&format!(
                "ALTER ROLE {name} NOLOGIN; COMMENT ON ROLE {name} IS {comment}",
                name = quote_ident(&key.name),
                comment = quote_literal(&comment)
            ))
            .await
            .map_err(admin_error)?;
    }
    terminate_sessions(client, &[key.oid]).await?;
    // Where the key created objects as itself, the account takes them over.
    let account_role = find_role(client, &account.name).await?.filter(|role| role.is_owned_by(account));
    drop_role(provider, client, key, account_role.as_ref()).await
}

/// The grants an account holds: roles granted to the account role, and
/// roles granted by hand to any of its key roles (other than the account).
async fn held_roles(client: &Client, account: &RoleRow, keys: &[RoleRow]) -> Result<Vec<String>, ProviderError> {
    let members: Vec<u32> = std::iter::once(account.oid).chain(keys.iter().map(|k| k.oid)).collect();
    let rows = client
        .query(
            "SELECT DISTINCT g.rolname::text FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid \
             WHERE m.member = ANY($1) AND m.roleid <> $2",
            &[&members, &account.oid],
        )
        .await
        .map_err(admin_error)?;
    // Sorted here, not by the server's collation: byte order, every time.
    let names: BTreeSet<String> =
        rows.iter().map(|row| row.try_get(0).map_err(admin_error)).collect::<Result<_, _>>()?;
    Ok(names.into_iter().collect())
}

fn observed(account: &AccountRequest, role: &RoleRow, keys: &[RoleRow]) -> ObservedAccount {
    let owned = role.is_owned_by(account);
    let disabled = owned && role.flagged(FIELD_DISABLED);
    let comment_matches = role.comment.as_deref() == Some(account_comment(account, disabled).as_str());
    let keys_match = disabled || keys.iter().all(|k| k.can_login || k.flagged(FIELD_REVOKED));
    ObservedAccount {
        id: role.oid.to_string(),
        name: role.name.clone(),
        disabled,
        owned,
        drifted: !comment_matches || role.can_login || role.privileged.iter().any(|p| *p) || !keys_match,
    }
}

fn foreign_account(account: &AccountRequest) -> ProviderError {
    ProviderError::Conflict(format!(
        "role {:?} exists and was not created by keysmith for IntegrationAccount {}/{}",
        account.name, account.namespace, account.account_name
    ))
}

fn validate_role_name(what: &str, name: &str) -> Result<(), ProviderError> {
    if name.is_empty() {
        return Err(ProviderError::Invalid(format!("the {what} name is empty")));
    }
    if name.len() > MAX_ROLE_NAME_LEN {
        return Err(ProviderError::Invalid(format!(
            "{what} name {name:?} is {} bytes long; PostgreSQL role names are at most {MAX_ROLE_NAME_LEN}",
            name.len()
        )));
    }
    if name.contains('\0') {
        return Err(ProviderError::Invalid(format!("{what} name {name:?} contains a NUL character")));
    }
    Ok(())
}

fn validate_scope(grant: &RoleGrant) -> Result<(), ProviderError> {
    match grant.scope.as_deref() {
        None | Some("") => Ok(()),
        Some(scope) => Err(ProviderError::Invalid(format!(
            "role {:?} has scope {scope:?}: the postgres provider grants role memberships, which have no scope",
            grant.role
        ))),
    }
}

// ---------------------------------------------------------------------------
// Comments: the ownership tag and audit fields.

/// The comment keysmith keeps on an account role.
fn account_comment(account: &AccountRequest, disabled: bool) -> String {
    let mut lines = vec![
        ownership::uid_tag(&account.owner_uid),
        format!("{FIELD_INTEGRATION_ACCOUNT}: {}/{}", account.namespace, account.account_name),
    ];
    if let Some(description) = &account.description {
        lines.push(format!("{FIELD_DESCRIPTION}: {}", one_line(description)));
    }
    if let Some(owner) = &account.owner {
        lines.push(format!("{FIELD_OWNER}: {}", one_line(owner)));
    }
    if disabled {
        lines.push(format!("{FIELD_DISABLED}: true"));
    }
    lines.join("\n")
}

/// The comment keysmith puts on a key role.
fn key_comment(account: &AccountRequest, key_id: &str, issued_at: Timestamp) -> String {
    [
        ownership::uid_tag(&account.owner_uid),
        format!("{FIELD_KEY_ID}: {key_id}"),
        format!("{FIELD_ACCOUNT}: {}", one_line(&account.name)),
        format!("{FIELD_INTEGRATION_ACCOUNT}: {}/{}", account.namespace, account.account_name),
        format!("{FIELD_ISSUED_AT}: {issued_at}"),
    ]
    .join("\n")
}

/// The uid in a comment's ownership tag.
fn tag_uid(comment: &str) -> Option<&str> {
    comment.lines().next()?.strip_prefix(ownership::UID_PREFIX).filter(|uid| !uid.is_empty())
}

/// A `<field>: <value>` line of a tagged comment.
fn tag_field<'a>(comment: &'a str, field: &str) -> Option<&'a str> {
    tag_uid(comment)?;
    comment.lines().skip(1).find_map(|line| line.strip_prefix(field)?.strip_prefix(": "))
}

/// The comment with `field` set to `value` (replaced or appended).
fn with_field(comment: &str, field: &str, value: &str) -> String {
    let mut lines: Vec<String> = comment
        .lines()
        .enumerate()
        .filter(|(i, line)| *i == 0 || line.strip_prefix(field).and_then(|r| r.strip_prefix(": ")).is_none())
        .map(|(_, line)| line.to_owned())
        .collect();
    lines.push(format!("{field}: {value}"));
    lines.join("\n")
}

/// Text on one line, without characters PostgreSQL cannot store.
fn one_line(text: &str) -> String {
    text.chars().filter(|c| *c != '\0').map(|c| if c == '\n' || c == '\r' { ' ' } else { c }).collect()
}

// ---------------------------------------------------------------------------
// Quoting. Utility statements (CREATE ROLE, GRANT, COMMENT...) take no bind
// parameters, so names and texts are quoted here, always.

/// A quoted identifier: `"` around, `"` doubled. Quoted identifiers keep
/// their case and may hold any character but NUL (rejected earlier).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal that means the same whatever `standard_conforming_strings`
/// says: `'` doubled and, when there is a backslash, an `E'...'` literal with
/// backslashes doubled (as PostgreSQL's own `quote_literal` does). NULs,
/// which PostgreSQL text cannot hold, are dropped.
pub fn quote_literal(text: &str) -> String {
    let text: String = text.chars().filter(|c| *c != '\0').collect();
    let body = text.replace('\'', "''");
    if body.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

fn truncate_at_char_boundary(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The first [`HASH_LEN`] hex digits of the 64-bit FNV-1a hash: stable
/// across versions and machines (names derived from it must not change).
fn fnv1a_hex(input: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in input.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut hex = format!("{hash:016x}");
    hex.truncate(HASH_LEN);
    hex
}

fn new_password() -> String {
    rand::rng().sample_iter(&Alphanumeric).take(PASSWORD_LEN).map(char::from).collect()
}

// ---------------------------------------------------------------------------
// Error classification. Messages carry the server's message, code and detail,
// never a statement (which could hold a password verifier) or a password.

/// Classifies an error on the admin connection.
fn admin_error(err: tokio_postgres::Error) -> ProviderError {
    classify(&err, Principal::Admin)
}

/// Classifies a tokio-postgres error by what the caller should do.
fn classify(err: &tokio_postgres::Error, principal: Principal) -> ProviderError {
    if let Some(db) = err.as_db_error() {
        let code = db.code();
        let mut message = format!("{} (SQLSTATE {})", db.message(), code.code());
        if let Some(detail) = db.detail() {
            message.push_str(": ");
            message.push_str(&one_line(detail));
        }
        let refused = |what: &str, message: String| match principal {
            Principal::Admin => ProviderError::Unauthorized(message),
            Principal::Key => ProviderError::Invalid(format!("the key {what}: {message}")),
        };
        return match code.code() {
            // invalid_password, invalid_authorization_specification
            "28P01" | "28000" => refused("was not accepted", message),
            // insufficient_privilege
            "42501" => refused("may not connect", message),
            // undefined_object
            "42704" => ProviderError::NotFound(message),
            // duplicate_object, dependent_objects_still_exist
            "42710" | "2BP01" => ProviderError::Conflict(message),
            // query_canceled (statement_timeout), lock_not_available
            // (lock_timeout), serialization_failure, deadlock_detected
            "57014" | "55P03" | "40001" | "40P01" => ProviderError::transient(message),
            // connection exceptions, insufficient resources, operator
            // intervention (shutdown, cannot connect now), system errors
            state if ["08", "53", "57P", "58"].iter().any(|class| state.starts_with(class)) => {
                ProviderError::transient(message)
            }
            _ => ProviderError::Invalid(message),
        };
    }
    // Not the server's answer: tokio-postgres's own error kinds are private,
    // but their messages are fixed strings.
    let kind = err.to_string();
    let message = match std::error::Error::source(err) {
        Some(source) => format!("{kind}: {source}"),
        None => kind.clone(),
    };
    let io = std::error::Error::source(err).is_some_and(|s| s.is::<std::io::Error>());
    if err.is_closed() || io {
        return ProviderError::transient(message);
    }
    match kind.as_str() {
        "error connecting to server"
        | "error communicating with the server"
        | "timeout waiting for server"
        | "unexpected message from server"
        | "error parsing response from server" => ProviderError::transient(message),
        "authentication error" => match principal {
            Principal::Admin => ProviderError::Unauthorized(message),
            Principal::Key => ProviderError::Invalid(format!("the key was not accepted: {message}")),
        },
        _ => ProviderError::Invalid(message),
    }
}

// ---------------------------------------------------------------------------

#[async_trait]
impl Provider for PostgresProvider {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn capabilities(&self) -> Capabilities {
        // Keys are roles: the connection's policy is the only limit.
        Capabilities { last_use_lag: None, max_keys_per_account: None, key_expiry: true, disable: true }
    }

    async fn verify_connection(&self) -> Result<(), ProviderError> {
        let client = self.admin().await?;
        let row = client
            .query_one(
                "SELECT current_setting('server_version_num')::int4, r.rolsuper, r.rolcreaterole, \
                 r.rolsuper OR pg_has_role('pg_signal_backend', 'USAGE') \
                 FROM pg_roles r WHERE r.rolname = current_user",
                &[],
            )
            .await
            .map_err(admin_error)?;
        let version: i32 = row.try_get(0).map_err(admin_error)?;
        let superuser: bool = row.try_get(1).map_err(admin_error)?;
        let create_role: bool = row.try_get(2).map_err(admin_error)?;
        let signal: bool = row.try_get(3).map_err(admin_error)?;
        if version < MIN_SERVER_VERSION {
            return Err(ProviderError::Invalid(format!(
                "the server runs PostgreSQL {version}; keysmith needs 14 or later"
            )));
        }
        if !(superuser || create_role) {
            return Err(ProviderError::Unauthorized(format!(
                "role {:?} has neither CREATEROLE nor SUPERUSER",
                self.admin_user
            )));
        }
        if !signal {
            return Err(ProviderError::Unauthorized(format!(
                "role {:?} lacks the privileges of pg_signal_backend, needed to end revoked keys' sessions",
                self.admin_user
            )));
        }
        Ok(())
    }

    async fn observe_account(&self, account: &AccountRequest) -> Result<Option<ObservedAccount>, ProviderError> {
        validate_role_name("account", &account.name)?;
        let client = self.admin().await?;
        let Some(role) = find_role(&client, &account.name).await? else {
            return Ok(None);
        };
        let keys = if role.is_owned_by(account) { owned_keys(&client, account).await? } else { Vec::new() };
        Ok(Some(observed(account, &role, &keys)))
    }

    async fn create_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        validate_role_name("account", &account.name)?;
        let client = self.admin().await?;
        // One simple-query message: both statements commit or neither does,
        // so a role without its ownership tag is never left behind.
        let sql = format!(
            "CREATE ROLE {name} NOLOGIN INHERIT; COMMENT ON ROLE {name} IS {comment}",
            name = quote_ident(&account.name),
            comment = quote_literal(&account_comment(account, false))
        );
        match client.batch_execute(&sql).await.map_err(admin_error) {
            Ok(()) | Err(ProviderError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
        let role = owned_account(&client, account).await?;
        let keys = owned_keys(&client, account).await?;
        Ok(observed(account, &role, &keys))
    }

    async fn update_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        validate_role_name("account", &account.name)?;
        let client = self.admin().await?;
        let role = owned_account(&client, account).await?;
        let keys = owned_keys(&client, account).await?;
        let name = quote_ident(&role.name);
        let mut sql = Vec::new();
        if role.can_login {
            sql.push(format!("ALTER ROLE {name} NOLOGIN"));
        }
        // Only the attributes that are on: naming SUPERUSER, REPLICATION or
        // BYPASSRLS at all, even to turn it off, takes a superuser.
        let off: Vec<String> = PRIVILEGED_ATTRIBUTES
            .iter()
            .zip(role.privileged)
            .filter(|(_, on)| *on)
            .map(|(attribute, _)| format!("NO{attribute}"))
            .collect();
        if !off.is_empty() {
            sql.push(format!("ALTER ROLE {name} {}", off.join(" ")));
        }
        sql.push(format!("COMMENT ON ROLE {name} IS {}", quote_literal(&account_comment(account, false))));
        for key in keys.iter().filter(|k| !k.can_login && !k.flagged(FIELD_REVOKED)) {
            sql.push(format!("ALTER ROLE {} LOGIN", quote_ident(&key.name)));
        }
        client.batch_execute(&sql.join("; ")).await.map_err(admin_error)?;
        let role = owned_account(&client, account).await?;
        let keys = owned_keys(&client, account).await?;
        Ok(observed(account, &role, &keys))
    }

    async fn disable_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        validate_role_name("account", &account.name)?;
        let client = self.admin().await?;
        let role = match find_role(&client, &account.name).await? {
            None => return Ok(()),
            Some(role) if !role.is_owned_by(account) => {
                tracing::warn!(role = %account.name, "not disabling a role keysmith does not own");
                return Ok(());
            }
            Some(role) => role,
        };
        let keys = owned_keys(&client, account).await?;
        let mut sql = vec![format!(
            "COMMENT ON ROLE {} IS {}",
            quote_ident(&role.name),
            quote_literal(&account_comment(account, true))
        )];
        for key in keys.iter().filter(|k| k.can_login) {
            sql.push(format!("ALTER ROLE {} NOLOGIN", quote_ident(&key.name)));
        }
        client.batch_execute(&sql.join("; ")).await.map_err(admin_error)?;
        let oids: Vec<u32> = keys.iter().map(|k| k.oid).collect();
        terminate_sessions(&client, &oids).await
    }

    async fn delete_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        validate_role_name("account", &account.name)?;
        let client = self.admin().await?;
        // Keys first (found by tag, even if the account role is gone), so
        // nobody acts as the account while the rest goes.
        for key in owned_keys(&client, account).await? {
            revoke_key_role(self, &client, account, &key).await?;
        }
        match find_role(&client, &account.name).await? {
            None => Ok(()),
            Some(role) if !role.is_owned_by(account) => {
                tracing::warn!(role = %account.name, "not deleting a role keysmith does not own");
                Ok(())
            }
            Some(role) => drop_role(self, &client, &role, None).await,
        }
    }

    async fn list_roles(&self, account: &AccountRequest) -> Result<Vec<RoleGrant>, ProviderError> {
        validate_role_name("account", &account.name)?;
        let client = self.admin().await?;
        let role = match find_role(&client, &account.name).await? {
            None => return Ok(Vec::new()),
            Some(role) if !role.is_owned_by(account) => return Err(foreign_account(account)),
            Some(role) => role,
        };
        let keys = owned_keys(&client, account).await?;
        let roles = held_roles(&client, &role, &keys).await?;
        Ok(roles.into_iter().map(|role| RoleGrant { role, scope: None }).collect())
    }

    async fn grant_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        validate_role_name("account", &account.name)?;
        validate_scope(grant)?;
        validate_role_name("role", &grant.role)?;
        let client = self.admin().await?;
        let role = owned_account(&client, account).await?;
        if find_role(&client, &grant.role).await?.is_none() {
            return Err(ProviderError::NotFound(format!("role {:?} does not exist", grant.role)));
        }
        // Granting what is already granted is a notice, not an error.
        client
            .batch_execute(&format!("GRANT {} TO {}", quote_ident(&grant.role), quote_ident(&role.name)))
            .await
            .map_err(admin_error)
    }

    async fn revoke_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        validate_role_name("account", &account.name)?;
        validate_scope(grant)?;
        let client = self.admin().await?;
        let role = match find_role(&client, &account.name).await? {
            None => return Ok(()),
            Some(role) if !role.is_owned_by(account) => return Err(foreign_account(account)),
            Some(role) => role,
        };
        let keys = owned_keys(&client, account).await?;
        let members: Vec<u32> = std::iter::once(role.oid).chain(keys.iter().map(|k| k.oid)).collect();
        let rows = client
            .query(
                "SELECT DISTINCT mr.rolname::text FROM pg_auth_members m \
                 JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles mr ON mr.oid = m.member \
                 WHERE g.rolname = $1 AND m.member = ANY($2) AND m.roleid <> $3 ORDER BY 1",
                &[&grant.role, &members, &role.oid],
            )
            .await
            .map_err(admin_error)?;
        let holders: Vec<String> =
            rows.iter().map(|row| row.try_get::<_, String>(0).map_err(admin_error)).collect::<Result<_, _>>()?;
        if holders.is_empty() {
            return Ok(());
        }
        let holders: Vec<String> = holders.iter().map(|h| quote_ident(h)).collect();
        client
            .batch_execute(&format!("REVOKE {} FROM {}", quote_ident(&grant.role), holders.join(", ")))
            .await
            .map_err(admin_error)
    }

    async fn issue_key(&self, account: &AccountRequest, request: &KeyRequest) -> Result<IssuedKey, ProviderError> {
        validate_role_name("account", &account.name)?;
        if request.key_id.is_empty() || request.key_id.chars().any(char::is_control) {
            return Err(ProviderError::Invalid(format!(
                "key id {:?} is empty or has control characters",
                request.key_id
            )));
        }
        let client = self.admin().await?;
        let role = owned_account(&client, account).await?;
        if role.flagged(FIELD_DISABLED) {
            return Err(ProviderError::Conflict(format!(
                "role {:?} is disabled: enable the account before issuing keys",
                account.name
            )));
        }
        let key_name = Self::key_role_name(&account.name, &request.key_id);

        // The server's clock decides when VALID UNTIL has passed.
        let row = client.query_one("SELECT extract(epoch FROM now())::float8", &[]).await.map_err(admin_error)?;
        let now_secs: f64 = row.try_get(0).map_err(admin_error)?;
        let issued_at = Timestamp::from_second(now_secs.floor() as i64)
            .map_err(|e| ProviderError::Invalid(format!("the server's clock reads {now_secs}: {e}")))?;
        let expires_at = match request.lifetime {
            None => None,
            Some(lifetime) => {
                let lifetime = jiff::SignedDuration::try_from(lifetime)
                    .map_err(|e| ProviderError::Invalid(format!("key lifetime {lifetime:?}: {e}")))?;
                Some(
                    issued_at
                        .checked_add(lifetime)
                        .map_err(|e| ProviderError::Invalid(format!("key lifetime {lifetime:?}: {e}")))?,
                )
            }
        };
        let valid_until = match expires_at {
            Some(at) => quote_literal(&at.to_string()),
            None => "'infinity'".to_owned(),
        };

        let password = new_password();
        // The verifier, not the password, goes over the wire and into the
        // statement (and so into any statement log).
        let verifier = quote_literal(&postgres_protocol::password::scram_sha_256(password.as_bytes()));
        let name = quote_ident(&key_name);
        let comment = quote_literal(&key_comment(account, &request.key_id, issued_at));
        let settings = format!(
            "ALTER ROLE {name} SET role = {}; COMMENT ON ROLE {name} IS {comment}",
            quote_literal(&account.name)
        );
        let create = format!(
            "CREATE ROLE {name} LOGIN INHERIT PASSWORD {verifier} VALID UNTIL {valid_until} IN ROLE {}; {settings}",
            quote_ident(&role.name)
        );
        match client.batch_execute(&create).await.map_err(admin_error) {
            Ok(()) => {}
            Err(ProviderError::Conflict(_)) => {
                // A retry of the same key (its first answer was lost): ours,
                // so it gets a new password; anything else is not ours.
                let existing = find_role(&client, &key_name).await?;
                match existing {
                    Some(key)
                        if key.is_owned_by(account)
                            && key.key_id() == Some(request.key_id.as_str())
                            && !key.flagged(FIELD_REVOKED) =>
                    {
                        client
                            .batch_execute(&format!(
                                "ALTER ROLE {name} LOGIN INHERIT PASSWORD {verifier} VALID UNTIL {valid_until}; \
                                 GRANT {} TO {name}; {settings}",
                                quote_ident(&role.name)
                            ))
                            .await
                            .map_err(admin_error)?;
                    }
                    _ => {
                        return Err(ProviderError::Conflict(format!(
                            "role {key_name:?} already exists and is not key {:?} of this account",
                            request.key_id
                        )))
                    }
                }
            }
            Err(e) => return Err(e),
        }
        Ok(IssuedKey { id: request.key_id.clone(), expires_at, material: self.material(account, &key_name, &password) })
    }

    async fn list_keys(&self, account: &AccountRequest) -> Result<Vec<ObservedKey>, ProviderError> {
        validate_role_name("account", &account.name)?;
        let client = self.admin().await?;
        let keys = owned_keys(&client, account).await?;
        Ok(keys
            .iter()
            .filter_map(|key| {
                Some(ObservedKey {
                    last_used: None,
                    id: key.key_id()?.to_owned(),
                    created_at: key.field(FIELD_ISSUED_AT).and_then(|at| at.parse().ok()),
                })
            })
            .collect())
    }

    async fn revoke_key(&self, account: &AccountRequest, key_id: &str) -> Result<(), ProviderError> {
        validate_role_name("account", &account.name)?;
        let client = self.admin().await?;
        for key in owned_keys(&client, account).await?.iter().filter(|k| k.key_id() == Some(key_id)) {
            revoke_key_role(self, &client, account, key).await?;
        }
        Ok(())
    }

    async fn verify_key(&self, account: &AccountRequest, key: &IssuedKey) -> Result<(), ProviderError> {
        self.check_ssl_mode()?;
        let values = key.material.expose();
        let (Some(username), Some(password)) = (values.get("username"), values.get("password")) else {
            return Err(ProviderError::Invalid("the key has no username or password".to_owned()));
        };
        let client = self.connect(username, password, self.dbname_for(account), Principal::Key).await?;
        let row = client
            .query_one("SELECT session_user::text, current_user::text", &[])
            .await
            .map_err(|e| classify(&e, Principal::Key))?;
        let session_user: String = row.try_get(0).map_err(|e| classify(&e, Principal::Key))?;
        let current_user: String = row.try_get(1).map_err(|e| classify(&e, Principal::Key))?;
        if session_user != *username || current_user != account.name {
            return Err(ProviderError::Invalid(format!(
                "the key logged in as {session_user:?} acting as {current_user:?}, \
                 not {username:?} acting as {:?}",
                account.name
            )));
        }
        Ok(())
    }
}

/// The connect step: the admin role's name and password from their Secret,
/// then the client.
pub async fn connect(
    spec: &crate::api::PostgresSpec,
    connect: &super::Connect<'_>,
) -> Result<std::sync::Arc<dyn Provider>, ProviderError> {
    let ([user, password], version) =
        connect.secret_values(&spec.credentials_secret_ref, ["username", "password"]).await?;
    let port =
        u16::try_from(spec.port).map_err(|_| ProviderError::Invalid(format!("port {} is out of range", spec.port)))?;
    let key = format!("postgres/{}/{version}", connect.connection.uid);
    connect
        .cached(key, || async {
            Ok(std::sync::Arc::new(
                PostgresProvider::new(spec.host.clone(), port, spec.database.clone(), user, password)
                    .with_ssl_mode(spec.ssl_mode),
            ) as std::sync::Arc<dyn Provider>)
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> AccountRequest {
        AccountRequest {
            name: "billing-sync".to_owned(),
            namespace: "payments".to_owned(),
            account_name: "billing-sync".to_owned(),
            owner_uid: "0b4e-uid".to_owned(),
            description: Some("Nightly\ninvoices".to_owned()),
            owner: Some("team-payments".to_owned()),
            options: BTreeMap::new(),
        }
    }

    #[test]
    fn identifiers_are_always_quoted_with_quotes_doubled() {
        assert_eq!(quote_ident("billing"), "\"billing\"");
        assert_eq!(quote_ident("Mixed Case"), "\"Mixed Case\"");
        assert_eq!(quote_ident("evil\"; DROP ROLE x; --"), "\"evil\"\"; DROP ROLE x; --\"");
    }

    #[test]
    fn literals_double_quotes_and_escape_backslashes() {
        assert_eq!(quote_literal("plain"), "'plain'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\'; DROP"), "E'a\\\\''; DROP'");
        assert_eq!(quote_literal("nul\0byte"), "'nulbyte'");
    }

    #[test]
    fn uri_parts_are_percent_encoded() {
        assert_eq!(percent_encode("ab-C_9.~"), "ab-C_9.~");
        assert_eq!(percent_encode("a b@c:d/é"), "a%20b%40c%3Ad%2F%C3%A9");
    }

    #[test]
    fn material_has_the_documented_keys_and_a_uri() {
        let provider = PostgresProvider::new("db.example", 5433, "app db", "admin", "secret");
        let material = provider.material(&request(), "billing-sync_k_abc", "pw:/@");
        let values = material.expose();
        assert_eq!(values.keys().map(String::as_str).collect::<Vec<_>>(), {
            let mut keys = MATERIAL_KEYS.to_vec();
            keys.sort_unstable();
            keys
        });
        assert_eq!(values["uri"], "postgresql://billing-sync_k_abc:pw%3A%2F%40@db.example:5433/app%20db");
        let v6 = PostgresProvider::new("::1", 5432, "postgres", "admin", "secret");
        assert!(v6.material(&request(), "u", "p").expose()["uri"].starts_with("postgresql://u:p@[::1]:5432/"));
        assert!(!format!("{material:?}").contains("pw:"));
        assert!(!format!("{provider:?}").contains("secret"));
    }

    #[test]
    fn key_role_names_fit_postgres_limits() {
        assert_eq!(PostgresProvider::key_role_name("billing-sync", "k1x2"), "billing-sync_k_k1x2");
        let long = "a".repeat(60);
        let name = PostgresProvider::key_role_name(&long, "abcdefghij");
        assert_eq!(name.len(), MAX_ROLE_NAME_LEN);
        assert_ne!(name, PostgresProvider::key_role_name(&long, "abcdefghik"));
        let multibyte = "é".repeat(31);
        assert!(PostgresProvider::key_role_name(&multibyte, "abcdefghij").len() <= MAX_ROLE_NAME_LEN);
    }

    #[test]
    fn comments_carry_the_tag_and_fields() {
        let account = request();
        let comment = account_comment(&account, false);
        assert_eq!(
            comment,
            "keysmith:0b4e-uid\nintegration-account: payments/billing-sync\n\
             description: Nightly invoices\nowner: team-payments"
        );
        assert_eq!(tag_uid(&comment), Some("0b4e-uid"));
        assert_eq!(tag_field(&comment, FIELD_OWNER), Some("team-payments"));
        assert_eq!(tag_field(&comment, FIELD_DISABLED), None);
        assert_eq!(tag_field(&account_comment(&account, true), FIELD_DISABLED), Some("true"));
        assert_eq!(tag_uid("keysmith:"), None);
        assert_eq!(tag_uid("someone else's role"), None);
        assert_eq!(tag_field("not ours\nowner: x", FIELD_OWNER), None);
        let revoked = with_field(&comment, FIELD_REVOKED, "true");
        assert_eq!(tag_field(&revoked, FIELD_REVOKED), Some("true"));
        assert_eq!(with_field(&revoked, FIELD_REVOKED, "true"), revoked);
    }

    #[test]
    fn long_or_empty_names_are_invalid() {
        assert!(validate_role_name("account", &"x".repeat(63)).is_ok());
        assert!(matches!(validate_role_name("account", &"x".repeat(64)), Err(ProviderError::Invalid(_))));
        assert!(matches!(validate_role_name("account", ""), Err(ProviderError::Invalid(_))));
        let scoped = RoleGrant { role: "reader".to_owned(), scope: Some("app".to_owned()) };
        assert!(matches!(validate_scope(&scoped), Err(ProviderError::Invalid(_))));
        assert!(validate_scope(&RoleGrant { role: "reader".to_owned(), scope: Some(String::new()) }).is_ok());
    }

    #[test]
    fn generated_passwords_are_long_alphanumerics() {
        let a = new_password();
        assert_eq!(a.len(), PASSWORD_LEN);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, new_password());
    }
}
