#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use keysmith::{controller, controlplane::ControlPlane, install, manifest};

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

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

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
    },
    /// Start a throwaway local control plane, install keysmith's CRDs, run
    /// the operator in it, and apply examples/quickstart. Stops on Ctrl-C.
    Dev {
        /// Manifests applied once the operator runs.
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/quickstart"))]
        examples: PathBuf,
    },
    /// Print keysmith's CustomResourceDefinitions as YAML (all of them, as one
    /// multi-document stream), or write one file per kind into a directory.
    Crd {
        /// Write `<plural>.keysmith.dev.yaml` files into this directory
        /// instead of printing.
        #[arg(long)]
        output_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level, cli.log_format);
    let result = match cli.command {
        Command::Crd { output_dir } => print_crds(output_dir),
        Command::Run { kubeconfig, namespace } => runtime().and_then(|rt| rt.block_on(run(kubeconfig, namespace))),
        Command::Dev { examples } => runtime().and_then(|rt| rt.block_on(dev(examples))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
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

async fn run(kubeconfig: Option<PathBuf>, namespace: Option<String>) -> anyhow::Result<()> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(&path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?
        }
        None => kube::Config::infer().await.context("no kubeconfig and not running in a cluster")?,
    };
    let client = kube::Client::try_from(config.clone())?;
    let options = controller::RunOptions { namespace, ..Default::default() };
    controller::run(client, config, options, shutdown_signal()).await
}

async fn dev(examples: PathBuf) -> anyhow::Result<()> {
    eprintln!("starting a local control plane (the first run builds kube-apiserver; this takes a few minutes)...");
    let cp = ControlPlane::start().await.context("starting the local control plane")?;
    let client = cp.client().await?;
    install::install_crds(&client, Duration::from_secs(60)).await?;
    let config = kube::Config::from_custom_kubeconfig(cp.kubeconfig(), &Default::default()).await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(controller::run(client.clone(), config, controller::RunOptions::default(), async {
        let _ = stop_rx.await;
    }));
    let applied = manifest::apply_dir(&client, &examples).await?;
    println!("KUBECONFIG={}", cp.kubeconfig_path().display());
    eprintln!(
        "keysmith is running; applied {applied} objects from {}.\n\
         Try: export KUBECONFIG={} && kubectl get keysmith -A\n\
         Press Ctrl-C to stop and remove the control plane.",
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

fn print_crds(output_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let crds = keysmith::api::crds();
    match output_dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for crd in &crds {
                let path = dir.join(keysmith::api::crd_file_name(crd));
                std::fs::write(&path, keysmith::api::crd_yaml(crd)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        None => {
            let docs = crds.iter().map(serde_yaml::to_string).collect::<Result<Vec<_>, _>>()?;
            print!("---\n{}", docs.join("---\n"));
        }
    }
    Ok(())
}
