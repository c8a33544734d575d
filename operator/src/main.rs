//! The `ferry-operator` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferry-operator", version, about = "Ferry operator")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the controllers (in a cluster, or with a kubeconfig).
    Run {
        /// NATS URL of the broker.
        #[arg(long, env = "FERRY_BROKER")]
        broker: String,
        /// Watch only this namespace (default: all).
        #[arg(long, env = "FERRY_WATCH_NAMESPACE")]
        namespace: Option<String>,
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, env = "FERRY_METRICS_ADDR", default_value = "0.0.0.0:8080")]
        metrics_addr: std::net::SocketAddr,
    },
    /// Print the CRDs (YAML), or write them into a directory.
    Crd {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long)]
        write: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Run { broker, namespace, metrics_addr } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
                )
                .init();
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("ferry-operator: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(async {
                let client = match kube::Client::try_default().await {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("ferry-operator: no Kubernetes API: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let nats =
                    match async_nats::ConnectOptions::new().retry_on_initial_connect().connect(broker.as_str()).await {
                        Ok(c) => c,
                        Err(e) => {
                            eprintln!("ferry-operator: broker {broker}: {e}");
                            return ExitCode::FAILURE;
                        }
                    };
                ferry_operator::run::run(client, nats, namespace, metrics_addr).await;
                ExitCode::SUCCESS
            })
        }
        Cmd::Crd { write: None } => {
            for (_, yaml) in ferry_operator::crd::rendered() {
                println!("---\n{yaml}");
            }
            ExitCode::SUCCESS
        }
        Cmd::Crd { write: Some(dir) } => {
            for (name, yaml) in ferry_operator::crd::rendered() {
                let path = dir.join(&name);
                if let Err(e) = std::fs::write(&path, yaml) {
                    eprintln!("ferry-operator: writing {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
    }
}
