//! Who keysmith acts as for a connection, and what a connection lets a
//! tenant reach.
//!
//! keysmith holds powerful rights (binding ClusterRoles, minting tokens,
//! reading Secrets anywhere), so it must never act on a namespace tenant's
//! word with them: that would make it a confused deputy. The model is
//! Flux's multi-tenancy lockdown and cert-manager's Issuer/ClusterIssuer
//! split:
//!
//! - An `AppConnection` is written by a namespace tenant. keysmith acts for it
//!   as a ServiceAccount of that namespace (`spec.serviceAccountName`, or the
//!   operator's `--default-service-account`), by impersonation, so the
//!   apiserver's RBAC and its escalation prevention decide what happens.
//!   Without one it does nothing.
//! - A `ClusterAppConnection` is written by a cluster admin. keysmith acts
//!   with its own rights, and the connection's policy (admitted namespaces,
//!   allowed roles, allowed scopes, the naming of accounts) is all that lets
//!   a tenant reach beyond its namespace.

use std::collections::BTreeSet;

use crate::api::{ConnectionKind, ConnectionPolicy};
use crate::policy::Glob;

/// The identity keysmith uses towards this cluster's apiserver for a
/// connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// keysmith's own (ClusterAppConnections only).
    Operator,
    /// A ServiceAccount of the AppConnection's namespace, impersonated.
    ServiceAccount {
        /// Its namespace: the connection's own.
        namespace: String,
        /// Its name.
        name: String,
    },
}

impl Identity {
    /// The username to impersonate, if any.
    pub fn impersonate(&self) -> Option<String> {
        match self {
            Identity::Operator => None,
            Identity::ServiceAccount { namespace, name } => Some(format!("system:serviceaccount:{namespace}:{name}")),
        }
    }

    /// Where the identity lives, for messages and checks.
    pub fn namespace(&self) -> Option<&str> {
        match self {
            Identity::Operator => None,
            Identity::ServiceAccount { namespace, .. } => Some(namespace),
        }
    }

    /// For messages: `keysmith's own identity` or `ServiceAccount ns/name`.
    pub fn describe(&self) -> String {
        match self {
            Identity::Operator => "keysmith's own identity".to_owned(),
            Identity::ServiceAccount { namespace, name } => format!("ServiceAccount {namespace}/{name}"),
        }
    }
}

/// Why a connection cannot be used: a condition reason and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionProblem {
    /// CamelCase.
    pub reason: &'static str,
    /// For users.
    pub message: String,
}

/// The operator-wide tenancy settings a cluster admin chooses with flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tenancy {
    /// The ServiceAccount an AppConnection acts as when it names none
    /// (`--default-service-account`).
    pub default_service_account: Option<String>,
    /// Providers AppConnections may not use (`--deny-namespaced-provider`):
    /// only ClusterAppConnections, written by cluster admins, may.
    pub denied_namespaced_providers: BTreeSet<String>,
}

impl Tenancy {
    /// Who keysmith acts as for a connection of `kind` in `namespace`
    /// (AppConnections) selecting `provider`, naming `service_account`.
    pub fn identity(
        &self,
        kind: ConnectionKind,
        name: &str,
        namespace: Option<&str>,
        provider: Option<&str>,
        service_account: Option<&str>,
    ) -> Result<Identity, ConnectionProblem> {
        match kind {
            ConnectionKind::ClusterAppConnection => Ok(Identity::Operator),
            ConnectionKind::AppConnection => {
                let namespace = namespace.unwrap_or_default();
                if let Some(provider) = provider.filter(|p| self.denied_namespaced_providers.contains(*p)) {
                    return Err(ConnectionProblem {
                        reason: "ProviderNotAllowed",
                        message: format!(
                            "AppConnection {namespace}/{name}: this keysmith installation does not let AppConnections use the {provider} provider; ask a cluster admin for a ClusterAppConnection"
                        ),
                    });
                }
                let chosen = service_account
                    .filter(|s| !s.is_empty())
                    .or(self.default_service_account.as_deref().filter(|s| !s.is_empty()));
                match chosen {
                    Some(sa) => Ok(Identity::ServiceAccount { namespace: namespace.to_owned(), name: sa.to_owned() }),
                    None => Err(ConnectionProblem {
                        reason: "ServiceAccountRequired",
                        message: format!(
                            "AppConnection {namespace}/{name} names no spec.serviceAccountName: keysmith acts for an AppConnection only as a ServiceAccount of its namespace, so that the apiserver's RBAC decides what it may do; nothing is changed in the target app (and no issued key is revoked) until one is named"
                        ),
                    }),
                }
            }
        }
    }
}

/// The scope that means "cluster-wide".
pub const CLUSTER_SCOPE: &str = "*";

/// Where a connection's roles may take effect: the account's own namespace,
/// plus the globs of `policy.allowedScopes` (`*` alone also allowing
/// cluster-wide grants).
#[derive(Debug, Clone)]
pub struct ScopePolicy {
    own: String,
    allowed: Vec<Glob>,
}

impl ScopePolicy {
    /// The policy for an account in `own_namespace`.
    pub fn new(policy: Option<&ConnectionPolicy>, own_namespace: &str) -> Self {
        let allowed = policy.map(|p| p.allowed_scopes.iter().map(|s| Glob::new(s)).collect()).unwrap_or_default();
        Self { own: own_namespace.to_owned(), allowed }
    }

    /// Whether a grant may take effect on `scope` (a namespace, or `*`).
    pub fn allows(&self, scope: &str) -> bool {
        if scope == self.own {
            return true;
        }
        if scope == CLUSTER_SCOPE {
            return self.allowed.iter().any(|g| g.as_str() == CLUSTER_SCOPE);
        }
        self.allowed.iter().any(|g| g.matches(scope))
    }

    /// Why `scope` is refused, for conditions and events.
    pub fn refusal(&self, scope: &str) -> String {
        if scope == CLUSTER_SCOPE {
            format!(
                "cluster-wide scope \"*\" is not in the connection's policy.allowedScopes (only the account's namespace {}{})",
                self.own,
                self.listed()
            )
        } else {
            format!(
                "scope {scope:?} is not allowed by the connection's policy.allowedScopes (the account's namespace {}{})",
                self.own,
                self.listed()
            )
        }
    }

    fn listed(&self) -> String {
        if self.allowed.is_empty() {
            String::new()
        } else {
            let list: Vec<&str> = self.allowed.iter().map(Glob::as_str).collect();
            format!(", and {}", list.join(", "))
        }
    }
}

/// The default account name template of a ClusterAppConnection.
pub const DEFAULT_NAME_TEMPLATE: &str = "{namespace}.{name}";

/// The account name `template` gives an IntegrationAccount in `namespace`
/// whose own name (or `providerOptions.name`) is `name`.
pub fn account_name(template: &str, namespace: &str, name: &str) -> String {
    // One pass, so a name containing "{namespace}" is taken literally.
    let mut out = String::with_capacity(template.len() + namespace.len() + name.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        if let Some(after) = tail.strip_prefix("{namespace}") {
            out.push_str(namespace);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{name}") {
            out.push_str(name);
            rest = after;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(allowed: &[&str]) -> ScopePolicy {
        let policy = ConnectionPolicy {
            allowed_scopes: allowed.iter().map(|s| s.to_string()).collect(),
            ..ConnectionPolicy::default()
        };
        ScopePolicy::new(Some(&policy), "team-a")
    }

    #[test]
    fn only_the_own_namespace_by_default() {
        let p = ScopePolicy::new(None, "team-a");
        assert!(p.allows("team-a"));
        assert!(!p.allows("team-b"));
        assert!(!p.allows("kube-system"));
        assert!(!p.allows("*"));
        assert!(!p.allows(""));
        assert!(p.refusal("*").contains("cluster-wide"));
    }

    #[test]
    fn globs_name_namespaces_and_only_a_lone_star_allows_cluster_scope() {
        let p = scopes(&["team-a-*", "shared"]);
        assert!(p.allows("team-a-dev"));
        assert!(p.allows("shared"));
        assert!(!p.allows("team-b"));
        assert!(!p.allows("*"), "a glob that matches \"*\" as text is not cluster scope");
        assert!(!scopes(&["?"]).allows("*"));
        assert!(!scopes(&["**"]).allows("*"));
        let all = scopes(&["*"]);
        assert!(all.allows("*"));
        assert!(all.allows("kube-system"));
    }

    #[test]
    fn names_follow_the_template_in_one_pass() {
        assert_eq!(account_name(DEFAULT_NAME_TEMPLATE, "team-a", "billing"), "team-a.billing");
        assert_eq!(account_name("{name}", "team-a", "billing"), "billing");
        assert_eq!(account_name("int-{namespace}-{name}", "a", "b"), "int-a-b");
        assert_eq!(account_name("{namespace}.{name}", "a", "{namespace}"), "a.{namespace}");
        assert_eq!(account_name("x{y}{name}", "a", "b"), "x{y}b");
        // Namespaces have no dot, so the default keeps tenants apart.
        assert_ne!(account_name(DEFAULT_NAME_TEMPLATE, "a", "b.c"), account_name(DEFAULT_NAME_TEMPLATE, "a-b", "c"));
    }

    #[test]
    fn an_app_connection_needs_a_service_account() {
        let tenancy = Tenancy::default();
        let problem = tenancy
            .identity(ConnectionKind::AppConnection, "c", Some("team-a"), Some("kubernetes"), None)
            .expect_err("no ServiceAccount");
        assert_eq!(problem.reason, "ServiceAccountRequired");
        assert_eq!(
            tenancy.identity(ConnectionKind::AppConnection, "c", Some("team-a"), Some("scim"), Some("keysmith")),
            Ok(Identity::ServiceAccount { namespace: "team-a".into(), name: "keysmith".into() })
        );
        assert_eq!(
            tenancy.identity(ConnectionKind::ClusterAppConnection, "c", None, Some("kubernetes"), None),
            Ok(Identity::Operator)
        );
        let defaulted = Tenancy { default_service_account: Some("robot".into()), ..Tenancy::default() };
        assert_eq!(
            defaulted.identity(ConnectionKind::AppConnection, "c", Some("a"), None, None),
            Ok(Identity::ServiceAccount { namespace: "a".into(), name: "robot".into() })
        );
        let locked = Tenancy {
            denied_namespaced_providers: ["kubernetes".to_owned()].into_iter().collect(),
            ..Tenancy::default()
        };
        let refused = locked
            .identity(ConnectionKind::AppConnection, "c", Some("a"), Some("kubernetes"), Some("keysmith"))
            .expect_err("refused");
        assert_eq!(refused.reason, "ProviderNotAllowed");
        assert!(locked.identity(ConnectionKind::ClusterAppConnection, "c", None, Some("kubernetes"), None).is_ok());
        assert_eq!(
            Identity::ServiceAccount { namespace: "a".into(), name: "b".into() }.impersonate().as_deref(),
            Some("system:serviceaccount:a:b")
        );
    }
}
