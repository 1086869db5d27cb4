//! `keysmith dev`, the README's first command: it brings up a local control
//! plane, runs the operator and the quickstart, and cleans up on SIGTERM.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use keysmith::api::IntegrationAccount;
use kube::{Api, Client};

#[tokio::test]
async fn dev_runs_the_quickstart_until_interrupted() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keysmith"))
        .arg("dev")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).lines().map_while(Result::ok).find(|l| l.starts_with("KUBECONFIG="))
    });
    let line = tokio::time::timeout(Duration::from_secs(600), line).await.unwrap().unwrap().expect("a KUBECONFIG line");
    let path = std::path::PathBuf::from(line.trim_start_matches("KUBECONFIG="));
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
    let client = Client::try_from(config).unwrap();
    let accounts: Api<IntegrationAccount> = Api::namespaced(client, "quickstart");
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
            break;
        }
        assert!(Instant::now() < deadline, "the quickstart account never became Ready");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "keysmith dev did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.success(), "keysmith dev exited with {status}");
    assert!(!path.exists(), "the control plane's files are removed");
}
