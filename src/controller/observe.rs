//! The observe step of the account reconcile: everything a decision about
//! one IntegrationAccount rests on, gathered into one value.
//!
//! Two places observe: the operator, from its caches (and the apiserver for
//! what the caches do not hold), and `keysmith plan`, from the apiserver with
//! a manifest file laid over it. Both implement [`Source`], and both then go
//! through [`gather`] and [`observe_target`], so what `plan` predicts is what
//! the operator would decide.
//!
//! ```text
//! gather (connection, policy, Secret, roles) → observe_target (target app)
//!   → plan::plan (pure) → apply (calls, outcomes) → status (pure)
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use async_trait::async_trait;
use k8s_openapi::{
    api::core::v1::{Namespace, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{core::SelectorExt, runtime::reflector::ObjectRef, Api, Resource as _, ResourceExt};

use super::{
    secret::{ownership, SecretOwnership},
    Context, Error,
};
use crate::{
    api::{
        condition_types::{ACCOUNT_READY, KEY_READY, ROLES_SYNCED},
        AppConnection, ClusterAppConnection, ConnectionKind, IntegrationAccount, IntegrationAccountStatus,
        KeyRotationPolicy, RestartTarget, RoleBinding,
    },
    controller::plan::{HeldKey, PlanInput, Rollout},
    policy::{RolePolicy, Verdict},
    provider::{AccountRequest, ObservedAccount, ObservedKey, Provider, ProviderError, ResolvedConnection, RoleGrant},
    schedule::RotationSchedule,
    tenancy::{self, ScopePolicy, Tenancy},
};

pub use crate::tenancy::ConnectionProblem;

/// Set this annotation to a new value (a timestamp, say) to rotate now.
pub const ROTATE_NOW_ANNOTATION: &str = "keysmith.dev/rotate-now";

/// Where the observe step reads the cluster's side: the operator's caches,
/// or the apiserver with a manifest file laid over it (`keysmith plan`).
#[async_trait]
pub trait Source: Send + Sync {
    /// The operator-wide tenancy settings.
    fn tenancy(&self) -> &Tenancy;
    /// An AppConnection.
    async fn app_connection(&self, namespace: &str, name: &str) -> Result<Option<Arc<AppConnection>>, Error>;
    /// A ClusterAppConnection.
    async fn cluster_connection(&self, name: &str) -> Result<Option<Arc<ClusterAppConnection>>, Error>;
    /// A namespace's labels, if it exists.
    async fn namespace_labels(&self, namespace: &str) -> Result<Option<BTreeMap<String, String>>, Error>;
    /// The provider client for a connection.
    async fn provider(&self, connection: &ResolvedConnection) -> Result<Arc<dyn Provider>, ProviderError>;
    /// A KeyRotationPolicy.
    async fn rotation_policy(&self, namespace: &str, name: &str) -> Result<Option<Arc<KeyRotationPolicy>>, Error>;
    /// The metadata of a Secret, whoever made it.
    async fn secret(&self, namespace: &str, name: &str) -> Result<Option<ObjectMeta>, Error>;
    /// The keysmith RoleBindings of a namespace.
    async fn bindings(&self, namespace: &str) -> Result<Vec<Arc<RoleBinding>>, Error>;
}

/// The operator reads its caches; only a Secret the label-selected cache
/// cannot see, and a namespace's labels, come from the apiserver.
#[async_trait]
impl Source for Context {
    fn tenancy(&self) -> &Tenancy {
        self.providers.tenancy()
    }

    async fn app_connection(&self, namespace: &str, name: &str) -> Result<Option<Arc<AppConnection>>, Error> {
        Ok(self.stores.connections.get(&ObjectRef::new(name).within(namespace)))
    }

    async fn cluster_connection(&self, name: &str) -> Result<Option<Arc<ClusterAppConnection>>, Error> {
        Ok(self.stores.cluster_connections.get(&ObjectRef::new(name)))
    }

    async fn namespace_labels(&self, namespace: &str) -> Result<Option<BTreeMap<String, String>>, Error> {
        let ns = Api::<Namespace>::all(self.client.clone()).get_metadata_opt(namespace).await?;
        Ok(ns.map(|ns| ns.labels().clone()))
    }

    /// Given the connection object's annotations from the caches (the no-op
    /// provider marker, see [`crate::provider::noop`]).
    async fn provider(&self, connection: &ResolvedConnection) -> Result<Arc<dyn Provider>, ProviderError> {
        let annotations = match connection.kind {
            ConnectionKind::AppConnection => self
                .stores
                .connections
                .get(&ObjectRef::new(&connection.name).within(connection.namespace.as_deref().unwrap_or_default()))
                .map(|c| c.annotations().clone()),
            ConnectionKind::ClusterAppConnection => {
                self.stores.cluster_connections.get(&ObjectRef::new(&connection.name)).map(|c| c.annotations().clone())
            }
        }
        .unwrap_or_default();
        self.providers.provider_for_annotated(connection, &annotations).await
    }

    async fn rotation_policy(&self, namespace: &str, name: &str) -> Result<Option<Arc<KeyRotationPolicy>>, Error> {
        Ok(self.stores.policies.get(&ObjectRef::new(name).within(namespace)))
    }

    async fn secret(&self, namespace: &str, name: &str) -> Result<Option<ObjectMeta>, Error> {
        if let Some(cached) = self.stores.secrets.get(&ObjectRef::new(name).within(namespace)) {
            return Ok(Some(cached.metadata.clone()));
        }
        // A Secret by that name that the label-selected cache cannot see is
        // not ours, but it is there.
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        Ok(api.get_metadata_opt(name).await?.map(|m| m.metadata))
    }

    async fn bindings(&self, namespace: &str) -> Result<Vec<Arc<RoleBinding>>, Error> {
        Ok(self.stores.bindings.state().into_iter().filter(|b| b.namespace().as_deref() == Some(namespace)).collect())
    }
}

/// A problem that stops the reconcile before the target app is asked
/// anything: the condition it sets, and why. It waits for a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// AccountReady, RolesSynced or KeyReady.
    pub condition: &'static str,
    /// CamelCase.
    pub reason: &'static str,
    /// For users.
    pub message: String,
}

/// Why the observe step stopped short of the target app.
#[derive(Debug)]
pub enum Halt {
    /// A problem only a change can fix.
    Problem(Problem),
    /// `spec.suspend` is true.
    Suspended,
    /// The provider could not be built (its credentials, say).
    Provider(ProviderError),
}

/// What the output Secret says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretState {
    /// The key id it holds, if it is keysmith's Secret for this account.
    pub key_id: Option<String>,
    /// It exists and is someone else's: keysmith will not write it.
    pub foreign: bool,
}

/// Everything on the cluster's side a decision rests on.
pub struct Gathered {
    /// The connection the account uses, resolved and admitted.
    pub connection: ResolvedConnection,
    /// Its provider.
    pub provider: Arc<dyn Provider>,
    /// The account request the provider acts on.
    pub request: AccountRequest,
    /// The parsed rotation policy, if the account names one that exists and is valid.
    pub schedule: Option<RotationSchedule>,
    /// Its restart targets.
    pub restart_targets: Vec<RestartTarget>,
    /// The rotation policy is missing or invalid: no key may be issued.
    pub policy_problem: Option<Problem>,
    /// The output Secret.
    pub secret: SecretState,
    /// The roles the RoleBindings grant, after the connection's policy.
    pub desired: BTreeSet<RoleGrant>,
    /// Roles the RoleBindings declare that the connection's policy refuses.
    pub denied: Vec<String>,
    /// The most keys the account may hold.
    pub max_keys: usize,
}

impl Gathered {
    /// Whether a key may be issued: the policy is usable and the Secret is
    /// keysmith's to write.
    pub fn keys_blocked(&self) -> bool {
        self.policy_problem.is_some() || self.secret.foreign
    }
}

/// The observe step on the cluster's side: connection (and admission),
/// suspension, provider, naming, rotation policy, output Secret, roles.
pub async fn gather(account: &IntegrationAccount, source: &dyn Source) -> Result<Result<Gathered, Halt>, Error> {
    // connectionRef is immutable: the CRD's CEL rule has the apiserver
    // refuse any change (tests/api.rs), so the connection is the one the
    // account was provisioned under.
    let connection = match resolve_connection(account, source).await? {
        Ok(connection) => connection,
        Err(problem) => {
            return Ok(Err(Halt::Problem(Problem {
                condition: ACCOUNT_READY,
                reason: problem.reason,
                message: problem.message,
            })))
        }
    };
    if account.spec.suspend {
        return Ok(Err(Halt::Suspended));
    }
    let provider = match source.provider(&connection).await {
        Ok(provider) => provider,
        Err(error) => return Ok(Err(Halt::Provider(error))),
    };
    let request = account_request(account, &connection);
    if let Some(problem) = naming_problem(account, &connection, provider.as_ref(), &request) {
        return Ok(Err(Halt::Problem(Problem {
            condition: ACCOUNT_READY,
            reason: problem.reason,
            message: problem.message,
        })));
    }

    let policy = match &account.spec.rotation_policy_ref {
        None => None,
        Some(reference) => source.rotation_policy(&request.namespace, &reference.name).await?,
    };
    let restart_targets = policy.as_ref().map(|p| p.spec.restart_targets.clone()).unwrap_or_default();
    let (schedule, policy_problem) = match &account.spec.rotation_policy_ref {
        None => (None, None),
        Some(reference) => match policy {
            None => (
                None,
                Some(Problem {
                    condition: KEY_READY,
                    reason: "RotationPolicyNotFound",
                    message: format!("KeyRotationPolicy {} does not exist", reference.name),
                }),
            ),
            Some(policy) => match RotationSchedule::from_spec(&policy.spec) {
                Ok(schedule) => (Some(schedule), None),
                Err(problems) => {
                    let messages: Vec<String> = problems.iter().map(ToString::to_string).collect();
                    (
                        None,
                        Some(Problem {
                            condition: KEY_READY,
                            reason: "RotationPolicyInvalid",
                            message: format!("KeyRotationPolicy {}: {}", reference.name, messages.join("; ")),
                        }),
                    )
                }
            },
        },
    };

    let secret_meta = source.secret(&request.namespace, &account.spec.secret.name).await?;
    let secret = match ownership(secret_meta.as_ref(), &request.owner_uid) {
        SecretOwnership::Ours { key_id } => SecretState { key_id, foreign: false },
        SecretOwnership::Absent => SecretState::default(),
        SecretOwnership::Foreign => SecretState { key_id: None, foreign: true },
    };

    let bindings = source.bindings(&request.namespace).await?;
    let desired =
        desired_roles(account, bindings.iter().map(AsRef::as_ref), &connection, provider.default_scope(&request));
    let role_policy = RolePolicy::for_connection(connection.kind, connection.spec.policy.as_ref());
    let denied = bindings
        .iter()
        .filter(|b| b.spec.account_ref.name == account.name_any() && b.meta().deletion_timestamp.is_none())
        .flat_map(|b| b.spec.roles.iter())
        .filter(|role| !matches!(role_policy.check(role), Verdict::Allowed))
        .cloned()
        .collect();
    let max_keys = max_keys(&connection, provider.as_ref());
    Ok(Ok(Gathered {
        connection,
        provider,
        request,
        schedule,
        restart_targets,
        policy_problem,
        secret,
        desired,
        denied,
        max_keys,
    }))
}

/// Finds the account's connection and checks the account may use it.
pub async fn resolve_connection(
    account: &IntegrationAccount,
    source: &dyn Source,
) -> Result<Result<ResolvedConnection, ConnectionProblem>, Error> {
    let reference = &account.spec.connection_ref;
    let namespace = account.namespace().unwrap_or_default();
    match reference.kind {
        ConnectionKind::AppConnection => Ok(match source.app_connection(&namespace, &reference.name).await? {
            Some(conn) => ResolvedConnection::namespaced(&conn, source.tenancy()),
            None => Err(ConnectionProblem {
                reason: "ConnectionNotFound",
                message: format!("AppConnection {namespace}/{} does not exist", reference.name),
            }),
        }),
        ConnectionKind::ClusterAppConnection => {
            let Some(conn) = source.cluster_connection(&reference.name).await? else {
                return Ok(Err(ConnectionProblem {
                    reason: "ConnectionNotFound",
                    message: format!("ClusterAppConnection {} does not exist", reference.name),
                }));
            };
            let admitted = match &conn.spec.namespace_selector {
                None => false,
                Some(selector) => match source.namespace_labels(&namespace).await? {
                    None => false,
                    Some(labels) => {
                        kube::core::Selector::try_from(selector.clone()).map(|s| s.matches(&labels)).unwrap_or(false)
                    }
                },
            };
            if !admitted {
                return Ok(Err(ConnectionProblem {
                    reason: "ConnectionNotAdmitted",
                    message: format!(
                        "ClusterAppConnection {}'s namespaceSelector does not admit namespace {namespace}",
                        reference.name
                    ),
                }));
            }
            Ok(Ok(ResolvedConnection::cluster(&conn)))
        }
    }
}

/// The account request the provider acts on. The account's name in the
/// target app is the one it was created under (recorded in status), else
/// its `providerOptions.name` or own name, put through the connection's
/// naming template (ClusterAppConnections: see [`ResolvedConnection::name_template`]).
pub fn account_request(account: &IntegrationAccount, connection: &ResolvedConnection) -> AccountRequest {
    let namespace = account.namespace().unwrap_or_default();
    AccountRequest {
        name: recorded_name(account).unwrap_or_else(|| wanted_name(account, connection)),
        namespace,
        account_name: account.name_any(),
        owner_uid: account.uid().unwrap_or_default(),
        description: account.spec.description.clone(),
        owner: account.spec.owner.clone(),
        options: account.spec.provider_options.clone(),
    }
}

/// The name the account was created under in the target app, if it was
/// created. One created before names were recorded kept its requested name.
fn recorded_name(account: &IntegrationAccount) -> Option<String> {
    let external = account.status.as_ref()?.account.as_ref()?;
    Some(external.account_name.clone().unwrap_or_else(|| requested_name(account)))
}

/// `providerOptions.name`, else the IntegrationAccount's own name.
pub fn requested_name(account: &IntegrationAccount) -> String {
    account.spec.provider_options.get("name").cloned().unwrap_or_else(|| account.name_any())
}

/// The name the spec and the connection give a new account in the target app.
fn wanted_name(account: &IntegrationAccount, connection: &ResolvedConnection) -> String {
    let requested = requested_name(account);
    match connection.name_template() {
        Some(template) => tenancy::account_name(&template, &account.namespace().unwrap_or_default(), &requested),
        None => requested,
    }
}

/// The roles the account's RoleBindings grant, after the connection's
/// policy (allowed and denied roles, allowed scopes), with each grant's
/// scope made explicit.
pub fn desired_roles<'a>(
    account: &IntegrationAccount,
    bindings: impl IntoIterator<Item = &'a RoleBinding>,
    connection: &ResolvedConnection,
    default_scope: Option<String>,
) -> BTreeSet<RoleGrant> {
    let policy = RolePolicy::for_connection(connection.kind, connection.spec.policy.as_ref());
    let namespace = account.namespace();
    let scopes = ScopePolicy::new(connection.spec.policy.as_ref(), namespace.as_deref().unwrap_or_default());
    bindings
        .into_iter()
        .filter(|b| b.namespace() == namespace && b.spec.account_ref.name == account.name_any())
        .filter(|b| b.meta().deletion_timestamp.is_none())
        .flat_map(|b| {
            let scope = b.spec.scope.clone().filter(|s| !s.is_empty()).or_else(|| default_scope.clone());
            b.spec
                .roles
                .iter()
                .map(move |role| RoleGrant { role: role.clone(), scope: scope.clone() })
                .collect::<Vec<_>>()
        })
        .filter(|grant| policy.check(&grant.role).is_allowed())
        .filter(|grant| grant.scope.as_deref().is_none_or(|s| scopes.allows(s)))
        .collect()
}

/// Why the account may not be (or stay) where its spec and connection put
/// it: a name other than the one it was created under, or (kubernetes) a
/// ServiceAccount namespace the connection's allowedScopes does not allow.
fn naming_problem(
    account: &IntegrationAccount,
    connection: &ResolvedConnection,
    provider: &dyn Provider,
    request: &AccountRequest,
) -> Option<ConnectionProblem> {
    let requested = requested_name(account);
    let recorded = account.status.as_ref().and_then(|s| s.account.as_ref()).and_then(|a| a.requested_name.clone());
    if let Some(recorded) = recorded.filter(|r| *r != requested) {
        return Some(ConnectionProblem {
            reason: "AccountNameChanged",
            message: format!(
                "the account was created in the target app as {:?} for the name {recorded:?}; providerOptions.name now asks for {requested:?}. An account is never renamed: restore providerOptions.name, or create a new IntegrationAccount",
                request.name
            ),
        });
    }
    let home = provider.default_scope(request)?;
    let scopes = ScopePolicy::new(connection.spec.policy.as_ref(), &request.namespace);
    (!scopes.allows(&home)).then(|| ConnectionProblem {
        reason: "NamespaceNotAllowed",
        message: format!(
            "the account would live in namespace {home:?} (providerOptions.namespace), which {}'s policy.allowedScopes does not allow; only the IntegrationAccount's own namespace {} and the namespaces listed there may be used",
            connection.display(),
            request.namespace
        ),
    })
}

/// The most keys an account may hold: the connection's limit, or the
/// provider's if lower.
pub fn max_keys(connection: &ResolvedConnection, provider: &dyn Provider) -> usize {
    let ours = usize::try_from(connection.spec.max_keys_per_account.max(1)).unwrap_or(2);
    match provider.capabilities().max_keys_per_account {
        Some(theirs) => ours.min(usize::try_from(theirs).unwrap_or(ours)),
        None => ours,
    }
}

/// What the target app says of an account: the account, and, when keysmith
/// owns it, its roles and keys.
#[derive(Debug, Clone, Default)]
pub struct TargetObservation {
    /// The account, if it exists.
    pub account: Option<ObservedAccount>,
    /// Its roles (none read unless keysmith owns it).
    pub roles: BTreeSet<RoleGrant>,
    /// Its keys (none read unless keysmith owns it).
    pub keys: Vec<ObservedKey>,
}

/// Observes the account in the target app; a failure names the condition
/// it concerns (AccountReady, RolesSynced or KeyReady).
pub async fn observe_target(
    provider: &dyn Provider,
    request: &AccountRequest,
) -> Result<TargetObservation, (&'static str, ProviderError)> {
    let account = provider.observe_account(request).await.map_err(|e| (ACCOUNT_READY, e))?;
    if !account.as_ref().is_some_and(|a| a.owned) {
        return Ok(TargetObservation { account, ..TargetObservation::default() });
    }
    let roles = provider.list_roles(request).await.map_err(|e| (ROLES_SYNCED, e))?;
    let keys = provider.list_keys(request).await.map_err(|e| (KEY_READY, e))?;
    Ok(TargetObservation { account, roles: roles.into_iter().collect(), keys })
}

/// Whether the account is dormant, where its policy asks and its provider
/// reports use (`status` with the last observation recorded, see
/// [`super::dormancy::record_use`]).
pub fn dormancy_of(
    now: jiff::Timestamp,
    account: &IntegrationAccount,
    status: &IntegrationAccountStatus,
    gathered: &Gathered,
) -> Option<super::dormancy::Dormancy> {
    let after = gathered.schedule.as_ref().and_then(RotationSchedule::dormant_after)?;
    gathered.provider.capabilities().last_use_lag?;
    let created = account.metadata.creation_timestamp.as_ref().map_or(now, |t| t.0);
    Some(super::dormancy::assess(now, after, status, created))
}

/// Whether the account is dormant, its policy disables dormant accounts,
/// and its provider can disable accounts.
pub fn disable_dormant(
    now: jiff::Timestamp,
    account: &IntegrationAccount,
    status: &IntegrationAccountStatus,
    gathered: &Gathered,
) -> bool {
    gathered.schedule.as_ref().is_some_and(RotationSchedule::disable_dormant)
        && gathered.provider.capabilities().disable
        && dormancy_of(now, account, status, gathered).is_some_and(|d| d.dormant)
}

/// The planner's input from an account, its status, what was gathered and
/// what the target app said: the operator and `keysmith plan` decide from
/// the same facts.
pub fn plan_input<'a>(
    now: jiff::Timestamp,
    account: &'a IntegrationAccount,
    status: &'a IntegrationAccountStatus,
    gathered: &'a Gathered,
    target: &'a TargetObservation,
    held: Option<HeldKey<'a>>,
    rollout: Option<&'a Rollout>,
) -> PlanInput<'a> {
    PlanInput {
        now,
        account: target.account.as_ref(),
        desired_roles: &gathered.desired,
        observed_roles: &target.roles,
        observed_keys: &target.keys,
        records: &status.keys,
        current: status.current_key.as_ref(),
        secret_key_id: gathered.secret.key_id.as_deref(),
        schedule: gathered.schedule.as_ref(),
        seed: account.metadata.uid.as_deref().unwrap_or_default(),
        rotate_request: account.annotations().get(ROTATE_NOW_ANNOTATION).map(String::as_str),
        last_rotation_request: status.last_rotation_request.as_deref(),
        max_keys: gathered.max_keys,
        held,
        keys_blocked: gathered.keys_blocked(),
        rollout,
        disable_dormant: disable_dormant(now, account, status, gathered),
        // Never shorter than the target's own delay in reporting a use (a
        // key in use would look idle).
        revoke_unused_after: gathered
            .schedule
            .as_ref()
            .and_then(RotationSchedule::revoke_unused_after)
            .and_then(|idle| gathered.provider.capabilities().last_use_lag.map(|lag| idle.max(lag))),
    }
}
