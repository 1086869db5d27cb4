//! `keysmith dev`, the README's first command: it brings up a local control
//! plane, runs the operator and the quickstart, and cleans up on SIGTERM.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use keysmith::api::IntegrationAccount;
use kube::{Api, Client};

/// Waits (up to a minute) until the quickstart's account is Ready.
async fn quickstart_ready(accounts: &Api<IntegrationAccount>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = accounts
            .get_opt("ci-deployer")
            .await
            .ok()
            .flatten()
            .and_then(|a| a.status)
            .is_some_and(|s| s.common.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "the quickstart account never became Ready");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Sends SIGTERM and waits up to `timeout` for the process to exit.
async fn terminate(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "keysmith dev did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn dev_runs_the_quickstart_until_interrupted() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keysmith"))
        .arg("dev")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
        let version = lines.find(|l| l.starts_with("KUBERNETES="));
        (version, lines.find(|l| l.starts_with("KUBECONFIG=")))
    });
    let (version, line) = tokio::time::timeout(Duration::from_secs(600), lines).await.unwrap().unwrap();
    let version = version.expect("a KUBERNETES line");
    let line = line.expect("a KUBECONFIG line");
    // The pinned release (KEYSMITH_KUBE_VERSION picks another pin).
    if let Some(pinned) = keysmith::controlplane::pinned_kubernetes_version() {
        assert_eq!(version, format!("KUBERNETES=v{pinned}"));
    }
    let path = std::path::PathBuf::from(line.trim_start_matches("KUBECONFIG="));
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
    let client = Client::try_from(config).unwrap();
    let accounts: Api<IntegrationAccount> = Api::namespaced(client, "quickstart");
    quickstart_ready(&accounts).await;
    let status = terminate(&mut child, Duration::from_secs(30)).await;
    assert!(status.success(), "keysmith dev exited with {status}");
    assert!(!path.exists(), "the control plane's files are removed");
}

/// `keysmith dev --existing-cluster` on a cluster that is already there (the
/// test's own control plane standing in for kind or minikube): the
/// quickstart becomes Ready, and on SIGTERM the account is deprovisioned,
/// what was applied is removed, and so are the CRDs it installed.
#[tokio::test]
async fn dev_on_an_existing_cluster_removes_what_it_made() {
    use k8s_openapi::{
        api::core::v1::{Namespace, ServiceAccount},
        apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    };

    let cp = keysmith::controlplane::shared().await.expect("control plane starts");
    let client = cp.client().await.unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    assert!(crds.get_opt("integrationaccounts.keysmith.dev").await.unwrap().is_none(), "a cluster without keysmith");
    let mut child = Command::new(env!("CARGO_BIN_EXE_keysmith"))
        .args(["dev", "--existing-cluster", "--kubeconfig"])
        .arg(cp.kubeconfig_path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).lines().map_while(Result::ok).find(|l| l.starts_with("CLUSTER="))
    });
    let line = tokio::time::timeout(Duration::from_secs(120), line).await.unwrap().unwrap().expect("a CLUSTER line");
    assert_eq!(line.trim_start_matches("CLUSTER=").trim_end_matches('/'), cp.server_url().trim_end_matches('/'));
    let accounts: Api<IntegrationAccount> = Api::namespaced(client.clone(), "quickstart");
    quickstart_ready(&accounts).await;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "quickstart");
    assert!(sas.get_opt("ci-deployer").await.unwrap().is_some());

    let status = terminate(&mut child, Duration::from_secs(90)).await;
    assert!(status.success(), "keysmith dev exited with {status}");
    assert!(sas.get_opt("ci-deployer").await.unwrap().is_none(), "the account was deprovisioned before it stopped");
    let namespace = Api::<Namespace>::all(client.clone()).get_opt("quickstart").await.unwrap();
    assert!(
        namespace.is_none_or(|ns| ns.metadata.deletion_timestamp.is_some()),
        "the quickstart namespace is being removed"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while crds.get_opt("integrationaccounts.keysmith.dev").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the CRDs it installed are removed");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
