//! The one wrapper around every provider call. Each call first takes a token
//! from the connection's budget ([`TokenBucket`]), then runs in a tracing span
//! naming the provider and the operation, and is reported, timed and with its
//! outcome, to a [`CallObserver`] (the Prometheus metrics, in the operator).
//! The registry hands out only guarded providers, so no call skips any of it.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use tracing::Instrument as _;

use super::{
    ratelimit::TokenBucket, AccountRequest, Capabilities, IssuedKey, KeyRequest, ObservedAccount, ObservedKey,
    Provider, ProviderError, RoleGrant,
};

/// Told of every provider call once it completed.
pub trait CallObserver: Send + Sync {
    /// `outcome` is `ok` or the error's category; `elapsed` leaves out the
    /// wait for the budget.
    fn provider_call(&self, provider: &str, operation: &str, outcome: &str, elapsed: Duration);
}

/// A provider whose every call goes through the budget, a span and the observer.
pub struct Guarded {
    inner: Arc<dyn Provider>,
    bucket: Arc<TokenBucket>,
    observer: Option<Arc<dyn CallObserver>>,
    failpoints: crate::failpoints::Failpoints,
}

impl Guarded {
    /// Wraps `inner`, spending `bucket`'s tokens.
    pub fn new(inner: Arc<dyn Provider>, bucket: Arc<TokenBucket>) -> Self {
        Self { inner, bucket, observer: None, failpoints: crate::failpoints::Failpoints::default() }
    }

    /// Crashes at the armed step, before or after a call (tests only, see
    /// [`crate::failpoints`]).
    pub fn with_failpoints(mut self, failpoints: crate::failpoints::Failpoints) -> Self {
        self.failpoints = failpoints;
        self
    }

    /// Reports every call to `observer`.
    pub fn observed_by(mut self, observer: Arc<dyn CallObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    async fn call<T>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        self.bucket.acquire().await;
        // One line per token taken: the fault campaigns check the budget
        // against these times (RELIABILITY.md).
        tracing::debug!(provider = self.inner.name(), operation, "provider call");
        self.failpoints.before(operation);
        let started = Instant::now();
        let span = tracing::debug_span!("provider_call", provider = self.inner.name(), operation);
        let result = call.instrument(span).await;
        self.failpoints.after(operation);
        if let Some(observer) = &self.observer {
            let outcome = match &result {
                Ok(_) => "ok",
                Err(error) => error.category(),
            };
            observer.provider_call(self.inner.name(), operation, outcome, started.elapsed());
        }
        result
    }
}

#[async_trait]
impl Provider for Guarded {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn default_scope(&self, account: &AccountRequest) -> Option<String> {
        self.inner.default_scope(account)
    }
    async fn verify_connection(&self) -> Result<(), ProviderError> {
        self.call("verify_connection", self.inner.verify_connection()).await
    }
    async fn observe_account(&self, account: &AccountRequest) -> Result<Option<ObservedAccount>, ProviderError> {
        self.call("observe_account", self.inner.observe_account(account)).await
    }
    async fn create_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        self.call("create_account", self.inner.create_account(account)).await
    }
    async fn update_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        self.call("update_account", self.inner.update_account(account)).await
    }
    async fn disable_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        self.call("disable_account", self.inner.disable_account(account)).await
    }
    async fn delete_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        self.call("delete_account", self.inner.delete_account(account)).await
    }
    async fn list_roles(&self, account: &AccountRequest) -> Result<Vec<RoleGrant>, ProviderError> {
        self.call("list_roles", self.inner.list_roles(account)).await
    }
    async fn grant_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        self.call("grant_role", self.inner.grant_role(account, grant)).await
    }
    async fn revoke_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        self.call("revoke_role", self.inner.revoke_role(account, grant)).await
    }
    async fn issue_key(&self, account: &AccountRequest, request: &KeyRequest) -> Result<IssuedKey, ProviderError> {
        self.call("issue_key", self.inner.issue_key(account, request)).await
    }
    async fn list_keys(&self, account: &AccountRequest) -> Result<Vec<ObservedKey>, ProviderError> {
        self.call("list_keys", self.inner.list_keys(account)).await
    }
    async fn revoke_key(&self, account: &AccountRequest, key_id: &str) -> Result<(), ProviderError> {
        self.call("revoke_key", self.inner.revoke_key(account, key_id)).await
    }
    async fn verify_key(&self, account: &AccountRequest, key: &IssuedKey) -> Result<(), ProviderError> {
        self.call("verify_key", self.inner.verify_key(account, key)).await
    }
}
