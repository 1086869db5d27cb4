#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use keysmith::{controller, install, manifest};

/// keysmith: dedicated, least-privilege, rotating integration accounts,
/// declared as Kubernetes objects.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log level, or a tracing filter such as `keysmith=debug,kube=info`.
    #[arg(long, global = true, env = "KEYSMITH_LOG", default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(long, global = true, env = "KEYSMITH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once per process: the size of `Run`'s flags costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the operator against the cluster in KUBECONFIG (or in-cluster).
    Run {
        /// A kubeconfig file; defaults to KUBECONFIG, then in-cluster config.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Watch only this namespace (default: all namespaces).
        #[arg(long, env = "KEYSMITH_NAMESPACE")]
        namespace: Option<String>,
        #[command(flatten)]
        operations: RunFlags,
    },
    /// Start a throwaway local control plane, install keysmith's CRDs, run
    /// the operator in it, and apply examples/quickstart. Stops on Ctrl-C.
    /// With --existing-cluster, use the current kubeconfig context's cluster
    /// (kind, k3d, minikube...) instead, and remove on Ctrl-C what it made.
    Dev {
        /// Manifests applied once the operator runs.
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/quickstart"))]
        examples: PathBuf,
        /// Use the cluster of the current kubeconfig context (or --kubeconfig)
        /// rather than a throwaway local control plane.
        #[arg(long)]
        existing_cluster: bool,
        /// With --existing-cluster: the kubeconfig (default: KUBECONFIG, ~/.kube/config).
        #[arg(long, requires = "existing_cluster")]
        kubeconfig: Option<PathBuf>,
    },
    /// Rotate an IntegrationAccount's key now and follow the rotation until
    /// the new key is published.
    Rotate {
        /// The account, as NAMESPACE/NAME.
        target: String,
        /// Give up after this long (a duration such as 2m or 90s).
        #[arg(long, default_value = "5m")]
        timeout: String,
        /// A kubeconfig file; defaults to KUBECONFIG, then in-cluster config.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
    },
    /// List every integration account: connection and provider, roles, key
    /// age, next rotation, readiness.
    Inventory {
        /// Only this namespace (default: all).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
        /// A kubeconfig file; defaults to KUBECONFIG, then in-cluster config.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
    },
    /// Show what applying these manifests would change in the target apps,
    /// without changing anything.
    Plan {
        /// A YAML file with IntegrationAccounts (and the RoleBindings,
        /// KeyRotationPolicies and connections they use).
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
        /// A kubeconfig file; defaults to KUBECONFIG, then in-cluster config.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
    },
    /// Print keysmith's CustomResourceDefinitions as YAML (all of them, as one
    /// multi-document stream), or write one file per kind into a directory.
    Crd {
        /// Write `<plural>.keysmith.dev.yaml` files into this directory
        /// instead of printing.
        #[arg(long)]
        output_dir: Option<PathBuf>,
        /// Write Helm chart templates instead (charts/keysmith/templates/crds):
        /// each CRD behind `crds.enabled`, kept on uninstall while `crds.keep`.
        #[arg(long)]
        helm: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level, cli.log_format);
    let result = match cli.command {
        Command::Crd { output_dir, helm } => print_crds(output_dir, helm),
        Command::Run { kubeconfig, namespace, operations } => {
            runtime().and_then(|rt| rt.block_on(run(kubeconfig, namespace, operations)))
        }
        Command::Dev { examples, existing_cluster: false, .. } => runtime().and_then(|rt| rt.block_on(dev(examples))),
        Command::Dev { examples, existing_cluster: true, kubeconfig } => {
            runtime().and_then(|rt| rt.block_on(dev_on_existing_cluster(examples, kubeconfig)))
        }
        Command::Rotate { target, timeout, kubeconfig } => runtime().and_then(|rt| {
            rt.block_on(async {
                let timeout = keysmith::api::validation::parse_duration("--timeout", &timeout)?;
                let (client, _) = connect(kubeconfig).await?;
                keysmith::cli::rotate(client, &target, timeout, &mut std::io::stdout()).await
            })
        }),
        Command::Inventory { namespace, output, kubeconfig } => runtime().and_then(|rt| {
            rt.block_on(async {
                let (client, _) = connect(kubeconfig).await?;
                let rows = keysmith::cli::inventory(client, namespace.as_deref()).await?;
                match output {
                    Output::Table => print!("{}", keysmith::cli::inventory_table(&rows)),
                    Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                }
                Ok(())
            })
        }),
        Command::Plan { file, output, kubeconfig } => runtime().and_then(|rt| {
            rt.block_on(async {
                let (client, config) = connect(kubeconfig).await?;
                let plans = keysmith::cli::plan(client, config, &file).await?;
                match output {
                    Output::Table => print!("{}", keysmith::cli::plan_text(&plans)),
                    Output::Json => println!("{}", serde_json::to_string_pretty(&plans)?),
                }
                Ok(())
            })
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A client from `--kubeconfig`, else KUBECONFIG, else in-cluster config.
async fn connect(kubeconfig: Option<PathBuf>) -> anyhow::Result<(kube::Client, kube::Config)> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(&path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?
        }
        None => kube::Config::infer().await.context("no kubeconfig and not running in a cluster")?,
    };
    Ok((kube::Client::try_from(config.clone())?, config))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn init_logging(level: &str, format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

/// `keysmith run`'s HTTP endpoints and leader election.
#[derive(clap::Args)]
struct RunFlags {
    /// Where to serve /metrics, /healthz and /readyz; `off` disables them.
    #[arg(long, env = "KEYSMITH_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: keysmith::server::ListenAddr,
    /// Run the controllers only while holding the `keysmith-leader` Lease,
    /// so that several replicas can run and only one acts.
    #[arg(long, env = "KEYSMITH_LEADER_ELECT")]
    leader_elect: bool,
    /// The Lease's namespace (default: POD_NAMESPACE, else `default`).
    #[arg(long, env = "KEYSMITH_LEADER_ELECTION_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// How long followers wait after the leader's last renewal before taking over.
    #[arg(long, default_value = "15s", value_parser = keysmith::leader::parse_flag_duration)]
    leader_election_lease_duration: Duration,
    /// How long the leader keeps trying to renew before it stops (and exits).
    #[arg(long, default_value = "10s", value_parser = keysmith::leader::parse_flag_duration)]
    leader_election_renew_deadline: Duration,
    /// How often candidates try to take the Lease and the leader renews it.
    #[arg(long, default_value = "2s", value_parser = keysmith::leader::parse_flag_duration)]
    leader_election_retry_period: Duration,
    /// How often an account nothing has changed is re-read from its target
    /// app to find and undo drift (roles or keys changed by hand). Each check
    /// costs three read calls against the connection's rate budget: with N
    /// accounts behind a connection, 3·N per interval.
    #[arg(long, default_value = "10m", value_parser = parse_drift_interval)]
    drift_check_interval: Duration,
    /// The ServiceAccount (in the connection's own namespace) that an
    /// AppConnection naming no spec.serviceAccountName acts as. Without it,
    /// such connections do nothing (condition ServiceAccountRequired).
    #[arg(long, env = "KEYSMITH_DEFAULT_SERVICE_ACCOUNT", value_parser = parse_service_account_name)]
    default_service_account: Option<String>,
    /// A provider AppConnections may not use, so that only cluster admins
    /// (through ClusterAppConnections) can reach that kind of target app.
    /// Repeat, or separate with commas: `--deny-namespaced-provider kubernetes`.
    #[arg(long, value_delimiter = ',', value_parser = parse_provider_name)]
    deny_namespaced_provider: Vec<String>,
    /// Where to serve the read-only inventory feed for SaaS-management tools
    /// (/api/v1/accounts, /scim/v2/Users); `off` (the default) disables it.
    #[arg(long, env = "KEYSMITH_INVENTORY_ADDR", default_value = "off")]
    inventory_addr: keysmith::server::ListenAddr,
    /// A directory (a mounted Secret) holding the feed's credential: `token`
    /// (an API token), or `client_id` and `client_secret` (OAuth 2.0 client
    /// credentials), or both. Required with --inventory-addr.
    #[arg(long, env = "KEYSMITH_INVENTORY_CREDENTIALS_DIR")]
    inventory_credentials_dir: Option<PathBuf>,
}

/// A ServiceAccount name: a DNS subdomain.
fn parse_service_account_name(text: &str) -> Result<String, String> {
    let valid = regex::Regex::new(keysmith::api::NAME_PATTERN).map_err(|e| e.to_string())?;
    if text.len() <= 253 && valid.is_match(text) {
        Ok(text.to_owned())
    } else {
        Err(format!("{text:?} is not a ServiceAccount name"))
    }
}

/// One of the providers `spec.provider` can select.
fn parse_provider_name(text: &str) -> Result<String, String> {
    match text {
        "kubernetes" | "scim" | "oauth2" | "awsIam" | "postgres" | "gcpIam" | "openBao" | "zabbix" => {
            Ok(text.to_owned())
        }
        _ => Err(format!(
            "{text:?} is not a provider (kubernetes, scim, oauth2, awsIam, postgres, gcpIam, openBao, zabbix)"
        )),
    }
}

/// A drift-check interval: a duration of at least one second.
fn parse_drift_interval(text: &str) -> Result<Duration, String> {
    let interval = keysmith::leader::parse_flag_duration(text)?;
    if interval < Duration::from_secs(1) {
        return Err(format!("{text:?} is shorter than the minimum of 1s"));
    }
    Ok(interval)
}

async fn run(kubeconfig: Option<PathBuf>, namespace: Option<String>, flags: RunFlags) -> anyhow::Result<()> {
    use keysmith::leader::{self, LeaderElector, LeaseSettings};

    let (client, config) = connect(kubeconfig).await?;
    let tenancy = keysmith::tenancy::Tenancy {
        default_service_account: flags.default_service_account,
        denied_namespaced_providers: flags.deny_namespaced_provider.into_iter().collect(),
    };
    let options = controller::RunOptions {
        namespace,
        drift_check_interval: flags.drift_check_interval,
        tenancy,
        ..Default::default()
    };
    let telemetry = controller::Telemetry::default();
    let election = flags.leader_elect.then(|| LeaseSettings {
        lease_duration: flags.leader_election_lease_duration,
        renew_deadline: flags.leader_election_renew_deadline,
        retry_period: flags.leader_election_retry_period,
        ..LeaseSettings::new(leader::default_namespace(flags.leader_election_namespace), leader::default_identity())
    });
    if let Some(settings) = &election {
        settings.validate().map_err(|e| anyhow::anyhow!("leader election: {e}"))?;
    }
    if let Some(addr) = flags.metrics_addr.0 {
        keysmith::server::serve(addr, telemetry.metrics.clone(), telemetry.health.clone()).await?;
    }
    if let Some(addr) = flags.inventory_addr.0 {
        let Some(dir) = flags.inventory_credentials_dir.clone() else {
            anyhow::bail!(
                "--inventory-addr needs --inventory-credentials-dir: the feed never runs without a credential"
            );
        };
        keysmith::feed::server::serve(addr, telemetry.metrics.clone(), dir).await?;
    }
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown_signal()));
    let Some(settings) = election else {
        return controller::run_with(client, config, options, telemetry, std::future::ready(()), shutdown).await;
    };

    // The caches sync while waiting for the Lease; the controllers start
    // once both are done.
    let elector = LeaderElector::new(client.clone(), settings, telemetry.metrics.clone(), telemetry.health.clone());
    let (lead, leading) = tokio::sync::oneshot::channel::<()>();
    let start = async {
        if leading.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let operator = controller::run_with(client, config, options, telemetry, start, shutdown.clone());
    tokio::pin!(operator);
    let mut leadership = tokio::select! {
        leadership = elector.acquire() => leadership,
        result = &mut operator => return result,
    };
    let _ = lead.send(());
    let result = tokio::select! {
        result = &mut operator => result,
        why = leadership.lost() => {
            // Another replica may act from now on: stop at once, mid-reconcile
            // if need be (every reconcile is safe to interrupt and redo).
            tracing::error!(reason = %why, "lost leadership; exiting");
            std::process::exit(1);
        }
    };
    // The controllers have stopped: hand over at once.
    leadership.release().await;
    result
}

/// `keysmith dev` in a build without the `dev` feature (the image's).
#[cfg(not(feature = "dev"))]
async fn dev(_examples: PathBuf) -> anyhow::Result<()> {
    anyhow::bail!(
        "this keysmith was built without the local control plane (cargo feature `dev`); \
         use `keysmith dev --existing-cluster`, or build with the default features"
    )
}

#[cfg(feature = "dev")]
async fn dev(examples: PathBuf) -> anyhow::Result<()> {
    use keysmith::controlplane::ControlPlane;
    eprintln!("starting a local control plane (the first run builds it from the Go modules: 5 to 10 minutes, once)...");
    let cp = ControlPlane::start().await.context("starting the local control plane")?;
    let client = cp.client().await?;
    let version = client.apiserver_version().await?;
    println!("KUBERNETES={}", version.git_version);
    install::install_crds(&client, Duration::from_secs(60)).await?;
    let config = kube::Config::from_custom_kubeconfig(cp.kubeconfig(), &Default::default()).await?;
    let telemetry = controller::Telemetry::default();
    let (metrics_addr, _server) =
        keysmith::server::serve(([127, 0, 0, 1], 0).into(), telemetry.metrics.clone(), telemetry.health.clone())
            .await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(controller::run_with(
        client.clone(),
        config,
        controller::RunOptions::default(),
        telemetry,
        std::future::ready(()),
        async {
            let _ = stop_rx.await;
        },
    ));
    let applied = manifest::apply_dir(&client, &examples).await?;
    println!("KUBECONFIG={}", cp.kubeconfig_path().display());
    let kubectl = cp.kubectl_path().map_or_else(|| "kubectl".to_owned(), |p| p.display().to_string());
    eprintln!(
        "keysmith is running on Kubernetes {}; applied {applied} objects from {}.\n\
         Try: export KUBECONFIG={} && {kubectl} get keysmith -A\n\
         Metrics: http://{metrics_addr}/metrics\n\
         Press Ctrl-C to stop and remove the control plane.",
        version.git_version,
        examples.display(),
        cp.kubeconfig_path().display()
    );
    tokio::select! {
        _ = shutdown_signal() => {}
        result = operator => {
            result??;
            anyhow::bail!("the operator stopped unexpectedly");
        }
    }
    let _ = stop_tx.send(());
    cp.stop();
    Ok(())
}

/// `keysmith dev --existing-cluster`: keysmith's CRDs (unless there), the
/// operator in this process and the examples in the current context's
/// cluster; on Ctrl-C the examples' IntegrationAccounts are deleted first,
/// while the operator still runs to deprovision them, then the rest of what
/// was applied, then the CRDs if this run installed them.
async fn dev_on_existing_cluster(examples: PathBuf, kubeconfig: Option<PathBuf>) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

    let (client, config) = connect(kubeconfig).await?;
    let version = client.apiserver_version().await?;
    eprintln!(
        "using the cluster at {} (the current kubeconfig context), Kubernetes {}",
        config.cluster_url, version.git_version
    );
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    let mut installed_here = Vec::new();
    for crd in keysmith::api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        if crds.get_opt(&name).await?.is_none() {
            installed_here.push(name);
        }
    }
    install::install_crds(&client, Duration::from_secs(60)).await?;
    let telemetry = controller::Telemetry::default();
    let (metrics_addr, _server) =
        keysmith::server::serve(([127, 0, 0, 1], 0).into(), telemetry.metrics.clone(), telemetry.health.clone())
            .await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut operator = tokio::spawn(controller::run_with(
        client.clone(),
        config.clone(),
        controller::RunOptions::default(),
        telemetry,
        std::future::ready(()),
        async {
            let _ = stop_rx.await;
        },
    ));
    let objects = manifest::read_dir(&examples)?;
    for (file, object) in &objects {
        manifest::apply(&client, object, file).await?;
    }
    println!("CLUSTER={}", config.cluster_url);
    eprintln!(
        "keysmith is running; applied {} objects from {}.\n\
         Try: kubectl get keysmith -A\n\
         Metrics: http://{metrics_addr}/metrics\n\
         Press Ctrl-C to stop and remove what was applied{}.",
        objects.len(),
        examples.display(),
        if installed_here.is_empty() { "" } else { " and keysmith's CRDs" }
    );
    tokio::select! {
        _ = shutdown_signal() => {}
        result = &mut operator => {
            result??;
            anyhow::bail!("the operator stopped unexpectedly");
        }
    }
    eprintln!("removing what was applied...");
    let is_account = |o: &kube::api::DynamicObject| o.types.as_ref().is_some_and(|t| t.kind == "IntegrationAccount");
    for (file, object) in objects.iter().filter(|(_, o)| is_account(o)) {
        manifest::delete(&client, object, file).await?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for (file, object) in objects.iter().filter(|(_, o)| is_account(o)) {
        while manifest::exists(&client, object, file).await? && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let _ = stop_tx.send(());
    let _ = operator.await;
    for (file, object) in objects.iter().rev().filter(|(_, o)| !is_account(o)) {
        manifest::delete(&client, object, file).await?;
    }
    for name in installed_here {
        let _ = crds.delete(&name, &kube::api::DeleteParams::background()).await;
    }
    Ok(())
}

fn print_crds(output_dir: Option<PathBuf>, helm: bool) -> anyhow::Result<()> {
    let crds = keysmith::api::crds();
    let render = |crd| -> anyhow::Result<String> {
        if helm {
            helm_crd_template(crd)
        } else {
            Ok(keysmith::api::crd_yaml(crd)?)
        }
    };
    match output_dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for crd in &crds {
                let path = dir.join(keysmith::api::crd_file_name(crd));
                std::fs::write(&path, render(crd)?).with_context(|| format!("writing {}", path.display()))?;
            }
        }
        None if helm => {
            let docs = crds.iter().map(render).collect::<Result<Vec<_>, _>>()?;
            print!("---\n{}", docs.join("---\n"));
        }
        None => {
            let docs = crds.iter().map(serde_yaml::to_string).collect::<Result<Vec<_>, _>>()?;
            print!("---\n{}", docs.join("---\n"));
        }
    }
    Ok(())
}

/// Renders a CRD as a template of the Helm chart (charts/keysmith): the CRD
/// exactly as `keysmith crd` prints it, behind `crds.enabled`, with the
/// chart's labels and `helm.sh/resource-policy: keep` while `crds.keep`.
/// Being templates rather than files in the chart's crds/ folder, they are
/// updated on `helm upgrade`.
fn helm_crd_template(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> anyhow::Result<String> {
    const HEADER: &str = "{{- /* Generated by `keysmith crd --helm --output-dir charts/keysmith/templates/crds` \
                          from the Rust types in src/api. Do not edit. */}}\n{{- if .Values.crds.enabled }}\n";
    const METADATA: &str = r#"metadata:
  name: NAME
  labels:
    {{- include "keysmith.labels" . | nindent 4 }}
  {{- if .Values.crds.keep }}
  annotations:
    helm.sh/resource-policy: keep
  {{- end }}
"#;
    let name = crd.metadata.name.as_deref().context("a CRD without a name")?;
    anyhow::ensure!(
        crd.metadata.labels.is_none() && crd.metadata.annotations.is_none(),
        "CRD {name}: the chart template sets labels and annotations itself; teach `keysmith crd --helm` to merge these"
    );
    let yaml = serde_yaml::to_string(crd)?;
    anyhow::ensure!(
        !yaml.contains("{{") && !yaml.contains("}}"),
        "CRD {name} contains `{{{{` or `}}}}`, which Helm would read as a template; reword its docs"
    );
    let mut out = String::from(HEADER);
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "metadata:" {
            while lines.next_if(|l| l.starts_with(' ')).is_some() {}
            out.push_str(&METADATA.replace("NAME", name));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("{{- end }}\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_check_interval_is_a_duration_of_at_least_a_second() {
        assert_eq!(parse_drift_interval("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_drift_interval("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_drift_interval("1s"), Ok(Duration::from_secs(1)));
        for bad in ["0s", "500ms", "", "ten minutes", "10"] {
            assert!(parse_drift_interval(bad).is_err(), "{bad:?} accepted");
        }
        let flags = Cli::try_parse_from(["keysmith", "run", "--drift-check-interval", "0s"]);
        assert!(flags.is_err(), "run accepts a zero drift-check interval");
    }

    #[test]
    fn tenancy_flags_are_checked() {
        assert_eq!(parse_service_account_name("keysmith"), Ok("keysmith".to_owned()));
        assert!(parse_service_account_name("system:serviceaccount:kube-system:admin").is_err());
        assert!(parse_service_account_name("").is_err());
        assert_eq!(parse_provider_name("awsIam"), Ok("awsIam".to_owned()));
        assert!(parse_provider_name("aws-iam").is_err());
        let ok = Cli::try_parse_from([
            "keysmith",
            "run",
            "--default-service-account",
            "keysmith",
            "--deny-namespaced-provider",
            "kubernetes,awsIam",
        ]);
        assert!(ok.is_ok(), "the tenancy flags parse");
        let bad = Cli::try_parse_from(["keysmith", "run", "--deny-namespaced-provider", "vault"]);
        assert!(bad.is_err(), "an unknown provider is refused");
    }
}
