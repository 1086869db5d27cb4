//! The IntegrationAccount controller: the one writer per external account.
//!
//! One reconcile is four steps with typed hand-offs:
//!
//! 1. **observe**: [`observe::gather`] reads the cluster's side into one
//!    [`Gathered`] value (shared with `keysmith plan` through
//!    [`observe::Source`]), then [`observe::observe_target`] asks the target
//!    app;
//! 2. **plan**: [`plan::plan`] (pure) decides the actions;
//! 3. **apply**: [`Apply`] performs them, tells [`plan::lifecycle::record`]
//!    what happened to each key, and reports an [`Applied`];
//! 4. **status**: [`status::after_apply`] and [`status::ready`] (pure) say
//!    what status holds; it is written only when it changed.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use futures::Stream;
use jiff::Timestamp;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment, StatefulSet},
        core::v1::Secret,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::{
    api::{Patch, PatchParams},
    core::PartialObjectMeta,
    runtime::{controller::Action as Requeue, events::EventType, reflector::ObjectRef, watcher, Controller},
    Api, Resource, ResourceExt,
};
use serde_json::json;

use super::{
    conditions::{merge_conditions, ConditionUpdate},
    dormancy,
    observe::{self, Gathered, Halt, Source},
    plan::{
        self,
        lifecycle::{self, whole_seconds, KeyEvent},
        Action, HeldKey, Plan, Rollout, RolloutDecision, RotationReason, DEFAULT_KEY_LIFETIME,
    },
    secret as output,
    status::{self, Applied},
    stream::{generation, hash_of},
    succeeded, Context, Error, Held, Stores,
};
use crate::{
    api::{
        condition_types::*, ConnectionKind, DeletionPolicy, IntegrationAccount, IntegrationAccountStatus, KeyState,
        RestartTarget, RestartTargetKind,
    },
    ownership::FIELD_MANAGER,
    provider::http::kube_error_message,
    provider::{
        AccountRequest, IssuedKey, KeyRequest, ObservedKey, Provider, ProviderError, ResolvedConnection, RoleGrant,
    },
    schedule::RotationSchedule,
};

/// The finalizer that lets keysmith deprovision before an account goes away.
pub const FINALIZER: &str = "keysmith.dev/deprovision";
pub use super::observe::ROTATE_NOW_ANNOTATION;
/// The pod-template annotation that rolls a restart target.
pub const RESTARTED_AT_ANNOTATION: &str = "keysmith.dev/restartedAt";
/// How often an unchanged account is checked for drift in the target app,
/// unless `--drift-check-interval` says otherwise.
pub const DRIFT_CHECK_INTERVAL: Duration = Duration::from_secs(600);
/// What retriggers an account: its spec, the rotate-now and reactivate
/// annotations, its deletion and finalizers. Status updates do not.
fn trigger_key(account: &IntegrationAccount) -> u64 {
    let meta = account.meta();
    hash_of((
        meta.generation,
        account.annotations().get(ROTATE_NOW_ANNOTATION),
        account.annotations().get(dormancy::REACTIVATE_ANNOTATION),
        meta.deletion_timestamp.is_some(),
        &meta.finalizers,
    ))
}

/// What in an output Secret matters: its existence and keysmith's annotations.
fn secret_key(secret: &PartialObjectMeta<Secret>) -> u64 {
    hash_of((
        secret.meta().resource_version.is_some(),
        secret.annotations().get(crate::ownership::KEY_ID),
        secret.meta().deletion_timestamp.is_some(),
    ))
}

/// The controller with its triggers.
pub fn controller(
    stores: &Stores,
    accounts: impl Stream<Item = watcher::Event<IntegrationAccount>> + Send + 'static,
    bindings: impl Stream<Item = watcher::Event<crate::api::RoleBinding>> + Send + 'static,
    policies: impl Stream<Item = watcher::Event<crate::api::KeyRotationPolicy>> + Send + 'static,
    connections: impl Stream<Item = watcher::Event<crate::api::AppConnection>> + Send + 'static,
    cluster_connections: impl Stream<Item = watcher::Event<crate::api::ClusterAppConnection>> + Send + 'static,
    secrets: impl Stream<Item = watcher::Event<PartialObjectMeta<Secret>>> + Send + 'static,
) -> Controller<IntegrationAccount> {
    let by_policy = stores.accounts.clone();
    let by_connection = stores.accounts.clone();
    let by_cluster_connection = stores.accounts.clone();
    super::controller_for(&stores.accounts, accounts, trigger_key)
        .owns_stream(super::stream::changes(secrets, secret_key))
        .watches_stream(super::stream::changes(bindings, generation), |binding| {
            Some(ObjectRef::new(&binding.spec.account_ref.name).within(&binding.namespace()?))
        })
        .watches_stream(super::stream::changes(policies, generation), move |policy| {
            let ns = policy.namespace();
            let name = policy.name_any();
            by_policy
                .state()
                .into_iter()
                .filter(|a| a.namespace() == ns && a.spec.rotation_policy_ref.as_ref().is_some_and(|r| r.name == name))
                .map(|a| ObjectRef::from_obj(a.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(super::stream::changes(connections, generation), move |connection| {
            let ns = connection.namespace();
            let name = connection.name_any();
            by_connection
                .state()
                .into_iter()
                .filter(|a| {
                    a.namespace() == ns
                        && a.spec.connection_ref.kind == ConnectionKind::AppConnection
                        && a.spec.connection_ref.name == name
                })
                .map(|a| ObjectRef::from_obj(a.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(super::stream::changes(cluster_connections, generation), move |connection| {
            let name = connection.name_any();
            by_cluster_connection
                .state()
                .into_iter()
                .filter(|a| {
                    a.spec.connection_ref.kind == ConnectionKind::ClusterAppConnection
                        && a.spec.connection_ref.name == name
                })
                .map(|a| ObjectRef::from_obj(a.as_ref()))
                .collect::<Vec<_>>()
        })
}

/// Whole seconds: what the apiserver stores, so recomputed times compare equal.
pub fn now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Reconciles one IntegrationAccount.
pub async fn reconcile(account: Arc<IntegrationAccount>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let namespace = account.namespace().unwrap_or_default();
    let api: Api<IntegrationAccount> = Api::namespaced(ctx.client.clone(), &namespace);
    let key = ObjectRef::from_obj(account.as_ref()).to_string();
    // One line per reconcile: the fault campaigns count them per account
    // to find hot loops (RELIABILITY.md).
    tracing::debug!(account = %key, "reconcile");
    // The cache can lag behind this process's own last write (the watch
    // event is still on its way). Acting on the older copy would undo that
    // write, and could even revoke a key just published as "untracked".
    if ctx.is_stale(&key, account.metadata.resource_version.as_deref()) {
        tracing::debug!("cache behind our last write; retrying shortly");
        return Ok(Requeue::requeue(Duration::from_millis(500)));
    }
    let has_finalizer = account.finalizers().iter().any(|f| f == FINALIZER);

    if account.meta().deletion_timestamp.is_some() {
        ctx.forget_converged(&key);
        ctx.release(&key);
        if has_finalizer {
            if let Err(error) = deprovision(&account, &ctx).await {
                // What keysmith cannot retry its way out of is said where
                // people look, with the cause; it is still retried.
                if let Error::Provider(cause) = &error {
                    if !matches!(cause, ProviderError::Transient { .. }) {
                        let note = format!("cannot deprovision ({}): {cause}", cause.category());
                        ctx.event(account.as_ref(), EventType::Warning, "DeprovisionFailed", "Deprovision", note).await;
                    }
                }
                return Err(error);
            }
            ctx.failpoints.before("finalizer");
            let removed = remove_finalizer(&api, &account).await;
            ctx.failpoints.after("finalizer");
            removed?;
        }
        return Ok(Requeue::await_change());
    }
    let mut run = Run::new(&account, &key);
    if !has_finalizer {
        ctx.failpoints.before("finalizer");
        let updated = add_finalizer(&api, &account).await;
        ctx.failpoints.after("finalizer");
        let updated = updated?;
        run.resource_version = updated.metadata.resource_version;
        ctx.wrote(&key, run.resource_version.as_deref());
    }

    let outcome = converge(&account, &ctx, &mut run).await;
    let status = run.finish(&account);
    if account.status.as_ref() != Some(&status) {
        if let Err(error) = run.write_status(&api, &account, &ctx).await {
            ctx.forget_converged(&key);
            return Err(error);
        }
        let before = account.status.as_ref().map(|s| s.common.conditions.as_slice()).unwrap_or_default();
        for (condition, reason, message) in new_waits(before, &status.common.conditions) {
            ctx.event(account.as_ref(), EventType::Warning, &reason, &condition, message).await;
        }
    }
    match (&outcome, run.memo) {
        (_, Memo::Skipped) => {}
        (Ok(_), Memo::Observed { inputs, delay }) if is_ready(&status) => {
            let fingerprint = fingerprint(inputs, &status, status.current_key.as_ref().map(|k| k.id.as_str()));
            ctx.set_converged(
                &key,
                fingerprint,
                std::time::Instant::now() + delay.saturating_sub(Duration::from_secs(2)),
            );
        }
        _ => ctx.forget_converged(&key),
    }
    match outcome {
        Ok(wait) => {
            succeeded(account.as_ref(), &ctx);
            tracing::debug!(?wait, "reconciled");
            Ok(wait)
        }
        Err(error) => Err(error),
    }
}

/// What one reconcile learns and decides, turned into status at the end.
struct Run {
    status: IntegrationAccountStatus,
    conditions: Vec<ConditionUpdate>,
    now: Timestamp,
    /// The object's resourceVersion as of this reconcile's last write: every
    /// status write is conditional on it, so two writers never interleave.
    resource_version: Option<String>,
    key: String,
    /// Whether this reconcile observed the target app, and on what.
    memo: Memo,
}

/// What a reconcile tells the next one about the target app.
#[derive(Debug, Clone, Copy)]
enum Memo {
    /// It did not get as far as observing: the next one must.
    Unknown,
    /// It observed and acted on `inputs` (see [`inputs_hash`]), and nothing
    /// is due for `delay`.
    Observed { inputs: u64, delay: Duration },
    /// It found the inputs of the last convergence unchanged and skipped the
    /// target app; that convergence still stands.
    Skipped,
}

impl Run {
    fn new(account: &IntegrationAccount, key: &str) -> Self {
        Self {
            status: account.status.clone().unwrap_or_default(),
            conditions: Vec::new(),
            now: now(),
            resource_version: account.metadata.resource_version.clone(),
            key: key.to_owned(),
            memo: Memo::Unknown,
        }
    }

    /// Writes `self.status`, on the condition that nobody wrote the object
    /// since this reconcile last saw it.
    async fn write_status(
        &mut self,
        api: &Api<IntegrationAccount>,
        account: &IntegrationAccount,
        ctx: &Context,
    ) -> Result<(), Error> {
        let patch = json!({
            "apiVersion": IntegrationAccount::api_version(&()),
            "kind": IntegrationAccount::kind(&()),
            "metadata": {"name": account.name_any(), "resourceVersion": self.resource_version},
            "status": self.status,
        });
        ctx.failpoints.before("status");
        let updated = api
            .patch_status(&account.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
            .await;
        ctx.failpoints.after("status");
        let updated = updated?;
        self.resource_version = updated.metadata.resource_version;
        ctx.wrote(&self.key, self.resource_version.as_deref());
        Ok(())
    }

    fn condition(&mut self, update: ConditionUpdate) {
        self.conditions.retain(|c| c.type_ != update.type_);
        self.conditions.push(update);
    }

    fn finish(&mut self, account: &IntegrationAccount) -> IntegrationAccountStatus {
        let ready = status::ready(account.spec.suspend, &self.conditions);
        self.conditions.push(ready);
        let time = Time(self.now);
        self.status.common.conditions =
            merge_conditions(&self.status.common.conditions, &self.conditions, account.meta().generation, &time);
        self.status.common.observed_generation = account.meta().generation;
        self.status.clone()
    }
}

/// Everything between "the object exists" and "status is written": observe
/// (gather, then the target app), plan, apply, status.
async fn converge(account: &IntegrationAccount, ctx: &Context, run: &mut Run) -> Result<Requeue, Error> {
    let gathered = match observe::gather(account, ctx).await? {
        Ok(gathered) => gathered,
        Err(Halt::Problem(problem)) => {
            run.condition(ConditionUpdate::falsy(problem.condition, problem.reason, problem.message));
            return Ok(Requeue::await_change());
        }
        Err(Halt::Suspended) => return Ok(Requeue::await_change()),
        Err(Halt::Provider(error)) => return provider_failed(run, ACCOUNT_READY, error),
    };
    let Gathered { connection, provider, request, schedule, .. } = &gathered;
    if let Some(problem) = &gathered.policy_problem {
        run.condition(ConditionUpdate::falsy(problem.condition, problem.reason, problem.message.clone()));
    }
    if gathered.secret.foreign {
        run.condition(ConditionUpdate::falsy(
            KEY_READY,
            "SecretNotOwned",
            format!(
                "Secret {} exists and was not created by keysmith for this IntegrationAccount; keysmith will not overwrite it. Delete it or choose another spec.secret.name",
                account.spec.secret.name
            ),
        ));
    }

    // A reconcile right after one that converged (triggered by its own
    // status and Secret writes, or by a change that does not concern this
    // account) has nothing to learn from the target app: skip it until the
    // next rotation, revocation or drift check.
    // A changed rotation policy alone needs no look either: the next
    // rotation is recomputed from the current key, and a rotation now due
    // takes the full path.
    let inputs = inputs_hash(account, connection, &gathered.desired, gathered.secret.foreign, schedule.as_ref());
    let current = fingerprint(inputs, &run.status, gathered.secret.key_id.as_deref());
    let next_rotation = run
        .status
        .current_key
        .as_ref()
        .and_then(|c| plan::next_rotation(schedule.as_ref(), c, &request.owner_uid).map(whole_seconds));
    let rotation_in = next_rotation.map(|t| Duration::try_from(t.duration_since(now())).unwrap_or(Duration::ZERO));
    match ctx.converged_for(&run.key, current) {
        Some(left) if gathered.policy_problem.is_none() && rotation_in.is_none_or(|d| !d.is_zero()) => {
            for type_ in [ACCOUNT_READY, ROLES_SYNCED, KEY_READY] {
                if let Some(c) = run.status.common.conditions.iter().find(|c| c.type_ == type_) {
                    let kept = ConditionUpdate::truthy(type_, c.reason.clone(), c.message.clone());
                    run.condition(kept);
                }
            }
            run.status.next_rotation_at = next_rotation.map(Time);
            let wait = rotation_in.map_or(left, |d| left.min(d + Duration::from_secs(1)));
            run.memo = Memo::Skipped;
            tracing::debug!(?wait, "unchanged since it converged; the target app is next checked then");
            return Ok(Requeue::requeue(wait));
        }
        _ => {}
    }

    // Observe the target app, then decide.
    let target = match observe::observe_target(provider.as_ref(), request).await {
        Ok(target) => target,
        Err((condition, error)) => return provider_failed(run, condition, error),
    };
    // What the target says about use, and a reactivation asked for, go
    // into status before the planner looks at it.
    let reactivation = account.annotations().get(dormancy::REACTIVATE_ANNOTATION).map(String::as_str);
    if dormancy::reactivate(&mut run.status, reactivation, run.now) {
        ctx.event(
            account,
            EventType::Normal,
            "Reactivated",
            "Reactivate",
            "the keysmith.dev/reactivate annotation restarted the dormancy clock".to_owned(),
        )
        .await;
    }
    // Only where the target reports use: elsewhere nothing is recorded,
    // and status is not written for it.
    if gathered.provider.capabilities().last_use_lag.is_some() {
        dormancy::record_use(&mut run.status, &target.keys);
    }
    let status = run.status.clone();
    let held = ctx.held(&run.key);
    let rollout = match schedule.as_ref().and_then(RotationSchedule::confirm_rollout) {
        Some(_) if rollout_due(&status, run.now) => {
            Some(observe_rollout(ctx, connection, &gathered.restart_targets, &request.namespace, &status).await)
        }
        _ => None,
    };
    let input = observe::plan_input(
        run.now,
        account,
        &status,
        &gathered,
        &target,
        held.as_ref().map(|h| HeldKey { id: &h.key.id, record: &h.record }),
        rollout.as_ref(),
    );
    let rotation_held = input.disable_dormant;
    let plan = plan::plan(&input);
    if let Some(blocked) = &plan.blocked {
        run.condition(ConditionUpdate::falsy(ACCOUNT_READY, "AccountConflict", blocked.clone()));
        return Ok(Requeue::await_change());
    }

    // Apply, then status from what is now true.
    let mut apply = Apply {
        account,
        ctx,
        provider: provider.as_ref(),
        request,
        connection,
        schedule: schedule.as_ref(),
        target_account: target.account,
        roles: target.roles,
        keys: target.keys,
        role_problem: None,
    };
    let result = apply.run(&plan, run, gathered.keys_blocked()).await;
    let applied = Applied {
        account: apply.target_account,
        roles: apply.roles,
        live_keys: apply.keys.iter().map(|k| k.id.clone()).collect(),
        role_problem: apply.role_problem,
        transient_failure: result
            .as_ref()
            .is_err_and(|e| matches!(e, Error::Provider(ProviderError::Transient { .. }))),
    };
    let requested = observe::requested_name(account);
    let connection_name = connection.display();
    let facts = status::Facts {
        provider: provider.name(),
        account_name: &request.name,
        requested_name: &requested,
        connection: &connection_name,
        secret_name: &account.spec.secret.name,
        desired: &gathered.desired,
        schedule: schedule.as_ref(),
        seed: &request.owner_uid,
        rotation_held,
    };
    let (status, conditions) = status::after_apply(run.status.clone(), &facts, &applied, &run.conditions, run.now);
    run.status = status;
    for condition in conditions {
        run.condition(condition);
    }
    if let Some(decision) = &plan.rollout {
        let revoked = |key: &str| run.status.keys.iter().any(|k| k.id == key && k.state == KeyState::Revoked);
        let settled = match decision {
            // Unless this pass revoked it after all (room for a new key).
            RolloutDecision::Waiting { key, .. } => !revoked(key),
            RolloutDecision::Confirmed { key } | RolloutDecision::TimedOut { key, .. } => revoked(key),
        };
        if settled {
            let current = run.status.current_key.as_ref().map(|c| c.id.clone());
            let condition = rollout_condition(decision, current.as_deref());
            if let RolloutDecision::TimedOut { .. } = decision {
                ctx.event(account, EventType::Warning, "RolloutStuck", "RevokeKey", condition.message.clone()).await;
            }
            run.condition(condition);
        }
    }
    let disabled = applied.account.as_ref().is_some_and(|a| a.disabled);
    let dormant_from = assess_dormancy(account, ctx, &gathered, run, disabled).await;
    result?;

    // Come back when something is due, or for a drift check. The memo
    // stands until the next revocation or drift check; the next rotation is
    // recomputed on every skip (the policy may change).
    let mut wake =
        lifecycle::wake(plan.wake_at, &run.status.keys, run.status.next_rotation_at.as_ref().map(|t| t.0), run.now);
    // And when the account turns dormant, unless used by then.
    if let Some(from) = dormant_from {
        wake.revocation = Some(wake.revocation.map_or(from, |t| t.min(from)));
        wake.next = Some(wake.next.map_or(from, |t| t.min(from)));
    }
    let interval = ctx.drift_check_interval;
    run.memo = Memo::Observed { inputs, delay: lifecycle::delay_until(wake.revocation, now(), interval) };
    Ok(Requeue::requeue(lifecycle::delay_until(wake.next, now(), interval)))
}

/// The `Dormant` condition, and a Warning event when an account turns
/// dormant. Returns when a not yet dormant account turns dormant unless
/// used, for the next wake-up.
async fn assess_dormancy(
    account: &IntegrationAccount,
    ctx: &Context,
    gathered: &Gathered,
    run: &mut Run,
    disabled: bool,
) -> Option<jiff::Timestamp> {
    let Some(after) = gathered.schedule.as_ref().and_then(RotationSchedule::dormant_after) else {
        // No dormancy asked for (any more): no condition.
        run.status.common.conditions.retain(|c| c.type_ != DORMANT);
        return None;
    };
    let Some(found) = observe::dormancy_of(run.now, account, &run.status, gathered) else {
        run.condition(dormancy::not_reported(gathered.provider.name()));
        return None;
    };
    let disabled_for_it =
        disabled && gathered.schedule.as_ref().is_some_and(RotationSchedule::disable_dormant) && found.dormant;
    let condition = dormancy::condition(&found, after, disabled_for_it);
    let was_dormant = run.status.common.conditions.iter().any(|c| c.type_ == DORMANT && c.status == "True");
    if found.dormant && !was_dormant {
        ctx.event(account, EventType::Warning, "Dormant", "Assess", condition.message.clone()).await;
    }
    run.condition(condition);
    (!found.dormant).then_some(found.from)
}

/// Hashes what a reconcile acts on besides its own status, the output
/// Secret's key and the rotation policy: the account's spec (generation)
/// and rotate-now request, the connection's spec, the declared roles and
/// whether the output Secret is someone else's. (A connection's credential
/// Secret is not among them: a changed credential is picked up by the next
/// drift check, or by any change that is.)
fn inputs_hash(
    account: &IntegrationAccount,
    connection: &ResolvedConnection,
    desired: &BTreeSet<RoleGrant>,
    secret_foreign: bool,
    schedule: Option<&RotationSchedule>,
) -> u64 {
    hash_of((
        account.uid(),
        account.meta().generation,
        account.annotations().get(ROTATE_NOW_ANNOTATION),
        account.annotations().get(dormancy::REACTIVATE_ANNOTATION),
        &connection.uid,
        serde_json::to_string(&connection.spec).unwrap_or_default(),
        desired,
        secret_foreign,
        // Dormancy is decided from the target's report of use: a changed
        // dormancy setting looks at it again.
        schedule.map(|s| (s.dormant_after(), s.disable_dormant(), s.revoke_unused_after())),
    ))
}

/// [`inputs_hash`] with the account's status (but its next rotation, which
/// follows from the policy) and the key id the output Secret holds.
fn fingerprint(inputs: u64, status: &IntegrationAccountStatus, secret_key_id: Option<&str>) -> u64 {
    let status = IntegrationAccountStatus { next_rotation_at: None, ..status.clone() };
    hash_of((inputs, serde_json::to_string(&status).unwrap_or_default(), secret_key_id))
}

/// Whether `status` says Ready.
fn is_ready(status: &IntegrationAccountStatus) -> bool {
    status.common.conditions.iter().any(|c| c.type_ == READY && c.status == "True")
}

/// The failures this status newly waits on (not retried: a change must fix
/// them), as event actions (the condition), reasons and messages: each
/// condition but `Ready` (which repeats one of them) that is `False` for a
/// provider's `Conflict`, `Invalid`, `NotFound` or `LimitExceeded` (or an
/// account that is not keysmith's, `AccountConflict`), and was not so, with
/// the same message, in `before`. The condition is the event's action, so
/// two conditions' waits are two events, not one series.
fn new_waits(
    before: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    after: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> Vec<(String, String, String)> {
    const WAITS: [&str; 5] = ["Conflict", "Invalid", "NotFound", "LimitExceeded", "AccountConflict"];
    after
        .iter()
        .filter(|c| c.type_ != READY && c.status == "False" && WAITS.contains(&c.reason.as_str()))
        .filter(|c| {
            !before
                .iter()
                .any(|b| b.type_ == c.type_ && b.status == c.status && b.reason == c.reason && b.message == c.message)
        })
        .map(|c| (c.type_.clone(), c.reason.clone(), format!("{}: {}", c.type_, c.message)))
        .collect()
}

/// A provider failure becomes a condition; transient ones also retry.
fn provider_failed(run: &mut Run, condition: &'static str, error: ProviderError) -> Result<Requeue, Error> {
    run.condition(ConditionUpdate::falsy(condition, error.category(), error.to_string()));
    match error {
        ProviderError::Transient { .. } | ProviderError::Unauthorized(_) => Err(Error::Provider(error)),
        _ => Ok(Requeue::await_change()),
    }
}

/// Carries out a plan.
struct Apply<'a> {
    account: &'a IntegrationAccount,
    ctx: &'a Context,
    provider: &'a dyn Provider,
    request: &'a AccountRequest,
    connection: &'a ResolvedConnection,
    schedule: Option<&'a RotationSchedule>,
    target_account: Option<crate::provider::ObservedAccount>,
    roles: BTreeSet<RoleGrant>,
    keys: Vec<ObservedKey>,
    role_problem: Option<String>,
}

impl Apply<'_> {
    async fn run(&mut self, plan: &Plan, run: &mut Run, keys_blocked: bool) -> Result<(), Error> {
        for action in &plan.actions {
            match action {
                Action::CreateAccount => {
                    match self.provider.create_account(self.request).await {
                        Ok(created) => self.target_account = Some(created),
                        Err(ProviderError::Conflict(message)) => {
                            run.condition(ConditionUpdate::falsy(ACCOUNT_READY, "AccountConflict", message));
                            return Ok(());
                        }
                        Err(error) => {
                            provider_failed(run, ACCOUNT_READY, error)?;
                            return Ok(());
                        }
                    }
                    self.changed(
                        "AccountCreated",
                        "CreateAccount",
                        format!("created {} account {}", self.provider.name(), self.request.name),
                        None,
                    )
                    .await;
                }
                Action::UpdateAccount => {
                    match self.provider.update_account(self.request).await {
                        Ok(updated) => self.target_account = Some(updated),
                        Err(error) => {
                            provider_failed(run, ACCOUNT_READY, error)?;
                            return Ok(());
                        }
                    }
                    self.changed(
                        "AccountUpdated",
                        "UpdateAccount",
                        format!("updated {} account {}", self.provider.name(), self.request.name),
                        None,
                    )
                    .await;
                }
                Action::DisableAccount => {
                    if let Err(error) = self.provider.disable_account(self.request).await {
                        provider_failed(run, ACCOUNT_READY, error)?;
                        return Ok(());
                    }
                    if let Some(account) = self.target_account.as_mut() {
                        account.disabled = true;
                    }
                    self.changed(
                        "DormantAccountDisabled",
                        "DisableAccount",
                        format!(
                            "disabled {} account {}: it is dormant and the rotation policy disables dormant accounts",
                            self.provider.name(),
                            self.request.name
                        ),
                        None,
                    )
                    .await;
                }
                Action::Grant(grant) => match self.provider.grant_role(self.request, grant).await {
                    Ok(()) => {
                        self.roles.insert(grant.clone());
                        self.changed("RoleGranted", "GrantRole", format!("granted {grant}"), None).await;
                    }
                    // A refusal (the apiserver's RBAC refusing the
                    // ServiceAccount a namespaced connection acts as, say)
                    // is this role's problem: the rest of the account, its
                    // key included, goes on.
                    Err(ProviderError::Invalid(message))
                    | Err(ProviderError::Conflict(message))
                    | Err(ProviderError::NotFound(message))
                    | Err(ProviderError::Unauthorized(message)) => {
                        self.role_problem = Some(format!("{grant}: {message}"));
                        self.ctx
                            .event(
                                self.account,
                                EventType::Warning,
                                "RoleNotGranted",
                                "GrantRole",
                                format!("could not grant {grant}: {message}"),
                            )
                            .await;
                    }
                    Err(error) => {
                        provider_failed(run, ROLES_SYNCED, error)?;
                        return Ok(());
                    }
                },
                Action::Revoke(grant) => match self.provider.revoke_role(self.request, grant).await {
                    Ok(()) => {
                        self.roles.remove(grant);
                        self.changed(
                            "RoleRevoked",
                            "RevokeRole",
                            format!("revoked {grant}, which no RoleBinding declares"),
                            None,
                        )
                        .await;
                    }
                    // Someone else's binding that the connection's identity
                    // may not change (another tenant naming this account's
                    // ServiceAccount in its own namespace): reported, and it
                    // does not hold up the rest of the account.
                    Err(ProviderError::Unauthorized(message)) => {
                        self.role_problem = Some(format!("{grant} is held but may not be revoked: {message}"));
                        self.ctx
                            .event(
                                self.account,
                                EventType::Warning,
                                "RoleNotRevoked",
                                "RevokeRole",
                                format!("could not revoke {grant}: {message}"),
                            )
                            .await;
                    }
                    Err(error) => {
                        provider_failed(run, ROLES_SYNCED, error)?;
                        return Ok(());
                    }
                },
                Action::RevokeKey { id, reason } => {
                    self.revoke_key(run, id, reason.as_str()).await?;
                }
                Action::AdoptPublished { id } => self.adopt_published(run, id).await,
                Action::AdoptPublishedAs { id, record } => {
                    let issued = KeyEvent::Issued { pending: record, id, expires_at: None };
                    lifecycle::record(&mut run.status, issued, run.now);
                    self.adopt_published(run, id).await;
                }
                Action::Publish { id } => {
                    if keys_blocked {
                        continue;
                    }
                    self.publish_held(run, id).await?;
                }
                Action::Rotate { reason, revoke_previous_at_once } => {
                    if keys_blocked {
                        continue;
                    }
                    self.rotate(run, *reason, *revoke_previous_at_once).await?;
                }
            }
        }
        Ok(())
    }

    /// An event and an audit line for a change in the target app.
    async fn changed(&self, reason: &str, action: &str, note: String, key_id: Option<&str>) {
        tracing::info!(
            target: "keysmith::audit",
            account = %super::key_of(self.account),
            provider = self.provider.name(),
            connection = %self.connection.display(),
            action,
            key_id = key_id.unwrap_or(""),
            "{note}"
        );
        self.ctx.event(self.account, EventType::Normal, reason, action, note).await;
    }

    async fn revoke_key(&mut self, run: &mut Run, id: &str, reason: &str) -> Result<(), Error> {
        match self.provider.revoke_key(self.request, id).await {
            Ok(()) | Err(ProviderError::NotFound(_)) => {}
            Err(error) => {
                provider_failed(run, KEY_READY, error)?;
                return Ok(());
            }
        }
        self.keys.retain(|k| k.id != id);
        lifecycle::record(&mut run.status, KeyEvent::Revoked { id, reason }, run.now);
        self.changed("KeyRevoked", "RevokeKey", format!("revoked key {id} ({reason})"), Some(id)).await;
        Ok(())
    }

    /// Rotates, counting the attempt in `keysmith_rotations_total`.
    async fn rotate(
        &mut self,
        run: &mut Run,
        reason: RotationReason,
        revoke_previous_at_once: bool,
    ) -> Result<(), Error> {
        // A rotation replaces whatever key was held back.
        self.ctx.release(&run.key);
        let result = self.issue_and_publish(run, reason, revoke_previous_at_once).await;
        let published = matches!(result, Ok(true));
        self.ctx.metrics.rotation(published, reason.as_str());
        result.map(|_| ())
    }

    /// Publishes the key this process issued earlier and still holds.
    async fn publish_held(&mut self, run: &mut Run, id: &str) -> Result<(), Error> {
        let Some(held) = self.ctx.held(&run.key).filter(|h| h.key.id == id) else {
            return Ok(());
        };
        // The spec that could not publish it has not changed: nothing to try.
        if let Some((generation, message)) = &held.unpublishable {
            if *generation == self.account.metadata.generation {
                run.condition(ConditionUpdate::falsy(KEY_READY, "InvalidSecretSpec", message.clone()));
                return Ok(());
            }
        }
        // Its record may still be the Pending one, under keysmith's id.
        let issued = KeyEvent::Issued { pending: &held.record, id, expires_at: held.key.expires_at };
        lifecycle::record(&mut run.status, issued, run.now);
        let issued_at = run.status.keys.iter().find(|r| r.id == id).map_or(run.now, |r| r.created_at.0);
        let result =
            self.publish(run, held.key, &held.record, held.reason, held.revoke_previous_at_once, issued_at).await;
        self.ctx.metrics.rotation(matches!(result, Ok(true)), held.reason.as_str());
        result.map(|_| ())
    }

    /// Asks the apiserver whether the output Secret can be written (a dry
    /// run, as keysmith, of the Secret's metadata): admission
    /// webhooks, quotas, invalid labels or annotations, a namespace being
    /// deleted. If not, no key is issued: the cause becomes KeyReady and an
    /// event, and the reconcile retries with backoff (the apiserver only).
    async fn secret_writable(&self, run: &mut Run) -> Result<(), Error> {
        let secret = output::preflight(self.account, run.now);
        let secrets: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.request.namespace);
        let name = &self.account.spec.secret.name;
        let exists = self.ctx.stores.secrets.get(&ObjectRef::new(name).within(&self.request.namespace)).is_some();
        // An existing Secret: its metadata as a merge patch, so the dry run
        // leaves its data as it is (an admission policy may look at it). A
        // new one: created without data, as no key exists yet.
        let written = if exists {
            let metadata = json!({"metadata": {
                "labels": secret.metadata.labels,
                "annotations": secret.metadata.annotations,
                "ownerReferences": secret.metadata.owner_references,
            }});
            secrets.patch(name, &PatchParams::default().dry_run(), &Patch::Merge(&metadata)).await
        } else {
            secrets.patch(name, &PatchParams::apply(FIELD_MANAGER).force().dry_run(), &Patch::Apply(&secret)).await
        };
        match written {
            Ok(_) => Ok(()),
            Err(error) => {
                self.secret_not_writable(run, &kube_error_message(&error), "no key is issued until it can be").await;
                Err(error.into())
            }
        }
    }

    async fn secret_not_writable(&self, run: &mut Run, cause: &str, consequence: &str) {
        let message = format!("Secret {} cannot be written: {cause}; {consequence}", self.account.spec.secret.name);
        run.condition(ConditionUpdate::falsy(KEY_READY, "SecretNotWritable", message.clone()));
        self.ctx.event(self.account, EventType::Warning, "SecretNotWritable", "PublishKey", message).await;
    }

    /// Issues, verifies and publishes a new key; `Ok(true)` once it is
    /// published, `Ok(false)` when a problem stopped it (now a condition).
    async fn issue_and_publish(
        &mut self,
        run: &mut Run,
        reason: RotationReason,
        revoke_previous_at_once: bool,
    ) -> Result<bool, Error> {
        self.secret_writable(run).await?;
        let key_id = new_key_id();
        let now = run.now;
        // Record the intent before the external create, so a crash between
        // issuing and publishing leaves a key the next reconcile can find.
        lifecycle::record(&mut run.status, KeyEvent::Issuing { id: &key_id, reason }, now);
        let api: Api<IntegrationAccount> = Api::namespaced(self.ctx.client.clone(), &self.request.namespace);
        run.write_status(&api, self.account, self.ctx).await?;

        let lifetime = self.provider.capabilities().key_expiry.then(|| match self.schedule {
            Some(schedule) => {
                let due = schedule.next_rotation(now, &plan::seed_for(&self.request.owner_uid, &key_id));
                schedule.key_lifetime(now, due)
            }
            None => DEFAULT_KEY_LIFETIME,
        });
        let issued = match self.provider.issue_key(self.request, &KeyRequest { key_id: key_id.clone(), lifetime }).await
        {
            Ok(issued) => issued,
            Err(error) => {
                provider_failed(run, KEY_READY, error)?;
                return Ok(false);
            }
        };
        self.keys.push(ObservedKey { last_used: None, id: issued.id.clone(), created_at: Some(now) });
        lifecycle::record(
            &mut run.status,
            KeyEvent::Issued { pending: &key_id, id: &issued.id, expires_at: issued.expires_at },
            now,
        );
        self.publish(run, issued, &key_id, reason, revoke_previous_at_once, now).await
    }

    /// Verifies and publishes an issued key. From here on a failure never
    /// leads to issuing again: a key the target refuses is revoked and the
    /// account waits for a change; any other failure holds the key (in this
    /// process's memory) for the next attempt to publish.
    async fn publish(
        &mut self,
        run: &mut Run,
        issued: IssuedKey,
        record: &str,
        reason: RotationReason,
        revoke_previous_at_once: bool,
        issued_at: Timestamp,
    ) -> Result<bool, Error> {
        let now = run.now;
        let hold = |ctx: &Context, key: &str, issued: &IssuedKey, unpublishable: Option<(Option<i64>, String)>| {
            let held =
                Held { key: issued.clone(), record: record.to_owned(), unpublishable, reason, revoke_previous_at_once };
            ctx.hold(key, held);
        };
        match self.provider.verify_key(self.request, &issued).await {
            Ok(()) => {}
            Err(error @ ProviderError::Transient { .. }) => {
                hold(self.ctx, &run.key, &issued, None);
                return provider_failed(run, KEY_READY, error).map(|_| false);
            }
            Err(error) => {
                self.ctx.release(&run.key);
                self.revoke_key(run, &issued.id, "VerificationFailed").await?;
                lifecycle::record(&mut run.status, KeyEvent::Abandoned, now);
                return provider_failed(run, KEY_READY, error).map(|_| false);
            }
        }

        let secret = match output::render(self.account, &issued, issued_at) {
            Ok(secret) => secret,
            Err(invalid) => {
                let message = format!("{invalid}; key {} is kept until it can be published", issued.id);
                let unpublishable = Some((self.account.metadata.generation, message.clone()));
                hold(self.ctx, &run.key, &issued, unpublishable);
                run.condition(ConditionUpdate::falsy(KEY_READY, "InvalidSecretSpec", message));
                return Ok(false);
            }
        };
        let secrets: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.request.namespace);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.ctx.failpoints.before("publish");
        let written = secrets.patch(&self.account.spec.secret.name, &params, &Patch::Apply(&secret)).await;
        self.ctx.failpoints.after("publish");
        if let Err(error) = written {
            hold(self.ctx, &run.key, &issued, None);
            let cause = issued.material.redact(&kube_error_message(&error));
            let consequence = format!("key {} is kept until it can be published", issued.id);
            self.secret_not_writable(run, &cause, &consequence).await;
            return Err(Error::Provider(ProviderError::transient(cause)));
        }
        self.ctx.release(&run.key);

        let previous = run.status.current_key.clone();
        let revoke_at = self.record_published(run, &issued.id, issued_at, issued.expires_at, revoke_previous_at_once);
        // Any new key answers a rotate-now request made before it, whatever
        // else made this rotation happen (a key gone from the target, say):
        // otherwise the request would wait for the next look at the target.
        if let Some(request) = self.account.annotations().get(ROTATE_NOW_ANNOTATION) {
            run.status.last_rotation_request = Some(request.clone());
        }
        let note = match &previous {
            Some(old) => format!(
                "published key {} ({}); key {} stays valid until {}",
                issued.id,
                reason.as_str(),
                old.id,
                Timestamp::from_second(revoke_at.as_second()).unwrap_or(revoke_at)
            ),
            None => format!("published key {} ({})", issued.id, reason.as_str()),
        };
        self.changed("KeyRotated", "RotateKey", note, Some(&issued.id)).await;
        if revoke_previous_at_once {
            if let Some(old) = &previous {
                self.revoke_key(run, &old.id, "KeyLimit").await?;
            }
        }
        // No status write here: the reconcile's final write records the
        // publication. Should the process stop before it, the next reconcile
        // finds the pending key in the Secret and adopts it.

        // Roll the workloads that read the Secret.
        if previous.is_some() {
            self.restart_targets(run, &issued.id).await;
        }
        Ok(true)
    }

    /// Records `id` as the published key and starts retiring the previous
    /// one; returns when the previous key is due for revocation.
    fn record_published(
        &self,
        run: &mut Run,
        id: &str,
        issued_at: Timestamp,
        expires_at: Option<Timestamp>,
        revoke_previous_at_once: bool,
    ) -> Timestamp {
        let revoke_previous_at = lifecycle::revoke_previous_at(run.now, self.schedule, revoke_previous_at_once);
        lifecycle::record(
            &mut run.status,
            KeyEvent::Published { id, issued_at, expires_at, revoke_previous_at },
            run.now,
        );
        revoke_previous_at
    }

    /// The output Secret already holds a key status still calls pending:
    /// the process stopped after publishing it. Record it as published.
    async fn adopt_published(&mut self, run: &mut Run, id: &str) {
        let Some(record) = run.status.keys.iter().find(|r| r.id == id).cloned() else { return };
        // Published after all (a write that timed out but landed): nothing
        // to hold any more.
        self.ctx.release(&run.key);
        let previous = run.status.current_key.clone();
        self.record_published(run, id, record.created_at.0, record.expires_at.as_ref().map(|t| t.0), false);
        let note = format!("key {id} was already published; recorded it after a restart");
        self.changed("KeyAdopted", "RotateKey", note, Some(id)).await;
        if previous.is_some() && record.restarted_at.is_none() {
            self.restart_targets(run, id).await;
        }
    }

    async fn restart_targets(&self, run: &mut Run, key_id: &str) {
        let Some(policy_ref) = &self.account.spec.rotation_policy_ref else {
            return;
        };
        let Some(policy) =
            self.ctx.stores.policies.get(&ObjectRef::new(&policy_ref.name).within(&self.request.namespace))
        else {
            return;
        };
        let stamp = run.now.to_string();
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT_ANNOTATION: stamp}}}}});
        let params = PatchParams::default();
        // As the connection's identity: a tenant's policy must not roll a
        // workload its ServiceAccount may not.
        let client = match self.ctx.providers.client_for(&self.connection.identity).await {
            Ok(client) => client,
            Err(error) => {
                tracing::warn!(%error, "cannot act as the connection's identity to restart workloads");
                return;
            }
        };
        let ns = &self.request.namespace;
        for target in &policy.spec.restart_targets {
            self.ctx.failpoints.before("restart");
            let result = match target.kind {
                RestartTargetKind::Deployment => Api::<Deployment>::namespaced(client.clone(), ns)
                    .patch(&target.name, &params, &Patch::Merge(&patch))
                    .await
                    .map(|_| ()),
                RestartTargetKind::StatefulSet => Api::<StatefulSet>::namespaced(client.clone(), ns)
                    .patch(&target.name, &params, &Patch::Merge(&patch))
                    .await
                    .map(|_| ()),
                RestartTargetKind::DaemonSet => Api::<DaemonSet>::namespaced(client.clone(), ns)
                    .patch(&target.name, &params, &Patch::Merge(&patch))
                    .await
                    .map(|_| ()),
            };
            self.ctx.failpoints.after("restart");
            match result {
                Ok(()) => {
                    tracing::info!(
                        target: "keysmith::audit",
                        account = %super::key_of(self.account),
                        action = "RestartWorkload",
                        key_id,
                        workload = %format!("{:?}/{}", target.kind, target.name),
                        "restarted a workload to pick up the new key"
                    );
                    self.ctx
                        .event(
                            self.account,
                            EventType::Normal,
                            "WorkloadRestarted",
                            "RestartWorkload",
                            format!("restarted {:?} {} to pick up key {key_id}", target.kind, target.name),
                        )
                        .await;
                }
                Err(error) => {
                    self.ctx
                        .event(
                            self.account,
                            EventType::Warning,
                            "WorkloadRestartFailed",
                            "RestartWorkload",
                            format!("could not restart {:?} {}: {error}", target.kind, target.name),
                        )
                        .await;
                }
            }
        }
        lifecycle::record(&mut run.status, KeyEvent::Restarted { id: key_id }, run.now);
    }
}

/// Whether a replaced key's grace period is over, so that confirmed
/// rollover needs to know how the restart targets' rollouts stand.
fn rollout_due(status: &IntegrationAccountStatus, now: Timestamp) -> bool {
    status.keys.iter().any(|k| k.state == KeyState::Retiring && k.revoke_at.as_ref().is_none_or(|t| t.0 <= now))
}

/// How the restart targets' rollouts stand for the current key, read as the
/// connection's identity (a tenant learns nothing of workloads it could not
/// read itself). A workload is rolled out when it carries the restart
/// stamp of the current key's publication and its rollout is complete, as
/// `kubectl rollout status` judges it.
async fn observe_rollout(
    ctx: &Context,
    connection: &ResolvedConnection,
    targets: &[RestartTarget],
    namespace: &str,
    status: &IntegrationAccountStatus,
) -> Rollout {
    let published = status
        .current_key
        .as_ref()
        .and_then(|c| status.keys.iter().find(|k| k.id == c.id))
        .and_then(|k| k.published_at.as_ref().map(|t| t.0));
    let client = match ctx.providers.client_for(&connection.identity).await {
        Ok(client) => client,
        Err(error) => {
            return Rollout {
                waiting_on: vec![format!("the restart targets (cannot act as the connection's identity: {error})")],
            }
        }
    };
    let mut waiting_on = Vec::new();
    for target in targets {
        let name = format!("{:?}/{}", target.kind, target.name);
        let stamped = |template: Option<&ObjectMeta>| {
            let stamp = template
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get(RESTARTED_AT_ANNOTATION))
                .and_then(|s| s.parse::<Timestamp>().ok());
            matches!((stamp, published), (Some(stamp), Some(published)) if stamp >= published)
        };
        let verdict: Result<Option<String>, kube::Error> = match target.kind {
            RestartTargetKind::Deployment => {
                Api::<Deployment>::namespaced(client.clone(), namespace).get(&target.name).await.map(|d| {
                    let spec = d.spec.unwrap_or_default();
                    let st = d.status.unwrap_or_default();
                    let want = spec.replicas.unwrap_or(1);
                    let available = st.available_replicas.unwrap_or(0);
                    let updated = st.updated_replicas.unwrap_or(0);
                    if !stamped(spec.template.metadata.as_ref()) {
                        Some("not restarted for the current key".to_owned())
                    } else if st.observed_generation < d.metadata.generation
                        || updated < want
                        || st.replicas.unwrap_or(0) > updated
                        || available < updated
                    {
                        Some(format!("{available} of {want} updated replicas available"))
                    } else {
                        None
                    }
                })
            }
            RestartTargetKind::StatefulSet => {
                Api::<StatefulSet>::namespaced(client.clone(), namespace).get(&target.name).await.map(|s| {
                    let spec = s.spec.unwrap_or_default();
                    let st = s.status.unwrap_or_default();
                    let want = spec.replicas.unwrap_or(1);
                    let ready = st.ready_replicas.unwrap_or(0);
                    if !stamped(spec.template.metadata.as_ref()) {
                        Some("not restarted for the current key".to_owned())
                    } else if st.observed_generation < s.metadata.generation
                        || st.updated_replicas.unwrap_or(0) < want
                        || ready < want
                        || st.current_revision != st.update_revision
                    {
                        Some(format!("{ready} of {want} updated replicas ready"))
                    } else {
                        None
                    }
                })
            }
            RestartTargetKind::DaemonSet => {
                Api::<DaemonSet>::namespaced(client.clone(), namespace).get(&target.name).await.map(|d| {
                    let spec = d.spec.unwrap_or_default();
                    let st = d.status.unwrap_or_default();
                    let want = st.desired_number_scheduled;
                    let available = st.number_available.unwrap_or(0);
                    if !stamped(spec.template.metadata.as_ref()) {
                        Some("not restarted for the current key".to_owned())
                    } else if st.observed_generation < d.metadata.generation
                        || st.updated_number_scheduled.unwrap_or(0) < want
                        || available < want
                    {
                        Some(format!("{available} of {want} updated pods available"))
                    } else {
                        None
                    }
                })
            }
        };
        match verdict {
            Ok(None) => {}
            Ok(Some(why)) => waiting_on.push(format!("{name}: {why}")),
            Err(error) => waiting_on.push(format!("{name}: {}", kube_error_message(&error))),
        }
    }
    Rollout { waiting_on }
}

/// The RolloutConfirmed condition for confirmed rollover's decision.
fn rollout_condition(decision: &RolloutDecision, current: Option<&str>) -> ConditionUpdate {
    match decision {
        RolloutDecision::Waiting { key, until, on } => ConditionUpdate::falsy(
            ROLLOUT_CONFIRMED,
            "WaitingForRollout",
            format!(
                "key {key} stays valid until the restart targets have rolled out with key {}, at the latest until {until}; waiting on {}",
                current.unwrap_or("?"),
                on.join("; ")
            ),
        ),
        RolloutDecision::Confirmed { key } => ConditionUpdate::truthy(
            ROLLOUT_CONFIRMED,
            "RolloutConfirmed",
            format!("every restart target rolled out with key {}; key {key} was revoked", current.unwrap_or("?")),
        ),
        RolloutDecision::TimedOut { key, on } => ConditionUpdate::falsy(
            ROLLOUT_CONFIRMED,
            "RolloutStuck",
            format!("key {key} was revoked at confirmRollout.maxWait, before the restart targets rolled out: {}", on.join("; ")),
        ),
    }
}

/// A fresh key id: 10 lowercase alphanumerics, usable in object names.
fn new_key_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..10).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

async fn add_finalizer(
    api: &Api<IntegrationAccount>,
    account: &IntegrationAccount,
) -> Result<IntegrationAccount, Error> {
    let mut finalizers = account.finalizers().to_vec();
    finalizers.push(FINALIZER.into());
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": account.resource_version()}});
    Ok(api.patch(&account.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?)
}

async fn remove_finalizer(api: &Api<IntegrationAccount>, account: &IntegrationAccount) -> Result<(), Error> {
    let finalizers: Vec<&String> = account.finalizers().iter().filter(|f| *f != FINALIZER).collect();
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": account.resource_version()}});
    match api.patch(&account.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Carries out spec.deletionPolicy in the target app. Idempotent; copes with
/// an account that was never created. When the connection is gone there is
/// nothing keysmith can reach: it says so in an event and lets go.
async fn deprovision(account: &IntegrationAccount, ctx: &Context) -> Result<(), Error> {
    let policy = account.spec.deletion_policy;
    if policy == DeletionPolicy::Orphan {
        ctx.event(
            account,
            EventType::Normal,
            "Orphaned",
            "Deprovision",
            "deletionPolicy Orphan: the account and its keys stay in the target app".into(),
        )
        .await;
        return Ok(());
    }
    let connection = match observe::resolve_connection(account, ctx).await? {
        Ok(connection) => connection,
        Err(problem) => {
            ctx.event(
                account,
                EventType::Warning,
                "DeprovisionSkipped",
                "Deprovision",
                format!("cannot reach the target app ({}); the account is left there", problem.message),
            )
            .await;
            return Ok(());
        }
    };
    let provider = match Source::provider(ctx, &connection).await {
        Ok(provider) => provider,
        Err(ProviderError::Invalid(message)) => {
            ctx.event(
                account,
                EventType::Warning,
                "DeprovisionSkipped",
                "Deprovision",
                format!("cannot reach the target app ({message}); the account is left there"),
            )
            .await;
            return Ok(());
        }
        Err(error) => return Err(error.into()),
    };
    let request = observe::account_request(account, &connection);
    match provider.observe_account(&request).await? {
        Some(observed) if observed.owned => {}
        _ => return Ok(()),
    }
    for key in provider.list_keys(&request).await? {
        match provider.revoke_key(&request, &key.id).await {
            Ok(()) | Err(ProviderError::NotFound(_)) => {}
            Err(error) => return Err(error.into()),
        }
        audit(account, provider.name(), "RevokeKey", Some(&key.id), "revoked key on deletion");
    }
    if policy == DeletionPolicy::Disable && !provider.capabilities().disable {
        // The target cannot disable accounts: every key is revoked, so the
        // account can no longer authenticate, and it is kept for audit.
        audit(account, provider.name(), "KeepAccount", None, "kept the account without keys on deletion");
        ctx.event(
            account,
            EventType::Normal,
            "AccountKeptWithoutKeys",
            "Deprovision",
            format!(
                "revoked every key of {} account {}; the {} provider cannot disable accounts, so it is kept without a usable key",
                provider.name(),
                request.name,
                provider.name()
            ),
        )
        .await;
        return Ok(());
    }
    if policy == DeletionPolicy::Disable {
        provider.disable_account(&request).await?;
        audit(account, provider.name(), "DisableAccount", None, "disabled the account on deletion");
        ctx.event(
            account,
            EventType::Normal,
            "AccountDisabled",
            "Deprovision",
            format!("revoked every key and disabled {} account {}", provider.name(), request.name),
        )
        .await;
    } else {
        for grant in provider.list_roles(&request).await? {
            match provider.revoke_role(&request, &grant).await {
                Ok(()) | Err(ProviderError::NotFound(_)) => {}
                Err(error) => return Err(error.into()),
            }
            audit(account, provider.name(), "RevokeRole", None, &format!("revoked {grant} on deletion"));
        }
        match provider.delete_account(&request).await {
            Ok(()) | Err(ProviderError::NotFound(_)) => {}
            Err(error) => return Err(error.into()),
        }
        audit(account, provider.name(), "DeleteAccount", None, "deleted the account on deletion");
        ctx.event(
            account,
            EventType::Normal,
            "AccountDeleted",
            "Deprovision",
            format!("revoked every key and deleted {} account {}", provider.name(), request.name),
        )
        .await;
    }
    Ok(())
}

fn audit(account: &IntegrationAccount, provider: &str, action: &str, key_id: Option<&str>, note: &str) {
    tracing::info!(target: "keysmith::audit", account = %super::key_of(account), provider, action, key_id = key_id.unwrap_or(""), "{note}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ClusterAppConnection, IntegrationAccountSpec};

    #[test]
    fn a_new_wait_is_announced_once_and_ready_and_retries_never() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
        let condition = |type_: &str, status: &str, reason: &str, message: &str| Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
            observed_generation: None,
        };
        let waiting = [
            condition("Ready", "False", "Conflict", "lost control"),
            condition("AccountReady", "False", "Conflict", "lost control"),
            condition("KeyReady", "False", "Transient", "timed out"),
        ];
        let announced = ("AccountReady".to_owned(), "Conflict".to_owned(), "AccountReady: lost control".to_owned());
        assert_eq!(new_waits(&[], &waiting), vec![announced]);
        assert_eq!(new_waits(&waiting, &waiting), vec![], "the same wait is not announced again");
        let other = [condition("AccountReady", "False", "Conflict", "another cause")];
        assert_eq!(new_waits(&waiting, &other).len(), 1, "another cause is");
        assert_eq!(new_waits(&[], &[condition("AccountReady", "True", "Conflict", "x")]), vec![]);
    }
    use crate::{api::ExternalAccount, controller::observe::account_request};

    fn integration_account(
        options: &[(&str, &str)],
        recorded: Option<(Option<&str>, Option<&str>)>,
    ) -> IntegrationAccount {
        let spec: IntegrationAccountSpec = serde_json::from_value(serde_json::json!({
            "connectionRef": {"kind": "ClusterAppConnection", "name": "crm"},
            "secret": {"name": "billing-key"},
            "providerOptions": options.iter().copied().collect::<std::collections::BTreeMap<_, _>>(),
        }))
        .expect("a spec");
        let mut account = IntegrationAccount::new("billing", spec);
        account.metadata.namespace = Some("payments".into());
        account.status = recorded.map(|(name, requested)| IntegrationAccountStatus {
            account: Some(ExternalAccount {
                provider: "scim".into(),
                id: "1".into(),
                name: None,
                account_name: name.map(str::to_owned),
                requested_name: requested.map(str::to_owned),
                disabled: false,
                connection: None,
            }),
            ..IntegrationAccountStatus::default()
        });
        account
    }

    fn cluster_connection(provider: serde_json::Value, template: Option<&str>) -> ResolvedConnection {
        let mut spec = serde_json::json!({"provider": provider, "namespaceSelector": {}});
        if let Some(template) = template {
            spec["accountNameTemplate"] = template.into();
        }
        let connection: ClusterAppConnection =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "crm"}, "spec": spec})).expect("valid");
        ResolvedConnection::cluster(&connection)
    }

    #[test]
    fn accounts_are_named_by_the_template_once_and_keep_that_name() {
        let scim = cluster_connection(
            serde_json::json!({"scim": {"baseUrl": "https://crm.example.com/scim/v2", "tokenSecretRef": {"name": "t", "namespace": "ops"}}}),
            None,
        );
        let kubernetes = cluster_connection(serde_json::json!({"kubernetes": {}}), None);
        let custom = cluster_connection(serde_json::json!({"kubernetes": {}}), Some("int-{namespace}-{name}"));

        // A new account: the template, with its namespace in a shared target.
        let new = integration_account(&[], None);
        assert_eq!(account_request(&new, &scim).name, "payments.billing");
        assert_eq!(account_request(&new, &kubernetes).name, "billing", "ServiceAccounts are namespaced already");
        assert_eq!(account_request(&new, &custom).name, "int-payments-billing");
        let named = integration_account(&[("name", "payments.other")], None);
        assert_eq!(account_request(&named, &scim).name, "payments.payments.other", "{{name}} only fills the template");

        // Created under a name: that name stays, whatever the template says now.
        let created = integration_account(&[], Some((Some("billing-v1"), Some("billing"))));
        assert_eq!(account_request(&created, &scim).name, "billing-v1");
        // Created before names were recorded: the name it had then.
        let legacy = integration_account(&[], Some((None, None)));
        assert_eq!(account_request(&legacy, &scim).name, "billing");
    }
}
