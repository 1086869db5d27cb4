//! What the load and zero-downtime campaigns (RELIABILITY.md) share: their
//! settings from the environment, and the connections to the target apps
//! they run: admin credential Secrets, provider specs, and the Role that
//! lets the connections' ServiceAccount `keysmith` read the credentials.
//!
//! Test files include it with `#[path = "common/campaign.rs"] mod campaign;`.
#![allow(dead_code)]

/// A setting from the environment, or `default`.
pub fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The providers a campaign runs: `var`, comma-separated, or `default`.
pub fn providers(var: &str, default: &str) -> Vec<String> {
    std::env::var(var).unwrap_or_else(|_| default.into()).split(',').map(str::to_owned).collect()
}

fn secret(name: &str, string_data: &str) -> String {
    format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\nstringData: {string_data}\n---\n")
}

/// The postgres admin's credential Secret `pg-admin`.
pub fn postgres_admin(username: &str, password: &str) -> String {
    secret("pg-admin", &format!("{{username: {username}, password: {password}}}"))
}

/// `spec.provider` of a postgres connection to 127.0.0.1:`port`.
pub fn postgres_spec(port: u16) -> String {
    format!(
        "{{postgres: {{host: 127.0.0.1, port: {port}, database: postgres, sslMode: disable, credentialsSecretRef: {{name: pg-admin}}}}}}"
    )
}

/// The SCIM admin token's Secret `scim-admin`.
pub fn scim_admin(token: &str) -> String {
    secret("scim-admin", &format!("{{token: \"{token}\"}}"))
}

/// `spec.provider` of a scim connection to `base_url` (with its `/v2`).
pub fn scim_spec(base_url: &str) -> String {
    format!("{{scim: {{baseUrl: \"{base_url}\", tokenSecretRef: {{name: scim-admin}}}}}}")
}

/// The AWS admin's access key Secret `aws-admin`.
pub fn aws_admin(key: &(String, String)) -> String {
    secret("aws-admin", &format!("{{AWS_ACCESS_KEY_ID: \"{}\", AWS_SECRET_ACCESS_KEY: \"{}\"}}", key.0, key.1))
}

/// `spec.provider` of an awsIam connection to `endpoint`.
pub fn aws_spec(endpoint: &str) -> String {
    format!(
        "{{awsIam: {{region: eu-west-1, endpoint: \"{endpoint}\", path: /keysmith/, credentialsSecretRef: {{name: aws-admin}}}}}}"
    )
}

/// The OAuth 2.0 initial access token's Secret `oauth2-admin`.
pub fn oauth2_admin(token: &str) -> String {
    secret("oauth2-admin", &format!("{{token: \"{token}\"}}"))
}

/// `spec.provider` of an oauth2 connection to the server at `origin`
/// (oidc-provider's endpoints).
pub fn oauth2_spec(origin: &str) -> String {
    format!(
        "{{oauth2: {{registrationEndpoint: \"{origin}/reg\", tokenEndpoint: \"{origin}/token\", introspectionEndpoint: \"{origin}/token/introspection\", initialAccessTokenSecretRef: {{name: oauth2-admin}}}}}}"
    )
}

/// A Role `keysmith-credentials` for the ServiceAccount `keysmith`: `get` on
/// the four credential Secrets, and `extra_rules` (YAML list items, each
/// starting with `\n- `).
pub fn credentials_reader(extra_rules: &str) -> String {
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: keysmith-credentials}}\nrules:\n- {{apiGroups: [\"\"], resources: [secrets], resourceNames: [pg-admin, scim-admin, aws-admin, oauth2-admin], verbs: [get]}}{extra_rules}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: keysmith-credentials}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: keysmith-credentials}}\nsubjects: [{{kind: ServiceAccount, name: keysmith}}]\n---\n"
    )
}
