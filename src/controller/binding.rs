//! The RoleBinding controller: checks roles against the connection's policy
//! and reports which are granted. Granting itself is the IntegrationAccount
//! controller's job (one writer per external account).

use std::{collections::BTreeSet, sync::Arc};

use futures::Stream;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    api::{Patch, PatchParams},
    runtime::{controller::Action as Requeue, events::EventType, reflector::ObjectRef, watcher, Controller},
    Api, Resource, ResourceExt,
};
use serde_json::json;

use super::{
    account::now,
    conditions::{merge_conditions, ConditionUpdate},
    observe::resolve_connection,
    stream::{generation, hash_of},
    succeeded, Context, Error, Stores,
};
use crate::{
    api::{
        condition_types::{POLICY_VIOLATION, READY},
        AppConnection, ClusterAppConnection, ConnectionKind, IntegrationAccount, RoleBinding, RoleBindingStatus,
    },
    ownership::FIELD_MANAGER,
    policy::{RolePolicy, Verdict},
    tenancy::ScopePolicy,
};

/// What in an account matters to its bindings: existence, roles held, connection.
fn account_key(account: &IntegrationAccount) -> u64 {
    hash_of((
        account.uid(),
        account.status.as_ref().map(|s| (&s.roles, s.common.observed_generation)),
        &account.spec.connection_ref.name,
        account.meta().deletion_timestamp.is_some(),
    ))
}

/// The controller with its triggers.
pub fn controller(
    stores: &Stores,
    bindings: impl Stream<Item = watcher::Event<RoleBinding>> + Send + 'static,
    accounts: impl Stream<Item = watcher::Event<IntegrationAccount>> + Send + 'static,
    connections: impl Stream<Item = watcher::Event<AppConnection>> + Send + 'static,
    cluster_connections: impl Stream<Item = watcher::Event<ClusterAppConnection>> + Send + 'static,
) -> Controller<RoleBinding> {
    let for_account = stores.bindings.clone();
    let for_connection = (stores.bindings.clone(), stores.accounts.clone());
    let for_cluster_connection = (stores.bindings.clone(), stores.accounts.clone());
    super::controller_for(&stores.bindings, bindings, generation)
        .watches_stream(super::stream::changes(accounts, account_key), move |account| {
            let ns = account.namespace();
            let name = account.name_any();
            for_account
                .state()
                .into_iter()
                .filter(|b| b.namespace() == ns && b.spec.account_ref.name == name)
                .map(|b| ObjectRef::from_obj(b.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(super::stream::changes(connections, generation), move |connection| {
            let (bindings, accounts) = &for_connection;
            let ns = connection.namespace();
            let name = connection.name_any();
            bindings_of_accounts(bindings, accounts, |a| {
                a.namespace() == ns
                    && a.spec.connection_ref.kind == ConnectionKind::AppConnection
                    && a.spec.connection_ref.name == name
            })
        })
        .watches_stream(super::stream::changes(cluster_connections, generation), move |connection| {
            let (bindings, accounts) = &for_cluster_connection;
            let name = connection.name_any();
            bindings_of_accounts(bindings, accounts, |a| {
                a.spec.connection_ref.kind == ConnectionKind::ClusterAppConnection && a.spec.connection_ref.name == name
            })
        })
}

fn bindings_of_accounts(
    bindings: &kube::runtime::reflector::Store<RoleBinding>,
    accounts: &kube::runtime::reflector::Store<IntegrationAccount>,
    pick: impl Fn(&IntegrationAccount) -> bool,
) -> Vec<ObjectRef<RoleBinding>> {
    let chosen: BTreeSet<(Option<String>, String)> =
        accounts.state().iter().filter(|a| pick(a)).map(|a| (a.namespace(), a.name_any())).collect();
    bindings
        .state()
        .iter()
        .filter(|b| chosen.contains(&(b.namespace(), b.spec.account_ref.name.clone())))
        .map(|b| ObjectRef::from_obj(b.as_ref()))
        .collect()
}

/// Reconciles one RoleBinding.
pub async fn reconcile(binding: Arc<RoleBinding>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    if binding.meta().deletion_timestamp.is_some() {
        return Ok(Requeue::await_change());
    }
    let namespace = binding.namespace().unwrap_or_default();
    let account = ctx.stores.accounts.get(&ObjectRef::new(&binding.spec.account_ref.name).within(&namespace));
    let mut updates = Vec::new();
    let mut granted = Vec::new();
    let mut denied = Vec::new();
    match account {
        None => updates.push(ConditionUpdate::falsy(
            READY,
            "AccountNotFound",
            format!("IntegrationAccount {namespace}/{} does not exist", binding.spec.account_ref.name),
        )),
        // Until the account has acted on its current spec, whatever this
        // binding reported would change again in a moment: wait for it (its
        // status update retriggers this binding).
        Some(account)
            if account.status.as_ref().and_then(|s| s.common.observed_generation) != account.metadata.generation =>
        {
            return Ok(Requeue::await_change());
        }
        Some(account) => match resolve_connection(&account, ctx.as_ref()).await? {
            Err(problem) => updates.push(ConditionUpdate::falsy(READY, problem.reason, problem.message)),
            Ok(connection) => {
                let policy = RolePolicy::for_connection(connection.kind, connection.spec.policy.as_ref());
                let scopes = ScopePolicy::new(connection.spec.policy.as_ref(), &namespace);
                let scope_refused = binding
                    .spec
                    .scope
                    .as_deref()
                    .filter(|s| !s.is_empty() && !scopes.allows(s))
                    .map(|s| scopes.refusal(s));
                let mut violations = Vec::new();
                for role in &binding.spec.roles {
                    if let Some(refusal) = &scope_refused {
                        denied.push(role.clone());
                        violations.push(format!("{role} ({refusal})"));
                        continue;
                    }
                    match policy.check(role) {
                        Verdict::Allowed => {}
                        Verdict::NoneAllowed => {
                            denied.push(role.clone());
                            violations.push(format!(
                                "{role} (a ClusterAppConnection grants no role until its policy.allowedRoles names some)"
                            ));
                        }
                        Verdict::Denied { pattern } => {
                            denied.push(role.clone());
                            violations.push(format!("{role} (denied by {pattern:?})"));
                        }
                        Verdict::NotAllowed => {
                            denied.push(role.clone());
                            violations.push(format!("{role} (not in allowedRoles)"));
                        }
                    }
                }
                let held: BTreeSet<String> = account
                    .status
                    .as_ref()
                    .map(|s| s.roles.iter().map(|r| r.role.clone()).collect())
                    .unwrap_or_default();
                granted =
                    binding.spec.roles.iter().filter(|r| held.contains(*r) && !denied.contains(r)).cloned().collect();
                if violations.is_empty() {
                    updates.push(ConditionUpdate::falsy(
                        POLICY_VIOLATION,
                        "NoViolation",
                        "every role is allowed by the connection's policy",
                    ));
                } else {
                    let message = format!(
                        "{} {} never granted: {}",
                        connection.display(),
                        if violations.len() == 1 { "policy: this role is" } else { "policy: these roles are" },
                        violations.join(", ")
                    );
                    let already = binding.status.as_ref().is_some_and(|s| {
                        s.common
                            .conditions
                            .iter()
                            .any(|c| c.type_ == POLICY_VIOLATION && c.status == "True" && c.message == message)
                    });
                    if !already {
                        ctx.event(
                            binding.as_ref(),
                            EventType::Warning,
                            "PolicyViolation",
                            "CheckPolicy",
                            message.clone(),
                        )
                        .await;
                    }
                    updates.push(ConditionUpdate::truthy(POLICY_VIOLATION, "RoleDenied", message));
                }
                let pending: Vec<&String> =
                    binding.spec.roles.iter().filter(|r| !denied.contains(r) && !granted.contains(r)).collect();
                updates.push(match (denied.is_empty(), pending.is_empty()) {
                    (false, _) => ConditionUpdate::falsy(
                        READY,
                        "PolicyViolation",
                        "some roles are denied by the connection's policy",
                    ),
                    (true, true) => ConditionUpdate::truthy(READY, "Granted", "every role is granted"),
                    (true, false) => ConditionUpdate::falsy(
                        READY,
                        "Pending",
                        format!(
                            "not granted yet: {}",
                            pending.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    ),
                });
            }
        },
    }
    let previous = binding.status.clone().unwrap_or_default();
    let mut status = RoleBindingStatus { granted_roles: granted, denied_roles: denied, ..previous.clone() };
    status.common.conditions =
        merge_conditions(&previous.common.conditions, &updates, binding.meta().generation, &Time(now()));
    status.common.observed_generation = binding.meta().generation;
    if status != previous {
        let api: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch =
            json!({"apiVersion": RoleBinding::api_version(&()), "kind": RoleBinding::kind(&()), "status": status});
        api.patch_status(&binding.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
            .await?;
    }
    succeeded(binding.as_ref(), &ctx);
    Ok(Requeue::await_change())
}
