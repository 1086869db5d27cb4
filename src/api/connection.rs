//! `AppConnection` and `ClusterAppConnection`: which target app, with which
//! admin credential, under which policy.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{CommonStatus, SecretKeySelector, NAME_PATTERN};

/// The target app, its admin credential, and the policy for accounts behind it.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "keysmith.dev",
    version = "v1alpha1",
    kind = "AppConnection",
    doc = "A connection to a target app, usable by the IntegrationAccounts in its own namespace: which app, with which admin credential, and under which policy.",
    plural = "appconnections",
    singular = "appconnection",
    shortname = "appconn",
    category = "keysmith",
    namespaced,
    status = "AppConnectionStatus",
    printcolumn(
        name = "Provider",
        type_ = "string",
        json_path = ".status.provider",
        description = "The kind of target app"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the admin credential works"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct AppConnectionSpec {
    /// The target app, policy, rate budget and key limit.
    #[serde(flatten)]
    pub connection: ConnectionSpec,

    /// The ServiceAccount, in this namespace, that keysmith acts as for this
    /// connection: every call it makes to this cluster's apiserver for it
    /// (reading the credential Secret; with the `kubernetes` provider and no
    /// kubeconfig, every ServiceAccount, binding, anchor Secret and token)
    /// impersonates it, so that the apiserver's RBAC, not keysmith's own
    /// rights, decides what happens. Required unless the operator runs with
    /// `--default-service-account`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub service_account_name: Option<String>,
}

/// What every connection says, namespaced or cluster-wide: the target app,
/// the policy for accounts behind it, its request budget and key limit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionSpec {
    /// The target app. Set exactly one provider.
    pub provider: ProviderSpec,

    /// Which roles accounts behind this connection may be granted, and where.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<ConnectionPolicy>,

    /// The request budget keysmith keeps to when calling the target app,
    /// shared by every account behind this connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,

    /// The most keys an account may hold at once, counting the live key and
    /// keys in their grace period. The provider's own limit applies if lower.
    #[serde(default = "default_max_keys")]
    #[schemars(range(min = 1, max = 10))]
    pub max_keys_per_account: i32,
}

fn default_max_keys() -> i32 {
    2
}

/// The target app, its admin credential, its policy, and the namespaces that may use it.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "keysmith.dev",
    version = "v1alpha1",
    kind = "ClusterAppConnection",
    doc = "A connection to a target app shared across namespaces. Only IntegrationAccounts in namespaces its namespaceSelector admits may use it.",
    plural = "clusterappconnections",
    singular = "clusterappconnection",
    shortname = "cappconn",
    category = "keysmith",
    status = "AppConnectionStatus",
    printcolumn(
        name = "Provider",
        type_ = "string",
        json_path = ".status.provider",
        description = "The kind of target app"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the admin credential works"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterAppConnectionSpec {
    /// The target app, policy, rate budget and key limit, as for an
    /// AppConnection. Secret references must name their namespace. Its
    /// policy grants no role until `allowedRoles` names some.
    #[serde(flatten)]
    pub connection: ConnectionSpec,

    /// The namespaces whose IntegrationAccounts may use this connection.
    /// An empty selector (`{}`) admits every namespace; without a selector no
    /// namespace is admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// How the account an IntegrationAccount stands for is named in the
    /// target app: `{namespace}` is the IntegrationAccount's namespace,
    /// `{name}` its `providerOptions.name` or else its own name. The default,
    /// `{namespace}.{name}`, keeps accounts of different namespaces apart in a
    /// shared target app (a namespace name has no dot), so no tenant can take
    /// or squat another's account name. The `kubernetes` provider's default
    /// is `{name}`: its ServiceAccounts live in the account's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^([^{}]|\{namespace\}|\{name\})*\{name\}([^{}]|\{namespace\}|\{name\})*$")
    )]
    pub account_name_template: Option<String>,
}

/// The target app. Exactly one field is set; it selects the provider.
//
// A CEL rule rather than `minProperties`/`maxProperties`: the apiserver
// checks CEL rules only on objects the schema accepts, and the rule's message
// says what to do. It names every field (a test keeps it so): the apiserver
// types `self` as an object, for which `size()` is undefined.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend(
    "x-kubernetes-validations" = [{
        "rule": "[has(self.kubernetes), has(self.scim), has(self.oauth2), has(self.awsIam), has(self.postgres), has(self.gcpIam), has(self.openBao), has(self.zabbix)].filter(set, set).size() == 1",
        "message": "set exactly one provider"
    }]
))]
pub struct ProviderSpec {
    /// A Kubernetes cluster: ServiceAccounts, RBAC bindings to ClusterRoles,
    /// and TokenRequest tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesSpec>,
    /// A SCIM 2.0 service (RFC 7643/7644): Users, Group memberships, passwords.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scim: Option<ScimSpec>,
    /// An OAuth 2.0 authorization server with dynamic client registration
    /// (RFC 7591/7592): clients, scopes, client secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2Spec>,
    /// AWS IAM: users, attached managed policies, access keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_iam: Option<AwsIamSpec>,
    /// PostgreSQL: login roles, granted roles, passwords.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresSpec>,
    /// Google Cloud IAM: service accounts, project role bindings,
    /// service-account keys (JSON key files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcp_iam: Option<GcpIamSpec>,
    /// OpenBao (or a Vault-compatible server): AppRole roles, their ACL
    /// policies, secret-ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_bao: Option<OpenBaoSpec>,
    /// A Zabbix server's API (6.0): users, their roles' API-method
    /// allow-lists, API tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zabbix: Option<ZabbixSpec>,
}

impl ProviderSpec {
    /// The name of the selected provider, or `None` unless exactly one is set.
    pub fn selected(&self) -> Option<&'static str> {
        let set: Vec<&'static str> = [
            (self.kubernetes.is_some(), "kubernetes"),
            (self.scim.is_some(), "scim"),
            (self.oauth2.is_some(), "oauth2"),
            (self.aws_iam.is_some(), "awsIam"),
            (self.postgres.is_some(), "postgres"),
            (self.gcp_iam.is_some(), "gcpIam"),
            (self.open_bao.is_some(), "openBao"),
            (self.zabbix.is_some(), "zabbix"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        match set.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }
}

const URL_PATTERN: &str = r"^https?://[^\s]+$";

/// A Kubernetes cluster as the target app.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesSpec {
    /// A Secret holding a kubeconfig for a remote cluster (key default
    /// `kubeconfig`). Without it, the cluster keysmith runs in is the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig_secret_ref: Option<SecretKeySelector>,
    /// Whether RoleBindings may use scope `*` (a ClusterRoleBinding). Off by
    /// default: cluster-wide grants must be allowed explicitly.
    #[serde(default)]
    pub allow_cluster_scope: bool,
}

/// A SCIM 2.0 service as the target app.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScimSpec {
    /// The SCIM base URL, for example `https://example.com/scim/v2`.
    #[schemars(length(max = 2048), regex(pattern = URL_PATTERN))]
    pub base_url: String,
    /// A Secret holding the admin bearer token (key default `token`).
    pub token_secret_ref: SecretKeySelector,
}

/// An OAuth 2.0 authorization server as the target app.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OAuth2Spec {
    /// The dynamic client registration endpoint (RFC 7591).
    #[schemars(length(max = 2048), regex(pattern = URL_PATTERN))]
    pub registration_endpoint: String,
    /// The token endpoint, used to verify client credentials.
    #[schemars(length(max = 2048), regex(pattern = URL_PATTERN))]
    pub token_endpoint: String,
    /// The token introspection endpoint (RFC 7662), where the server offers one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = URL_PATTERN))]
    pub introspection_endpoint: Option<String>,
    /// A Secret holding the initial access token for registration (key
    /// default `token`), where the server requires one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_access_token_secret_ref: Option<SecretKeySelector>,
}

/// AWS IAM (or an IAM-compatible endpoint) as the target app.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AwsIamSpec {
    /// The AWS region used to sign requests.
    #[serde(default = "default_region")]
    #[schemars(regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"))]
    pub region: String,
    /// The IAM endpoint, for IAM-compatible services; AWS's own by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = URL_PATTERN))]
    pub endpoint: Option<String>,
    /// The IAM path users are created under, which also scopes what the
    /// admin credential needs rights to.
    #[serde(default = "default_iam_path")]
    #[schemars(length(max = 512), regex(pattern = r"^/([\x21-\x7E]*/)?$"))]
    pub path: String,
    /// A Secret holding the admin access key (keys `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`).
    pub credentials_secret_ref: SecretKeySelector,
}

/// A Google Cloud project's IAM as the target app.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GcpIamSpec {
    /// The project id: service accounts are created in it, and roles are
    /// bound on it.
    #[schemars(regex(pattern = r"^[a-z][-a-z0-9]{4,28}[a-z0-9]$"))]
    pub project: String,
    /// The IAM API, for a private endpoint; Google's own by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = URL_PATTERN))]
    pub iam_endpoint: Option<String>,
    /// The Resource Manager API, for a private endpoint; Google's own by
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = URL_PATTERN))]
    pub resource_manager_endpoint: Option<String>,
    /// A Secret holding the JSON key file of the service account keysmith
    /// acts as (key `credentials.json` by default); it needs
    /// roles/iam.serviceAccountAdmin, roles/iam.serviceAccountKeyAdmin and
    /// roles/resourcemanager.projectIamAdmin on the project.
    pub credentials_secret_ref: SecretKeySelector,
}

/// An OpenBao server's AppRole auth method as the target app.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OpenBaoSpec {
    /// The server's address, for example `https://bao.example.com:8200`.
    #[schemars(length(max = 2048), regex(pattern = URL_PATTERN))]
    pub address: String,
    /// Where the AppRole auth method is mounted, without `auth/`.
    #[serde(default = "default_approle_mount")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")
    )]
    pub mount: String,
    /// The longest a token from a login with one of keysmith's secret-ids
    /// lives (the role's `token_max_ttl`), in seconds. Revoking a secret-id
    /// stops new logins; tokens already issued live until this runs out.
    #[serde(default = "default_token_max_ttl")]
    #[schemars(range(min = 60, max = 2764800))]
    pub token_max_ttl_seconds: i64,
    /// A Secret holding the OpenBao token keysmith acts with (key `token`
    /// by default).
    pub token_secret_ref: SecretKeySelector,
}

/// A Zabbix server's API as the target app.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ZabbixSpec {
    /// The JSON-RPC endpoint, for example
    /// `https://zabbix.example.com/api_jsonrpc.php`.
    #[schemars(length(max = 2048), regex(pattern = URL_PATTERN))]
    pub url: String,
    /// A Secret holding the API token keysmith acts with (key `token` by
    /// default): a token of a user whose role is of type Super admin with
    /// an API allow-list of the methods the README lists.
    pub token_secret_ref: SecretKeySelector,
    /// The user group accounts join: it decides their host permissions.
    #[serde(default = "default_zabbix_group")]
    #[schemars(length(min = 1, max = 64))]
    pub user_group: String,
    /// The user group that disables its members (`users_status` 1), which
    /// accounts join when they are disabled.
    #[serde(default = "default_zabbix_disabled_group")]
    #[schemars(length(min = 1, max = 64))]
    pub disabled_user_group: String,
}

fn default_zabbix_group() -> String {
    "No access to the frontend".to_owned()
}

fn default_zabbix_disabled_group() -> String {
    "Disabled".to_owned()
}

fn default_approle_mount() -> String {
    "approle".to_owned()
}

fn default_token_max_ttl() -> i64 {
    3600
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

fn default_iam_path() -> String {
    "/keysmith/".to_owned()
}

/// A PostgreSQL server as the target app.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresSpec {
    /// Host name or IP address of the server.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// TCP port of the server.
    #[serde(default = "default_pg_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// The database keysmith connects to as admin, and the default scope of
    /// RoleBindings.
    #[serde(default = "default_pg_database")]
    #[schemars(length(min = 1, max = 63))]
    pub database: String,
    /// TLS mode of the admin connection.
    #[serde(default)]
    pub ssl_mode: PostgresSslMode,
    /// A Secret holding the admin credential (keys `username` and `password`).
    pub credentials_secret_ref: SecretKeySelector,
}

fn default_pg_port() -> i32 {
    5432
}

fn default_pg_database() -> String {
    "postgres".to_owned()
}

/// TLS modes for PostgreSQL connections, as in libpq.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PostgresSslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it.
    #[default]
    Prefer,
    /// TLS, without verifying the server certificate.
    Require,
    /// TLS with a verified certificate and host name.
    VerifyFull,
}

/// Which roles accounts behind a connection may be granted, and where.
/// Patterns are globs (`*` matches any run of characters, `?` one
/// character). A role is allowed when it matches an allowed pattern and no
/// denied pattern; denied wins. On an AppConnection an empty `allowedRoles`
/// allows every role not denied (the ServiceAccount it acts as is limited by
/// the apiserver's RBAC anyway); on a ClusterAppConnection, which acts with
/// keysmith's own rights, an empty `allowedRoles` allows none: `["*"]` allows
/// every role, and must be said.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPolicy {
    /// Roles that may be granted. Empty: every role not denied on an
    /// AppConnection, none on a ClusterAppConnection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 512)))]
    pub allowed_roles: Vec<String>,
    /// Roles that are never granted, for example `cluster-admin` or
    /// `Modify All Data`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 512)))]
    pub denied_roles: Vec<String>,
    /// Where roles may take effect (for the `kubernetes` provider: the
    /// namespaces RoleBindings may be made in, and where the account's
    /// ServiceAccount may live), as globs over namespace names, beside the
    /// account's own namespace, which is always allowed. `*` alone also
    /// allows cluster-wide grants (scope `*`). Empty: the account's own
    /// namespace only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 253)))]
    pub allowed_scopes: Vec<String>,
}

/// A token-bucket request budget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Sustained requests per second.
    #[serde(default = "default_rps")]
    #[schemars(range(min = 0.01, max = 10000.0))]
    pub requests_per_second: f64,
    /// Requests that may be made at once after a quiet period.
    #[serde(default = "default_burst")]
    #[schemars(range(min = 1, max = 10000))]
    pub burst: i32,
}

fn default_rps() -> f64 {
    10.0
}

fn default_burst() -> i32 {
    20
}

/// Observed state of an AppConnection or ClusterAppConnection.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppConnectionStatus {
    /// Conditions (Ready: the admin credential works) and the generation they
    /// describe.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// The selected provider (`kubernetes`, `scim`, `oauth2`, `awsIam`, `postgres`, `gcpIam`, `openBao`, `zabbix`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// When the admin credential was last verified against the target app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified_at: Option<Time>,
}
