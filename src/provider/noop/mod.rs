//! A provider that talks to nothing: accounts, roles and keys live in this
//! process's memory. It exists to measure what keysmith itself costs (its
//! apiserver traffic, memory and scheduling) without a target app's latency
//! or load in the picture; see `BENCHMARKS.md`.
//!
//! It is never selected by a connection's spec. The registry hands it out
//! only when both hold:
//!
//! - the operator runs with `KEYSMITH_ENABLE_NOOP_PROVIDER=1`, and
//! - the AppConnection (or ClusterAppConnection) carries the annotation
//!   `keysmith.dev/noop-provider: "true"`.
//!
//! Either alone does nothing: the connection's `spec.provider` is used as
//! usual. Because its state is in memory, an operator restart forgets every
//! account (keysmith then recreates them and reissues their keys, as it
//! would for accounts deleted in a real target app).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Mutex,
};

use async_trait::async_trait;
use rand::Rng;

use super::{
    AccountRequest, Capabilities, IssuedKey, KeyMaterial, KeyRequest, ObservedAccount, ObservedKey, Provider,
    ProviderError, RoleGrant,
};

/// The environment variable that allows the no-op provider at all.
pub const ENABLE_ENV: &str = "KEYSMITH_ENABLE_NOOP_PROVIDER";
/// The connection annotation that selects it (value `"true"`).
pub const ANNOTATION: &str = "keysmith.dev/noop-provider";

/// Whether this process allows the no-op provider (`KEYSMITH_ENABLE_NOOP_PROVIDER=1`).
pub fn enabled_by_env() -> bool {
    std::env::var(ENABLE_ENV).is_ok_and(|v| v == "1")
}

/// Whether a connection's annotations ask for the no-op provider.
pub fn requested(annotations: &BTreeMap<String, String>) -> bool {
    annotations.get(ANNOTATION).is_some_and(|v| v == "true")
}

#[derive(Debug, Default)]
struct Account {
    owner_uid: String,
    disabled: bool,
    roles: BTreeSet<RoleGrant>,
    keys: Vec<ObservedKey>,
}

/// The in-memory provider.
#[derive(Debug, Default)]
pub struct NoopProvider {
    accounts: Mutex<HashMap<(String, String), Account>>,
}

impl NoopProvider {
    /// An empty target.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<(String, String), Account>) -> T) -> T {
        let mut accounts = self.accounts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut accounts)
    }
}

fn key_of(account: &AccountRequest) -> (String, String) {
    (account.namespace.clone(), account.name.clone())
}

fn observed(request: &AccountRequest, account: &Account) -> ObservedAccount {
    ObservedAccount {
        id: format!("{}/{}", request.namespace, request.name),
        name: request.name.clone(),
        disabled: account.disabled,
        owned: account.owner_uid == request.owner_uid,
        drifted: false,
    }
}

fn not_found(account: &AccountRequest) -> ProviderError {
    ProviderError::NotFound(format!("account {}/{}", account.namespace, account.name))
}

#[async_trait]
impl Provider for NoopProvider {
    fn name(&self) -> &'static str {
        "noop"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { last_use_lag: None, max_keys_per_account: None, key_expiry: false, disable: true }
    }

    async fn verify_connection(&self) -> Result<(), ProviderError> {
        Ok(())
    }

    async fn observe_account(&self, account: &AccountRequest) -> Result<Option<ObservedAccount>, ProviderError> {
        Ok(self.with(|all| all.get(&key_of(account)).map(|a| observed(account, a))))
    }

    async fn create_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        self.with(|all| {
            let entry = all
                .entry(key_of(account))
                .or_insert_with(|| Account { owner_uid: account.owner_uid.clone(), ..Account::default() });
            if entry.owner_uid != account.owner_uid {
                return Err(ProviderError::Conflict(format!(
                    "account {}/{} belongs to another IntegrationAccount",
                    account.namespace, account.name
                )));
            }
            Ok(observed(account, entry))
        })
    }

    async fn update_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        self.with(|all| match all.get_mut(&key_of(account)) {
            Some(found) if found.owner_uid == account.owner_uid => {
                found.disabled = false;
                Ok(observed(account, found))
            }
            Some(_) => Err(ProviderError::Conflict("the account belongs to another IntegrationAccount".into())),
            None => Err(not_found(account)),
        })
    }

    async fn disable_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        self.with(|all| {
            if let Some(found) = all.get_mut(&key_of(account)).filter(|a| a.owner_uid == account.owner_uid) {
                found.disabled = true;
                found.keys.clear();
            }
        });
        Ok(())
    }

    async fn delete_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        self.with(|all| {
            if all.get(&key_of(account)).is_some_and(|a| a.owner_uid == account.owner_uid) {
                all.remove(&key_of(account));
            }
        });
        Ok(())
    }

    async fn list_roles(&self, account: &AccountRequest) -> Result<Vec<RoleGrant>, ProviderError> {
        Ok(self.with(|all| all.get(&key_of(account)).map(|a| a.roles.iter().cloned().collect()).unwrap_or_default()))
    }

    async fn grant_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        self.with(|all| match all.get_mut(&key_of(account)) {
            Some(found) => {
                found.roles.insert(grant.clone());
                Ok(())
            }
            None => Err(not_found(account)),
        })
    }

    async fn revoke_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        self.with(|all| {
            if let Some(found) = all.get_mut(&key_of(account)) {
                found.roles.remove(grant);
            }
        });
        Ok(())
    }

    async fn issue_key(&self, account: &AccountRequest, request: &KeyRequest) -> Result<IssuedKey, ProviderError> {
        let token: String = {
            let mut rng = rand::rng();
            (0..32).map(|_| char::from(b'a' + rng.random_range(0..26u8))).collect()
        };
        self.with(|all| match all.get_mut(&key_of(account)) {
            Some(found) => {
                found.keys.push(ObservedKey {
                    last_used: None,
                    id: request.key_id.clone(),
                    created_at: Some(jiff::Timestamp::now()),
                });
                Ok(IssuedKey {
                    id: request.key_id.clone(),
                    expires_at: None,
                    material: KeyMaterial::new(BTreeMap::from([("token".to_owned(), token)])),
                })
            }
            None => Err(not_found(account)),
        })
    }

    async fn list_keys(&self, account: &AccountRequest) -> Result<Vec<ObservedKey>, ProviderError> {
        Ok(self.with(|all| all.get(&key_of(account)).map(|a| a.keys.clone()).unwrap_or_default()))
    }

    async fn revoke_key(&self, account: &AccountRequest, key_id: &str) -> Result<(), ProviderError> {
        self.with(|all| {
            if let Some(found) = all.get_mut(&key_of(account)) {
                found.keys.retain(|k| k.id != key_id);
            }
        });
        Ok(())
    }

    async fn verify_key(&self, account: &AccountRequest, key: &IssuedKey) -> Result<(), ProviderError> {
        let live = self.with(|all| all.get(&key_of(account)).is_some_and(|a| a.keys.iter().any(|k| k.id == key.id)));
        if live {
            Ok(())
        } else {
            Err(ProviderError::Invalid(format!("key {} is not live", key.id)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uid: &str) -> AccountRequest {
        AccountRequest {
            name: "ci".into(),
            namespace: "team".into(),
            account_name: "ci".into(),
            owner_uid: uid.into(),
            description: None,
            owner: None,
            options: BTreeMap::new(),
        }
    }

    #[test]
    fn selection_needs_the_annotation_set_to_true() {
        assert!(!requested(&BTreeMap::new()));
        assert!(!requested(&BTreeMap::from([(ANNOTATION.to_owned(), "false".to_owned())])));
        assert!(requested(&BTreeMap::from([(ANNOTATION.to_owned(), "true".to_owned())])));
    }

    #[tokio::test]
    async fn accounts_roles_and_keys_round_trip() {
        let p = NoopProvider::new();
        let a = request("uid-1");
        assert_eq!(p.observe_account(&a).await.expect("observe"), None);
        assert!(p.create_account(&a).await.expect("create").owned);
        assert!(matches!(p.create_account(&request("uid-2")).await, Err(ProviderError::Conflict(_))));
        let grant = RoleGrant { role: "view".into(), scope: None };
        p.grant_role(&a, &grant).await.expect("grant");
        assert_eq!(p.list_roles(&a).await.expect("roles"), vec![grant]);
        let key = p.issue_key(&a, &KeyRequest { key_id: "k1".into(), lifetime: None }).await.expect("issue");
        p.verify_key(&a, &key).await.expect("verify");
        p.revoke_key(&a, "k1").await.expect("revoke");
        assert!(p.list_keys(&a).await.expect("keys").is_empty());
        assert!(p.verify_key(&a, &key).await.is_err());
        p.delete_account(&a).await.expect("delete");
        assert_eq!(p.observe_account(&a).await.expect("observe"), None);
    }
}
