//! The command-line tools for platform engineers: `rotate`, `inventory` and
//! `plan`. The same binary works as a kubectl plugin when installed as
//! `kubectl-keysmith` (`kubectl keysmith inventory`).

use std::{collections::BTreeMap, io::Write, path::Path, sync::Arc, time::Duration};

use k8s_openapi::{
    api::core::v1::{Namespace, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use anyhow::{bail, Context as _};
use jiff::Timestamp;
use kube::{
    api::{ListParams, Patch, PatchParams},
    core::DynamicObject,
    Api, Client, ResourceExt,
};
use serde::Serialize;
use serde_json::json;

use crate::{
    api::{
        condition_types::READY, AppConnection, ClusterAppConnection, ConnectionKind, IntegrationAccount,
        KeyRotationPolicy, RoleBinding,
    },
    controller::{
        account::{now, ROTATE_NOW_ANNOTATION},
        observe::{self, Halt, Source},
        plan::{self, Action},
        Error,
    },
    provider::{Provider, ProviderError, ProviderRegistry, ResolvedConnection},
};

/// Splits `NAMESPACE/NAME`.
pub fn parse_target(target: &str) -> anyhow::Result<(String, String)> {
    match target.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => bail!("expected NAMESPACE/NAME, got {target:?}"),
    }
}

/// `keysmith rotate NAMESPACE/NAME`: asks for a rotation and follows it
/// until the new key is published.
pub async fn rotate(client: Client, target: &str, timeout: Duration, out: &mut impl Write) -> anyhow::Result<()> {
    let (namespace, name) = parse_target(target)?;
    let api: Api<IntegrationAccount> = Api::namespaced(client, &namespace);
    let before =
        api.get_opt(&name).await?.with_context(|| format!("IntegrationAccount {namespace}/{name} does not exist"))?;
    let previous = before.status.as_ref().and_then(|s| s.current_key.as_ref()).map(|k| k.id.clone());
    let request = Timestamp::now().to_string();
    let patch = json!({"metadata": {"annotations": {ROTATE_NOW_ANNOTATION: request}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    writeln!(out, "rotation of {namespace}/{name} requested")?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_line = String::new();
    loop {
        let account = api.get(&name).await?;
        let status = account.status.clone().unwrap_or_default();
        let done = status.last_rotation_request.as_deref() == Some(request.as_str());
        let line = match (&status.current_key, done) {
            (Some(key), true) => format!("new key {} published in Secret {}", key.id, account.spec.secret.name),
            _ => {
                let key_ready = status.common.conditions.iter().find(|c| c.type_ == "KeyReady");
                match key_ready {
                    Some(c) if c.status == "False" => format!("waiting: {} ({})", c.message, c.reason),
                    _ => "waiting for keysmith to issue, verify and publish a new key".to_owned(),
                }
            }
        };
        if line != last_line {
            writeln!(out, "{line}")?;
            last_line = line;
        }
        if done {
            if let Some(old) = previous.and_then(|id| status.keys.iter().find(|k| k.id == id).cloned()) {
                match old.revoke_at {
                    Some(at) => writeln!(out, "previous key {} stays valid until {}", old.id, at.0)?,
                    None => writeln!(out, "previous key {} is {:?}", old.id, old.state)?,
                }
            }
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the rotation of {namespace}/{name} did not finish within {timeout:?}; see `kubectl describe ia -n {namespace} {name}`");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One row of the inventory.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InventoryRow {
    /// The IntegrationAccount's namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// `Kind/name` of its connection.
    pub connection: String,
    /// The provider, once keysmith has created the account.
    pub provider: Option<String>,
    /// The roles it holds (`role` or `role@scope`).
    pub roles: Vec<String>,
    /// Seconds since the live key was issued.
    pub key_age_seconds: Option<i64>,
    /// When the key next rotates.
    pub next_rotation: Option<String>,
    /// The Ready condition's status.
    pub ready: String,
    /// The Ready condition's reason.
    pub reason: Option<String>,
}

/// Every IntegrationAccount (in `namespace`, or all), as rows.
pub async fn inventory(client: Client, namespace: Option<&str>) -> anyhow::Result<Vec<InventoryRow>> {
    let api: Api<IntegrationAccount> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let now = Timestamp::now();
    let mut rows: Vec<InventoryRow> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|account| {
            let status = account.status.clone().unwrap_or_default();
            let ready = status.common.conditions.iter().find(|c| c.type_ == READY);
            InventoryRow {
                namespace: account.namespace().unwrap_or_default(),
                name: account.name_any(),
                connection: format!("{:?}/{}", account.spec.connection_ref.kind, account.spec.connection_ref.name),
                provider: status.account.as_ref().map(|a| a.provider.clone()),
                roles: status
                    .roles
                    .iter()
                    .map(|r| match &r.scope {
                        Some(scope) => format!("{}@{}", r.role, scope),
                        None => r.role.clone(),
                    })
                    .collect(),
                key_age_seconds: status.current_key.as_ref().map(|k| now.as_second() - k.issued_at.0.as_second()),
                next_rotation: status.next_rotation_at.as_ref().map(|t| t.0.to_string()),
                ready: ready.map_or_else(|| "Unknown".to_owned(), |c| c.status.clone()),
                reason: ready.map(|c| c.reason.clone()),
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(rows)
}

/// Renders rows as an aligned table.
pub fn inventory_table(rows: &[InventoryRow]) -> String {
    let header = ["NAMESPACE", "NAME", "CONNECTION", "PROVIDER", "ROLES", "KEY AGE", "NEXT ROTATION", "READY"];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| (*s).to_owned()).collect()];
    for row in rows {
        table.push(vec![
            row.namespace.clone(),
            row.name.clone(),
            row.connection.clone(),
            row.provider.clone().unwrap_or_else(|| "-".into()),
            if row.roles.is_empty() { "-".into() } else { row.roles.join(",") },
            row.key_age_seconds.map_or_else(|| "-".into(), human_age),
            row.next_rotation.clone().unwrap_or_else(|| "-".into()),
            match &row.reason {
                Some(reason) if row.ready != "True" => format!("{} ({reason})", row.ready),
                _ => row.ready.clone(),
            },
        ]);
    }
    let widths: Vec<usize> =
        (0..header.len()).map(|i| table.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in table {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// `90` → `90s`, `7200` → `2h`, `200000` → `2d7h`.
pub fn human_age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// What `keysmith plan` found for one IntegrationAccount.
#[derive(Debug, Serialize)]
pub struct AccountPlan {
    /// `namespace/name`.
    pub account: String,
    /// What would change in the target app, in words.
    pub changes: Vec<String>,
    /// Roles the connection's policy refuses.
    pub denied: Vec<String>,
    /// Why nothing can be planned, if so.
    pub problem: Option<String>,
}

/// `keysmith plan -f FILE`: what applying the manifests would change in the
/// target apps, computed from the cluster's current state and the target
/// apps' (read-only calls), without changing anything. It observes through
/// the operator's own observe step ([`observe::gather`]), from the
/// apiserver with the file laid over it.
pub async fn plan(client: Client, config: kube::Config, file: &Path) -> anyhow::Result<Vec<AccountPlan>> {
    let objects = crate::manifest::read(file)?;
    let default_ns = config.default_namespace.clone();
    let of_kind = |kind: &str| -> Vec<DynamicObject> {
        objects.iter().filter(|o| o.types.as_ref().is_some_and(|t| t.kind == kind)).cloned().collect()
    };
    let typed = |o: DynamicObject| -> anyhow::Result<serde_json::Value> {
        let mut value = serde_json::to_value(o)?;
        if value["metadata"]["namespace"].is_null() {
            value["metadata"]["namespace"] = json!(default_ns);
        }
        Ok(value)
    };
    let accounts: Vec<IntegrationAccount> = of_kind("IntegrationAccount")
        .into_iter()
        .map(|o| Ok(serde_json::from_value(typed(o)?)?))
        .collect::<anyhow::Result<_>>()
        .context("an IntegrationAccount in the file does not match the schema")?;
    let bindings: Vec<RoleBinding> = of_kind("RoleBinding")
        .into_iter()
        .filter(|o| o.types.as_ref().is_some_and(|t| t.api_version.starts_with("keysmith.dev/")))
        .map(|o| Ok(serde_json::from_value(typed(o)?)?))
        .collect::<anyhow::Result<_>>()
        .context("a RoleBinding in the file does not match the schema")?;
    let policies: Vec<KeyRotationPolicy> = of_kind("KeyRotationPolicy")
        .into_iter()
        .map(|o| Ok(serde_json::from_value(typed(o)?)?))
        .collect::<anyhow::Result<_>>()?;
    let connections: Vec<AppConnection> = of_kind("AppConnection")
        .into_iter()
        .map(|o| Ok(serde_json::from_value(typed(o)?)?))
        .collect::<anyhow::Result<_>>()?;
    let cluster_connections: Vec<String> = of_kind("ClusterAppConnection").iter().map(|o| o.name_any()).collect();
    if accounts.is_empty() {
        bail!("{} holds no IntegrationAccount to plan", file.display());
    }
    let source = PlanSource {
        registry: ProviderRegistry::new(client.clone(), config),
        client: client.clone(),
        bindings,
        policies,
        connections,
    };
    let mut plans = Vec::new();
    for account in accounts {
        let ns = account.namespace().unwrap_or_default();
        let name = account.name_any();
        let existing = Api::<IntegrationAccount>::namespaced(client.clone(), &ns).get_opt(&name).await?;
        // The live object carries the uid and status keysmith uses.
        let mut account = account;
        if let Some(live) = &existing {
            account.metadata.uid = live.metadata.uid.clone();
            account.status = live.status.clone();
        }
        let mut result =
            AccountPlan { account: format!("{ns}/{name}"), changes: vec![], denied: vec![], problem: None };
        let gathered = match observe::gather(&account, &source).await? {
            Ok(gathered) => gathered,
            Err(halt) => {
                result.problem = Some(match halt {
                    Halt::Problem(problem) => {
                        let reference = &account.spec.connection_ref;
                        let only_in_file = problem.reason == "ConnectionNotFound"
                            && reference.kind == ConnectionKind::ClusterAppConnection
                            && cluster_connections.contains(&reference.name);
                        // Only as a cluster admin applied it: a file's
                        // ClusterAppConnection would have plan read any Secret
                        // it names, with the credentials of whoever runs it,
                        // and send it wherever the file says.
                        if only_in_file {
                            format!(
                                "ClusterAppConnection {} is only in the file: keysmith plan uses ClusterAppConnections as they are in the cluster",
                                reference.name
                            )
                        } else {
                            problem.message
                        }
                    }
                    Halt::Suspended => "spec.suspend is true: keysmith makes no changes in the target app".to_owned(),
                    Halt::Provider(error) => error.to_string(),
                });
                plans.push(result);
                continue;
            }
        };
        result.denied = gathered.denied.clone();
        if let Some(problem) = &gathered.policy_problem {
            result.problem = Some(problem.message.clone());
            plans.push(result);
            continue;
        }
        if gathered.secret.foreign {
            result.problem = Some(format!(
                "Secret {ns}/{} exists and is not keysmith's; keysmith will not write it",
                account.spec.secret.name
            ));
        }
        let target =
            observe::observe_target(gathered.provider.as_ref(), &gathered.request).await.map_err(|(_, error)| error)?;
        let mut status = account.status.clone().unwrap_or_default();
        let at = now();
        let reactivate = account.annotations().get(crate::controller::dormancy::REACTIVATE_ANNOTATION);
        crate::controller::dormancy::reactivate(&mut status, reactivate.map(String::as_str), at);
        if gathered.provider.capabilities().last_use_lag.is_some() {
            crate::controller::dormancy::record_use(&mut status, &target.keys);
        }
        let decided = plan::plan(&observe::plan_input(at, &account, &status, &gathered, &target, None, None));
        if let Some(blocked) = decided.blocked {
            result.problem = Some(blocked);
        }
        let provider = gathered.provider.name();
        result.changes = decided.actions.iter().map(|a| describe(a, provider, &gathered.request.name)).collect();
        plans.push(result);
    }
    Ok(plans)
}

/// Where `keysmith plan` observes: the apiserver, with the file's
/// AppConnections, RoleBindings and KeyRotationPolicies laid over it.
/// ClusterAppConnections come from the cluster only.
struct PlanSource {
    registry: ProviderRegistry,
    client: Client,
    bindings: Vec<RoleBinding>,
    policies: Vec<KeyRotationPolicy>,
    connections: Vec<AppConnection>,
}

fn in_file<'a, K: ResourceExt>(objects: &'a [K], namespace: &str, name: &str) -> Option<&'a K> {
    objects.iter().find(|o| o.name_any() == name && o.namespace().as_deref() == Some(namespace))
}

#[async_trait::async_trait]
impl Source for PlanSource {
    fn tenancy(&self) -> &crate::tenancy::Tenancy {
        self.registry.tenancy()
    }

    async fn app_connection(&self, namespace: &str, name: &str) -> Result<Option<Arc<AppConnection>>, Error> {
        Ok(match in_file(&self.connections, namespace, name) {
            Some(c) => Some(Arc::new(c.clone())),
            None => Api::<AppConnection>::namespaced(self.client.clone(), namespace).get_opt(name).await?.map(Arc::new),
        })
    }

    async fn cluster_connection(&self, name: &str) -> Result<Option<Arc<ClusterAppConnection>>, Error> {
        Ok(Api::<ClusterAppConnection>::all(self.client.clone()).get_opt(name).await?.map(Arc::new))
    }

    async fn namespace_labels(&self, namespace: &str) -> Result<Option<BTreeMap<String, String>>, Error> {
        let ns = Api::<Namespace>::all(self.client.clone()).get_metadata_opt(namespace).await?;
        Ok(ns.map(|ns| ns.labels().clone()))
    }

    async fn provider(&self, connection: &ResolvedConnection) -> Result<Arc<dyn Provider>, ProviderError> {
        self.registry.provider_for(connection).await
    }

    async fn rotation_policy(&self, namespace: &str, name: &str) -> Result<Option<Arc<KeyRotationPolicy>>, Error> {
        Ok(match in_file(&self.policies, namespace, name) {
            Some(p) => Some(Arc::new(p.clone())),
            None => {
                Api::<KeyRotationPolicy>::namespaced(self.client.clone(), namespace).get_opt(name).await?.map(Arc::new)
            }
        })
    }

    async fn secret(&self, namespace: &str, name: &str) -> Result<Option<ObjectMeta>, Error> {
        let api = Api::<Secret>::namespaced(self.client.clone(), namespace);
        Ok(api.get_metadata_opt(name).await?.map(|m| m.metadata))
    }

    /// The cluster's, with the file's replacing same-named ones.
    async fn bindings(&self, namespace: &str) -> Result<Vec<Arc<RoleBinding>>, Error> {
        let mut bindings: BTreeMap<String, RoleBinding> =
            Api::<RoleBinding>::namespaced(self.client.clone(), namespace)
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .map(|b| (b.name_any(), b))
                .collect();
        for b in self.bindings.iter().filter(|b| b.namespace().as_deref() == Some(namespace)) {
            bindings.insert(b.name_any(), b.clone());
        }
        Ok(bindings.into_values().map(Arc::new).collect())
    }
}

fn describe(action: &Action, provider: &str, account: &str) -> String {
    match action {
        Action::CreateAccount => format!("+ create {provider} account {account}"),
        Action::UpdateAccount => format!("~ update {provider} account {account} (description, owner or state)"),
        Action::DisableAccount => format!("~ disable {provider} account {account} (dormant)"),
        Action::Grant(grant) => format!("+ grant {grant}"),
        Action::Revoke(grant) => format!("- revoke {grant}"),
        Action::RevokeKey { id, reason } => format!("- revoke key {id} ({})", reason.as_str()),
        Action::AdoptPublished { id } | Action::AdoptPublishedAs { id, .. } => {
            format!("~ record key {id}, already in the Secret, as published")
        }
        Action::Publish { id } => format!("~ publish key {id}, issued earlier"),
        Action::Rotate { reason, .. } => format!("+ issue and publish a new key ({})", reason.as_str()),
    }
}

/// Renders plans for people.
pub fn plan_text(plans: &[AccountPlan]) -> String {
    let mut out = String::new();
    for p in plans {
        out.push_str(&format!("IntegrationAccount {}:\n", p.account));
        if let Some(problem) = &p.problem {
            out.push_str(&format!("  ! {problem}\n"));
        }
        for role in &p.denied {
            out.push_str(&format!("  ! role {role} is denied by the connection's policy and will not be granted\n"));
        }
        if p.changes.is_empty() && p.problem.is_none() {
            out.push_str("  no changes\n");
        }
        for change in &p.changes {
            out.push_str(&format!("  {change}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_or_say_what_is_expected() {
        assert_eq!(parse_target("payments/billing").unwrap(), ("payments".into(), "billing".into()));
        for bad in ["billing", "/billing", "payments/", "a/b/c"] {
            assert!(parse_target(bad).unwrap_err().to_string().contains("NAMESPACE/NAME"), "{bad}");
        }
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_age(5), "5s");
        assert_eq!(human_age(600), "10m");
        assert_eq!(human_age(7200), "2h");
        assert_eq!(human_age(200_000), "2d7h");
        assert_eq!(human_age(-3), "0s");
    }

    #[test]
    fn table_is_aligned_and_says_why_not_ready() {
        let rows = vec![InventoryRow {
            namespace: "pay".into(),
            name: "billing".into(),
            connection: "AppConnection/c".into(),
            provider: Some("kubernetes".into()),
            roles: vec!["view@pay".into()],
            key_age_seconds: Some(90),
            next_rotation: None,
            ready: "False".into(),
            reason: Some("PolicyViolation".into()),
        }];
        let table = inventory_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE   NAME"));
        assert_eq!(lines[0].find("CONNECTION"), lines[1].find("AppConnection"));
        assert!(lines[1].contains("False (PolicyViolation)"));
        assert!(lines[1].contains("90s"));
    }
}
