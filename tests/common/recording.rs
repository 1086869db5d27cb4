//! A recording fake of a target app for in-process controller tests: the
//! no-op provider's in-memory accounts, with a journal of every call and
//! one-shot faults the test injects.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use keysmith::provider::{
    noop::NoopProvider, AccountRequest, Capabilities, IssuedKey, KeyRequest, ObservedAccount, ObservedKey, Provider,
    ProviderError, RoleGrant,
};

/// The no-op provider's in-memory target app, with a journal of every call
/// (`operation account args`) and one-shot faults by operation.
#[derive(Default)]
pub struct Recording {
    inner: NoopProvider,
    journal: Mutex<Vec<String>>,
    faults: Mutex<HashMap<&'static str, String>>,
    delays: Mutex<HashMap<&'static str, std::time::Duration>>,
}

impl Recording {
    /// A fresh fake, shared with the operator.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn note(&self, operation: &'static str, account: &AccountRequest, args: &str) -> Result<(), ProviderError> {
        self.journal.lock().unwrap().push(format!("{operation} {} {args}", account.account_name).trim_end().to_owned());
        match self.faults.lock().unwrap().remove(operation) {
            Some(message) => Err(ProviderError::Invalid(message)),
            None => Ok(()),
        }
    }

    pub fn fail_next(&self, operation: &'static str, message: &str) {
        self.faults.lock().unwrap().insert(operation, message.into());
    }

    /// The next call of `operation` takes `delay` longer (a slow target).
    pub fn slow_next(&self, operation: &'static str, delay: std::time::Duration) {
        self.delays.lock().unwrap().insert(operation, delay);
    }

    async fn pause(&self, operation: &'static str) {
        let delay = self.delays.lock().unwrap().remove(operation);
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
    }

    /// The calls so far that change something, for `account`.
    pub fn changes(&self, account: &str) -> Vec<String> {
        self.journal
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.split(' ').nth(1) == Some(account))
            .filter(|c| !c.starts_with("observe_") && !c.starts_with("list_"))
            .cloned()
            .collect()
    }

    pub fn count(&self, prefix: &str) -> usize {
        self.journal.lock().unwrap().iter().filter(|c| c.starts_with(prefix)).count()
    }
}

#[async_trait]
impl Provider for Recording {
    fn name(&self) -> &'static str {
        "noop"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn verify_connection(&self) -> Result<(), ProviderError> {
        self.inner.verify_connection().await
    }
    async fn observe_account(&self, account: &AccountRequest) -> Result<Option<ObservedAccount>, ProviderError> {
        self.note("observe_account", account, "")?;
        self.inner.observe_account(account).await
    }
    async fn create_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        self.note("create_account", account, &format!("name={}", account.name))?;
        self.inner.create_account(account).await
    }
    async fn update_account(&self, account: &AccountRequest) -> Result<ObservedAccount, ProviderError> {
        self.note("update_account", account, "")?;
        self.inner.update_account(account).await
    }
    async fn disable_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        self.note("disable_account", account, "")?;
        self.inner.disable_account(account).await
    }
    async fn delete_account(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        self.note("delete_account", account, "")?;
        self.inner.delete_account(account).await
    }
    async fn list_roles(&self, account: &AccountRequest) -> Result<Vec<RoleGrant>, ProviderError> {
        self.note("list_roles", account, "")?;
        self.inner.list_roles(account).await
    }
    async fn grant_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        self.note("grant_role", account, &grant.role)?;
        self.inner.grant_role(account, grant).await
    }
    async fn revoke_role(&self, account: &AccountRequest, grant: &RoleGrant) -> Result<(), ProviderError> {
        self.note("revoke_role", account, &grant.role)?;
        self.inner.revoke_role(account, grant).await
    }
    async fn issue_key(&self, account: &AccountRequest, request: &KeyRequest) -> Result<IssuedKey, ProviderError> {
        self.note("issue_key", account, &request.key_id)?;
        self.inner.issue_key(account, request).await
    }
    async fn list_keys(&self, account: &AccountRequest) -> Result<Vec<ObservedKey>, ProviderError> {
        self.note("list_keys", account, "")?;
        self.inner.list_keys(account).await
    }
    async fn revoke_key(&self, account: &AccountRequest, key_id: &str) -> Result<(), ProviderError> {
        self.note("revoke_key", account, key_id)?;
        self.inner.revoke_key(account, key_id).await
    }
    async fn verify_key(&self, account: &AccountRequest, key: &IssuedKey) -> Result<(), ProviderError> {
        self.note("verify_key", account, &key.id)?;
        self.pause("verify_key").await;
        self.inner.verify_key(account, key).await
    }
}

/// The controllers in this test's process (`controller::run_with`),
/// watching one namespace, with `fake` standing in for the target app of
/// every connection marked for the no-op provider ([`fake_connection`]).
pub struct InProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    /// Starts them. The test binary must have set
    /// `KEYSMITH_ENABLE_NOOP_PROVIDER=1` before any thread read the
    /// environment.
    pub async fn start(cp: &keysmith::controlplane::ControlPlane, namespace: &str, fake: &Arc<Recording>) -> Self {
        let client = cp.client().await.expect("admin client");
        let config = kube::Config::from_custom_kubeconfig(cp.kubeconfig(), &Default::default()).await.expect("config");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let options = keysmith::controller::RunOptions {
            namespace: Some(namespace.to_owned()),
            fake_provider: Some(keysmith::provider::FakeProvider(fake.clone())),
            ..Default::default()
        };
        let handle = tokio::spawn(keysmith::controller::run_with(
            client,
            config,
            options,
            keysmith::controller::Telemetry::default(),
            std::future::ready(()),
            async {
                let _ = stopped.await;
            },
        ));
        Self { stop: Some(stop), handle }
    }

    /// Whether they still run (a panic would have ended them).
    pub fn is_running(&self) -> bool {
        !self.handle.is_finished()
    }

    /// Stops them gracefully (in-flight reconciles finish).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(30), &mut self.handle).await;
    }
}

/// An AppConnection `fake` for the kubernetes provider that keysmith
/// replaces with the test's fake; `spec` adds to its spec (`, policy: ...`).
pub fn fake_connection(spec: &str) -> String {
    format!(
        "apiVersion: keysmith.dev/v1alpha1\nkind: AppConnection\nmetadata: {{name: fake, annotations: {{\"{}\": \"true\"}}}}\nspec: {{provider: {{kubernetes: {{}}}}, serviceAccountName: keysmith{spec}}}\n",
        keysmith::provider::noop::ANNOTATION
    )
}
