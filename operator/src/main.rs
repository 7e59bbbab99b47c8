//! `agentrun-operator run` reconciles AgentRuns; `agentrun-operator crd` prints the CRD.

use agentrun_operator::args::RunArgs;
use agentrun_operator::{crd, run};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "agentrun-operator",
    version,
    about = "Reconciles agentrun.dev AgentRuns into agent pods"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator against the cluster of the kubeconfig (or the in-cluster config).
    Run(Box<RunArgs>),
    /// Print the AgentRun CustomResourceDefinition as YAML.
    Crd,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            use std::io::Write as _;
            let yaml = crd::crd_yaml()?;
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::stdout().write_all(yaml.as_bytes());
            Ok(())
        }
        Command::Run(args) => run::run(*args).await,
    }
}
