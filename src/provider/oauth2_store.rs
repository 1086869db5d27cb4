//! Where keysmith keeps an OAuth 2.0 client's registration access token: a
//! Secret in the IntegrationAccount's namespace, owned by the account (so it
//! is garbage-collected with it), never in status.

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

use super::{
    kubernetes::classify,
    oauth2::{Registration, RegistrationStore},
    AccountRequest, ProviderError,
};
use crate::install::FIELD_MANAGER;

/// The Secret type of registration records.
pub const REGISTRATION_SECRET_TYPE: &str = "keysmith.dev/oauth2-registration";
/// The label naming the IntegrationAccount's uid.
pub const ACCOUNT_UID_LABEL: &str = "keysmith.dev/account-uid";

/// A [`RegistrationStore`] backed by Kubernetes Secrets.
#[derive(Clone)]
pub struct SecretRegistrationStore {
    client: Client,
}

impl SecretRegistrationStore {
    /// A store writing through `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// The record's name: `<account>-oauth2-registration`, cut to fit.
    pub fn secret_name(account: &AccountRequest) -> String {
        let mut name = format!("{}-oauth2-registration", account.account_name);
        name.truncate(253);
        name
    }

    fn api(&self, account: &AccountRequest) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &account.namespace)
    }
}

#[async_trait]
impl RegistrationStore for SecretRegistrationStore {
    async fn get(&self, account: &AccountRequest) -> Result<Option<Registration>, ProviderError> {
        let Some(secret) = self.api(account).get_opt(&Self::secret_name(account)).await.map_err(classify)? else {
            return Ok(None);
        };
        // A same-named Secret that is not this account's record is ignored.
        let ours = secret.metadata.labels.as_ref().and_then(|l| l.get(ACCOUNT_UID_LABEL)) == Some(&account.owner_uid)
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
        let name = Self::secret_name(account);
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(account.namespace.clone()),
                labels: Some(BTreeMap::from([
                    ("app.kubernetes.io/managed-by".to_owned(), "keysmith".to_owned()),
                    (ACCOUNT_UID_LABEL.to_owned(), account.owner_uid.clone()),
                ])),
                owner_references: Some(vec![OwnerReference {
                    api_version: "keysmith.dev/v1alpha1".into(),
                    kind: "IntegrationAccount".into(),
                    name: account.account_name.clone(),
                    uid: account.owner_uid.clone(),
                    controller: Some(false),
                    block_owner_deletion: Some(true),
                }]),
                ..ObjectMeta::default()
            },
            type_: Some(REGISTRATION_SECRET_TYPE.into()),
            data: Some(
                registration.to_secret_data().into_iter().map(|(k, v)| (k, ByteString(v.into_bytes()))).collect(),
            ),
            ..Secret::default()
        };
        self.api(account)
            .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&secret))
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn delete(&self, account: &AccountRequest) -> Result<(), ProviderError> {
        if self.get(account).await?.is_none() {
            return Ok(());
        }
        match self.api(account).delete(&Self::secret_name(account), &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(error) => Err(classify(error)),
        }
    }
}
