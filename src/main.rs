#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// keysmith: dedicated, least-privilege, rotating integration accounts,
/// declared as Kubernetes objects.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    let result = match cli.command {
        Command::Crd { output_dir } => print_crds(output_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_crds(output_dir: Option<PathBuf>) -> anyhow::Result<()> {
    use anyhow::Context as _;
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
            let docs = crds
                .iter()
                .map(serde_yaml::to_string)
                .collect::<Result<Vec<_>, _>>()?;
            print!("---\n{}", docs.join("---\n"));
        }
    }
    Ok(())
}
