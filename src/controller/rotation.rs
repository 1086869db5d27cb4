//! The KeyRotationPolicy controller: validates the policy and reports how
//! many accounts use it and when the next of them rotates.

use std::sync::Arc;

use futures::Stream;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    api::{Patch, PatchParams},
    runtime::{controller::Action as Requeue, reflector::ObjectRef, watcher, Controller},
    Api, Resource, ResourceExt,
};
use serde_json::json;

use super::{
    account::now,
    conditions::{merge_conditions, ConditionUpdate},
    stream::{generation, hash_of},
    succeeded, Context, Error, Stores,
};
use crate::{
    api::{condition_types::READY, IntegrationAccount, KeyRotationPolicy, KeyRotationPolicyStatus},
    ownership::FIELD_MANAGER,
    schedule::RotationSchedule,
};

fn account_key(account: &IntegrationAccount) -> u64 {
    hash_of((
        account.uid(),
        &account.spec.rotation_policy_ref,
        account.status.as_ref().and_then(|s| s.next_rotation_at.as_ref()).map(|t| t.0.as_second()),
        account.meta().deletion_timestamp.is_some(),
    ))
}

/// The controller with its triggers.
pub fn controller(
    stores: &Stores,
    policies: impl Stream<Item = watcher::Event<KeyRotationPolicy>> + Send + 'static,
    accounts: impl Stream<Item = watcher::Event<IntegrationAccount>> + Send + 'static,
) -> Controller<KeyRotationPolicy> {
    let policies_store = stores.policies.clone();
    super::controller_for(&stores.policies, policies, generation).watches_stream(
        super::stream::changes(accounts, account_key),
        // Every policy in the account's namespace: one it stopped using must
        // recount too, and namespaces hold few policies.
        move |account| {
            let ns = account.namespace();
            policies_store
                .state()
                .into_iter()
                .filter(|p| p.namespace() == ns)
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        },
    )
}

/// Reconciles one KeyRotationPolicy.
pub async fn reconcile(policy: Arc<KeyRotationPolicy>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let namespace = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    let users: Vec<Arc<IntegrationAccount>> = ctx
        .stores
        .accounts
        .state()
        .into_iter()
        .filter(|a| a.namespace().as_deref() == Some(namespace.as_str()))
        .filter(|a| a.spec.rotation_policy_ref.as_ref().is_some_and(|r| r.name == name))
        .collect();
    let update = match RotationSchedule::from_spec(&policy.spec) {
        Ok(_) => ConditionUpdate::truthy(READY, "Valid", "the policy is valid"),
        Err(problems) => ConditionUpdate::falsy(
            READY,
            "Invalid",
            problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        ),
    };
    let previous = policy.status.clone().unwrap_or_default();
    let mut status = KeyRotationPolicyStatus {
        account_count: i32::try_from(users.len()).unwrap_or(i32::MAX),
        next_rotation_at: users
            .iter()
            .filter_map(|a| a.status.as_ref().and_then(|s| s.next_rotation_at.clone()))
            .min_by_key(|t: &Time| t.0),
        ..previous.clone()
    };
    status.common.conditions =
        merge_conditions(&previous.common.conditions, &[update], policy.meta().generation, &Time(now()));
    status.common.observed_generation = policy.meta().generation;
    if status != previous {
        let api: Api<KeyRotationPolicy> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({"apiVersion": KeyRotationPolicy::api_version(&()), "kind": KeyRotationPolicy::kind(&()), "status": status});
        api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    }
    succeeded(policy.as_ref(), &ctx);
    Ok(Requeue::await_change())
}
