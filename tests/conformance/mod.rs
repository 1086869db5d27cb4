//! The provider conformance suite: one set of behaviours every provider must
//! show against its real target app. A provider's test file implements
//! [`Target`] and calls [`run_all`].
#![allow(dead_code)]

use std::{sync::Arc, time::Duration};

use keysmith::provider::{
    guard::Guarded, ratelimit::TokenBucket, AccountRequest, IssuedKey, KeyRequest, Provider, ProviderError, RoleGrant,
};

use crate::common::fault_proxy::{Fault, FaultProxy};

/// A real target app, set up for the suite.
#[async_trait::async_trait]
pub trait Target: Send + Sync {
    /// The provider, talking to the target directly.
    fn provider(&self) -> Arc<dyn Provider>;
    /// The upstream URL and an HTTP client that reaches it (for the fault proxy).
    fn upstream(&self) -> (String, reqwest::Client);
    /// The provider, talking through an HTTP proxy at `url`, with a request
    /// timeout of about two seconds.
    async fn provider_via(&self, url: &str) -> Arc<dyn Provider>;
    /// A provider whose admin credential the target refuses.
    async fn refused_provider(&self) -> Arc<dyn Provider>;
    /// A fresh account request named after `name` (unique per call site).
    fn account(&self, name: &str) -> AccountRequest;
    /// Two roles that exist in the target.
    fn roles(&self) -> [RoleGrant; 2];
    /// Creates, by hand, an account called `name` that keysmith does not own.
    async fn make_foreign_account(&self, name: &str);
    /// Whether the target accepts `key` right now.
    async fn key_works(&self, key: &IssuedKey) -> bool;
}

async fn eventually_key(target: &dyn Target, key: &IssuedKey, works: bool) {
    // Some targets cache authentication for a few seconds (kube-apiserver: ~10 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while target.key_works(key).await != works {
        assert!(std::time::Instant::now() < deadline, "key {} should {}work", key.id, if works { "" } else { "not " });
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Create is idempotent; an account keysmith does not own is never adopted.
pub async fn create_is_idempotent_and_adopts_nothing(target: &dyn Target) {
    let p = target.provider();
    let account = target.account("idem");
    assert_eq!(p.observe_account(&account).await.unwrap(), None);
    let first = p.create_account(&account).await.unwrap();
    let second = p.create_account(&account).await.unwrap();
    assert_eq!(first.id, second.id, "create twice: same account");
    let seen = p.observe_account(&account).await.unwrap().expect("observed");
    assert!(seen.owned && !seen.drifted, "{seen:?}");

    let foreign = target.account("foreign");
    target.make_foreign_account(&foreign.name).await;
    let seen = p.observe_account(&foreign).await.unwrap().expect("the foreign account is visible");
    assert!(!seen.owned, "an account keysmith did not create is not owned");
    match p.create_account(&foreign).await {
        Err(ProviderError::Conflict(message)) => assert!(!message.is_empty()),
        other => panic!("adopting a foreign account must be a Conflict, got {other:?}"),
    }
    p.delete_account(&account).await.unwrap();
}

/// An account keysmith made for one IntegrationAccount is never taken over
/// through another of the same name (another tenant's, or the same object
/// deleted and re-created): the target app's account carries the first one's
/// uid, and every call made for the second leaves it, its roles and its key
/// exactly as they were.
pub async fn another_integration_accounts_account_is_never_taken_over(target: &dyn Target) {
    let p = target.provider();
    let owner = target.account("taken");
    p.create_account(&owner).await.unwrap();
    let [a, b] = target.roles();
    p.grant_role(&owner, &a).await.unwrap();
    let held = p.list_roles(&owner).await.unwrap();
    let request = |id: &str| KeyRequest { key_id: id.into(), lifetime: Some(Duration::from_secs(3600)) };
    let key = p.issue_key(&owner, &request("owner-key")).await.unwrap();
    eventually_key(target, &key, true).await;

    let intruder = AccountRequest {
        owner_uid: format!("{}-intruder", owner.owner_uid),
        account_name: format!("{}-intruder", owner.account_name),
        ..owner.clone()
    };
    match p.observe_account(&intruder).await.unwrap() {
        Some(seen) => {
            assert!(!seen.owned, "another IntegrationAccount's account is not owned");
            match p.create_account(&intruder).await {
                Err(ProviderError::Conflict(_)) => {}
                other => panic!("creating over another IntegrationAccount's account must be a Conflict, got {other:?}"),
            }
            assert!(p.update_account(&intruder).await.is_err(), "update through another IntegrationAccount");
            assert!(p.grant_role(&intruder, &b).await.is_err(), "a grant through another IntegrationAccount");
            assert!(p.issue_key(&intruder, &request("intruder-key")).await.is_err(), "a key through another one");
        }
        // A target whose accounts keysmith finds only through what it
        // registered itself (OAuth 2.0 dynamic registration) cannot even see
        // the other's: the intruder gets an account of its own.
        None => {
            let own = p.create_account(&intruder).await.unwrap();
            assert_ne!(own.id, seen_owner_id(p.as_ref(), &owner).await, "a new account, not the owner's");
        }
    }
    // Revoking, disabling and deleting what is not ours may succeed (there
    // is nothing of ours to act on) or fail, but must change nothing.
    let _ = p.revoke_key(&intruder, &key.id).await;
    let _ = p.revoke_role(&intruder, &a).await;
    let _ = p.disable_account(&intruder).await;
    let _ = p.delete_account(&intruder).await;

    let seen = p.observe_account(&owner).await.unwrap().expect("still there");
    assert!(seen.owned && !seen.disabled, "{seen:?}");
    assert_eq!(p.list_roles(&owner).await.unwrap(), held, "its roles are as they were");
    let ids: Vec<String> = p.list_keys(&owner).await.unwrap().into_iter().map(|k| k.id).collect();
    assert_eq!(ids, vec![key.id.clone()], "its key is as it was");
    eventually_key(target, &key, true).await;
    p.delete_account(&owner).await.unwrap();
}

async fn seen_owner_id(p: &dyn Provider, owner: &AccountRequest) -> String {
    p.observe_account(owner).await.unwrap().expect("the owner's account").id
}

/// Delete removes the account, and deleting what is gone succeeds.
pub async fn delete_tolerates_not_found(target: &dyn Target) {
    let p = target.provider();
    let account = target.account("gone");
    p.delete_account(&account).await.expect("deleting what never existed is fine");
    p.create_account(&account).await.unwrap();
    p.delete_account(&account).await.unwrap();
    assert_eq!(p.observe_account(&account).await.unwrap(), None);
    p.delete_account(&account).await.expect("deleting twice is fine");
}

/// Roles are granted and revoked, and list_roles says exactly what is held.
pub async fn role_sync_adds_and_removes(target: &dyn Target) {
    let p = target.provider();
    let account = target.account("roles");
    p.create_account(&account).await.unwrap();
    let [a, b] = target.roles();
    let normal =
        |g: &RoleGrant| RoleGrant { role: g.role.clone(), scope: g.scope.clone().or(p.default_scope(&account)) };
    assert!(p.list_roles(&account).await.unwrap().is_empty());
    p.grant_role(&account, &a).await.unwrap();
    p.grant_role(&account, &a).await.expect("granting twice is fine");
    p.grant_role(&account, &b).await.unwrap();
    let mut held = p.list_roles(&account).await.unwrap();
    held.sort();
    let mut want = vec![normal(&a), normal(&b)];
    want.sort();
    assert_eq!(held, want);
    p.revoke_role(&account, &a).await.unwrap();
    p.revoke_role(&account, &a).await.expect("revoking twice is fine");
    assert_eq!(p.list_roles(&account).await.unwrap(), vec![normal(&b)]);
    p.delete_account(&account).await.unwrap();
}

/// Keys are issued, verified, listed and revoked; the key limit holds.
pub async fn keys_issue_verify_and_revoke(target: &dyn Target) {
    let p = target.provider();
    let account = target.account("keys");
    p.create_account(&account).await.unwrap();
    let request = |id: &str| KeyRequest { key_id: id.into(), lifetime: Some(Duration::from_secs(3600)) };
    let first = p.issue_key(&account, &request("k1")).await.unwrap();
    p.verify_key(&account, &first).await.expect("a fresh key verifies");
    eventually_key(target, &first, true).await;
    // Identifiers may show in Debug (an AWS access key id is the key's id);
    // secret values may not.
    let debug = format!("{first:?}");
    for (name, value) in first.material.expose() {
        let secret = ["token", "password", "client_secret", "AWS_SECRET_ACCESS_KEY", "kubeconfig", "uri"]
            .contains(&name.as_str());
        if secret {
            assert!(!debug.contains(value.as_str()), "Debug of an issued key shows its {name}");
        }
    }
    let ids: Vec<String> = p.list_keys(&account).await.unwrap().into_iter().map(|k| k.id).collect();
    assert_eq!(ids, vec![first.id.clone()]);

    match p.capabilities().max_keys_per_account {
        Some(1) => {
            // One key at a time: a new key replaces the old one.
            let second = p.issue_key(&account, &request("k2")).await.unwrap();
            eventually_key(target, &second, true).await;
            eventually_key(target, &first, false).await;
            p.revoke_key(&account, &second.id).await.unwrap();
            eventually_key(target, &second, false).await;
        }
        limit => {
            let second = p.issue_key(&account, &request("k2")).await.unwrap();
            eventually_key(target, &second, true).await;
            eventually_key(target, &first, true).await;
            if let Some(limit) = limit {
                let mut extra = Vec::new();
                for n in 2..limit {
                    extra.push(p.issue_key(&account, &request(&format!("k{}", n + 1))).await.unwrap());
                }
                match p.issue_key(&account, &request("over")).await {
                    Err(ProviderError::LimitExceeded(_)) => {}
                    other => panic!("key {} of a {limit}-key limit must be LimitExceeded, got {other:?}", limit + 1),
                }
                for key in extra {
                    p.revoke_key(&account, &key.id).await.unwrap();
                }
            }
            p.revoke_key(&account, &first.id).await.unwrap();
            p.revoke_key(&account, &first.id).await.expect("revoking twice is fine");
            eventually_key(target, &first, false).await;
            eventually_key(target, &second, true).await;
            let ids: Vec<String> = p.list_keys(&account).await.unwrap().into_iter().map(|k| k.id).collect();
            assert_eq!(ids, vec![second.id.clone()]);
        }
    }
    p.delete_account(&account).await.unwrap();
}

/// A refused admin credential is Unauthorized, not a transient failure.
pub async fn refused_credential_is_unauthorized(target: &dyn Target) {
    let p = target.refused_provider().await;
    match p.verify_connection().await {
        Err(ProviderError::Unauthorized(message)) => assert!(!message.is_empty()),
        other => panic!("a refused credential must be Unauthorized, got {other:?}"),
    }
}

/// 429 carries the target's Retry-After; 5xx and timeouts are transient.
pub async fn throttling_and_outages_are_transient(target: &dyn Target) {
    let (upstream, client) = target.upstream();
    let proxy = FaultProxy::start(&upstream, client).await;
    let p = target.provider_via(&proxy.url).await;
    let account = target.account("faults");
    p.observe_account(&account).await.expect("the proxy passes requests through");

    // Either the provider's client retries by itself, after the target's
    // Retry-After, or it hands the delay up for the controller to honour.
    proxy.inject(Fault::Status(429, Some(2)), 1);
    let seen = proxy.requests().len();
    match p.observe_account(&account).await {
        Err(ProviderError::Transient { retry_after, .. }) => assert_eq!(retry_after, Some(Duration::from_secs(2))),
        Ok(_) => {
            let requests = &proxy.requests()[seen..];
            assert!(requests[0].injected && requests[0].status == 429, "{requests:?}");
            let waited = requests[1].at.duration_since(requests[0].at);
            assert!(waited >= Duration::from_millis(1900), "retried after {waited:?}, before the 2 s Retry-After");
        }
        Err(other) => panic!("429 must be retried or Transient with the Retry-After, got {other:?}"),
    }
    proxy.inject(Fault::Status(503, None), 1);
    let seen = proxy.requests().len();
    match p.observe_account(&account).await {
        Err(ProviderError::Transient { .. }) => {}
        Ok(_) => {
            let requests = &proxy.requests()[seen..];
            assert!(requests[0].injected && requests[0].status == 503 && requests.len() >= 2, "{requests:?}");
            assert!(requests[1].at > requests[0].at, "the retry comes after the failure");
        }
        Err(other) => panic!("503 must be retried or Transient, got {other:?}"),
    }
    proxy.inject(Fault::Delay(Duration::from_secs(8)), 1);
    let started = std::time::Instant::now();
    match p.observe_account(&account).await {
        Err(ProviderError::Transient { .. }) => {}
        other => panic!("a timeout must be Transient, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(8), "the provider gives up before the target answers");
    p.observe_account(&account).await.expect("after the faults, calls succeed again");
    assert!(proxy.requests().iter().filter(|r| r.injected).count() >= 2);
}

/// Many concurrent callers never exceed the connection's rate budget.
pub async fn rate_budget_is_never_exceeded(target: &dyn Target) {
    let (upstream, client) = target.upstream();
    let proxy = FaultProxy::start(&upstream, client).await;
    let (rate, burst) = (4.0, 2u32);
    let p: Arc<dyn Provider> =
        Arc::new(Guarded::new(target.provider_via(&proxy.url).await, Arc::new(TokenBucket::new(rate, burst))));
    let account = target.account("budget");
    // How many HTTP requests one call makes: the budget counts calls.
    p.observe_account(&account).await.unwrap();
    let per_call = proxy.requests().len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = proxy.requests().len();
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let (p, account) = (p.clone(), account.clone());
            tokio::spawn(async move { p.observe_account(&account).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let mut stamps: Vec<std::time::Instant> = proxy.requests()[before..].iter().map(|r| r.at).collect();
    stamps.sort();
    assert_eq!(stamps.len(), 16 * per_call);
    let allowed = (burst as usize + rate as usize) * per_call;
    for (i, start) in stamps.iter().enumerate() {
        let within = stamps[i..].iter().filter(|t| t.duration_since(*start) < Duration::from_secs(1)).count();
        assert!(within <= allowed, "{within} requests within one second; budget {rate} calls/s, burst {burst}");
    }
    let span = stamps.last().unwrap().duration_since(stamps[0]);
    assert!(span >= Duration::from_secs_f64((16.0 - f64::from(burst)) / rate * 0.9), "16 calls took only {span:?}");
}
