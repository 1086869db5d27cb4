//! The provider conformance suite against the built-in kubernetes provider
//! and a real kube-apiserver.

mod common;
mod conformance;

use std::{sync::Arc, time::Duration};

use common::{control_plane, TestNamespace};
use conformance::Target;
use k8s_openapi::api::{core::v1::ServiceAccount, rbac::v1::ClusterRole};
use keysmith::{
    controlplane::ControlPlane,
    provider::{kubernetes::KubernetesProvider, AccountRequest, IssuedKey, Provider, RoleGrant},
};
use kube::{api::PostParams, Api, Client};

struct Kubernetes {
    cp: &'static ControlPlane,
    client: Client,
    namespace: String,
}

impl Kubernetes {
    fn provider_at(&self, url: &str, token: &str, tls: bool) -> Arc<dyn Provider> {
        let mut config = kube::Config::new(url.parse().unwrap());
        config.auth_info.token = Some(token.to_owned().into());
        if tls {
            config.root_cert = Some(vec![pem_to_der(self.cp.ca_pem())]);
        }
        config.read_timeout = Some(Duration::from_secs(2));
        config.connect_timeout = Some(Duration::from_secs(2));
        let client = Client::try_from(config).unwrap();
        Arc::new(KubernetesProvider::new(
            client,
            self.cp.server_url().to_owned(),
            Some(self.cp.ca_pem().to_owned()),
            false,
        ))
    }
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body: String =
        pem.lines().take_while(|l| !l.starts_with("-----END")).filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).unwrap()
}

#[async_trait::async_trait]
impl Target for Kubernetes {
    fn provider(&self) -> Arc<dyn Provider> {
        self.provider_at(self.cp.server_url(), self.cp.admin_token(), true)
    }
    fn upstream(&self) -> (String, reqwest::Client) {
        let ca = reqwest::Certificate::from_pem(self.cp.ca_pem().as_bytes()).unwrap();
        (self.cp.server_url().to_owned(), reqwest::Client::builder().add_root_certificate(ca).build().unwrap())
    }
    async fn provider_via(&self, url: &str) -> Arc<dyn Provider> {
        self.provider_at(url, self.cp.admin_token(), false)
    }
    async fn refused_provider(&self) -> Arc<dyn Provider> {
        self.provider_at(self.cp.server_url(), "not-a-valid-token", true)
    }
    fn account(&self, name: &str) -> AccountRequest {
        AccountRequest {
            name: format!("conf-{name}"),
            namespace: self.namespace.clone(),
            account_name: name.to_owned(),
            owner_uid: format!("uid-{}-{name}", self.namespace),
            description: Some("conformance".into()),
            owner: Some("tests".into()),
            options: Default::default(),
        }
    }
    fn roles(&self) -> [RoleGrant; 2] {
        [RoleGrant { role: "view".into(), scope: None }, RoleGrant { role: "edit".into(), scope: None }]
    }
    async fn make_foreign_account(&self, name: &str) {
        let sa: ServiceAccount = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        Api::<ServiceAccount>::namespaced(self.client.clone(), &self.namespace)
            .create(&PostParams::default(), &sa)
            .await
            .unwrap();
    }
    async fn key_works(&self, key: &IssuedKey) -> bool {
        let token = key.material.expose().get("token").unwrap();
        let client = self.cp.client_for_token(token).await.unwrap();
        !matches!(client.apiserver_version().await, Err(kube::Error::Api(s)) if s.code == 401)
    }
}

async fn target() -> (Kubernetes, TestNamespace) {
    let cp = control_plane().await;
    let client = cp.client().await.unwrap();
    let ns = TestNamespace::create(&client, "conformance").await;
    // view and edit get their rules from the aggregation controller.
    let roles: Api<ClusterRole> = Api::all(client.clone());
    for role in ["view", "edit"] {
        common::eventually("aggregated ClusterRoles", Duration::from_secs(60), || async {
            roles.get(role).await.ok()?.rules.filter(|r| !r.is_empty()).map(|_| ())
        })
        .await;
    }
    (Kubernetes { cp, client, namespace: ns.name.clone() }, ns)
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let (target, ns) = target().await;
            conformance::$name(&target).await;
            ns.delete().await;
        }
    )*};
}

conformance!(
    create_is_idempotent_and_adopts_nothing,
    another_integration_accounts_account_is_never_taken_over,
    delete_tolerates_not_found,
    role_sync_adds_and_removes,
    keys_issue_verify_and_revoke,
    refused_credential_is_unauthorized,
    throttling_and_outages_are_transient,
    rate_budget_is_never_exceeded,
);
