//! The output Secret: what keysmith writes, and whether it may write it.

use crate::ownership;
use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::{
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    ByteString,
};
use kube::{Resource, ResourceExt};

use crate::{
    api::{validation::InvalidField, IntegrationAccount},
    provider::IssuedKey,
};

/// When that key was issued (RFC 3339).
pub const ISSUED_AT_ANNOTATION: &str = "keysmith.dev/issued-at";
/// When that key expires by itself, if it does (RFC 3339).
pub const EXPIRES_AT_ANNOTATION: &str = "keysmith.dev/expires-at";

/// Whether keysmith may write the output Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretOwnership {
    /// No such Secret yet.
    Absent,
    /// keysmith created it for this IntegrationAccount; the key id it holds.
    Ours {
        /// The key id annotation, if any.
        key_id: Option<String>,
    },
    /// Someone else's Secret: keysmith never overwrites it.
    Foreign,
}

/// Classifies an existing Secret's metadata for the account with `uid`.
pub fn ownership(meta: Option<&ObjectMeta>, account_uid: &str) -> SecretOwnership {
    let Some(meta) = meta else {
        return SecretOwnership::Absent;
    };
    let owned = meta.owner_references.iter().flatten().any(|r| r.uid == account_uid && r.controller == Some(true));
    let labelled = meta.labels.as_ref().and_then(|l| l.get(ownership::MANAGED_BY_KEY)).map(String::as_str)
        == Some(ownership::MANAGED_BY);
    if owned && labelled {
        SecretOwnership::Ours { key_id: meta.annotations.as_ref().and_then(|a| a.get(ownership::KEY_ID)).cloned() }
    } else {
        SecretOwnership::Foreign
    }
}

/// The Secret holding `key` for `account`: the user's extra labels and
/// annotations, keysmith's own on top, data keys renamed as the spec asks,
/// owned by the IntegrationAccount so it is garbage-collected with it.
pub fn render(account: &IntegrationAccount, key: &IssuedKey, issued_at: Timestamp) -> Result<Secret, InvalidField> {
    let spec = &account.spec.secret;
    let mut data = BTreeMap::new();
    for (name, value) in key.material.expose() {
        let target = spec.keys.get(name).unwrap_or(name);
        if data.insert(target.clone(), ByteString(value.clone().into_bytes())).is_some() {
            return Err(InvalidField::new(
                format!("spec.secret.keys.{name}"),
                format!("renaming {name} to {target} collides with another key in the Secret"),
            ));
        }
    }
    for from in spec.keys.keys() {
        if !key.material.expose().contains_key(from) {
            let known: Vec<&str> = key.material.expose().keys().map(String::as_str).collect();
            return Err(InvalidField::new(
                format!("spec.secret.keys.{from}"),
                format!("the provider writes no key named {from}; it writes {}", known.join(", ")),
            ));
        }
    }
    Ok(Secret { data: Some(data), ..shape(account, &key.id, issued_at, key.expires_at) })
}

/// The Secret [`render`] would write for `account`, without data: what
/// keysmith asks the apiserver to accept (a dry run) before it issues a key,
/// so a Secret that cannot be written never costs a key in the target app.
pub fn preflight(account: &IntegrationAccount, issued_at: Timestamp) -> Secret {
    let key_id = account.status.as_ref().and_then(|s| s.current_key.as_ref()).map_or("pending", |k| k.id.as_str());
    shape(account, key_id, issued_at, None)
}

/// Everything of the output Secret but its data.
fn shape(account: &IntegrationAccount, key_id: &str, issued_at: Timestamp, expires_at: Option<Timestamp>) -> Secret {
    let spec = &account.spec.secret;
    let mut labels = spec.labels.clone();
    labels.insert(ownership::MANAGED_BY_KEY.into(), ownership::MANAGED_BY.into());
    labels.insert(ownership::INTEGRATION_ACCOUNT.into(), account.name_any());
    let mut annotations = spec.annotations.clone();
    annotations.insert(ownership::KEY_ID.into(), key_id.to_owned());
    annotations.insert(ISSUED_AT_ANNOTATION.into(), issued_at.to_string());
    if let Some(expires) = expires_at {
        annotations.insert(EXPIRES_AT_ANNOTATION.into(), expires.to_string());
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(spec.name.clone()),
            namespace: account.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: owner_reference(account).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

/// A controller owner reference to the IntegrationAccount.
pub fn owner_reference(account: &IntegrationAccount) -> Option<OwnerReference> {
    let mut reference = account.controller_owner_ref(&())?;
    reference.block_owner_deletion = Some(true);
    Some(reference)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::KeyMaterial;

    fn account() -> IntegrationAccount {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keysmith.dev/v1alpha1", "kind": "IntegrationAccount",
            "metadata": {"name": "billing", "namespace": "pay", "uid": "u-1"},
            "spec": {"connectionRef": {"name": "c"},
                     "secret": {"name": "billing-key", "labels": {"team": "pay", "app.kubernetes.io/managed-by": "me"},
                                "annotations": {"note": "x"}, "keys": {"token": "API_TOKEN"}}}
        }))
        .unwrap()
    }

    fn key() -> IssuedKey {
        IssuedKey {
            id: "k1".into(),
            expires_at: None,
            material: KeyMaterial::new(BTreeMap::from([
                ("token".to_owned(), "t0ps3cret".to_owned()),
                ("server".to_owned(), "https://x".to_owned()),
            ])),
        }
    }

    #[test]
    fn renders_renamed_keys_labels_and_owner() {
        let secret = render(&account(), &key(), Timestamp::from_second(0).unwrap()).unwrap();
        let data = secret.data.unwrap();
        assert_eq!(data["API_TOKEN"].0, b"t0ps3cret");
        assert!(data.contains_key("server") && !data.contains_key("token"));
        let labels = secret.metadata.labels.unwrap();
        assert_eq!(labels[ownership::MANAGED_BY_KEY], "keysmith", "keysmith's labels win");
        assert_eq!(labels["team"], "pay");
        let annotations = secret.metadata.annotations.unwrap();
        assert_eq!(annotations[ownership::KEY_ID], "k1");
        assert_eq!(annotations["note"], "x");
        let owner = &secret.metadata.owner_references.unwrap()[0];
        assert_eq!((owner.uid.as_str(), owner.controller), ("u-1", Some(true)));
    }

    #[test]
    fn refuses_colliding_or_unknown_renames() {
        let mut colliding = account();
        colliding.spec.secret.keys.insert("token".into(), "server".into());
        let err = render(&colliding, &key(), Timestamp::from_second(0).unwrap()).unwrap_err();
        assert!(err.message.contains("collides"), "{err}");
        let mut unknown = account();
        unknown.spec.secret.keys.insert("password".into(), "PW".into());
        let err = render(&unknown, &key(), Timestamp::from_second(0).unwrap()).unwrap_err();
        assert!(err.message.contains("no key named password"), "{err}");
        assert!(!err.to_string().contains("t0ps3cret"));
    }

    #[test]
    fn ownership_needs_our_owner_reference_and_label() {
        let rendered = render(&account(), &key(), Timestamp::from_second(0).unwrap()).unwrap();
        assert_eq!(ownership(Some(&rendered.metadata), "u-1"), SecretOwnership::Ours { key_id: Some("k1".into()) });
        assert_eq!(ownership(Some(&rendered.metadata), "u-2"), SecretOwnership::Foreign);
        assert_eq!(ownership(Some(&ObjectMeta::default()), "u-1"), SecretOwnership::Foreign);
        assert_eq!(ownership(None, "u-1"), SecretOwnership::Absent);
    }
}
