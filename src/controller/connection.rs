//! The AppConnection and ClusterAppConnection controllers: check that the
//! admin credential works and say which provider a connection selects.

use std::{sync::Arc, time::Duration};

use futures::Stream;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    api::{Patch, PatchParams},
    runtime::{controller::Action as Requeue, events::EventType, watcher, Controller},
    Api, Resource, ResourceExt,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::json;

use super::{
    account::now,
    conditions::{merge_conditions, ConditionUpdate},
    stream::generation,
    succeeded, Context, Error, Stores,
};
use crate::{
    api::{condition_types::READY, AppConnection, AppConnectionStatus, ClusterAppConnection},
    ownership::FIELD_MANAGER,
    provider::{ProviderError, ResolvedConnection},
    tenancy::ConnectionProblem,
};

/// How often a working credential is checked again.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(300);

/// The AppConnection controller.
pub fn namespaced_controller(
    stores: &Stores,
    events: impl Stream<Item = watcher::Event<AppConnection>> + Send + 'static,
) -> Controller<AppConnection> {
    super::controller_for(&stores.connections, events, generation)
}

/// The ClusterAppConnection controller.
pub fn cluster_controller(
    stores: &Stores,
    events: impl Stream<Item = watcher::Event<ClusterAppConnection>> + Send + 'static,
) -> Controller<ClusterAppConnection> {
    super::controller_for(&stores.cluster_connections, events, generation)
}

/// Reconciles one AppConnection.
pub async fn reconcile_namespaced(connection: Arc<AppConnection>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let resolved = ResolvedConnection::namespaced(connection.as_ref(), ctx.providers.tenancy());
    let api: Api<AppConnection> = Api::namespaced(ctx.client.clone(), &connection.namespace().unwrap_or_default());
    let provider = connection.spec.connection.provider.selected();
    check(connection.as_ref(), connection.status.clone(), resolved, provider, &api, &ctx).await
}

/// Reconciles one ClusterAppConnection.
pub async fn reconcile_cluster(connection: Arc<ClusterAppConnection>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let resolved = ResolvedConnection::cluster(connection.as_ref());
    let api: Api<ClusterAppConnection> = Api::all(ctx.client.clone());
    let provider = connection.spec.connection.provider.selected();
    check(connection.as_ref(), connection.status.clone(), Ok(resolved), provider, &api, &ctx).await
}

async fn check<K>(
    obj: &K,
    previous: Option<AppConnectionStatus>,
    resolved: Result<ResolvedConnection, ConnectionProblem>,
    provider: Option<&str>,
    api: &Api<K>,
    ctx: &Context,
) -> Result<Requeue, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    if obj.meta().deletion_timestamp.is_some() {
        return Ok(Requeue::await_change());
    }
    let (update, next) = match &resolved {
        // A connection keysmith may not act for waits for a change of it.
        Err(problem) => {
            (ConditionUpdate::falsy(READY, problem.reason, problem.message.clone()), Requeue::await_change())
        }
        Ok(resolved) => {
            let outcome = match ctx.providers.check_identity(&resolved.identity).await {
                Ok(()) => match ctx.providers.provider_for_annotated(resolved, obj.annotations()).await {
                    Ok(provider) => provider.verify_connection().await,
                    Err(error) => Err(error),
                },
                Err(error) => Err(error),
            };
            match outcome {
                Ok(()) => (
                    ConditionUpdate::truthy(READY, "Verified", "the admin credential works"),
                    Requeue::requeue(RECHECK_INTERVAL),
                ),
                Err(error) => {
                    let retry = match &error {
                        ProviderError::Transient { retry_after, .. } => retry_after.unwrap_or(Duration::from_secs(30)),
                        _ => Duration::from_secs(60),
                    };
                    (ConditionUpdate::falsy(READY, error.category(), error.to_string()), Requeue::requeue(retry))
                }
            }
        }
    };
    let previous = previous.unwrap_or_default();
    let was_ready = previous.common.conditions.iter().any(|c| c.type_ == READY && c.status == "True");
    let now = Time(now());
    let mut status = AppConnectionStatus { provider: provider.map(str::to_owned), ..previous.clone() };
    status.common.conditions =
        merge_conditions(&previous.common.conditions, std::slice::from_ref(&update), obj.meta().generation, &now);
    status.common.observed_generation = obj.meta().generation;
    if update.status && !was_ready {
        status.last_verified_at = Some(now);
    }
    if status != previous {
        if !update.status {
            ctx.event(obj, EventType::Warning, &update.reason, "VerifyConnection", update.message.clone()).await;
        }
        let patch = json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status});
        api.patch_status(&obj.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    }
    succeeded(obj, ctx);
    Ok(next)
}
