//! Where keysmith keeps an OAuth 2.0 client's registration access token: a
//! Secret, never status. Behind an AppConnection it lives in the
//! IntegrationAccount's namespace, owned by the account (so it is
//! garbage-collected with it): the tenant's own credential registered the
//! client. Behind a ClusterAppConnection it lives in the cluster admin's
//! namespace instead: whoever held the registration access token could
//! change the client's scopes past the connection's allowedRoles.

use crate::ownership;
use std::collections::BTreeMap;

use async_trait::async_trait;
use k8s_openapi::{
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    ByteString,
};
use kube::{
    api::{DeleteParams, Patch, PatchParams},
    Api, Client,
};

use super::{Registration, RegistrationStore};
use crate::provider::{http::classify_kube_error as classify, AccountRequest, ProviderError};

/// The Secret type of registration records.
pub const REGISTRATION_SECRET_TYPE: &str = "keysmith.dev/oauth2-registration";

/// A [`RegistrationStore`] backed by Kubernetes Secrets.
#[derive(Clone)]
pub struct SecretRegistrationStore {
    client: Client,
    /// Where records live when not in the account's namespace.
    namespace: Option<String>,
}

impl SecretRegistrationStore {
    /// A store writing through `client` into each account's namespace.
    pub fn new(client: Client) -> Self {
        Self { client, namespace: None }
    }

    /// A store writing through `client` into `namespace`, out of tenants' reach.
    pub fn in_namespace(client: Client, namespace: String) -> Self {
        Self { client, namespace: Some(namespace) }
    }

    /// The record's name in the account's namespace:
    /// `<account>-oauth2-registration`, cut to fit.
    pub fn secret_name(account: &AccountRequest) -> String {
        let mut name = format!("{}-oauth2-registration", account.account_name);
        name.truncate(253);
        name
    }

    /// Where this store keeps the account's record: namespace and name (in a
    /// shared namespace, named after the account's uid).
    pub fn location(&self, account: &AccountRequest) -> (String, String) {
        match &self.namespace {
            None => (account.namespace.clone(), Self::secret_name(account)),
            Some(ns) => (ns.clone(), format!("keysmith-oauth2-{}", account.owner_uid)),
        }
    }

    fn api(&self, account: &AccountRequest) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.location(account).0)
    }
}

#[async_trait]
impl RegistrationStore for SecretRegistrationStore {
    async fn get(&self, account: &AccountRequest) -> Result<Option<Registration>, ProviderError> {
        let Some(secret) = self.api(account).get_opt(&self.location(account).1).await.map_err(classify)? else {
            return Ok(None);
        };
        // A same-named Secret that is not this account's record is ignored.
        let ours = secret.metadata.labels.as_ref().and_then(|l| l.get(ownership::ACCOUNT_UID))
            == Some(&account.owner_uid)
            && secret.type_.as_deref() == Some(REGISTRATION_SECRET_TYPE);
        if !ours {
            return Ok(None);
        }
        let data: BTreeMap<String, String> = secret
            .data
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| String::from_utf8(v.0).ok().map(|v| (k, v)))
            .collect();
        Registration::from_secret_data(&data).map(Some)
    }

    async fn put(&self, account: &AccountRequest, registration: &Registration) -> Result<(), ProviderError> {
        let (namespace, name) = self.location(account);
        // Never written over a Secret of that name that is not this record.
        if let Some(existing) = self.api(account).get_opt(&name).await.map_err(classify)? {
            let ours = existing.metadata.labels.as_ref().and_then(|l| l.get(ownership::ACCOUNT_UID))
                == Some(&account.owner_uid)
                && existing.type_.as_deref() == Some(REGISTRATION_SECRET_TYPE);
            if !ours {
                return Err(ProviderError::Conflict(format!(
                    "Secret {namespace}/{name} exists and is not keysmith's registration record for this IntegrationAccount"
                )));
            }
        }
        // An owner reference cannot cross namespaces: a record kept apart
        // goes when the account's client is deleted.
        let owner = self.namespace.is_none().then(|| {
            vec![OwnerReference {
                api_version: "keysmith.dev/v1alpha1".into(),
                kind: "IntegrationAccount".into(),
                name: account.account_name.clone(),
                uid: account.owner_uid.clone(),
                controller: Some(false),
                block_owner_deletion: Some(true),
            }]
        });
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                annotations: Some(BTreeMap::from([(
                    ownership::INTEGRATION_ACCOUNT.to_owned(),
                    ownership::account_reference(&account.namespace, &account.account_name),
                )])),
                labels: Some(BTreeMap::from([
                    (ownership::MANAGED_BY_KEY.to_owned(), ownership::MANAGED_BY.to_owned()),
                    (ownership::ACCOUNT_UID.to_owned(), account.owner_uid.clone()),
                ])),
                owner_references: owner,
                ..ObjectMeta::default()
            },
            type_: Some(REGISTRATION_SECRET_TYPE.into()),
            data: Some(
                registration.to_secret_data().into_iter().map(|(k, v)| (k, ByteString(v.into_bytes()))).collect(),
            ),
            ..Secret::default()
        };
        self.api(account)
            .patch(&name, &PatchParams::apply(ownership::FIELD_MANAGER).force(), &Patch::Apply(&secret))
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn delete(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        if self.get(account).await?.is_none() {
            return Ok(());
        }
        match self.api(account).delete(&self.location(account).1, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(error) => Err(classify(error)),
        }
    }

    fn describe(&self, account: &AccountRequest) -> String {
        let (namespace, name) = self.location(account);
        format!("the Secret {namespace}/{name}")
    }
}
