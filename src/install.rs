//! Installing keysmith's CRDs and waiting until the apiserver serves them.

use crate::ownership;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    api::{Api, Patch, PatchParams},
    runtime::wait::{await_condition, conditions},
    Client,
};

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

/// The oldest Kubernetes release keysmith supports: the oldest one CI runs
/// (the compatibility test of `.ci/run`), and the API version k8s-openapi is
/// compiled against (feature `v1_33`).
pub const OLDEST_SUPPORTED_KUBERNETES: (u32, u32) = (1, 33);

/// Applies every keysmith CRD (server-side apply, field manager `keysmith`)
/// and waits until each is Established.
///
/// The CRDs carry CEL validation rules (`x-kubernetes-validations`), which
/// the apiserver enforces. On a release older than
/// [`OLDEST_SUPPORTED_KUBERNETES`] this warns and tries anyway: the
/// apiserver's own answer says what it cannot take.
pub async fn install_crds(client: &Client, timeout: Duration) -> Result<(), InstallError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let info = match client.apiserver_version().await {
        Ok(info) => info,
        Err(source) => return Err(InstallError::Apply { name: "(server version)".into(), source }),
    };
    if !is_supported(&info.major, &info.minor) {
        let (major, minor) = OLDEST_SUPPORTED_KUBERNETES;
        tracing::warn!(
            server = %info.git_version,
            "keysmith supports Kubernetes {major}.{minor} and newer; installing the CRDs on this older apiserver anyway"
        );
    }
    for crd in crate::api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &PatchParams::apply(ownership::FIELD_MANAGER).force(), &Patch::Apply(&crd))
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

/// Whether an apiserver reporting this `/version` major and minor is one
/// keysmith supports. Minor versions may carry a suffix, as in `33+`; a
/// version that does not parse counts as supported (and newer).
pub fn is_supported(major: &str, minor: &str) -> bool {
    let digits = |s: &str| s.chars().take_while(char::is_ascii_digit).collect::<String>().parse::<u32>().ok();
    match (digits(major), digits(minor)) {
        (Some(major), Some(minor)) => (major, minor) >= OLDEST_SUPPORTED_KUBERNETES,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_which_apiservers_are_supported() {
        assert!(!is_supported("1", "20"));
        assert!(!is_supported("1", "32+"));
        assert!(is_supported("1", "33"));
        assert!(is_supported("1", "37+"));
        assert!(is_supported("2", "0"));
        assert!(is_supported("", "x"));
    }
}
