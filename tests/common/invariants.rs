//! What must hold of an account once it has converged, checked against the
//! target app itself: the crash and load campaigns (RELIABILITY.md) share it.
//!
//! Test files include it with `#[path = "common/invariants.rs"] mod invariants;`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;
use keysmith::{
    api::{IntegrationAccount, KeyState},
    provider::{AccountRequest, IssuedKey, KeyMaterial, Provider},
};
use kube::{api::Api, Client, ResourceExt};

/// The provider's view of `account`, as the operator builds it.
pub fn request(account: &IntegrationAccount) -> AccountRequest {
    AccountRequest {
        name: account.name_any(),
        namespace: account.namespace().unwrap_or_default(),
        account_name: account.name_any(),
        owner_uid: account.uid().unwrap_or_default(),
        description: None,
        owner: None,
        options: account.spec.provider_options.clone(),
    }
}

/// The invariants of a converged account; the violations found:
///
/// - every key the target holds is tracked in status (current or
///   retiring), and every key status calls live is in the target;
/// - no more keys than `limit`;
/// - nothing pending is left in status;
/// - the account exists in the target, owned and enabled;
/// - the output Secret holds the current key, and the key works against
///   the target.
pub async fn converged(
    client: &Client,
    provider: &dyn Provider,
    account: &IntegrationAccount,
    limit: usize,
) -> Vec<String> {
    let mut violations = Vec::new();
    let ns = account.namespace().unwrap_or_default();
    let status = account.status.clone().unwrap_or_default();
    let request = request(account);
    let in_target: BTreeSet<String> = match provider.list_keys(&request).await {
        Ok(keys) => keys.into_iter().map(|k| k.id).collect(),
        Err(error) => return vec![format!("cannot list keys: {error}")],
    };
    let current = status.current_key.as_ref().map(|c| c.id.clone());
    let tracked: BTreeSet<String> = status
        .keys
        .iter()
        .filter(|k| k.state == KeyState::Retiring || Some(&k.id) == current.as_ref())
        .map(|k| k.id.clone())
        .collect();
    for id in in_target.difference(&tracked) {
        violations.push(format!("key {id} is in the target but not tracked in status"));
    }
    for id in tracked.difference(&in_target) {
        violations.push(format!("key {id} is tracked as live but not in the target"));
    }
    if in_target.len() > limit {
        violations.push(format!("{} keys in the target, limit {limit}", in_target.len()));
    }
    if status.pending.is_some() || status.keys.iter().any(|k| matches!(k.state, KeyState::Pending | KeyState::Issued)) {
        violations.push("status still has a pending key".into());
    }
    match provider.observe_account(&request).await {
        Ok(Some(a)) if a.owned && !a.disabled => {}
        other => violations.push(format!("the account in the target is {other:?}")),
    }
    let secret = Api::<Secret>::namespaced(client.clone(), &ns).get(&account.spec.secret.name).await;
    match secret {
        Ok(secret) => {
            let id = secret.metadata.annotations.as_ref().and_then(|a| a.get("keysmith.dev/key-id")).cloned();
            if id != current {
                violations.push(format!("the Secret holds {id:?}, status says {current:?}"));
            }
            let material: BTreeMap<String, String> = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                .collect();
            let key = IssuedKey { id: id.unwrap_or_default(), expires_at: None, material: KeyMaterial::new(material) };
            if let Err(error) = provider.verify_key(&request, &key).await {
                violations.push(format!("the Secret's key does not work: {error}"));
            }
        }
        Err(error) => violations.push(format!("no output Secret: {error}")),
    }
    violations
}

/// What deletion must leave in the target, per deletionPolicy: nothing
/// (`Delete`), a disabled account without keys (`Disable`), the account and
/// its keys (`Orphan`).
pub async fn deleted(provider: &dyn Provider, request: &AccountRequest, policy: &str) -> Vec<String> {
    let observed = provider.observe_account(request).await;
    let keys = provider.list_keys(request).await.map(|k| k.len()).unwrap_or(0);
    match (policy, observed) {
        ("Delete", Ok(None)) if keys == 0 => vec![],
        ("Disable", Ok(Some(a))) if a.disabled && keys == 0 => vec![],
        ("Orphan", Ok(Some(a))) if !a.disabled && keys >= 1 => vec![],
        (policy, observed) => vec![format!("after deletion ({policy}): account {observed:?}, {keys} key(s)")],
    }
}
