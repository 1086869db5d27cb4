//! The `kubernetes` provider's connect step: this cluster as the
//! connection's identity, or the cluster of a kubeconfig in a Secret.

use std::sync::Arc;

use kube::config::KubeConfigOptions;

use super::KubernetesProvider;
use crate::{
    api::KubernetesSpec,
    provider::{registry::Connect, Provider, ProviderError},
};

/// Builds the provider for a connection's `kubernetes` spec.
pub async fn connect(spec: &KubernetesSpec, connect: &Connect<'_>) -> Result<Arc<dyn Provider>, ProviderError> {
    let allow = spec.allow_cluster_scope;
    let connection = connect.connection;
    let identity = &connection.identity;
    let (cache_key, config, local) = match &spec.kubeconfig_secret_ref {
        // This cluster, as the connection's identity.
        None => {
            let mut config = connect.local_config();
            config.auth_info.impersonate = identity.impersonate();
            (format!("local/{allow}/{identity:?}"), config, true)
        }
        Some(selector) => {
            let (text, version) = connect.secret_value(selector, "kubeconfig").await?;
            let kubeconfig = kube::config::Kubeconfig::from_yaml(&text).map_err(|e| {
                ProviderError::Invalid(format!("the kubeconfig in Secret {:?} does not parse: {e}", selector.name))
            })?;
            self_contained(&kubeconfig).map_err(|problem| {
                ProviderError::Invalid(format!("the kubeconfig in Secret {:?} {problem}", selector.name))
            })?;
            let config =
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.map_err(|e| {
                    ProviderError::Invalid(format!("the kubeconfig in Secret {:?} is not usable: {e}", selector.name))
                })?;
            (format!("{}/{}/{allow}", connection.uid, version), config, false)
        }
    };
    connect
        .cached(cache_key, || async {
            if local {
                connect.check_identity().await?;
            }
            let mut built = KubernetesProvider::from_config(config, allow)?.acting_as(identity.clone());
            if local {
                let (bindings, anchors) = connect.local_indexes();
                built = built.with_indexes(bindings, anchors, connect.operator_client());
            }
            Ok(Arc::new(built) as Arc<dyn Provider>)
        })
        .await
}

/// A kubeconfig from a Secret must carry its credentials itself: one that
/// names a file (`tokenFile`, certificate or key paths), a command (`exec`)
/// or an auth provider would make keysmith read its own files, such as its
/// own ServiceAccount token, or run programs on the connection writer's word.
fn self_contained(kubeconfig: &kube::config::Kubeconfig) -> Result<(), String> {
    for named in &kubeconfig.auth_infos {
        let Some(user) = &named.auth_info else { continue };
        let refused = [
            (user.token_file.is_some(), "tokenFile"),
            (user.client_certificate.is_some(), "client-certificate (a file)"),
            (user.client_key.is_some(), "client-key (a file)"),
            (user.exec.is_some(), "exec"),
            (user.auth_provider.is_some(), "auth-provider"),
        ];
        if let Some((_, what)) = refused.iter().find(|(set, _)| *set) {
            return Err(format!(
                "uses {what} for user {:?}; keysmith accepts only credentials written into the kubeconfig (token, client-certificate-data, client-key-data)",
                named.name
            ));
        }
    }
    for named in &kubeconfig.clusters {
        if named.cluster.as_ref().is_some_and(|c| c.certificate_authority.is_some()) {
            return Err(format!(
                "names a certificate-authority file for cluster {:?}; use certificate-authority-data",
                named.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubeconfig_must_carry_its_credentials_itself() {
        let base = |user: &str, cluster: &str| {
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"https://127.0.0.1:6443\"{cluster}}}}}]\nusers: [{{name: u, user: {{{user}}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
            )
        };
        let parse = |text: &str| kube::config::Kubeconfig::from_yaml(text).expect("parses");
        assert!(self_contained(&parse(&base("token: abc", ""))).is_ok());
        assert!(self_contained(&parse(&base("client-certificate-data: YQ==, client-key-data: YQ==", ""))).is_ok());
        for (user, what) in [
            ("tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token", "tokenFile"),
            ("client-certificate: /etc/x.crt", "client-certificate"),
            ("client-key: /etc/x.key", "client-key"),
            ("exec: {apiVersion: client.authentication.k8s.io/v1, command: /bin/sh}", "exec"),
            ("auth-provider: {name: gcp}", "auth-provider"),
        ] {
            let problem = self_contained(&parse(&base(user, ""))).expect_err(what);
            assert!(problem.contains(what), "{problem}");
        }
        let file_ca = base("token: abc", ", certificate-authority: /etc/ca.crt");
        assert!(self_contained(&parse(&file_ca)).expect_err("a CA file").contains("certificate-authority"));
    }
}
