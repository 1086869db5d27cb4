//! Installing keysmith's CRDs and waiting until the apiserver serves them.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    api::{Api, Patch, PatchParams},
    runtime::wait::{await_condition, conditions},
    Client,
};

/// The field manager keysmith uses for everything it applies.
pub const FIELD_MANAGER: &str = "keysmith";

/// Failures while installing or waiting for CRDs.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The apiserver refused a CRD.
    #[error("applying CRD {name}: {source}")]
    Apply {
        /// The CRD's name.
        name: String,
        /// The apiserver's answer.
        #[source]
        source: kube::Error,
    },
    /// A CRD did not become Established in time.
    #[error("CRD {name} was not Established within {timeout:?}; is the apiserver healthy?")]
    NotEstablished {
        /// The CRD's name.
        name: String,
        /// How long keysmith waited.
        timeout: Duration,
    },
}

/// Applies every keysmith CRD (server-side apply, field manager `keysmith`)
/// and waits until each is Established.
///
/// Apiservers older than 1.23 do not know `x-kubernetes-validations` and
/// refuse to apply a schema carrying it; for them the CEL rules are left out
/// (the controllers enforce immutability themselves).
pub async fn install_crds(client: &Client, timeout: Duration) -> Result<(), InstallError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let supports_cel = match client.apiserver_version().await {
        Ok(info) => supports_validation_rules(&info.major, &info.minor),
        Err(source) => return Err(InstallError::Apply { name: "(server version)".into(), source }),
    };
    if !supports_cel {
        tracing::warn!("this apiserver predates CEL validation rules; installing the CRDs without them");
    }
    for mut crd in crate::api::crds() {
        if !supports_cel {
            strip_validation_rules(&mut crd);
        }
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd))
            .await
            .map_err(|source| InstallError::Apply { name: name.clone(), source })?;
    }
    wait_for_crds(client, timeout).await
}

/// Waits until every keysmith CRD exists and is Established.
pub async fn wait_for_crds(client: &Client, timeout: Duration) -> Result<(), InstallError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crate::api::crds() {
        let name = crd.metadata.name.unwrap_or_default();
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        match tokio::time::timeout(timeout, established).await {
            Ok(Ok(_)) => {}
            _ => return Err(InstallError::NotEstablished { name, timeout }),
        }
    }
    Ok(())
}

/// Whether an apiserver of this version accepts `x-kubernetes-validations`
/// (added in 1.23). Minor versions may carry a suffix, as in `23+`.
pub fn supports_validation_rules(major: &str, minor: &str) -> bool {
    let digits = |s: &str| s.chars().take_while(char::is_ascii_digit).collect::<String>().parse::<u32>().ok();
    match (digits(major), digits(minor)) {
        (Some(major), Some(minor)) => major > 1 || minor >= 23,
        _ => true,
    }
}

/// Removes every `x-kubernetes-validations` from a CRD's schemas.
pub fn strip_validation_rules(crd: &mut CustomResourceDefinition) {
    fn strip(schema: &mut serde_json::Value) {
        match schema {
            serde_json::Value::Object(map) => {
                map.remove("x-kubernetes-validations");
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    for version in &mut crd.spec.versions {
        let Some(validation) = version.schema.as_mut() else {
            continue;
        };
        let Some(schema) = validation.open_api_v3_schema.as_ref() else {
            continue;
        };
        let Ok(mut value) = serde_json::to_value(schema) else {
            continue;
        };
        strip(&mut value);
        if let Ok(stripped) = serde_json::from_value(value) {
            validation.open_api_v3_schema = Some(stripped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_which_apiservers_take_cel_rules() {
        assert!(!supports_validation_rules("1", "20"));
        assert!(!supports_validation_rules("1", "22+"));
        assert!(supports_validation_rules("1", "23"));
        assert!(supports_validation_rules("1", "30+"));
        assert!(supports_validation_rules("2", "0"));
    }

    #[test]
    fn strips_every_rule_and_nothing_else() {
        for mut crd in crate::api::crds() {
            let before = serde_json::to_string(&crd).unwrap();
            strip_validation_rules(&mut crd);
            let after = serde_json::to_string(&crd).unwrap();
            assert!(!after.contains("x-kubernetes-validations"));
            assert!(after.contains("\"description\""));
            if before.contains("x-kubernetes-validations") {
                assert!(after.len() < before.len());
            }
        }
    }
}
